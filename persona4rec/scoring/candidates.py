"""Job `generate_candidates`: first-stage CF candidates, top-N per user, seen items excluded.

Generators (`candidates.generators`): `als` — Spark MLlib ALS with implicit feedback; `bpr` —
BPR-MF (Rendle et al., 2009), the paper's generator, in numpy on the driver (interactions of a
batch recommender fit in driver memory well past the sizes here).

What they learn from depends on `mode` (see README "Modes"):
* production (the nightly e-mails): every interaction ingest kept — the k-core and beyond — and
  every item a user ever interacted with is excluded. Every user with a kept review gets
  candidates: a user the generator has no factors for gets the most popular items they never
  interacted with (`source = popular`).
* evaluation (leave-one-out): the training split only, training items excluded, so evaluation on
  validation/test is honest.
Rows are written under their mode, so the nightly job and an evaluation never overwrite each other.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from persona4rec.config import PRODUCTION, Config
from persona4rec.schemas import CANDIDATES, FROM_MODEL, FROM_POPULAR, ITEM_ID, REVIEWS, SPLIT, SPLITS, TRAIN, USER_ID
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)


def _dense_ids(df: DataFrame, col: str, name: str) -> DataFrame:
    """`col` → 0..n-1 in sorted order. zipWithIndex numbers the sorted partitions in place; a
    global row_number window would pull every id into one partition."""
    ordered = df.select(col).distinct().orderBy(col)
    return ordered.rdd.zipWithIndex().map(lambda r: (r[0][0], r[1])).toDF(f"{col} string, {name} long")


def _indexed(train: DataFrame) -> tuple[DataFrame, DataFrame, DataFrame]:
    users, items = _dense_ids(train, USER_ID, "u"), _dense_ids(train, ITEM_ID, "i")
    return train.join(users, USER_ID).join(items, ITEM_ID), users, items


def als_candidates(spark: SparkSession, train: DataFrame, n: int, rank: int, reg: float, alpha: float,
                   iterations: int, seed: int, checkpoints: str | None = None) -> DataFrame:
    data, users, items = _indexed(train)
    # Without checkpoints the lineage of ALS iterations grows until serialising a task overflows
    # the JVM stack (seen here at 15 iterations).
    if checkpoints and spark.sparkContext.getCheckpointDir() is None:
        spark.sparkContext.setCheckpointDir(checkpoints)
    model = ALS(userCol="u", itemCol="i", ratingCol="r", implicitPrefs=True, rank=rank, regParam=reg,
                alpha=alpha, maxIter=iterations, seed=seed, coldStartStrategy="drop", checkpointInterval=5) \
        .fit(data.select("u", "i", F.lit(1.0).alias("r")))
    most_seen = data.groupBy("u").count().agg(F.max("count")).first()[0] or 0
    recs = model.recommendForAllUsers(n + int(most_seen)) \
        .select("u", F.posexplode("recommendations").alias("pos", "rec")) \
        .select("u", F.col("rec.i").alias("i"), F.col("rec.rating").cast("double").alias("cf_score"))
    recs = recs.join(data.select("u", "i"), ["u", "i"], "left_anti")
    w = Window.partitionBy("u").orderBy(F.col("cf_score").desc(), F.col("i"))
    top = recs.withColumn("cf_rank", F.row_number().over(w)).filter(F.col("cf_rank") <= n)
    return top.join(users, "u").join(items, "i").select(
        F.lit("als").alias("generator"), USER_ID, ITEM_ID, "cf_score", "cf_rank")


def train_bpr(u: np.ndarray, i: np.ndarray, n_users: int, n_items: int, dim: int, epochs: int, lr: float,
              reg: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """BPR-MF by SGD on (user, positive, sampled negative) triples, vectorised per mini-batch."""
    rng = np.random.default_rng(seed)
    P = rng.normal(0, 0.1, (n_users, dim)).astype(np.float32)
    Q = rng.normal(0, 0.1, (n_items, dim)).astype(np.float32)
    seen = set(zip(u.tolist(), i.tolist()))
    batch = 256
    for _ in range(epochs):
        order = rng.permutation(len(u))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            bu, bi = u[idx], i[idx]
            bj = rng.integers(0, n_items, len(idx))
            for k in range(len(idx)):  # resample negatives that are positives
                tries = 0
                while (bu[k], bj[k]) in seen and tries < 10:
                    bj[k] = rng.integers(0, n_items)
                    tries += 1
            pu, qi, qj = P[bu], Q[bi], Q[bj]
            x = np.sum(pu * (qi - qj), axis=1)
            g = (1.0 / (1.0 + np.exp(x)))[:, None]  # d/dx of -log sigmoid(x), negated
            np.add.at(P, bu, lr * (g * (qi - qj) - reg * pu))
            np.add.at(Q, bi, lr * (g * pu - reg * qi))
            np.add.at(Q, bj, lr * (-g * pu - reg * qj))
    return P, Q


def bpr_candidates(spark: SparkSession, train: DataFrame, n: int, dim: int, epochs: int, lr: float,
                   reg: float, seed: int) -> DataFrame:
    pdf = train.select(USER_ID, ITEM_ID).toPandas()
    users = np.array(sorted(pdf[USER_ID].unique()), dtype=object)
    items = np.array(sorted(pdf[ITEM_ID].unique()), dtype=object)
    u = pd.Index(users).get_indexer(pdf[USER_ID])
    i = pd.Index(items).get_indexer(pdf[ITEM_ID])
    P, Q = train_bpr(u, i, len(users), len(items), dim, epochs, lr, reg, seed)
    seen: dict[int, list[int]] = {}
    for a, b in zip(u, i):
        seen.setdefault(int(a), []).append(int(b))
    rows = []
    for s in range(0, len(users), 2048):
        scores = P[s:s + 2048] @ Q.T
        for r in range(scores.shape[0]):
            scores[r, seen.get(s + r, [])] = -np.inf
        k = min(n, len(items))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for r in range(scores.shape[0]):
            order = top[r][np.lexsort((top[r], -scores[r, top[r]]))]
            for rank, j in enumerate(order, start=1):
                if np.isfinite(scores[r, j]):
                    rows.append(("bpr", users[s + r], items[j], float(scores[r, j]), rank))
    return spark.createDataFrame(rows, "generator string, user_id string, item_id string, cf_score double, "
                                       "cf_rank int")


def training_interactions(store: TableStore, mode: str) -> DataFrame:
    """user_id, item_id pairs the generators learn from and treat as seen: every kept review in
    production, the training split in evaluation."""
    if mode == PRODUCTION:
        return store.read(REVIEWS.name).select(USER_ID, ITEM_ID)
    return store.read(SPLITS.name).filter(F.col(SPLIT) == TRAIN).select(USER_ID, ITEM_ID)


def popular_fallback(found: DataFrame, interactions: DataFrame, n: int) -> DataFrame:
    """user_id, item_id, cf_score (interacting users), cf_rank for every user of `interactions`
    that has no row in `found`: the n most popular items (ties by item id) they never interacted with.

    Those users are few (a generator trained on every kept interaction has factors for each of
    them), so the pool is only the top n + (their longest history) items, crossed with them alone."""
    users = interactions.select(USER_ID).distinct().join(found.select(USER_ID).distinct(), USER_ID, "left_anti")
    theirs = interactions.join(users, USER_ID, "left_semi")
    longest = theirs.groupBy(USER_ID).count().agg(F.max("count")).first()[0]
    if not longest:
        return interactions.sparkSession.createDataFrame([], "user_id string, item_id string, cf_score double, "
                                                             "cf_rank int")
    popularity = interactions.groupBy(ITEM_ID).agg(F.count("*").cast("double").alias("cf_score"))
    pool = popularity.orderBy(F.col("cf_score").desc(), ITEM_ID).limit(n + int(longest))
    unseen = users.crossJoin(F.broadcast(pool)).join(theirs, [USER_ID, ITEM_ID], "left_anti")
    w = Window.partitionBy(USER_ID).orderBy(F.col("cf_score").desc(), ITEM_ID)
    return unseen.withColumn("cf_rank", F.row_number().over(w)).filter(F.col("cf_rank") <= n) \
        .select(USER_ID, ITEM_ID, "cf_score", "cf_rank")


def generate(spark: SparkSession, cfg: Config, generator: str, interactions: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Candidate rows (CANDIDATES columns) of one generator for cfg.mode, and the generator's own
    rows, persisted (read by the fallback and the write): unpersist them after writing."""
    c = cfg.candidates
    if generator == "als":
        found = als_candidates(spark, interactions, c.top_n, c.als_rank, c.als_reg, c.als_alpha, c.als_iterations,
                               c.seed, cfg.work_dir("checkpoints"))
    else:
        found = bpr_candidates(spark, interactions, c.top_n, c.bpr_dim, c.bpr_epochs, c.bpr_lr, c.bpr_reg, c.seed)
    found = found.select(USER_ID, ITEM_ID, "cf_score", "cf_rank", F.lit(FROM_MODEL).alias("source")).persist()
    rows = found
    if cfg.mode == PRODUCTION:
        rows = rows.unionByName(popular_fallback(found, interactions, c.top_n).withColumn("source",
                                                                                        F.lit(FROM_POPULAR)))
    return rows.select(F.lit(cfg.mode).alias("mode"), F.lit(generator).alias("generator"), "*"), found


def run(spark: SparkSession, cfg: Config) -> dict:
    store = TableStore(spark, cfg)
    interactions = training_interactions(store, cfg.mode).persist()
    out: dict = {"mode": cfg.mode}
    for gen in cfg.candidates.generators:
        df, found = generate(spark, cfg, gen, interactions)
        w = store.upsert(df, CANDIDATES, delete_missing=True,
                         delete_missing_condition=f"t.mode = '{cfg.mode}' AND t.generator = '{gen}'")
        found.unpersist()
        written = store.read(CANDIDATES.name).filter((F.col("mode") == cfg.mode) & (F.col("generator") == gen))
        users = {r["source"]: int(r["users"]) for r in
                 written.groupBy("source").agg(F.countDistinct(USER_ID).alias("users")).collect()}
        out[gen] = {"version": w.version, **w.metrics, "users": users}
        log.info("candidates %s (%s mode): top-%d per user written; users by source %s", gen, cfg.mode,
                 cfg.candidates.top_n, users)
    interactions.unpersist()
    return out
