"""Training examples from the Delta tables, streamed to the trainer instead of collected.

The trainer is single-node (one GPU or CPU), but its input grows with the alignment pairs, and
each pair carries up to k history texts and its item's personas. Collecting them as Python rows
held all of that in the driver's heap at once. Here Spark joins the pairs, flags the validation
users and writes the examples as Parquet under the work folder; the driver copies them, one
record batch at a time, into an Arrow IPC file on its local disk (the temp folder: TMPDIR) and
memory-maps it. What stays in the heap is two integer keys per example (for the batcher); texts
are read per training batch, from the record batches that hold its rows.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from persona4rec.alignment.profiles import profiles, stored_interaction_texts
from persona4rec.config import Config, local_path, spark_path
from persona4rec.schemas import ALIGNMENT_PAIRS, ITEM_ID, ITEM_PERSONAS, USER_ID
from persona4rec.tables import TableStore
from persona4rec.training.data import Example

READ_ROWS = 4096  # rows per record batch when copying Parquet to the local Arrow file
_TEXTS = pa.list_(pa.string())
_PERSONAS = pa.list_(pa.struct([("persona_id", pa.string()), ("persona_text", pa.string())]))
SCHEMA = pa.schema([(USER_ID, pa.string()), (ITEM_ID, pa.string()), ("history", _TEXTS), ("persona_id", pa.string()),
                   ("persona_text", pa.string()), ("item_personas", _PERSONAS), ("validation", pa.bool_()),
                   ("user_key", pa.int64()), ("item_key", pa.int64())])  # what example_frame writes


def validation_flag(user_id: Column, fraction: float, seed: int) -> Column:
    """`data.is_validation_user` as a Spark expression (the same sha256 prefix, the same double
    division), so that the split is decided where the rows are."""
    prefix = F.substring(F.sha2(F.concat(F.lit(f"{seed}:"), user_id.cast("string")), 256), 1, 8)
    return F.conv(prefix, 16, 10).cast("double") / float(0xFFFFFFFF) < F.lit(fraction)


def example_frame(store: TableStore, cfg: Config) -> DataFrame:
    """alignment_pairs ⋈ profiles ⋈ personas: one row per pair whose user has an earlier history,
    ordered by (user, item), with `validation` and 64-bit hashes of the user and the item (the
    batcher's keys: two ids that collide only make a batch stricter, never admit a duplicate)."""
    prof = profiles(stored_interaction_texts(store, cfg), cfg.profile.k)
    personas = store.read(ITEM_PERSONAS.name)
    per_item = personas.groupBy(ITEM_ID).agg(
        F.sort_array(F.collect_list(F.struct("persona_index", "persona_id", "persona_text"))).alias("all_personas"))
    s = cfg.train
    return (store.read(ALIGNMENT_PAIRS.name).select(USER_ID, ITEM_ID, "persona_id")
            .join(prof.select(USER_ID, ITEM_ID, "history"), [USER_ID, ITEM_ID])
            .join(personas.select("persona_id", "persona_text"), "persona_id")
            .join(per_item, ITEM_ID)
            .filter(F.size("history") > 0)
            .select(USER_ID, ITEM_ID,
                    F.transform("history", lambda h: h["text"]).alias("history"),
                    "persona_id", "persona_text",
                    F.transform("all_personas", lambda p: F.struct(p["persona_id"].alias("persona_id"),
                                                                   p["persona_text"].alias("persona_text")))
                    .alias("item_personas"),
                    validation_flag(F.col(USER_ID), s.validation_fraction, s.seed).alias("validation"),
                    F.xxhash64(USER_ID).alias("user_key"), F.xxhash64(ITEM_ID).alias("item_key"))
            .orderBy(USER_ID, ITEM_ID))


class ExampleSet:
    """A sequence of `Example`s over rows of a memory-mapped Arrow table: `len`, `[i]`, `take`,
    chunked iteration (no slicing), and the batcher's keys without touching the texts.

    Rows are taken per record batch (`RecordBatch.take`): a take on the whole table would first
    concatenate every chunk of each string and list column into the heap."""

    def __init__(self, table: pa.Table, rows):
        self._batches = table.to_batches()
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        self._keys = table.select(["user_key", "item_key"])
        self._rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Example:
        return self.take([i])[0]

    def __iter__(self) -> Iterator[Example]:
        for start in range(0, len(self), READ_ROWS):
            yield from self.take(np.arange(start, min(start + READ_ROWS, len(self))))

    def take(self, positions) -> list[Example]:
        rows = self._rows[np.asarray(positions, dtype=np.int64)]
        batch = np.searchsorted(self._starts, rows, side="right") - 1
        out: list = [None] * len(rows)
        for b in np.unique(batch):
            at = np.flatnonzero(batch == b)
            sub = self._batches[b].take(pa.array(rows[at] - self._starts[b]))
            for n, example in zip(at, _examples(sub)):
                out[n] = example
        return out

    def keys(self) -> tuple[list[int], list[int]]:
        """(user keys, item keys) in order, as Python ints: what `unique_batches` compares."""
        pick = lambda name: self._keys.column(name).to_numpy()[self._rows].tolist()
        return pick("user_key"), pick("item_key")


def _examples(batch: pa.RecordBatch) -> list[Example]:
    cols = {name: batch.column(name).to_pylist() for name in
            (USER_ID, ITEM_ID, "history", "persona_id", "persona_text", "item_personas")}
    return [Example(u, i, tuple(h), pid, text, tuple((p["persona_id"], p["persona_text"]) for p in ps))
            for u, i, h, pid, text, ps in zip(cols[USER_ID], cols[ITEM_ID], cols["history"], cols["persona_id"],
                                              cols["persona_text"], cols["item_personas"])]


def part_order(path: str) -> tuple[int, int, str]:
    """Sort key of a Spark output file: (task partition, file counter within the task) as
    integers — by name, part-100000 would sort before part-10001."""
    name = os.path.basename(path)
    part = re.match(r"part-(\d+)", name)
    counter = re.search(r"-c(\d+)\.", name)
    return int(part.group(1)) if part else -1, int(counter.group(1)) if counter else 0, name


def copy_to_arrow(parts: list[str], path: str) -> int:
    """Spark's part files, in the order given (sort them by `part_order`: the frame's global
    order), into one Arrow IPC file, one record batch at a time; returns the row count."""
    schema = pq.read_schema(parts[0]) if parts else SCHEMA  # no pairs: Spark may write no part
    rows = 0
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for part in parts:
            with pq.ParquetFile(part) as f:
                for batch in f.iter_batches(batch_size=READ_ROWS):
                    writer.write_batch(batch)
                    rows += batch.num_rows
    return rows


@contextmanager
def open_examples(store: TableStore, cfg: Config,
                  validation_only: bool = False) -> Iterator[tuple[ExampleSet, ExampleSet]]:
    """(train, validation) example sets, streamed from Spark through files that are removed on
    exit (use the sets inside the `with`). The split is by user (`train.validation_fraction`,
    `train.seed`); validation_only: the training set is left empty (promotion reads no more)."""
    spark = store.spark
    shared = cfg.work_dir(f"training_examples/{uuid.uuid4().hex[:12]}")
    local = tempfile.mkdtemp(prefix="p4r-examples-")
    source = None
    try:
        frame = example_frame(store, cfg)
        if validation_only:
            frame = frame.filter("validation")
        frame.write.mode("overwrite").parquet(spark_path(shared))
        written = spark.read.schema(frame.schema).parquet(spark_path(shared))  # no part file: empty
        # Spark's own listing: committed files only (a failed task attempt can leave others behind).
        parts = sorted((local_path(f) for f in written.inputFiles()), key=part_order)
        path = os.path.join(local, "examples.arrow")
        copied = copy_to_arrow(parts, path)
        expected = written.count()
        if copied != expected:
            raise RuntimeError(f"copied {copied} training examples from {shared}, Spark reads {expected} there")
        shutil.rmtree(shared, ignore_errors=True)
        source = pa.memory_map(path)
        table = pa.ipc.open_file(source).read_all()
        val = table.column("validation").to_numpy(zero_copy_only=False)
        yield ExampleSet(table, np.flatnonzero(~val)), ExampleSet(table, np.flatnonzero(val))
    finally:
        if source is not None:
            source.close()  # buffers still referenced keep their pages mapped until released
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)
