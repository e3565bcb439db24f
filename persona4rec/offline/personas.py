"""Stage `build_personas`: one LLM call per item over its aspect pool → 1..7 personas per item
(the paper's prompt; `offline.persona_builder: grouped` asks one call per group of the item's
aspect tuples instead, see offline/grouped.py).

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
from persona4rec.offline import extractive, grouped, tasks
from persona4rec.offline.common import endpoint_for
from persona4rec.offline.persona_rows import summary_only_personas, with_persona_ids
from persona4rec.schemas import ITEM_ID, ITEM_PERSONAS, ITEM_SUMMARIES, ITEMS, REVIEW_ASPECTS
from persona4rec.tables import TableStore

_REQUESTS = request_schema(T.StructField(ITEM_ID, T.StringType()), T.StructField("pool_size", T.IntegerType()))
_PERSONA = T.StructType([T.StructField("name", T.StringType()), T.StructField("description", T.StringType()),
                         T.StructField("preference_rationale", T.StringType())])
_REPLY = T.StructType([T.StructField("personas", T.ArrayType(_PERSONA))])


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
    missing = items.select(ITEM_ID).join(covered, ITEM_ID, "left_anti").join(failed, ITEM_ID, "left")
    return with_persona_ids(llm.unionByName(summary_only_personas(missing, summaries)))


def run(spark: SparkSession, cfg: Config, endpoint: Endpoint | None = None) -> dict:
    if cfg.offline.persona_builder == "extractive":
        return extractive.build_personas(spark, cfg)
    store = TableStore(spark, cfg)
    summaries = store.read(ITEM_SUMMARIES.name)
    if cfg.offline.persona_builder == "grouped":
        task = grouped.group_task(cfg.offline.domain)
        make, parse = grouped.build_requests, grouped.personas_from_replies
    else:
        task = tasks.personas_task(cfg.offline.domain, cfg.offline.max_personas)
        make, parse = build_requests, personas_from_replies
    requests = make(store.read(REVIEW_ASPECTS.name), summaries, cfg).persist()
    with endpoint_for(cfg, endpoint) as ep:
        runner = LLMRunner(spark, cfg, ep)
        stats = runner.run(task, requests)
        rows = parse(runner.replies(requests), store.read(ITEMS.name), summaries)
        write = store.upsert(rows, ITEM_PERSONAS, delete_missing=True)
    requests.unpersist()
    n_items = store.read(ITEM_PERSONAS.name).select(ITEM_ID).distinct().count()
    return {"llm": stats.as_dict(), "items_with_personas": n_items,
            "item_personas": {"version": write.version, **write.metrics}}

