"""The one write path for every Delta table.

Why one helper: idempotence and crash-safety come from MERGE on keys (a rerun inserts nothing and
rewrites nothing that did not change; a crash leaves the last committed version), and they only
hold if every stage writes the same way. Each write returns the Delta operation metrics so jobs
log and tests assert what actually happened (inserted/updated/deleted rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.config import Config
from persona4rec.schemas import SchemaError, TableSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteResult:
    table: str
    operation: str
    version: int
    metrics: dict[str, int] = field(default_factory=dict)
    source_duplicates_dropped: int = 0

    def get(self, name: str) -> int:
        return self.metrics.get(name, 0)

    @property
    def inserted(self) -> int:
        return self.get("numTargetRowsInserted")

    @property
    def updated(self) -> int:
        return self.get("numTargetRowsUpdated")

    @property
    def deleted(self) -> int:
        return self.get("numTargetRowsDeleted")


class TableStore:
    """Where tables live (a folder of Delta directories, or catalog.schema) and how they are written."""

    def __init__(self, spark: SparkSession, cfg: Config):
        self.spark = spark
        self.cfg = cfg
        st = cfg.storage
        self._prefix = ".".join(p for p in (st.catalog, st.schema) if p) if st.schema else None
        self._root = None if self._prefix else cfg.resolve_path(st.root).rstrip("/")

    # -- locating ------------------------------------------------------------------------
    def location(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else f"{self._root}/{name}"

    def exists(self, name: str) -> bool:
        if self._prefix:
            return self.spark.catalog.tableExists(self.location(name))
        return DeltaTable.isDeltaTable(self.spark, self.location(name))

    def delta(self, name: str) -> DeltaTable:
        if self._prefix:
            return DeltaTable.forName(self.spark, self.location(name))
        return DeltaTable.forPath(self.spark, self.location(name))

    def properties(self, name: str) -> dict[str, str]:
        """The Delta table's TBLPROPERTIES."""
        return dict(self.delta(name).detail().select("properties").first()[0] or {})

    def set_properties(self, name: str, values: dict[str, str]) -> None:
        """Set TBLPROPERTIES that differ from the table's (none differing: no commit, so an
        unchanged rerun still commits no version)."""
        changed = {k: v for k, v in values.items() if self.properties(name).get(k) != v}
        if changed:
            table = self.location(name) if self._prefix else f"delta.`{self.location(name)}`"
            pairs = ", ".join(f"'{k}' = '{v}'" for k, v in changed.items())
            self.spark.sql(f"ALTER TABLE {table} SET TBLPROPERTIES ({pairs})")

    def read(self, name: str, version: int | None = None) -> DataFrame:
        if not self.exists(name):
            raise FileNotFoundError(
                f"table '{name}' does not exist at {self.location(name)}; run the stage that writes it first")
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.table(self.location(name)) if self._prefix else reader.load(self.location(name))

    def version(self, name: str) -> int:
        return int(self.delta(name).history(1).select("version").first()[0])

    # -- writing -------------------------------------------------------------------------
    def ensure(self, spec: TableSpec) -> DeltaTable:
        """Create the table empty with its schema if it does not exist yet; fail, naming the
        columns, when an existing table has other columns than this version writes (a table
        left by an older version would otherwise fail deep inside a MERGE)."""
        builder = DeltaTable.createIfNotExists(self.spark)
        builder = builder.tableName(self.location(spec.name)) if self._prefix \
            else builder.location(self.location(spec.name))
        builder = builder.addColumns(spec.schema)
        if spec.partition_by:
            builder = builder.partitionedBy(*spec.partition_by)
        table = builder.execute()
        have = table.toDF().columns
        missing, extra = [c for c in spec.columns if c not in have], [c for c in have if c not in spec.columns]
        if missing or extra:
            raise SchemaError(
                f"table '{spec.name}' at {self.location(spec.name)} has columns {have}; this version writes "
                f"{spec.columns} (missing {missing}, unexpected {extra}). It was written by an older version: "
                f"migrate it (ALTER TABLE ... ADD COLUMNS), or, for a derived table, drop it and rerun the stage "
                f"that writes it")
        return table

    def upsert(
        self,
        df: DataFrame,
        spec: TableSpec,
        delete_missing: bool = False,
        delete_missing_condition: str | None = None,
        update_condition: str | None = None,
    ) -> WriteResult:
        """MERGE `df` into the table on `spec.keys`, touching only what changes.

        Source rows are first conformed to the table schema and de-duplicated on the keys
        (deterministically: the row with the smallest content hash wins, so two runs over the
        same input keep the same row). Then the changes are worked out before writing: new keys,
        rows whose values differ (insert-only columns aside), and, with `delete_missing`, target
        rows that the source no longer has (optionally only those matching
        `delete_missing_condition`, a SQL predicate on `t.`: the contract for derived tables that
        are recomputed whole, like the splits). `update_condition` (SQL on `t.`/`s.`) further
        restricts which matched rows may be updated (the LLM cache never overwrites a success).
        Only the changes go into the MERGE, so it rewrites only the files that hold them, and a
        rerun on unchanged input commits no Delta version at all: table versions stay an honest
        signal of change for whoever reads them incrementally.
        """
        # Persisted: the source is read twice (changes, MERGE) and may be expensive to recompute
        # (model inference, file parsing).
        conformed = self._conform(df, spec).persist(StorageLevel.MEMORY_AND_DISK)
        source, dropped = self._dedupe(conformed, spec)
        target = self.ensure(spec)
        before = self.version(spec.name)
        on = " AND ".join(f"t.`{k}` = s.`{k}`" for k in spec.keys)
        value_cols = [c for c in spec.columns if c not in spec.keys and c not in spec.insert_only]
        changed = " OR ".join(_differs(c, spec.schema[c].dataType) for c in value_cols) or "false"
        if update_condition:
            changed = f"({update_condition}) AND ({changed})"
        current = self.read(spec.name, before).alias("t")
        fresh = source.alias("s").join(current, F.expr(on), "left") \
            .filter(F.expr(f"t.`{spec.keys[0]}` IS NULL OR ({changed})")) \
            .select(*[F.col(f"s.`{c}`").alias(c) for c in spec.columns], F.lit("upsert").alias("_op"))
        changes = fresh
        if delete_missing:
            gone = current.join(source.alias("s"), F.expr(on), "left_anti")
            if delete_missing_condition:
                gone = gone.filter(F.expr(delete_missing_condition))
            changes = fresh.unionByName(gone.select(*[F.col(f"t.`{k}`").alias(k) for k in spec.keys],
                                                    F.lit("delete").alias("_op")), allowMissingColumns=True)
        changes = changes.persist(StorageLevel.MEMORY_AND_DISK)
        if changes.isEmpty():
            log.info("wrote %s: no change, nothing committed (still v%d)", spec.name, before)
            result = WriteResult(table=spec.name, operation="MERGE (no change)", version=before,
                                 source_duplicates_dropped=dropped)
        else:
            target.alias("t").merge(changes.alias("s"), on) \
                .whenMatchedDelete(condition="s._op = 'delete'") \
                .whenMatchedUpdate(condition=f"s._op = 'upsert' AND ({changed})",
                                   set={f"`{c}`": f"s.`{c}`" for c in value_cols}) \
                .whenNotMatchedInsert(condition="s._op = 'upsert'",
                                      values={f"`{c}`": f"s.`{c}`" for c in spec.columns}) \
                .execute()
            result = self._result(spec.name, dropped, before, "MERGE")
        changes.unpersist()
        conformed.unpersist()
        return result

    def delete_keys(self, spec: TableSpec, keys: DataFrame) -> WriteResult:
        """Delete the rows whose keys appear in `keys` (a DataFrame of the key columns)."""
        target = self.ensure(spec)
        before = self.version(spec.name)
        on = " AND ".join(f"t.`{k}` = s.`{k}`" for k in spec.keys)
        target.alias("t").merge(keys.select(*spec.keys).distinct().alias("s"), on).whenMatchedDelete().execute()
        return self._result(spec.name, 0, before, "MERGE")

    def replace_where(self, df: DataFrame, spec: TableSpec, predicate: str) -> WriteResult:
        """Atomically replace the rows matching `predicate` (a partition) with `df`: the
        contract for outputs that are recomputed whole per run date."""
        self.ensure(spec)
        before = self.version(spec.name)
        source, dropped = self._dedupe(self._conform(df, spec), spec)
        writer = (source.write.format("delta").mode("overwrite").option("replaceWhere", predicate))
        if self._prefix:
            writer.saveAsTable(self.location(spec.name))
        else:
            writer.save(self.location(spec.name))
        return self._result(spec.name, dropped, before, "WRITE")

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _conform(df: DataFrame, spec: TableSpec) -> DataFrame:
        missing = [c for c in spec.columns if c not in df.columns]
        if missing:
            raise ValueError(f"rows for table '{spec.name}' lack column(s) {missing}")
        return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in spec.schema.fields])

    @staticmethod
    def _dedupe(df: DataFrame, spec: TableSpec) -> tuple[DataFrame, int]:
        content = [c for c in spec.columns if c not in spec.keys]
        if not content:
            deduped = df.dropDuplicates(list(spec.keys))
        else:
            order = F.xxhash64(F.to_json(F.struct(*[F.col(c) for c in content])))
            w = Window.partitionBy(*spec.keys).orderBy(order, F.to_json(F.struct(*content)))
            deduped = df.withColumn("_rn", F.row_number().over(w)).filter("_rn = 1").drop("_rn")
        totals = df.groupBy(*spec.keys).count().agg(F.sum("count"), F.count("*")).first()
        n_in, n_out = int(totals[0] or 0), int(totals[1] or 0)
        if n_in != n_out:
            log.warning("table %s: dropped %d duplicate source key(s) %s",
                        spec.name, n_in - n_out, list(spec.keys))
        return deduped, n_in - n_out

    def _result(self, name: str, dropped: int, before: int, operation: str) -> WriteResult:
        last = self.delta(name).history(1).first()
        if int(last["version"]) == before:
            # Delta commits nothing when a MERGE has nothing to do (e.g. an empty source).
            log.info("wrote %s: nothing to commit, still v%d", name, before)
            return WriteResult(table=name, operation=f"{operation} (no commit)", version=before,
                               metrics={}, source_duplicates_dropped=dropped)
        metrics = {k: int(v) for k, v in (last["operationMetrics"] or {}).items() if str(v).isdigit()}
        result = WriteResult(table=name, operation=last["operation"], version=int(last["version"]),
                             metrics=metrics, source_duplicates_dropped=dropped)
        log.info("wrote %s v%d (%s): %s", name, result.version, result.operation, metrics)
        return result


def _differs(col: str, dtype: T.DataType) -> str:
    """A null-safe 'value changed' predicate; maps cannot be compared directly, so compare JSON."""
    if isinstance(dtype, T.MapType) or _contains_map(dtype):
        return f"NOT (to_json(t.`{col}`) <=> to_json(s.`{col}`))"
    return f"NOT (t.`{col}` <=> s.`{col}`)"


def _contains_map(dtype: T.DataType) -> bool:
    if isinstance(dtype, T.MapType):
        return True
    if isinstance(dtype, T.ArrayType):
        return _contains_map(dtype.elementType)
    if isinstance(dtype, T.StructType):
        return any(_contains_map(f.dataType) for f in dtype.fields)
    return False
