# Databricks notebook source
# MAGIC %md
# MAGIC # A user: history, candidates, reranked recommendations
# MAGIC The user's interactions (the profile the user vector is built from), the CF generator's
# MAGIC candidates, and the persona-reranked recommendations of the latest run with the persona that
# MAGIC explains each pick. Set `USER` to look at another user, `MODE` for an evaluation-mode run.

# COMMAND ----------

from pyspark.sql import functions as F

from persona4rec.alignment.profiles import stored_interactions
from persona4rec.display import shown
from persona4rec.notebook import context

spark, cfg, store = context()
MODE = cfg.mode  # production: the e-mails; evaluation: a leave-one-out run
recs = store.read("recommendations").filter(F.col("mode") == MODE)
latest = recs.agg(F.max("run_date")).first()[0]
recs = recs.filter(F.col("run_date") == latest)
USER = None
if USER is None:
    USER = recs.filter("has_history").orderBy("user_id").first()["user_id"]
first = recs.filter(F.col("user_id") == USER).first()
generator = first["generator"]
print(f"user {USER} · run {latest} ({MODE}) · generator {generator} · path {first['path']} · "
      f"k = {cfg.profile.k}, gamma = {cfg.profile.gamma}")

# COMMAND ----------

# MAGIC %md History: every kept review, oldest first (`outside_core`: left out of the k-core). In
# MAGIC production the newest k make the user vector (newest weight 1); evaluation uses the splits
# MAGIC in `scoring.history_splits`.

# COMMAND ----------

items = store.read("items").select("item_id", "title")
stored_interactions(store).filter(F.col("user_id") == USER).join(items, "item_id", "left") \
    .orderBy("seq").select("ts", "split", "item_id", "title").show(truncate=60)

# COMMAND ----------

# MAGIC %md Candidates from the generator (CF order)

# COMMAND ----------

store.read("candidates").filter((F.col("user_id") == USER) & (F.col("mode") == MODE)
                               & (F.col("generator") == generator)).orderBy("cf_rank").show(30)

# COMMAND ----------

# MAGIC %md Reranked recommendations with explanations

# COMMAND ----------

mine = recs.filter(F.col("user_id") == USER).orderBy("rank").collect()
names = {i.item_id: shown(i.asDict()) for i in
         store.read("items").filter(F.col("item_id").isin(*[r["item_id"] for r in mine])).collect()}
for r in mine:
    move = r["cf_rank"] - r["rank"]
    print(f"#{r['rank']:>2} {names.get(r['item_id'], r['item_id'])} (CF #{r['cf_rank']}, {'+' if move >= 0 else ''}{move}) "
          f"score {r['score']:.3f} · {r['persona_name']}")
    print(f"     {r['explanation']}")
