"""The LLM-free persona backend (`offline.persona_builder: extractive`).

For users with no LLM budget, and to measure quality at full scale on a CPU: per item, its usable
reviews are embedded with the base encoder and clustered (offline/cluster.py); each cluster becomes
one persona — its name from the words typical of the cluster, its description from the liked
(4+ stars) review nearest the cluster centre, its rationale quoting the most helpful other liked
review; a cluster that is not mostly liked reviews is described by its words and never quoted,
since the persona text is the e-mail's explanation — and every item without reviews gets the same summary-only
persona as the LLM path. Summaries are the metadata text (title, description, categories), or
the lead of the most helpful review when an item has no metadata.
Alignment needs no judge: a training interaction's persona is the cluster holding the user's own
review of the item. The tables, ids and contracts are the LLM path's, so every later stage,
test and job is shared.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.alignment.profiles import profiles, stored_interaction_texts
from persona4rec.config import Config
from persona4rec.offline import cluster, tasks
from persona4rec.offline.common import per_item, usable_reviews
from persona4rec.offline.persona_rows import summary_only_personas, with_persona_ids
from persona4rec.schemas import (ALIGNMENT_PAIRS, ITEM_ID, ITEM_PERSONAS, ITEM_SUMMARIES, ITEMS, RATING,
                                 REVIEW_CLUSTERS, SPLIT, TRAIN, TS, USER_ID)
from persona4rec.scoring.embedding import worker_model
from persona4rec.tables import TableStore
from persona4rec.training.encoder import resolve_model_name

log = logging.getLogger(__name__)
SOURCE = "extractive"
CLUSTER_JUSTIFICATION = "The user's own review of this item belongs to this persona's review cluster."
SUMMARY_CHARS = 200  # review-based summary of an item without metadata
MAX_REVIEWS_CLUSTERED = 200  # per item; further reviews join their nearest cluster
_OUT = T.StructType([
    T.StructField(ITEM_ID, T.StringType()), T.StructField("persona_index", T.IntegerType()),
    T.StructField("name", T.StringType()), T.StructField("description", T.StringType()),
    T.StructField("preference_rationale", T.StringType()), T.StructField("pool_size", T.IntegerType()),
    T.StructField("members", T.ArrayType(T.StringType()))])


def summaries(items: DataFrame, reviews: DataFrame) -> DataFrame:
    """item_summaries rows without an LLM: the metadata text (the LLM path's fallback), or, when
    the item has no title, description or category, what its most helpful review says first."""
    best = Window.partitionBy(ITEM_ID).orderBy(F.col("helpful_votes").desc_nulls_last(), F.col(TS), F.col(USER_ID))
    lead = (reviews.withColumn("_r", F.row_number().over(best)).filter("_r = 1")
            .select(ITEM_ID, F.col("review_text").alias("_lead")))

    def render(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            out = []
            for r in pdf.to_dict("records"):
                text = tasks.fallback_summary(r)
                if text == f"Item {r[ITEM_ID]}" and isinstance(r.get("_lead"), str):
                    text = f"Item {r[ITEM_ID]}. Reviewers say: {cluster.first_sentences(r['_lead'], SUMMARY_CHARS)}"
                out.append(text)
            yield pd.DataFrame({ITEM_ID: pdf[ITEM_ID], "summary": out})

    return items.join(lead, ITEM_ID, "left").mapInPandas(render, f"{ITEM_ID} string, summary string").select(
        ITEM_ID, "summary", F.lit(SOURCE).alias("source"), F.lit("skipped").alias("status"),
        *[F.lit(None).cast("string").alias(c) for c in ("llm_key", "prompt", "model")])


def item_personas(reviews: pd.DataFrame, model, max_personas: int, seed: int) -> list[dict]:
    """One item's reviews (user_id, rating, review_text, helpful_votes) → persona dicts with members."""
    reviews = reviews.sort_values(["helpful_votes", USER_ID], ascending=[False, True], na_position="last")
    texts = [" ".join(str(t).split()) for t in reviews["review_text"]]
    vec = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False).astype(np.float32)
    item = str(reviews[ITEM_ID].iloc[0])
    item_seed = seed + int(hashlib.sha256(item.encode()).hexdigest()[:8], 16) % 100_000
    head = vec[:MAX_REVIEWS_CLUSTERED]
    min_size = 2 if len(head) >= 6 else max(len(head), 1)
    labels = cluster.choose_clusters(head, max_personas, min_size, 0.05, item_seed)
    centres = np.stack([head[labels == k].mean(axis=0) for k in range(labels.max() + 1)])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    labels = np.concatenate([labels, np.argmax(vec[len(head):] @ centres.T, axis=1)]).astype(np.int64)
    out = []
    ratings = reviews[RATING].to_numpy(dtype=float)
    votes = reviews["helpful_votes"].fillna(0).to_numpy(dtype=float)
    for k in range(len(centres)):
        m = np.flatnonzero(labels == k)
        words = cluster.keywords([texts[i] for i in m], texts)
        mean = float(ratings[m].mean())
        name = ("Buyers focused on " + ", ".join(words)) if words else "Typical buyers"
        # The persona's text is the e-mail's explanation: it quotes only reviews of 4 stars or more,
        # and only for a cluster mostly made of them (the most central one, then the most helpful
        # other one); any other cluster stays a persona for matching and is described, never quoted.
        liked = m[ratings[m] >= 4]
        about = ", ".join(words) or "the item itself"
        if len(liked) and 2 * len(liked) >= len(m):
            typical = liked[int(np.argmax(vec[liked] @ centres[k]))]
            description = (f"{len(m)} review(s), average {mean:.1f} stars. Typical view: "
                           f"{cluster.first_sentences(texts[typical], 260)}")
            others = liked[liked != typical]
            if len(others):
                signal = others[int(np.argmax(votes[others] * 10 + ratings[others]))]
                rationale = (f"What they liked ({ratings[signal]:g} stars): "
                             f"\"{cluster.first_sentences(texts[signal], 200)}\"")
            else:
                rationale = f"What they liked: {about}."
        else:
            voice = "a critical voice" if mean < 3 else "a mixed voice"
            description = f"{len(m)} review(s), average {mean:.1f} stars: {voice} about {about}."
            rationale = f"Matches customers who care about {about}."
        out.append({ITEM_ID: item, "persona_index": k, "name": name[:80], "description": description,
                    "preference_rationale": rationale, "pool_size": len(texts),
                    "members": [str(reviews[USER_ID].iloc[i]) for i in m]})
    return out


