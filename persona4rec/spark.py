"""Spark session factory.

On a cluster (Databricks, spark-submit to YARN/Kubernetes) a session already exists and carries
the platform's Delta setup: we reuse it untouched. Locally we build a `local[*]` session with the
Delta SQL extension and catalog, and let delta-spark's pip helper put the matching
`io.delta:delta-spark` jar on the classpath (resolved once from Maven Central, then from the Ivy
cache under ~/.ivy2*).
"""

from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

from persona4rec.config import Config

log = logging.getLogger(__name__)


def get_spark(cfg: Config) -> SparkSession:
    """Return the active session if there is one, else a local Delta-enabled session."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Workers must run the same interpreter as the driver (the project's virtualenv), or the
    # pandas UDFs import a different pyarrow/pandas, or none at all.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from delta import configure_spark_with_delta_pip

    s = cfg.spark
    builder = (
        SparkSession.builder.master(s.master)
        .appName(s.app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.shuffle.partitions", str(s.shuffle_partitions))
        .config("spark.driver.memory", s.driver_memory)
        .config("spark.ui.enabled", str(s.ui_enabled).lower())
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.databricks.delta.schema.autoMerge.enabled", "false")
        .config("spark.sql.warehouse.dir", cfg.resolve_path(cfg.storage.root) + "/_spark_warehouse")
    )
    for key, value in s.conf.items():
        builder = builder.config(key, value)
    spark = configure_spark_with_delta_pip(builder).getOrCreate()
    spark.sparkContext.setLogLevel(s.log_level)
    log.info("started local Spark %s (%s) with Delta", spark.version, s.master)
    return spark
