"""The whole pipeline in stage order, for the local demo and for one-shot runs.

Each stage is also its own job under `jobs/`; this module only sequences their `run` functions
over one Spark session and one config, then shows where the outputs are.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pyspark.sql import SparkSession

from persona4rec.config import Config
from persona4rec.ingest import job as ingest
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)

Stage = tuple[str, Callable[[SparkSession, Config], Any]]

STAGES: list[Stage] = [
    ("ingest", ingest.run),
]


def run(spark: SparkSession, cfg: Config) -> dict:
    results: dict[str, Any] = {}
    for name, stage in STAGES:
        started = time.time()
        log.info("stage %s: starting", name)
        out = stage(spark, cfg)
        results[name] = out.as_dict() if hasattr(out, "as_dict") else out
        log.info("stage %s: done in %.1f s", name, time.time() - started)
    show_outputs(spark, cfg)
    return results


def show_outputs(spark: SparkSession, cfg: Config) -> None:
    store = TableStore(spark, cfg)
    print("\nOutputs (Delta tables):")
    for name in ("reviews", "items", "splits", "rejected_records"):
        if store.exists(name):
            print(f"  {name:<18} {store.read(name).count():>7} rows  {store.location(name)}")
