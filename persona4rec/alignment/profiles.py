"""Interaction texts and user profiles, from Delta tables only (no LLM).

An interaction text is what the encoder embeds for one (user, item): the item summary followed by
that user's own aspect slots for the item (the paper's serialisation, our wording). A profile for
a training interaction (u, i, t) is u's last k training interactions strictly before t.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from persona4rec.config import Config
from persona4rec.offline.common import usable_reviews
from persona4rec.schemas import ASPECT_SLOTS, ITEM_ID, ITEM_SUMMARIES, REVIEW_ASPECTS, SPLIT, TRAIN, TS, USER_ID
from persona4rec.tables import TableStore

REVIEW_EXCERPT_CHARS = 240  # of the user's own review, in extractive interaction texts

SLOT_LABELS = {"category_preference": "prefers", "purchase_purpose": "bought for",
               "quality_criteria": "judges by", "usage_context": "uses it"}


def interaction_text_col(summary: Column, aspects: dict[str, Column]) -> Column:
    parts = [F.when(aspects[s].isNotNull(), F.concat(F.lit(f"{SLOT_LABELS[s]}: "), aspects[s]))
             for s in ASPECT_SLOTS]
    said = F.concat_ws("; ", *parts)
    return F.when(said == "", summary).otherwise(F.concat(summary, F.lit(" | "), said))


def interaction_texts(splits: DataFrame, summaries: DataFrame, aspects: DataFrame | None,
                      reviews: DataFrame | None = None) -> DataFrame:
    """One text per interaction in `splits` (any split): user_id, item_id, ts, seq, split, text.
    With `reviews` instead of aspects (the extractive builder), the user's own review excerpt
    stands where the aspect slots would."""
    rows = splits.join(summaries.select(ITEM_ID, "summary"), ITEM_ID, "left")
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


def stored_interaction_texts(store: TableStore, cfg: Config) -> DataFrame:
    """interaction_texts over the stored tables, for the configured persona builder."""
    splits, summaries = store.read("splits"), store.read(ITEM_SUMMARIES.name)
    if cfg.offline.persona_builder == "extractive":
        return interaction_texts(splits, summaries, None, usable_reviews(store, cfg))
    aspects = store.read(REVIEW_ASPECTS.name) if store.exists(REVIEW_ASPECTS.name) else None
    return interaction_texts(splits, summaries, aspects)


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


def latest_history(texts: DataFrame, k: int) -> DataFrame:
    """Per user, the last k training interactions (for scoring the next item): user_id, history."""
    w = Window.partitionBy(USER_ID).orderBy(F.col(TS).desc(), F.col("seq").desc())
    last = texts.filter(F.col(SPLIT) == TRAIN).withColumn("_r", F.row_number().over(w)).filter(F.col("_r") <= k)
    return last.groupBy(USER_ID).agg(
        F.transform(F.sort_array(F.collect_list(F.struct(TS, "seq", ITEM_ID, "text"))),
                    lambda h: F.struct(h[ITEM_ID].alias(ITEM_ID), h[TS].alias(TS), h["text"].alias("text")))
        .alias("history"))
