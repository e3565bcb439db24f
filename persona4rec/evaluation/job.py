"""Job `evaluate`: the paper's offline evaluation (leave-one-out, HR/MRR/NDCG@K) of every
reranker variant against the CF generator it reranks, on the validation and test splits.

Persona vectors are what scoring serves (`profile.persona_vectors`, scoring/personas.py: by
default each persona's centroid of the interactions it explains, under the variant's encoder).
Variants (each with the same candidates and protocol, see rankings.py):
  generator          the CF order itself
  vanilla            persona rerank (α = 1) with the un-tuned base encoder
  finetuned          persona rerank (α = 1) with the @champion encoder
  finetuned_blend    α·z(persona) + (1−α)·z(CF) with α chosen on validation NDCG@10 (never test)
  summary_only       items indexed by their summary alone (no reviews), champion encoder
  personas_<n>       only each item's first n personas (the paper's Table 10), champion encoder
Representation variants (`evaluation.representation_variants`, extractive builder only; un-tuned
encoder — issue 14's measurement of what the texts lose):
  vanilla_centroid        each persona's vector = the centroid of its cluster's raw review
                          embeddings (the persona text stays for the explanation); histories as `vanilla`
  vanilla_review_history  persona texts as `vanilla`; each history interaction = the user's own
                          review text (no item summary)
  vanilla_reviews         both
Every history reads the user's own record of each history interaction, validation ones included
at test time (they precede the test item): the review whole here, `profile.interaction_text`
(stored_interaction_texts, the same texts training and scoring read) in the other variants.
Opt-in because they embed every training and validation review (one pandas call per persona for
the centroids): a measurement, not a nightly cost.
Scenarios: all users, warm / cold users (most / least active by training interactions), and
users whose held-out item is a head / tail item (by training popularity).

Results go to the Delta tables `evaluation_metrics` and `evaluation_ranks` (per user, for paired
tests) and to an MLflow run (metrics, the chosen α, a bar chart). The chosen α of each generator
is tagged on the champion model version (`blend_alpha_<generator>`), which is what
`scoring.alpha: auto` reads.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import uuid

import mlflow
import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from persona4rec.alignment.profiles import stored_interaction_texts, stored_interactions
from persona4rec.config import EVALUATION, Config
from persona4rec.errors import InputError
from persona4rec.evaluation.bootstrap import ratio_interval
from persona4rec.evaluation.metrics import metric_columns, spark_metrics
from persona4rec.evaluation.rankings import eval_candidates, generator_ranks, reranked_ranks
from persona4rec.schemas import (CANDIDATES, EVALUATION_METRICS, EVALUATION_RANKS, ITEM_ID, ITEM_SUMMARIES,
                                 REVIEW_CLUSTERS, REVIEWS, SPLIT, TEST, TRAIN, USER_ID, VALIDATION)
from persona4rec.scoring.embedding import (EncoderRef, embed_column, embed_distinct, resolve_encoder, untuned_encoder,
                                           with_vectors)
from persona4rec.scoring.personas import centroids, persona_texts, persona_vectors, with_centroids
from persona4rec.scoring.blocks import Prepared, block_count, index_megabytes, prepare
from persona4rec.scoring.window import vector_inputs
from persona4rec.scoring.score import ScoringIndex, scoring_index
from persona4rec.scoring.users import compute_user_vectors
from persona4rec.tables import TableStore
from persona4rec.training.registry import set_blend_alpha, setup_mlflow

log = logging.getLogger(__name__)
HISTORY = {VALIDATION: (TRAIN,), TEST: (TRAIN, VALIDATION)}


class Embedded:
    """One encoder's view of the catalogue and the users: persona, summary and interaction
    embeddings (computed once, kept in memory for every variant). Each distinct text is encoded
    once: a persona's members are interactions that histories read too."""

    def __init__(self, store: TableStore, cfg: Config, ref: EncoderRef):
        self.ref = ref
        summaries = store.read(ITEM_SUMMARIES.name).select(
            ITEM_ID, F.concat(F.col(ITEM_ID), F.lit("#summary")).alias("persona_id"), F.lit(0).alias("persona_index"),
            F.lit("Item summary").alias("name"), F.col("summary").alias("description"),
            F.lit("").alias("preference_rationale"), F.col("summary").alias("persona_text"))
        # what the validation (train history) and test (train + validation) user vectors read
        texts = vector_inputs(stored_interaction_texts(store, cfg).filter(F.col(SPLIT).isin(TRAIN, VALIDATION)),
                              cfg.profile.k, (TRAIN,))
        self.texts = embed_distinct(persona_texts(store, cfg).unionByName(
            summaries.select(F.col("persona_text").alias("text"))).unionByName(texts.select("text")), ref).persist()
        self.personas = persona_vectors(store, cfg, ref, vectors=self.texts).persist()  # profile.persona_vectors
        self.summaries = with_vectors(summaries, "persona_text", self.texts).persist()
        self.interactions = with_vectors(texts, "text", self.texts).persist()
        log.info("evaluation embeddings with %s: %d distinct texts encoded for %d personas, %d summaries, "
                 "%d interactions", ref.version, self.texts.count(), self.personas.count(), self.summaries.count(),
                 self.interactions.count())
        self.texts.unpersist()  # what the variants read is materialised above

    def vectors(self, split: str, k: int, gamma: float) -> DataFrame:
        return compute_user_vectors(self.interactions.filter(F.col(SPLIT).isin(*HISTORY[split])), k, gamma)

    def release(self) -> None:
        for df in (self.personas, self.summaries, self.interactions):
            df.unpersist()


