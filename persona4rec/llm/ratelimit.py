"""Requests-per-minute and tokens-per-minute limits shared by the threads of one Spark task.

Why per task and not per process: the job-wide limit is divided by the driver over the tasks that
can run at once (`share`), so the cluster as a whole stays under the provider's limit however
many tasks run — a per-task limit that multiplies with the task count is the classic mistake.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RateShare:
    requests_per_minute: float
    tokens_per_minute: float
    burst_s: float

    @staticmethod
    def divide(requests_per_minute: float, tokens_per_minute: float, burst_s: float,
               concurrent_tasks: int) -> "RateShare":
        n = max(1, concurrent_tasks)
        return RateShare(requests_per_minute / n, tokens_per_minute / n, burst_s)


class RateLimiter:
    """Two token buckets (requests, tokens). Each holds at most `burst_s` seconds of its rate
    (at least one request's worth), and starts with one request's worth, so a window of one
    minute never sees more than rate + burst."""

    def __init__(self, share: RateShare, clock=time.monotonic, sleep=time.sleep):
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._req_rate = share.requests_per_minute / 60.0
        self._tok_rate = share.tokens_per_minute / 60.0
        self._req_cap = max(1.0, self._req_rate * share.burst_s)
        self._tok_cap = max(1.0, self._tok_rate * share.burst_s)
        self._req = 1.0
        self._tok = min(self._tok_cap, self._tok_rate * share.burst_s) or 1.0
        self._last = clock()

    def acquire(self, tokens: int = 0) -> float:
        """Block until one request of about `tokens` tokens may start; returns seconds waited."""
        waited = 0.0
        tokens = min(float(tokens), self._tok_cap)  # one huge request must still pass, alone
        while True:
            with self._lock:
                now = self._clock()
                elapsed, self._last = now - self._last, now
                self._req = min(self._req_cap, self._req + elapsed * self._req_rate)
                self._tok = min(self._tok_cap, self._tok + elapsed * self._tok_rate)
                if self._req >= 1.0 and self._tok >= tokens:
                    self._req -= 1.0
                    self._tok -= tokens
                    return waited
                need = max((1.0 - self._req) / self._req_rate,
                           (tokens - self._tok) / self._tok_rate if self._tok_rate else 0.0)
            pause = min(max(need, 0.005), 5.0)
            self._sleep(pause)
            waited += pause
