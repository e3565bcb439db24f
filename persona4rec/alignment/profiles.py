"""Interaction texts and user profiles, from Delta tables only (no LLM).

An interaction text is what the encoder embeds for one (user, item): the item summary followed by
that user's own aspect slots for the item (the paper's serialisation, our wording). A profile for
a training interaction (u, i, t) is u's last k training interactions strictly before t.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from persona4rec.config import Config
from persona4rec.ingest.transform import kept_interactions
from persona4rec.offline.common import usable_reviews
from persona4rec.schemas import (ASPECT_SLOTS, ITEM_ID, ITEM_SUMMARIES, REVIEW_ASPECTS, REVIEWS, SPLIT, SPLITS, TRAIN,
                                 TS, USER_ID)
from persona4rec.tables import TableStore

REVIEW_EXCERPT_CHARS = 240  # of the user's own review, in extractive interaction texts

SLOT_LABELS = {"category_preference": "prefers", "purchase_purpose": "bought for",
               "quality_criteria": "judges by", "usage_context": "uses it"}


def interaction_text_col(summary: Column, aspects: dict[str, Column]) -> Column:
    parts = [F.when(aspects[s].isNotNull(), F.concat(F.lit(f"{SLOT_LABELS[s]}: "), aspects[s]))
             for s in ASPECT_SLOTS]
    said = F.concat_ws("; ", *parts)
    return F.when(said == "", summary).otherwise(F.concat(summary, F.lit(" | "), said))


def interaction_texts(interactions: DataFrame, summaries: DataFrame, aspects: DataFrame | None,
                      reviews: DataFrame | None = None) -> DataFrame:
    """One text per interaction (user_id, item_id, ts, seq, split rows, any split): user_id,
    item_id, ts, seq, split, text. With `reviews` instead of aspects (the extractive builder), the
    user's own review excerpt stands where the aspect slots would."""
    rows = interactions.join(summaries.select(ITEM_ID, "summary"), ITEM_ID, "left")
    summary = F.coalesce(F.col("summary"), F.concat(F.lit("Item "), F.col(ITEM_ID)))
    if reviews is not None:
        said = reviews.select(USER_ID, ITEM_ID, F.substring(F.regexp_replace("review_text", r"\s+", " "), 1,
                                                            REVIEW_EXCERPT_CHARS).alias("_said"))
        rows = rows.join(said, [USER_ID, ITEM_ID], "left")
        text = F.when(F.col("_said").isNull(), summary).otherwise(F.concat(summary, F.lit(" | said: "), "_said"))
    elif aspects is not None:
        kept = aspects.filter("kept").select(USER_ID, ITEM_ID, *ASPECT_SLOTS)
        rows = rows.join(kept, [USER_ID, ITEM_ID], "left")
        text = interaction_text_col(summary, {s: F.col(s) for s in ASPECT_SLOTS})
    else:
        text = summary
    return rows.select(USER_ID, ITEM_ID, TS, "seq", SPLIT, text.alias("text"))


def stored_interactions(store: TableStore) -> DataFrame:
    """Every kept review as an interaction, with its split (`outside_core` beyond the k-core)."""
    return kept_interactions(store.read(REVIEWS.name), store.read(SPLITS.name))


def stored_interaction_texts(store: TableStore, cfg: Config) -> DataFrame:
    """interaction_texts of every kept interaction over the stored tables, for the configured
    persona builder. Leave-one-out consumers filter by split; production reads them all."""
    interactions, summaries = stored_interactions(store), store.read(ITEM_SUMMARIES.name)
    if cfg.offline.persona_builder == "extractive":
        return interaction_texts(interactions, summaries, None, usable_reviews(store, cfg))
    aspects = store.read(REVIEW_ASPECTS.name) if store.exists(REVIEW_ASPECTS.name) else None
    return interaction_texts(interactions, summaries, aspects)


def profiles(texts: DataFrame, k: int, splits_for_history: tuple[str, ...] = (TRAIN,)) -> DataFrame:
    """For every interaction: `history` = the user's last k interactions (from the given splits)
    strictly earlier in time, oldest first, as array<struct<item_id, ts, text>>."""
    hist = texts.filter(F.col(SPLIT).isin(*splits_for_history))
    per_user = hist.groupBy(USER_ID).agg(
        F.sort_array(F.collect_list(F.struct(TS, "seq", ITEM_ID, "text"))).alias("_all"))
    rows = texts.join(per_user, USER_ID, "left")
    earlier = F.filter(F.coalesce("_all", F.array()), lambda h: h[TS] < F.col(TS))
    n = F.size(earlier)
    last_k = F.when(n > k, F.slice(earlier, n - k + 1, k)).otherwise(earlier)
    history = F.transform(last_k, lambda h: F.struct(h[ITEM_ID].alias(ITEM_ID), h[TS].alias(TS),
                                                     h["text"].alias("text")))
    return rows.select(USER_ID, ITEM_ID, TS, "seq", SPLIT, "text", history.alias("history"))
