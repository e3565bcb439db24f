"""Job `score_users`: rerank every user's CF candidates by persona similarity; explain each pick.

Per user: the user vector is the γ-decayed mean of the last k cached interaction embeddings
(newest weight 1, L2-normalised); each candidate scores max over its personas of cos(user,
persona) (Eq. 10); the final score blends it with the CF score on per-user z-scores (α = 1 is the
pure rerank); the top K are written with the winning persona and an e-mail-safe explanation.
Users without history keep the CF order with a generic explanation, flagged `has_history=false`.

Scale: users are processed in Arrow batches inside `mapInPandas` — one row per user carrying its
candidate list and history — with the persona matrix broadcast once; the vector work is batched
numpy (see `rank.py`), and memory per task is bounded by the batch size.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from persona4rec.config import Config
from persona4rec.schemas import CANDIDATES, INTERACTION_EMBEDDINGS, ITEM_ID, PERSONA_INDEX, RECOMMENDATIONS, USER_ID
from persona4rec.scoring.explain import explanation, sanitize
from persona4rec.scoring.rank import PersonaMatrix, blend, max_sim
from persona4rec.training.encoder import user_vector
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)
GENERIC_EXPLANATION = "Popular with customers whose choices resemble yours."


def user_histories(embeddings: DataFrame, splits: tuple[str, ...], k: int) -> DataFrame:
    """user_id, history: the last k interaction embeddings, oldest first."""
    rows = embeddings.filter(F.col("split").isin(*splits))
    hist = rows.groupBy(USER_ID).agg(F.sort_array(F.collect_list(F.struct("ts", "seq", "embedding"))).alias("h"))
    n = F.size("h")
    last = F.when(n > k, F.slice("h", n - k + 1, k)).otherwise(F.col("h"))
    return hist.select(USER_ID, F.transform(last, lambda x: x["embedding"]).alias("history"))


def user_vectors(histories: list, gamma: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) user vectors and a has-history mask."""
    out = np.zeros((len(histories), d), dtype=np.float32)
    has = np.zeros(len(histories), dtype=bool)
    for n, h in enumerate(histories):
        if h is None or len(h) == 0:
            continue
        out[n] = user_vector(np.stack([np.asarray(x, dtype=np.float32) for x in h]), gamma)
        has[n] = True
    return out, has


def score_batch(pdf: pd.DataFrame, pm: PersonaMatrix, meta: dict, gamma: float, alpha: float, top_k: int,
                max_chars: int) -> pd.DataFrame:
    """One Arrow batch of users (user_id, cands [item, cf_score, cf_rank], history) → top-K rows."""
    d = pm.vectors.shape[2]
    users, has = user_vectors(list(pdf["history"]), gamma, d)
    owner, items, cf, cf_rank = [], [], [], []
    for n, cands in enumerate(pdf["cands"]):
        for c in cands:
            owner.append(n)
            items.append(c[ITEM_ID])
            cf.append(c["cf_score"])
            cf_rank.append(c["cf_rank"])
    owner_a = np.asarray(owner, dtype=np.int64)
    rows = np.asarray([pm.item_index.get(i, -1) for i in items], dtype=np.int64)
    indexed = rows >= 0
    persona = np.full(len(items), np.nan, dtype=np.float32)
    best = np.full(len(items), -1, dtype=np.int64)
    if indexed.any():
        s, b = max_sim(users[owner_a[indexed]], rows[indexed], pm)
        persona[indexed], best[indexed] = s, b
    cf_a, rank_a = np.asarray(cf, dtype=np.float64), np.asarray(cf_rank, dtype=np.int64)
    out = []
    starts = np.searchsorted(owner_a, np.arange(len(pdf) + 1))
    for n, user in enumerate(pdf[USER_ID]):
        lo, hi = starts[n], starts[n + 1]
        if lo == hi:
            continue
        idx = np.arange(lo, hi)
        if has[n]:
            p = np.where(np.isnan(persona[idx]), np.nanmin(persona[idx]) if np.isfinite(persona[idx]).any() else 0.0,
                         persona[idx])
            final = blend(p, cf_a[idx], alpha)
            order = idx[np.lexsort((rank_a[idx], -final))]
            final_of = dict(zip(idx, final))
        else:
            order = idx[np.argsort(rank_a[idx], kind="stable")]
            final_of = {j: float(cf_a[j]) for j in idx}
        for rank, j in enumerate(order[:top_k], start=1):
            pid = name = None
            if has[n] and best[j] >= 0:
                pid = pm.persona_ids[rows[j], best[j]]
                name, desc, why = meta[pid]
                text = explanation(name, desc, why, max_chars)
                name = sanitize(name, 60)
            else:
                text = GENERIC_EXPLANATION
            out.append((user, rank, items[j], float(final_of[j]),
                        None if np.isnan(persona[j]) else float(persona[j]), int(rank_a[j]), pid, name, text,
                        bool(has[n])))
    return pd.DataFrame(out, columns=[USER_ID, "rank", ITEM_ID, "score", "persona_score", "cf_rank",
                                      "persona_id", "persona_name", "explanation", "has_history"])


