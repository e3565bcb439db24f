"""The whole pipeline on the shipped sample (LLM = a local scripted OpenAI-compatible server)."""

import pytest
from pyspark.sql import functions as F

from conftest import make_config
from persona4rec import pipeline
from persona4rec.llm.fake_server import FakeLLMServer, schema_responder
from persona4rec.tables import TableStore

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]


def test_pipeline_on_the_sample_recommends_candidates_with_persona_explanations(spark, tmp_path, capsys):
    with FakeLLMServer(schema_responder) as srv:
        cfg = make_config(tmp_path, "llm.provider=openai", f"llm.base_url={srv.base_url}",
                          "llm.requests_per_minute=100000", "llm.concurrency_per_task=4",
                          f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                          f"mlflow.artifact_root={tmp_path / 'mlruns'}", "train.epochs=1",
                          "scoring.run_date=2026-11-25", "candidates.generators=[als,bpr]")
        results = pipeline.run(spark, cfg)
    assert results["promote_model"]["promoted"]
    assert results["build_index"]["model_version"] == results["train_encoder"]["model_version"]
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
    out = capsys.readouterr().out
    assert "A few recommendations:" in out and "recommendations" in out
