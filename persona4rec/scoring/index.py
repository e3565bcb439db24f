"""Job `build_index`: the persona-profiled item index and the interaction embeddings.

A persona's vector is what `profile.persona_vectors` says (scoring/personas.py: by default the
centroid of the interactions it explains, recomputed every run — at most
`profile.centroid_members` texts per persona — since it moves with its members). Both tables are
embedded with the scoring encoder (`@champion`, else the un-tuned one) and carry its
version in every row.

Only what is new is encoded. Every text the run needs — the persona texts, the centroids' member
texts and the interactions a user vector reads — is looked up by its content hash in the
`text_embeddings` cache; only texts it does not hold under this model version go through the
encoder, and the cache is then brought to exactly the texts needed (a text no longer needed, or
one of another model version, leaves it). So a nightly run encodes the day's new interactions and
personas, not the catalogue's members again (at 1M items with up to 50 members per persona that
is the difference between the new texts and a hundred million), a rerun encodes nothing, and a new
model version re-encodes everything once. The centroids are then means over the cached vectors.

Only the interactions a user vector reads are kept in `interaction_embeddings`
(`vector_inputs`): each user's last k overall (production) and last k within
`scoring.history_splits` (evaluation) — at most 2k per user, however long the history; an
interaction that falls out of both windows leaves it. The window is recorded on the table
(WINDOW_PROPERTY) and `score_users` refuses a larger k or other history splits than the cache was
built for.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from persona4rec.alignment.profiles import stored_interaction_texts
from persona4rec.config import Config
from persona4rec.schemas import INTERACTION_EMBEDDINGS, PERSONA_INDEX, TEXT_EMBEDDINGS
from persona4rec.scoring.embedding import (EncoderRef, distinct_texts, encode_texts, resolve_encoder, text_hash,
                                          with_vectors)
from persona4rec.scoring.personas import item_personas, persona_texts, persona_vectors
from persona4rec.scoring.window import WINDOW_PROPERTY, vector_inputs, window_value
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)


def cached_vectors(store: TableStore, texts: DataFrame, ref: EncoderRef) -> int:
    """Bring `text_embeddings` to exactly the distinct texts of `texts` (column `text`) under
    `ref`, encoding only those it does not already hold under `ref.version`; returns how many
    were encoded. Only the new vectors go through the MERGE and only the keys of the texts that
    left are deleted, so a night costs its new texts, not the size of the cache."""
    hashed = distinct_texts(texts)
    todo = hashed
    if store.exists(TEXT_EMBEDDINGS.name):
        done = store.read(TEXT_EMBEDDINGS.name).filter(F.col("model_version") == ref.version)
        todo = hashed.join(done.select("text_hash"), "text_hash", "left_anti")
    n = todo.count()
    if n:
        store.upsert(encode_texts(todo, ref).select(TEXT_EMBEDDINGS.columns), TEXT_EMBEDDINGS)
    else:
        store.ensure(TEXT_EMBEDDINGS)
    left = store.read(TEXT_EMBEDDINGS.name).select("text_hash").join(hashed.select("text_hash"), "text_hash", "left_anti")
    if left.limit(1).count():  # no longer needed, or of another model version: an unchanged rerun commits nothing
        store.delete_keys(TEXT_EMBEDDINGS, left)
    return n


def run(spark: SparkSession, cfg: Config) -> dict:
    store = TableStore(spark, cfg)
    ref = resolve_encoder(cfg)
    personas = item_personas(store)
    window = vector_inputs(stored_interaction_texts(store, cfg), cfg.profile.k, cfg.scoring.history_splits) \
        .withColumn("text_hash", text_hash("text"))
    needed = persona_texts(store, cfg, personas).unionByName(window.select("text"))
    n_texts = cached_vectors(store, needed, ref)
    vectors = store.read(TEXT_EMBEDDINGS.name).filter(F.col("model_version") == ref.version)
    index = persona_vectors(store, cfg, ref, personas, vectors).select(PERSONA_INDEX.columns)
    parallelism = spark.sparkContext.defaultParallelism
    w1 = store.upsert(index.repartition(parallelism), PERSONA_INDEX, delete_missing=True)
    interactions = with_vectors(window, "text", vectors).select(INTERACTION_EMBEDDINGS.columns)
    w2 = store.upsert(interactions.repartition(parallelism), INTERACTION_EMBEDDINGS, delete_missing=True)
    store.set_properties(INTERACTION_EMBEDDINGS.name,
                         {WINDOW_PROPERTY: window_value(cfg.profile.k, cfg.scoring.history_splits)})
    log.info("index with %s: %d new text(s) encoded (the others from text_embeddings)", ref.version, n_texts)
    return {"model_version": ref.version, "texts_embedded": n_texts,
            "persona_index": {"version": w1.version, **w1.metrics},
            "interaction_embeddings": {"version": w2.version, **w2.metrics}}
