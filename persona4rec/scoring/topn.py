"""Factor models on Spark: train on one worker, then one distributed top-N for every generator.

Training (`train_on_one_worker`): the dense (u, i) pairs go to a single task (`repartition(1)` +
`mapInArrow`), which trains in torch — on that task's GPU when the cluster has one — and emits the
factor rows; the driver never holds the interactions. The factors are written once to the work
folder (parquet) so a retry of a later step re-reads them instead of retraining.

Top-N (`top_n_unseen`): user factors stay a DataFrame, each row carrying the user's seen item ids;
the item factor matrix (items × dim, small: 1M items × 64 dims is 256 MB) is read by each Python
worker once from the factors written to the work folder (the driver never holds it), under
`candidates.item_factors_budget_mb`, checked before training. Inside `mapInArrow`, users are scored in blocks whose
score matrix stays under `candidates.score_block_mb`, seen items are masked to −∞ in place, and
`argpartition` picks the top n — so a user with 20k interactions costs 20k masked cells, not a
20k-longer list for everyone (no `n + longest history`). Order: score descending, then item id.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from persona4rec.config import spark_path
from persona4rec.errors import InputError

log = logging.getLogger(__name__)

FACTORS_SCHEMA = "side string, idx long, factors array<float>"
TOP_N_SCHEMA = "u long, i long, cf_score double, cf_rank int"
Trainer = Callable[[np.ndarray, np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]


def _factor_batches(side: str, mat: np.ndarray, rows: int = 8192) -> Iterator[pa.RecordBatch]:
    dim = mat.shape[1]
    for s in range(0, len(mat), rows):
        block = np.ascontiguousarray(mat[s:s + rows], dtype=np.float32)
        offsets = pa.array(np.arange(0, (len(block) + 1) * dim, dim, dtype=np.int32))
        yield pa.RecordBatch.from_arrays(
            [pa.array([side] * len(block), pa.string()), pa.array(np.arange(s, s + len(block), dtype=np.int64)),
             pa.ListArray.from_arrays(offsets, pa.array(block.ravel()))],
            names=["side", "idx", "factors"])


def train_on_one_worker(pairs: DataFrame, n_users: int, n_items: int, trainer: Trainer, path: str) -> None:
    """Train `trainer(u, i, n_users, n_items) -> (P, Q)` on the (u long, i long) pairs in one task;
    write the factors (FACTORS_SCHEMA, side 'u' or 'i', idx = dense id) to `path`.
    The folder is rewritten whole (overwrite): give each run its own (generate_candidates does)."""

    def train(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        us, its = [], []
        for b in batches:
            us.append(b.column(0).to_numpy(zero_copy_only=False))
            its.append(b.column(1).to_numpy(zero_copy_only=False))
        if not us:
            return
        u, i = np.concatenate(us), np.concatenate(its)
        order = np.lexsort((i, u))  # shuffle-fetch order varies between runs: a fixed seed needs a fixed input
        P, Q = trainer(u[order], i[order], n_users, n_items)
        yield from _factor_batches("u", P)
        yield from _factor_batches("i", Q)

    pairs.select(F.col("u").cast("long"), F.col("i").cast("long")).repartition(1) \
        .mapInArrow(train, FACTORS_SCHEMA).write.mode("overwrite").parquet(spark_path(path))


def check_item_budget(n_items: int, dim: int, budget_mb: float) -> None:
    """Refuse, before any training, an item factor matrix every worker could not hold."""
    need = n_items * dim * 4 / 2 ** 20
    if need > budget_mb:
        raise InputError(f"item factors of {n_items} items × {dim} dims need {need:.0f} MB, over "
                         f"candidates.item_factors_budget_mb = {budget_mb:g}: raise the budget (every worker holds "
                         f"the matrix) or lower the generator's dimension")


_ITEM_MATRICES: dict[tuple, np.ndarray] = {}


def _folder_signature(path: str) -> tuple:
    """What identifies one write of a factors folder: its files' names, sizes and times."""
    import os
    return (path, *sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)))


def item_matrix(path: str) -> np.ndarray:
    """The item factors [n_items, dim] (rows by dense id) from the factors folder, read once per
    Python worker (workers are reused across tasks) and kept for its next tasks until the folder
    is rewritten."""
    key = _folder_signature(path)
    if key not in _ITEM_MATRICES:
        import pyarrow.parquet as pq
        t = pq.read_table(path, columns=["side", "idx", "factors"], filters=[("side", "=", "i")])
        idx = t.column("idx").to_numpy()
        emb = t.column("factors").combine_chunks()
        dim = emb.value_lengths()[0].as_py() if len(emb) else 0
        mat = np.zeros((int(idx.max()) + 1 if len(idx) else 0, dim), dtype=np.float32)
        mat[idx] = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(idx), dim)
        _ITEM_MATRICES.clear()  # one generator's matrix at a time
        _ITEM_MATRICES[key] = mat
    return _ITEM_MATRICES[key]


