"""Evaluation: metric definitions, Spark vs plain Python agreement, and the leave-one-out protocol."""

import math

import numpy as np
import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from persona4rec.evaluation import metrics
from persona4rec.evaluation.bootstrap import poisson_weights, ratio_interval
from persona4rec.evaluation.job import choose_alpha, row_numbers
from persona4rec.evaluation.rankings import eval_candidates, generator_ranks, reranked_ranks
from persona4rec.scoring.blocks import prepare
from persona4rec.scoring.score import ScoringIndex

KS = (5, 10, 20)


@pytest.mark.unit
def test_hand_computed_hit_at_rank_1_rank_10_and_a_miss():
    assert metrics.summarise([1], KS) == {f"{m}@{k}": 1.0 for k in KS for m in ("hr", "mrr", "ndcg")}
    at10 = metrics.summarise([10], KS)
    assert at10["hr@5"] == at10["mrr@5"] == at10["ndcg@5"] == 0.0
    assert at10["hr@10"] == 1.0 and at10["mrr@10"] == pytest.approx(0.1)
    assert at10["ndcg@10"] == pytest.approx(1 / math.log2(11)) and at10["ndcg@20"] == at10["ndcg@10"]
    assert metrics.summarise([None], KS) == {f"{m}@{k}": 0.0 for k in KS for m in ("hr", "mrr", "ndcg")}
    both = metrics.summarise([1, None], (10,))
    assert both == {"hr@10": 0.5, "mrr@10": 0.5, "ndcg@10": 0.5}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    """The classical paired bootstrap (users resampled with replacement), the reference."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    base, new = a[idx].mean(axis=1), b[idx].mean(axis=1)
    ratios = new[base > 0] / base[base > 0]
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


@pytest.mark.unit
def test_poisson_weights_are_poisson_1_and_a_pure_function_of_seed_replicate_and_user():
    h = np.arange(20_000, dtype=np.int64) * 7919
    w = poisson_weights(h, 50, seed=3)
    assert w.mean() == pytest.approx(1.0, abs=0.01) and w.var() == pytest.approx(1.0, abs=0.02)
    assert (w == 0).mean() == pytest.approx(np.exp(-1), abs=0.005)
    assert np.array_equal(w[100:200], poisson_weights(h[100:200], 50, seed=3))  # batching does not matter
    assert not np.array_equal(w, poisson_weights(h, 50, seed=4))
    assert abs(np.corrcoef(w[:, 0], w[:, 1])[0, 1]) < 0.03  # replicates independent


@pytest.mark.spark
def test_distributed_bootstrap_brackets_the_ratio_like_the_classical_one_whatever_the_partitioning(spark):
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 3000)
    users = [f"U{u}" for u in range(len(a))]
    scaled = spark.createDataFrame(list(zip(users, a.tolist(), (a * 1.2).tolist())), "user_id string, a double, b double")
    lo, hi = ratio_interval(scaled, 200, seed=3)
    assert lo == pytest.approx(1.2) and hi == pytest.approx(1.2)
    b = np.clip(a + rng.normal(0.05, 0.3, len(a)), 0, None)
    df = spark.createDataFrame(list(zip(users, a.tolist(), b.tolist())), "user_id string, a double, b double")
    one, many = ratio_interval(df.repartition(1), 400, seed=3), ratio_interval(df.repartition(7), 400, seed=3)
    assert one == pytest.approx(many, abs=1e-12)
    ref = paired_bootstrap(a, b, 2000, seed=3)
    assert one[0] < b.mean() / a.mean() < one[1]
    assert one == pytest.approx(ref, abs=0.01)


@pytest.mark.spark
def test_row_numbers_follow_the_global_order_across_partitions(spark):
    df = spark.createDataFrame([(f"U{u:03d}", u % 7) for u in range(200)], "user_id string, c long").repartition(5)
    got = [(r["user_id"], r["_r"]) for r in row_numbers(df, F.col("c").desc(), "user_id").collect()]
    want = sorted(((f"U{u:03d}", u % 7) for u in range(200)), key=lambda t: (-t[1], t[0]))
    assert sorted(got, key=lambda t: t[1]) == [(u, n) for n, (u, _) in enumerate(want, start=1)]


@pytest.mark.spark
def test_spark_metrics_agree_with_the_python_reference(spark):
    rng = np.random.default_rng(1)
    rows = [(v, f"U{u}", None if rng.random() < 0.25 else int(rng.integers(1, 25)))
            for v in ("a", "b") for u in range(300)]
    df = spark.createDataFrame(rows, "variant string, user_id string, target_rank int")
    got = {(r.variant, r.k): r for r in metrics.spark_metrics(df, ["variant"], KS).collect()}
    for v in ("a", "b"):
        ref = metrics.summarise([r for vv, _, r in rows if vv == v], KS)
        for k in KS:
            assert got[(v, k)].users == 300
            for m in ("hr", "mrr", "ndcg"):
                assert getattr(got[(v, k)], m) == pytest.approx(ref[f"{m}@{k}"], abs=1e-12)


@pytest.mark.spark
def test_choose_alpha_picks_the_best_validation_ndcg_and_prefers_the_purer_rerank_on_ties(spark):
    rows = [(0.0, "U1", 3), (0.5, "U1", 1), (1.0, "U1", 1), (0.0, "U2", 2), (0.5, "U2", 2), (1.0, "U2", 2)]
    df = spark.createDataFrame(rows, "alpha double, user_id string, target_rank int")
    best, scores = choose_alpha(df, 10)
    assert best == 1.0 and scores[0.5] == scores[1.0] > scores[0.0]


@pytest.mark.spark
def test_protocol_removes_the_validation_item_at_test_time_and_counts_absent_targets_as_misses(spark):
    splits = spark.createDataFrame([
        ("U1", "A", "train"), ("U1", "V", "validation"), ("U1", "T", "test"),
        ("U2", "B", "train"), ("U2", "W", "validation"), ("U2", "X", "test")],
        "user_id string, item_id string, split string")
    cands = spark.createDataFrame([
        ("U1", "V", 9.0, 1), ("U1", "C", 8.0, 2), ("U1", "T", 7.0, 3), ("U1", "D", 6.0, 4),
        ("U2", "C", 9.0, 1), ("U2", "D", 8.0, 2)], "user_id string, item_id string, cf_score double, cf_rank int")
    targets, ev = eval_candidates(cands, splits, "test")
    gen = {r.user_id: r.target_rank for r in generator_ranks(targets, ev).collect()}
    assert gen == {"U1": 2, "U2": None}  # V is known at test time; X was never a candidate
    val_targets, val = eval_candidates(cands, splits, "validation")
    assert {r.user_id: r.target_rank for r in generator_ranks(val_targets, val).collect()} == {"U1": 1, "U2": None}

    # Persona rerank: U1's vector points at T's persona, so T rises to the top at α = 1; at α = 0
    # the order is the generator's.
    d = 4
    table = pa.table({"item_id": ["C", "D", "T", "V"], "persona_id": ["C#0", "D#0", "T#0", "V#0"],
                      "name": ["c", "d", "t", "v"], "description": ["x"] * 4, "preference_rationale": ["y"] * 4,
                      "embedding": [list(np.eye(d, dtype=np.float32)[i]) for i in range(4)]})
    si = ScoringIndex.build(table, 100)
    vectors = spark.createDataFrame([("U1", [0.0, 0.0, 1.0, 0.0])], "user_id string, vector array<float>")
    ranks = {(r.user_id, r.alpha): r.target_rank
             for r in reranked_ranks(spark, targets, ev, vectors, si, (0.0, 1.0)).collect()}
    assert ranks == {("U1", 1.0): 1, ("U1", 0.0): 2, ("U2", 1.0): None, ("U2", 0.0): None}


@pytest.mark.spark
def test_blocked_evaluation_ranks_equal_the_broadcast_ones(spark, tmp_path):
    # 30 items × 1-3 personas, 40 users with 12 candidates each (one item the index lacks), a
    # user without a vector: item blocks (7 of them) must rank every held-out item where the
    # broadcast index does, for every α
    rng = np.random.default_rng(3)
    d, items = 8, [f"I{i}" for i in range(30)]
    rows = [(it, f"{it}#{p}", p, "n", "x", "y", (v / np.linalg.norm(v)).astype(np.float32).tolist())
            for it in items for p in range(1 + items.index(it) % 3) for v in [rng.normal(size=d)]]
    schema = ("item_id string, persona_id string, persona_index int, name string, description string, "
              "preference_rationale string, embedding array<float>")
    index = spark.createDataFrame(rows, schema)
    cand_rows, target_rows = [], []
    for u in range(40):
        picks = rng.choice(len(items), size=11, replace=False)
        names = [items[i] for i in picks] + ["I_unindexed"]
        cand_rows += [(f"U{u}", it, float(12 - r), r + 1, it == names[u % 12]) for r, it in enumerate(names)]
        target_rows.append((f"U{u}", names[u % 12]))
    cands = spark.createDataFrame(cand_rows, "user_id string, item_id string, cf_score double, cf_rank int, "
                                             "is_target boolean")
    targets = spark.createDataFrame(target_rows, "user_id string, item_id string")
    vectors = spark.createDataFrame([(f"U{u}", (rng.normal(size=d) / 3).astype(np.float32).tolist())
                                     for u in range(1, 40)], "user_id string, vector array<float>")
    alphas = (0.0, 0.5, 1.0)
    si = ScoringIndex.build(index.toArrow(), 100)
    broadcast = {(r.user_id, r.alpha): r.target_rank
                 for r in reranked_ranks(spark, targets, cands, vectors, si, alphas).collect()}
    prepared = prepare(index, 7, "float32", 100, str(tmp_path / "layout"), texts=False)
    assert prepared.blocks == 7 and not (tmp_path / "layout" / "explanations").exists()
    blocked = {(r.user_id, r.alpha): r.target_rank
               for r in reranked_ranks(spark, targets, cands, vectors, prepared, alphas).collect()}
    assert len(broadcast) == 120 and blocked == broadcast
    assert broadcast[("U11", 1.0)] is not None and len({broadcast[(f"U{u}", 1.0)] for u in range(40)}) > 3


@pytest.mark.spark
def test_persona_centroids_are_the_normalised_mean_of_their_clusters_reviews(spark):
    from persona4rec.evaluation.job import persona_centroids

    reviews = spark.createDataFrame([("U1", "I1", [3.0, 0.0]), ("U2", "I1", [0.0, 1.0]), ("U3", "I1", [1.0, 1.0]),
                                     ("U4", "I2", [0.0, 2.0])], "user_id string, item_id string, embedding array<float>")
    clusters = spark.createDataFrame([("U1", "I1", "I1#0"), ("U2", "I1", "I1#0"), ("U3", "I1", "I1#1"),
                                      ("U9", "I3", "I3#0")], "user_id string, item_id string, persona_id string")
    got = {r.persona_id: r.centroid for r in persona_centroids(reviews, clusters).collect()}
    assert set(got) == {"I1#0", "I1#1"}  # U4's review is in no cluster, I3#0 has no embedded review
    assert got["I1#0"] == pytest.approx([0.9486833, 0.3162278]) and got["I1#1"] == pytest.approx([0.7071068] * 2)


@pytest.mark.spark
@pytest.mark.integration
def test_evaluate_job_writes_every_variant_to_delta_and_mlflow_and_tags_the_alpha(spark, extractive_run):
    import mlflow

    from persona4rec.tables import TableStore
    from persona4rec.training.registry import CHAMPION, blend_alpha, setup_mlflow

    _, cfg, results = extractive_run
    summary = results["evaluate"]
    store = TableStore(spark, cfg)
    m = store.read("evaluation_metrics").filter(F.col("run_id") == summary["run_id"])
    variants = {r[0] for r in m.select("variant").distinct().collect()}
    assert variants == {"generator", "vanilla", "finetuned", "finetuned_blend", "summary_only",
                        "personas_1", "personas_3", "personas_5", "personas_7",
                        "vanilla_centroid", "vanilla_review_history", "vanilla_reviews"}
    assert {r[0] for r in m.select("scenario").distinct().collect()} >= {"all", "warm_users", "cold_users"}
    test_users = store.read("splits").filter("split = 'test'").count()
    assert m.filter("split = 'test' AND scenario = 'all'").agg(F.min("users"), F.max("users")).first() == (
        test_users, test_users)  # every user counts (a missing target is a miss, not a drop)
    # The per-user ranks reproduce the stored metrics with the plain-Python reference.
    ranks = store.read("evaluation_ranks").filter(
        (F.col("run_id") == summary["run_id"]) & (F.col("split") == "test") & (F.col("generator") == "bpr")
        & (F.col("variant") == "finetuned")).select("target_rank").collect()
    ref = metrics.summarise([r[0] for r in ranks], KS)
    row = m.filter("split = 'test' AND generator = 'bpr' AND variant = 'finetuned' AND scenario = 'all' "
                   "AND k = 10").first()
    assert row.ndcg == pytest.approx(ref["ndcg@10"], abs=1e-12) and row.hr == pytest.approx(ref["hr@10"], abs=1e-12)
    # The representation variants measure something: centroids and review histories move the ranks.
    of = lambda variant: {r.user_id: r.target_rank for r in store.read("evaluation_ranks").filter(
        (F.col("run_id") == summary["run_id"]) & (F.col("variant") == variant) & (F.col("split") == "test")
        & (F.col("generator") == "bpr")).collect()}
    assert of("vanilla_centroid") != of("vanilla") and of("vanilla_review_history") != of("vanilla")
    assert of("vanilla_reviews").keys() == of("vanilla").keys()
    client = setup_mlflow(cfg)
    run = client.get_run(summary["run_id"])
    assert "test.bpr.finetuned.ndcg_10" in run.data.metrics and "alpha_bpr" in run.data.params
    assert any(a.path == "ndcg10_test.png" for a in client.list_artifacts(summary["run_id"]))
    champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, CHAMPION).version
    assert blend_alpha(cfg, str(champion), "bpr") == summary["alpha"]["bpr"]
    assert 0.0 <= summary["alpha"]["bpr"] <= 1.0 and mlflow.get_tracking_uri() == cfg.tracking_uri()
