"""One structured LLM call, done properly: rate limit, retries with backoff, re-asks, accounting.

Plain Python over the official `openai` client, so it is testable without Spark and works against
any OpenAI-compatible endpoint. The client's own retries are off (`max_retries=0`): retries are
ours, so they honour `Retry-After`, count against the rate limit and are recorded.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

import openai
from pydantic import BaseModel, ValidationError

from persona4rec.config import LLMSettings
from persona4rec.llm.outputs import BOUNDED, OPENAI_STRICT, response_schema
from persona4rec.llm.prompts import approx_tokens
from persona4rec.llm.ratelimit import RateLimiter

log = logging.getLogger(__name__)
SUCCEEDED, FAILED = "succeeded", "failed"
_FENCE = re.compile(r"^\s*```(?:json)?\s*|\s*```\s*$", re.IGNORECASE)
ERROR_CHARS = 300  # of an error message kept in llm_calls
# Shapes of credentials that may appear in a provider's error text (not only our own key).
_SECRET_SHAPES = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+|\b(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}"
                            r"|\b(?:api[-_]?key|authorization)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9._~+/=-]{8,}")


@dataclass(frozen=True)
class CallOutcome:
    status: str
    reply: str | None  # the validated output as JSON text
    raw_reply: str | None  # the model's last reply, as sent
    error: str | None
    attempts: int  # HTTP requests made (transport retries and re-asks included)
    tokens_in: int
    tokens_out: int
    latency_ms: int

    def as_dict(self) -> dict:
        return asdict(self)


class InvalidReply(ValueError):
    """A reply that parsed but does not satisfy the task (e.g. names a persona that does not exist)."""


def make_client(settings: LLMSettings, base_url: str, api_key: str | None) -> openai.OpenAI:
    common = dict(api_key=api_key or "not-needed", default_headers=dict(settings.extra_headers) or None,
                  timeout=settings.timeout_s, max_retries=0)
    if settings.provider == "azure":
        return openai.AzureOpenAI(azure_endpoint=base_url, api_version=settings.api_version, **common)
    return openai.OpenAI(base_url=base_url, **common)


def request_params(settings: LLMSettings, output_model: type[BaseModel], mode: str | None = None,
                   max_tokens: int | None = None) -> dict:
    """Everything of a request except the messages; part of the cache key. The reply budget is
    the task's, capped by `llm.max_output_tokens`."""
    budget = min(max_tokens or settings.max_output_tokens, settings.max_output_tokens)
    params: dict = {"model": settings.model, "temperature": settings.temperature, "max_tokens": budget}
    if settings.seed is not None:
        params["seed"] = settings.seed
    if (mode or settings.structured_output) == "json_schema":
        params["response_format"] = {"type": "json_schema", "json_schema": {
            "name": output_model.__name__, "schema": response_schema(output_model, schema_dialect(settings)),
            "strict": True}}
    else:
        params["response_format"] = {"type": "json_object"}
    return params


def schema_dialect(settings: LLMSettings) -> str:
    if settings.schema_dialect != "auto":
        return settings.schema_dialect
    return BOUNDED if settings.provider == "embedded" else OPENAI_STRICT


