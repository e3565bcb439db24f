"""Personas a small model can write (`offline.persona_builder: grouped`).

The paper's prompt asks one call for 1..7 distinct personas over the item's whole aspect pool. A
small model fails that often (on the shipped sample the embedded 135M model repeated a name in 23
of 30 items, so those items fell back to a summary-only persona). This builder does the part that
needs no language model first: it groups the item's kept aspect tuples into voices (the clustering
of the extractive builder, on embeddings of the tuples under the base encoder), then asks the LLM
for exactly one persona per group, from that group's tuples only. Personas are distinct by
construction (different evidence; a repeated name is told apart by the group's typical words, then
by number), each carries its support (`pool_size` = reviews in its group), and each stays grounded
in what those reviewers said. A group whose call fails is left out; an item none of whose groups succeeded gets
the summary-only persona, as in the paper's path.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.config import Config
from persona4rec.llm.outputs import Persona
from persona4rec.llm.prompts import load_prompt, untrusted
from persona4rec.llm.runner import LLMTask, make_request, request_schema
from persona4rec.offline import cluster, tasks
from persona4rec.offline.common import per_item
from persona4rec.offline.persona_rows import summary_only_personas, with_persona_ids
from persona4rec.schemas import ITEM_ID, USER_ID
from persona4rec.scoring.embedding import worker_model
from persona4rec.training.encoder import resolve_model_name

TASK = "build_group_persona"
MAX_TUPLES_CLUSTERED = 200  # per item; further tuples join their nearest group
_PRAISE = re.compile(r"\b(best|greatest|ever|perfect|amazing|awesome)\b", re.IGNORECASE)
# A small model copies the instructions into the name ("2 to 5 words", "2").
_ECHO = re.compile(r"\b(words?|sentences?|persona|name|json)\b|^[\W\d_]*$", re.IGNORECASE)
_REQUESTS = request_schema(T.StructField(ITEM_ID, T.StringType()), T.StructField("group_index", T.IntegerType()),
                           T.StructField("support", T.IntegerType()), T.StructField("keywords", T.StringType()))
_PERSONA = T.StructType([T.StructField(f, T.StringType()) for f in ("name", "description", "preference_rationale")])


def group_task(domain: str) -> LLMTask:
    return LLMTask(TASK, load_prompt(domain, "group_persona"), Persona, check=check_group_persona,
                   max_output_tokens=200)


def check_group_persona(context: dict, reply: Persona) -> None:
    """Reject what a small model writes when it has nothing to say: praise instead of a person
    ("The Best Product Ever"), the instructions copied as the name, and one sentence repeated as
    description and rationale."""
    if _PRAISE.search(reply.name):
        raise ValueError("the name must name a kind of person, not praise the product")
    if _ECHO.search(reply.name):
        raise ValueError("the name must say who the person is, not repeat the instructions")
    if " ".join(reply.description.lower().split()) == " ".join(reply.preference_rationale.lower().split()):
        raise ValueError("description and preference_rationale must say different things")


def group_tuples(tuples: list[dict], model, max_groups: int, seed: int) -> list[list[int]]:
    """One item's kept aspect tuples → groups of indices into `tuples` (largest group first)."""
    # What they say, without the "[5] " rating prefix: the reasons carry a critical voice apart.
    texts = [tasks.tuple_text(t).split("] ", 1)[-1] for t in tuples]
    vec = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False).astype(np.float32)
    head = vec[:MAX_TUPLES_CLUSTERED]
    min_size = 2 if len(head) >= 4 else max(len(head), 1)  # a voice is at least two reviewers
    labels = cluster.choose_clusters(head, max_groups, min_size, 0.05, seed)
    centres = np.stack([head[labels == k].mean(axis=0) for k in range(labels.max() + 1)])
    labels = np.concatenate([labels, np.argmax(vec[len(head):] @ centres.T, axis=1)]).astype(np.int64)
    return [np.flatnonzero(labels == k).tolist() for k in range(len(centres))]


