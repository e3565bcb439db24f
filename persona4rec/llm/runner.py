"""LLM calls as a Spark stage: cache anti-join, bounded concurrency, global rate limit, journal, MERGE.

(This is `llm.mode: online`; `llm.mode: batch` hands the same pending requests to
`persona4rec.llm.batch`, the provider's Batch API.)

A stage hands over a DataFrame of requests (`key, messages, context, partition_key, est_tokens`);
only keys without a succeeded row in `llm_calls` are called. Calls run inside `mapInPandas`, a
thread pool of `llm.concurrency_per_task` per task, with the job-wide rate limit divided over the
tasks that run at once. Every finished call is journaled at once and folded into `llm_calls`, so
a rerun, a crash or a task retry never pays twice for a succeeded request; failed ones are
retried by the next run.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import pandas as pd
from pydantic import BaseModel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.config import Config, LLMSettings
from persona4rec.llm.client import SUCCEEDED, StructuredCaller, make_client, request_params
from persona4rec.llm.journal import JournalTail, JournalWriter, journal_files, read_journal, remove_files
from persona4rec.llm.prompts import Prompt
from persona4rec.llm.ratelimit import RateLimiter, RateShare
from persona4rec.schemas import LLM_CALLS
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)

REQUEST_SCHEMA = T.StructType([
    T.StructField("key", T.StringType(), False),
    T.StructField("messages", T.StringType(), False),  # JSON list of chat messages
    T.StructField("context", T.StringType(), True),  # JSON handed to the task's reply check
    T.StructField("partition_key", T.StringType(), False),
    T.StructField("est_tokens", T.LongType(), False),
])


def request_schema(*extra: T.StructField) -> T.StructType:
    """REQUEST_SCHEMA plus a stage's own columns (ids it needs to join replies back)."""
    return T.StructType(list(REQUEST_SCHEMA.fields) + list(extra))


_JOURNAL_SCHEMA = T.StructType([f if f.name != "finished_at" else T.StructField("finished_at", T.DoubleType())
                                for f in LLM_CALLS.schema.fields])


@dataclass(frozen=True)
class LLMTask:
    """One kind of request: its prompt, output model and an optional semantic check of a reply
    against the request's context (raise ValueError to have the model re-asked)."""
    name: str
    prompt: Prompt
    output_model: type[BaseModel]
    check: Callable[[dict, BaseModel], None] | None = None
    # Reply budget; enough for the longest valid reply (the schema bounds every string).
    max_output_tokens: int = 512


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key: str | None = field(default=None, repr=False)  # never printed


