"""Stage `extract_aspects`: one LLM call per usable review → one `review_aspects` row per review.

Reviews are partitioned by item (the runner repartitions on `partition_key` = item id), so one
task sees all reviews of an item. A tuple with more than `offline.max_null_slot_ratio` null slots,
or whose call failed, is kept in the table with `kept = false` and left out of the persona pool.
"""

from __future__ import annotations

import logging
from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.config import Config
from persona4rec.llm.runner import Endpoint, LLMRunner, make_request, request_schema
from persona4rec.offline import tasks
from persona4rec.offline.common import endpoint_for, usable_reviews
from persona4rec.schemas import ASPECT_SLOTS, ITEM_ID, ITEM_SUMMARIES, RATING, REVIEW_ASPECTS, USER_ID
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)

_REQUESTS = request_schema(T.StructField(USER_ID, T.StringType()), T.StructField(ITEM_ID, T.StringType()),
                           T.StructField(RATING, T.DoubleType()), T.StructField("helpful_votes", T.IntegerType()),
                           T.StructField("review_text", T.StringType()))
_SLOT = T.StructType([T.StructField("value", T.StringType()), T.StructField("reason", T.StringType())])
_REPLY = T.StructType([T.StructField(s, _SLOT) for s in ASPECT_SLOTS])


def build_requests(reviews: DataFrame, summaries: DataFrame, cfg: Config) -> DataFrame:
    rows = reviews.join(summaries.select(ITEM_ID, "summary"), ITEM_ID, "left")
    domain, settings, budget = cfg.offline.domain, cfg.llm, cfg.offline.review_token_budget

    def render(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            out = []
            for r in pdf.to_dict("records"):
                summary = r["summary"] if isinstance(r.get("summary"), str) else f"Item {r[ITEM_ID]}"
                msgs = tasks.aspect_messages(domain, summary, float(r[RATING]), r["review_text"], budget)
                req = make_request(tasks.aspects_task(domain), settings, msgs, None, r[ITEM_ID])
                votes = r.get("helpful_votes")
                out.append({**req, USER_ID: r[USER_ID], ITEM_ID: r[ITEM_ID], RATING: float(r[RATING]),
                            "helpful_votes": None if pd.isna(votes) else int(votes),
                            "review_text": tasks.review_as_sent(r["review_text"], budget)})
            yield pd.DataFrame(out, columns=_REQUESTS.fieldNames())

    return rows.mapInPandas(render, _REQUESTS)


def aspects_from_replies(replied: DataFrame, max_null_ratio: float, grounding: float = 0.0) -> DataFrame:
    """Replies → review_aspects rows: slots not grounded in the review (`tasks.grounded`, share
    `grounding`) become null, then a tuple with more than `max_null_ratio` null slots is not kept."""
    ok = F.col("status") == "succeeded"
    reply = F.col("reply")
    if grounding > 0:
        reply = _grounded_udf(grounding)(F.col("reply"), F.col("review_text"))
    parsed = replied.withColumn("_a", F.when(ok, F.from_json(reply, _REPLY)))
    slot_cols = []
    for s in ASPECT_SLOTS:
        slot_cols += [F.col(f"_a.{s}.value").alias(s), F.col(f"_a.{s}.reason").alias(f"{s}_reason")]
    out = parsed.select(USER_ID, ITEM_ID, RATING, "helpful_votes", *slot_cols, "status", "error",
                        F.col("key").alias("llm_key"), "prompt", "model")
    nulls = sum(F.when(F.col(s).isNull(), 1).otherwise(0) for s in ASPECT_SLOTS)
    out = out.withColumn("null_slots", F.when(ok, nulls).cast("int"))
    kept = ok & (F.col("null_slots") / F.lit(len(ASPECT_SLOTS)) <= F.lit(max_null_ratio))
    return (out.withColumn("kept", F.coalesce(kept, F.lit(False)))
            .withColumn("status", F.coalesce("status", F.lit("failed"))))


def _grounded_udf(share: float):
    @F.pandas_udf(T.StringType())
    def ground(replies: pd.Series, reviews: pd.Series) -> pd.Series:
        return pd.Series([tasks.ground_reply(r, t, share) if isinstance(r, str) else None
                          for r, t in zip(replies, reviews)], dtype=object)

    return ground


def run(spark: SparkSession, cfg: Config, endpoint: Endpoint | None = None) -> dict:
    if cfg.offline.persona_builder == "extractive":
        log.info("extract_aspects: not used by the extractive persona builder (reviews are clustered directly)")
        return {"skipped": "offline.persona_builder = extractive"}
    store = TableStore(spark, cfg)
    requests = build_requests(usable_reviews(store, cfg), store.read(ITEM_SUMMARIES.name), cfg).persist()
    with endpoint_for(cfg, endpoint) as ep:
        runner = LLMRunner(spark, cfg, ep)
        stats = runner.run(tasks.aspects_task(cfg.offline.domain), requests)
        rows = aspects_from_replies(runner.replies(requests), cfg.offline.max_null_slot_ratio,
                                    cfg.offline.aspect_grounding)
        write = store.upsert(rows, REVIEW_ASPECTS, delete_missing=True)
    requests.unpersist()
    return {"llm": stats.as_dict(), "review_aspects": {"version": write.version, **write.metrics}}

