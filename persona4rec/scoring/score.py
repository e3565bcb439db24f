"""Job `score_users`: rerank every user's CF candidates by persona similarity; explain each pick.

Per user: the user vector is the γ-decayed mean of the last k cached interaction embeddings
(newest weight 1, L2-normalised; kept in `user_vectors` and refreshed first, see `users.py`);
each candidate scores max over its personas of cos(user, persona) (Eq. 10); the final score
blends it with the CF score on per-user z-scores (α = 1 is the pure rerank); the top K are
written with the winning persona and an e-mail-safe explanation.

Who is scored (`mode`): in production — the nightly e-mails — every user with a kept review, on
that mode's candidates with every item the user ever interacted with removed; each output row
says the user's `path` (`cf`: the generator's candidates; `popular`: its cold-user fallback). In
evaluation, every user with evaluation-mode candidates. The run fails (InputError, exit 1) rather
than write generic e-mails when a user to score has no candidates or no user vector for the
index's model version (e.g. build_index stopped before the interaction embeddings), or when
`scoring.alpha: auto` finds no α chosen for that model version.

Scale: users are processed in Arrow batches inside `mapInArrow` — one row per user carrying its
candidate list and vector — with the persona matrix and the sanitised explanations broadcast
once (the explanations are computed by Spark once per persona_index version and kept with its
layout, not in a loop on the driver). List columns are read as flat numpy arrays (no Python
object per float, per candidate or per user), the vector work is batched numpy (see `rank.py`),
the output is assembled with Arrow `take`, and memory per task is bounded by the Arrow batch size.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from persona4rec.config import PRODUCTION, Config, spark_path
from persona4rec.errors import InputError
from persona4rec.schemas import (CANDIDATES, INTERACTION_EMBEDDINGS, ITEM_ID, PERSONA_INDEX, RECOMMENDATIONS, REVIEWS,
                                 USER_ID, USER_VECTORS)
from persona4rec.scoring.blocks import (Prepared, block_count, blocked_persona_scores, index_megabytes, layout_code,
                                       prepare, task_count)
from persona4rec.scoring.explain import persona_texts
from persona4rec.scoring.window import check_window
from persona4rec.scoring.rank import PersonaMatrix, blend_rows, max_sim, pad, segments
from persona4rec.scoring.runs import sorted_runs, user_runs
from persona4rec.scoring.users import refresh as refresh_user_vectors
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)
GENERIC_EXPLANATION = "Popular with customers whose choices resemble yours."
# Bytes per persona beside its explanation in the broadcast: display name (≤ 60 characters),
# persona id and Arrow offsets — an upper bound for ASCII texts, used only to size the broadcast.
TEXT_OVERHEAD_BYTES = 120


@dataclass(frozen=True)
class ScoringIndex:
    """What every task needs, broadcast once: the persona tensor and, per persona slot
    (row × max_personas + column), its id, display name and ready-made e-mail explanation —
    explanations depend only on the persona, so they are sanitised once, not per recommendation."""
    pm: PersonaMatrix
    persona_id: pa.Array
    persona_name: pa.Array
    explanation: pa.Array

    @staticmethod
    def build(table: pa.Table, max_chars: int, dtype: str = "float32", texts: pa.Table | bool = True) -> "ScoringIndex":
        """From the persona_index columns item_id, persona_id, embedding (an Arrow table: no
        per-float Python objects) and the personas' e-mail texts: `texts` True computes them here
        from name, description, preference_rationale (one process: use it for small indexes);
        a table (persona_id, persona_name, explanation: the layout's, computed in Spark once per
        index version) supplies them; False leaves them null (evaluation only ranks)."""
        emb = table.column("embedding").combine_chunks()
        d = emb.value_lengths()[0].as_py() if len(emb) else 0
        vectors = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(emb), d)
        ids = table.column("persona_id").combine_chunks().cast(pa.string())
        pm = PersonaMatrix.build(table.column(ITEM_ID).to_pylist(), vectors, dtype)
        if texts is True:
            pairs = [persona_texts(a, b, c, max_chars) for a, b, c in zip(*(
                table.column(c).to_pylist() for c in ("name", "description", "preference_rationale")))]
            names, texts_ = pa.array([p[0] for p in pairs], pa.string()), pa.array([p[1] for p in pairs], pa.string())
        elif texts is False:
            names = texts_ = pa.nulls(len(ids), pa.string())
        else:
            at = pc.index_in(ids, texts.column("persona_id").combine_chunks().cast(pa.string()))
            if at.null_count:
                log.warning("%d of %d personas have no e-mail text in the layout: they explain with the generic "
                            "text", at.null_count, len(ids))
            names, texts_ = (texts.column(c).combine_chunks().cast(pa.string()).take(at)
                             for c in ("persona_name", "explanation"))
        slots = pm.slots.ravel()
        pick = pa.array(np.where(slots >= 0, slots, 0), mask=slots < 0)
        return ScoringIndex(pm, ids.take(pick), names.take(pick), texts_.take(pick))


@dataclass(frozen=True)
class Ranked:
    """Per kept (user, candidate): positions into the batch's flat arrays, rank, scores, best persona slot."""
    user: np.ndarray
    candidate: np.ndarray
    rank: np.ndarray
    score: np.ndarray
    persona_score: np.ndarray  # NaN where the item has no persona
    slot: np.ndarray  # -1 where no persona explains the pick (no history, or item not indexed)


