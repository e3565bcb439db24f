"""Who decides the Spark settings: a launcher's master wins over the config's local defaults.

The spark-submit case itself runs in tests/test_ingest.py (a real spark-submit, its JSON summary).
"""

import pytest

from persona4rec.spark import launcher_settings

pytestmark = pytest.mark.unit


@pytest.fixture
def bare_env(monkeypatch, tmp_path):
    for var in ("PYSPARK_GATEWAY_PORT", "PYSPARK_SUBMIT_ARGS", "SPARK_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path))
    return monkeypatch, tmp_path


def test_nothing_configured_a_master_so_the_local_builder_applies(bare_env):
    assert launcher_settings() is None


def test_a_master_in_pyspark_submit_args_is_the_launchers(bare_env):
    monkeypatch, _ = bare_env
    monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", "--master yarn --conf spark.sql.shuffle.partitions=64 "
                                              "--driver-memory 8g pyspark-shell")
    assert launcher_settings() == {"spark.master": "yarn", "spark.sql.shuffle.partitions": "64",
                                   "spark.driver.memory": "8g"}


def test_a_master_in_spark_defaults_is_the_launchers(bare_env):
    _, conf_dir = bare_env
    (conf_dir / "spark-defaults.conf").write_text("# cluster defaults\nspark.master   spark://head:7077\n"
                                                  "spark.executor.memory 16g\n")
    assert launcher_settings() == {"spark.master": "spark://head:7077", "spark.executor.memory": "16g"}
    (conf_dir / "spark-defaults.conf").write_text("spark.executor.memory 16g\n")
    assert launcher_settings() is None  # settings, but no master: still a local run
