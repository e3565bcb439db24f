"""Production mode (the nightly e-mails) end to end on a small catalogue built to have every case:
core users, a core user with an interaction outside the k-core, and users with 1-4 interactions.

ingest → summaries, personas (extractive, no LLM) → build_index → generate_candidates →
score_users, as the bundle's scoring job runs them, then evaluation mode beside it and the
failures that must stop a nightly run.
"""

import dataclasses

import numpy as np
import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from conftest import make_config, write_lines
from persona4rec.alignment.profiles import stored_interaction_texts
from persona4rec.errors import InputError
from persona4rec.ingest import job as ingest
from persona4rec.offline import personas, summarise
from persona4rec.schemas import INTERACTION_EMBEDDINGS, PERSONA_INDEX, TEST, TEXT_EMBEDDINGS, TRAIN, VALIDATION
from persona4rec.scoring import candidates, embedding, index, score
from persona4rec.scoring import personas as personas_mod
from persona4rec.tables import TableStore

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]

TOPICS = ["cooking and recipes", "gardening tips", "woodworking plans", "travel stories", "jazz records",
          "chess problems", "bird watching", "home decorating", "running routines", "photography gear",
          "knitting patterns", "science news", "local history", "camping trips"]
CORE_USERS, CORE_ITEMS = 10, 12
LIGHT = {"L1": [0], "L2": [1, 2], "L3": [3, 4, 5], "L4": [6, 7, 12]}  # 1-4 interactions each


def review(user, item, ts):
    return {"reviewerID": user, "asin": f"I{item:02d}", "overall": 4.0 + (item % 2), "unixReviewTime": ts,
            "reviewText": f"I read it for the {TOPICS[item]}; every issue has more {TOPICS[item]} than the last.",
            "summary": TOPICS[item]}


def catalogue(tmp_path):
    """10 core users each review 7 of 12 items (every item gets >= 5 of them: a 5-core of all);
    C0 also reviews I13 (nobody else does: outside the core); L1-L4 have 1-4 reviews."""
    t0, lines = 1_500_000_000, []
    for u in range(CORE_USERS):
        for j in range(7):
            lines.append(review(f"C{u}", (u + j) % CORE_ITEMS, t0 + 1000 * u + 10 * j))
    lines.append(review("C0", 13, t0 - 100))  # first in C0's history, outside the k-core
    for user, items in LIGHT.items():
        lines += [review(user, i, t0 + 50_000 + n) for n, i in enumerate(items)]
    meta = [{"asin": f"I{i:02d}", "title": f"{TOPICS[i].title()} Monthly", "category": ["Magazines"],
             "description": [f"A magazine about {TOPICS[i]}."]} for i in range(len(TOPICS))]
    return write_lines(tmp_path / "in" / "reviews.jsonl", lines), write_lines(tmp_path / "in" / "meta.jsonl", meta)


