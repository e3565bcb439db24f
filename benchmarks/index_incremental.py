"""What a nightly `build_index` encodes: cold, rerun, and the night after a day of new reviews.

    .venv/bin/python benchmarks/index_incremental.py REVIEWS [--meta META] [--format amazon2014]
        [--new-fraction 0.02] [--out DIR]

Holds the newest `--new-fraction` of the reviews back (by review time), then in one local Spark
session (production mode, extractive personas, no LLM, the un-tuned packaged encoder): ingest →
summaries → personas → `build_index` (cold: every text encoded) → `build_index` again (a rerun) →
ingest of the whole file (the held-back reviews arrive), summaries and personas again (items with
new reviews get new clusters, persona texts and members) → `build_index` (the next night; only
build_index is timed). The
baseline, measured in the same run on the same tables: what every run encoded before the
`text_embeddings` cache — the persona vectors computed by encoding each persona's text and its
centroid's members directly (`persona_vectors` without `vectors=`), written to Spark's noop sink
(after the cold run: the workers have the model loaded, which the cold run paid for).
Prints one JSON line:
{"bench": "index_incremental", "dataset", "reviews", "new_reviews", "texts_needed", "cold_s", "cold_texts",
 "rerun_s", "rerun_texts", "night_s", "night_texts", "persona_side_before_s", "persona_side_before_texts",
 "night_over_before"}
(`night_over_before`: the next night's whole build_index over the persona side alone as it was
encoded every night before: below 1 means the new night costs less than the part it replaces.)
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import tempfile
import time

from persona4rec.cli import setup_logging
from persona4rec.config import load_config
from persona4rec.ingest import job as ingest
from persona4rec.ingest.formats import decode_object
from persona4rec.ingest.records import Rejected
from persona4rec.offline import personas, summarise
from persona4rec.schemas import TEXT_EMBEDDINGS
from persona4rec.scoring import index
from persona4rec.scoring.embedding import resolve_encoder
from persona4rec.scoring.personas import persona_texts, persona_vectors
from persona4rec.spark import get_spark
from persona4rec.tables import TableStore

TIME_FIELD = {"amazon2014": "unixReviewTime", "amazon2018": "unixReviewTime", "amazon2023": "timestamp"}


def held_back(path: str, fmt: str, fraction: float, out: str) -> tuple[str, int, int]:
    """(a file of the reviews without the newest `fraction`, how many reviews, how many held back)."""
    if fmt not in TIME_FIELD:
        raise SystemExit(f"--format {fmt}: this benchmark reads review times of {sorted(TIME_FIELD)} only")
    if not 0 < fraction < 1:
        raise SystemExit(f"--new-fraction {fraction}: must be between 0 and 1")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]

    def review_time(line: str) -> int:
        try:
            return int(decode_object(line, fmt).get(TIME_FIELD[fmt]) or 0)
        except (Rejected, TypeError, ValueError):  # ingest rejects it either way: first day, with the oldest
            return 0

    times = [review_time(line) for line in lines]
    order = sorted(range(len(lines)), key=lambda i: times[i])
    n_new = max(1, int(round(len(lines) * fraction)))
    kept = sorted(order[:len(lines) - n_new])
    first = os.path.join(out, "day1.jsonl")
    with open(first, "w", encoding="utf-8") as f:
        f.writelines(lines[i] if lines[i].endswith("\n") else lines[i] + "\n" for i in kept)
    return first, len(lines), n_new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reviews")
    ap.add_argument("--meta")
    ap.add_argument("--format", default="amazon2014")
    ap.add_argument("--new-fraction", type=float, default=0.02)
    ap.add_argument("--out", help="keep the tables here (default: a temporary folder)")
    args = ap.parse_args()
    setup_logging()
    logging.getLogger("py4j").setLevel(logging.WARNING)
    out = args.out or tempfile.mkdtemp(prefix="p4r-index-")
    os.makedirs(out, exist_ok=True)
    first, n_reviews, n_new = held_back(args.reviews, args.format, args.new_fraction, out)
    base = [f"storage.root={out}/warehouse", f"ingest.format={args.format}", "offline.persona_builder=extractive",
            f"ingest.items_path={os.path.abspath(args.meta) if args.meta else 'null'}",
            f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", f"mlflow.artifact_root={out}/mlruns"]
    cfg = load_config(None, [*base, f"ingest.reviews_path={first}"])
    spark = get_spark(cfg)
    store = TableStore(spark, cfg)
    ingest.run(spark, cfg)
    summarise.run(spark, cfg, None)
    personas.run(spark, cfg, None)

    def timed(fn):
        t0 = time.time()
        result = fn()
        return result, round(time.time() - t0, 1)

    cold, cold_s = timed(lambda: index.run(spark, cfg))
    texts_needed = store.read(TEXT_EMBEDDINGS.name).count()
    rerun, rerun_s = timed(lambda: index.run(spark, cfg))
    ref = resolve_encoder(cfg)
    _, before_s = timed(lambda: persona_vectors(store, cfg, ref).write.format("noop").mode("overwrite").save())
    before_texts = persona_texts(store, cfg).count()  # rows encoded (a text two rows share, twice)
    whole = load_config(None, [*base, f"ingest.reviews_path={os.path.abspath(args.reviews)}"])
    ingest.run(spark, whole)
    summarise.run(spark, whole, None)  # as the offline stages would before the night's index
    personas.run(spark, whole, None)
    night, night_s = timed(lambda: index.run(spark, whole))
    spark.stop()
    dataset = os.path.basename(os.path.dirname(os.path.abspath(args.reviews))) or args.reviews
    print(json.dumps({"bench": "index_incremental", "dataset": dataset, "reviews": n_reviews, "new_reviews": n_new,
                      "texts_needed": texts_needed, "cold_s": cold_s, "cold_texts": cold["texts_embedded"],
                      "rerun_s": rerun_s, "rerun_texts": rerun["texts_embedded"], "night_s": night_s,
                      "night_texts": night["texts_embedded"], "persona_side_before_s": before_s,
                      "persona_side_before_texts": before_texts,
                      "night_over_before": round(night_s / before_s, 3) if before_s else None}))


if __name__ == "__main__":
    main()
