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
from pyspark.sql import functions as F

from persona4rec.alignment import align
from persona4rec.config import Config
from persona4rec.display import shown
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
    # the rerank objective trains and is promoted on the generator's candidates
    ("generate_candidates", candidates.run, False),
    ("train_encoder", train_encoder.run, False),
    ("promote_model", promote_model.run, False),
    ("build_index", index.run, False),
    ("score_users", score.run, False),
]
TABLES = ("reviews", "items", "splits", "rejected_records", "item_summaries", "review_aspects",
          "item_personas", "review_clusters", "alignment_pairs", "llm_calls", "persona_index",
          "interaction_embeddings", "text_embeddings", "user_vectors", "candidates", "recommendations")


def run(spark: SparkSession, cfg: Config) -> dict:
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    # The extractive persona builder needs no LLM: no server is started.
    opened = llm_endpoint(cfg) if cfg.offline.persona_builder != "extractive" else contextlib.nullcontext(None)
    with opened as endpoint:
        for name, stage, uses_llm in STAGES:
            started = time.time()
            log.info("stage %s: starting", name)
            out = stage(spark, cfg, endpoint) if uses_llm else stage(spark, cfg)
            results[name] = out.as_dict() if hasattr(out, "as_dict") else out
            seconds[name] = round(time.time() - started, 1)
            log.info("stage %s: done in %.1f s", name, seconds[name])
    results["seconds"] = seconds
    show_outputs(spark, cfg, seconds)
    return results


def _names(store: TableStore, item_ids: list[str]) -> dict[str, str]:
    """Display names (persona4rec/display.py) of the few items printed."""
    items = store.read("items").filter(F.col("item_id").isin(*item_ids)) \
        .select("item_id", "title", "description", "brand", "categories").collect()
    return {r.item_id: shown(r.asDict()) for r in items}


def show_outputs(spark: SparkSession, cfg: Config, seconds: dict[str, float] | None = None) -> None:
    store = TableStore(spark, cfg)
    print("\nOutputs (Delta tables):")
    for name in TABLES:
        if store.exists(name):
            print(f"  {name:<22} {store.read(name).count():>7} rows  {store.location(name)}")
    if store.exists("item_personas"):
        personas = store.read("item_personas")
        built = "extractive" if cfg.offline.persona_builder == "extractive" else "llm"
        n_items = store.read("items").count()
        n_built = personas.filter(F.col("source") == built).select("item_id").distinct().count()
        print(f"\nPersonas ({cfg.offline.persona_builder} builder): {built} personas for {n_built} of {n_items} "
              f"items; the others have the summary-only persona")
        rows = (personas.filter(F.col("source") == built).orderBy("item_id", "persona_index").limit(6).collect()
                or personas.orderBy("item_id", "persona_index").limit(6).collect())
        names = _names(store, sorted({r.item_id for r in rows}))
        for r in rows:
            print(f"  {names.get(r.item_id, r.item_id)} · {r.name} ({r.pool_size} reviews): {r.description[:110]}")
    if store.exists("recommendations"):
        print("\nA few recommendations:")
        recs = store.read("recommendations").orderBy("user_id", "rank").limit(6).collect()
        names = _names(store, sorted({r.item_id for r in recs}))
        for r in recs:
            print(f"  {r.user_id} #{r['rank']}: {names.get(r.item_id, r.item_id)} — {r.explanation}")
    print("\n(* name derived from the item's metadata: the catalogue has no readable title)")
    if seconds:
        total = sum(seconds.values())
        print("\nStage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
              + f"; total {total / 60:.1f} min")
    print(f"\nMLflow: {cfg.tracking_uri()} (mlflow ui --backend-store-uri {cfg.tracking_uri()})")
