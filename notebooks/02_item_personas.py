# Databricks notebook source
# MAGIC %md
# MAGIC # An item, from reviews to personas
# MAGIC One item's reviews, the aspect tuples the LLM extracted from them (LLM builder) or the review
# MAGIC cluster each review fell into (extractive builder), and the personas built from them — the
# MAGIC persona-profiled index entry the scorer matches users against. Set `ITEM` to look at another.

# COMMAND ----------

from pyspark.sql import functions as F

from persona4rec.display import shown
from persona4rec.notebook import context

spark, cfg, store = context()
personas = store.read("item_personas")
# The item with the most personas (ties: the most reviews), unless ITEM is set.
ITEM = None
if ITEM is None:
    ITEM = (personas.groupBy("item_id").agg(F.count("*").alias("n"), F.max("pool_size").alias("pool"))
            .orderBy(F.desc("n"), F.desc("pool"), "item_id").first()["item_id"])
print(f"item {ITEM} · persona builder: {cfg.offline.persona_builder}")

# COMMAND ----------

# MAGIC %md Metadata and summary

# COMMAND ----------

item = store.read("items").filter(F.col("item_id") == ITEM).first()
summary = store.read("item_summaries").filter(F.col("item_id") == ITEM).first()
print(f"title: {item['title'] if item else None} · shown as: {shown(item.asDict()) if item else ITEM}"
      " (* = derived from the metadata)")
print(f"summary ({summary['source']}): {summary['summary']}")

# COMMAND ----------

# MAGIC %md Reviews, with what each one contributed

# COMMAND ----------

reviews = store.read("reviews").filter(F.col("item_id") == ITEM).select("user_id", "rating", "review_text")
if store.exists("review_aspects") and cfg.offline.persona_builder == "llm":
    contributed = store.read("review_aspects").select("user_id", "item_id", "category_preference",
                                                      "purchase_purpose", "quality_criteria", "usage_context", "kept")
else:
    contributed = store.read("review_clusters").join(personas.select("persona_id", "name"), "persona_id") \
        .select("user_id", "item_id", F.col("name").alias("cluster_persona"))
reviews.join(contributed.filter(F.col("item_id") == ITEM).drop("item_id"), "user_id", "left") \
    .orderBy("user_id").show(20, truncate=60)

# COMMAND ----------

# MAGIC %md The item's personas (what the index embeds)

# COMMAND ----------

for p in personas.filter(F.col("item_id") == ITEM).orderBy("persona_index").collect():
    print(f"[{p['persona_index']}] {p['name']} ({p['source']}, pool {p['pool_size']})")
    print(f"    {p['description']}")
    print(f"    why: {p['preference_rationale']}")
