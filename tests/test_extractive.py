"""The LLM-free persona backend: clustering, persona rows and judge-free alignment on the sample."""

import numpy as np
import pytest
from pyspark.sql import functions as F

from conftest import make_config
from persona4rec.ingest import job as ingest
from persona4rec.offline import aspects, cluster, personas, summarise
from persona4rec.alignment import align
from persona4rec.tables import TableStore


def _blobs(sizes, d=16, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d))
    x = np.vstack([c + spread * rng.normal(size=(n, d)) for c, n in zip(centres, sizes)])
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.unit
def test_cluster_count_follows_the_data_and_keeps_a_real_minority():
    x, truth = _blobs([12, 9, 3])
    labels = cluster.choose_clusters(x, max_k=7, min_size=2, min_silhouette=0.05, seed=1)
    assert len(set(labels)) == 3
    for t in range(3):  # each true group is one cluster (labels are relabelled by size)
        assert len(set(labels[truth == t])) == 1
    one, _ = _blobs([20], seed=2, spread=0.3)
    assert len(set(cluster.choose_clusters(one, 7, 2, 0.3, seed=1))) == 1


@pytest.mark.unit
def test_clusters_under_the_minimum_size_are_merged_and_labels_are_deterministic():
    x, _ = _blobs([10, 8, 1])
    a = cluster.choose_clusters(x, 7, 2, 0.05, seed=5)
    b = cluster.choose_clusters(x, 7, 2, 0.05, seed=5)
    assert np.array_equal(a, b)
    assert min(np.bincount(a)) >= 2  # the lone review joined its nearest cluster


@pytest.mark.unit
def test_keywords_are_typical_of_the_cluster_and_not_repeated_plurals():
    words = cluster.keywords(["great strings, strings sound bright", "bright strings"],
                             ["great strings", "bright strings", "cheap case", "case broke", "case ok"])
    assert words[0] in ("strings", "bright") and len(set(w.rstrip("s") for w in words)) == len(words)


@pytest.mark.spark
@pytest.mark.integration
def test_extractive_builder_fills_the_llm_tables_without_any_llm(spark, tmp_path):
    cfg = make_config(tmp_path, "offline.persona_builder=extractive", "offline.max_personas=4",
                      "llm.base_url=http://127.0.0.1:9/v1", "llm.provider=openai")  # unreachable: must not be used
    ingest.run(spark, cfg)
    summarise.run(spark, cfg)
    assert aspects.run(spark, cfg) == {"skipped": "offline.persona_builder = extractive"}
    personas.run(spark, cfg)
    result = align.run(spark, cfg)
    store = TableStore(spark, cfg)
    items = store.read("items").select("item_id")
    ip = store.read("item_personas")
    counts = ip.groupBy("item_id").count()
    assert items.join(counts, "item_id", "left_anti").count() == 0  # every item has a persona
    assert counts.agg(F.max("count")).first()[0] <= 4
    assert ip.filter("source = 'extractive'").count() > 0 and ip.filter("status = 'succeeded'").count() == 0
    assert ip.filter(F.length("name") == 0).count() == 0 and ip.select("persona_id").distinct().count() == ip.count()
    # In evaluation mode no validation/test review reaches a persona cluster.
    held = store.read("splits").filter("split != 'train'")
    assert store.read("review_clusters").join(held, ["user_id", "item_id"]).count() == 0
    pairs = store.read("alignment_pairs")
    assert result["pairs"] == result["candidates"] > 0 and pairs.filter("status != 'cluster'").count() == 0
    # every pair names a persona of its own item, the one whose cluster holds the user's review
    assert pairs.join(ip.select("persona_id", "item_id"), ["persona_id", "item_id"], "left_anti").count() == 0
    assert pairs.join(store.read("review_clusters"), ["user_id", "item_id", "persona_id"], "left_anti").count() == 0
    # a rerun changes nothing
    personas.run(spark, cfg)
    again = align.run(spark, cfg)
    assert again["alignment_pairs"].get("numTargetRowsUpdated", 0) == 0 and again["pairs"] == result["pairs"]


def test_a_persona_quotes_only_liked_reviews():
    """The persona text is the e-mail's explanation: a critical voice is described, never quoted."""
    import pandas as pd

    from persona4rec.offline.extractive import item_personas
    from persona4rec.scoring.embedding import worker_model
    from persona4rec.training.encoder import resolve_model_name

    model = worker_model(resolve_model_name("packaged:all-MiniLM-L6-v2"), 128)
    liked = ["Quick weeknight recipes my whole family enjoys.", "Simple recipes, quick to cook after work.",
             "The recipes are quick and the kids like them."]
    hated = ["Far too many drug ads in every issue.", "The drug ads take up half the pages, awful.",
             "Nothing but drug ads now, cancelled."]
    rows = pd.DataFrame({"item_id": "I1", "user_id": [f"U{i}" for i in range(6)],
                         "rating": [5.0, 4.0, 5.0, 1.0, 1.0, 2.0], "review_text": liked + hated,
                         "helpful_votes": [0, 3, 1, 9, 8, 7]})
    personas = item_personas(rows, model, 3, 7)
    assert len(personas) == 2
    for p in personas:
        text = p["description"] + " " + p["preference_rationale"]
        assert not any(h.split(",")[0].rstrip(".") in text for h in hated), text
    critical = next(p for p in personas if "critical voice" in p["description"])
    praised = next(p for p in personas if p is not critical)
    assert '"' in praised["preference_rationale"] and '"' not in critical["preference_rationale"]
