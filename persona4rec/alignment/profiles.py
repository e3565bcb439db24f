"""Interaction texts and user profiles, from Delta tables only (no LLM).

An interaction text is what the encoder embeds for one (user, item): the item summary followed by
that user's own aspect slots for the item (the paper's serialisation, our wording). A profile for
a training interaction (u, i, t) is u's last k training interactions strictly before t, built by
windows (n·k per user, not n²).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from persona4rec.config import Config
from persona4rec.ingest.transform import kept_interactions
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
                      reviews: DataFrame | None = None, review_only: bool = False) -> DataFrame:
    """One text per interaction (user_id, item_id, ts, seq, split rows, any split): user_id,
    item_id, ts, seq, split, text. With `reviews` instead of aspects (the extractive builder), the
    user's own review excerpt stands where the aspect slots would; `review_only`: the user's own
    review, whole (the encoder cuts it at train.max_seq_length tokens), the summary where there is
    no review text."""
    rows = interactions.join(summaries.select(ITEM_ID, "summary"), ITEM_ID, "left")
    summary = F.coalesce(F.col("summary"), F.concat(F.lit("Item "), F.col(ITEM_ID)))
    if review_only:
        said = reviews.select(USER_ID, ITEM_ID, F.trim(F.regexp_replace("review_text", r"\s+", " ")).alias("_said"))
        rows = rows.join(said, [USER_ID, ITEM_ID], "left")
        text = F.when(F.coalesce(F.col("_said"), F.lit("")) == "", summary).otherwise(F.col("_said"))
    elif reviews is not None:
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
    persona builder and `profile.interaction_text`: the one function behind the texts of training
    examples, alignment profiles, persona centroids, evaluation and scoring (issue 14, step 3).
    Leave-one-out consumers filter by split; production reads them all.

    An interaction's text is the user's own record of it, so it reads the user's review whatever
    the split: a validation interaction is history when the test item is scored (as in
    production, where the newest reviews weigh most), and the held-out item's own text is never in
    its own history. (Persona building, not this, is what must not read held-out reviews.)"""
    interactions, summaries = stored_interactions(store), store.read(ITEM_SUMMARIES.name)
    if cfg.profile.interaction_text == "review":
        return interaction_texts(interactions, summaries, None, store.read(REVIEWS.name), review_only=True)
    if cfg.offline.persona_builder == "extractive":
        return interaction_texts(interactions, summaries, None, store.read(REVIEWS.name))
    aspects = store.read(REVIEW_ASPECTS.name) if store.exists(REVIEW_ASPECTS.name) else None
    return interaction_texts(interactions, summaries, aspects)


def profiles(texts: DataFrame, k: int, splits_for_history: tuple[str, ...] = (TRAIN,)) -> DataFrame:
    """For every interaction: `history` = the user's last k interactions (from the given splits)
    strictly earlier in time, oldest first, as array<struct<item_id, ts, text>>.

    Linear in a user's history (n·k, never n²): the history rows of a user are numbered in time
    order and each carries the window of its last k (a sliding frame of k rows); every interaction
    counts the history rows strictly earlier than its own time (a running count over a range frame)
    and takes the window of the history row with that number — an equi-join, so a user with 20k
    interactions costs 20k windows of k texts, not 20k copies of their whole history."""
    in_hist = F.col(SPLIT).isin(*splits_for_history)
    by_time = Window.partitionBy(USER_ID).orderBy(TS, "seq")
    hist = texts.filter(in_hist).select(
        USER_ID, F.row_number().over(by_time).alias("_r"),
        F.collect_list(F.struct(TS, "seq", ITEM_ID, "text")).over(by_time.rowsBetween(-(k - 1), 0)).alias("_win"))
    earlier = Window.partitionBy(USER_ID).orderBy(TS).rangeBetween(Window.unboundedPreceding, -1)
    rows = texts.withColumn("_r", F.count(F.when(in_hist, 1)).over(earlier))
    rows = rows.join(hist, [USER_ID, "_r"], "left")
    history = F.transform(F.sort_array(F.coalesce("_win", F.array())),
                          lambda h: F.struct(h[ITEM_ID].alias(ITEM_ID), h[TS].alias(TS), h["text"].alias("text")))
    return rows.select(USER_ID, ITEM_ID, TS, "seq", SPLIT, "text", history.alias("history"))
