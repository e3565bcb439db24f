"""Eq. 10 with memory per task bounded whatever the catalogue size: the persona index in item blocks.

The broadcast path (score.py) ships the whole padded persona tensor to every worker; that stays
the fast path while it fits `scoring.index_budget_mb`. Past it, the index is split by a hash of
the item id into B blocks that each fit the budget, and each block is written once to the work
folder as a memory-mappable tensor (`vectors.npy`: rows = the block's items sorted by id,
columns = their personas, in `scoring.index_dtype`) beside its sorted item ids and persona ids
(Arrow IPC). Workers map a block instead of parsing it: only the pages of the candidates a task
scores are read, and the OS shares them between the Python workers of a machine.

Each (user, block) pair then travels instead of the index: one row with the user's vector
(packed as bytes once per user, so each routed copy is a memcpy, not an element-wise array
conversion) followed by one flat row per candidate of that user in the block, with its CF fields
(at most min(candidates, B) copies of a vector per user). Rows are hash-partitioned by (block, a
shard of the user hash) — no range sampling pass — and sorted by (block, user) inside each task,
so a task maps each block once and cuts the stream into whole (block, user) runs (runs.py: no
`collect_list`); a candidate's tensor row is looked up in the block's item ids in the task (a hash
lookup in Arrow), so no items × blocks map is joined in Spark. The per-candidate scores come out
with the CF fields attached, ready to be ranked per user like the broadcast path (score.py).

The layout (blocks + the personas' e-mail texts, `prepare`) depends only on the persona index:
`score_users` keeps it per persona_index version, so the nightly run pays only for the users.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from persona4rec.config import spark_path
from persona4rec.schemas import ITEM_ID, USER_ID
from persona4rec.scoring.explain import explanations
from persona4rec.scoring.rank import PersonaMatrix, max_sim
from persona4rec.scoring.runs import run_starts, sorted_runs

log = logging.getLogger(__name__)

SCORES_SCHEMA = ("user_id string, item_id string, cf_score double, cf_rank int, source string, has boolean, "
                 "persona_score double, persona_id string")
SHARDS_PER_TASK = 4  # (block, shard) keys per task: evens out the hash partitioning, few blocks per task


def index_megabytes(index: DataFrame, itemsize: int) -> tuple[float, int, int, int]:
    """(MB of the padded tensor items × max personas × d, items, max personas, d), from aggregates
    over the ids and one vector's length (reading every vector only to measure it would cost a
    pass over the whole index; a vector of another length fails where blocks are written)."""
    row = index.groupBy(ITEM_ID).count().agg(F.count("*"), F.max("count")).first()
    first = index.select(F.size("embedding")).first()
    items, width, d = int(row[0] or 0), int(row[1] or 0), int(first[0]) if first else 0
    return items * width * d * itemsize / 2 ** 20, items, width, d


def block_count(megabytes: float, budget_mb: float) -> int:
    """Blocks so that each fits the budget with room for the hash's imbalance (×1.5)."""
    return max(1, math.ceil(1.5 * megabytes / budget_mb))


def task_count(spark, blocks: int) -> int:
    """Shuffle partitions for the blocked path: spark.sql.shuffle.partitions ("auto" on some
    Databricks clusters: the default parallelism), and never fewer than the blocks."""
    configured = spark.conf.get("spark.sql.shuffle.partitions")
    return max(blocks, int(configured) if configured.isdigit() else spark.sparkContext.defaultParallelism)


def block_of(item: F.Column, blocks: int) -> F.Column:
    return F.pmod(F.xxhash64(item), F.lit(blocks)).cast("int")


