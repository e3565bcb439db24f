"""Leave-one-out ranking metrics: one held-out item per user, known by its rank (1-based) in the
user's reranked candidate list, or None when it is not among the candidates (a miss, as in the
paper's protocol: the reranker can only reorder what the generator proposed).

    HR@K   = 1 if rank ≤ K
    MRR@K  = 1/rank if rank ≤ K
    NDCG@K = 1/log2(rank + 1) if rank ≤ K   (one relevant item: the ideal DCG is 1)

Plain Python here (the independent reference); `spark_metrics` computes the same in Spark.
"""

from __future__ import annotations

import math

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

METRICS = ("hr", "mrr", "ndcg")


def hit(rank: int | None, k: int) -> float:
    return 1.0 if rank is not None and rank <= k else 0.0


def reciprocal_rank(rank: int | None, k: int) -> float:
    return 1.0 / rank if rank is not None and rank <= k else 0.0


def ndcg(rank: int | None, k: int) -> float:
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= k else 0.0


def summarise(ranks: list[int | None], ks: tuple[int, ...]) -> dict[str, float]:
    """{"hr@10": …, "mrr@10": …, "ndcg@10": …} averaged over users (every user counts)."""
    n = len(ranks)
    out = {}
    for k in ks:
        for name, fn in (("hr", hit), ("mrr", reciprocal_rank), ("ndcg", ndcg)):
            out[f"{name}@{k}"] = sum(fn(r, k) for r in ranks) / n if n else float("nan")
    return out


def metric_columns(rank: Column, k: int) -> dict[str, Column]:
    within = rank.isNotNull() & (rank <= k)
    return {"hr": F.when(within, 1.0).otherwise(0.0),
            "mrr": F.when(within, 1.0 / rank).otherwise(0.0),
            "ndcg": F.when(within, 1.0 / F.log2(rank + 1)).otherwise(0.0)}


def spark_metrics(ranks: DataFrame, group_by: list[str], ks: tuple[int, ...]) -> DataFrame:
    """ranks: group_by columns + target_rank (null = miss) → one row per group and K:
    group_by…, k, users, hr, mrr, ndcg."""
    parts = []
    for k in ks:
        cols = metric_columns(F.col("target_rank"), k)
        parts.append(ranks.groupBy(*group_by).agg(
            F.count("*").alias("users"), *[F.avg(c).alias(n) for n, c in cols.items()]).withColumn("k", F.lit(k)))
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out.select(*group_by, "k", "users", *METRICS)
