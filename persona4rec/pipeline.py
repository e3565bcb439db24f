"""The whole pipeline in stage order, for the local demo and for one-shot runs.

Each stage is also its own job under `jobs/`; this module only sequences their `run` functions
over one Spark session and one config, then shows where the outputs are.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

from pyspark.sql import SparkSession

from persona4rec.alignment import align
from persona4rec.config import Config
from persona4rec.ingest import job as ingest
from persona4rec.llm.embedded import llm_endpoint
from persona4rec.offline import aspects, personas, summarise
from persona4rec.scoring import candidates, index, score
from persona4rec.tables import TableStore
from persona4rec.training import job as train_encoder
from persona4rec.training import promote as promote_model

log = logging.getLogger(__name__)

# Stages that call the LLM share one endpoint (one embedded server for the whole run).
STAGES: list[tuple[str, Callable[..., Any], bool]] = [
    ("ingest", ingest.run, False),
    ("summarise_items", summarise.run, True),
    ("extract_aspects", aspects.run, True),
    ("build_personas", personas.run, True),
    ("align", align.run, True),
    ("train_encoder", train_encoder.run, False),
    ("promote_model", promote_model.run, False),
    ("build_index", index.run, False),
    ("generate_candidates", candidates.run, False),
    ("score_users", score.run, False),
]
TABLES = ("reviews", "items", "splits", "rejected_records", "item_summaries", "review_aspects",
          "item_personas", "review_clusters", "alignment_pairs", "llm_calls", "persona_index",
          "interaction_embeddings", "user_vectors", "candidates", "recommendations")


def run(spark: SparkSession, cfg: Config) -> dict:
    results: dict[str, Any] = {}
    # The extractive persona builder needs no LLM: no server is started.
    opened = llm_endpoint(cfg) if cfg.offline.persona_builder == "llm" else contextlib.nullcontext(None)
    with opened as endpoint:
        for name, stage, uses_llm in STAGES:
            started = time.time()
            log.info("stage %s: starting", name)
            out = stage(spark, cfg, endpoint) if uses_llm else stage(spark, cfg)
            results[name] = out.as_dict() if hasattr(out, "as_dict") else out
            log.info("stage %s: done in %.1f s", name, time.time() - started)
    show_outputs(spark, cfg)
    return results


def show_outputs(spark: SparkSession, cfg: Config) -> None:
    store = TableStore(spark, cfg)
    print("\nOutputs (Delta tables):")
    for name in TABLES:
        if store.exists(name):
            print(f"  {name:<18} {store.read(name).count():>7} rows  {store.location(name)}")
    if store.exists("item_personas"):
        print("\nA few personas:")
        rows = (store.read("item_personas").join(store.read("items").select("item_id", "title"), "item_id")
                .orderBy("item_id", "persona_index").limit(4).collect())
        for r in rows:
            print(f"  {r.item_id} ({r.title or 'no title'}) · {r.name}: {r.description[:120]}")
    if store.exists("recommendations"):
        print("\nA few recommendations:")
        recs = (store.read("recommendations").join(store.read("items").select("item_id", "title"), "item_id", "left")
                .orderBy("user_id", "rank").limit(6).collect())
        for r in recs:
            print(f"  {r.user_id} #{r['rank']}: {r.item_id} ({r.title or 'no title'}) — {r.explanation}")
    print(f"\nMLflow: {cfg.tracking_uri()} (mlflow ui --backend-store-uri {cfg.tracking_uri()})")