def write_blocks(index: DataFrame, blocks: int, path: str, dtype: str) -> list[int]:
    """The persona index as `<path>/block-<b>/{vectors.npy, ids.arrow}`, one group (= one block,
    within the budget) in a task's memory at a time; returns the blocks that hold items (at most
    `blocks` numbers: the only thing collected)."""

    def write(table: pa.Table) -> pa.Table:
        block = table.column("block")[0].as_py()
        table = table.sort_by([(ITEM_ID, "ascending"), ("persona_index", "ascending"), ("persona_id", "ascending")])
        item = table.column(ITEM_ID).combine_chunks()
        starts = np.flatnonzero(np.concatenate([[True], pc.not_equal(item[1:], item[:-1]).to_numpy(
            zero_copy_only=False)])) if len(item) else np.zeros(0, dtype=np.int64)
        row = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(item))))
        col = np.arange(len(item)) - starts[row]
        emb = table.column("embedding").combine_chunks()
        d = emb.value_lengths()[0].as_py()
        if pc.any(pc.not_equal(emb.value_lengths(), d)).as_py():
            bad = int(np.argmax(emb.value_lengths().to_numpy(zero_copy_only=False) != d))
            raise ValueError(f"persona_index: persona {table.column('persona_id')[bad].as_py()!r} has an embedding "
                             f"of length {emb.value_lengths()[bad].as_py()} (field 'embedding'), others {d}: "
                             f"rerun build_index")
        folder = os.path.join(path, f"block-{block}")
        os.makedirs(folder, exist_ok=True)
        shape = (len(starts), int(col.max()) + 1, d)
        dense = np.zeros(shape, dtype=dtype)  # the block fits the budget: built in memory, written sequentially
        dense[row, col] = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), d)
        ids = np.full(shape[0] * shape[1], None, dtype=object)
        ids[row * shape[1] + col] = table.column("persona_id").to_numpy(zero_copy_only=False)
        meta = pa.table({"persona_id": pa.array(ids, pa.string())})
        items = pa.table({ITEM_ID: item.take(pa.array(starts)).cast(pa.string())})
        attempt = uuid.uuid4().hex[:12]  # a retried or speculative task never writes into another's file
        with open(os.path.join(folder, f"vectors.{attempt}.npy"), "wb") as fh:
            np.save(fh, dense)
        del dense
        for name, t in (("ids", meta), ("items", items)):
            with pa.OSFile(os.path.join(folder, f"{name}.{attempt}.arrow"), "wb") as sink, \
                    pa.ipc.new_file(sink, t.schema) as w:
                w.write_table(t)
        for name in ("ids.arrow", "items.arrow", "vectors.npy"):  # vectors last: its presence means complete
            stem, ext = name.split(".")
            os.replace(os.path.join(folder, f"{stem}.{attempt}.{ext}"), os.path.join(folder, name))
        return pa.table({"block": pa.array([block], pa.int32())})

    cells = index.select(ITEM_ID, "persona_id", "persona_index", "embedding",
                         block_of(F.col(ITEM_ID), blocks).alias("block"))
    # one int per block reaches the driver: blocks = 1.5 × index / budget (43 for 1M items × 7 × 1024 at 1 GB)
    return sorted(r[0] for r in cells.groupBy("block").applyInArrow(write, "block int").collect())


MANIFEST = "_prepared.json"
# Part of every layout's folder name: a change to the block format or to the e-mail text rules
# (explain.py) makes a new layout instead of reusing texts cleaned by older rules.
LAYOUT_FORMAT = 2