@pytest.fixture(scope="module")
def nightly(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("production")
    reviews, meta = catalogue(tmp)
    cfg = make_config(tmp, f"ingest.reviews_path={reviews}", f"ingest.items_path={meta}",
                      "offline.persona_builder=extractive", "candidates.generators=[bpr]", "candidates.top_n=5",
                      "scoring.top_k=3", "scoring.run_date=2026-11-26",
                      f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", f"mlflow.artifact_root={tmp / 'mlruns'}")
    assert cfg.mode == "production"  # the default
    ingest.run(spark, cfg)
    summarise.run(spark, cfg)
    personas.run(spark, cfg)
    built = index.run(spark, cfg)
    cands = candidates.run(spark, cfg)
    scored = score.run(spark, cfg)
    return cfg, TableStore(spark, cfg), {"index": built, "candidates": cands, "score": scored}


def production_recs(store):
    return store.read("recommendations").filter("mode = 'production' AND run_date = '2026-11-26'")


def test_every_customer_gets_recommendations_and_never_what_they_interacted_with(spark, nightly):
    cfg, store, out = nightly
    splits = {r.split: r.item_id for r in store.read("splits").filter("user_id = 'C0'").collect()
              if r.split != TRAIN}
    assert set(splits) == {VALIDATION, TEST}
    assert store.read("splits").filter("item_id = 'I13'").count() == 0  # I13 is outside the k-core
    recs = production_recs(store)
    reviews = store.read("reviews")
    everyone = reviews.select("user_id").distinct()
    assert everyone.count() == CORE_USERS + len(LIGHT)
    per_user = recs.groupBy("user_id").count()
    assert_df_equality(per_user.select("user_id"), everyone, ignore_row_order=True, ignore_nullable=True)
    assert per_user.filter(F.col("count") != cfg.scoring.top_k).count() == 0
    # Nothing anyone ever reviewed comes back: train, validation, test and outside-the-core alike.
    assert recs.join(reviews, ["user_id", "item_id"], "left_semi").count() == 0
    c0 = {r.item_id for r in reviews.filter("user_id = 'C0'").collect()}
    assert {"I13", splits[VALIDATION], splits[TEST]} <= c0
    assert not c0 & {r.item_id for r in recs.filter("user_id = 'C0'").collect()}
    # Users with 1-4 interactions are scored from the history they have.
    light = recs.filter(F.col("user_id").isin(*LIGHT)).collect()
    assert {r.user_id for r in light} == set(LIGHT) and all(r.has_history and r.persona_id for r in light)
    assert {r.path for r in recs.collect()} == {"cf"}  # BPR trained on every review has factors for all
    assert out["score"]["mode"] == "production" and out["score"]["users_by_path"] == {"cf": 14}
    assert out["candidates"]["bpr"]["users"] == {"cf": 14}


def test_production_history_is_every_kept_review(spark, nightly):
    cfg, store, _ = nightly
    emb = store.read("interaction_embeddings")
    assert emb.filter("user_id = 'C0' AND item_id = 'I13'").first().split == "outside_core"
    assert emb.count() == store.read("reviews").count()
    vectors = {r.user_id: r for r in store.read("user_vectors").collect()}
    assert vectors["C0"].n_history == 8 and vectors["C0"].history_splits == "all"
    assert vectors["L1"].n_history == 1 and vectors["L4"].n_history == 3
    # seq orders all of a user's reviews; within the k-core it is the splits' order.
    c0 = emb.filter("user_id = 'C0'").orderBy("seq").collect()
    assert [r.seq for r in c0] == list(range(1, 9)) and c0[0].item_id == "I13"
    core = [r.item_id for r in store.read("splits").filter("user_id = 'C0'").orderBy("seq").collect()]
    assert [r.item_id for r in c0 if r.split != "outside_core"] == core


def test_changing_k_or_gamma_recomputes_every_vector(spark, nightly):
    # (An unchanged rerun recomputes none: tests/test_scoring.py.)
    cfg, store, _ = nightly
    shorter = dataclasses.replace(cfg, profile=dataclasses.replace(cfg.profile, k=2))
    assert score.run(spark, shorter)["user_vectors_recomputed"] == CORE_USERS + len(LIGHT)
    assert {(r.k, r.gamma) for r in store.read("user_vectors").collect()} == {(2, cfg.profile.gamma)}
    decayed = dataclasses.replace(shorter, profile=dataclasses.replace(shorter.profile, gamma=0.5))
    assert score.run(spark, decayed)["user_vectors_recomputed"] == CORE_USERS + len(LIGHT)


def test_evaluation_mode_keeps_leave_one_out_beside_production(spark, nightly):
    cfg, store, _ = nightly
    before = production_recs(store).collect()
    evaluation = dataclasses.replace(cfg, mode="evaluation")
    candidates.run(spark, evaluation)
    out = score.run(spark, evaluation)
    assert out["mode"] == "evaluation"
    ev = store.read("candidates").filter("mode = 'evaluation'")
    train = store.read("splits").filter(F.col("split") == TRAIN)
    assert_df_equality(ev.select("user_id").distinct(), train.select("user_id").distinct(), ignore_row_order=True,
                       ignore_nullable=True)  # the core users only
    assert ev.join(train, ["user_id", "item_id"], "left_semi").count() == 0
    # ... and held-out items are eligible again, as leave-one-out needs.
    held = store.read("splits").filter(F.col("split") != TRAIN)
    assert ev.join(held, ["user_id", "item_id"], "left_semi").count() > 0
    assert sorted(production_recs(store).collect()) == sorted(before)  # the e-mails are untouched
    assert store.read("candidates").filter("mode = 'production'").select("user_id").distinct().count() == 14


def test_the_index_encodes_each_text_once_and_a_rerun_encodes_none(spark, nightly):
    """Every text build_index needs (persona texts, centroid members, window interactions) is
    looked up in text_embeddings by its hash: the index equals the one computed by encoding
    directly, a rerun encodes nothing and commits no table version, and another model version
    re-encodes every text (and leaves no row of the old one)."""
    cfg, store, out = nightly
    ref = embedding.resolve_encoder(cfg)
    assert ref.version == out["index"]["model_version"]
    n = store.read(TEXT_EMBEDDINGS.name).count()
    needed = personas_mod.persona_texts(store, cfg).unionByName(
        store.read(INTERACTION_EMBEDDINGS.name).join(stored_interaction_texts(store, cfg), ["user_id", "item_id"])
        .select("text"))
    assert n == needed.distinct().count() == out["index"]["texts_embedded"]
    # members are interactions the windows read too: fewer texts encoded than rows that use them
    uses = store.read(PERSONA_INDEX.name).count() + store.read(INTERACTION_EMBEDDINGS.name).count() + \
        personas_mod.persona_members(store, cfg).count()
    assert n < uses
    direct = {r.persona_id: np.array(r.embedding) for r in personas_mod.persona_vectors(store, cfg, ref).collect()}
    indexed = {r.persona_id: np.array(r.embedding) for r in store.read(PERSONA_INDEX.name).collect()}
    assert direct.keys() == indexed.keys()
    assert max(float(np.abs(direct[p] - indexed[p]).max()) for p in direct) < 1e-5
    versions = {t: store.version(t) for t in (TEXT_EMBEDDINGS.name, PERSONA_INDEX.name, INTERACTION_EMBEDDINGS.name)}
    again = index.run(spark, cfg)
    assert again["texts_embedded"] == 0
    assert {t: store.version(t) for t in versions} == versions
    # a night's new text is encoded alone, and a text no longer needed leaves the cache
    note = spark.createDataFrame([("A reader's note nobody else wrote.",)], "text string")
    assert index.cached_vectors(store, needed.unionByName(note), ref) == 1
    assert store.read(TEXT_EMBEDDINGS.name).count() == n + 1
    assert index.cached_vectors(store, needed, ref) == 0
    assert store.read(TEXT_EMBEDDINGS.name).count() == n
    other = dataclasses.replace(ref, version="0#othermodel")
    assert index.cached_vectors(store, needed, other) == n
    assert [r[0] for r in store.read(TEXT_EMBEDDINGS.name).select("model_version").distinct().collect()] == \
        ["0#othermodel"]
    assert index.run(spark, cfg)["texts_embedded"] == n  # back to this model: all again
    assert [r[0] for r in store.read(TEXT_EMBEDDINGS.name).select("model_version").distinct().collect()] == \
        [ref.version]


def test_missing_interaction_embeddings_fail_the_run_naming_the_model_version(spark, nightly):
    cfg, store, out = nightly
    version = out["index"]["model_version"]
    kept = store.read("interaction_embeddings").localCheckpoint()
    try:
        store.delete_keys(INTERACTION_EMBEDDINGS,
                          kept.filter(F.col("user_id").isin("L2", "C3")).select("user_id", "item_id"))
        with pytest.raises(InputError, match=rf"2 user\(s\) .* no user vector for model version {version}"):
            score.run(spark, cfg)
        store.delete_keys(INTERACTION_EMBEDDINGS,
                          kept.select("user_id", "item_id"))
        with pytest.raises(InputError, match=rf"interaction_embeddings has no rows of model version {version}"):
            score.run(spark, cfg)
    finally:
        store.upsert(kept, INTERACTION_EMBEDDINGS)
    assert score.run(spark, cfg)["users"] == 14


def test_alpha_auto_without_a_chosen_alpha_fails(spark, nightly):
    cfg, store, out = nightly
    auto = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, alpha="auto"))
    with pytest.raises(InputError, match=rf"model version {out['index']['model_version']} .* no α chosen for "
                                         r"generator bpr"):
        score.run(spark, auto)


