"""Stage `build_personas`: one LLM call per item over its aspect pool → 1..7 personas per item.

Every item ends with at least one persona: items with no usable aspect tuple (no reviews yet, the
paper's cold-start case), and items whose call has not succeeded yet, get one summary-only
persona. Persona ids carry a hash of the persona text, so an unchanged persona keeps its id and a
changed pool replaces the item's personas (the old rows are deleted by the MERGE).
"""

from __future__ import annotations

from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.config import Config
from persona4rec.llm.runner import Endpoint, LLMRunner, make_request, request_schema
from persona4rec.offline import tasks
from persona4rec.offline.common import endpoint_for
from persona4rec.schemas import ITEM_ID, ITEM_PERSONAS, ITEM_SUMMARIES, ITEMS, REVIEW_ASPECTS
from persona4rec.tables import TableStore

_REQUESTS = request_schema(T.StructField(ITEM_ID, T.StringType()), T.StructField("pool_size", T.IntegerType()))
_PERSONA = T.StructType([T.StructField("name", T.StringType()), T.StructField("description", T.StringType()),
                         T.StructField("preference_rationale", T.StringType())])
_REPLY = T.StructType([T.StructField("personas", T.ArrayType(_PERSONA))])
SUMMARY_ONLY_NAME = "General interest"
SUMMARY_ONLY_RATIONALE = "Matched on what the item is (no review-based persona yet)."


def build_requests(aspects: DataFrame, summaries: DataFrame, cfg: Config) -> DataFrame:
    pools = (aspects.filter("kept").groupBy(ITEM_ID)
             .agg(F.collect_list(F.struct(*[c for c in aspects.columns if c != ITEM_ID])).alias("_pool"),
                  F.count("*").alias("_n")))
    rows = pools.join(summaries.select(ITEM_ID, "summary"), ITEM_ID, "left")
    off, settings = cfg.offline, cfg.llm

    def render(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            out = []
            for r in pdf.to_dict("records"):
                pool = tasks.sample_pool([dict(t) for t in r["_pool"]], off.aspect_pool_token_budget)
                summary = r["summary"] if isinstance(r.get("summary"), str) else f"Item {r[ITEM_ID]}"
                msgs = tasks.persona_messages(off.domain, summary, pool, int(r["_n"]), off.max_personas)
                req = make_request(tasks.personas_task(off.domain, off.max_personas), settings, msgs,
                                   {"max_personas": off.max_personas}, r[ITEM_ID])
                out.append({**req, ITEM_ID: r[ITEM_ID], "pool_size": len(pool)})
            yield pd.DataFrame(out, columns=_REQUESTS.fieldNames())

    return rows.mapInPandas(render, _REQUESTS)


def personas_from_replies(replied: DataFrame, items: DataFrame, summaries: DataFrame) -> DataFrame:
    ok = (F.col("status") == "succeeded")
    llm = (replied.filter(ok)
           .select(ITEM_ID, "pool_size", "status", F.col("key").alias("llm_key"), "prompt", "model",
                   F.posexplode(F.from_json("reply", _REPLY).personas).alias("persona_index", "p"))
           .select(ITEM_ID, "persona_index", "p.name", "p.description", "p.preference_rationale",
                   F.lit("llm").alias("source"), "pool_size", "status", "llm_key", "prompt", "model"))
    covered = llm.select(ITEM_ID).distinct()
    failed = replied.filter(~ok | F.col("status").isNull()).select(ITEM_ID, F.lit("fallback").alias("status"))
    missing = (items.select(ITEM_ID).join(covered, ITEM_ID, "left_anti")
               .join(failed, ITEM_ID, "left")
               .join(summaries.select(ITEM_ID, "summary"), ITEM_ID, "left"))
    summary_only = missing.select(
        ITEM_ID, F.lit(0).alias("persona_index"), F.lit(SUMMARY_ONLY_NAME).alias("name"),
        F.coalesce("summary", F.concat(F.lit("Item "), F.col(ITEM_ID))).alias("description"),
        F.lit(SUMMARY_ONLY_RATIONALE).alias("preference_rationale"), F.lit("summary_only").alias("source"),
        F.lit(0).alias("pool_size"), F.coalesce("status", F.lit("skipped")).alias("status"),
        F.lit(None).cast("string").alias("llm_key"), F.lit(None).cast("string").alias("prompt"),
        F.lit(None).cast("string").alias("model"))
    both = llm.unionByName(summary_only)
    text = F.concat_ws(" ", F.concat(F.col("name"), F.lit(".")), "description", "preference_rationale")
    pid = F.concat(F.col(ITEM_ID), F.lit("#"), F.col("persona_index").cast("string"), F.lit("-"),
                   F.substring(F.sha2(text, 256), 1, 8))
    return both.withColumn("persona_text", text).withColumn("persona_id", pid)


def run(spark: SparkSession, cfg: Config, endpoint: Endpoint | None = None) -> dict:
    store = TableStore(spark, cfg)
    summaries = store.read(ITEM_SUMMARIES.name)
    requests = build_requests(store.read(REVIEW_ASPECTS.name), summaries, cfg).persist()
    with endpoint_for(cfg, endpoint) as ep:
        runner = LLMRunner(spark, cfg, ep)
        stats = runner.run(tasks.personas_task(cfg.offline.domain, cfg.offline.max_personas), requests)
        rows = personas_from_replies(runner.replies(requests), store.read(ITEMS.name), summaries)
        write = store.upsert(rows, ITEM_PERSONAS, delete_missing=True)
    requests.unpersist()
    n_items = store.read(ITEM_PERSONAS.name).select(ITEM_ID).distinct().count()
    return {"llm": stats.as_dict(), "items_with_personas": n_items,
            "item_personas": {"version": write.version, **write.metrics}}

