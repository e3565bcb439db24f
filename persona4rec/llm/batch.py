"""LLM calls through the provider's Batch API (`llm.mode: batch`): half the price, results within 24 h.

The same requests, cache keys, validation and re-ask rules as online calls; only the transport
differs. One round:

1. The requests without a success in `llm_calls` and not already in a batch are written (Spark)
   as JSONL lines `{"custom_id": key, "method": "POST", "url": ..., "body": {...}}`, hashed into
   files that respect the provider's per-file request and byte limits.
2. The round's files are uploaded (`/v1/files`), their requests recorded in `llm_batch_requests`
   as *submitted* with their file id (one MERGE), and only then are the batches created
   (`/v1/batches`) and their ids recorded in `llm_batches`. A job killed between any two of these
   steps resumes without paying twice: an uploaded file whose requests were never recorded is
   an orphan that costs nothing; a recorded file without a batch id is looked up among the
   provider's batches by its input file id and adopted, or created if it truly never was; a
   request recorded as submitted is never written into another file.
3. Open batches are polled with backoff. A finished one (completed, expired, cancelled, failed)
   has its output and error files downloaded to the work dir and folded (Spark) by the task's
   checks: a valid reply is a success in `llm_calls`; an invalid one is re-asked in the next
   round with the error appended (up to `llm.max_reasks`); an error line, or a request the
   batch never ran (expired, cancelled), goes into the next round (up to `llm.max_attempts`);
   anything else is a failure in `llm_calls`, retried by the next run as online failures are.
   `llm_calls` is written before the ledger, so folding the same batch again changes nothing.
4. Rounds repeat until nothing is queued or open. A run that waits longer than
   `llm.batch.wait_max_s` stops with `BatchesPending`; the next run resumes polling.

Driver memory: the driver streams files to and from the provider; what it collects or creates
is one row per batch file (chunk sizes, file ids, llm_batches rows, finished batches): requests
divided by 45,000, about 220 rows for 10M requests. The requests themselves stay in Spark.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import time
from typing import TYPE_CHECKING, Iterator

import pandas as pd
from pydantic import ValidationError
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.errors import BatchesPending
from persona4rec.llm.client import FAILED, SUCCEEDED, make_client, parse_reply, reask_messages, redact, request_params
from persona4rec.llm.prompts import approx_tokens
from persona4rec.schemas import LLM_BATCH_REQUESTS, LLM_BATCHES, LLM_CALLS

if TYPE_CHECKING:  # pragma: no cover
    from persona4rec.llm.runner import LLMRunner, LLMRunStats, LLMTask

log = logging.getLogger(__name__)

QUEUED, SUBMITTED, DONE = "queued", "submitted", "done"
FOLDED = "folded"  # llm_batches.status once its results are in llm_calls (else the provider's)
TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})
# Statuses of a response line worth another round: rate limits, provider errors, time-outs.
_TRANSIENT_CODES = frozenset({408, 409, 429})
_SIZE_MARGIN = 0.9  # files are planned at 90% of the limits; a hash bucket over them is split again

OUTCOME_SCHEMA = T.StructType([
    T.StructField("key", T.StringType(), False),
    T.StructField("input_file_id", T.StringType(), False),
    T.StructField("batch_id", T.StringType(), False),
    T.StructField("latency_ms", T.LongType(), False),
    T.StructField("state", T.StringType(), False),  # done | queued
    T.StructField("status", T.StringType(), True),  # succeeded | failed (done only)
    T.StructField("reply", T.StringType(), True),
    T.StructField("raw_reply", T.StringType(), True),
    T.StructField("error", T.StringType(), True),
    T.StructField("messages", T.StringType(), False),
    T.StructField("context", T.StringType(), True),
    T.StructField("rounds", T.IntegerType(), False),
    T.StructField("reasks", T.IntegerType(), False),
    T.StructField("transport_failures", T.IntegerType(), False),
    T.StructField("tokens_in", T.LongType(), False),
    T.StructField("tokens_out", T.LongType(), False),
    T.StructField("line_tokens_in", T.LongType(), False),  # this round's (what this batch billed)
    T.StructField("line_tokens_out", T.LongType(), False),
])


def batch_url(settings) -> str:
    if settings.batch.endpoint:
        return settings.batch.endpoint
    return "/chat/completions" if settings.provider == "azure" else "/v1/chat/completions"


def plan_files(n: int, size_bytes: int, max_requests: int, max_bytes: int) -> int:
    """How many files `n` requests of `size_bytes` in all need, planned below the limits."""
    return max(1, math.ceil(n / (_SIZE_MARGIN * max_requests)), math.ceil(size_bytes / (_SIZE_MARGIN * max_bytes)))


class BatchRun:
    """One task's batch rounds within one LLMRunner.run."""

    def __init__(self, runner: "LLMRunner", task: "LLMTask", stats: "LLMRunStats",
                 sleep=time.sleep, clock=time.monotonic):
        self.runner, self.task, self.stats = runner, task, stats
        self.spark, self.cfg, self.store = runner.spark, runner.cfg, runner.store
        self.settings = self.cfg.llm
        self.limits = self.settings.batch
        self.client = make_client(self.settings, runner.endpoint.base_url, runner.endpoint.api_key)
        # Read-only calls (status, list, download) use the client's own retries with backoff, so a
        # network blip during a long wait does not end the run; writes (upload, create) are never
        # retried blindly: a create that timed out may have happened (the next poll finds it).
        self.reader = self.client.with_options(max_retries=max(0, self.settings.max_attempts - 1))
        self.secret = runner.endpoint.api_key
        self.folder = os.path.join(self.cfg.work_dir("llm_batches"), task.name)
        self.params = request_params(self.settings, task.output_model, max_tokens=task.max_output_tokens)
        self.url = batch_url(self.settings)
        self._sleep, self._clock = sleep, clock
        self._round = 0

    # -- the loop -----------------------------------------------------------------------------
    def run(self, pending: DataFrame) -> None:
        """`pending`: the requests (REQUEST_SCHEMA) without a success in llm_calls. The first
        round also takes what an earlier run queued for a next round and never submitted."""
        deadline = self._clock() + self.limits.wait_max_s
        self._submit(pending, fresh=True)
        delay = self.limits.poll_initial_s
        while True:
            open_files = self._open_files()
            if not open_files:
                return
            batches = self._poll(open_files)
            finished = [(row, b) for row, b in batches if b.status in TERMINAL]
            if finished:
                if self._fold(finished):
                    self._submit(pending, fresh=False)  # re-asks and retries: the next round
                delay = self.limits.poll_initial_s
                continue
            if self._clock() + delay > deadline:
                ids = sorted(b.id for _, b in batches)
                raise BatchesPending(
                    f"llm {self.task.name}: {len(ids)} batch(es) still running at the provider after "
                    f"llm.batch.wait_max_s={self.limits.wait_max_s:g} s: {', '.join(ids[:10])}"
                    f"{' …' if len(ids) > 10 else ''}; rerun the job to resume polling them "
                    "(their requests are never submitted again)")
            self._sleep(delay)
            delay = min(delay * 2, self.limits.poll_max_s)

    # -- submission ---------------------------------------------------------------------------
    def _ledger(self) -> DataFrame:
        """This task's rows of llm_batch_requests (none before the first batch run)."""
        if not self.store.exists(LLM_BATCH_REQUESTS.name):
            return self.spark.createDataFrame([], LLM_BATCH_REQUESTS.schema)
        return self.store.read(LLM_BATCH_REQUESTS.name).filter(F.col("task") == self.task.name)

    def _to_send(self, pending: DataFrame, fresh: bool) -> DataFrame:
        """Rows of the ledger schema for this round: re-asks and retries queued by a fold, plus
        (first round) the pending requests in no open batch, with their counters reset."""
        base = pending.select("key", "messages", "context")
        zero = {"rounds": 0, "reasks": 0, "transport_failures": 0}
        prior = self._ledger().select("key", F.col("state").alias("_state"), F.col("messages").alias("_messages"),
                          *[F.col(c).alias(f"_{c}") for c in (*zero, "tokens_in", "tokens_out")])
        joined = base.join(prior, "key", "left")
        queued = F.col("_state") == QUEUED
        wanted = queued | (F.lit(fresh) & (F.col("_state").isNull() | (F.col("_state") == DONE)))
        return joined.filter(wanted).select(
            "key", F.when(queued, F.col("_messages")).otherwise(F.col("messages")).alias("messages"), "context",
            *[F.when(queued, F.col(f"_{c}")).otherwise(F.lit(v)).cast("int").alias(c) for c, v in zero.items()],
            *[F.when(queued, F.col(f"_{c}")).otherwise(F.lit(0)).cast("long").alias(c)
              for c in ("tokens_in", "tokens_out")])

    def _submit(self, pending: DataFrame, fresh: bool) -> int:
        """Write, upload and submit this round's requests; returns how many were submitted.

        Order matters for a job killed part-way: files are uploaded (an orphan file costs
        nothing), then their requests are recorded as submitted (from here on they are never
        written into another file), then the batches are created and their ids recorded (a file
        without a recorded batch is looked up at the provider, or created, by the next poll)."""
        params = json.dumps(self.params, ensure_ascii=False, separators=(",", ":"))
        # The request line, built in Spark: the key is hex and messages already JSON text.
        line = F.concat(F.lit('{"custom_id":"'), F.col("key"),
                        F.lit(f'","method":"POST","url":{json.dumps(self.url)},"body":{{"messages":'),
                        F.col("messages"), F.lit("," + params[1:-1] + "}}"))
        self._round += 1
        stage = os.path.join(self.folder, f"{self.runner.run_id}-r{self._round}")
        shutil.rmtree(stage, ignore_errors=True)
        self._to_send(pending, fresh).withColumn("line", line).write.mode("overwrite").parquet(
            os.path.join(stage, "rows"))
        rows = self.spark.read.parquet(os.path.join(stage, "rows"))
        agg = rows.agg(F.count("*").alias("n"), F.sum(F.octet_length("line") + 1).alias("b")).first()
        n, size = int(agg["n"]), int(agg["b"] or 0)
        if n == 0:
            shutil.rmtree(stage, ignore_errors=True)
            return 0
        max_req, max_bytes = self.limits.max_requests_per_file, self.limits.max_file_bytes
        files = plan_files(n, size, max_req, max_bytes)
        while True:  # a hash bucket over a limit: more buckets (rare; hashing is even)
            chunked = rows.withColumn("chunk", F.pmod(F.xxhash64("key"), F.lit(files)).cast("int"))
            sizes = {r["chunk"]: (int(r["n"]), int(r["b"])) for r in chunked.groupBy("chunk").agg(
                F.count("*").alias("n"), F.sum(F.octet_length("line") + 1).alias("b")).collect()}
            if all(c <= max_req and b <= max_bytes for c, b in sizes.values()):
                break
            if files >= n:
                raise ValueError(f"llm {self.task.name}: one request line is longer than "
                                 f"llm.batch.max_file_bytes={max_bytes}")
            files = min(n, math.ceil(files * 1.25) + 1)
        lines_dir = os.path.join(stage, "lines")
        chunked.select("line", "chunk").repartition(files, "chunk").write.mode("overwrite") \
            .partitionBy("chunk").text(lines_dir)
        uploads = []
        for chunk, path in self._chunk_files(lines_dir, set(sizes)):
            name = f"{self.task.name}-{self.runner.run_id}-r{self._round}-{chunk}.jsonl"
            with open(path, "rb") as fh:
                uploads.append((chunk, self.client.files.create(file=(name, fh), purpose="batch").id))
        mapping = self.spark.createDataFrame(uploads, "chunk int, input_file_id string")
        self.store.upsert(chunked.join(F.broadcast(mapping), "chunk").select(
            "key", F.lit(self.task.name).alias("task"), F.lit(SUBMITTED).alias("state"), "input_file_id",
            "messages", "context", (F.col("rounds") + 1).alias("rounds"), "reasks", "transport_failures",
            "tokens_in", "tokens_out", F.lit(None).cast("string").alias("last_error"),
            F.current_timestamp().alias("updated_at")), LLM_BATCH_REQUESTS)
        records = []
        for chunk, file_id in uploads:
            batch = self._create(file_id)
            records.append({"input_file_id": file_id, "batch_id": batch.id, "status": batch.status,
                            "requests": sizes[chunk][0], "bytes": sizes[chunk][1]})
        self._record(records)
        log.info("llm %s: round %d: %d request(s) submitted in %d batch(es) (%d bytes)",
                 self.task.name, self._round, n, len(uploads), size)
        shutil.rmtree(stage, ignore_errors=True)
        return n

    def _chunk_files(self, lines_dir: str, chunks: set[int]) -> list[tuple[int, str]]:
        """One local file per chunk, whatever the writer left: several part files of a chunk
        (spark.sql.files.maxRecordsPerFile, another commit protocol) are joined into one, so a
        chunk is never uploaded twice; a chunk with no file stops the round before any upload."""
        out = []
        for chunk in sorted(chunks):
            parts = sorted(glob.glob(os.path.join(lines_dir, f"chunk={chunk}", "part-*")))
            if not parts:
                raise RuntimeError(f"llm {self.task.name}: the request file of chunk {chunk} is missing "
                                   f"under {lines_dir}; nothing was uploaded")
            if len(parts) > 1:
                joined = os.path.join(lines_dir, f"chunk-{chunk}.jsonl")
                with open(joined, "wb") as out_fh:
                    for part in parts:
                        with open(part, "rb") as in_fh:
                            shutil.copyfileobj(in_fh, out_fh)
                parts = [joined]
            out.append((chunk, parts[0]))
        return out

    def _create(self, input_file_id: str):
        batch = self.client.batches.create(
            input_file_id=input_file_id, endpoint=self.url, completion_window=self.limits.completion_window,
            metadata={"persona4rec_task": self.task.name, "persona4rec_run": self.runner.run_id})
        log.info("llm %s: batch %s submitted (input file %s)", self.task.name, batch.id, input_file_id)
        return batch

    def _record(self, records: list[dict]) -> None:
        """Rows of llm_batches in one MERGE; what a record leaves out keeps its current value."""
        if not records:
            return
        current = {}
        if self.store.exists(LLM_BATCHES.name):
            ids = [r["input_file_id"] for r in records]
            current = {r["input_file_id"]: r.asDict() for r in self.store.read(LLM_BATCHES.name)
                       .filter(F.col("input_file_id").isin(ids)).collect()}
        rows = []
        for rec in records:
            old = current.get(rec["input_file_id"], {})
            row = {c: rec.get(c) if rec.get(c) is not None else old.get(c)
                   for c in ("input_file_id", "batch_id", "status", "requests", "bytes", "output_file_id",
                             "error_file_id")}
            row.update(task=self.task.name, run_id=self.runner.run_id,
                       requests=row["requests"] or 0, bytes=row["bytes"] or 0)
            rows.append(row)
        schema = T.StructType([f for f in LLM_BATCHES.schema.fields if f.name != "updated_at"])
        df = self.spark.createDataFrame([{f.name: r[f.name] for f in schema.fields} for r in rows], schema)
        self.store.upsert(df.withColumn("updated_at", F.current_timestamp()), LLM_BATCHES)

    # -- polling ------------------------------------------------------------------------------
    def _open_files(self) -> list[dict]:
        """Input files with requests still recorded as submitted (one row per batch file: small),
        with what llm_batches knows of their batch."""
        files = self._ledger().filter(F.col("state") == SUBMITTED).groupBy("input_file_id").agg(F.count("*").alias("requests"))
        if self.store.exists(LLM_BATCHES.name):
            files = files.join(self.store.read(LLM_BATCHES.name).select("input_file_id", "batch_id", "status"),
                               "input_file_id", "left")
        else:
            files = files.select("*", F.lit(None).cast("string").alias("batch_id"),
                                 F.lit(None).cast("string").alias("status"))
        return [r.asDict() for r in files.orderBy("input_file_id").collect()]

    def _poll(self, open_files: list[dict]) -> list[tuple[dict, object]]:
        """Each open file's batch, as the provider sees it now. A file without a recorded batch id
        (the job died between upload and recording its batch) is looked up among the provider's
        batches by its input file, and submitted only if it never was. Changes are recorded."""
        out, changed = [], []
        for row in open_files:
            if row.get("batch_id"):
                batch = self.reader.batches.retrieve(row["batch_id"])
            else:
                batch = self._find(row["input_file_id"])
                if batch is None:
                    log.warning("llm %s: input file %s was uploaded but never submitted; submitting it now",
                                self.task.name, row["input_file_id"])
                    batch = self._create(row["input_file_id"])
                else:
                    log.warning("llm %s: adopted batch %s of input file %s (submitted by a run that died "
                                "before recording it)", self.task.name, batch.id, row["input_file_id"])
            # A finished batch is recorded by its fold, right after.
            if batch.status not in TERMINAL and (batch.id != row.get("batch_id") or batch.status != row.get("status")):
                changed.append({"input_file_id": row["input_file_id"], "batch_id": batch.id,
                                "status": batch.status, "requests": row["requests"]})
            counts = getattr(batch, "request_counts", None)
            log.info("llm %s: batch %s %s (%s/%s done, %s failed)", self.task.name, batch.id, batch.status,
                     getattr(counts, "completed", "?"), getattr(counts, "total", "?"),
                     getattr(counts, "failed", "?"))
            out.append((row, batch))
        self._record(changed)
        return out

    def _find(self, input_file_id: str):
        """The provider's batch for an input file, searched newest first back to the file's upload."""
        try:
            since = self.reader.files.retrieve(input_file_id).created_at - 300
        except Exception:  # noqa: BLE001 - the file may be gone; then search everything listed
            since = 0
        for batch in self.reader.batches.list(limit=100):
            if batch.input_file_id == input_file_id:
                return batch
            if batch.created_at < since:
                break
        return None

    # -- folding results ----------------------------------------------------------------------
    def _download(self, file_id: str | None, batch_id: str, kind: str) -> str | None:
        if not file_id:
            return None
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"{batch_id}.{kind}.jsonl")
        with self.reader.files.with_streaming_response.content(file_id) as resp:
            resp.stream_to_file(path)
        return path

    def _fold(self, finished: list[tuple[dict, object]]) -> int:
        """Finished batches' results into llm_calls (final) and the ledger (next round), in one
        MERGE each whatever the number of batches; returns how many went into the next round."""
        meta, paths = [], []
        for row, batch in finished:
            for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "error")):
                path = self._download(file_id, batch.id, kind)
                if path:
                    paths.append(path)
            errors = getattr(batch, "errors", None)
            error = "; ".join(f"{e.code}: {e.message}" for e in (getattr(errors, "data", None) or [])[:3]) or None
            ended = batch.completed_at or batch.expired_at or batch.cancelled_at or batch.failed_at or time.time()
            meta.append((row["input_file_id"], batch.id, batch.status, error,
                         int(max(0, ended - batch.created_at) * 1000) if batch.created_at else 0))
        meta_df = self.spark.createDataFrame(
            meta, "input_file_id string, batch_id string, batch_status string, batch_error string, latency_ms long")
        if paths:
            # One line per key; should a provider ever answer a key twice, a 200 wins (it was paid).
            ok_first = Window.partitionBy("key").orderBy(
                (F.get_json_object("line", "$.response.status_code") == "200").desc_nulls_last(), "line")
            lines = self.spark.read.text(paths).select(
                F.get_json_object("value", "$.custom_id").alias("key"), F.col("value").alias("line")) \
                .withColumn("_rn", F.row_number().over(ok_first)).filter("_rn = 1").drop("_rn")
        else:
            lines = self.spark.createDataFrame([], "key string, line string")
        submitted = self._ledger().filter(F.col("state") == SUBMITTED).join(F.broadcast(meta_df), "input_file_id")
        fn = _judge_partition(self.task, self.settings, self.secret)
        # Staged on disk, not cached: the outcomes are computed from the ledger, and a cache
        # evicted after the ledger MERGE below would recompute them from the changed ledger.
        staged = os.path.join(self.folder, f"{self.runner.run_id}-fold-{finished[0][1].id}")
        submitted.join(lines, "key", "left").mapInPandas(fn, OUTCOME_SCHEMA).write.mode("overwrite").parquet(staged)
        outcomes = self.spark.read.parquet(staged)
        agg = outcomes.agg(
            F.sum(F.when(F.col("state") == DONE, 1).otherwise(0)).alias("done"),
            F.sum(F.when(F.col("status") == SUCCEEDED, 1).otherwise(0)).alias("ok"),
            F.sum("line_tokens_in").alias("tin"), F.sum("line_tokens_out").alias("tout"),
            F.count("*").alias("n")).first()
        finals = outcomes.filter(F.col("state") == DONE).select(
            "key", F.lit(self.task.name).alias("task"), F.lit(self.task.prompt.fingerprint).alias("prompt"),
            F.lit(self.settings.model).alias("model"), "status",
            F.concat(F.lit('{"messages":'), F.col("messages"),
                     F.lit(',"params":' + json.dumps(self.params, ensure_ascii=False) + ',"batch":"'),
                     F.col("batch_id"), F.lit('"}')).alias("request"),
            "reply", "raw_reply", "error", F.col("rounds").alias("attempts"), "tokens_in", "tokens_out",
            "latency_ms", F.lit(self.runner.run_id).alias("run_id"), F.current_timestamp().alias("finished_at"))
        # llm_calls first, the ledger second: a fold interrupted between them is done again whole.
        self.store.upsert(finals, LLM_CALLS, update_condition=f"t.status <> '{SUCCEEDED}'")
        self.store.upsert(outcomes.select(
            "key", F.lit(self.task.name).alias("task"), "state",
            # A finished request keeps the file it was answered in (for tracing); a queued one has none yet.
            F.when(F.col("state") == DONE, F.col("input_file_id")).alias("input_file_id"),
            "messages", "context", "rounds", "reasks", "transport_failures", "tokens_in", "tokens_out",
            F.col("error").alias("last_error"), F.current_timestamp().alias("updated_at")), LLM_BATCH_REQUESTS)
        shutil.rmtree(staged, ignore_errors=True)
        self._record([{"input_file_id": row["input_file_id"], "batch_id": batch.id, "status": FOLDED,
                       "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id}
                      for row, batch in finished])
        for p in paths:
            os.remove(p)
        n, done, ok = int(agg["n"] or 0), int(agg["done"] or 0), int(agg["ok"] or 0)
        s = self.stats
        s.called += done
        s.succeeded += ok
        s.failed += done - ok
        s.tokens_in += int(agg["tin"] or 0)
        s.tokens_out += int(agg["tout"] or 0)
        log.info("llm %s: %d batch(es) folded (%s): %d request(s), %d succeeded, %d failed, %d into the next round",
                 self.task.name, len(finished), ", ".join(f"{b.id} {b.status}" for _, b in finished), n, ok,
                 done - ok, n - done)
        return n - done


# -- executor side ---------------------------------------------------------------------------
def _judge_partition(task: "LLMTask", settings, secret: str | None):
    def judge_partition(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in frames:
            out = [judge(row, task, settings, secret) for row in pdf.to_dict("records")]
            yield pd.DataFrame(out, columns=OUTCOME_SCHEMA.fieldNames())
    return judge_partition


def judge(row: dict, task: "LLMTask", settings, secret: str | None = None) -> dict:
    """What one request's result line means: success, failure, or a next round (re-ask or retry).

    `row` is a ledger row plus its batch (`batch_id`, `batch_status`, `batch_error`,
    `latency_ms`) and `line`: the output or error file line, None when the batch never ran the
    request."""
    out = {k: row[k] for k in ("key", "messages", "context", "rounds", "reasks", "transport_failures",
                               "input_file_id", "batch_id", "latency_ms")}
    out.update(status=None, reply=None, raw_reply=None, error=None, line_tokens_in=0, line_tokens_out=0)
    tokens_in, tokens_out = int(row["tokens_in"]), int(row["tokens_out"])
    batch_status, batch_error = row["batch_status"], row.get("batch_error")

    def final(status: str, error: str | None = None) -> dict:
        out.update(state=DONE, status=status, error=redact(error, secret),
                   tokens_in=tokens_in + out["line_tokens_in"], tokens_out=tokens_out + out["line_tokens_out"])
        return out

    def again(error: str, transient: bool, messages: str | None = None) -> dict:
        if transient:
            out["transport_failures"] += 1
            if out["transport_failures"] >= settings.max_attempts:
                return final(FAILED, error)
        out.update(state=QUEUED, error=redact(error, secret), messages=messages or out["messages"],
                   tokens_in=tokens_in + out["line_tokens_in"], tokens_out=tokens_out + out["line_tokens_out"])
        return out

    line = row.get("line")
    if line is None or (isinstance(line, float) and math.isnan(line)):
        reason = f"batch {batch_status}" + (f": {batch_error}" if batch_error else "") + " before this request ran"
        # A failed batch: the provider refused the whole file, not worth another round now;
        # except for its queue limit (too many tokens enqueued), which clears as batches finish.
        if batch_status == "failed" and "token_limit_exceeded" not in (batch_error or ""):
            return final(FAILED, reason)
        return again(reason, transient=True)
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:  # a cut-off result file: the request goes into the next round
        return again(f"unreadable result line ({exc.msg} at column {exc.colno})", transient=True)
    if not isinstance(rec, dict):
        return again("unreadable result line (not a JSON object)", transient=True)
    response = rec.get("response") or {}
    if rec.get("error") or response.get("status_code") != 200:
        err = rec.get("error") or (response.get("body") or {}).get("error") or {}
        code = response.get("status_code")
        text = f"batch line {code or err.get('code')}: {err.get('message') or err}"
        transient = code is None or code >= 500 or code in _TRANSIENT_CODES
        return again(text, transient) if transient else final(FAILED, text)
    body = response.get("body") or {}
    usage = body.get("usage") or {}
    choices = body.get("choices") or []
    raw = ((choices[0].get("message") or {}).get("content")) if choices else None
    messages = json.loads(row["messages"])
    out["line_tokens_in"] = int(usage.get("prompt_tokens") or sum(approx_tokens(m["content"]) for m in messages))
    out["line_tokens_out"] = int(usage.get("completion_tokens") or approx_tokens(raw or ""))
    out["raw_reply"] = raw
    try:
        obj = parse_reply(raw, task.output_model)
        if task.check is not None:
            task.check(json.loads(row["context"]) if row.get("context") else {}, obj)
    except (ValueError, ValidationError) as exc:
        error = f"invalid reply: {exc}"
        if out["reasks"] >= settings.max_reasks:
            return final(FAILED, error)
        out["reasks"] += 1
        return again(error, transient=False,
                     messages=json.dumps(reask_messages(messages, raw, exc), ensure_ascii=False))
    out["reply"] = obj.model_dump_json()
    return final(SUCCEEDED)
