"""Throughput of the LLM stage through Spark against a local server with a fixed per-call delay.

    .venv/bin/python benchmarks/llm_stage.py [--reviews 1000] [--delay 0.2] [--concurrency 8]

Runs the real `extract_aspects` stage (request building, cache anti-join, mapInPandas with a
thread pool per task, journal, MERGE) on synthetic reviews against the scripted OpenAI-compatible
server, then runs it again. The ideal rate is total concurrency / delay, where total concurrency
= Spark tasks at once × llm.concurrency_per_task. `achieved_calls_per_s` counts calls over the
span in which the server saw them; `stage_calls_per_s` over the whole stage (Spark overheads
included). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from persona4rec.cli import setup_logging
from persona4rec.config import load_config
from persona4rec.ingest import job as ingest
from persona4rec.llm.fake_server import FakeLLMServer, schema_responder
from persona4rec.offline import aspects, summarise
from persona4rec.spark import get_spark


def synthetic_reviews(path: Path, n: int, items: int) -> None:
    words = "sound tone strings sturdy cheap gift beginner stage studio warm bright loud quiet".split()
    with path.open("w") as fh:
        for i in range(n):
            text = " ".join(words[(i * 7 + k) % len(words)] for k in range(40))
            fh.write(json.dumps({"reviewerID": f"U{i % (n // 4)}", "asin": f"I{i % items}", "overall": 1 + i % 5,
                                 "unixReviewTime": 1_300_000_000 + i, "reviewText": text, "summary": "s"}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reviews", type=int, default=1000)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "reviews.jsonl"
        synthetic_reviews(src, args.reviews, args.items)
        with FakeLLMServer(schema_responder, delay_s=args.delay) as srv:
            cfg = load_config(None, [
                f"storage.root={tmp}/warehouse", "ingest.format=amazon2014", f"ingest.reviews_path={src}",
                "ingest.items_path=null", "split.kcore=1", "offline.evaluation_mode=false",
                "llm.provider=openai", f"llm.base_url={srv.base_url}", "llm.requests_per_minute=1000000",
                "llm.tokens_per_minute=1000000000",
                f"llm.concurrency_per_task={args.concurrency}", "llm.progress_interval_s=5"])
            spark = get_spark(cfg)
            ingest.run(spark, cfg)
            summarise.run(spark, cfg)
            before = len(srv.log.requests)
            started = time.perf_counter()
            first = aspects.run(spark, cfg)["llm"]
            stage_s = time.perf_counter() - started
            times = [t for t, _ in srv.log.requests[before:]]
            span = (max(times) - min(times)) + args.delay
            after_first = len(srv.log.requests)
            aspects.run(spark, cfg)
            rerun_new_calls = len(srv.log.requests) - after_first
            tasks = spark.sparkContext.defaultParallelism
            spark.stop()
    ideal = tasks * args.concurrency / args.delay
    achieved = first["called"] / span
    print(json.dumps({"bench": "llm_stage", "calls": first["called"],
                      "achieved_calls_per_s": round(achieved, 2), "ideal_calls_per_s": round(ideal, 2),
                      "ratio": round(achieved / ideal, 3), "stage_calls_per_s": round(first["called"] / stage_s, 2),
                      "rerun_new_calls": rerun_new_calls, "tasks": tasks,
                      "concurrency_per_task": args.concurrency, "delay_s": args.delay}))


if __name__ == "__main__":
    main()
