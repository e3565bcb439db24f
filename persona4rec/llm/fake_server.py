"""A scriptable OpenAI-compatible HTTP server on 127.0.0.1, for fault tests and the LLM benchmark.

It speaks the real wire protocol (`POST /v1/chat/completions`, and the Batch API's `/v1/files`
and `/v1/batches`), so the code under test uses the real `openai` client over real HTTP; only the
model is replaced by a `responder`. Faults are
injected per request: 429 with Retry-After, 500, a stall longer than the client timeout, replies
that are not JSON or that violate the schema. It records every request and every delivered reply.
"""

from __future__ import annotations

import email.policy
import hashlib
import json
import sys
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from email.parser import BytesParser
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from persona4rec.llm.outputs import strict_violations

Fault = str  # "401", "429", "500", "timeout", "malformed", "schema"


@dataclass
class ServerLog:
    requests: list[tuple[float, str]] = field(default_factory=list)  # (time, request hash)
    delivered: Counter = field(default_factory=Counter)  # request hash → 200 replies sent
    paid: Counter = field(default_factory=Counter)  # request hash → valid replies sent (what a provider bills)
    faults: Counter = field(default_factory=Counter)
    auth_headers: list[str] = field(default_factory=list)
    schema_refusals: list[str] = field(default_factory=list)  # strict-mode refusals sent (strict_schemas=True)
    uploads: list[str] = field(default_factory=list)  # file ids uploaded
    batches_created: list[tuple[str, str]] = field(default_factory=list)  # (batch id, input file id)
    batch_bodies: defaultdict = field(default_factory=lambda: defaultdict(list))  # body hash → batch ids run in
    lock: threading.Lock = field(default_factory=threading.Lock)


def request_hash(body: dict) -> str:
    """Identity of a request for 'was it paid twice' checks: the first user message (re-asks
    append messages, so they count as the same request)."""
    first_user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
    return hashlib.sha256(first_user.encode()).hexdigest()[:16]