class ReviewView:
    """The un-tuned encoder's view of the reviews themselves: every review of a training or
    validation interaction embedded once (user_id, item_id, ts, seq, split, embedding). From it,
    persona centroids (the mean of the review embeddings of each persona's cluster, training
    reviews only: review_clusters is built from what the offline stages may read) and user vectors
    whose history rows are the user's own reviews."""

    def __init__(self, store: TableStore, cfg: Config, ref: EncoderRef):
        interactions = stored_interactions(store).filter(F.col(SPLIT).isin(TRAIN, VALIDATION))
        texts = interactions.join(store.read(REVIEWS.name).select(
            USER_ID, ITEM_ID, F.trim(F.regexp_replace("review_text", r"\s+", " ")).alias("text")), [USER_ID, ITEM_ID])
        self.reviews = embed_column(texts, "text", ref).drop("text", "model_version").persist()
        self.centroids = persona_centroids(self.reviews.filter(F.col(SPLIT) == TRAIN),
                                           store.read(REVIEW_CLUSTERS.name)).persist()
        log.info("review view: %d reviews embedded, %d persona centroids", self.reviews.count(),
                 self.centroids.count())

    def centroid_personas(self, personas: DataFrame) -> DataFrame:
        """`personas` (with their text embedding) whose vector is their cluster's centroid where
        they have one (a persona without member reviews, e.g. summary-only, keeps its text's);
        `centroid_of` = 1 where the centroid was taken."""
        return with_centroids(personas.drop("centroid_of"), self.centroids)

    def vectors(self, split: str, k: int, gamma: float) -> DataFrame:
        return compute_user_vectors(self.reviews.filter(F.col(SPLIT).isin(*HISTORY[split])), k, gamma)

    def release(self) -> None:
        self.reviews.unpersist()
        self.centroids.unpersist()


def persona_centroids(reviews: DataFrame, clusters: DataFrame) -> DataFrame:
    """persona_id, centroid: the L2-normalised mean embedding of the reviews (user_id, item_id,
    embedding) that review_clusters (user_id, item_id, persona_id) puts in each persona's cluster."""
    return centroids(reviews.join(clusters.select(USER_ID, ITEM_ID, "persona_id"), [USER_ID, ITEM_ID]))


def variant_index(personas: DataFrame, cfg: Config, folder: str) -> ScoringIndex | Prepared:
    """A variant's persona index as score_users would hold it: broadcast while its padded tensor
    fits scoring.index_budget_mb, else laid out in item blocks under `folder` (no e-mail texts)."""
    sc = cfg.scoring
    megabytes, items, width, d = index_megabytes(personas, np.dtype(sc.index_dtype).itemsize)
    if megabytes <= sc.index_budget_mb:
        return scoring_index(personas, sc.explanation_max_chars, sc.index_dtype, texts=False)
    blocks = block_count(megabytes, sc.index_budget_mb)
    log.info("evaluation index %s: %.0f MB > scoring.index_budget_mb %g, %d item blocks", folder, megabytes,
             sc.index_budget_mb, blocks)
    return prepare(personas, blocks, sc.index_dtype, sc.explanation_max_chars, folder, texts=False)