def test_alpha_auto_refuses_an_index_written_before_model_keys(spark, nightly):
    """A bare registry number cannot be matched to this registry's model (numbers repeat when a
    registry is recreated): with `auto` the run stops before reading any α."""
    cfg, store, out = nightly
    auto = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, alpha="auto"))
    kept = store.read(PERSONA_INDEX.name).localCheckpoint()
    try:
        store.upsert(kept.withColumn("model_version", F.lit("1")), PERSONA_INDEX)
        with pytest.raises(InputError, match=r"model version '1' without its key .* rerun build_index"):
            score.run(spark, auto)
    finally:
        store.upsert(kept, PERSONA_INDEX)
    assert store.read(PERSONA_INDEX.name).select("model_version").distinct().collect()[0][0] == \
        out["index"]["model_version"]


def test_popular_fallback_gives_users_without_factors_the_most_popular_unseen_items(spark):
    rows = [("A", "x"), ("B", "x"), ("C", "x"), ("A", "y"), ("B", "y"), ("A", "z"), ("D", "w"), ("D", "x")]
    interactions = spark.createDataFrame(rows, "user_id string, item_id string")
    found = spark.createDataFrame([("A", "w", 1.0, 1), ("B", "z", 1.0, 1)],
                                  "user_id string, item_id string, cf_score double, cf_rank int")
    got = candidates.popular_fallback(found, interactions, 2)
    want = spark.createDataFrame([("C", "y", 2.0, 1), ("C", "w", 1.0, 2), ("D", "y", 2.0, 1), ("D", "z", 1.0, 2)],
                                 "user_id string, item_id string, cf_score double, cf_rank int")
    assert_df_equality(got, want, ignore_row_order=True, ignore_nullable=True)
