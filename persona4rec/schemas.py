"""Table names, column names and schemas: the one place that defines the data contracts.

Every stage reads and writes through these names; `require_columns` checks a stage's input at the
boundary so a wrong table fails with the table and the missing column named.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import types as T


class SchemaError(ValueError):
    """An input table lacks a column or has the wrong type for it."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: T.StructType
    keys: tuple[str, ...]
    partition_by: tuple[str, ...] = ()
    # Columns written on insert only (e.g. first-seen times); a rerun never rewrites them.
    insert_only: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]


# -- column names shared by many tables ------------------------------------------------------
USER_ID = "user_id"
ITEM_ID = "item_id"
RATING = "rating"
TS = "ts"  # event time, Unix seconds (UTC)
SOURCE_FILE = "source_file"
SOURCE_LINE = "source_line"

SPLIT = "split"
TRAIN, VALIDATION, TEST = "train", "validation", "test"
# A kept review outside the k-core: history in production mode, never part of leave-one-out.
OUTSIDE_CORE = "outside_core"
# user_vectors.history_splits in production mode: every kept interaction, whatever its split.
ALL_HISTORY = "all"

REVIEWS = TableSpec(
    name="reviews",
    keys=(USER_ID, ITEM_ID),
    schema=T.StructType([
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField(RATING, T.DoubleType(), False),
        T.StructField(TS, T.LongType(), False),
        T.StructField("review_title", T.StringType(), True),
        T.StructField("review_text", T.StringType(), False),
        T.StructField("helpful_votes", T.IntegerType(), True),
        T.StructField("verified", T.BooleanType(), True),
        T.StructField("source_format", T.StringType(), False),
        T.StructField(SOURCE_FILE, T.StringType(), False),
        T.StructField(SOURCE_LINE, T.LongType(), True),
    ]),
)

ITEMS = TableSpec(
    name="items",
    keys=(ITEM_ID,),
    schema=T.StructType([
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField("title", T.StringType(), True),
        T.StructField("description", T.StringType(), True),
        T.StructField("categories", T.ArrayType(T.StringType()), True),
        T.StructField("brand", T.StringType(), True),
        T.StructField("main_category", T.StringType(), True),
        T.StructField("features", T.ArrayType(T.StringType()), True),
        T.StructField("details", T.MapType(T.StringType(), T.StringType()), True),
        # False for items seen in reviews that have no metadata record (cold metadata).
        T.StructField("has_metadata", T.BooleanType(), False),
        T.StructField("source_format", T.StringType(), False),
        T.StructField(SOURCE_FILE, T.StringType(), True),
        T.StructField(SOURCE_LINE, T.LongType(), True),
    ]),
)

SPLITS = TableSpec(
    name="splits",
    keys=(USER_ID, ITEM_ID),
    schema=T.StructType([
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField(TS, T.LongType(), False),
        # 1-based position in the user's time-ordered (ts, item_id) history.
        T.StructField("seq", T.IntegerType(), False),
        T.StructField(SPLIT, T.StringType(), False),
    ]),
)

REJECTED_RECORDS = TableSpec(
    name="rejected_records",
    keys=("record_id",),
    insert_only=("first_seen_at",),
    schema=T.StructType([
        T.StructField("record_id", T.StringType(), False),
        T.StructField("table", T.StringType(), False),  # the table the record was meant for
        T.StructField(SOURCE_FILE, T.StringType(), False),
        T.StructField(SOURCE_LINE, T.LongType(), True),
        T.StructField("reason", T.StringType(), False),  # a code, see ingest.records.Reason
        T.StructField("field", T.StringType(), True),
        T.StructField("message", T.StringType(), False),
        T.StructField("raw", T.StringType(), True),
        T.StructField("first_seen_at", T.TimestampType(), False),
    ]),
)


_LLM_PROVENANCE = [
    T.StructField("status", T.StringType(), False),  # succeeded | failed | fallback | skipped
    T.StructField("llm_key", T.StringType(), True),
    T.StructField("prompt", T.StringType(), True),
    T.StructField("model", T.StringType(), True),
]

