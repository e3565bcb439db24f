"""Job `generate_candidates`: first-stage CF candidates, top-N per user, seen items excluded.

Generators (`candidates.generators`): `als` — Spark MLlib ALS with implicit feedback; `bpr` —
BPR-MF (Rendle et al., 2009) and `lightgcn` (He et al., 2020), the paper's two generators, trained
in torch on one worker (its GPU when there is one, see `factorize.py`). Every generator is served
by the same distributed top-N over its factors with seen-item exclusion (`topn.py`); nothing
proportional to users, items or interactions reaches the driver (the workers read the item
factors from the work folder, under a budget).

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
import math
import shutil
import uuid
from dataclasses import dataclass

from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from persona4rec.config import PRODUCTION, CandidateSettings, Config, spark_path
from persona4rec.schemas import CANDIDATES, FROM_MODEL, FROM_POPULAR, ITEM_ID, REVIEWS, SPLIT, SPLITS, TRAIN, USER_ID
from persona4rec.scoring.factorize import BPRParams, LightGCNParams, train_bpr, train_lightgcn
from persona4rec.scoring.topn import check_item_budget, top_n_unseen, train_on_one_worker, write_factors
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)


def _dense_ids(df: DataFrame, col: str, name: str) -> DataFrame:
    """`col` → 0..n-1 in sorted order. zipWithIndex numbers the sorted partitions in place; a
    global row_number window would pull every id into one partition."""
    ordered = df.select(col).distinct().orderBy(col)
    return ordered.rdd.zipWithIndex().map(lambda r: (r[0][0], r[1])).toDF(f"{col} string, {name} long")


@dataclass(frozen=True)
class Indexed:
    """Interactions with dense ids: `pairs` (u, i), and the id maps `users` (user_id, u), `items` (item_id, i)."""
    pairs: DataFrame
    users: DataFrame
    items: DataFrame
    n_users: int
    n_items: int

    @staticmethod
    def of(train: DataFrame) -> "Indexed":
        users, items = _dense_ids(train, USER_ID, "u").persist(), _dense_ids(train, ITEM_ID, "i").persist()
        pairs = train.select(USER_ID, ITEM_ID).join(users, USER_ID).join(items, ITEM_ID).select("u", "i").persist()
        return Indexed(pairs, users, items, users.count(), items.count())

    def named(self, top: DataFrame, generator: str) -> DataFrame:
        """TOP_N rows (u, i, …) → generator, user_id, item_id, cf_score, cf_rank."""
        return top.join(self.users, "u").join(self.items, "i").select(
            F.lit(generator).alias("generator"), USER_ID, ITEM_ID, "cf_score", "cf_rank")

    def unpersist(self) -> None:
        for df in (self.pairs, self.users, self.items):
            df.unpersist()


def als_factors(spark: SparkSession, data: Indexed, rank: int, reg: float, alpha: float, iterations: int, seed: int,
                checkpoints: str | None = None) -> tuple[DataFrame, DataFrame]:
    """(user factors, item factors) as (u | idx, factors) DataFrames from Spark MLlib implicit ALS."""
    # Without checkpoints the lineage of ALS iterations grows until serialising a task overflows
    # the JVM stack (seen here at 15 iterations).
    if checkpoints and spark.sparkContext.getCheckpointDir() is None:
        spark.sparkContext.setCheckpointDir(spark_path(checkpoints))
    model = ALS(userCol="u", itemCol="i", ratingCol="r", implicitPrefs=True, rank=rank, regParam=reg,
                alpha=alpha, maxIter=iterations, seed=seed, coldStartStrategy="drop", checkpointInterval=5) \
        .fit(data.pairs.select("u", "i", F.lit(1.0).alias("r")))
    return (model.userFactors.select(F.col("id").cast("long").alias("u"), F.col("features").alias("factors")),
            model.itemFactors.select(F.col("id").cast("long").alias("idx"), F.col("features").alias("factors")))


def torch_factors(data: Indexed, generator: str, c: CandidateSettings, path: str) -> None:
    """BPR-MF or LightGCN factors, trained on one worker and written to `path` (see topn.py)."""
    if generator == "bpr":
        params = BPRParams(c.bpr_dim, c.bpr_epochs, c.bpr_lr, c.bpr_reg, c.bpr_batch, c.seed)
        trainer = lambda u, i, nu, ni: train_bpr(u, i, nu, ni, params, c.device)
    else:
        params = LightGCNParams(c.lightgcn_dim, c.lightgcn_layers, c.lightgcn_epochs, c.lightgcn_lr, c.lightgcn_reg,
                                c.lightgcn_batch, c.seed, c.lightgcn_max_steps_per_epoch)
        trainer = lambda u, i, nu, ni: train_lightgcn(u, i, nu, ni, params, c.device)
    train_on_one_worker(data.pairs, data.n_users, data.n_items, trainer, path)


def model_candidates(spark: SparkSession, train: DataFrame, generator: str, c: CandidateSettings,
                     work: str, checkpoints: str | None = None) -> DataFrame:
    """generator, user_id, item_id, cf_score, cf_rank: the top `c.top_n` unseen items of every user
    the generator has factors for, by the one distributed top-N (topn.py), persisted. `work` is a
    folder of this run alone (factors); the caller removes it after writing. ALS checkpoints go to
    `checkpoints` (default `<work>/checkpoints`): Spark keeps one checkpoint folder per session."""
    data = Indexed.of(train)
    try:
        dim = {"als": c.als_rank, "bpr": c.bpr_dim, "lightgcn": c.lightgcn_dim}[generator]
        check_item_budget(data.n_items, dim, c.item_factors_budget_mb)  # before hours of training
        path = f"{work}/factors/{generator}"
        if generator == "als":
            write_factors(*als_factors(spark, data, c.als_rank, c.als_reg, c.als_alpha, c.als_iterations, c.seed,
                                       checkpoints or f"{work}/checkpoints"), path)
        else:
            torch_factors(data, generator, c, path)
        cells_per_task = 2e9  # users × items scores per top-N task
        tasks = math.ceil(data.n_users * data.n_items / cells_per_task)
        top = top_n_unseen(path, data.pairs, c.top_n, c.score_block_mb, tasks)
        found = data.named(top, generator).persist()
        found.count()  # materialised before the id maps it was built from are released
        return found
    finally:
        data.unpersist()


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


def generate(spark: SparkSession, cfg: Config, generator: str, interactions: DataFrame,
             scratch: str) -> tuple[DataFrame, DataFrame]:
    """Candidate rows (CANDIDATES columns) of one generator for cfg.mode, and the generator's own
    rows, persisted (read by the fallback and the write): unpersist them after writing, then
    remove `scratch` (this run's factors)."""
    c = cfg.candidates
    found = model_candidates(spark, interactions, generator, c, scratch, cfg.work_dir("checkpoints"))
    rows = found.select(USER_ID, ITEM_ID, "cf_score", "cf_rank", F.lit(FROM_MODEL).alias("source"))
    if cfg.mode == PRODUCTION:
        rows = rows.unionByName(popular_fallback(found, interactions, c.top_n).withColumn("source",
                                                                                        F.lit(FROM_POPULAR)))
    return rows.select(F.lit(cfg.mode).alias("mode"), F.lit(generator).alias("generator"), "*"), found


def run(spark: SparkSession, cfg: Config) -> dict:
    store = TableStore(spark, cfg)
    interactions = training_interactions(store, cfg.mode).persist()
    out: dict = {"mode": cfg.mode}
    for gen in cfg.candidates.generators:
        # A folder per run: two runs (a backfill beside the nightly) never read each other's factors.
        scratch = cfg.work_dir(f"candidates/{cfg.mode}-{gen}-{uuid.uuid4().hex[:12]}")
        try:
            df, found = generate(spark, cfg, gen, interactions, scratch)
            w = store.upsert(df, CANDIDATES, delete_missing=True,
                             delete_missing_condition=f"t.mode = '{cfg.mode}' AND t.generator = '{gen}'")
            found.unpersist()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        written = store.read(CANDIDATES.name).filter((F.col("mode") == cfg.mode) & (F.col("generator") == gen))
        users = {r["source"]: int(r["users"]) for r in
                 written.groupBy("source").agg(F.countDistinct(USER_ID).alias("users")).collect()}
        out[gen] = {"version": w.version, **w.metrics, "users": users}
        log.info("candidates %s (%s mode): top-%d per user written; users by source %s", gen, cfg.mode,
                 cfg.candidates.top_n, users)
    interactions.unpersist()
    return out
