"""De-duplication, k-core and leave-one-out as DataFrame → DataFrame transforms."""

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from persona4rec.ingest.transform import dedupe_reviews, kcore, leave_one_out

pytestmark = pytest.mark.spark


def test_leave_one_out_by_time_with_ties_broken_by_item(spark):
    df = spark.createDataFrame(
        [("u1", "a", 10), ("u1", "b", 30), ("u1", "c", 20), ("u1", "d", 30),
         ("u2", "a", 5), ("u2", "b", 6)], "user_id string, item_id string, ts long")
    got = leave_one_out(df, min_interactions=3)
    want = spark.createDataFrame(
        [("u1", "a", 10, 1, "train"), ("u1", "c", 20, 2, "train"), ("u1", "b", 30, 3, "validation"),
         ("u1", "d", 30, 4, "test"), ("u2", "a", 5, 1, "train"), ("u2", "b", 6, 2, "train")],
        "user_id string, item_id string, ts long, seq int, split string")
    assert_df_equality(got, want, ignore_row_order=True, ignore_nullable=True)


def test_kcore_iterates_until_stable(spark):
    # u3 has 1 interaction: removing it drops item c below 2, which drops u2 below 2.
    df = spark.createDataFrame(
        [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 3), ("u2", "b", 4), ("u2", "c", 5),
         ("u3", "c", 6), ("u4", "a", 7)], "user_id string, item_id string, ts long")
    got = {(r.user_id, r.item_id) for r in kcore(df, 2).collect()}
    assert got == {("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")}


def test_dedupe_keeps_latest_then_longest_then_first(spark):
    cols = "user_id string, item_id string, ts long, review_text string, source_file string, source_line long"
    df = spark.createDataFrame(
        [("u", "i", 1, "old", "f", 1), ("u", "i", 2, "new", "f", 2), ("u", "i", 2, "newer!", "f", 3),
         ("v", "i", 1, "same", "f", 4), ("v", "i", 1, "same", "f", 5)], cols)
    got = dedupe_reviews(df).select("user_id", "source_line")
    assert sorted(map(tuple, got.collect())) == [("u", 3), ("v", 4)]


def test_every_user_has_one_test_and_one_validation_after_their_train(spark):
    df = spark.range(200).select(
        (F.col("id") % 13).cast("string").alias("user_id"),
        (F.col("id") % 17).cast("string").alias("item_id"),
        ((F.col("id") * 7919) % 101).alias("ts"))
    s = leave_one_out(df.dropDuplicates(["user_id", "item_id"]), 3)
    per_user = s.groupBy("user_id").agg(
        F.sum(F.when(F.col("split") == "test", 1).otherwise(0)).alias("tests"),
        F.sum(F.when(F.col("split") == "validation", 1).otherwise(0)).alias("vals"),
        F.max(F.when(F.col("split") == "train", F.col("ts"))).alias("last_train"),
        F.min(F.when(F.col("split") == "test", F.col("ts"))).alias("test_ts"))
    rows = per_user.collect()
    assert rows and all(r.tests == 1 and r.vals == 1 and r.last_train <= r.test_ts for r in rows)