def row_numbers(df: DataFrame, *order) -> DataFrame:
    """df + `_r` = 1-based position in `order`, computed without a one-partition window: a global
    sort (range-partitioned) numbered in place by zipWithIndex."""
    ordered = df.orderBy(*order)
    schema = ordered.schema.add("_r", "long", False)
    return ordered.rdd.zipWithIndex().map(lambda r: (*r[0], r[1] + 1)).toDF(schema)


def scenario_labels(splits: DataFrame, cfg: Config) -> DataFrame:
    """user_id, item_id (held-out items of validation and test) → scenario names they belong to."""
    ev = cfg.evaluation
    train = splits.filter(F.col(SPLIT) == TRAIN)
    activity = train.groupBy(USER_ID).count()
    n_users = activity.count()
    groups = row_numbers(activity, F.col("count").desc(), F.xxhash64(USER_ID), USER_ID).select(
        USER_ID, F.when(F.col("_r") <= ev.user_group_fraction * n_users, "warm_users")
        .when(F.col("_r") > (1 - ev.user_group_fraction) * n_users, "cold_users").alias("user_group"))
    popularity = train.groupBy(ITEM_ID).count()
    n_items = popularity.count()
    heads = row_numbers(popularity, F.col("count").desc(), ITEM_ID).select(
        ITEM_ID, F.when(F.col("_r") <= ev.head_item_fraction * n_items, "head_items").otherwise("tail_items")
        .alias("item_group"))
    held = splits.filter(F.col(SPLIT) != TRAIN).select(SPLIT, USER_ID, ITEM_ID)
    return (held.join(groups, USER_ID, "left").join(heads, ITEM_ID, "left")
            .withColumn("item_group", F.coalesce("item_group", F.lit("tail_items")))  # unseen in training: tail
            .select(SPLIT, USER_ID, "user_group", "item_group"))


def with_scenarios(ranks: DataFrame, labels: DataFrame) -> DataFrame:
    """Each rank row once per scenario it belongs to: all, its user group, its item group."""
    j = ranks.join(labels, [SPLIT, USER_ID], "left")
    return j.withColumn("scenario", F.explode(F.array_compact(F.array(
        F.lit("all"), F.col("user_group"), F.col("item_group"))))).drop("user_group", "item_group")


def choose_alpha(val: DataFrame, k: int) -> tuple[float, dict[float, float]]:
    """The α with the best validation NDCG@k (ties: the larger α, the purer persona rerank)."""
    scores = {float(r["alpha"]): float(r["ndcg"]) for r in
              spark_metrics(val, ["alpha"], (k,)).select("alpha", "ndcg").collect()}
    best = max(scores, key=lambda a: (round(scores[a], 12), a))
    return best, scores


def bar_chart(rows: list, path: str, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = sorted({r["generator"] for r in rows})
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "generator", v))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(variants)), 4))
    width = 0.8 / max(len(gens), 1)
    for g_i, g in enumerate(gens):
        vals = {r["variant"]: r["ndcg"] for r in rows if r["generator"] == g}
        ax.bar(np.arange(len(variants)) + g_i * width, [vals.get(v, 0.0) for v in variants], width, label=g)
    ax.set_xticks(np.arange(len(variants)) + width * (len(gens) - 1) / 2, variants, rotation=30, ha="right")
    ax.set_ylabel(f"NDCG@{k} (test)")
    ax.set_title("Persona rerank variants vs the CF generator")
    ax.legend(title="generator")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(spark: SparkSession, cfg: Config) -> dict:
    layouts = cfg.work_dir(f"evaluate_blocks/{uuid.uuid4().hex[:12]}")  # item blocks of this run's variants
    try:
        return _evaluate(spark, cfg, layouts)
    finally:
        shutil.rmtree(layouts, ignore_errors=True)


