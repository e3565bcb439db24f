"""Paired bootstrap of a metric ratio, distributed: Poisson weights per user, summed per replicate.

The classical bootstrap resamples n users with replacement, B times — a B × n index matrix on one
machine (80 GB at 10M users and 1,000 replicates). The Poisson bootstrap (Hanley & MacGibbon 2006;
Chamandy et al., "Estimating uncertainty for massive data streams", Google 2012) gives each user
an independent weight w ~ Poisson(1) per replicate instead, which is the same resampling for
large n and needs no global index: each Spark task adds Σ w·a and Σ w·b per replicate over its own
users, and only B partial sums per task reach the driver.

Weights are a pure function of (seed, replicate, user id) — a splitmix64 hash turned into a
Poisson(1) draw by its inverse CDF — so the interval does not depend on how the users are
partitioned, and a rerun gives the same interval.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Poisson(1) CDF for k = 0..19 (the mass beyond 19 is below 1e-17).
_POISSON_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(20)])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def poisson_weights(user_hash: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """[users, replicates] Poisson(1) draws, a pure function of (seed, replicate, user hash)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(user_hash.astype(np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64)))
        r = np.arange(replicates, dtype=np.uint64)[None, :] * _GOLDEN
        bits = _splitmix64(base[:, None] + r)
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return np.searchsorted(_POISSON_CDF, uniform, side="right").astype(np.float64)


def replicate_sums(pairs: DataFrame, replicates: int, seed: int, chunk_cells: int = 1 << 22) -> DataFrame:
    """pairs (user_id, a double, b double) → replicate, sum_a, sum_b (Σ over users of w·a, w·b)."""

    def partial(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        sa, sb = np.zeros(replicates), np.zeros(replicates)
        step = max(1, chunk_cells // replicates)
        for b in batches:
            h = b.column(0).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
            a = b.column(1).to_numpy(zero_copy_only=False).astype(np.float64)
            v = b.column(2).to_numpy(zero_copy_only=False).astype(np.float64)
            for s in range(0, len(h), step):
                w = poisson_weights(h[s:s + step], replicates, seed)
                sa += a[s:s + step] @ w
                sb += v[s:s + step] @ w
        yield pa.RecordBatch.from_arrays([pa.array(np.arange(replicates, dtype=np.int32)), pa.array(sa),
                                          pa.array(sb)], names=["replicate", "sum_a", "sum_b"])

    hashed = pairs.select(F.xxhash64("user_id").alias("h"), F.col("a").cast("double"), F.col("b").cast("double"))
    return hashed.mapInArrow(partial, "replicate int, sum_a double, sum_b double") \
        .groupBy("replicate").agg(F.sum("sum_a").alias("sum_a"), F.sum("sum_b").alias("sum_b"))


def ratio_interval(pairs: DataFrame, replicates: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Paired bootstrap `level` interval of mean(b) / mean(a) over users; NaN when a is 0 everywhere.
    Only `replicates` rows reach the driver, whatever the number of users."""
    sums = replicate_sums(pairs, replicates, seed).toPandas()
    ok = sums["sum_a"] > 0
    if not ok.any():
        return float("nan"), float("nan")
    ratios = (sums["sum_b"][ok] / sums["sum_a"][ok]).to_numpy()
    tail = (1 - level) / 2 * 100
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))