ITEM_SUMMARIES = TableSpec(
    name="item_summaries",
    keys=(ITEM_ID,),
    schema=T.StructType([
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField("summary", T.StringType(), False),
        # llm | fallback (metadata text, used while the LLM call has not succeeded)
        T.StructField("source", T.StringType(), False),
        *_LLM_PROVENANCE,
    ]),
)

ASPECT_SLOTS = ("category_preference", "purchase_purpose", "quality_criteria", "usage_context")

REVIEW_ASPECTS = TableSpec(
    name="review_aspects",
    keys=(USER_ID, ITEM_ID),
    schema=T.StructType([
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField(RATING, T.DoubleType(), False),
        T.StructField("helpful_votes", T.IntegerType(), True),
        *[f for slot in ASPECT_SLOTS for f in (T.StructField(slot, T.StringType(), True),
                                                 T.StructField(f"{slot}_reason", T.StringType(), True))],
        T.StructField("null_slots", T.IntegerType(), True),
        # False when more than offline.max_null_slot_ratio of the slots are null, or the call failed:
        # kept in the table, left out of the persona pool.
        T.StructField("kept", T.BooleanType(), False),
        T.StructField("error", T.StringType(), True),
        *_LLM_PROVENANCE,
    ]),
)

ITEM_PERSONAS = TableSpec(
    name="item_personas",
    keys=("persona_id",),
    schema=T.StructType([
        T.StructField("persona_id", T.StringType(), False),  # item_id#index-texthash: stable per text
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField("persona_index", T.IntegerType(), False),
        T.StructField("name", T.StringType(), False),
        T.StructField("description", T.StringType(), False),
        T.StructField("preference_rationale", T.StringType(), False),
        T.StructField("persona_text", T.StringType(), False),  # what the encoder embeds
        T.StructField("source", T.StringType(), False),  # llm | summary_only
        T.StructField("pool_size", T.IntegerType(), False),  # aspect tuples the LLM saw
        *_LLM_PROVENANCE,
    ]),
)

ALIGNMENT_PAIRS = TableSpec(
    name="alignment_pairs",
    keys=(USER_ID, ITEM_ID),
    schema=T.StructType([
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField(TS, T.LongType(), False),
        T.StructField("persona_id", T.StringType(), False),
        T.StructField("justification", T.StringType(), False),
        T.StructField("history_item_ids", T.ArrayType(T.StringType()), False),
        # status: succeeded (judged) | single (the item has one persona) | cluster (extractive builder)
        *_LLM_PROVENANCE,
    ]),
)

# Extractive persona builder only: the persona whose review cluster holds this user's review.
REVIEW_CLUSTERS = TableSpec(
    name="review_clusters",
    keys=(USER_ID, ITEM_ID),
    schema=T.StructType([
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField("persona_id", T.StringType(), False),
    ]),
)

_VECTOR = T.ArrayType(T.FloatType())