def layout_code() -> str:
    import inspect

    from persona4rec.scoring import explain
    return hashlib.sha256(f"{LAYOUT_FORMAT}:{inspect.getsource(explain)}".encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Prepared:
    """A persona index laid out for the blocked path: `<path>/block-<b>/` for each block in
    `present`, `<path>/explanations` (persona_id, persona_name, explanation as Parquet)."""
    path: str
    blocks: int
    present: frozenset
    dtype: str = "float32"


def prepare(index: DataFrame, blocks: int, dtype: str, max_chars: int, path: str, texts: bool = True) -> Prepared:
    """The blocks and e-mail texts of `index` under `path`, written once and reused by every later
    run (both depend only on the persona index, not on the users: the nightly job pays for them
    once per index version — give `path` a name that changes with it). Each writer fills its own
    subfolder and then replaces the small manifest file that names it (the last step, a file
    rename, which object-store mounts support): a crash leaves no manifest pointing at a partial
    layout, and of two concurrent writers each ends with a complete one. No directory is renamed
    and no file is written out of order. texts False: no e-mail texts (evaluation ranks only);
    blocks 0: the e-mail texts only (what the broadcast path reuses)."""
    done = _read_manifest(path)
    if done is not None:
        log.info("persona blocks reused from %s (%d blocks)", done.path, done.blocks)
        return done
    writer = f"w-{uuid.uuid4().hex[:12]}"
    target = os.path.join(path, writer)
    os.makedirs(target, exist_ok=True)
    present = write_blocks(index, blocks, target, dtype) if blocks else []
    if texts:
        explanations(index, max_chars).write.mode("overwrite").parquet(spark_path(os.path.join(target, "explanations")))
    tmp = os.path.join(path, f"{MANIFEST}.{writer}")
    with open(tmp, "w") as fh:
        json.dump({"writer": writer, "blocks": blocks, "present": present, "dtype": dtype, "max_chars": max_chars},
                  fh)
    os.replace(tmp, os.path.join(path, MANIFEST))
    log.info("persona layout written to %s (%d blocks, %s%s)", target, blocks, dtype, ", e-mail texts" if texts else "")
    return _read_manifest(path)


def _read_manifest(path: str) -> Prepared | None:
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            m = json.load(fh)
    except FileNotFoundError:
        return None
    return Prepared(os.path.join(path, m["writer"]), int(m["blocks"]), frozenset(int(b) for b in m["present"]),
                    m["dtype"])


_LOADED: dict = {}


def load_block(path: str, block: int) -> tuple[PersonaMatrix, pa.Array, pa.Array]:
    """One block, memory-mapped: (PersonaMatrix over `vectors.npy`, sorted item ids, persona id per
    cell row × width + column, null where padded). The last one loaded stays open per worker."""
    key = (path, block)
    if key not in _LOADED:
        folder = os.path.join(path, f"block-{block}")
        if not os.path.isfile(os.path.join(folder, "vectors.npy")):
            raise FileNotFoundError(f"persona block {block} is not at {folder}: the work folder must be a path every "
                                    f"executor sees (storage.work_dir), and no other run may remove it while scoring")
        vectors = np.load(os.path.join(folder, "vectors.npy"), mmap_mode="r")
        read = lambda name: pa.ipc.open_file(pa.memory_map(os.path.join(folder, name))).read_all()
        ids = read("ids.arrow").column("persona_id").combine_chunks()
        items = read("items.arrow").column(ITEM_ID).combine_chunks()
        mask = np.asarray(ids.is_valid(), dtype=bool).reshape(vectors.shape[:2])
        _LOADED.clear()
        _LOADED[key] = (PersonaMatrix({}, vectors, mask, np.zeros(0, dtype=np.int64)), items, ids)
    return _LOADED[key]


ROUTED_NAMES = ["block", USER_ID, "kind", "vector", ITEM_ID, "cf_score", "cf_rank", "source"]


def pack_vectors(vectors: DataFrame, dtype: str) -> DataFrame:
    """user_id, vector as bytes (`dtype`, native order) of every user with a vector: converted from
    an array once per user, so the copies routed to blocks travel (shuffle, JVM → Arrow) as one
    memcpy each instead of an element-by-element array conversion."""

    def pack(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            yield pa.RecordBatch.from_arrays([b.column(0), packed_array(b.column(1), dtype)], names=[USER_ID, "vector"])

    return vectors.filter(F.col("vector").isNotNull()).select(USER_ID, "vector").mapInArrow(
        pack, f"{USER_ID} string, vector binary")


def packed_array(vec: pa.ListArray, dtype: str) -> pa.Array:
    """A list<float> array (no nulls) as a binary array of the values in `dtype`, row by row."""
    itemsize = np.dtype(dtype).itemsize
    lengths = vec.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]) * itemsize
    if offsets[-1] >= 2 ** 31:
        raise ValueError(f"a batch of {len(vec)} user vectors is over 2 GB: lower spark.sql.execution.arrow."
                         f"maxRecordsPerBatch")
    values = vec.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    return pa.Array.from_buffers(pa.binary(), len(vec), [None, pa.py_buffer(offsets.astype(np.int32)),
                                                         pa.py_buffer(values.tobytes())])


def unpacked_matrix(vecs: pa.Array, dtype: str, d: int, users: pa.Array) -> np.ndarray:
    """The packed vectors of `packed_array` as (n, d) float32; a vector of another length than
    the index's fails, naming its user."""
    itemsize = np.dtype(dtype).itemsize
    validity, offsets, data = vecs.buffers()
    off = np.frombuffer(offsets, dtype=np.int32)[vecs.offset:vecs.offset + len(vecs) + 1].astype(np.int64)
    lengths = np.diff(off) // itemsize
    if (lengths != d).any():
        bad = int(np.argmax(lengths != d))
        raise ValueError(f"user_vectors: user {users[bad].as_py()!r} has a vector of length {lengths[bad]} (field "
                         f"'vector'), the persona index has dimension {d}: rerun build_index and score_users with "
                         f"one model version")
    raw = np.frombuffer(data, dtype=np.uint8)[off[0]:off[-1]] if len(vecs) else np.zeros(0, np.uint8)
    return raw.view(dtype).reshape(len(vecs), d).astype(np.float32)


