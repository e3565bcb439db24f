"""Eq. 10 with memory per task bounded whatever the catalogue size: the persona index in item blocks.

The broadcast path (score.py) ships the whole padded persona tensor to every worker; that stays
the fast path while it fits `scoring.index_budget_mb`. Past it, the index is split by a hash of
the item id into B blocks that each fit the budget and written once to the work folder (Parquet,
one folder per block, readable by every executor), and each (user, block) pair travels instead:
the user's vector with the ids of its candidates that fall in that block (at most
min(candidates, B) copies of a vector per user). Tasks receive those rows sorted by block and
hold one block's personas at a time; the per-candidate scores (max-sim and the winning persona)
are then regrouped by user for the same blend, ranking and explanations as the broadcast path.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from persona4rec.config import spark_path
from persona4rec.schemas import ITEM_ID, USER_ID
from persona4rec.scoring.rank import PersonaMatrix, max_sim

SCORES_SCHEMA = "user_id string, item_id string, persona_score double, persona_id string"


def index_megabytes(index: DataFrame, itemsize: int) -> tuple[float, int, int, int]:
    """(MB of the padded tensor items × max personas × d, items, max personas, d), from aggregates."""
    per_item = index.groupBy(ITEM_ID).agg(F.count("*").alias("n"), F.max(F.size("embedding")).alias("d"))
    row = per_item.agg(F.count("*"), F.max("n"), F.max("d")).first()
    items, width, d = int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)
    return items * width * d * itemsize / 2 ** 20, items, width, d


def block_count(megabytes: float, budget_mb: float) -> int:
    """Blocks so that each fits the budget with room for the hash's imbalance (×1.5)."""
    return max(1, math.ceil(1.5 * megabytes / budget_mb))


def block_of(item: F.Column, blocks: int) -> F.Column:
    return F.pmod(F.xxhash64(item), F.lit(blocks)).cast("int")


def write_blocks(index: DataFrame, blocks: int, path: str) -> DataFrame:
    """The persona index as `<path>/block=<b>/*.parquet` with each persona's cell in its block's
    tensor (`row` = the item's position among the block's items by id, `col` = the persona's among
    the item's by persona_index); returns the item → (block, row) map as a DataFrame."""
    by_item = Window.partitionBy("block").orderBy(ITEM_ID)
    by_persona = Window.partitionBy(ITEM_ID).orderBy("persona_index", "persona_id")
    cells = index.select(ITEM_ID, "persona_id", "persona_index", "embedding",
                         block_of(F.col(ITEM_ID), blocks).alias("block")) \
        .withColumn("row", F.dense_rank().over(by_item) - 1).withColumn("col", F.row_number().over(by_persona) - 1)
    # by range: one write task per block (a hash of small integers would put several in one)
    cells.select("block", "row", "col", ITEM_ID, "persona_id", "embedding").repartitionByRange(blocks, "block") \
        .write.mode("overwrite").partitionBy("block").parquet(spark_path(path))
    return index.sparkSession.read.parquet(spark_path(path)).select(ITEM_ID, "block", "row").distinct()


def load_block(path: str, block: int, dtype: str) -> tuple[PersonaMatrix, pa.Array]:
    """One block's persona tensor (rows by `row`, personas by `col`) and the persona ids, which
    `PersonaMatrix.slots` index."""
    folder = os.path.join(path, f"block={block}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"persona block {block} is not at {folder}: the work folder must be a path every "
                                f"executor sees (storage.work_dir), and no other run may remove it while scoring")
    t = pq.read_table(folder, columns=["row", "col", "persona_id", "embedding"])
    row = t.column("row").to_numpy().astype(np.int64)
    col = t.column("col").to_numpy().astype(np.int64)
    emb = t.column("embedding").combine_chunks()
    d = emb.value_lengths()[0].as_py() if len(emb) else 0
    shape = (int(row.max()) + 1 if len(row) else 0, int(col.max()) + 1 if len(col) else 1)
    vectors = np.zeros((*shape, d), dtype=dtype)
    vectors[row, col] = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), d)
    mask = np.zeros(shape, dtype=bool)
    mask[row, col] = True
    slots = np.full(shape, -1, dtype=np.int64)
    slots[row, col] = np.arange(len(row))
    return PersonaMatrix({}, vectors, mask, slots), t.column("persona_id").combine_chunks()


def routed_rows(candidates: DataFrame, item_rows: DataFrame, vectors: DataFrame, partitions: int) -> DataFrame:
    """block, user_id, vector, items, rows: one row per (user with a vector, block holding some of
    its candidates), range-partitioned by block (and user hash within a block) and sorted by block
    inside each task. Candidates the index lacks are not routed (no persona score)."""
    per_block = candidates.select(USER_ID, ITEM_ID).join(item_rows, ITEM_ID) \
        .groupBy(USER_ID, "block").agg(F.collect_list(F.struct(ITEM_ID, "row")).alias("cands"))
    joined = per_block.join(vectors.filter(F.col("vector").isNotNull()).select(USER_ID, "vector"), USER_ID)
    return joined.repartitionByRange(partitions, "block", F.xxhash64(USER_ID)).sortWithinPartitions("block") \
        .select("block", USER_ID, "vector", F.col("cands." + ITEM_ID).alias("items"), F.col("cands.row").alias("rows"))


def blocked_persona_scores(candidates: DataFrame, vectors: DataFrame, index: DataFrame, path: str, blocks: int,
                           dtype: str, partitions: int) -> DataFrame:
    """SCORES_SCHEMA rows for every (user with a vector, candidate the index holds): max over the
    item's personas of cos(user, persona) and the winning persona, one block in memory at a time."""
    item_rows = write_blocks(index, blocks, path)

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        current, pm, ids = None, None, None
        for b in batches:
            if b.num_rows == 0:
                continue
            block = b.column(0).to_numpy(zero_copy_only=False)
            cuts = np.flatnonzero(np.diff(block)) + 1
            for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [b.num_rows]])):
                if block[lo] != current:
                    current = int(block[lo])
                    pm, ids = load_block(path, current, dtype)
                yield _score_part(b.slice(int(lo), int(hi - lo)), pm, ids)

    return routed_rows(candidates, item_rows, vectors, partitions).mapInArrow(score, SCORES_SCHEMA)


def _score_part(part: pa.RecordBatch, pm: PersonaMatrix, ids: pa.Array) -> pa.RecordBatch:
    """Max-sim of each routed (user, candidate) of one block: no Python object per candidate."""
    items, rows = part.column(3), part.column(4)
    counts = rows.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    flat_rows = rows.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    owner = np.repeat(np.arange(part.num_rows), counts)
    d = pm.vectors.shape[2]
    lengths = part.column(2).value_lengths().to_numpy(zero_copy_only=False)
    if (lengths != d).any():
        bad = int(np.argmax(lengths != d))
        raise ValueError(f"user_vectors: user {part.column(1)[bad].as_py()!r} has a vector of length {lengths[bad]} "
                         f"(field 'vector'), the persona index has dimension {d}: rerun build_index and score_users "
                         f"with one model version")
    users = part.column(2).flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(part.num_rows, d)
    s, best = max_sim(users[owner], flat_rows, pm)
    return pa.RecordBatch.from_arrays([
        part.column(1).take(pa.array(owner)).cast(pa.string()),
        items.flatten().cast(pa.string()),
        pa.array(s.astype(np.float64)),
        ids.take(pa.array(pm.slots[flat_rows, best])).cast(pa.string())],
        names=[USER_ID, ITEM_ID, "persona_score", "persona_id"])
