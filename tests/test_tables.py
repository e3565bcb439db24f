"""The one write helper: MERGE metrics, deterministic source de-duplication, time travel."""

import pytest
from chispa import assert_df_equality
from delta.tables import DeltaTable
from pyspark.sql import types as T

from persona4rec.schemas import SchemaError, TableSpec
from persona4rec.tables import TableStore

pytestmark = pytest.mark.spark

SPEC = TableSpec(
    name="things", keys=("id",), insert_only=("born",),
    schema=T.StructType([
        T.StructField("id", T.StringType(), False),
        T.StructField("value", T.LongType(), True),
        T.StructField("tags", T.MapType(T.StringType(), T.StringType()), True),
        T.StructField("born", T.StringType(), True),
    ]))


def rows(spark, data):
    return spark.createDataFrame(data, SPEC.schema)


def test_upsert_inserts_then_a_rerun_changes_nothing(spark, cfg):
    store = TableStore(spark, cfg)
    data = [("a", 1, {"k": "v"}, "t0"), ("b", 2, None, "t0")]
    first = store.upsert(rows(spark, data), SPEC)
    assert (first.inserted, first.updated) == (2, 0)
    again = store.upsert(rows(spark, data), SPEC)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    assert_df_equality(store.read("things").drop("tags"), rows(spark, data).drop("tags"),
                       ignore_row_order=True)


def test_upsert_updates_changed_rows_but_keeps_insert_only_columns(spark, cfg):
    store = TableStore(spark, cfg)
    store.upsert(rows(spark, [("a", 1, {"k": "v"}, "t0"), ("b", 2, None, "t0")]), SPEC)
    res = store.upsert(rows(spark, [("a", 1, {"k": "w"}, "t1"), ("b", 2, None, "t1"),
                                    ("c", 3, None, "t1")]), SPEC)
    assert (res.inserted, res.updated) == (1, 1)
    got = {r.id: (r.tags, r.born) for r in store.read("things").collect()}
    assert got == {"a": ({"k": "w"}, "t0"), "b": (None, "t0"), "c": (None, "t1")}


def test_duplicate_source_keys_are_dropped_deterministically(spark, cfg):
    store = TableStore(spark, cfg)
    res = store.upsert(rows(spark, [("a", 1, None, "x"), ("a", 2, None, "x"), ("a", 1, None, "x")]), SPEC)
    assert res.source_duplicates_dropped == 2 and res.inserted == 1
    kept = store.read("things").first().value
    res2 = store.upsert(rows(spark, [("a", 2, None, "x"), ("a", 1, None, "x")]), SPEC)
    assert res2.updated == 0 and store.read("things").first().value == kept


def test_delete_missing_and_time_travel(spark, cfg):
    store = TableStore(spark, cfg)
    store.upsert(rows(spark, [("a", 1, None, "t"), ("b", 2, None, "t")]), SPEC)
    v1 = store.version("things")
    res = store.upsert(rows(spark, [("a", 1, None, "t")]), SPEC, delete_missing=True)
    assert res.deleted == 1
    assert [r.id for r in store.read("things").collect()] == ["a"]
    assert sorted(r.id for r in store.read("things", version=v1).collect()) == ["a", "b"]
    history = spark.sql(f"DESCRIBE HISTORY delta.`{store.location('things')}`").collect()
    assert [h.operation for h in history][:2] == ["MERGE", "MERGE"]
    assert DeltaTable.isDeltaTable(spark, store.location("things"))


def test_replace_where_replaces_only_that_partition(spark, cfg):
    spec = TableSpec(name="daily", keys=("day", "id"), partition_by=("day",), schema=T.StructType([
        T.StructField("day", T.StringType(), False), T.StructField("id", T.StringType(), False)]))
    store = TableStore(spark, cfg)
    store.replace_where(spark.createDataFrame([("d1", "a"), ("d1", "b")], spec.schema), spec, "day = 'd1'")
    store.replace_where(spark.createDataFrame([("d2", "a")], spec.schema), spec, "day = 'd2'")
    store.replace_where(spark.createDataFrame([("d1", "c")], spec.schema), spec, "day = 'd1'")
    got = sorted((r.day, r.id) for r in store.read("daily").collect())
    assert got == [("d1", "c"), ("d2", "a")]


def test_rows_missing_a_column_fail_with_table_named(spark, cfg):
    store = TableStore(spark, cfg)
    with pytest.raises(ValueError, match="rows for table 'things' lack column"):
        store.upsert(spark.createDataFrame([("a",)], "id string"), SPEC)


def test_reading_a_missing_table_says_which_stage_to_run(spark, cfg):
    with pytest.raises(FileNotFoundError, match="table 'nope' does not exist"):
        TableStore(spark, cfg).read("nope")


def test_a_table_written_by_an_older_version_fails_naming_its_columns(spark, cfg):
    """A derived table from before a schema change fails at the write with what differs, not deep
    inside a MERGE."""
    store = TableStore(spark, cfg)
    store.upsert(rows(spark, [("a", 1, None, "t0")]), SPEC)
    newer = TableSpec(name="things", keys=("id",), schema=T.StructType(
        [*SPEC.schema.fields, T.StructField("mode", T.StringType(), True)]))
    with pytest.raises(SchemaError, match=r"table 'things' .*missing \['mode'\], unexpected \[\].* drop it and "
                                          r"rerun"):
        store.upsert(spark.createDataFrame([("a", 1, None, "t0", "x")], newer.schema), newer)