def _evaluate(spark: SparkSession, cfg: Config, layouts: str) -> dict:
    store = TableStore(spark, cfg)
    ev, prof = cfg.evaluation, cfg.profile
    client = setup_mlflow(cfg)
    base = untuned_encoder(cfg)
    champion = resolve_encoder(cfg)
    encoders = {"vanilla": Embedded(store, cfg, base)}
    encoders["finetuned"] = encoders["vanilla"] if champion.version == base.version else Embedded(store, cfg, champion)
    if champion.version == base.version:
        log.warning("no @champion encoder: the 'finetuned' variants equal 'vanilla'")
    splits = store.read("splits")
    candidates = store.read(CANDIDATES.name).filter(F.col("mode") == EVALUATION)
    generators = sorted(r[0] for r in candidates.select("generator").distinct().collect())
    if not generators:
        raise InputError("candidates has no evaluation-mode rows: run generate_candidates with mode=evaluation "
                         "(the generators then train on the training split only) before evaluate")
    grid = tuple(sorted(set(ev.alpha_grid) | {1.0}))
    parts, alphas = [], {}
    ft = encoders["finetuned"]
    # variant → (its persona index, whose user vectors)
    frames = {"finetuned": (ft.personas, "finetuned"), "vanilla": (encoders["vanilla"].personas, "vanilla"),
              "summary_only": (ft.summaries, "finetuned"),
              **{f"personas_{n}": (ft.personas.filter(F.col("persona_index") < n), "finetuned")
                 for n in ev.persona_caps}}
    reviews = marked = None
    if ev.representation_variants:
        if cfg.offline.persona_builder != "extractive" or not store.exists(REVIEW_CLUSTERS.name):
            raise InputError("evaluation.representation_variants needs the extractive persona builder's "
                             "review_clusters (offline.persona_builder: extractive, then build_personas)")
        reviews = ReviewView(store, cfg, base)
        marked = reviews.centroid_personas(encoders["vanilla"].personas).persist()
        covered, total = marked.agg(F.sum("centroid_of"), F.count("*")).first()
        if not covered:
            raise InputError("review_clusters names none of item_personas' personas: rerun build_personas")
        log.info("representation variants: %d of %d personas have a review centroid", covered, total)
        centroids = marked.drop("centroid_of")
        frames.update({"vanilla_centroid": (centroids, "vanilla"),
                       "vanilla_review_history": (encoders["vanilla"].personas, "vanilla_reviews"),
                       "vanilla_reviews": (centroids, "vanilla_reviews")})
    built: dict[int, ScoringIndex | Prepared] = {}  # one index per persona frame (two variants may share one)
    indexes = {}
    for name, (df, _) in frames.items():
        if id(df) not in built:
            built[id(df)] = variant_index(df, cfg, f"{layouts}/{name}")
        indexes[name] = built[id(df)]
    # The rank parts stay lazy until their union is written; what they share is cached until then.
    cached: list[DataFrame] = []
    for split in (VALIDATION, TEST):
        views = {**encoders, **({"vanilla_reviews": reviews} if reviews is not None else {})}
        vec = {name: e.vectors(split, prof.k, prof.gamma).persist() for name, e in views.items()}
        cached.extend(vec.values())
        for gen in generators:
            targets, cands = eval_candidates(candidates.filter(F.col("generator") == gen), splits, split)
            cands = cands.persist()
            cached.append(cands)
            tag = lambda df, variant: df.select(F.lit(split).alias(SPLIT), F.lit(gen).alias("generator"),
                                                F.lit(variant).alias("variant"), "alpha", USER_ID, "target_rank")
            parts.append(tag(generator_ranks(targets, cands).withColumn("alpha", F.lit(None).cast("double")),
                             "generator"))
            for variant, si in indexes.items():
                encoder = frames[variant][1]
                if variant == "finetuned" and split == VALIDATION:
                    ranks = reranked_ranks(spark, targets, cands, vec[encoder], si, grid).persist()
                    cached.append(ranks)
                    alphas[gen], by_alpha = choose_alpha(ranks, 10)
                    log.info("blend α for %s chosen on validation: %.2f (NDCG@10 by α: %s)", gen, alphas[gen],
                             {a: round(v, 4) for a, v in by_alpha.items()})
                    parts.append(tag(ranks.filter(F.col("alpha") == 1.0), "finetuned"))
                    parts.append(tag(ranks.filter(F.col("alpha") == alphas[gen]), "finetuned_blend"))
                    continue
                parts.append(tag(reranked_ranks(spark, targets, cands, vec[encoder], si, (1.0,)), variant))
                if variant == "finetuned":
                    parts.append(tag(reranked_ranks(spark, targets, cands, vec[encoder], si, (alphas[gen],)),
                                     "finetuned_blend"))

    ranks = parts[0]
    for p in parts[1:]:
        ranks = ranks.unionByName(p)
    with mlflow.start_run(run_name="evaluate") as active:
        run_id = active.info.run_id
        ranks = ranks.withColumn("run_id", F.lit(run_id)).persist()
        evaluated_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        store.upsert(ranks, EVALUATION_RANKS)
        # Read back what was written: the metrics below then plan over one table scan instead of
        # the union of every variant's rerank plan (whose plan text alone exhausted a 2 GB driver).
        ranks.unpersist()
        for df in cached:
            df.unpersist()
        ranks = store.read(EVALUATION_RANKS.name).filter(F.col("run_id") == run_id).persist()
        metrics = spark_metrics(with_scenarios(ranks, scenario_labels(splits, cfg)),
                                ["run_id", SPLIT, "generator", "variant", "scenario"], ev.ks)
        alpha_of = spark.createDataFrame([(g, "finetuned_blend", float(a)) for g, a in alphas.items()],
                                         "generator string, variant string, alpha double")
        metrics = metrics.join(alpha_of, ["generator", "variant"], "left").withColumn(
            "evaluated_at", F.lit(evaluated_at)).withColumn(
            "alpha", F.when(F.col("variant") == "generator", None)
            .otherwise(F.coalesce("alpha", F.lit(1.0)))).persist()
        store.upsert(metrics, EVALUATION_METRICS)
        rows = [r.asDict() for r in metrics.filter("scenario = 'all'").collect()]
        table = {(r[SPLIT], r["generator"], r["variant"], r["k"]): r for r in rows}
        summary = {"run_id": run_id, "encoder_vanilla": base.version, "encoder_finetuned": champion.version,
                   "alpha": alphas, "generators": {}}
        test_ndcg = ranks.filter(F.col(SPLIT) == TEST).select(
            "generator", "variant", USER_ID, metric_columns(F.col("target_rank"), 10)["ndcg"].alias("ndcg"))
        for gen in generators:
            of = lambda variant, name: test_ndcg.filter((F.col("generator") == gen) & (F.col("variant") == variant)) \
                .select(USER_ID, F.col("ndcg").alias(name))
            pairs = of("generator", "a").join(of("finetuned", "b"), USER_ID, "left").fillna(0.0, ["b"])
            low, high = ratio_interval(pairs, ev.bootstrap_samples, ev.seed)
            cell = lambda variant, metric, k=10: table[(TEST, gen, variant, k)][metric]
            summary["generators"][gen] = {
                "users": int(cell("generator", "users")), "alpha": alphas[gen],
                **{f"{m}{k}_{v}": round(cell(v, m, k), 5) for v in sorted({key[2] for key in table})
                   for m in ("ndcg", "hr", "mrr") for k in ev.ks},
                "ndcg10_gain_ci": [round(low, 4), round(high, 4)]}
        mlflow.log_params({"encoder_vanilla": base.version, "encoder_finetuned": champion.version,
                           "ks": list(ev.ks), "persona_caps": list(ev.persona_caps), "k_history": prof.k,
                           "gamma": prof.gamma, **{f"alpha_{g}": a for g, a in alphas.items()}})
        mlflow.log_metrics({f"{r[SPLIT]}.{r['generator']}.{r['variant']}.{m}_{r['k']}": float(r[m])
                            for r in rows for m in ("hr", "mrr", "ndcg")})
        with tempfile.TemporaryDirectory() as tmp:
            chart = os.path.join(tmp, "ndcg10_test.png")
            bar_chart([r for r in rows if r[SPLIT] == TEST and r["k"] == 10], chart, 10)
            mlflow.log_artifact(chart)
            mlflow.log_dict(summary, "summary.json")
        ranks.unpersist()
        metrics.unpersist()
    if champion.version != base.version:
        for gen, a in alphas.items():
            set_blend_alpha(cfg, client, champion.version, gen, a)
    for e in {id(e): e for e in encoders.values()}.values():
        e.release()
    if reviews is not None:
        reviews.release()
        marked.unpersist()
    log.info("evaluation run %s: %s", run_id, summary)
    return summary