def routed_rows(candidates: DataFrame, vectors: DataFrame, blocks: int, partitions: int) -> DataFrame:
    """ROUTED_NAMES rows, flat: per (user, block holding some of its candidates) one `kind` 0 row
    with the user's vector packed as bytes (`pack_vectors`; none for a user without one) followed
    by `kind` 1 rows, one per candidate in that block with its CF fields; hash-partitioned by
    (block, shard of the user) and sorted by (block, user, kind) in each task. No `collect_list`:
    runs are cut in the task."""
    shards = max(1, math.ceil(SHARDS_PER_TASK * partitions / blocks))
    cands = candidates.select(USER_ID, ITEM_ID, "cf_score", "cf_rank", "source",
                              block_of(F.col(ITEM_ID), blocks).alias("block"))
    pairs = cands.select(USER_ID, "block").distinct()
    # float32 whatever the index dtype: the user side stays exact, as on the broadcast path
    vec_rows = pairs.join(pack_vectors(vectors, "float32"), USER_ID).select(
        "block", USER_ID, F.lit(0).alias("kind"), "vector", F.lit(None).cast("string").alias(ITEM_ID),
        F.lit(None).cast("double").alias("cf_score"), F.lit(None).cast("int").alias("cf_rank"),
        F.lit(None).cast("string").alias("source"))
    cand_rows = cands.select("block", USER_ID, F.lit(1).alias("kind"),
                             F.lit(None).cast("binary").alias("vector"), ITEM_ID,
                             F.col("cf_score").cast("double"), F.col("cf_rank").cast("int"), "source")
    return vec_rows.unionByName(cand_rows).withColumn("shard", F.pmod(F.xxhash64(USER_ID), F.lit(shards))) \
        .repartition(partitions, "block", "shard").sortWithinPartitions("block", USER_ID, "kind") \
        .select(*ROUTED_NAMES)


def blocked_persona_scores(candidates: DataFrame, vectors: DataFrame, prepared: Prepared,
                           partitions: int) -> DataFrame:
    """SCORES_SCHEMA rows for every candidate (user_id, item_id, cf_score, cf_rank, source): `has`
    whether the user has a vector, and where the index holds the item and the user a vector, max
    over the item's personas of cos(user, persona) and the winning persona (else nulls)."""
    path, present = prepared.path, prepared.present

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for table in sorted_runs(batches, ["block", USER_ID]):
            yield _score_runs(table, path, present)

    return routed_rows(candidates, vectors, prepared.blocks, partitions).mapInArrow(score, SCORES_SCHEMA)


def _score_runs(t: pa.Table, path: str, present: frozenset) -> pa.RecordBatch:
    """Max-sim of the candidates of whole (block, user) runs: no Python object per candidate."""
    t = t.combine_chunks()
    run = np.cumsum(run_starts(t, ["block", USER_ID])) - 1
    is_vec = t.column("kind").to_numpy() == 0
    vec_of_run = np.full(int(run[-1]) + 1 if len(run) else 0, -1, dtype=np.int64)
    vec_of_run[run[is_vec]] = np.arange(int(is_vec.sum()))
    ci = np.flatnonzero(~is_vec)
    owner = vec_of_run[run[ci]]
    block = t.column("block").to_numpy()[ci]
    items = t.column(ITEM_ID).chunk(0).take(pa.array(ci))
    score = np.full(len(ci), np.nan)
    slot = np.full(len(ci), -1, dtype=np.int64)
    persona = pa.nulls(len(ci), pa.string())
    vecs = t.column("vector").chunk(0).filter(pa.array(is_vec))
    users = None
    cuts = np.flatnonzero(np.diff(block)) + 1
    for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ci)]])):
        if hi == lo or int(block[lo]) not in present:
            continue
        pm, block_items, ids = load_block(path, int(block[lo]))
        if users is None:
            users = unpacked_matrix(vecs, "float32", pm.vectors.shape[2],
                                    t.column(USER_ID).chunk(0).filter(pa.array(is_vec)))
        rows = pc.index_in(items.slice(int(lo), int(hi - lo)), value_set=block_items).fill_null(-1) \
            .to_numpy(zero_copy_only=False)
        live = np.flatnonzero((rows >= 0) & (owner[lo:hi] >= 0))
        if len(live):
            s, best = max_sim(users[owner[lo + live]], rows[live], pm)
            score[lo + live] = s
            slot[lo + live] = rows[live] * pm.mask.shape[1] + best
            explained = slot[lo:hi] >= 0
            part = ids.take(pa.array(np.where(explained, slot[lo:hi], 0), mask=~explained)).cast(pa.string())
            persona = pa.concat_arrays([persona.slice(0, lo), part, persona.slice(hi)])
    take = pa.array(ci)
    return pa.RecordBatch.from_arrays([
        t.column(USER_ID).chunk(0).take(take).cast(pa.string()),
        items.cast(pa.string()),
        t.column("cf_score").chunk(0).take(take).cast(pa.float64()),
        t.column("cf_rank").chunk(0).take(take).cast(pa.int32()),
        t.column("source").chunk(0).take(take).cast(pa.string()),
        pa.array(owner >= 0, pa.bool_()),
        pa.array(score, pa.float64(), mask=np.isnan(score)),
        persona],
        names=[c.split()[0] for c in SCORES_SCHEMA.split(", ")])