def rank_candidates(users: np.ndarray | None, has: np.ndarray, counts: np.ndarray, rows: np.ndarray | None,
                    cf: np.ndarray, cf_rank: np.ndarray, pm: PersonaMatrix | None, alpha: float, top_k: int | None,
                    persona: np.ndarray | None = None) -> Ranked:
    """Rerank every user's candidates (flat arrays + per-user counts) by Eq. 10 blended with CF.

    Users with history: final = blend(max-sim, CF); a candidate the index lacks gets the user's
    lowest persona score (never a free win). Users without history keep the CF order. Ties go to
    the better CF rank. top_k None keeps every candidate (evaluation). `persona` given (max-sim
    per candidate already computed, NaN where none: the blocked path) replaces users/rows/pm; the
    returned `slot` is then the candidate's flat position where it has a persona score."""
    owner, pos, starts = segments(counts)
    n, width = len(counts), int(counts.max()) if len(counts) else 0
    best = np.full(len(cf), -1, dtype=np.int64)
    if persona is None:
        persona = np.full(len(rows), np.nan)
        live = (rows >= 0) & has[owner]
        if live.any():
            s, b = max_sim(users[owner[live]], rows[live], pm)
            persona[live], best[live] = s, b
    else:
        persona = np.where(has[owner], persona, np.nan)
        best = np.where(np.isnan(persona), -1, np.arange(len(persona)))
    shape = (n, width)
    valid = pad(np.ones(len(cf), dtype=bool), owner, pos, shape, False)
    p = pad(persona, owner, pos, shape, np.nan)
    finite = valid & ~np.isnan(p)
    floor = np.where(finite, p, np.inf).min(axis=1, keepdims=True)
    p = np.where(finite, p, np.where(np.isinf(floor), 0.0, floor))
    cf_pad = pad(cf.astype(np.float64), owner, pos, shape, 0.0)
    final = np.where(has[:, None], blend_rows(p, cf_pad, valid, alpha), cf_pad)
    key = np.where(valid, np.where(has[:, None], -final, 0.0), np.inf)
    order = np.lexsort((pad(cf_rank.astype(np.int64), owner, pos, shape, np.iinfo(np.int64).max), key), axis=1)
    order = order[:, :top_k] if top_k is not None else order
    user_of = np.broadcast_to(np.arange(n)[:, None], order.shape)
    keep = valid[user_of, order]
    u, c = user_of[keep], order[keep]
    flat = starts[u] + c
    rank = np.broadcast_to(np.arange(1, order.shape[1] + 1)[None, :], order.shape)[keep]
    slot = best[flat] if rows is None else np.where(best[flat] >= 0, rows[flat] * pm.mask.shape[1] + best[flat], -1)
    return Ranked(u, flat, rank.astype(np.int32), final[u, c], persona[flat], slot)


