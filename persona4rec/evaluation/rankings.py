"""Where each user's held-out item lands, per generator and reranker variant, computed in Spark.

Protocol (kept identical for every variant): the candidates are the generator's top-N for the
user (trained on the training split, training items excluded). At test time the user's
validation item is a known interaction and is removed from the candidates too. The held-out item's
rank among the remaining candidates is recorded; a held-out item that is not a candidate is a
miss (null rank) — the reranker can only reorder what the generator proposed.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from persona4rec.schemas import ITEM_ID, SPLIT, USER_ID, VALIDATION
from persona4rec.scoring.blocks import Prepared, blocked_persona_scores, task_count
from persona4rec.scoring.runs import sorted_runs, user_runs
from persona4rec.scoring.score import (ScoringIndex, candidate_arrays, rank_candidates, user_candidates,
                                       vector_matrix)

_OUT = pa.schema([(USER_ID, pa.string()), ("alpha", pa.float64()), ("target_rank", pa.int32())])


def eval_candidates(candidates: DataFrame, splits: DataFrame, split: str) -> tuple[DataFrame, DataFrame]:
    """(targets: user_id, item_id of the held-out interactions of `split`;
    candidates: user_id, item_id, cf_score, cf_rank, is_target with seen items removed)."""
    targets = splits.filter(F.col(SPLIT) == split).select(USER_ID, ITEM_ID)
    cands = candidates.select(USER_ID, ITEM_ID, "cf_score", "cf_rank")
    if split != VALIDATION:
        seen = splits.filter(F.col(SPLIT) == VALIDATION).select(USER_ID, ITEM_ID)
        cands = cands.join(seen, [USER_ID, ITEM_ID], "left_anti")
    cands = cands.join(targets.select(USER_ID, ITEM_ID, F.lit(True).alias("is_target")), [USER_ID, ITEM_ID], "left") \
        .withColumn("is_target", F.coalesce("is_target", F.lit(False)))
    return targets, cands


def generator_ranks(targets: DataFrame, cands: DataFrame) -> DataFrame:
    """user_id, target_rank in the generator's own order (CF rank after removing seen items)."""
    w = Window.partitionBy(USER_ID).orderBy("cf_rank", ITEM_ID)
    ranked = cands.withColumn("target_rank", F.row_number().over(w)).filter("is_target")
    return targets.select(USER_ID).join(ranked.select(USER_ID, F.col("target_rank").cast("int")), USER_ID, "left")


def reranked_ranks(spark: SparkSession, targets: DataFrame, cands: DataFrame, vectors: DataFrame,
                   si: ScoringIndex | Prepared, alphas: tuple[float, ...]) -> DataFrame:
    """user_id, alpha, target_rank after the persona rerank (Eq. 10, blended with CF by alpha),
    for every alpha of the (non-empty) grid in one pass; `si` the broadcast index, or the blocked
    layout of one over scoring.index_budget_mb (the same ranks: score.py, blocks.py)."""
    if isinstance(si, Prepared):
        return _blocked_ranks(spark, targets, cands, vectors, si, alphas)
    bc = spark.sparkContext.broadcast(si)
    users = user_candidates(spark, cands, si, ("is_target",)).join(vectors.select(USER_ID, "vector"), USER_ID, "left")

    def rank(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        index = bc.value
        for batch in batches:
            vec, has = vector_matrix(batch, index.pm.vectors.shape[2])
            counts, fields, rows, cf, cf_rank = candidate_arrays(batch)
            is_target = fields["is_target"].to_numpy(zero_copy_only=False).astype(bool)
            ids, alpha_out, rank_out = [], [], []
            for alpha in alphas:
                r = rank_candidates(vec, has, counts, rows, cf, cf_rank, index.pm, alpha, None)
                hit = is_target[r.candidate]
                ids.append(r.user[hit])
                rank_out.append(r.rank[hit])
                alpha_out.append(np.full(int(hit.sum()), alpha))
            users_col = batch.column(USER_ID)
            yield pa.RecordBatch.from_arrays([
                users_col.take(pa.array(np.concatenate(ids))).cast(pa.string()),
                pa.array(np.concatenate(alpha_out), pa.float64()),
                pa.array(np.concatenate(rank_out).astype(np.int32), pa.int32()),
            ], schema=_OUT)

    return every_alpha(spark, targets, users.mapInArrow(rank, "user_id string, alpha double, target_rank int"), alphas)


def _blocked_ranks(spark: SparkSession, targets: DataFrame, cands: DataFrame, vectors: DataFrame, prepared: Prepared,
                   alphas: tuple[float, ...]) -> DataFrame:
    """reranked_ranks over item blocks: per-candidate max-sim from blocks.py, the held-out flag
    joined back, then each user's candidates ranked for every alpha from sorted runs."""
    partitions = task_count(spark, prepared.blocks)
    scores = blocked_persona_scores(cands.withColumn("source", F.lit("cf")), vectors, prepared, partitions) \
        .join(cands.select(USER_ID, ITEM_ID, "is_target"), [USER_ID, ITEM_ID])

    def rank(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for t in sorted_runs(batches, [USER_ID]):
            t, starts, counts = user_runs(t, USER_ID)
            col = lambda name: t.column(name).chunk(0).to_numpy(zero_copy_only=False)
            has, is_target = col("has")[starts].astype(bool), col("is_target").astype(bool)
            cf, cf_rank = col("cf_score").astype(np.float64), col("cf_rank").astype(np.int64)
            persona = col("persona_score").astype(np.float64)
            ids, alpha_out, rank_out = [], [], []
            for alpha in alphas:
                r = rank_candidates(None, has, counts, None, cf, cf_rank, None, alpha, None, persona)
                hit = is_target[r.candidate]
                ids.append(starts[r.user[hit]])
                rank_out.append(r.rank[hit])
                alpha_out.append(np.full(int(hit.sum()), alpha))
            yield pa.RecordBatch.from_arrays([
                t.column(USER_ID).chunk(0).take(pa.array(np.concatenate(ids))).cast(pa.string()),
                pa.array(np.concatenate(alpha_out), pa.float64()),
                pa.array(np.concatenate(rank_out).astype(np.int32), pa.int32())], schema=_OUT)

    ranked = scores.repartition(partitions, USER_ID).sortWithinPartitions(USER_ID) \
        .mapInArrow(rank, "user_id string, alpha double, target_rank int")
    return every_alpha(spark, targets, ranked, alphas)


def every_alpha(spark: SparkSession, targets: DataFrame, ranked: DataFrame, alphas: tuple[float, ...]) -> DataFrame:
    """One row per (target user, alpha of the grid), the rank where there is one (else a miss).
    The grid is the configured α values (a handful), not data."""
    grid = spark.createDataFrame([(float(a),) for a in alphas], "alpha double")
    return targets.select(USER_ID).crossJoin(grid).join(ranked, [USER_ID, "alpha"], "left")
