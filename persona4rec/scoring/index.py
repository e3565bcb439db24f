"""Job `build_index`: the persona-profiled item index and the interaction embedding cache.

A persona's vector is what `profile.persona_vectors` says (scoring/personas.py: by default the
centroid of the interactions it explains, recomputed every run — at most
`profile.centroid_members` texts per persona — since it moves with its members). Both tables are
embedded with the scoring encoder (`@champion`, else the un-tuned one) and carry its
version in every row. Only what is new is embedded: a text persona whose id (which hashes its text)
and model version are already indexed is kept; an interaction whose text hash and model version
are already cached is kept; a new interaction adds one row. A new model version re-embeds all.

Only the interactions a user vector reads are embedded (`vector_inputs`): each user's last k
overall (production) and last k within `scoring.history_splits` (evaluation) — at most 2k per
user, however long the history; an interaction that falls out of both windows leaves the cache.
The window is recorded on the table (WINDOW_PROPERTY) and `score_users` refuses a larger k or
other history splits than the cache was built for.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from persona4rec.alignment.profiles import stored_interaction_texts
from persona4rec.config import Config
from persona4rec.schemas import INTERACTION_EMBEDDINGS, ITEM_ID, ITEM_PERSONAS, PERSONA_INDEX, USER_ID
from persona4rec.scoring.embedding import EncoderRef, embed_column, resolve_encoder
from persona4rec.scoring.personas import persona_vectors
from persona4rec.scoring.window import WINDOW_PROPERTY, vector_inputs, window_value
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)


def _reuse(store: TableStore, table: str, current: DataFrame, keys: list[str], version: str) -> tuple[DataFrame, DataFrame]:
    """(rows to embed, already-embedded rows to keep) for the given model version."""
    if not store.exists(table):
        return current, None
    done = store.read(table).filter(F.col("model_version") == version)
    keep = done.join(current.select(*keys), keys, "left_semi")
    return current.join(done.select(*keys), keys, "left_anti"), keep


def index_personas(store: TableStore, cfg: Config, ref: EncoderRef) -> tuple[DataFrame, int]:
    personas = store.read(ITEM_PERSONAS.name).select(
        "persona_id", ITEM_ID, "persona_index", "name", "description", "preference_rationale", "persona_text")
    if cfg.profile.persona_vectors == "centroid":  # a centroid moves with its members: all recomputed
        return persona_vectors(store, cfg, ref, personas).select(PERSONA_INDEX.columns), personas.count()
    todo, keep = _reuse(store, PERSONA_INDEX.name, personas, ["persona_id"], ref.version)
    n = todo.count()
    fresh = embed_column(todo, "persona_text", ref).select(PERSONA_INDEX.columns)
    return (fresh if keep is None else fresh.unionByName(keep.select(PERSONA_INDEX.columns))), n


def embed_interactions(store: TableStore, cfg: Config, ref: EncoderRef) -> tuple[DataFrame, int]:
    texts = vector_inputs(stored_interaction_texts(store, cfg), cfg.profile.k, cfg.scoring.history_splits) \
        .withColumn("text_hash", F.sha2("text", 256))
    todo, keep = _reuse(store, INTERACTION_EMBEDDINGS.name, texts, [USER_ID, ITEM_ID, "text_hash"], ref.version)
    n = todo.count()
    fresh = embed_column(todo, "text", ref).select(INTERACTION_EMBEDDINGS.columns)
    if keep is not None:
        keep = keep.join(texts.select(USER_ID, ITEM_ID, "ts", "seq", "split", "text_hash"),
                         [USER_ID, ITEM_ID, "text_hash"], "left_semi")
    return (fresh if keep is None else fresh.unionByName(keep.select(INTERACTION_EMBEDDINGS.columns))), n


def run(spark: SparkSession, cfg: Config) -> dict:
    store = TableStore(spark, cfg)
    ref = resolve_encoder(cfg)
    personas, n_personas = index_personas(store, cfg, ref)
    w1 = store.upsert(personas.repartition(spark.sparkContext.defaultParallelism), PERSONA_INDEX, delete_missing=True)
    interactions, n_inter = embed_interactions(store, cfg, ref)
    w2 = store.upsert(interactions.repartition(spark.sparkContext.defaultParallelism), INTERACTION_EMBEDDINGS,
                      delete_missing=True)
    store.set_properties(INTERACTION_EMBEDDINGS.name,
                         {WINDOW_PROPERTY: window_value(cfg.profile.k, cfg.scoring.history_splits)})
    log.info("index with %s: %d persona(s) and %d interaction(s) embedded", ref.version, n_personas, n_inter)
    return {"model_version": ref.version, "personas_embedded": n_personas, "interactions_embedded": n_inter,
            "persona_index": {"version": w1.version, **w1.metrics},
            "interaction_embeddings": {"version": w2.version, **w2.metrics}}
