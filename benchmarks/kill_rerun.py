"""Crash safety of an LLM stage: `extract_aspects` SIGKILLed at random moments, then rerun to the end.

    .venv/bin/python benchmarks/kill_rerun.py [--kills 10] [--seed 7] [--reviews 400] [REVIEWS]

A slice of a shared review set (default: the first 400 reviews of Musical Instruments, no metadata
needed) is ingested; the real `jobs/extract_aspects.py` then runs as its own process (its own
Spark) against the project's fault-injecting OpenAI-compatible server (429 with Retry-After, 500,
stalls past the client timeout, malformed and schema-violating replies, all seeded). Each run is
killed with SIGKILL (the whole process group: driver, JVM, Python workers) once the server has
seen a random number of its requests, `--kills` times; then it is rerun until it exits 0.

The server counts every valid reply it sends per request (what a provider bills). A request paid
twice is one answered, then lost because the job died before journaling it, then asked again:
only calls in flight at a kill may pay twice. Ends with one JSON line:
{"bench": "kill_rerun", "kills", "requests", "repeated_paid_calls", "rows_expected", "rows",
 "duplicate_keys", "runs", "seconds"}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT.parent / "shared" / "data" / "amazon2014_musical_instruments_5" / "reviews_Musical_Instruments_5.json.gz"


def fault(body: dict, n: int) -> str | None:
    """Seeded by the request: about one request in four meets a fault on its first attempt, a few
    also on the second; every request can succeed eventually (within llm.max_attempts)."""
    from persona4rec.llm.fake_server import request_hash

    h = int(request_hash(body), 16)
    kind = ["429", "500", "timeout", "malformed", "schema", None, None, None, None, None, None, None][h % 12]
    return kind if n < 1 + (h // 12) % 2 else None


def slice_of(src: Path, n: int, out: Path) -> None:
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rt") as fh, out.open("w") as dst:
        for i, line in enumerate(fh):
            if i >= n:
                break
            dst.write(line)


def job(name: str, overrides: list[str]) -> list[str]:
    args = [sys.executable, str(ROOT / "jobs" / f"{name}.py")]
    for o in overrides:
        args += ["--set", o]
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reviews", nargs="?", default=str(DEFAULT))
    ap.add_argument("--reviews", dest="n", type=int, default=400, help="reviews taken from the start of the file")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--delay", type=float, default=0.05, help="server seconds per reply")
    ap.add_argument("--max-runs", type=int, default=10, help="reruns after the kills before giving up")
    args = ap.parse_args()

    from persona4rec.llm.fake_server import FakeLLMServer, schema_responder

    rng = random.Random(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="p4r-kill-") as tmp, \
            FakeLLMServer(schema_responder, fault=fault, delay_s=args.delay, retry_after_s=0.2, stall_s=3) as srv:
        src = Path(tmp) / "reviews.jsonl"
        slice_of(Path(args.reviews), args.n, src)
        overrides = [f"storage.root={tmp}/warehouse", "ingest.format=amazon2014", f"ingest.reviews_path={src}",
                     "ingest.items_path=null", "split.kcore=1", "offline.evaluation_mode=false",
                     "offline.persona_builder=llm", "llm.provider=openai", f"llm.base_url={srv.base_url}",
                     "llm.requests_per_minute=100000", "llm.concurrency_per_task=4", "llm.timeout_s=1",
                     "llm.backoff_initial_s=0.05", "llm.backoff_max_s=0.5", "llm.max_attempts=4",
                     "llm.max_reasks=2", "spark.master=local[2]", "spark.shuffle_partitions=2"]
        for name in ("ingest", "summarise_items"):
            subprocess.run(job(name, overrides), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with srv.log.lock:  # from here on the server sees aspect calls only
            srv.log.requests.clear()
            srv.log.paid.clear()

        kills, runs = 0, 0
        while kills < args.kills:
            before = len(srv.log.requests)
            proc = subprocess.Popen(job("extract_aspects", overrides), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            runs += 1
            # Kill once the server has seen a random share of what is left (never at 0: a kill
            # before the first call tests Spark start-up, not the cache).
            left = max(1, args.n - len({h for _, h in srv.log.requests}))
            target = before + rng.randint(1, max(1, 2 * left // (args.kills - kills + 1)))
            while proc.poll() is None and len(srv.log.requests) < target:
                time.sleep(0.02)
            if proc.poll() is None:
                time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside a call, a journal write or a MERGE
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
            else:
                break  # it finished before the kill: the reruns below confirm
        summary = None
        for _ in range(args.max_runs):
            proc = subprocess.run(job("extract_aspects", overrides), capture_output=True, text=True)
            runs += 1
            if proc.returncode == 0:
                summary = json.loads(proc.stdout.strip().splitlines()[-1])
                if summary["llm"]["failed"] == 0:
                    break
        if summary is None:
            raise SystemExit("extract_aspects never completed")

        from persona4rec.config import load_config
        from persona4rec.spark import get_spark
        from persona4rec.tables import TableStore

        cfg = load_config(None, overrides)
        spark = get_spark(cfg)
        store = TableStore(spark, cfg)
        rows_expected = store.read("reviews").count()
        aspects = store.read("review_aspects")
        rows = aspects.count()
        duplicate_keys = rows - aspects.select("user_id", "item_id").distinct().count()
        spark.stop()

    repeated = sum(n - 1 for n in srv.log.paid.values() if n > 1)
    print(json.dumps({"bench": "kill_rerun", "kills": kills, "requests": len(srv.log.requests),
                      "distinct_requests": len({h for _, h in srv.log.requests}),
                      "repeated_paid_calls": repeated, "rows_expected": rows_expected, "rows": rows,
                      "duplicate_keys": duplicate_keys, "runs": runs, "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