def build_requests(aspects: DataFrame, summaries: DataFrame, cfg: Config) -> DataFrame:
    """Kept aspect tuples → one request per (item, group), with the group's support and its typical
    words (which also tell apart two groups the model gives the same name)."""
    cols = [c for c in aspects.columns if c != "kept"]
    rows = (aspects.filter("kept").select(*cols)
            .join(summaries.select(ITEM_ID, "summary"), ITEM_ID, "left")
            .repartition(ITEM_ID).sortWithinPartitions(ITEM_ID, USER_ID))
    off, settings, seed = cfg.offline, cfg.llm, cfg.train.seed
    model_path, max_len, dev = resolve_model_name(cfg.train.base_model), cfg.train.max_seq_length, cfg.train.device
    task = group_task(off.domain)

    def item_requests(pdf: pd.DataFrame, model) -> list[dict]:
        item = str(pdf[ITEM_ID].iloc[0])
        tuples = pdf.to_dict("records")
        summary = tuples[0]["summary"] if isinstance(tuples[0].get("summary"), str) else f"Item {item}"
        item_seed = seed + int(hashlib.sha256(item.encode()).hexdigest()[:8], 16) % 100_000
        texts = [tasks.tuple_text(t) for t in tuples]
        out = []
        for g, members in enumerate(group_tuples(tuples, model, off.max_personas, item_seed)):
            group = [tuples[i] for i in members]
            words = cluster.keywords([texts[i] for i in members], texts) if len(members) < len(tuples) else []
            pool = tasks.sample_pool(group, off.aspect_pool_token_budget // max(off.max_personas, 1) + 200)
            msgs = task.prompt.render(summary=untrusted(summary, 120), support=len(group), n_reviews=len(tuples),
                                      aspects="\n".join(tasks.tuple_text(t) for t in pool),
                                      keywords=", ".join(words) or "(the item's only group)")
            req = make_request(task, settings, msgs, {"group": g, "support": len(group)}, item)
            out.append({**req, ITEM_ID: item, "group_index": g, "support": len(group), "keywords": ", ".join(words)})
        return out

    def render(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        model = worker_model(model_path, max_len, dev)
        yield from per_item(batches, lambda rows: item_requests(rows, model), _REQUESTS.fieldNames())

    return rows.mapInPandas(render, _REQUESTS)


def personas_from_replies(replied: DataFrame, items: DataFrame, summaries: DataFrame) -> DataFrame:
    """Succeeded group replies → persona rows (index = group, pool_size = the group's support); a
    name given to two groups of one item gets the group's typical words; items with no succeeded
    group get the summary-only persona."""
    ok = F.col("status") == "succeeded"
    llm = (replied.filter(ok)
           .select(ITEM_ID, F.col("group_index").alias("persona_index"), F.col("support").alias("pool_size"),
                   "keywords", "status", F.col("key").alias("llm_key"), "prompt", "model",
                   F.from_json("reply", _PERSONA).alias("p"))
           .select(ITEM_ID, "persona_index", "pool_size", "keywords", "status", "llm_key", "prompt", "model",
                   "p.name", "p.description", "p.preference_rationale"))
    same = Window.partitionBy(ITEM_ID, F.lower(F.trim("name")))
    llm = llm.withColumn("name", F.when((F.count("*").over(same) > 1) & (F.col("keywords") != ""),
                                        F.concat(F.col("name"), F.lit(" ("), F.col("keywords"), F.lit(")")))
                         .otherwise(F.col("name")))
    # Groups that differ only in rating can share their typical words too: number the later ones.
    nth = F.row_number().over(Window.partitionBy(ITEM_ID, F.lower(F.trim("name"))).orderBy("persona_index"))
    llm = (llm.withColumn("_nth", nth)
           .withColumn("name", F.when(F.col("_nth") > 1, F.concat(F.col("name"), F.lit(" "), F.col("_nth")))
                       .otherwise(F.col("name")))
           .drop("keywords", "_nth").withColumn("source", F.lit("llm")))
    covered = llm.select(ITEM_ID).distinct()
    failed = (replied.filter(~ok | F.col("status").isNull()).select(ITEM_ID).distinct()
              .select(ITEM_ID, F.lit("fallback").alias("status")))
    missing = items.select(ITEM_ID).join(covered, ITEM_ID, "left_anti").join(failed, ITEM_ID, "left")
    return with_persona_ids(llm.unionByName(summary_only_personas(missing, summaries)))
