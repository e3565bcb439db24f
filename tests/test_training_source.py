"""Training input streamed from Spark through a memory-mapped Arrow file (training/source.py)."""

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from persona4rec.training import source
from persona4rec.training.data import Example, chunks, is_validation_user, take, unique_batches
from persona4rec.training.source import SCHEMA, ExampleSet, copy_to_arrow, open_examples, part_order, validation_flag


def _examples(n: int) -> list[Example]:
    rng = random.Random(3)
    out = []
    for j in range(n):
        item = f"I{rng.randrange(9)}"
        personas = tuple((f"{item}#{p}", f"persona {p} of {item}") for p in range(1 + j % 3))
        out.append(Example(f"U{j // 4}", item, tuple(f"text {j}-{h}" for h in range(1 + j % 5)),
                           personas[0][0], personas[0][1], personas))
    return out


def _table(examples: list[Example], validation: list[bool]) -> pa.Table:
    return pa.table({
        "user_id": [e.user_id for e in examples], "item_id": [e.item_id for e in examples],
        "history": [list(e.history) for e in examples], "persona_id": [e.persona_id for e in examples],
        "persona_text": [e.persona_text for e in examples],
        "item_personas": [[{"persona_id": p, "persona_text": t} for p, t in e.item_personas] for e in examples],
        "validation": validation,
        "user_key": [hash(e.user_id) for e in examples], "item_key": [hash(e.item_id) for e in examples],
    }, schema=SCHEMA)


@pytest.mark.unit
def test_example_set_reads_back_the_parts_in_order_and_batches_like_the_list(tmp_path, monkeypatch):
    monkeypatch.setattr(source, "READ_ROWS", 7)  # several record batches per part, per take and per iteration
    examples = _examples(60)
    validation = [j % 5 == 0 for j in range(60)]
    whole = _table(examples, validation)
    parts = tmp_path / "parts"
    parts.mkdir()
    for n, (lo, hi) in enumerate(((0, 25), (25, 25), (25, 60))):  # an empty part, as Spark may write
        pq.write_table(whole.slice(lo, hi - lo), parts / f"part-{n:05d}-x.snappy.parquet")
    files = sorted((str(f) for f in parts.iterdir()), key=part_order)
    path = str(tmp_path / "examples.arrow")
    assert copy_to_arrow(files, path) == 60
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    train_rows = [j for j in range(60) if not validation[j]]
    train = ExampleSet(table, train_rows)
    expected = [examples[j] for j in train_rows]
    assert len(train) == 48 and list(train) == expected and train[5] == expected[5]
    assert take(train, [9, 0, 47, 9]) == [expected[9], expected[0], expected[47], expected[9]]
    assert [e for c in chunks(train, 10) for e in c] == expected
    # The batcher sees hashed keys instead of the ids: the same equalities, so the same batches.
    assert unique_batches(train, 4, random.Random(5)) == unique_batches(expected, 4, random.Random(5))


@pytest.mark.unit
def test_part_files_are_read_in_task_order():
    names = ["part-10001-ab-c000.snappy.parquet", "part-100000-ab-c000.snappy.parquet",
             "part-00002-ab-c1000.snappy.parquet", "part-00002-ab-c999.snappy.parquet"]
    assert [n[:16] for n in sorted(names, key=part_order)] == [
        "part-00002-ab-c9", "part-00002-ab-c1", "part-10001-ab-c0", "part-100000-ab-c"]


@pytest.mark.unit
def test_no_part_files_give_an_empty_set(tmp_path):
    path = str(tmp_path / "e.arrow")
    assert copy_to_arrow([], path) == 0
    empty = ExampleSet(pa.ipc.open_file(pa.memory_map(path)).read_all(), [])
    assert len(empty) == 0 and list(empty) == [] and unique_batches(empty, 4, random.Random(0)) == []


@pytest.mark.spark
def test_the_split_in_spark_is_the_python_split(spark):
    ids = [f"U{j}" for j in range(400)] + ["A2EZ0ZW3UDAXG", "ü-ñ", ""]
    df = spark.createDataFrame([(u,) for u in ids], "user_id string")
    for fraction, seed in ((0.1, 13), (0.25, 7), (0.5, 0)):
        got = dict(df.select("user_id", validation_flag(F.col("user_id"), fraction, seed).alias("v")).collect())
        assert got == {u: is_validation_user(u, fraction, seed) for u in ids}


@pytest.mark.spark
@pytest.mark.slow
def test_open_examples_streams_every_pair_with_history_once_and_cleans_up(spark, tmp_path):
    from test_training import synthetic_tables, training_config

    cfg = training_config(tmp_path)
    store = synthetic_tables(spark, cfg)
    with_history = store.read("alignment_pairs").count()  # every synthetic pair has earlier interactions
    with open_examples(store, cfg) as (train, val):
        assert len(train) + len(val) == with_history > 0
        both = list(train) + list(val)
        assert {e.user_id for e in train}.isdisjoint({e.user_id for e in val})
        assert all(is_validation_user(e.user_id, 0.25, cfg.train.seed) for e in val)
        keys = [(e.user_id, e.item_id) for e in train]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        assert all(e.history and len(e.history) <= cfg.profile.k for e in both)
        assert all(e.persona_id in dict(e.item_personas) for e in both)
        shared = cfg.work_dir("training_examples")
        assert len(os.listdir(shared)) == 0  # the Parquet copy is gone once the local file holds it
    assert os.listdir(shared) == []
