"""Shared fixtures: one local Spark session with Delta for the whole run; tables under tmp_path."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from persona4rec.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def make_config(tmp_path: Path, *overrides: str) -> Config:
    return load_config("test", [f"storage.root={tmp_path / 'warehouse'}", *overrides])


def promote_counting(spark, cfg: Config, monkeypatch, module, attr: str):
    """promote.run(spark, cfg) with `module.attr` (the measure it calls per model) counted:
    (the decision, how many times it was called)."""
    from persona4rec.training import promote

    calls = []
    real = getattr(module, attr)
    monkeypatch.setattr(module, attr, lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        return promote.run(spark, cfg), len(calls)
    finally:
        monkeypatch.undo()


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from persona4rec.spark import get_spark

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    cfg = make_config(tmp_path_factory.mktemp("spark"))
    session = get_spark(cfg)
    yield session
    session.stop()


@pytest.fixture
def cfg(tmp_path) -> Config:
    return make_config(tmp_path)


def write_lines(path: Path, lines: list[str | bytes | dict]) -> Path:
    """Write raw lines (dicts become JSON) to a plain or .gz file; bytes are written verbatim."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(
        (line if isinstance(line, bytes) else
         (json.dumps(line) if isinstance(line, dict) else line).encode("utf-8")) + b"\n"
        for line in lines)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def extractive_run(spark, tmp_path_factory):
    """The whole pipeline on the sample with the LLM-free persona builder (a short training) in
    production mode, then evaluation-mode candidates and the evaluate job (as the bundle's
    training job does): tables, MLflow store and results shared by the tests that read them."""
    import dataclasses

    from persona4rec import pipeline
    from persona4rec.evaluation import job as evaluate
    from persona4rec.scoring import candidates

    tmp = tmp_path_factory.mktemp("extractive_run")
    cfg = make_config(tmp, "offline.persona_builder=extractive", "train.epochs=1", "train.max_steps=4",
                      f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", f"mlflow.artifact_root={tmp / 'mlruns'}",
                      "scoring.run_date=2026-11-25", "evaluation.bootstrap_samples=200",
                      "evaluation.representation_variants=true")
    results = pipeline.run(spark, cfg)
    evaluation = dataclasses.replace(cfg, mode="evaluation")
    results["evaluation_candidates"] = candidates.run(spark, evaluation)
    results["evaluate"] = evaluate.run(spark, evaluation)
    return tmp, cfg, results