PERSONA_INDEX = TableSpec(
    name="persona_index",
    keys=("persona_id",),
    schema=T.StructType([
        T.StructField("persona_id", T.StringType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField("persona_index", T.IntegerType(), False),
        T.StructField("name", T.StringType(), False),
        T.StructField("description", T.StringType(), False),
        T.StructField("preference_rationale", T.StringType(), False),
        T.StructField("embedding", _VECTOR, False),  # L2-normalised
        T.StructField("model_version", T.StringType(), False),
    ]),
)

INTERACTION_EMBEDDINGS = TableSpec(
    name="interaction_embeddings",
    keys=(USER_ID, ITEM_ID),
    schema=T.StructType([
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField(TS, T.LongType(), False),
        # 1-based position among all of the user's kept reviews by (ts, item_id): the splits'
        # order, extended to the interactions outside the k-core.
        T.StructField("seq", T.IntegerType(), False),
        T.StructField(SPLIT, T.StringType(), False),  # train | validation | test | outside_core
        T.StructField("text_hash", T.StringType(), False),
        T.StructField("embedding", _VECTOR, False),
        T.StructField("model_version", T.StringType(), False),
    ]),
)

TEXT_EMBEDDINGS = TableSpec(
    name="text_embeddings",
    keys=("text_hash",),
    schema=T.StructType([
        # sha2-256 of the text: a content address, so a text that many rows share (a persona
        # member that is also in a user's window, a repeated review excerpt) is encoded once
        T.StructField("text_hash", T.StringType(), False),
        T.StructField("embedding", _VECTOR, False),  # L2-normalised, under model_version
        T.StructField("model_version", T.StringType(), False),
    ]),
)

USER_VECTORS = TableSpec(
    name="user_vectors",
    keys=(USER_ID,),
    schema=T.StructType([
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField("model_version", T.StringType(), False),
        # "all" (production: every kept interaction) or the evaluation splits, e.g. "train,validation"
        T.StructField("history_splits", T.StringType(), False),
        T.StructField("n_history", T.IntegerType(), False),  # cached rows of that history (its newest; k used)
        T.StructField("history_signature", T.LongType(), False),  # xor of row hashes: changes iff the history does
        T.StructField("k", T.IntegerType(), False),  # profile.k the vector was built with
        T.StructField("gamma", T.DoubleType(), False),  # profile.gamma the vector was built with
        T.StructField("vector", _VECTOR, False),  # L2-normalised γ-decayed mean of the last k embeddings
    ]),
)

# Where a user's candidates came from (candidates.source, recommendations.path).
FROM_MODEL = "cf"  # the generator's own top-N
FROM_POPULAR = "popular"  # the generator has no factors for the user: popular items they never interacted with

CANDIDATES = TableSpec(
    name="candidates",
    keys=("mode", "generator", USER_ID, ITEM_ID),
    partition_by=("mode", "generator"),
    schema=T.StructType([
        T.StructField("mode", T.StringType(), False),  # production | evaluation (see config `mode`)
        T.StructField("generator", T.StringType(), False),  # als | bpr
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField("cf_score", T.DoubleType(), False),  # the generator's score, or popularity for `popular`
        T.StructField("cf_rank", T.IntegerType(), False),
        T.StructField("source", T.StringType(), False),  # cf | popular
    ]),
)

RECOMMENDATIONS = TableSpec(
    name="recommendations",
    keys=("run_date", "mode", "generator", USER_ID, "rank"),
    partition_by=("run_date",),
    schema=T.StructType([
        T.StructField("run_date", T.DateType(), False),
        T.StructField("mode", T.StringType(), False),  # production (the e-mails) | evaluation
        T.StructField("generator", T.StringType(), False),
        T.StructField("model_version", T.StringType(), False),
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField("rank", T.IntegerType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField("score", T.DoubleType(), False),
        T.StructField("persona_score", T.DoubleType(), True),
        T.StructField("cf_rank", T.IntegerType(), False),
        T.StructField("persona_id", T.StringType(), True),
        T.StructField("persona_name", T.StringType(), True),
        T.StructField("explanation", T.StringType(), False),
        T.StructField("has_history", T.BooleanType(), False),  # false: CF order, generic explanation
        # cf: the generator's candidates, reranked; popular: the cold-user fallback, reranked
        T.StructField("path", T.StringType(), False),
    ]),
)

EVALUATION_METRICS = TableSpec(
    name="evaluation_metrics",
    keys=("run_id", SPLIT, "generator", "variant", "scenario", "k"),
    schema=T.StructType([
        T.StructField("run_id", T.StringType(), False),  # the MLflow run of the evaluation
        T.StructField("evaluated_at", T.TimestampType(), False),
        T.StructField(SPLIT, T.StringType(), False),  # validation | test
        T.StructField("generator", T.StringType(), False),
        T.StructField("variant", T.StringType(), False),  # generator | vanilla | finetuned | … (README)
        T.StructField("alpha", T.DoubleType(), True),
        T.StructField("scenario", T.StringType(), False),  # all | warm_users | cold_users | head_items | tail_items
        T.StructField("k", T.IntegerType(), False),
        T.StructField("users", T.LongType(), False),
        T.StructField("hr", T.DoubleType(), False),
        T.StructField("mrr", T.DoubleType(), False),
        T.StructField("ndcg", T.DoubleType(), False),
    ]),
)

EVALUATION_RANKS = TableSpec(
    name="evaluation_ranks",
    keys=("run_id", SPLIT, "generator", "variant", USER_ID),
    schema=T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField(SPLIT, T.StringType(), False),
        T.StructField("generator", T.StringType(), False),
        T.StructField("variant", T.StringType(), False),
        T.StructField("alpha", T.DoubleType(), True),
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField("target_rank", T.IntegerType(), True),  # null: the held-out item was no candidate
    ]),
)

