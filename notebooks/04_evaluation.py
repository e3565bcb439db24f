# Databricks notebook source
# MAGIC %md
# MAGIC # Evaluation: persona rerank variants against the CF generators
# MAGIC The latest `evaluate` run: HR / MRR / NDCG@K on the test split (leave-one-out), every variant
# MAGIC next to the generator it reranks, the scenario breakdown, and a plot of NDCG@10.

# COMMAND ----------

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from persona4rec.notebook import context  # noqa: E402

spark, cfg, store = context()
metrics = store.read("evaluation_metrics")  # every evaluation run is kept; show the latest
newest = metrics.orderBy(F.desc("evaluated_at")).first()
run_id = newest["run_id"]
latest = metrics.filter(F.col("run_id") == run_id)
print(f"evaluation run {run_id} at {newest['evaluated_at']} (MLflow run id)")

# COMMAND ----------

# MAGIC %md Test split, all users: metric@K per generator and variant, with the change over the generator

# COMMAND ----------

test = latest.filter((F.col("split") == "test") & (F.col("scenario") == "all"))
base = test.filter("variant = 'generator'").select("generator", "k", F.col("ndcg").alias("ndcg_generator"))
table = test.join(base, ["generator", "k"]).withColumn(
    "ndcg_change_pct", F.round((F.col("ndcg") / F.col("ndcg_generator") - 1) * 100, 1))
table.filter("k = 10").select("generator", "variant", "alpha", "users", F.round("hr", 4).alias("hr@10"),
                              F.round("mrr", 4).alias("mrr@10"), F.round("ndcg", 4).alias("ndcg@10"),
                              "ndcg_change_pct").orderBy("generator", "variant").show(40, truncate=False)

# COMMAND ----------

# MAGIC %md Scenarios (NDCG@10, test): warm / cold users, head / tail items

# COMMAND ----------

latest.filter((F.col("split") == "test") & (F.col("k") == 10)).groupBy("generator", "variant") \
    .pivot("scenario").agg(F.round(F.first("ndcg"), 4)).orderBy("generator", "variant").show(40, truncate=False)

# COMMAND ----------

rows = table.filter("k = 10").collect()
gens = sorted({r["generator"] for r in rows})
variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "generator", v))
fig, ax = plt.subplots(figsize=(10, 4))
width = 0.8 / len(gens)
for i, g in enumerate(gens):
    vals = {r["variant"]: r["ndcg"] for r in rows if r["generator"] == g}
    ax.bar([x + i * width for x in range(len(variants))], [vals.get(v, 0) for v in variants], width, label=g)
ax.set_xticks([x + width * (len(gens) - 1) / 2 for x in range(len(variants))], variants, rotation=30, ha="right")
ax.set_ylabel("NDCG@10 (test)")
ax.legend(title="generator")
fig.tight_layout()
out = cfg.resolve_path(f"{cfg.storage.root}/_plots/evaluation_ndcg10.png")
import os  # noqa: E402

os.makedirs(os.path.dirname(out), exist_ok=True)
fig.savefig(out)
print(f"plot: {out}")
