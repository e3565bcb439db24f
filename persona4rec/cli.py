"""Shared command line for every job: `--target`, `--conf-dir`, `--set key=value` (repeatable).

The same arguments work under `python jobs/x.py`, `spark-submit jobs/x.py` and a Databricks
`spark_python_task` (whose `parameters` are these flags).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Sequence

from pyspark.sql import SparkSession

from persona4rec.config import Config, ConfigError, load_config
from persona4rec.errors import BatchesPending, InputError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--target", default=None, help="config layer conf/<target>.yaml on top of base.yaml")
    p.add_argument("--conf-dir", default=None, help="folder with base.yaml (default: the project's conf/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set split.kcore=10 (repeatable)")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_job(description: str, run: Callable[[SparkSession, Config], Any],
            argv: Sequence[str] | None = None, preflight: Callable[[Config], Any] | None = None) -> Any:
    """Parse arguments, load config (failing fast on bad keys), start Spark, run, print a summary
    (with the master and shuffle partitions the run had). An InputError ends the job with its
    message on one line and exit status 1; `preflight(cfg)` checks inputs before Spark starts, so
    a wrong path fails in a second, not after the session start-up. LLM batches still open at
    the provider end the job with status 75 (retry later: the rerun resumes them)."""
    args = parser(description).parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.target, args.overrides, args.conf_dir)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        if preflight is not None:
            preflight(cfg)
        from persona4rec.spark import describe, get_spark

        spark = get_spark(cfg)
        result = run(spark, cfg)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except BatchesPending as exc:
        print(f"pending: {exc}", file=sys.stderr)
        raise SystemExit(BatchesPending.exit_status) from None
    summary = result.as_dict() if hasattr(result, "as_dict") else result
    if isinstance(summary, dict):
        summary = {**summary, "spark": describe(spark)}
    if summary is not None:
        print(json.dumps(summary, default=str))
    return result
