"""The nightly path at scale: candidates of every generator, user vectors and scoring, at N and 2N.

    .venv/bin/python benchmarks/nightly_scale.py [--users 200000] [--items 200000]
        [--interactions 2000000] [--personas 5] [--dim 1024] [--budget-mb 1024] [--k 10]
        [--generators als,bpr,lightgcn] [--bpr-epochs 5] [--lightgcn-epochs 1]

Synthetic data, generated inside Spark tasks (never on the driver): interactions with Zipf item
popularity (rank r drawn with P ∝ 1/r) and a few very heavy users (one with 20,000 interactions,
four with 5,000), random unit vectors standing in for the last k interaction embeddings of every
user and for the personas (no encoder). Then the real functions, timed: `model_candidates` of
every generator (training on one worker + the distributed top-N, written to Parquet),
`compute_user_vectors`, and `recommend` (Eq. 10, blend, top 10, explanations) on the BPR-MF
candidates with `scoring.index_budget_mb` = --budget-mb: the persona index (items × personas × dim
float32) is over it at the defaults, so the blocked path carries it. The blocked layout of the index
(blocks + e-mail texts: `blocks.prepare`) depends only on the persona index, and `score_users`
keeps it from one night to the next per persona_index version, so it is timed apart
(`index_prep_s`, once per index version) from the nightly rerank + write (`scoring_s`,
`users_per_s`); the persona texts differ per persona, so no text is sanitised for free.

Each size runs in its own process, so `driver_peak_rss_mb` is that run's peak resident memory of
the Python driver (where a collect or a broadcast would land; the JVM's heap is capped by
spark.driver.memory and reported as `jvm_peak_rss_mb`). The second run doubles the users and the
interactions on the same catalogue: the top-N and the rerank are exact (every user against every
item, every candidate against its personas), so their work grows with users × items and doubling
the catalogue as well would quadruple it by construction. Ends with one JSON line: bench, users, items, interactions, candidates_s
({generator: s}), vectors_s, scoring_s, users_per_s, scoring_path, driver_peak_rss_mb, index_prep_s,
time_ratio_2x, driver_rss_ratio_2x (2N over N; time over candidates + vectors + scoring, the index
preparation left out because it does not grow with users), plus both runs' figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(a: argparse.Namespace) -> dict:
    import numpy as np
    from pyspark.sql import functions as F

    from persona4rec.config import load_config
    from persona4rec.scoring.blocks import block_count, index_megabytes, prepare
    from persona4rec.scoring.candidates import model_candidates
    from persona4rec.scoring.score import layout_path, recommend
    from persona4rec.scoring.users import compute_user_vectors
    from persona4rec.spark import get_spark

    U, I, N, P, D, K = a.users, a.items, a.interactions, a.personas, a.dim, a.k
    gens = a.generators.split(",")
    root = a.child
    cfg = load_config(None, [f"storage.root={root}/wh", "candidates.top_n=20", "scoring.top_k=10",
                             f"candidates.generators=[{','.join(gens)}]", f"candidates.bpr_epochs={a.bpr_epochs}",
                             f"candidates.lightgcn_epochs={a.lightgcn_epochs}", "candidates.lightgcn_batch=65536",
                             "candidates.lightgcn_max_steps_per_epoch=16",
                             "candidates.bpr_batch=8192", f"scoring.index_budget_mb={a.budget_mb}",
                             "scoring.generator=bpr" if "bpr" in gens else f"scoring.generator={gens[0]}",
                             "spark.conf.spark.sql.shuffle.partitions=16"])
    spark = get_spark(cfg)
    heavy = 20_000 + 4 * 5_000
    uid = lambda c: F.format_string("U%08d", c)
    iid = lambda c: F.format_string("I%08d", c)
    # Interactions: the first `heavy` rows belong to users 0 (20k) and 1..4 (5k each); the others
    # to uniform users ≥ 5. Items: Zipf over popularity ranks (log-uniform rank = P ∝ 1/r).
    rows = spark.range(N, numPartitions=16).select(
        F.when(F.col("id") < 20_000, 0).when(F.col("id") < heavy, 1 + (F.col("id") - 20_000) / 5_000)
        .otherwise(5 + F.floor(F.rand(1) * (U - 5))).cast("long").alias("u"),
        (F.floor(F.exp(F.rand(2) * F.log(F.lit(I + 1.0)))) - 1).cast("long").alias("i"), F.col("id").alias("ts"))
    rows.select(uid("u").alias("user_id"), iid("i").alias("item_id"), "ts").write.mode("overwrite") \
        .parquet(f"{root}/interactions")
    interactions = spark.read.parquet(f"{root}/interactions")

    def unit_rows(batches, d=D):
        for pdf in batches:
            rng = np.random.default_rng(int(pdf["id"].iloc[0]) if len(pdf) else 0)
            v = rng.normal(size=(len(pdf), d)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            yield pdf.assign(embedding=list(v))

    # The last k interaction embeddings of every user (what a user vector reads), and the personas.
    spark.range(U * K, numPartitions=16).select("id", (F.col("id") / K).cast("long").alias("u"),
                                                (F.col("id") % K).alias("seq")) \
        .mapInPandas(unit_rows, "id long, u long, seq long, embedding array<float>") \
        .select(uid("u").alias("user_id"), F.col("seq").alias("ts"), "seq", "embedding") \
        .write.mode("overwrite").parquet(f"{root}/history")
    spark.range(I * P, numPartitions=16).select("id", (F.col("id") / P).cast("long").alias("i"),
                                                (F.col("id") % P).cast("int").alias("persona_index")) \
        .mapInPandas(unit_rows, "id long, i long, persona_index int, embedding array<float>") \
        .select(iid("i").alias("item_id"), F.concat(iid("i"), F.lit("#"), "persona_index").alias("persona_id"),
                "persona_index", F.concat(F.lit("Weekend Guitarist "), "persona_index").alias("name"),
                F.concat(F.lit("Plays at home after work, mostly covers; reviewed item "), iid("i"),
                         F.lit(" after a month of daily use.")).alias("description"),
                F.concat(F.lit("Wants a reliable instrument that stays in tune (persona "), "persona_index",
                         F.lit(") because the reviews mention tuning pegs slipping.")).alias("preference_rationale"),
                "embedding") \
        .write.mode("overwrite").parquet(f"{root}/index")
    index = spark.read.parquet(f"{root}/index")

    out: dict = {"users": U, "items": I, "interactions": N, "personas": P, "dim": D, "candidates_s": {}}
    for gen in gens:
        started = time.perf_counter()
        model_candidates(spark, interactions, gen, cfg.candidates, f"{root}/work").write.mode("overwrite") \
            .parquet(f"{root}/candidates/{gen}")
        out["candidates_s"][gen] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    compute_user_vectors(spark.read.parquet(f"{root}/history"), K, 0.9).write.mode("overwrite") \
        .parquet(f"{root}/vectors")
    out["vectors_s"] = round(time.perf_counter() - started, 1)

    megabytes, _, width, _ = index_megabytes(index, 4)
    out["index_mb"] = round(megabytes, 1)
    out["scoring_path"] = "blocked" if megabytes > a.budget_mb else "broadcast"
    gen = cfg.scoring.generator
    cands = spark.read.parquet(f"{root}/candidates/{gen}").withColumn("source", F.lit("cf"))
    out["candidate_users"] = cands.select("user_id").distinct().count()
    layout = f"{root}/work/persona_blocks"
    if out["scoring_path"] == "blocked":
        # Once per persona_index version (score_users keeps it for the next nights): timed apart.
        started = time.perf_counter()
        blocks = block_count(megabytes, a.budget_mb)
        prepare(index, blocks, "float32", cfg.scoring.explanation_max_chars, layout_path(layout, cfg, blocks))
        out["index_prep_s"] = round(time.perf_counter() - started, 1)
        out["blocks"] = blocks
    started = time.perf_counter()
    recommend(spark, cands, spark.read.parquet(f"{root}/vectors"), index, cfg, "bench", dt.date(2026, 1, 1), gen,
              1.0, layout).write.format("noop").mode("overwrite").save()
    out["scoring_s"] = round(time.perf_counter() - started, 1)
    out["users_per_s"] = round(out["candidate_users"] / out["scoring_s"], 1)
    out["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["jvm_peak_rss_mb"] = round(jvm_peak_mb(spark), 1)
    spark.stop()
    return out


def jvm_peak_mb(spark) -> float:
    """VmHWM of the JVM this driver talks to (local mode: driver and executors)."""
    pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--interactions", type=int, default=2_000_000)
    ap.add_argument("--personas", type=int, default=5)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--budget-mb", type=float, default=1024)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--generators", default="als,bpr,lightgcn")
    ap.add_argument("--bpr-epochs", type=int, default=5)
    ap.add_argument("--lightgcn-epochs", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    runs = []
    for scale in (1, 2):
        with tempfile.TemporaryDirectory(prefix="p4r-scale-") as tmp:
            argv = [sys.executable, os.path.abspath(__file__), "--child", tmp,
                    "--users", str(a.users * scale), "--items", str(a.items),
                    "--interactions", str(a.interactions * scale), "--personas", str(a.personas), "--dim", str(a.dim),
                    "--budget-mb", str(a.budget_mb), "--k", str(a.k), "--generators", a.generators,
                    "--bpr-epochs", str(a.bpr_epochs), "--lightgcn-epochs", str(a.lightgcn_epochs)]
            proc = subprocess.run(argv, capture_output=True, text=True)
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not result:
                sys.stderr.write(proc.stderr[-5000:])
                raise SystemExit(f"run at {scale}x failed (exit {proc.returncode})")
            runs.append(json.loads(result[-1][len("RESULT "):]))
            print(f"{scale}x: {runs[-1]}", file=sys.stderr, flush=True)
    one, two = runs
    total = lambda r: sum(r["candidates_s"].values()) + r["vectors_s"] + r["scoring_s"]
    print(json.dumps({"bench": "nightly_scale", **{k: one[k] for k in (
        "users", "items", "interactions", "candidates_s", "vectors_s", "scoring_s", "users_per_s", "scoring_path",
        "driver_peak_rss_mb")}, "index_prep_s": one.get("index_prep_s"),
        "time_ratio_2x": round(total(two) / total(one), 3),
        "driver_rss_ratio_2x": round(two["driver_peak_rss_mb"] / one["driver_peak_rss_mb"], 3),
        "personas": a.personas, "dim": a.dim, "budget_mb": a.budget_mb, "index_mb": one["index_mb"],
        "jvm_peak_rss_mb": one["jvm_peak_rss_mb"], "run_1x": one, "run_2x": two}))


if __name__ == "__main__":
    main()
