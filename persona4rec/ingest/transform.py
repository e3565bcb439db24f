"""Pure DataFrame transforms of ingestion: de-duplication, k-core filtering, leave-one-out split."""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from persona4rec.schemas import ITEM_ID, OUTSIDE_CORE, SPLIT, TEST, TRAIN, TS, USER_ID, VALIDATION

log = logging.getLogger(__name__)


def dedupe_reviews(reviews: DataFrame) -> DataFrame:
    """One review per (user, item). Rule, so reruns and other engines agree: the latest review
    wins (the user's current opinion); ties go to the longer text, then the earlier source
    position."""
    w = Window.partitionBy(USER_ID, ITEM_ID).orderBy(
        F.col(TS).desc(), F.length("review_text").desc(),
        F.col("source_file").asc(), F.col("source_line").asc_nulls_last())
    return reviews.withColumn("_rn", F.row_number().over(w)).filter("_rn = 1").drop("_rn")


def dedupe_items(items: DataFrame) -> DataFrame:
    """One metadata record per item: the most complete record wins, then the earlier one."""
    filled = sum(F.when(F.col(c).isNotNull(), 1).otherwise(0)
                 for c in ("title", "description", "categories", "brand", "main_category",
                           "features", "details"))
    w = Window.partitionBy(ITEM_ID).orderBy(
        filled.desc(), F.col("source_file").asc(), F.col("source_line").asc_nulls_last())
    return items.withColumn("_rn", F.row_number().over(w)).filter("_rn = 1").drop("_rn")


def kcore(interactions: DataFrame, k: int, max_rounds: int = 50) -> DataFrame:
    """Keep the largest sub-graph in which every user and every item has >= k interactions.

    Removing a user can push an item below k and the other way round, so filter until nothing
    changes. Each round is checkpointed locally to keep the plan from growing with the rounds.
    """
    current = interactions.select(USER_ID, ITEM_ID, TS).localCheckpoint()
    size = current.count()
    for round_no in range(1, max_rounds + 1):
        users = current.groupBy(USER_ID).count().filter(F.col("count") >= k).select(USER_ID)
        items = current.groupBy(ITEM_ID).count().filter(F.col("count") >= k).select(ITEM_ID)
        nxt = current.join(users, USER_ID, "left_semi").join(items, ITEM_ID, "left_semi").localCheckpoint()
        new_size = nxt.count()
        log.info("k-core (k=%d) round %d: %d -> %d interactions", k, round_no, size, new_size)
        current = nxt
        if new_size == size:
            return current
        size = new_size
    raise RuntimeError(f"k-core did not converge in {max_rounds} rounds")  # pragma: no cover


def leave_one_out(interactions: DataFrame, min_interactions: int = 3) -> DataFrame:
    """Per user, by time: last → test, second last → validation, the rest → train.

    Ties in time are ordered by item id, so the split is deterministic. Users with fewer than
    `min_interactions` interactions cannot give train, validation and test rows: all of theirs
    are train (they still shape the CF model; they are not evaluated).
    """
    by_time = Window.partitionBy(USER_ID).orderBy(F.col(TS).asc(), F.col(ITEM_ID).asc())
    per_user = Window.partitionBy(USER_ID)
    seq = interactions.select(USER_ID, ITEM_ID, TS) \
        .withColumn("seq", F.row_number().over(by_time)) \
        .withColumn("_n", F.count("*").over(per_user))
    split = (F.when(F.col("_n") < min_interactions, F.lit(TRAIN))
             .when(F.col("seq") == F.col("_n"), F.lit(TEST))
             .when(F.col("seq") == F.col("_n") - 1, F.lit(VALIDATION))
             .otherwise(F.lit(TRAIN)))
    return seq.withColumn(SPLIT, split).drop("_n")


def kept_interactions(reviews: DataFrame, splits: DataFrame) -> DataFrame:
    """Every kept review as an interaction: user_id, item_id, ts, seq, split.

    `split` is the leave-one-out split of a k-core interaction, else `outside_core`; `seq` numbers
    all of a user's kept reviews by (ts, item_id), the order `leave_one_out` uses, so the k-core
    interactions keep their relative order. Production mode reads this, not the splits: a
    customer's history, the generators' training data and the items never to recommend again are
    every kept review, including those the k-core filtering left out.
    """
    by_time = Window.partitionBy(USER_ID).orderBy(F.col(TS).asc(), F.col(ITEM_ID).asc())
    return (reviews.select(USER_ID, ITEM_ID, TS)
            .join(splits.select(USER_ID, ITEM_ID, SPLIT), [USER_ID, ITEM_ID], "left")
            .withColumn(SPLIT, F.coalesce(F.col(SPLIT), F.lit(OUTSIDE_CORE)))
            .withColumn("seq", F.row_number().over(by_time))
            .select(USER_ID, ITEM_ID, TS, "seq", SPLIT))
