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