def write_factors(users: DataFrame, items: DataFrame, path: str) -> None:
    """Factors computed elsewhere (ALS: (u | idx, factors)) in FACTORS_SCHEMA at `path`."""
    users.select(F.lit("u").alias("side"), F.col("u").cast("long").alias("idx"), "factors").unionByName(
        items.select(F.lit("i").alias("side"), F.col("idx").cast("long"), "factors")) \
        .write.mode("overwrite").parquet(spark_path(path))


def _ties_by_item_id(scores: np.ndarray, top: np.ndarray, k: int) -> None:
    """argpartition picks arbitrarily among items tied with the k-th score: where such ties cross
    the cut-off, take the row's items above the tie and then the tied ones by item id (in place)."""
    if k >= scores.shape[1]:
        return
    cut = np.take_along_axis(scores, top, axis=1).min(axis=1)
    tied_in = (np.take_along_axis(scores, top, axis=1) == cut[:, None]).sum(axis=1)
    tied_all = (scores == cut[:, None]).sum(axis=1)
    for r in np.flatnonzero(tied_all > tied_in):
        above = np.flatnonzero(scores[r] > cut[r])
        top[r] = np.concatenate([above, np.flatnonzero(scores[r] == cut[r])[:k - len(above)]])


def top_n_rows(U: np.ndarray, seen_flat: np.ndarray, seen_counts: np.ndarray, Q: np.ndarray, n: int,
               block_elems: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, item, score, rank) of each of the users' top-n unseen items by U·Qᵀ.

    U [users, dim], Q [items, dim]; user r's seen items are seen_flat[offset_r : offset_r + seen_counts[r]].
    Scores are computed `block_elems // items` users at a time."""
    n_users, n_items = len(U), len(Q)
    k = min(n, n_items)
    out: list[tuple[np.ndarray, ...]] = []
    if n_users == 0 or k == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0), empty
    starts = np.concatenate([[0], np.cumsum(seen_counts)])
    step = max(1, block_elems // max(n_items, 1))
    for s in range(0, n_users, step):
        e = min(s + step, n_users)
        scores = U[s:e] @ Q.T
        lo, hi = starts[s], starts[e]
        owner = np.repeat(np.arange(e - s), seen_counts[s:e])
        scores[owner, seen_flat[lo:hi]] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n_items else \
            np.broadcast_to(np.arange(n_items), (e - s, n_items)).copy()
        _ties_by_item_id(scores, top, k)
        sc = np.take_along_axis(scores, top, axis=1)
        order = np.lexsort((top, -sc), axis=-1)
        top, sc = np.take_along_axis(top, order, axis=1), np.take_along_axis(sc, order, axis=1)
        keep = np.isfinite(sc)
        rows = np.broadcast_to(np.arange(s, e)[:, None], top.shape)
        ranks = np.broadcast_to(np.arange(1, k + 1)[None, :], top.shape)
        out.append((rows[keep], top[keep], sc[keep].astype(np.float64), ranks[keep]))
    return tuple(np.concatenate(parts) for parts in zip(*out))  # type: ignore[return-value]


def top_n_unseen(factors_path: str, pairs: DataFrame, n: int, score_block_mb: float, n_tasks: int = 1) -> DataFrame:
    """TOP_N_SCHEMA rows: for every user of the factors at `factors_path` (FACTORS_SCHEMA), the n
    items with the highest dot product that the user has no pair with in `pairs` (u, i)."""
    spark = pairs.sparkSession
    factors = spark.read.parquet(spark_path(factors_path))
    seen = pairs.groupBy(F.col("u").cast("long").alias("u")).agg(F.collect_list(F.col("i").cast("long")).alias("seen"))
    users = factors.filter(F.col("side") == "u").select(F.col("idx").alias("u"), "factors").join(seen, "u", "left")
    # The work is users × items × dim: spread it over enough tasks (AQE would size them by bytes).
    users = users.repartition(max(spark.sparkContext.defaultParallelism * 2, n_tasks), "u")
    block_elems = max(1, int(score_block_mb * 2 ** 20 / 4))

    def rank(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        Qm = item_matrix(factors_path)
        for b in batches:
            if b.num_rows == 0:
                continue
            fac = b.column(1)
            dim = Qm.shape[1]
            U = fac.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(b.num_rows, dim)
            seen_col = b.column(2)
            counts = np.nan_to_num(pc.list_value_length(seen_col).to_numpy(zero_copy_only=False)).astype(np.int64)
            flat = seen_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            rows, items, scores, ranks = top_n_rows(U, flat, counts, Qm, n, block_elems)
            uid = b.column(0).to_numpy(zero_copy_only=False)
            yield pa.RecordBatch.from_arrays(
                [pa.array(uid[rows]), pa.array(items), pa.array(scores), pa.array(ranks.astype(np.int32))],
                names=["u", "i", "cf_score", "cf_rank"])

    return users.select("u", "factors", "seen").mapInArrow(rank, TOP_N_SCHEMA)
