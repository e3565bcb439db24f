"""Batch scoring throughput: the Spark path (score.recommend) vs a single-process numpy reference.

    .venv/bin/python benchmarks/scoring.py [--users 100000] [--items 25000] [--personas 5] [--dim 384] [--k 10]

Synthetic, L2-normalised vectors: every user has k history embeddings and N candidates. Inputs are
generated and written to Parquet first (not timed); the timed Spark run reads them, builds user
vectors, scores Eq. 10 for every candidate, blends, ranks, explains and materialises the top-K
(written to the `noop` sink, so storage speed is not measured). Measured at 20 and at 100
candidates, with the numpy reference (same math, one process, no Spark) at 20 in the same run.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from persona4rec.config import load_config
from persona4rec.scoring.rank import PersonaMatrix, blend, max_sim
from persona4rec.scoring.score import recommend
from persona4rec.spark import get_spark


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=25_000)
    ap.add_argument("--personas", type=int, default=5)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    U, I, P, D, K = args.users, args.items, args.personas, args.dim, args.k
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"storage.root={tmp}/wh", "scoring.top_k=10", "candidates.top_n=100",
                                 "spark.conf.spark.sql.execution.arrow.maxRecordsPerBatch=2000"])
        spark = get_spark(cfg)
        rng = np.random.default_rng(0)
        pvec = unit(rng.normal(size=(I * P, D)))
        index = spark.createDataFrame(pd.DataFrame({
            "item_id": [f"I{i // P}" for i in range(I * P)], "persona_id": [f"I{i // P}#{i % P}" for i in range(I * P)],
            "name": "Persona", "description": "Likes it.", "preference_rationale": "Fits.", "embedding": list(pvec)}))

        def gen_hist(batches):
            for pdf in batches:
                out = []
                for u in pdf["id"]:
                    r = np.random.default_rng(int(u))
                    out.append(list(unit(r.normal(size=(K, D)))))
                yield pd.DataFrame({"user_id": [f"U{u}" for u in pdf["id"]], "history": out})

        hist_path, cand_path = f"{tmp}/hist", f"{tmp}/cand"
        spark.range(U, numPartitions=8).mapInPandas(gen_hist, "user_id string, history array<array<float>>") \
            .write.parquet(hist_path)
        spark.range(U * 100, numPartitions=8).select(
            F.concat(F.lit("U"), (F.col("id") / 100).cast("long")).alias("user_id"),
            F.concat(F.lit("I"), ((F.col("id") * 7919) % I)).alias("item_id"),
            (100 - F.col("id") % 100).cast("double").alias("cf_score"),
            (F.col("id") % 100 + 1).cast("int").alias("cf_rank"), F.lit("bpr").alias("generator")) \
            .write.parquet(cand_path)
        hist = spark.read.parquet(hist_path)
        # recommend() takes interaction embeddings as rows; the history arrays are exploded back.
        emb = hist.select("user_id", F.posexplode("history").alias("seq", "embedding")).select(
            "user_id", F.col("seq").alias("ts"), "seq", F.lit("train").alias("split"), "embedding")
        timings = {}
        for n in (20, 100):
            cands = spark.read.parquet(cand_path).filter(F.col("cf_rank") <= n)
            started = time.perf_counter()
            recommend(spark, cands, emb, index, cfg, "bench", pd.Timestamp("2026-01-01").date(), "bpr") \
                .write.format("noop").mode("overwrite").save()
            timings[n] = time.perf_counter() - started

        # numpy reference at 20 candidates: same math, one process, no Spark.
        pm = PersonaMatrix.build([f"I{i // P}" for i in range(I * P)], [f"I{i // P}#{i % P}" for i in range(I * P)], pvec)
        n_ref = min(U, 5_000)
        hists = np.stack([unit(np.random.default_rng(u).normal(size=(K, D))) for u in range(n_ref)])
        started = time.perf_counter()
        w = (0.9 ** np.arange(K - 1, -1, -1)).astype(np.float32)
        for s in range(0, n_ref, 1000):  # batched like the Spark path, but in one process
            uv = unit(np.einsum("k,nkd->nd", w, hists[s:s + 1000]))
            ids = np.arange(s, min(s + 1000, n_ref))
            items = ((ids[:, None] * 100 + np.arange(20)[None, :]) * 7919) % I
            rows = np.array([pm.item_index[f"I{i}"] for i in items.ravel()])
            sc, _ = max_sim(np.repeat(uv, 20, 0), rows, pm)
            sc = sc.reshape(-1, 20)
            for r in range(len(ids)):
                np.argsort(-blend(sc[r], np.arange(20, 0, -1, dtype=np.float64), 1.0))[:10]
        ref_s = (time.perf_counter() - started) / n_ref * U
        spark.stop()
    print(json.dumps({"bench": "scoring", "users": U, "items": I, "personas_per_item": P, "dim": D, "k": K,
                      "spark_users_per_s_20": round(U / timings[20], 1),
                      "spark_users_per_s_100": round(U / timings[100], 1),
                      "time_ratio_100_vs_20": round(timings[100] / timings[20], 3),
                      "numpy_users_per_s_20": round(U / ref_s, 1),
                      "spark_vs_numpy_20": round((U / timings[20]) / (U / ref_s), 3)}))


if __name__ == "__main__":
    main()
