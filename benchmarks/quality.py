"""Recommendation quality like the paper's Tables 4–6: the persona reranker against the CF
generators it reranks, leave-one-out on the test split, on any supported review dataset.

    .venv/bin/python benchmarks/quality.py REVIEWS [--meta META] [--format amazon2014]
        [--builder extractive|llm] [--max-steps N] [--out DIR] [--set key=value ...]

Runs ingest → summaries → aspects → personas → align → generate_candidates (ALS and BPR-MF, top
20, `mode=evaluation`) → train_encoder → promote_model → evaluate in one local Spark session with
fixed seeds, served as the production bundle serves (`scoring.alpha=auto`: the blend at the α
validation chooses, which `train.selection: served` then also chooses the checkpoint on), on the
configured training objective (`train.objective`, default rerank; the paper's
`--set train.objective=alignment --max-steps 150` is the old default) and persona vectors
(`profile.persona_vectors`), then prints the table (generator × variant × metric@K, with the relative change over the
generator) and one JSON line per generator:
{"bench": "quality", "dataset", "builder", "objective", "alignment_weight", "selection", "scoring_alpha",
 "persona_vectors", "generator", "users",
 "ndcg10_generator", "ndcg10_vanilla",
 "ndcg10_finetuned", "ndcg10_blend", "alpha", "hr10_generator", "hr10_finetuned", "ndcg10_gain_ci"}
(`ndcg10_gain_ci`: paired bootstrap 95% interval of NDCG@10 finetuned / generator), and with the
extractive builder `ndcg10_vanilla_centroid`, `ndcg10_vanilla_review_history`, `ndcg10_vanilla_reviews`
(the un-tuned encoder with persona vectors as their review clusters' centroids, with histories of
the user's own reviews, and both: see evaluation/job.py).
`--builder llm` uses the configured LLM (by default the embedded local model) instead of the
LLM-free extractive personas.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time

from persona4rec import pipeline
from persona4rec.cli import setup_logging
from persona4rec.config import load_config
from persona4rec.evaluation import job as evaluate
from persona4rec.llm.embedded import llm_endpoint
from persona4rec.spark import get_spark

STAGES = ("ingest", "summarise_items", "extract_aspects", "build_personas", "align", "generate_candidates",
          "train_encoder", "promote_model")
REPRESENTATIONS = ("vanilla_centroid", "vanilla_review_history", "vanilla_reviews")  # issue 14's measurement
VARIANTS = ("generator", "vanilla", "finetuned", "finetuned_blend", "summary_only", "personas_1", "personas_3",
            "personas_5", "personas_7", *REPRESENTATIONS)


def table(summary: dict, ks: tuple[int, ...]) -> str:
    lines = []
    for gen, m in summary["generators"].items():
        lines.append(f"\n{gen} (test, {m['users']} users, blend alpha {m['alpha']:.2f} chosen on validation)")
        lines.append(f"  {'variant':<24}" + "".join(f"{f'{n}@{k}':>10}" for n in ("hr", "mrr", "ndcg") for k in ks)
                     + f"{'ΔNDCG@10':>10}")
        for v in VARIANTS:
            if f"ndcg10_{v}" not in m:
                continue
            cells = "".join(f"{m[f'{n}{k}_{v}']:>10.4f}" for n in ("hr", "mrr", "ndcg") for k in ks)
            base = m["ndcg10_generator"]
            delta = f"{(m[f'ndcg10_{v}'] / base - 1) * 100:>+9.1f}%" if base else f"{'n/a':>10}"
            lines.append(f"  {v:<24}{cells}{delta}")
        lo, hi = m["ndcg10_gain_ci"]
        lines.append(f"  NDCG@10 finetuned/generator, paired bootstrap 95% CI: [{lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reviews")
    ap.add_argument("--meta")
    ap.add_argument("--format", default="amazon2014")
    ap.add_argument("--builder", choices=("extractive", "llm"), default="extractive")
    ap.add_argument("--max-steps", type=int, help="cap on training steps (default: the config's, none)")
    ap.add_argument("--out", help="keep the tables and MLflow store here (default: a temporary folder)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides key=value")
    args = ap.parse_args()
    setup_logging()
    logging.getLogger("py4j").setLevel(logging.WARNING)
    out = args.out or tempfile.mkdtemp(prefix="p4r-quality-")
    os.makedirs(out, exist_ok=True)
    overrides = ["mode=evaluation", f"storage.root={out}/warehouse", f"ingest.reviews_path={os.path.abspath(args.reviews)}",
                 f"ingest.items_path={os.path.abspath(args.meta) if args.meta else 'null'}",
                 f"ingest.format={args.format}", f"offline.persona_builder={args.builder}",
                 f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", f"mlflow.artifact_root={out}/mlruns",
                 *([f"train.max_steps={args.max_steps}"] if args.max_steps else []), "candidates.top_n=20", "candidates.generators=[als,bpr]",
                 f"evaluation.representation_variants={str(args.builder == 'extractive').lower()}",
                 "scoring.alpha=auto", *args.set]
    cfg = load_config(None, overrides)
    spark = get_spark(cfg)
    started, timings = time.time(), {}
    stages = {name: (fn, uses_llm) for name, fn, uses_llm in pipeline.STAGES}
    with llm_endpoint(cfg) if args.builder == "llm" else contextlib.nullcontext() as endpoint:
        for name in STAGES:
            t0 = time.time()
            fn, uses_llm = stages[name]
            fn(spark, cfg, endpoint) if uses_llm else fn(spark, cfg)
            timings[name] = round(time.time() - t0, 1)
    t0 = time.time()
    summary = evaluate.run(spark, cfg)
    timings["evaluate"] = round(time.time() - t0, 1)
    spark.stop()
    dataset = os.path.basename(os.path.dirname(os.path.abspath(args.reviews))) or args.reviews
    print(f"\nQuality on {dataset} ({args.builder} personas), seed {cfg.train.seed}/{cfg.candidates.seed}/"
          f"{cfg.evaluation.seed}, {round(time.time() - started)} s; stage seconds {timings}")
    print(f"tables: {out}/warehouse · MLflow: sqlite:///{out}/mlflow.db (run {summary['run_id']})")
    print(table(summary, cfg.evaluation.ks))
    for gen, m in summary["generators"].items():
        print(json.dumps({"bench": "quality", "dataset": dataset, "builder": args.builder,
                          "objective": cfg.train.objective, "alignment_weight": cfg.train.alignment_weight,
                          "selection": cfg.train.selection, "scoring_alpha": cfg.scoring.alpha,
                          "persona_vectors": cfg.profile.persona_vectors, "generator": gen,
                          "users": m["users"], "ndcg10_generator": m["ndcg10_generator"],
                          "ndcg10_vanilla": m["ndcg10_vanilla"], "ndcg10_finetuned": m["ndcg10_finetuned"],
                          "ndcg10_blend": m["ndcg10_finetuned_blend"], "alpha": m["alpha"],
                          "hr10_generator": m["hr10_generator"], "hr10_finetuned": m["hr10_finetuned"],
                          "ndcg10_gain_ci": m["ndcg10_gain_ci"],
                          **{f"ndcg10_{v}": m[f"ndcg10_{v}"] for v in REPRESENTATIONS if f"ndcg10_{v}" in m}}))


if __name__ == "__main__":
    main()