def body_hash(body: dict) -> str:
    """Identity of a whole request body (a re-ask, with its appended turns, is another body)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def schema_name(body: dict) -> str | None:
    fmt = body.get("response_format") or {}
    return (fmt.get("json_schema") or {}).get("name")


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that went away (a killed job) is part of the test, not an error to print."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FakeLLMServer:
    def __init__(self, responder: Callable[[dict], dict | str],
                 fault: Callable[[dict, int], Fault | None] | None = None,
                 delay_s: float = 0.0, retry_after_s: float = 1.0, stall_s: float = 5.0,
                 hold: threading.Event | None = None, strict_schemas: bool = False,
                 batch_fate: Callable[[int], str] | None = None, batch_gate: threading.Event | None = None,
                 batch_delay_s: float = 0.0):
        """strict_schemas: refuse, as OpenAI does (400 naming response_format), a strict JSON
        schema that its strict mode would not accept. batch_fate(n): what happens to the n-th
        batch created (completed, expired, cancelled, failed); batch_gate: batches wait for it to
        be set before they run."""
        self.responder, self.fault, self.delay_s = responder, fault, delay_s
        self.batch_fate, self.batch_gate, self.batch_delay_s = batch_fate, batch_gate, batch_delay_s
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.strict_schemas = strict_schemas
        self.retry_after_s, self.stall_s, self.hold = retry_after_s, stall_s, hold
        self.log = ServerLog()
        self._seen: Counter = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path.startswith("/v1/files/"):
                    rest = path[len("/v1/files/"):]
                    fid, _, tail = rest.partition("/")
                    f = server.files.get(fid)
                    if f is None:
                        return self._send(404, {"error": {"message": f"No such File object: {fid}"}})
                    if tail == "content":
                        return self._send_bytes(200, f["content"])
                    return self._send(200, server.file_object(fid))
                if path == "/v1/batches":
                    return self._send(200, server.list_batches(self.path))
                if path.startswith("/v1/batches/"):
                    b = server.batch_object(path[len("/v1/batches/"):])
                    return self._send(*((200, b) if b else (404, {"error": {"message": "No such batch"}})))
                self._send(200, {"data": [{"id": "fake", "object": "model"}], "object": "list"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                if path == "/v1/files":
                    return self._send(200, server.upload(self.headers.get("Content-Type", ""), raw))
                if path == "/v1/batches":
                    return self._send(*server.create_batch(json.loads(raw or b"{}")))
                if path.startswith("/v1/batches/") and path.endswith("/cancel"):
                    return self._send(200, server.cancel_batch(path[len("/v1/batches/"):-len("/cancel")]))
                body = json.loads(raw or b"{}")
                auth = self.headers.get("Authorization", "")
                n = server.arrive(body, auth)
                if server.hold is not None:
                    server.hold.wait()
                code, payload, headers, fault = server.answer(body, n, auth)
                if fault == "timeout":
                    time.sleep(server.stall_s)
                elif code == 200 and server.delay_s:
                    time.sleep(server.delay_s)
                self._send(code, payload, headers)
                server.account(body, code, fault)

            def _send_bytes(self, code: int, data: bytes):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, code: int, payload: dict, headers: dict | None = None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # -- one chat completion (online, or one line of a batch) ------------------------------------
    def arrive(self, body: dict, auth: str = "") -> int:
        """Log a request; returns how many times the same request came before (for faults)."""
        h = request_hash(body)
        with self.log.lock:
            self.log.requests.append((time.time(), h))
            self.log.auth_headers.append(auth)
            n = self._seen[h]
            self._seen[h] += 1
        return n

    def answer(self, body: dict, n: int, auth: str = "") -> tuple[int, dict, dict | None, Fault | None]:
        """(HTTP status, JSON payload, headers, fault) for a chat completion request."""
        refusal = self.schema_refusal(body)
        if refusal:
            with self.log.lock:
                self.log.schema_refusals.append(refusal)
            return 400, {"error": {"message": refusal, "type": "invalid_request_error",
                                   "param": "response_format", "code": None}}, None, None
        fault = self.fault(body, n) if self.fault else None
        if fault:
            with self.log.lock:
                self.log.faults[fault] += 1
        if fault == "429":
            return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, \
                {"Retry-After": str(self.retry_after_s)}, fault
        if fault == "401":
            return 401, {"error": {"message": "Incorrect API key provided: " + auth,
                                   "type": "invalid_request_error"}}, None, fault
        if fault == "500":
            return 500, {"error": {"message": "boom", "type": "server_error"}}, None, fault
        if fault == "timeout":
            return 504, {"error": {"message": "late"}}, None, fault
        if fault == "malformed":
            content = "Sure! Here is the JSON: {not json"
        elif fault == "schema":
            content = json.dumps({"unexpected": "shape"})
        else:
            reply = self.responder(body)
            content = reply if isinstance(reply, str) else json.dumps(reply)
        return 200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": sum(len(m.get("content", "")) for m in body.get("messages", [])) // 4,
                      "completion_tokens": len(content) // 4, "total_tokens": 0}}, None, fault

    def account(self, body: dict, code: int, fault: Fault | None) -> None:
        if code != 200:
            return
        h = request_hash(body)
        with self.log.lock:
            self.log.delivered[h] += 1
            if fault is None:
                self.log.paid[h] += 1

    # -- files and batches (the Batch API) ------------------------------------------------------
    def upload(self, content_type: str, raw: bytes) -> dict:
        msg = BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        fields = {part.get_param("name", header="content-disposition"): part for part in msg.iter_parts()}
        part = fields["file"]
        with self.log.lock:
            fid = f"file-{len(self.files) + 1:04d}"
            self.files[fid] = {"content": part.get_payload(decode=True), "filename": part.get_filename(),
                               "purpose": fields["purpose"].get_content().strip(), "created_at": int(time.time())}
            self.log.uploads.append(fid)
        return self.file_object(fid)

    def file_object(self, fid: str) -> dict:
        f = self.files[fid]
        return {"id": fid, "object": "file", "bytes": len(f["content"]), "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}

    def create_batch(self, req: dict) -> tuple[int, dict]:
        fid = req.get("input_file_id")
        if fid not in self.files:
            return 400, {"error": {"message": f"input file {fid} does not exist"}}
        with self.log.lock:
            index = len(self.batches)
            bid = f"batch_{index + 1:04d}"
            self.batches[bid] = {
                "id": bid, "object": "batch", "endpoint": req.get("endpoint"), "input_file_id": fid,
                "completion_window": req.get("completion_window"), "status": "validating",
                "created_at": int(time.time()), "metadata": req.get("metadata"), "output_file_id": None,
                "error_file_id": None, "errors": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            self.log.batches_created.append((bid, fid))
            fate = self.batch_fate(index) if self.batch_fate else "completed"
        threading.Thread(target=self._process, args=(bid, fate), daemon=True).start()
        return 200, dict(self.batches[bid])

    def batch_object(self, bid: str) -> dict | None:
        with self.log.lock:
            b = self.batches.get(bid)
            return dict(b) if b else None

    def list_batches(self, path: str) -> dict:
        """Newest first, `limit` and `after` as OpenAI pages them."""
        query = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)
        limit = int(query.get("limit", ["20"])[0])
        with self.log.lock:
            ids = sorted(self.batches, reverse=True)
        if query.get("after"):
            ids = ids[ids.index(query["after"][0]) + 1:] if query["after"][0] in ids else []
        page = [self.batch_object(i) for i in ids[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}

    def cancel_batch(self, bid: str) -> dict:
        with self.log.lock:
            self.batches[bid]["status"] = "cancelling"
        return self.batch_object(bid)

    def _set(self, bid: str, **values) -> None:
        with self.log.lock:
            self.batches[bid].update(values)

    def _process(self, bid: str, fate: str) -> None:
        """Runs a batch: every line through `answer` (faults included). fate: completed; expired
        (half done, the rest in the error file as batch_expired); cancelled (half done, the rest
        in no file); failed (the file refused, nothing run)."""
        if self.batch_gate is not None:
            self.batch_gate.wait()
        time.sleep(self.batch_delay_s)
        batch = self.batch_object(bid)
        if fate == "failed":
            return self._set(bid, status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                {"code": "invalid_request", "message": "the input file could not be read", "line": 1}]})
        self._set(bid, status="in_progress", in_progress_at=int(time.time()))
        lines = [json.loads(ln) for ln in self.files[batch["input_file_id"]]["content"].splitlines() if ln.strip()]
        cut = len(lines) if fate == "completed" else len(lines) // 2
        out, err = [], []
        for i, line in enumerate(lines):
            body = line["body"]
            with self.log.lock:
                self.log.batch_bodies[body_hash(body)].append(bid)
            if i >= cut:
                if fate == "expired":
                    err.append({"id": f"req_{bid}_{i}", "custom_id": line["custom_id"], "response": None,
                                "error": {"code": "batch_expired", "message": "This request could not be "
                                          "executed before the completion window expired."}})
                continue
            code, payload, _, fault = self.answer(body, self.arrive(body))
            record = {"id": f"req_{bid}_{i}", "custom_id": line["custom_id"],
                      "response": {"status_code": code, "request_id": f"r{i}", "body": payload}, "error": None}
            (out if code == 200 else err).append(record)
            self.account(body, code, fault)
        files = {}
        for kind, recs in (("output_file_id", out), ("error_file_id", err)):
            if recs:
                data = "".join(json.dumps(r) + "\n" for r in recs).encode()
                with self.log.lock:
                    fid = f"file-{len(self.files) + 1:04d}"
                    self.files[fid] = {"content": data, "filename": f"{bid}_{kind}.jsonl",
                                       "purpose": "batch_output", "created_at": int(time.time())}
                files[kind] = fid
        now = int(time.time())
        when = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[fate]
        self._set(bid, status=fate, **{when: now}, **files, request_counts={
            "total": len(lines), "completed": len(out), "failed": len(err)})

    def schema_refusal(self, body: dict) -> str | None:
        fmt = body.get("response_format") or {}
        spec = fmt.get("json_schema") or {}
        if not (self.strict_schemas and fmt.get("type") == "json_schema" and spec.get("strict")):
            return None
        problems = strict_violations(spec.get("schema") or {})
        return f"Invalid schema for response_format '{spec.get('name')}': {problems[0]}" if problems else None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "FakeLLMServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.hold is not None:
            self.hold.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def user_text(body: dict) -> str:
    return next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")


def schema_responder(body: dict) -> dict:
    """Valid replies for the offline tasks, derived deterministically from the request."""
    name = schema_name(body)
    text = user_text(body)
    tag = hashlib.sha256(text.encode()).hexdigest()[:6]
    if name == "ItemSummary":
        return {"summary": f"A product ({tag}) for everyday readers."}
    if name == "ReviewAspects":
        # The reason quotes the review's first words, as a grounded reply does (tasks.grounded).
        quote = " ".join(_review(text).split()[:8]) or "stated in the review"
        slot = {"value": f"aspect {tag}", "reason": quote[:100]}
        return {"category_preference": slot, "purchase_purpose": slot,
                "quality_criteria": slot, "usage_context": None}
    if name == "ItemPersonas":
        return {"personas": [
            {"name": f"Enthusiast {tag}", "description": "Buys it for the content.",
             "preference_rationale": "Values depth, per the aspects."},
            {"name": f"Critic {tag}", "description": "Finds it uneven.",
             "preference_rationale": "Quality criteria mention misses."}]}
    if name == "Persona":  # one persona per group (offline.persona_builder: grouped)
        return {"name": f"Reader {tag}", "description": "Reads every issue for the content.",
                "preference_rationale": f"Their aspects ({tag}) match what it offers."}
    if name == "AlignmentChoice":
        return {"persona_number": overlap_choice(text), "justification": f"Closest to the history ({tag})."}
    return {"answer": tag}


def _review(text: str) -> str:
    start = text.find("<review")
    start = text.find(">", start) + 1 if start >= 0 else -1
    end = text.find("</review>", start)
    return text[start:end].strip() if 0 < start <= end else ""


def _block(text: str, tag: str) -> str:
    start, end = text.find(f"<{tag}>"), text.find(f"</{tag}>")
    return text[start + len(tag) + 2:end] if 0 <= start < end else ""


def overlap_choice(text: str) -> int:
    """A judge with a real, learnable rule: the persona sharing most words with the history."""
    history = set(_block(text, "history").lower().split())
    lines = [ln for ln in _block(text, "personas").strip().splitlines() if ln.strip()]
    scores = [len(history & set(ln.lower().split())) for ln in lines]
    return 1 + max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else 1
