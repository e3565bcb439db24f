"""Persona rows shared by both persona builders (LLM and extractive): the summary-only persona
that makes every item indexable, and the stable persona id."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from persona4rec.schemas import ITEM_ID

SUMMARY_ONLY_NAME = "General interest"
SUMMARY_ONLY_RATIONALE = "Matched on what the item is (no review-based persona yet)."


def summary_only_personas(missing: DataFrame, summaries: DataFrame) -> DataFrame:
    """One persona from the item summary for each item in `missing` (item_id, status or null)."""
    rows = missing.join(summaries.select(ITEM_ID, "summary"), ITEM_ID, "left")
    return rows.select(
        ITEM_ID, F.lit(0).alias("persona_index"), F.lit(SUMMARY_ONLY_NAME).alias("name"),
        F.coalesce("summary", F.concat(F.lit("Item "), F.col(ITEM_ID))).alias("description"),
        F.lit(SUMMARY_ONLY_RATIONALE).alias("preference_rationale"), F.lit("summary_only").alias("source"),
        F.lit(0).alias("pool_size"), F.coalesce("status", F.lit("skipped")).alias("status"),
        F.lit(None).cast("string").alias("llm_key"), F.lit(None).cast("string").alias("prompt"),
        F.lit(None).cast("string").alias("model"))


def with_persona_ids(personas: DataFrame) -> DataFrame:
    """+ persona_text (what the encoder embeds) and persona_id = item#index-hash(text): stable per text."""
    text = F.concat_ws(" ", F.concat(F.col("name"), F.lit(".")), "description", "preference_rationale")
    pid = F.concat(F.col(ITEM_ID), F.lit("#"), F.col("persona_index").cast("string"), F.lit("-"),
                   F.substring(F.sha2(text, 256), 1, 8))
    return personas.withColumn("persona_text", text).withColumn("persona_id", pid)
