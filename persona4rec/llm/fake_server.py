"""A scriptable OpenAI-compatible HTTP server on 127.0.0.1, for fault tests and the LLM benchmark.

It speaks the real wire protocol (`POST /v1/chat/completions`), so the code under test uses the
real `openai` client over real HTTP; only the model is replaced by a `responder`. Faults are
injected per request: 429 with Retry-After, 500, a stall longer than the client timeout, replies
that are not JSON or that violate the schema. It records every request and every delivered reply.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections import Counter
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
    lock: threading.Lock = field(default_factory=threading.Lock)


def request_hash(body: dict) -> str:
    """Identity of a request for 'was it paid twice' checks: the first user message (re-asks
    append messages, so they count as the same request)."""
    first_user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
    return hashlib.sha256(first_user.encode()).hexdigest()[:16]


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
                 hold: threading.Event | None = None, strict_schemas: bool = False):
        """strict_schemas: refuse, as OpenAI does (400 naming response_format), a strict JSON
        schema that its strict mode would not accept."""
        self.responder, self.fault, self.delay_s = responder, fault, delay_s
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
                self._send(200, {"data": [{"id": "fake", "object": "model"}], "object": "list"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                h = request_hash(body)
                with server.log.lock:
                    server.log.requests.append((time.time(), h))
                    server.log.auth_headers.append(self.headers.get("Authorization", ""))
                    n = server._seen[h]
                    server._seen[h] += 1
                if server.hold is not None:
                    server.hold.wait()
                refusal = server.schema_refusal(body)
                if refusal:
                    with server.log.lock:
                        server.log.schema_refusals.append(refusal)
                    return self._send(400, {"error": {"message": refusal, "type": "invalid_request_error",
                                                      "param": "response_format", "code": None}})
                fault = server.fault(body, n) if server.fault else None
                if fault:
                    with server.log.lock:
                        server.log.faults[fault] += 1
                if fault == "429":
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                                      {"Retry-After": str(server.retry_after_s)})
                if fault == "401":
                    return self._send(401, {"error": {"message": "Incorrect API key provided: "
                                                      + self.headers.get("Authorization", ""),
                                                      "type": "invalid_request_error"}})
                if fault == "500":
                    return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
                if fault == "timeout":
                    time.sleep(server.stall_s)
                    return self._send(504, {"error": {"message": "late"}})
                if server.delay_s:
                    time.sleep(server.delay_s)
                if fault == "malformed":
                    content = "Sure! Here is the JSON: {not json"
                elif fault == "schema":
                    content = json.dumps({"unexpected": "shape"})
                else:
                    reply = server.responder(body)
                    content = reply if isinstance(reply, str) else json.dumps(reply)
                self._send(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": sum(len(m.get("content", "")) for m in body.get("messages", [])) // 4,
                              "completion_tokens": len(content) // 4,
                              "total_tokens": 0}})
                with server.log.lock:
                    server.log.delivered[h] += 1
                    if fault is None:
                        server.log.paid[h] += 1

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
        slot = {"value": f"aspect {tag}", "reason": "stated in the review"}
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


def _block(text: str, tag: str) -> str:
    start, end = text.find(f"<{tag}>"), text.find(f"</{tag}>")
    return text[start + len(tag) + 2:end] if 0 <= start < end else ""


def overlap_choice(text: str) -> int:
    """A judge with a real, learnable rule: the persona sharing most words with the history."""
    history = set(_block(text, "history").lower().split())
    lines = [ln for ln in _block(text, "personas").strip().splitlines() if ln.strip()]
    scores = [len(history & set(ln.lower().split())) for ln in lines]
    return 1 + max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else 1
