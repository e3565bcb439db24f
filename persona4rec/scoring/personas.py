"""What a persona's vector is: one function for the index, the evaluation and the trainer.

`profile.persona_vectors: centroid` (the default) — a persona's vector is the L2-normalised mean
of the embeddings of the interaction texts it explains: the training interactions of its review
cluster (extractive builder) or those the LLM judge aligned to it (alignment_pairs), the newest
`profile.centroid_members` of them. Those are the same texts a user's history is made of
(`stored_interaction_texts`), so users and personas live in one space; issue 14's measurement found
the persona *text* loses what the reviews say (centroids ranked better on both shared sets and
both generators). A persona nobody's interaction is assigned to (a summary-only persona, a new
item) keeps the embedding of its text. `text` — the paper's: the embedding of the persona text.
The persona's name, description and rationale are the explanation either way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from persona4rec.alignment.profiles import stored_interaction_texts
from persona4rec.config import Config
from persona4rec.schemas import ALIGNMENT_PAIRS, ITEM_ID, ITEM_PERSONAS, REVIEW_CLUSTERS, TS, USER_ID
from persona4rec.scoring.embedding import EncoderRef, embed_column, with_vectors
from persona4rec.tables import TableStore


def membership(store: TableStore, cfg: Config) -> DataFrame | None:
    """user_id, item_id, persona_id: which persona each (training) interaction belongs to — the
    extractive builder's review clusters, else the judge's alignment pairs; None when neither
    exists (every persona keeps its text vector)."""
    if cfg.offline.persona_builder == "extractive" and store.exists(REVIEW_CLUSTERS.name):
        return store.read(REVIEW_CLUSTERS.name).select(USER_ID, ITEM_ID, "persona_id")
    if store.exists(ALIGNMENT_PAIRS.name):
        return store.read(ALIGNMENT_PAIRS.name).select(USER_ID, ITEM_ID, "persona_id")
    return None


def persona_members(store: TableStore, cfg: Config) -> DataFrame | None:
    """persona_id, user_id, item_id, text: the interactions (and their texts) each persona's
    centroid averages (its newest `profile.centroid_members` members); None with
    `profile.persona_vectors: text` or no membership table."""
    if cfg.profile.persona_vectors != "centroid":
        return None
    members = membership(store, cfg)
    if members is None:
        return None
    texts = stored_interaction_texts(store, cfg).select(USER_ID, ITEM_ID, TS, "seq", "text")
    newest = Window.partitionBy("persona_id").orderBy(F.col(TS).desc(), F.col("seq").desc(), F.col(USER_ID))
    return (members.join(texts, [USER_ID, ITEM_ID]).withColumn("_n", F.row_number().over(newest))
            .filter(F.col("_n") <= cfg.profile.centroid_members).select("persona_id", USER_ID, ITEM_ID, "text"))


def centroids(embedded: DataFrame) -> DataFrame:
    """persona_id, centroid: the L2-normalised mean of each persona's member `embedding` rows."""
    return embedded.select("persona_id", "embedding").groupBy("persona_id").applyInPandas(
        _centroid, "persona_id string, centroid array<float>")


def _centroid(pdf: pd.DataFrame) -> pd.DataFrame:
    mean = np.stack(pdf["embedding"].to_numpy()).astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(mean)
    return pd.DataFrame({"persona_id": [pdf["persona_id"].iloc[0]],
                         "centroid": [(mean / norm if norm > 0 else mean).astype(np.float32)]})


def with_centroids(personas: DataFrame, cents: DataFrame) -> DataFrame:
    """`personas` (with their text `embedding`) whose vector is their centroid where they have
    one; `centroid_of` = 1 where it was taken."""
    return personas.join(cents, "persona_id", "left").withColumn(
        "centroid_of", F.col("centroid").isNotNull().cast("int")).withColumn(
        "embedding", F.coalesce("centroid", "embedding")).drop("centroid")


def item_personas(store: TableStore) -> DataFrame:
    """The item_personas columns a persona vector and its explanation read."""
    return store.read(ITEM_PERSONAS.name).select(
        "persona_id", ITEM_ID, "persona_index", "name", "description", "preference_rationale", "persona_text")


def persona_texts(store: TableStore, cfg: Config, personas: DataFrame | None = None) -> DataFrame:
    """text: every text persona_vectors encodes (each persona's text and its centroid's member
    texts), to embed once beforehand (`vectors=`)."""
    personas = item_personas(store) if personas is None else personas
    texts = personas.select(F.col("persona_text").alias("text"))
    members = persona_members(store, cfg)
    return texts if members is None else texts.unionByName(members.select("text"))


def persona_vectors(store: TableStore, cfg: Config, ref: EncoderRef, personas: DataFrame | None = None,
                    vectors: DataFrame | None = None) -> DataFrame:
    """item_personas' columns (or `personas`) + `embedding` (the persona vector under `ref`, per
    `profile.persona_vectors`) + `model_version` + `centroid_of`. The texts are encoded here, or
    looked up in `vectors` (text_hash, embedding, model_version: embedding.embed_distinct over
    `persona_texts`, or the text_embeddings cache) when given."""
    personas = item_personas(store) if personas is None else personas

    def embed(df: DataFrame, col: str) -> DataFrame:
        return embed_column(df, col, ref) if vectors is None else with_vectors(df, col, vectors)

    embedded = embed(personas, "persona_text")
    members = persona_members(store, cfg)
    if members is None:
        return embedded.withColumn("centroid_of", F.lit(0))
    return with_centroids(embedded, centroids(embed(members, "text")))
