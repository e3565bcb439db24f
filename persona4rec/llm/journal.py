"""Append-only journal of finished LLM calls: what makes a paid call durable the moment it ends.

Executors append one JSON line per finished call (flushed at once) to a file of their own
under `<journal_dir>/<task>/`. The driver folds the journal into the `llm_calls` Delta table after
the Spark job and on the next start, so a crash, a killed driver or a Spark task retry never
loses a call that was paid for, and a retried task skips the keys its earlier attempt finished.
The folder must be reachable from every executor (local disk in local mode; a Unity Catalog
volume or /dbfs path on Databricks).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator


class JournalWriter:
    def __init__(self, folder: str, prefix: str):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = os.path.join(folder, f"{prefix}-{uuid.uuid4().hex}.jsonl")
        self._fh = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._synced = time.monotonic()

    def write(self, record: dict) -> None:
        """Flushed to the OS at once (a killed process loses nothing); fsynced at most once a
        second and on close (only a machine crash can lose the last second, which a rerun repays)."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            if time.monotonic() - self._synced >= 1.0:
                os.fsync(self._fh.fileno())
                self._synced = time.monotonic()

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def journal_files(folder: str, prefix: str = "") -> list[str]:
    """The journal files of `folder` (those whose name starts with `prefix`, e.g. one partition's)."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jsonl") and f.startswith(prefix))


def _records(lines: Iterator[bytes]) -> Iterator[dict]:
    for line in lines:
        try:
            yield json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue


def read_journal(folder: str, prefix: str = "") -> Iterator[dict]:
    """Every complete record (of the files starting with `prefix`); a line cut short by a crash
    mid-write is skipped (it was not paid for in any usable way: its caller never saw the reply)."""
    for path in journal_files(folder, prefix):
        with open(path, "rb") as fh:
            yield from _records(line for line in fh if line.endswith(b"\n"))


class JournalTail:
    """What was appended to a journal folder since the last call, and nothing else: a byte offset
    per file, just past its last complete line. The driver's progress line reads this way, so a
    long run reads each record once instead of the whole journal every interval."""

    def __init__(self, folder: str):
        self.folder = folder
        self._offsets: dict[str, int] = {}

    def new_records(self) -> Iterator[dict]:
        for path in journal_files(self.folder):
            start = self._offsets.get(path, 0)
            try:
                with open(path, "rb") as fh:
                    fh.seek(start)
                    data = fh.read()
            except FileNotFoundError:  # folded and removed meanwhile
                continue
            end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
            self._offsets[path] = start + end
            yield from _records(iter(data[:end].splitlines()))


def remove_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
