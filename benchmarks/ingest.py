"""Ingest throughput on the Musical Instruments 5-core set (10,261 reviews).

    .venv/bin/python benchmarks/ingest.py [--reviews PATH] [--format amazon2014]

Runs the real ingest job (parse, validate, dedupe, MERGE four Delta tables, k-core, split) into a
temporary warehouse on a fresh local Spark session; the time excludes session start. Ends with one
JSON line: {"bench": "ingest", "rows": ..., "seconds": ..., "rows_per_s": ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from persona4rec.cli import setup_logging
from persona4rec.config import PROJECT_ROOT, load_config
from persona4rec.ingest import job as ingest
from persona4rec.spark import get_spark

DEFAULT = PROJECT_ROOT.parent / "shared/data/amazon2014_musical_instruments_5/reviews_Musical_Instruments_5.json.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reviews", default=str(DEFAULT))
    ap.add_argument("--items", default=None)
    ap.add_argument("--format", default="amazon2014")
    args = ap.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"storage.root={Path(tmp) / 'warehouse'}", f"ingest.format={args.format}",
                                 f"ingest.reviews_path={args.reviews}",
                                 f"ingest.items_path={args.items or 'null'}"])
        spark = get_spark(cfg)
        started = time.perf_counter()
        report = ingest.run(spark, cfg)
        seconds = time.perf_counter() - started
        spark.stop()
    rows = report.reviews.read + report.items.read
    print(json.dumps({"bench": "ingest", "rows": rows, "seconds": round(seconds, 2),
                      "rows_per_s": round(rows / seconds, 1),
                      "kept": report.reviews.kept, "rejected": report.reviews.rejected,
                      "duplicates": report.reviews.duplicates, "core_interactions": report.core_interactions}))


if __name__ == "__main__":
    main()