def _list_counts(arr: pa.ListArray) -> np.ndarray:
    return arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def vector_matrix(batch: pa.RecordBatch, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The `vector` column (array<float>, null for users without history) as (users, d) plus a
    has-history mask."""
    vec = batch.column("vector")
    lengths = _list_counts(vec)
    has = np.asarray(vec.is_valid(), dtype=bool)
    if has.any() and (lengths[has].min() != d or lengths[has].max() != d):
        bad = int(np.argmax(has & (lengths != d)))
        raise ValueError(f"user_vectors: user {batch.column(USER_ID)[bad].as_py()!r} has a vector of length "
                         f"{lengths[bad]} (field 'vector'), the persona index has dimension {d}: "
                         f"rerun build_index and score_users with one model version")
    out = np.zeros((len(vec), d), dtype=np.float32)
    out[has] = vec.filter(pa.array(has)).flatten().to_numpy(zero_copy_only=False).reshape(int(has.sum()), d)
    return out, has


def candidate_arrays(batch: pa.RecordBatch) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray, np.ndarray]:
    """The `cands` list column as per-user counts, its fields (Arrow) and flat numpy rows, CF
    scores and CF ranks."""
    cands = batch.column("cands")
    fields = dict(zip([f.name for f in cands.type.value_type], cands.flatten().flatten()))
    rows = fields["row"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    cf = fields["cf_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    cf_rank = fields["cf_rank"].to_numpy(zero_copy_only=False).astype(np.int64)
    return _list_counts(cands), fields, rows, cf, cf_rank


def ranked_arrays(batch: pa.RecordBatch, fields: dict, r: Ranked, has: np.ndarray, cf: np.ndarray,
                  cf_rank: np.ndarray) -> list[pa.Array]:
    """user_id, rank, item_id, score, persona_score, cf_rank of the kept rows, shared by the
    broadcast and the blocked paths (users without history keep their CF score)."""
    return [batch.column(USER_ID).take(pa.array(r.user)).cast(pa.string()),
            pa.array(r.rank, pa.int32()),
            fields[ITEM_ID].take(pa.array(r.candidate)).cast(pa.string()),
            pa.array(np.where(has[r.user], r.score, cf[r.candidate]), pa.float64()),
            pa.array(r.persona_score, pa.float64(), mask=np.isnan(r.persona_score)),
            pa.array(cf_rank[r.candidate].astype(np.int32), pa.int32())]


def score_arrow_batch(batch: pa.RecordBatch, index: ScoringIndex, alpha: float, top_k: int) -> pa.RecordBatch:
    """One Arrow batch of users (user_id, source, vector, cands list<item_id, row, cf_score, cf_rank>)
    → top-K rows; `path` is the user's candidate source."""
    pm = index.pm
    users, has = vector_matrix(batch, pm.vectors.shape[2])
    counts, fields, rows, cf, cf_rank = candidate_arrays(batch)
    r = rank_candidates(users, has, counts, rows, cf, cf_rank, pm, alpha, top_k)
    explained = r.slot >= 0
    slot = pa.array(np.where(explained, r.slot, 0), mask=~explained)
    return pa.RecordBatch.from_arrays([
        *ranked_arrays(batch, fields, r, has, cf, cf_rank),
        index.persona_id.take(slot),
        index.persona_name.take(slot),
        index.explanation.take(slot).fill_null(GENERIC_EXPLANATION),
        pa.array(has[r.user], pa.bool_()),
        batch.column("source").take(pa.array(r.user)).cast(pa.string()),
    ], schema=OUTPUT_ARROW)


OUTPUT_ARROW = pa.schema([
    (USER_ID, pa.string()), ("rank", pa.int32()), (ITEM_ID, pa.string()), ("score", pa.float64()),
    ("persona_score", pa.float64()), ("cf_rank", pa.int32()), ("persona_id", pa.string()),
    ("persona_name", pa.string()), ("explanation", pa.string()), ("has_history", pa.bool_()), ("path", pa.string())])
OUTPUT_DDL = ("user_id string, rank int, item_id string, score double, persona_score double, cf_rank int, "
              "persona_id string, persona_name string, explanation string, has_history boolean, path string")


def scoring_index(index: DataFrame, max_chars: int, dtype: str = "float32",
                  texts: pa.Table | bool = True) -> ScoringIndex:
    """The broadcast ScoringIndex of a persona_index DataFrame (texts: see ScoringIndex.build)."""
    cols = [ITEM_ID, "persona_id", "embedding"] + (["name", "description", "preference_rationale"] if texts is True
                                                   else [])
    return ScoringIndex.build(index.select(*cols).toArrow(), max_chars, dtype, texts)


def user_candidates(spark: SparkSession, candidates: DataFrame, si: ScoringIndex,
                    extra: tuple[str, ...] = (), per_user: tuple[str, ...] = ()) -> DataFrame:
    """user_id, cands: each user's candidates with the persona-matrix row of the item (-1: not
    indexed), plus any `extra` candidate columns; `per_user` columns (one value per user, such
    as the candidate source) come along as plain columns."""
    items = spark.createDataFrame(pd.DataFrame({ITEM_ID: list(si.pm.item_index),
                                                "row": np.fromiter(si.pm.item_index.values(), np.int32)}))
    joined = candidates.join(F.broadcast(items), ITEM_ID, "left").withColumn("row", F.coalesce("row", F.lit(-1)))
    return joined.groupBy(USER_ID).agg(
        *[F.max(c).alias(c) for c in per_user],
        F.collect_list(F.struct(ITEM_ID, "row", "cf_score", "cf_rank", *extra)).alias("cands"))


def layout_path(blocks_dir: str, cfg: Config, blocks: int) -> str:
    """The folder of one blocked layout of an index version: its dtype, block count, text length and code."""
    sc = cfg.scoring
    return f"{blocks_dir.rstrip('/')}/{sc.index_dtype}-b{blocks}-c{sc.explanation_max_chars}-{layout_code()}"


def recommend(spark: SparkSession, candidates: DataFrame, user_vectors: DataFrame, index: DataFrame, cfg: Config,
              model_version: str, run_date: dt.date, generator: str, alpha: float | None = None,
              blocks_dir: str | None = None) -> DataFrame:
    """candidates (user_id, item_id, cf_score, cf_rank, source) + user_vectors (user_id, vector) +
    the persona index → the recommendations rows of every user with candidates, in cfg.mode.
    alpha: the blend weight (default: scoring.alpha, which must then be a number).

    The persona index is broadcast while its padded tensor (in `scoring.index_dtype`) and its
    personas' e-mail texts (bounded by `scoring.explanation_max_chars`) fit `scoring.index_budget_mb`, else scored in item blocks (blocks.py); both give the same rows. The
    blocked layout (blocks + e-mail texts) is kept under `blocks_dir` — a folder that names this
    version of the index: a later run with the same index, dtype, budget, text length and code
    (`blocks.layout_code`) reuses it; required when the index is over the budget. On the broadcast
    path the e-mail texts alone are kept there (a layout of 0 blocks), computed by Spark instead of
    one loop on the driver; without blocks_dir the driver computes them (small indexes, tests)."""
    sc = cfg.scoring
    alpha = float(sc.alpha if alpha is None else alpha)
    megabytes, items, width, d = index_megabytes(index, np.dtype(sc.index_dtype).itemsize)
    # The broadcast carries every persona's id, name and e-mail text beside the tensor: both count.
    texts_mb = items * width * (sc.explanation_max_chars + TEXT_OVERHEAD_BYTES) / 2 ** 20
    if megabytes + texts_mb > sc.index_budget_mb:
        blocks = block_count(megabytes, sc.index_budget_mb)
        log.info("persona index %d items × %d personas × %d dims = %.0f MB (%s) + %.0f MB of texts > "
                 "scoring.index_budget_mb %g: scored in %d item blocks", items, width, d, megabytes, sc.index_dtype,
                 texts_mb, sc.index_budget_mb, blocks)
        if blocks_dir is None:
            raise ValueError(f"the persona index ({megabytes:.0f} MB) is over scoring.index_budget_mb "
                             f"{sc.index_budget_mb:g}: pass blocks_dir, a folder named after this index version")
        prepared = prepare(index, blocks, sc.index_dtype, sc.explanation_max_chars, layout_path(blocks_dir, cfg, blocks))
        rows = blocked_recommendations(spark, candidates, user_vectors, prepared, cfg, alpha)
        return rows.select(F.lit(run_date).alias("run_date"), F.lit(cfg.mode).alias("mode"),
                           F.lit(generator).alias("generator"), F.lit(model_version).alias("model_version"), "*")
    texts: pa.Table | bool = True
    if blocks_dir is not None:  # the e-mail texts, computed in Spark once per index version (blocks 0: texts only)
        layout = prepare(index, 0, sc.index_dtype, sc.explanation_max_chars, layout_path(blocks_dir, cfg, 0))
        texts = spark.read.parquet(spark_path(f"{layout.path}/explanations")).toArrow()
    si = scoring_index(index, sc.explanation_max_chars, sc.index_dtype, texts)
    bc = spark.sparkContext.broadcast(si)
    users = user_candidates(spark, candidates, si, per_user=("source",)).join(
        user_vectors.select(USER_ID, "vector"), USER_ID, "left")
    top_k = sc.top_k

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        si_ = bc.value
        for batch in batches:
            yield score_arrow_batch(batch, si_, alpha, top_k)

    return users.mapInArrow(score, OUTPUT_DDL).select(
        F.lit(run_date).alias("run_date"), F.lit(cfg.mode).alias("mode"), F.lit(generator).alias("generator"),
        F.lit(model_version).alias("model_version"), "*")


RANKED_DDL = ("user_id string, rank int, item_id string, score double, persona_score double, cf_rank int, "
              "persona_id string, has_history boolean, path string")


def blocked_recommendations(spark: SparkSession, candidates: DataFrame, user_vectors: DataFrame, prepared: Prepared,
                            cfg: Config, alpha: float) -> DataFrame:
    """The OUTPUT_DDL rows of `recommend` with the persona index in item blocks: per-candidate
    max-sim from blocks.py (every candidate comes back from there with its CF fields: no join back),
    then per user the same blend and ranking, then the explanations joined."""
    sc = cfg.scoring
    partitions = task_count(spark, prepared.blocks)
    scores = blocked_persona_scores(candidates, user_vectors, prepared, partitions)
    top_k = sc.top_k

    def rank(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for t in sorted_runs(batches, [USER_ID]):
            t, starts, counts = user_runs(t, USER_ID)
            col = lambda name: t.column(name).chunk(0)
            users = pa.RecordBatch.from_arrays([col(USER_ID).take(pa.array(starts))], names=[USER_ID])
            has = col("has").to_numpy(zero_copy_only=False)[starts].astype(bool)
            fields = {ITEM_ID: col(ITEM_ID), "persona_id": col("persona_id")}
            cf = col("cf_score").to_numpy(zero_copy_only=False).astype(np.float64)
            cf_rank = col("cf_rank").to_numpy(zero_copy_only=False).astype(np.int64)
            persona = col("persona_score").to_numpy(zero_copy_only=False).astype(np.float64)
            r = rank_candidates(None, has, counts, None, cf, cf_rank, None, alpha, top_k, persona)
            explained = r.slot >= 0
            yield pa.RecordBatch.from_arrays([
                *ranked_arrays(users, fields, r, has, cf, cf_rank),
                fields["persona_id"].take(pa.array(np.where(explained, r.candidate, 0), mask=~explained))
                .cast(pa.string()),
                pa.array(has[r.user], pa.bool_()),
                col("source").take(pa.array(starts[r.user])).cast(pa.string()),
            ], names=RANKED_DDL_NAMES)

    ranked = scores.repartition(partitions, USER_ID).sortWithinPartitions(USER_ID).mapInArrow(rank, RANKED_DDL)
    texts = spark.read.parquet(spark_path(f"{prepared.path}/explanations"))
    return ranked.join(texts, "persona_id", "left").select(
        USER_ID, "rank", ITEM_ID, "score", "persona_score", "cf_rank", "persona_id", "persona_name",
        F.coalesce("explanation", F.lit(GENERIC_EXPLANATION)).alias("explanation"), "has_history", "path")


RANKED_DDL_NAMES = [c.split()[0] for c in RANKED_DDL.split(", ")]


def resolve_alpha(cfg: Config, model_version: str, generator: str) -> float:
    """scoring.alpha, or for `auto` the α the evaluate job chose on validation for this model
    version and generator. With none chosen the run fails: α = 1 (the pure rerank) is below the
    generator on our own quality table, so a silent fall-back would send worse e-mails."""
    if cfg.scoring.alpha != "auto":
        return float(cfg.scoring.alpha)
    from persona4rec.training.registry import blend_alpha  # MLflow only on the driver, only when asked

    chosen = blend_alpha(cfg, model_version, generator)
    if chosen is None:
        raise InputError(
            f"scoring.alpha is auto, but model version {model_version} of {cfg.mlflow.registered_model} has no "
            f"α chosen for generator {generator} (tag blend_alpha_{generator}): run the evaluate job for this "
            f"model (it chooses α on validation and tags the version), or set scoring.alpha to a number")
    log.info("scoring.alpha = auto: %.2f, chosen on validation for model %s / %s", chosen, model_version, generator)
    return chosen


def scored_users(store: TableStore, cfg: Config, candidates: DataFrame) -> DataFrame:
    """user_id of everyone who must get recommendations: in production every user with a kept
    review, in evaluation every user with candidates."""
    if cfg.mode == PRODUCTION:
        return store.read(REVIEWS.name).select(USER_ID).distinct()
    return candidates.select(USER_ID).distinct()


def require_coverage(users: DataFrame, have: DataFrame, what: str, fix: str) -> None:
    """Fail, naming a few users, when some of `users` have no row in `have` (user_id)."""
    missing = users.join(have.select(USER_ID).distinct(), USER_ID, "left_anti")
    n = missing.count()
    if n:
        some = sorted(r[0] for r in missing.limit(5).collect())
        raise InputError(f"{n} user(s) to score have no {what} (e.g. {some}): {fix}")


LEASE_HOURS = 24  # a run holding a layout longer than this is taken for crashed


def remove_old_layouts(current: str) -> None:
    """After a successful write: the layouts of older persona_index versions go, unless a run still
    holds one (a `_lease-*` file younger than LEASE_HOURS: a run scoring the previous version
    while build_index moved on); the current one stays for the next night."""
    parent, name = os.path.split(current.rstrip("/"))
    version = lambda n: int(n.rsplit("-v", 1)[1]) if n.startswith("persona_index-v") and \
        n.rsplit("-v", 1)[1].isdigit() else None
    now = time.time()
    for other in os.listdir(parent) if os.path.isdir(parent) else []:
        folder = os.path.join(parent, other)
        if version(other) is None or version(other) >= version(name):
            continue
        leases = [f for f in os.listdir(folder) if f.startswith("_lease-")] if os.path.isdir(folder) else []
        if any(now - os.path.getmtime(os.path.join(folder, f)) < LEASE_HOURS * 3600 for f in leases):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def run(spark: SparkSession, cfg: Config) -> dict:
    store = TableStore(spark, cfg)
    sc, mode = cfg.scoring, cfg.mode
    run_date = dt.date.fromisoformat(sc.run_date) if sc.run_date else dt.datetime.now(dt.timezone.utc).date()
    index_version = store.version(PERSONA_INDEX.name)  # pinned: the blocked layout is kept per table version
    index = store.read(PERSONA_INDEX.name, version=index_version)
    versions = [r[0] for r in index.select("model_version").distinct().collect()]
    if len(versions) != 1:
        raise InputError(f"persona_index holds model versions {versions}: run build_index first")
    version = versions[0]
    if sc.alpha == "auto" and not version.startswith("untuned:") and "#" not in version:
        raise InputError(f"persona_index holds model version {version!r} without its key (written before model "
                         "keys): its α cannot be matched to the registry's model: rerun build_index")
    alpha = resolve_alpha(cfg, version, sc.generator)  # before any heavy work: a missing α fails at once
    candidates = store.read(CANDIDATES.name).filter((F.col("mode") == mode) & (F.col("generator") == sc.generator))
    if mode == PRODUCTION:
        # Defence in depth: nothing a customer ever interacted with is recommended, even from stale candidates.
        candidates = candidates.join(store.read(REVIEWS.name).select(USER_ID, ITEM_ID), [USER_ID, ITEM_ID],
                                     "left_anti")
    candidates = candidates.persist()
    users = scored_users(store, cfg, candidates).persist()
    require_coverage(users, candidates, f"{mode}-mode candidates of generator {sc.generator}",
                     f"run generate_candidates with mode={mode} (after ingest) before score_users")
    embedded = store.read(INTERACTION_EMBEDDINGS.name).filter(F.col("model_version") == version).limit(1).count()
    if not embedded:
        held = [r[0] for r in store.read(INTERACTION_EMBEDDINGS.name).select("model_version").distinct().collect()]
        raise InputError(f"interaction_embeddings has no rows of model version {version} (the persona_index's; "
                         f"it holds {held}): build_index did not finish for this model — rerun build_index")
    check_window(store, cfg.profile.k, None if mode == PRODUCTION else sc.history_splits)
    refreshed = refresh_user_vectors(store, version, None if mode == PRODUCTION else sc.history_splits,
                                     cfg.profile.k, cfg.profile.gamma)
    vectors = store.read(USER_VECTORS.name).filter(F.col("model_version") == version)
    require_coverage(users, vectors, f"user vector for model version {version} (no interaction_embeddings rows of "
                     f"that version for them)", "rerun build_index, then score_users")
    blocks_dir = cfg.work_dir(f"persona_blocks/persona_index-v{index_version}")
    os.makedirs(blocks_dir, exist_ok=True)
    lease = os.path.join(blocks_dir, f"_lease-{uuid.uuid4().hex[:12]}")  # this run reads the layout
    open(lease, "w").close()
    try:
        recs = recommend(spark, candidates, vectors, index, cfg, version, run_date, sc.generator, alpha, blocks_dir)
        w = store.replace_where(recs, RECOMMENDATIONS, f"run_date = '{run_date.isoformat()}' AND mode = '{mode}' "
                                                       f"AND generator = '{sc.generator}'")
    finally:
        os.remove(lease)
    remove_old_layouts(blocks_dir)
    candidates.unpersist()
    users.unpersist()
    written = store.read(RECOMMENDATIONS.name).filter(
        (F.col("run_date") == F.lit(run_date)) & (F.col("mode") == mode) & (F.col("generator") == sc.generator))
    stats = written.agg(F.countDistinct(USER_ID), F.count("*")).first()
    paths = {r["path"]: int(r["users"]) for r in
             written.groupBy("path").agg(F.countDistinct(USER_ID).alias("users")).collect()}
    log.info("recommendations %s (%s mode, %s, model %s): %d users, %d rows, users by path %s", run_date, mode,
             sc.generator, version, stats[0], stats[1], paths)
    return {"run_date": run_date.isoformat(), "mode": mode, "generator": sc.generator, "model_version": version,
            "users": int(stats[0]), "rows": int(stats[1]), "users_by_path": paths, "delta_version": w.version,
            "user_vectors_recomputed": refreshed["recomputed"], "alpha": alpha}
