# Databricks notebook source
# MAGIC %md
# MAGIC # Ingestion overview
# MAGIC What the `ingest` job kept, rejected and split. Runs on Databricks (attached to a cluster,
# MAGIC with the bundle's wheel installed) and locally: `.venv/bin/python notebooks/01_ingest_overview.py`.

# COMMAND ----------

from persona4rec.notebook import context

spark, cfg, store = context()

# COMMAND ----------

# MAGIC %md Reviews and items kept

# COMMAND ----------

reviews = store.read("reviews")
items = store.read("items")
print(f"{reviews.count()} reviews, {reviews.select('user_id').distinct().count()} users, "
      f"{items.count()} items ({items.filter('has_metadata').count()} with metadata)")
items.select("item_id", "title", "brand", "main_category").show(10, truncate=60)

# COMMAND ----------

# MAGIC %md Rejected records by reason

# COMMAND ----------

store.read("rejected_records").groupBy("table", "reason").count().orderBy("table", "reason").show()

# COMMAND ----------

# MAGIC %md Leave-one-out split sizes

# COMMAND ----------

store.read("splits").groupBy("split").count().orderBy("split").show()