@dataclass
class LLMRunStats:
    task: str
    requested: int = 0
    cached: int = 0
    called: int = 0
    succeeded: int = 0
    failed: int = 0
    recovered: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def cache_key(task: LLMTask, params: dict, messages: list[dict]) -> str:
    blob = json.dumps({"prompt": task.prompt.fingerprint, "params": params, "messages": messages},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def make_request(task: LLMTask, settings: LLMSettings, messages: list[dict],
                 context: dict | None, partition_key: str) -> dict:
    """One row of REQUEST_SCHEMA (used by the stages inside their mapInPandas)."""
    params = request_params(settings, task.output_model, max_tokens=task.max_output_tokens)
    text = json.dumps(messages, ensure_ascii=False)
    return {"key": cache_key(task, params, messages), "messages": text,
            "context": json.dumps(context, ensure_ascii=False) if context is not None else None,
            "partition_key": partition_key,
            "est_tokens": len(text) // 4 + params["max_tokens"]}


class LLMRunner:
    def __init__(self, spark: SparkSession, cfg: Config, endpoint: Endpoint, run_id: str | None = None):
        self.spark, self.cfg, self.endpoint = spark, cfg, endpoint
        self.store = TableStore(spark, cfg)
        self.run_id = run_id or uuid.uuid4().hex[:12]

    def journal_dir(self, task: str) -> str:
        return os.path.join(self.cfg.work_dir("llm_journal"), task)

    # -- driver side ------------------------------------------------------------------------
    def run(self, task: LLMTask, requests: DataFrame) -> LLMRunStats:
        started = time.time()
        stats = LLMRunStats(task=task.name)
        stats.recovered = self.recover(task.name)
        requests = requests.select(REQUEST_SCHEMA.fieldNames()).dropDuplicates(["key"])
        done = self.succeeded_keys()
        pending = requests.join(done, "key", "left_anti").persist()
        stats.requested = requests.count()
        n = pending.count()
        stats.cached = stats.requested - n
        if self.cfg.llm.mode == "batch":
            # Always: a killed run's open batches are polled and folded even when nothing is new.
            from persona4rec.llm.batch import BatchRun

            BatchRun(self, task, stats).run(pending)
        elif n:
            parallel = max(1, min(self.spark.sparkContext.defaultParallelism, n))
            llm = self.cfg.llm
            share = RateShare.divide(llm.requests_per_minute, llm.tokens_per_minute, llm.burst_s, parallel)
            folder = self.journal_dir(task.name)
            fn = _call_partition(llm, self.endpoint, task, share, folder, self.run_id)
            progress = _Progress(folder, task.name, n, self.cfg.llm.progress_interval_s)
            progress.start()
            # Adaptive execution would coalesce these small partitions into one task and halve the
            # concurrency the rate share was computed for.
            coalesce_key = "spark.sql.adaptive.coalescePartitions.enabled"
            previous = self.spark.conf.get(coalesce_key, "true")
            self.spark.conf.set(coalesce_key, "false")
            try:
                # Range partitioning on (partition_key, key) keeps a partition key's requests
                # together (an item's reviews) and gives every task the same number of calls, so
                # no task finishes early and leaves its share of the concurrency idle.
                pending.repartitionByRange(parallel, "partition_key", "key") \
                    .mapInPandas(fn, "key string, status string").count()
            finally:
                self.spark.conf.set(coalesce_key, previous)
                progress.stop()
            self._fold(task.name, stats)
        pending.unpersist()
        stats.seconds = round(time.time() - started, 2)
        stats.cost_usd = round(self._cost(stats), 6)
        log.info("llm %s: %d requested, %d cached, %d called (%d succeeded, %d failed), "
                 "tokens in/out %d/%d, cost $%.4f, %.1f s", task.name, stats.requested, stats.cached,
                 stats.called, stats.succeeded, stats.failed, stats.tokens_in, stats.tokens_out,
                 stats.cost_usd, stats.seconds)
        return stats

    def succeeded_keys(self) -> DataFrame:
        if not self.store.exists(LLM_CALLS.name):
            return self.spark.createDataFrame([], "key string")
        return self.store.read(LLM_CALLS.name).filter(F.col("status") == SUCCEEDED).select("key")

    def replies(self, requests: DataFrame) -> DataFrame:
        """requests ⟕ llm_calls: adds status, reply, error (null status = never called)."""
        if not self.store.exists(LLM_CALLS.name):
            return requests.select("*", *[F.lit(None).cast("string").alias(c)
                                          for c in ("status", "reply", "error", "model", "prompt")])
        calls = self.store.read(LLM_CALLS.name).select("key", "status", "reply", "error", "model", "prompt")
        return requests.join(calls, "key", "left")

    def recover(self, task: str) -> int:
        """Fold a journal left by a crashed or killed run into llm_calls."""
        stats = LLMRunStats(task=task)
        self._fold(task, stats)
        if stats.called:
            log.warning("llm %s: recovered %d journaled call(s) from an earlier run", task, stats.called)
        return stats.called

    def _fold(self, task: str, stats: LLMRunStats) -> None:
        folder = self.journal_dir(task)
        files = journal_files(folder)
        if not files:
            return
        raw = (self.spark.read.schema(_JOURNAL_SCHEMA).option("mode", "DROPMALFORMED").json(files)
               .withColumn("finished_at", F.col("finished_at").cast("timestamp")))
        best = Window.partitionBy("key").orderBy((F.col("status") == SUCCEEDED).desc(), F.col("finished_at").desc())
        calls = raw.withColumn("_rn", F.row_number().over(best)).filter("_rn = 1").drop("_rn").persist()
        agg = calls.agg(F.count("*"), F.sum(F.when(F.col("status") == SUCCEEDED, 1).otherwise(0)),
                        F.sum("tokens_in"), F.sum("tokens_out")).first()
        stats.called += int(agg[0] or 0)
        stats.succeeded += int(agg[1] or 0)
        stats.failed += int(agg[0] or 0) - int(agg[1] or 0)
        stats.tokens_in += int(agg[2] or 0)
        stats.tokens_out += int(agg[3] or 0)
        self.store.upsert(calls, LLM_CALLS, update_condition=f"t.status <> '{SUCCEEDED}'")
        calls.unpersist()
        remove_files(files)

    def _cost(self, stats: LLMRunStats) -> float:
        """At the batch price (llm.batch.price_factor of the online one) in batch mode."""
        price = self.cfg.llm.prices.get(self.cfg.llm.model)
        if not price:
            return 0.0
        factor = self.cfg.llm.batch.price_factor if self.cfg.llm.mode == "batch" else 1.0
        return factor * (stats.tokens_in * price.get("input", 0.0) + stats.tokens_out * price.get("output", 0.0)) / 1e6


# -- executor side ---------------------------------------------------------------------------
def _call_partition(settings: LLMSettings, endpoint: Endpoint, task: LLMTask, share: RateShare,
                    folder: str, run_id: str):
    def call_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        partition = f"p{ctx.partitionId()}-" if ctx else ""
        prefix = f"{partition}a{ctx.attemptNumber()}" if ctx else "local"
        # A retried task skips what its earlier attempts journaled. A key belongs to one partition,
        # so only this partition's files are read (not the whole run's journal: that grows with
        # the run and every task would read it again); a crashed run's journal was folded at start.
        done = {r["key"] for r in read_journal(folder, partition) if r.get("status") == SUCCEEDED}
        client = make_client(settings, endpoint.base_url, endpoint.api_key)
        caller = StructuredCaller(client, settings, RateLimiter(share), secret=endpoint.api_key)

        with JournalWriter(folder, prefix) as journal, \
                ThreadPoolExecutor(settings.concurrency_per_task) as pool:
            def one(key: str, messages: str, context: str | None) -> str:
                ctx_obj = json.loads(context) if context else {}
                check = (lambda obj: task.check(ctx_obj, obj)) if task.check else None
                out = caller.call(json.loads(messages), task.output_model, check, task.max_output_tokens)
                journal.write({
                    "key": key, "task": task.name, "prompt": task.prompt.fingerprint,
                    "model": settings.model, "status": out.status,
                    "request": json.dumps({"messages": json.loads(messages),
                                           "params": caller.request_params(task.output_model,
                                                                           task.max_output_tokens)},
                                          ensure_ascii=False),
                    "reply": out.reply, "raw_reply": out.raw_reply, "error": out.error,
                    "attempts": out.attempts, "tokens_in": out.tokens_in, "tokens_out": out.tokens_out,
                    "latency_ms": out.latency_ms, "run_id": run_id, "finished_at": time.time()})
                return out.status

            # Calls stream across Arrow batches: at most 2 × concurrency are queued, and the
            # threads never wait for a batch to drain before the next batch's calls start.
            window = 2 * settings.concurrency_per_task
            in_flight: collections.deque = collections.deque()
            finished: list[tuple[str, str]] = []
            for pdf in batches:
                for k, m, c in zip(pdf["key"], pdf["messages"], pdf["context"]):
                    if k in done:
                        continue
                    while len(in_flight) >= window:
                        key, fut = in_flight.popleft()
                        finished.append((key, fut.result()))
                    in_flight.append((k, pool.submit(one, k, m, c)))
                if finished:
                    yield pd.DataFrame(finished, columns=["key", "status"])
                    finished = []
            finished.extend((key, fut.result()) for key, fut in in_flight)
            yield pd.DataFrame(finished, columns=["key", "status"])

    return call_partition


class _Progress:
    """Driver-side progress line from the journal while the Spark job runs."""

    def __init__(self, folder: str, task: str, total: int, interval_s: float):
        self.folder, self.task, self.total, self.interval = folder, task, total, interval_s
        self._tail = JournalTail(folder)
        self.done = self.failed = self.tokens = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._started = time.time()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.report()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> None:
        for rec in self._tail.new_records():
            self.done += 1
            self.failed += rec.get("status") != SUCCEEDED
            self.tokens += (rec.get("tokens_in") or 0) + (rec.get("tokens_out") or 0)
        done, failed, tokens = self.done, self.failed, self.tokens
        elapsed = time.time() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        log.info("llm %s: %d/%d calls done (%d failed), %d tokens, %.2f calls/s, ETA %.0f s",
                 self.task, done, self.total, failed, tokens, rate, eta)
