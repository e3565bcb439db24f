"""What a notebook needs to start: the session, the config and the table store.

Notebooks take config overrides from the environment variable PERSONA4REC_OVERRIDES
(`key=value` pairs separated by `;`), since they have no command line; `target` likewise from
PERSONA4REC_TARGET. On Databricks the attached cluster's session is reused.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from persona4rec.config import Config, load_config
from persona4rec.tables import TableStore

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def context() -> tuple["SparkSession", Config, TableStore]:
    from persona4rec.spark import get_spark

    overrides = [o.strip() for o in os.environ.get("PERSONA4REC_OVERRIDES", "").split(";") if o.strip()]
    cfg = load_config(os.environ.get("PERSONA4REC_TARGET") or None, overrides)
    spark = get_spark(cfg)
    return spark, cfg, TableStore(spark, cfg)
