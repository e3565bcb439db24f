"""Notebooks run headless against local tables (they are plain Python in Databricks source format)."""

import runpy

import pytest

from conftest import ROOT, make_config
from persona4rec.ingest import job as ingest

pytestmark = [pytest.mark.spark, pytest.mark.integration]


def test_ingest_overview_notebook_runs(spark, tmp_path, monkeypatch, capsys):
    ingest.run(spark, make_config(tmp_path))
    monkeypatch.setenv("PERSONA4REC_TARGET", "test")
    monkeypatch.setenv("PERSONA4REC_OVERRIDES", f"storage.root={tmp_path / 'warehouse'}")
    runpy.run_path(str(ROOT / "notebooks" / "01_ingest_overview.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "237 reviews, 33 users, 30 items (29 with metadata)" in out
    assert "validation" in out and "test" in out


def _run_notebook(name, tmp, monkeypatch):
    monkeypatch.setenv("PERSONA4REC_TARGET", "test")
    monkeypatch.setenv("PERSONA4REC_OVERRIDES", f"storage.root={tmp / 'warehouse'};offline.persona_builder=extractive")
    runpy.run_path(str(ROOT / "notebooks" / name), run_name="__main__")


def test_item_personas_notebook_runs(extractive_run, monkeypatch, capsys):
    tmp, cfg, _ = extractive_run
    _run_notebook("02_item_personas.py", tmp, monkeypatch)
    out = capsys.readouterr().out
    assert "persona builder: extractive" in out and "summary (extractive)" in out
    assert "[0] " in out and "why: " in out


def test_user_recommendations_notebook_runs(extractive_run, monkeypatch, capsys):
    tmp, cfg, _ = extractive_run
    _run_notebook("03_user_recommendations.py", tmp, monkeypatch)
    out = capsys.readouterr().out
    assert "run 2026-11-25" in out and "# 1 " in out and "(CF #" in out and "For " in out


def test_evaluation_notebook_runs_and_plots(extractive_run, monkeypatch, capsys):
    tmp, cfg, results = extractive_run
    _run_notebook("04_evaluation.py", tmp, monkeypatch)
    out = capsys.readouterr().out
    assert results["evaluate"]["run_id"] in out and "finetuned_blend" in out and "ndcg_change_pct" in out
    assert (tmp / "warehouse" / "_plots" / "evaluation_ndcg10.png").stat().st_size > 1000
