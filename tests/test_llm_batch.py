"""Batch API mode: the real `openai` client against our local server's files and batches endpoints.

What is checked is what costs money: every request body runs in one batch only (the server logs
which batches ran each body), a valid reply is paid once, a killed or timed-out job resumes the
batches it submitted instead of submitting them again.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, make_config
from persona4rec.config import ConfigError, load_config
from persona4rec.errors import BatchesPending
from persona4rec.llm.batch import BatchRun, judge, plan_files
from persona4rec.llm.fake_server import FakeLLMServer, request_hash, schema_responder
from persona4rec.llm.runner import REQUEST_SCHEMA, Endpoint, LLMRunner, make_request
from persona4rec.offline import tasks
from persona4rec.schemas import LLM_BATCH_REQUESTS, LLM_BATCHES, LLM_CALLS
from persona4rec.tables import TableStore

FAST = ("llm.provider=openai", "llm.mode=batch", "llm.model=gpt-4o-mini", "llm.batch.poll_initial_s=0.05",
        "llm.batch.poll_max_s=0.2", "llm.backoff_initial_s=0.01", "llm.backoff_max_s=0.05")


def batch_config(tmp_path, base_url, *extra):
    return make_config(tmp_path, *FAST, f"llm.base_url={base_url}", *extra)


def summary_requests(spark, cfg, n):
    task = tasks.summary_task("generic")
    rows = [make_request(task, cfg.llm, [{"role": "system", "content": "Summarise."},
                                         {"role": "user", "content": f"Item {i}: a magazine about topic {i}."}],
                         None, f"item{i % 4}") for i in range(n)]
    return task, spark.createDataFrame(rows, REQUEST_SCHEMA)


def first_user(i):
    return request_hash({"messages": [{"role": "user", "content": f"Item {i}: a magazine about topic {i}."}]})


def run_batch(spark, cfg, srv, n):
    task, requests = summary_requests(spark, cfg, n)
    runner = LLMRunner(spark, cfg, Endpoint(srv.base_url, "sk-test-key-0123456789"))
    return runner, requests, runner.run(task, requests)


# -- pure parts ------------------------------------------------------------------------------
@pytest.mark.unit
def test_batch_mode_needs_a_provider_with_a_batch_api():
    with pytest.raises(ConfigError, match="llm.mode.*openai or azure"):
        load_config(None, ["llm.mode=batch"])
    assert load_config(None, ["llm.mode=batch", "llm.provider=openai", "llm.base_url=http://x/v1"]).llm.mode == "batch"


@pytest.mark.unit
def test_files_are_planned_within_both_provider_limits():
    assert plan_files(1, 100, 50_000, 190_000_000) == 1
    assert plan_files(100_000, 100, 50_000, 190_000_000) == 3  # requests: 100k / 45k
    assert plan_files(10, 10 * 50_000_000, 50_000, 190_000_000) == 3  # bytes: 500 MB / 171 MB


@pytest.mark.unit
def test_judge_sorts_result_lines_into_success_failure_and_next_round():
    settings = load_config(None, ["llm.max_attempts=2", "llm.max_reasks=1"]).llm
    task = tasks.summary_task("generic")
    row = {"key": "k", "messages": json.dumps([{"role": "user", "content": "Summarise x."}]), "context": None,
           "rounds": 1, "reasks": 0, "transport_failures": 0, "tokens_in": 0, "tokens_out": 0,
           "input_file_id": "file-1", "batch_id": "batch_1", "batch_status": "completed", "latency_ms": 5}

    def line(status, content=None, error=None):
        body = ({"choices": [{"message": {"content": content}}], "usage": {"prompt_tokens": 7,
                                                                             "completion_tokens": 3}}
                if status == 200 else {"error": {"message": f"code {status}"}})
        return json.dumps({"custom_id": "k", "response": None if error else {"status_code": status, "body": body},
                           "error": error})

    ok = judge({**row, "line": line(200, '{"summary": "A magazine."}')}, task, settings)
    assert (ok["state"], ok["status"], ok["tokens_in"], ok["tokens_out"]) == ("done", "succeeded", 7, 3)
    bad = judge({**row, "line": line(200, "not json")}, task, settings)
    assert bad["state"] == "queued" and bad["reasks"] == 1 and bad["tokens_in"] == 7
    assert json.loads(bad["messages"])[-1]["content"].startswith("That reply was invalid")
    assert judge({**row, "reasks": 1, "line": line(200, "not json")}, task, settings)["status"] == "failed"
    assert judge({**row, "line": line(429)}, task, settings)["state"] == "queued"
    assert judge({**row, "line": line(500)}, task, settings)["transport_failures"] == 1
    assert judge({**row, "transport_failures": 1, "line": line(500)}, task, settings)["status"] == "failed"
    refused = judge({**row, "line": line(400)}, task, settings)
    assert refused["status"] == "failed" and "400" in refused["error"]
    expired = judge({**row, "batch_status": "expired",
                     "line": line(0, error={"code": "batch_expired", "message": "late"})}, task, settings)
    assert expired["state"] == "queued" and "batch_expired" in expired["error"]
    assert judge({**row, "line": None, "batch_status": "cancelled"}, task, settings)["state"] == "queued"
    assert judge({**row, "line": '{"custom_id": "k", "resp'}, task, settings)["error"].startswith("unreadable")
    assert judge({**row, "line": "[1, 2]"}, task, settings)["state"] == "queued"
    queue_full = judge({**row, "line": None, "batch_status": "failed",
                        "batch_error": "token_limit_exceeded: Enqueued token limit reached"}, task, settings)
    assert queue_full["state"] == "queued"
    failed = judge({**row, "line": None, "batch_status": "failed", "batch_error": "bad file"}, task, settings)
    assert failed["status"] == "failed" and "bad file" in failed["error"]


# -- against the local server ----------------------------------------------------------------
@pytest.mark.spark
@pytest.mark.integration
def test_batches_fold_into_llm_calls_within_file_limits_and_a_rerun_submits_nothing(spark, tmp_path):
    n, per_file = 25, 10
    with FakeLLMServer(schema_responder) as srv:
        cfg = batch_config(tmp_path, srv.base_url, f"llm.batch.max_requests_per_file={per_file}")
        runner, requests, stats = run_batch(spark, cfg, srv, n)
        store = TableStore(spark, cfg)
        versions = {t.name: store.version(t.name) for t in (LLM_CALLS, LLM_BATCHES, LLM_BATCH_REQUESTS)}
        _, _, again = run_batch(spark, cfg, srv, n)
        assert len(srv.log.uploads) == len(srv.log.batches_created) >= 3  # 25 requests, <= 10 per file
        for fid in srv.log.uploads:
            content = srv.files[fid]["content"].splitlines()
            assert 1 <= len(content) <= per_file
            assert all(json.loads(x)["url"] == "/v1/chat/completions" for x in content)
    assert (stats.requested, stats.called, stats.succeeded, stats.failed) == (n, n, n, 0)
    assert max(len(b) for b in srv.log.batch_bodies.values()) == 1 and len(srv.log.batch_bodies) == n
    assert sorted(srv.log.paid.values()) == [1] * n
    expected = 0.5 * (stats.tokens_in * 0.15 + stats.tokens_out * 0.60) / 1e6  # the batch price
    assert stats.tokens_in > 0 and stats.cost_usd == pytest.approx(expected, abs=1e-6)
    replies = runner.replies(requests).collect()
    assert all(r.status == "succeeded" and json.loads(r.reply)["summary"] for r in replies)
    calls = store.read(LLM_CALLS.name).collect()
    assert all(json.loads(c.request)["batch"].startswith("batch_") and c.attempts == 1 for c in calls)
    assert {r.state for r in store.read(LLM_BATCH_REQUESTS.name).collect()} == {"done"}
    assert {r.status for r in store.read(LLM_BATCHES.name).collect()} == {"folded"}
    # The rerun: everything cached, nothing uploaded, no Delta version.
    assert (again.cached, again.called) == (n, 0)
    assert {t: store.version(t) for t in versions} == versions


@pytest.mark.spark
@pytest.mark.integration
def test_errors_invalid_replies_expired_and_cancelled_batches_go_into_the_next_round(spark, tmp_path):
    transient, reasked, hopeless, refused = first_user(1), first_user(2), first_user(3), first_user(4)

    def fault(body, seen):
        h = request_hash(body)
        if h == transient and seen == 0:
            return "500"
        if h == reasked and seen == 0:
            return "malformed"
        if h == hopeless:
            return "schema"
        if h == refused:
            return "401"
        return None

    fates = {0: "expired", 1: "cancelled"}
    n = 12
    with FakeLLMServer(schema_responder, fault=fault, batch_fate=lambda i: fates.get(i, "completed")) as srv:
        cfg = batch_config(tmp_path, srv.base_url, "llm.max_reasks=1", "llm.max_attempts=4")
        runner, requests, stats = run_batch(spark, cfg, srv, n)
    assert [srv.batches[b]["status"] for b, _ in srv.log.batches_created][:2] == ["expired", "cancelled"]
    assert (stats.called, stats.succeeded, stats.failed) == (n, n - 2, 2)
    store = TableStore(spark, cfg)
    calls = {r.key: r for r in store.read(LLM_CALLS.name).collect()}
    keyed = {request_hash(json.loads(r.request)): r for r in calls.values()}
    assert keyed[hopeless].status == "failed" and keyed[hopeless].error.startswith("invalid reply")
    assert keyed[refused].status == "failed" and "401" in keyed[refused].error
    assert keyed[reasked].status == "succeeded" and len(json.loads(keyed[reasked].request)["messages"]) == 4
    assert keyed[transient].status == "succeeded"
    # Each valid reply was paid for once, and nothing that failed was paid at all.
    assert all(srv.log.paid[h] == 1 for h in keyed if h not in (hopeless, refused))
    assert srv.log.paid[hopeless] == srv.log.paid[refused] == 0
    assert {r.state for r in store.read(LLM_BATCH_REQUESTS.name).collect()} == {"done"}


@pytest.mark.spark
@pytest.mark.integration
@pytest.mark.parametrize("dies", ["before_create", "after_create"])
def test_a_run_that_dies_around_batch_creation_never_submits_a_file_twice(spark, tmp_path, monkeypatch, dies):
    n = 6
    real_create, real_record = BatchRun._create, BatchRun._record

    def create(self, input_file_id):
        if dies == "before_create":
            raise KeyboardInterrupt("killed before batches.create")
        return real_create(self, input_file_id)

    def record(self, records):
        if dies == "after_create":
            raise KeyboardInterrupt("killed after batches.create, before its id was recorded")
        return real_record(self, records)

    with FakeLLMServer(schema_responder) as srv:
        cfg = batch_config(tmp_path, srv.base_url)
        monkeypatch.setattr(BatchRun, "_create", create)
        monkeypatch.setattr(BatchRun, "_record", record)
        with pytest.raises(KeyboardInterrupt):
            run_batch(spark, cfg, srv, n)
        monkeypatch.undo()
        assert len(srv.log.uploads) == 1 and len(srv.log.batches_created) == (dies == "after_create")
        _, _, stats = run_batch(spark, cfg, srv, n)
    assert len(srv.log.uploads) == 1 and [f for _, f in srv.log.batches_created] == srv.log.uploads
    assert (stats.succeeded, stats.failed) == (n, 0)
    assert sorted(len(b) for b in srv.log.batch_bodies.values()) == [1] * n
    batches = TableStore(spark, cfg).read(LLM_BATCHES.name).collect()
    assert [(b.batch_id, b.status) for b in batches] == [(srv.log.batches_created[0][0], "folded")]


@pytest.mark.spark
@pytest.mark.integration
def test_a_run_that_waits_too_long_stops_and_the_next_run_resumes_polling(spark, tmp_path):
    gate = threading.Event()
    n = 5
    with FakeLLMServer(schema_responder, batch_gate=gate) as srv:
        cfg = batch_config(tmp_path, srv.base_url, "llm.batch.wait_max_s=0.5")
        with pytest.raises(BatchesPending, match=r"batch_0001.*rerun the job"):
            run_batch(spark, cfg, srv, n)
        gate.set()
        _, _, stats = run_batch(spark, cfg, srv, n)
    assert len(srv.log.batches_created) == 1
    assert (stats.called, stats.succeeded) == (n, n)


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.integration
def test_killed_batch_job_rerun_pays_nothing_twice(spark, tmp_path):
    """A real kill (SIGKILL of the job's process group) once its batches were submitted, while
    they run at the provider; the rerun resumes them: each request body ran in one batch only."""
    from persona4rec.ingest import job as ingest
    from persona4rec.offline import summarise

    gate = threading.Event()
    with FakeLLMServer(schema_responder, batch_gate=gate) as srv:
        sets = [f"llm.base_url={srv.base_url}", "llm.batch.max_requests_per_file=8", *FAST]
        cfg = make_config(tmp_path, *sets)
        ingest.run(spark, cfg)
        cmd = [sys.executable, str(ROOT / "jobs" / "summarise_items.py"), "--target", "test",
               "--set", f"storage.root={tmp_path / 'warehouse'}"]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while len(srv.log.batches_created) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)  # somewhere between submitting the rest, recording them and polling
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(srv.log.batches_created) >= 2, "the job did not get as far as submitting"
        assert not srv.log.batch_bodies, "a batch ran before the kill"
        gate.set()  # the provider runs what was submitted, whoever is polling
        result = summarise.run(spark, cfg)["llm"]
    files = [f for _, f in srv.log.batches_created]
    assert len(files) == len(set(files)), "an input file was submitted twice"
    assert len(srv.log.batch_bodies) == result["requested"]
    assert max(len(b) for b in srv.log.batch_bodies.values()) == 1, "a request body ran in two batches"
    assert max(srv.log.paid.values()) == 1
    rows = TableStore(spark, cfg).read("item_summaries")
    assert rows.count() == rows.select("item_id").distinct().count() == result["requested"]
    assert rows.filter("status = 'succeeded'").count() == rows.count()


@pytest.mark.unit
def test_a_chunk_written_as_several_part_files_is_uploaded_as_one_file(tmp_path):
    from types import SimpleNamespace

    run = SimpleNamespace(task=SimpleNamespace(name="t"))
    for chunk, parts in ((0, ["a\n", "b\n"]), (1, ["c\n"])):
        folder = tmp_path / f"chunk={chunk}"
        folder.mkdir()
        for i, text in enumerate(parts):
            (folder / f"part-0000{i}-x.txt").write_text(text)
    files = BatchRun._chunk_files(run, str(tmp_path), {0, 1})
    assert [(c, open(p).read()) for c, p in files] == [(0, "a\nb\n"), (1, "c\n")]
    with pytest.raises(RuntimeError, match="chunk 2 is missing.*nothing was uploaded"):
        BatchRun._chunk_files(run, str(tmp_path), {0, 1, 2})
