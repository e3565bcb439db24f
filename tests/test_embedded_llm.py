"""The embedded default for real: the project's own llama.cpp server with the packaged GGUF, the
real `openai` client over HTTP, the real Spark stages. Small input, because the model is slow."""

import json

import pytest
from pyspark.sql import functions as F

from conftest import ROOT, make_config
from persona4rec.ingest import job as ingest
from persona4rec.llm.embedded import EmbeddedServer, llm_endpoint
from persona4rec.offline import aspects, personas, summarise
from persona4rec.tables import TableStore

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]


def small_sample(tmp_path, items=2, per_item=3):
    """The first reviews of the first items of the shipped sample (real text, real metadata)."""
    lines = (ROOT / "data" / "sample" / "reviews.jsonl").read_text().splitlines()
    chosen, counts = [], {}
    for line in lines:
        asin = json.loads(line)["asin"]
        if (asin in counts or len(counts) < items) and counts.get(asin, 0) < per_item:
            counts[asin] = counts.get(asin, 0) + 1
            chosen.append(line)
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(chosen) + "\n")
    return path


def test_offline_stages_with_the_embedded_model(spark, tmp_path):
    cfg = make_config(tmp_path, f"ingest.reviews_path={small_sample(tmp_path)}", "ingest.items_path=null",
                      "split.kcore=1",
                      "offline.evaluation_mode=false", "llm.progress_interval_s=5")
    ingest.run(spark, cfg)
    with llm_endpoint(cfg) as endpoint:
        assert endpoint.base_url.startswith("http://127.0.0.1:")
        first = [st.run(spark, cfg, endpoint) for st in (summarise, aspects, personas)]
        second = [st.run(spark, cfg, endpoint) for st in (summarise, aspects, personas)]
    # A rerun calls again only what failed (the 135M model fails some persona replies);
    # nothing that succeeded is paid twice.
    assert [r["llm"]["called"] for r in second] == [r["llm"]["failed"] for r in first], (first, second)
    assert first[0]["llm"]["succeeded"] == 2  # constrained decoding makes summaries reliable
    store = TableStore(spark, cfg)
    assert store.read("item_summaries").filter("source = 'llm'").count() == 2
    assert store.read("review_aspects").count() == 6
    per_item = store.read("item_personas").groupBy("item_id").count().collect()
    assert len(per_item) == 2 and all(1 <= r["count"] <= cfg.offline.max_personas for r in per_item)
    calls = store.read("llm_calls")
    assert calls.count() == calls.select("key").distinct().count()
    assert calls.filter(F.col("model") == "smollm2-135m-instruct").count() == calls.count()


def test_embedded_server_reports_a_bad_model_path(tmp_path):
    from persona4rec.config import load_config

    bad = load_config(None, [f"llm.embedded.model_path={tmp_path / 'missing.gguf'}"]).llm.embedded
    with pytest.raises(FileNotFoundError, match="llm.embedded.model_path"):
        EmbeddedServer(bad)