def parse_reply(text: str | None, model: type[BaseModel]) -> BaseModel:
    """JSON (optionally wrapped in Markdown fences, as small models like to do) → validated model."""
    if text is None or not text.strip():
        raise ValueError("the reply was empty")
    try:
        data = json.loads(_FENCE.sub("", text.strip()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply is not valid JSON ({exc.msg} at column {exc.colno})") from None
    return model.model_validate(data)


def reask_messages(messages: list[dict], raw: str | None, exc: Exception) -> list[dict]:
    """The conversation for a re-ask: the invalid reply, then what was wrong with it (online
    calls and batch rounds re-ask the same way)."""
    return list(messages) + [
        {"role": "assistant", "content": (raw or "")[:2000]},
        {"role": "user", "content": f"That reply was invalid: {_short(exc)}. "
                                    "Reply again with only the JSON object, matching the schema."}]


def redact(text: str | None, secret: str | None = None, limit: int = ERROR_CHARS) -> str | None:
    """Secrets out first, then the length cut: a key that straddled the cut would otherwise
    survive as a fragment. Removes `secret` and anything shaped like a bearer token or an
    `sk-…` key."""
    if not text:
        return text
    if secret:
        text = text.replace(secret, "***")
    return _cut(_SECRET_SHAPES.sub("***", text), limit)


class StructuredCaller:
    """Calls one endpoint for one task's output model; thread-safe (the client and limiter are)."""

    def __init__(self, client: openai.OpenAI, settings: LLMSettings, limiter: RateLimiter,
                 secret: str | None = None, sleep: Callable[[float], None] = time.sleep):
        self.client, self.settings, self.limiter = client, settings, limiter
        self._secret, self._sleep = secret, sleep
        self._mode = settings.structured_output

    def request_params(self, output_model: type[BaseModel], max_tokens: int | None = None) -> dict:
        return request_params(self.settings, output_model, self._mode, max_tokens)

    def call(self, messages: list[dict], output_model: type[BaseModel],
             check: Callable[[BaseModel], None] | None = None, max_tokens: int | None = None) -> CallOutcome:
        s = self.settings
        messages = list(messages)
        attempts = tokens_in = tokens_out = 0
        transport_failures = reasks = 0
        raw = error = None
        started = time.monotonic()
        while True:
            params = self.request_params(output_model, max_tokens)
            prompt_est = sum(approx_tokens(m["content"]) for m in messages)
            self.limiter.acquire(prompt_est + params["max_tokens"])
            attempts += 1
            try:
                resp = self.client.chat.completions.create(messages=messages, **params)
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError) as exc:
                transport_failures += 1
                error = self._describe(exc)
                if transport_failures >= s.max_attempts:
                    break
                self._sleep(self._backoff(transport_failures, exc))
                continue
            except openai.APIStatusError as exc:
                error = self._describe(exc)
                if exc.status_code == 400 and self._mode == "json_schema" and "response_format" in str(exc).lower():
                    self._mode = "json_object"  # endpoint without JSON-schema support: JSON mode + validation
                    _warn_fallback(self.settings, output_model.__name__, error)
                    continue
                break  # other 4xx: retrying the same request cannot help
            usage = getattr(resp, "usage", None)
            tokens_in += getattr(usage, "prompt_tokens", None) or prompt_est
            raw = resp.choices[0].message.content if resp.choices else None
            tokens_out += getattr(usage, "completion_tokens", None) or approx_tokens(raw or "")
            try:
                obj = parse_reply(raw, output_model)
                if check is not None:
                    check(obj)
                return CallOutcome(SUCCEEDED, obj.model_dump_json(), raw, None, attempts, tokens_in,
                                   tokens_out, int((time.monotonic() - started) * 1000))
            except (ValueError, ValidationError) as exc:
                error = self._redact(f"invalid reply: {exc}")
                if reasks >= s.max_reasks:
                    break
                reasks += 1
                messages = reask_messages(messages, raw, exc)
        return CallOutcome(FAILED, None, raw, error, attempts, tokens_in, tokens_out,
                           int((time.monotonic() - started) * 1000))

    def _backoff(self, failures: int, exc: Exception) -> float:
        s = self.settings
        retry_after = _retry_after_s(exc)
        if retry_after is not None:
            # Honour the server's word (bounded against absurd values), plus a little jitter.
            return min(max(retry_after, 0.0), max(s.backoff_max_s, 600.0)) + random.uniform(0, 0.1)
        base = min(s.backoff_max_s, s.backoff_initial_s * 2 ** (failures - 1))
        return base * random.uniform(0.5, 1.0)  # jitter: tasks that failed together retry apart

    def _describe(self, exc: Exception) -> str:
        code = getattr(exc, "status_code", None)
        return self._redact(f"{type(exc).__name__}{f' {code}' if code else ''}: {exc}")

    def _redact(self, text: str | None, limit: int = ERROR_CHARS) -> str | None:
        return redact(text, self._secret, limit)


_FALLBACKS_WARNED: set[tuple] = set()


def _warn_fallback(settings: LLMSettings, schema: str, reason: str | None) -> None:
    """Once per endpoint, model and schema in a process: the switch to JSON mode and the
    endpoint's reason (a strict-mode refusal is a schema bug to fix, not noise)."""
    key = (settings.base_url, settings.model, schema)
    if key not in _FALLBACKS_WARNED:
        _FALLBACKS_WARNED.add(key)
        log.warning("endpoint %s refused the JSON schema %s for model %s, falling back to JSON mode plus "
                    "validation; its reason: %s", settings.base_url or settings.provider, schema, settings.model,
                    reason)


def _retry_after_s(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _short(exc: Exception, limit: int = ERROR_CHARS) -> str:
    """An exception's text on one line, bounded (for the re-ask message; stored errors go
    through _redact, which cuts after redacting)."""
    return _cut(str(exc), limit)
