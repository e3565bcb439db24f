"""Spark session factory: the launcher's settings win.

Three ways a job starts, and who decides the Spark settings in each:

* **A session already exists** (Databricks, a notebook, the test-suite): it is reused untouched.
* **A launcher started the driver** (`spark-submit --master yarn|k8s://…|spark://…|local[n]`,
  `pyspark`, or a master named in `spark-defaults.conf` / `PYSPARK_SUBMIT_ARGS`): master, driver
  memory, shuffle partitions and every `--conf` come from the launcher. We only add what the code
  needs and the launcher left unset (the Delta SQL extension and catalog, UTC session time, Arrow)
  and the keys of `spark.conf` in our config that the launcher did not set. The Delta jar must
  come with the launcher (`--packages io.delta:delta-spark_4.2_2.13:4.4.0`, or the cluster's own).
* **Nothing configured a master** (`python jobs/x.py`, `./p4r demo`): we build a local session
  from `spark.*` in our config (`local[*]`, shuffle partitions, driver memory) and let
  delta-spark's pip helper put the matching `io.delta:delta-spark` jar on the classpath (resolved
  once from Maven Central, then from the Ivy cache under ~/.ivy2*).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

from pyspark import SparkConf
from pyspark.sql import SparkSession

from persona4rec.config import Config

log = logging.getLogger(__name__)

# What our code relies on, whoever launched the driver (set only where the launcher did not).
REQUIRED = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.databricks.delta.schema.autoMerge.enabled": "false",
}


def launcher_settings() -> dict[str, str] | None:
    """The spark.* settings a launcher gave this driver, or None when nothing configured a master
    (then the local builder applies).

    Under spark-submit (and `pyspark`) the driver's JVM is already running and announces its
    gateway in PYSPARK_GATEWAY_PORT: its system properties hold `--master` and every `--conf`.
    Otherwise a master may still be configured for the JVM we are about to launch, through
    PYSPARK_SUBMIT_ARGS or spark-defaults.conf.
    """
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        from pyspark.core.context import SparkContext

        SparkContext._ensure_initialized()  # connects to the launcher's JVM; launches nothing
        return dict(SparkConf(loadDefaults=True).getAll())
    settings = {**_spark_defaults(), **_submit_args(os.environ.get("PYSPARK_SUBMIT_ARGS", ""))}
    return settings if "spark.master" in settings else None


def _spark_defaults() -> dict[str, str]:
    folder = os.environ.get("SPARK_CONF_DIR") or (
        os.path.join(os.environ["SPARK_HOME"], "conf") if os.environ.get("SPARK_HOME") else None)
    path = Path(folder, "spark-defaults.conf") if folder else None
    if path is None or not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and not parts[0].startswith("#"):
            out[parts[0]] = parts[1].strip()
    return out


def _submit_args(args: str) -> dict[str, str]:
    words, out = shlex.split(args), {}
    for flag, value in zip(words, words[1:]):
        if flag == "--master":
            out["spark.master"] = value
        elif flag == "--conf" and "=" in value:
            key, _, val = value.partition("=")
            out[key] = val
        elif flag == "--driver-memory":
            out["spark.driver.memory"] = value
    return out


def get_spark(cfg: Config) -> SparkSession:
    """The active session if there is one; else a session on the launcher's settings; else a
    local Delta-enabled session from config (see the module docstring)."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Workers must run the same interpreter as the driver (the project's virtualenv), or the
    # pandas UDFs import a different pyarrow/pandas, or none at all.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    s = cfg.spark
    launched = launcher_settings()
    if launched is not None:
        builder = SparkSession.builder
        for key, value in {**REQUIRED, "spark.app.name": s.app_name, **s.conf}.items():
            if key not in launched:
                builder = builder.config(key, value)
        if not os.environ.get("PYSPARK_GATEWAY_PORT") and "spark.jars.packages" not in launched:
            from delta import configure_spark_with_delta_pip  # the JVM is not started yet: add Delta

            builder = configure_spark_with_delta_pip(builder)
        spark = builder.getOrCreate()
        log.info("Spark %s from the launcher: master %s, %s shuffle partitions", spark.version,
                 spark.sparkContext.master, spark.conf.get("spark.sql.shuffle.partitions"))
        return spark

    from delta import configure_spark_with_delta_pip

    local = {
        "spark.master": s.master,
        "spark.app.name": s.app_name,
        **REQUIRED,
        "spark.sql.shuffle.partitions": str(s.shuffle_partitions),
        "spark.driver.memory": s.driver_memory,
        "spark.ui.enabled": str(s.ui_enabled).lower(),
        "spark.sql.warehouse.dir": cfg.resolve_path(cfg.storage.root) + "/_spark_warehouse",
        **s.conf,
    }
    builder = SparkSession.builder
    for key, value in local.items():
        builder = builder.config(key, value)
    spark = configure_spark_with_delta_pip(builder).getOrCreate()
    spark.sparkContext.setLogLevel(s.log_level)
    log.info("started local Spark %s (%s) with Delta", spark.version, s.master)
    return spark


def describe(spark: SparkSession) -> dict:
    """Where a job ran, for its JSON summary: the master and the shuffle partitions in force."""
    return {"master": spark.sparkContext.master,
            "shuffle_partitions": int(spark.conf.get("spark.sql.shuffle.partitions"))}