def clustered_personas(reviews: DataFrame, cfg: Config) -> DataFrame:
    """Usable reviews → one row per persona (plus its member user ids), items partitioned together."""
    model_path, max_len, dev = resolve_model_name(cfg.train.base_model), cfg.train.max_seq_length, cfg.train.device
    max_personas, seed = cfg.offline.max_personas, cfg.train.seed
    rows = reviews.select(USER_ID, ITEM_ID, RATING, "review_text", "helpful_votes") \
        .repartition(ITEM_ID).sortWithinPartitions(ITEM_ID, USER_ID)

    def build(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        model = worker_model(model_path, max_len, dev)
        yield from per_item(batches, lambda rows: item_personas(rows, model, max_personas, seed), _OUT.fieldNames())

    return rows.mapInPandas(build, _OUT)


def summarise(spark: SparkSession, cfg: Config) -> dict:
    """Stage summarise_items without an LLM."""
    store = TableStore(spark, cfg)
    w = store.upsert(summaries(store.read(ITEMS.name), usable_reviews(store, cfg)), ITEM_SUMMARIES,
                     delete_missing=True)
    return {"item_summaries": {"version": w.version, **w.metrics}}


def build_personas(spark: SparkSession, cfg: Config) -> dict:
    """Stage build_personas without an LLM: item_personas and review_clusters (which persona
    each review of an item belongs to)."""
    store = TableStore(spark, cfg)
    made = clustered_personas(usable_reviews(store, cfg), cfg).persist()
    clustered = made.select(ITEM_ID, "persona_index", "name", "description", "preference_rationale",
                            F.lit(SOURCE).alias("source"), "pool_size", F.lit("skipped").alias("status"),
                            *[F.lit(None).cast("string").alias(c) for c in ("llm_key", "prompt", "model")])
    covered = made.select(ITEM_ID).distinct()
    rest = summary_only_personas(store.read(ITEMS.name).join(covered, ITEM_ID, "left_anti")
                                 .select(ITEM_ID, F.lit("skipped").alias("status")), store.read(ITEM_SUMMARIES.name))
    personas = with_persona_ids(clustered.unionByName(rest)).persist()
    w_p = store.upsert(personas, ITEM_PERSONAS, delete_missing=True)
    members = (made.select(ITEM_ID, "persona_index", F.explode("members").alias(USER_ID))
               .join(personas.select(ITEM_ID, "persona_index", "persona_id"), [ITEM_ID, "persona_index"])
               .select(USER_ID, ITEM_ID, "persona_id"))
    w_c = store.upsert(members, REVIEW_CLUSTERS, delete_missing=True)
    counts = personas.groupBy("source").count().collect()
    made.unpersist()
    personas.unpersist()
    log.info("extractive personas: %s", {r["source"]: r["count"] for r in counts})
    return {"personas_by_source": {r["source"]: int(r["count"]) for r in counts},
            "item_personas": {"version": w_p.version, **w_p.metrics},
            "review_clusters": {"version": w_c.version, **w_c.metrics}}


def align(spark: SparkSession, cfg: Config) -> dict:
    """alignment_pairs without a judge: the persona is the cluster of the user's own review."""
    store = TableStore(spark, cfg)
    prof = profiles(stored_interaction_texts(store, cfg), cfg.profile.k).filter(
        (F.col(SPLIT) == TRAIN) & (F.size("history") > 0))
    pairs = prof.join(store.read(REVIEW_CLUSTERS.name), [USER_ID, ITEM_ID]).select(
        USER_ID, ITEM_ID, TS, "persona_id", F.lit(CLUSTER_JUSTIFICATION).alias("justification"),
        F.transform("history", lambda h: h[ITEM_ID]).alias("history_item_ids"), F.lit("cluster").alias("status"),
        *[F.lit(None).cast("string").alias(c) for c in ("llm_key", "prompt", "model")])
    w = store.upsert(pairs, ALIGNMENT_PAIRS, delete_missing=True)
    n_cands, n_pairs = prof.count(), store.read(ALIGNMENT_PAIRS.name).count()
    return {"candidates": n_cands, "pairs": n_pairs, "unaligned": n_cands - n_pairs,
            "alignment_pairs": {"version": w.version, **w.metrics}}