LLM_CALLS = TableSpec(
    name="llm_calls",
    keys=("key",),
    schema=T.StructType([
        # sha256 of (task prompt fingerprint, request parameters, messages): the response cache key.
        T.StructField("key", T.StringType(), False),
        T.StructField("task", T.StringType(), False),
        T.StructField("prompt", T.StringType(), False),  # task/domain/vN-texthash
        T.StructField("model", T.StringType(), False),
        T.StructField("status", T.StringType(), False),  # succeeded | failed
        T.StructField("request", T.StringType(), False),  # messages + parameters, JSON
        T.StructField("reply", T.StringType(), True),  # validated output, JSON
        T.StructField("raw_reply", T.StringType(), True),
        T.StructField("error", T.StringType(), True),
        T.StructField("attempts", T.IntegerType(), False),
        T.StructField("tokens_in", T.LongType(), False),
        T.StructField("tokens_out", T.LongType(), False),
        T.StructField("latency_ms", T.LongType(), False),
        T.StructField("run_id", T.StringType(), False),
        T.StructField("finished_at", T.TimestampType(), False),
    ]),
)


# -- Batch API mode (llm.mode: batch) ---------------------------------------------------------
# One row per request that is queued for, or was sent in, a batch: the durable state that lets a
# killed job resume polling instead of paying again. Written before the batch is created.
LLM_BATCH_REQUESTS = TableSpec(
    name="llm_batch_requests",
    keys=("key",),
    schema=T.StructType([
        T.StructField("key", T.StringType(), False),  # llm_calls.key
        T.StructField("task", T.StringType(), False),
        T.StructField("state", T.StringType(), False),  # queued | submitted | done
        T.StructField("input_file_id", T.StringType(), True),  # the batch input file it is in (submitted)
        T.StructField("messages", T.StringType(), False),  # the conversation to send (re-asks appended)
        T.StructField("context", T.StringType(), True),  # handed to the task's reply check
        T.StructField("rounds", T.IntegerType(), False),  # batches it was sent in
        T.StructField("reasks", T.IntegerType(), False),
        T.StructField("transport_failures", T.IntegerType(), False),  # error lines, expired, cancelled
        T.StructField("tokens_in", T.LongType(), False),
        T.StructField("tokens_out", T.LongType(), False),
        T.StructField("last_error", T.StringType(), True),
        T.StructField("updated_at", T.TimestampType(), False),
    ]),
)

# One row per batch input file and its batch (the file id is known before the batch exists).
LLM_BATCHES = TableSpec(
    name="llm_batches",
    keys=("input_file_id",),
    schema=T.StructType([
        T.StructField("input_file_id", T.StringType(), False),
        T.StructField("task", T.StringType(), False),
        T.StructField("batch_id", T.StringType(), True),  # null until the batch is created
        T.StructField("status", T.StringType(), False),  # the provider's status, then folded
        T.StructField("requests", T.LongType(), False),
        T.StructField("bytes", T.LongType(), False),
        T.StructField("output_file_id", T.StringType(), True),
        T.StructField("error_file_id", T.StringType(), True),
        T.StructField("run_id", T.StringType(), False),
        T.StructField("updated_at", T.TimestampType(), False),
    ]),
)


def require_columns(df: DataFrame, table: str, columns: list[str] | tuple[str, ...]) -> None:
    """Fail with the table and the missing columns named, before any work is done on it."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SchemaError(f"table '{table}' lacks column(s) {missing}; it has {df.columns}")
