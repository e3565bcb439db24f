"""The whole pipeline on the shipped sample (LLM = a local scripted OpenAI-compatible server)."""

import re

import pytest
from pyspark.sql import functions as F

from conftest import make_config
from persona4rec import pipeline
from persona4rec.llm.fake_server import FakeLLMServer, schema_name, schema_responder
from persona4rec.tables import TableStore
from persona4rec.training.registry import registry_version
from test_explain import ATTACKS, LINKISH

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]


def obedient_responder(body: dict) -> dict:
    """Valid replies, except that every persona carries links, addresses and numbers in its name,
    description and rationale: what an LLM that obeyed injected review text would write."""
    reply = schema_responder(body)
    if schema_name(body) == "ItemPersonas":
        tag = reply["personas"][0]["name"].split()[-1]
        n = int(tag, 16)
        for i, p in enumerate(reply["personas"]):
            attack = ATTACKS[(n + i) % len(ATTACKS)]
            p["name"] = f"{p['name']} {attack}"[:50]
            p["description"] = f"{p['description']} {ATTACKS[(n + i + 7) % len(ATTACKS)]}"[:200]
            p["preference_rationale"] = f"Visit {attack} now. {p['preference_rationale']}"[:200]
    return reply


def test_pipeline_on_the_sample_recommends_candidates_with_persona_explanations(spark, tmp_path, capsys):
    with FakeLLMServer(obedient_responder) as srv:
        cfg = make_config(tmp_path, "llm.provider=openai", f"llm.base_url={srv.base_url}",
                          "llm.requests_per_minute=100000", "llm.concurrency_per_task=4",
                          f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                          f"mlflow.artifact_root={tmp_path / 'mlruns'}", "train.epochs=1",
                          "scoring.run_date=2026-11-25", "candidates.generators=[als,bpr]")
        results = pipeline.run(spark, cfg)
    assert results["promote_model"]["promoted"]
    assert registry_version(results["build_index"]["model_version"]) == results["train_encoder"]["model_version"]
    store = TableStore(spark, cfg)
    recs = store.read("recommendations")
    assert results["score_users"]["mode"] == "production"
    k = cfg.scoring.top_k
    customers = store.read("reviews").select("user_id").distinct()
    per_user = recs.filter("has_history").groupBy("user_id").count()
    assert per_user.filter(F.col("count") != k).count() == 0
    assert customers.join(per_user, "user_id", "left_anti").count() == 0  # every customer, k-core or not
    assert customers.count() == 33 and store.read("splits").select("user_id").distinct().count() == 28
    assert recs.join(store.read("reviews"), ["user_id", "item_id"], "left_semi").count() == 0  # nothing seen
    cands = store.read("candidates").filter("mode = 'production' AND generator = 'bpr'")
    assert recs.join(cands, ["user_id", "item_id"], "left_anti").count() == 0
    personas = store.read("item_personas").select("persona_id", "item_id")
    named = recs.filter("has_history")
    assert named.join(personas, ["persona_id", "item_id"], "left_anti").count() == 0
    # The hostile persona text reached the index, and not one link reached an e-mail.
    hostile = [r for r in store.read("item_personas").filter("source = 'llm'").collect()
               if LINKISH.search(f"{r.name} {r.description} {r.preference_rationale}")]
    assert hostile
    shown = recs.select("persona_name", "explanation").collect()
    assert not [r for r in shown if LINKISH.search(f"{r.persona_name or ''} {r.explanation}")]
    out = capsys.readouterr().out
    assert "A few recommendations:" in out and "recommendations" in out
    assert re.search(r"llm personas for \d+ of 30 items", out) and "Stage times: ingest" in out
    assert "(no title)" not in out and re.search(r"[A-Za-z]\* · ", out)  # derived display names, marked
