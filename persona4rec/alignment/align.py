"""Stage `align`: the LLM judge picks, per training interaction, the persona that explains it.

Input per interaction: the user's profile (last k training interactions strictly before it), the
item's title and summary, and its personas numbered 1..n. The judge answers a number and a short
justification; a number that names no persona is invalid and re-asked. Items with a single
persona need no judge (status `single`). Requests are partitioned by user.
"""

from __future__ import annotations

from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.alignment.profiles import profiles, stored_interaction_texts
from persona4rec.config import Config
from persona4rec.llm.outputs import AlignmentChoice
from persona4rec.llm.prompts import load_prompt, untrusted
from persona4rec.llm.runner import Endpoint, LLMRunner, LLMTask, make_request, request_schema
from persona4rec.offline import extractive
from persona4rec.offline.common import endpoint_for
from persona4rec.schemas import (ALIGNMENT_PAIRS, ITEM_ID, ITEM_PERSONAS, ITEM_SUMMARIES, ITEMS,
                                 SPLIT, TRAIN, TS, USER_ID)
from persona4rec.tables import TableStore

SINGLE_JUSTIFICATION = "The item has a single persona."
_REQUESTS = request_schema(
    T.StructField(USER_ID, T.StringType()), T.StructField(ITEM_ID, T.StringType()), T.StructField(TS, T.LongType()),
    T.StructField("history_item_ids", T.ArrayType(T.StringType())),
    T.StructField("persona_ids", T.ArrayType(T.StringType())))


def check_choice(context: dict, reply: AlignmentChoice) -> None:
    n = int(context["n_personas"])
    if not 1 <= reply.persona_number <= n:
        raise ValueError(f"persona_number {reply.persona_number} names no persona: choose 1 to {n}")


def judge_task(domain: str) -> LLMTask:
    return LLMTask("align", load_prompt(domain, "judge"), AlignmentChoice, check=check_choice, max_output_tokens=200)


def judge_messages(domain: str, history: list[dict], item: dict, personas: list[dict]) -> list[dict]:
    hist = "\n".join(f"{i}. {untrusted(h['text'], 120)}" for i, h in enumerate(history, 1))
    item_text = f"Title: {untrusted(item.get('title') or 'unknown', 40)}\nSummary: {untrusted(item.get('summary') or '', 120)}"
    plist = "\n".join(f"{i}. {untrusted(p['name'], 20)}: {untrusted(p['description'], 60)} "
                      f"(why: {untrusted(p['preference_rationale'], 60)})" for i, p in enumerate(personas, 1))
    return judge_task(domain).prompt.render(history=hist, item=item_text, personas=plist, n_personas=len(personas))


def candidates(store: TableStore, cfg: Config) -> DataFrame:
    """Training interactions that have history and personas, with what the judge needs."""
    prof = profiles(stored_interaction_texts(store, cfg), cfg.profile.k).filter(
        (F.col(SPLIT) == TRAIN) & (F.size("history") > 0))
    plist = (store.read(ITEM_PERSONAS.name).groupBy(ITEM_ID)
             .agg(F.sort_array(F.collect_list(F.struct("persona_index", "persona_id", "name", "description",
                                                       "preference_rationale"))).alias("personas")))
    items = store.read(ITEMS.name).select(ITEM_ID, "title").join(
        store.read(ITEM_SUMMARIES.name).select(ITEM_ID, "summary"), ITEM_ID, "left")
    return prof.join(plist, ITEM_ID).join(items, ITEM_ID, "left")


def build_requests(cands: DataFrame, cfg: Config) -> DataFrame:
    domain, settings = cfg.offline.domain, cfg.llm

    def render(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            out = []
            for r in pdf.to_dict("records"):
                personas = [dict(p) for p in r["personas"]]
                history = [dict(h) for h in r["history"]]
                msgs = judge_messages(domain, history, r, personas)
                req = make_request(judge_task(domain), settings, msgs, {"n_personas": len(personas)}, r[USER_ID])
                out.append({**req, USER_ID: r[USER_ID], ITEM_ID: r[ITEM_ID], TS: int(r[TS]),
                            "history_item_ids": [h[ITEM_ID] for h in history],
                            "persona_ids": [p["persona_id"] for p in personas]})
            yield pd.DataFrame(out, columns=_REQUESTS.fieldNames())

    return cands.filter(F.size("personas") > 1).mapInPandas(render, _REQUESTS)


def pairs(replied: DataFrame, cands: DataFrame) -> DataFrame:
    number = F.get_json_object("reply", "$.persona_number").cast("int")
    judged = replied.filter(F.col("status") == "succeeded").select(
        USER_ID, ITEM_ID, TS, F.element_at("persona_ids", number).alias("persona_id"),
        F.get_json_object("reply", "$.justification").alias("justification"), "history_item_ids", "status",
        F.col("key").alias("llm_key"), "prompt", "model")
    single = cands.filter(F.size("personas") == 1).select(
        USER_ID, ITEM_ID, TS, F.col("personas")[0]["persona_id"].alias("persona_id"),
        F.lit(SINGLE_JUSTIFICATION).alias("justification"),
        F.transform("history", lambda h: h[ITEM_ID]).alias("history_item_ids"), F.lit("single").alias("status"),
        *[F.lit(None).cast("string").alias(c) for c in ("llm_key", "prompt", "model")])
    return judged.unionByName(single)


def run(spark: SparkSession, cfg: Config, endpoint: Endpoint | None = None) -> dict:
    if cfg.offline.persona_builder == "extractive":
        return extractive.align(spark, cfg)
    store = TableStore(spark, cfg)
    cands = candidates(store, cfg).persist()
    requests = build_requests(cands, cfg).persist()
    with endpoint_for(cfg, endpoint) as ep:
        runner = LLMRunner(spark, cfg, ep)
        stats = runner.run(judge_task(cfg.offline.domain), requests)
        result = pairs(runner.replies(requests), cands)
        write = store.upsert(result, ALIGNMENT_PAIRS, delete_missing=True)
    n_cands = cands.count()
    n_pairs = store.read(ALIGNMENT_PAIRS.name).count()
    requests.unpersist()
    cands.unpersist()
    return {"llm": stats.as_dict(), "candidates": n_cands, "pairs": n_pairs,
            "unaligned": n_cands - n_pairs, "alignment_pairs": {"version": write.version, **write.metrics}}
