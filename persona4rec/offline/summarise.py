"""Stage `summarise_items`: one LLM call per item, metadata (or, when thin, reviews) → summary."""

from __future__ import annotations

from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.config import Config
from persona4rec.llm.runner import Endpoint, LLMRunner, make_request, request_schema
from persona4rec.offline import extractive, tasks
from persona4rec.offline.common import endpoint_for, usable_reviews
from persona4rec.schemas import ITEM_ID, ITEM_SUMMARIES, ITEMS
from persona4rec.tables import TableStore

_REQUESTS = request_schema(T.StructField(ITEM_ID, T.StringType()), T.StructField("fallback", T.StringType()))


def build_requests(items: DataFrame, reviews: DataFrame, cfg: Config) -> DataFrame:
    """One request per item; thin metadata gets the most helpful reviews as evidence."""
    off = cfg.offline
    best = Window.partitionBy(ITEM_ID).orderBy(F.col("helpful_votes").desc_nulls_last(), F.col("ts"), F.col("user_id"))
    evidence = (reviews.withColumn("_r", F.row_number().over(best)).filter(F.col("_r") <= off.summary_fallback_reviews)
                .groupBy(ITEM_ID).agg(F.collect_list(F.struct("_r", "review_text")).alias("_ev")))
    rows = items.join(evidence, ITEM_ID, "left")
    domain, settings, budget = off.domain, cfg.llm, off.review_token_budget

    def render(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            out = []
            for item in pdf.to_dict("records"):
                ev = [r["review_text"] for r in sorted(item["_ev"], key=lambda r: r["_r"])] \
                    if item.get("_ev") is not None and tasks.is_thin(item) else []
                msgs = tasks.summary_messages(domain, item, ev, budget)
                req = make_request(tasks.summary_task(domain), settings, msgs, None, item[ITEM_ID])
                out.append({**req, ITEM_ID: item[ITEM_ID], "fallback": tasks.fallback_summary(item)})
            yield pd.DataFrame(out, columns=_REQUESTS.fieldNames())

    return rows.mapInPandas(render, _REQUESTS)


@F.pandas_udf(T.BooleanType())
def _repetitive(summaries: pd.Series) -> pd.Series:
    return pd.Series([isinstance(t, str) and tasks.repetitive(t) for t in summaries], dtype=bool)


def summaries_from_replies(replied: DataFrame) -> DataFrame:
    """Replies → item_summaries rows; the metadata text where the call has not succeeded, or where a
    cached reply loops (one that succeeded before `tasks.check_summary` existed)."""
    llm_summary = F.get_json_object("reply", "$.summary")
    ok = (F.col("status") == "succeeded") & llm_summary.isNotNull() & ~_repetitive(llm_summary)
    return replied.select(
        ITEM_ID,
        F.when(ok, llm_summary).otherwise(F.col("fallback")).alias("summary"),
        F.when(ok, F.lit("llm")).otherwise(F.lit("fallback")).alias("source"),
        F.coalesce("status", F.lit("failed")).alias("status"),
        F.col("key").alias("llm_key"), "prompt", "model")


def run(spark: SparkSession, cfg: Config, endpoint: Endpoint | None = None) -> dict:
    if cfg.offline.persona_builder == "extractive":
        return extractive.summarise(spark, cfg)
    store = TableStore(spark, cfg)
    requests = build_requests(store.read(ITEMS.name), usable_reviews(store, cfg), cfg).persist()
    with endpoint_for(cfg, endpoint) as ep:
        runner = LLMRunner(spark, cfg, ep)
        stats = runner.run(tasks.summary_task(cfg.offline.domain), requests)
        write = store.upsert(summaries_from_replies(runner.replies(requests)), ITEM_SUMMARIES)
    requests.unpersist()
    return {"llm": stats.as_dict(), "item_summaries": {"version": write.version, **write.metrics}}