def recommend(spark: SparkSession, candidates: DataFrame, embeddings: DataFrame, index: DataFrame, cfg: Config,
              model_version: str, run_date: dt.date, generator: str) -> DataFrame:
    rows = index.select(ITEM_ID, "persona_id", "name", "description", "preference_rationale", "embedding").collect()
    pm = PersonaMatrix.build([r[ITEM_ID] for r in rows], [r["persona_id"] for r in rows],
                             [np.asarray(r["embedding"], dtype=np.float32) for r in rows])
    meta = {r["persona_id"]: (r["name"], r["description"], r["preference_rationale"]) for r in rows}
    bc = spark.sparkContext.broadcast((pm, meta))
    sc, prof = cfg.scoring, cfg.profile
    per_user = candidates.groupBy(USER_ID).agg(
        F.collect_list(F.struct(ITEM_ID, "cf_score", "cf_rank")).alias("cands"))
    users = per_user.join(user_histories(embeddings, sc.history_splits, prof.k), USER_ID, "left")
    schema = ("user_id string, rank int, item_id string, score double, persona_score double, cf_rank int, "
              "persona_id string, persona_name string, explanation string, has_history boolean")

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        pm_, meta_ = bc.value
        for pdf in batches:
            yield score_batch(pdf, pm_, meta_, prof.gamma, sc.alpha, sc.top_k, sc.explanation_max_chars)

    return users.mapInPandas(score, schema).select(
        F.lit(run_date).alias("run_date"), F.lit(generator).alias("generator"),
        F.lit(model_version).alias("model_version"), "*")


def run(spark: SparkSession, cfg: Config) -> dict:
    store = TableStore(spark, cfg)
    sc = cfg.scoring
    run_date = dt.date.fromisoformat(sc.run_date) if sc.run_date else dt.datetime.now(dt.timezone.utc).date()
    index = store.read(PERSONA_INDEX.name)
    versions = [r[0] for r in index.select("model_version").distinct().collect()]
    if len(versions) != 1:
        raise ValueError(f"persona_index holds model versions {versions}: run build_index first")
    embeddings = store.read(INTERACTION_EMBEDDINGS.name).filter(F.col("model_version") == versions[0])
    candidates = store.read(CANDIDATES.name).filter(F.col("generator") == sc.generator)
    recs = recommend(spark, candidates, embeddings, index, cfg, versions[0], run_date, sc.generator)
    w = store.replace_where(recs, RECOMMENDATIONS, f"run_date = '{run_date.isoformat()}' AND generator = '{sc.generator}'")
    written = store.read(RECOMMENDATIONS.name).filter(
        (F.col("run_date") == F.lit(run_date)) & (F.col("generator") == sc.generator))
    stats = written.agg(F.countDistinct(USER_ID), F.count("*"), F.sum(F.col("has_history").cast("int"))).first()
    log.info("recommendations %s (%s, model %s): %d users, %d rows", run_date, sc.generator, versions[0],
             stats[0], stats[1])
    return {"run_date": run_date.isoformat(), "generator": sc.generator, "model_version": versions[0],
            "users": int(stats[0]), "rows": int(stats[1]), "delta_version": w.version}
