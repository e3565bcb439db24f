"""Ingestion stage: raw files → `reviews`, `items`, `splits`, `rejected_records`.

Accounting is the contract: for reviews and for items, rows read = rows kept + rows rejected +
duplicates removed, logged and returned, so nothing is dropped without a count and, for rejected
rows, a record with file, line, reason and raw text. k-core filtering does not delete reviews: it
decides which interactions enter the `splits` table that training and evaluation use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from persona4rec.config import Config
from persona4rec.ingest.formats import item_parser, review_parser
from persona4rec.ingest.readers import input_type_of, list_input_files, read_parsed
from persona4rec.ingest.records import Rules
from persona4rec.ingest.transform import dedupe_items, dedupe_reviews, kcore, leave_one_out
from persona4rec.schemas import ITEM_ID, ITEMS, REJECTED_RECORDS, REVIEWS, SPLITS
from persona4rec.tables import TableStore, WriteResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Counts:
    read: int
    kept: int
    rejected: int
    duplicates: int

    def check(self, what: str) -> None:
        if self.read != self.kept + self.rejected + self.duplicates:
            raise AssertionError(f"{what}: read {self.read} != kept {self.kept} + rejected "
                                 f"{self.rejected} + duplicates {self.duplicates}")


@dataclass(frozen=True)
class IngestReport:
    reviews: Counts
    items: Counts
    users: int
    review_items: int
    core_interactions: int
    core_users: int
    core_items: int
    writes: dict[str, dict]
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def check_inputs(cfg: Config) -> None:
    """Fail at once, naming the key and the path, when an input path has no data files (run
    before Spark starts)."""
    list_input_files(cfg.resolve_path(cfg.ingest.reviews_path), "ingest.reviews_path")
    if cfg.ingest.items_path:
        list_input_files(cfg.resolve_path(cfg.ingest.items_path), "ingest.items_path")


def parse_reviews(spark: SparkSession, cfg: Config) -> DataFrame:
    ing = cfg.ingest
    files = list_input_files(cfg.resolve_path(ing.reviews_path), "ingest.reviews_path")
    rules = Rules(ing.rating_min, ing.rating_max, int(time.time()) + ing.max_clock_skew_s)
    parse = review_parser(ing.format)
    fields = [f for f in REVIEWS.schema.fields if f.name not in ("source_format", "source_file", "source_line")]
    return read_parsed(spark, files, input_type_of(files, ing.input_type, "ingest.reviews_path"),
                       lambda obj: parse(obj, rules), ing.format, fields, ing.batch_rows)


def parse_items(spark: SparkSession, cfg: Config) -> DataFrame | None:
    ing = cfg.ingest
    if not ing.items_path:
        return None
    files = list_input_files(cfg.resolve_path(ing.items_path), "ingest.items_path")
    fields = [f for f in ITEMS.schema.fields
              if f.name not in ("has_metadata", "source_format", "source_file", "source_line")]
    return read_parsed(spark, files, input_type_of(files, ing.input_type, "ingest.items_path"),
                       item_parser(ing.format), ing.format, fields, ing.batch_rows)


def rejected_rows(parsed: DataFrame, table: str) -> DataFrame:
    bad = parsed.filter(F.col("_reason").isNotNull())
    return bad.select(
        F.sha2(F.concat_ws("\u0001", F.lit(table), "source_file",
                           F.coalesce(F.col("source_line").cast("string"), F.lit("")),
                           F.coalesce("_raw", F.lit(""))), 256).alias("record_id"),
        F.lit(table).alias("table"), "source_file", "source_line",
        F.col("_reason").alias("reason"), F.col("_field").alias("field"),
        F.col("_message").alias("message"), F.col("_raw").alias("raw"),
        F.current_timestamp().alias("first_seen_at"),
    )


def items_with_fallback(items_kept: DataFrame | None, reviews: DataFrame, fmt: str) -> DataFrame:
    """Every reviewed item gets an `items` row; those without metadata are flagged, so later
    stages can fall back to titles/reviews instead of silently losing the item."""
    seen = reviews.select(ITEM_ID).distinct()
    bare = seen.select(
        ITEM_ID, *[F.lit(None).cast(f.dataType).alias(f.name) for f in ITEMS.schema.fields
                   if f.name not in (ITEM_ID, "has_metadata", "source_format")],
        F.lit(False).alias("has_metadata"), F.lit(fmt).alias("source_format"))
    if items_kept is None:
        return bare.select(ITEMS.columns)
    with_meta = items_kept.withColumn("has_metadata", F.lit(True)).select(ITEMS.columns)
    return with_meta.unionByName(bare.join(with_meta.select(ITEM_ID), ITEM_ID, "left_anti").select(ITEMS.columns))


def run(spark: SparkSession, cfg: Config) -> IngestReport:
    started = time.time()
    store = TableStore(spark, cfg)
    writes: dict[str, WriteResult] = {}

    parsed = parse_reviews(spark, cfg).persist(StorageLevel.MEMORY_AND_DISK)
    valid = parsed.filter(F.col("_reason").isNull()).drop("_reason", "_field", "_message", "_raw")
    reviews = dedupe_reviews(valid).persist(StorageLevel.MEMORY_AND_DISK)
    n_read, n_valid, n_kept = parsed.count(), valid.count(), reviews.count()
    review_counts = Counts(n_read, n_kept, n_read - n_valid, n_valid - n_kept)
    review_counts.check("reviews")
    users, review_items = (reviews.agg(F.countDistinct("user_id"), F.countDistinct(ITEM_ID)).first())

    rejected = rejected_rows(parsed, REVIEWS.name)
    item_counts = Counts(0, 0, 0, 0)
    items_parsed = parse_items(spark, cfg)
    items_kept = None
    if items_parsed is not None:
        items_parsed = items_parsed.persist(StorageLevel.MEMORY_AND_DISK)
        item_valid = items_parsed.filter(F.col("_reason").isNull()).drop("_reason", "_field", "_message", "_raw")
        items_kept = dedupe_items(item_valid)
        i_read, i_valid, i_kept = items_parsed.count(), item_valid.count(), items_kept.count()
        item_counts = Counts(i_read, i_kept, i_read - i_valid, i_valid - i_kept)
        item_counts.check("items")
        rejected = rejected.unionByName(rejected_rows(items_parsed, ITEMS.name))

    writes["reviews"] = store.upsert(reviews, REVIEWS)
    writes["items"] = store.upsert(items_with_fallback(items_kept, reviews, cfg.ingest.format), ITEMS)
    writes["rejected_records"] = store.upsert(rejected, REJECTED_RECORDS)

    # Splits are derived from the whole reviews table (this run's input and earlier ones).
    core = kcore(store.read(REVIEWS.name), cfg.split.kcore)
    splits = leave_one_out(core, cfg.split.min_interactions)
    writes["splits"] = store.upsert(splits, SPLITS, delete_missing=True)
    core_stats = core.agg(F.count("*"), F.countDistinct("user_id"), F.countDistinct(ITEM_ID)).first()

    parsed.unpersist()
    reviews.unpersist()
    if items_parsed is not None:
        items_parsed.unpersist()

    report = IngestReport(
        reviews=review_counts, items=item_counts, users=int(users), review_items=int(review_items),
        core_interactions=int(core_stats[0]), core_users=int(core_stats[1]), core_items=int(core_stats[2]),
        writes={k: {"version": w.version, "operation": w.operation, **w.metrics} for k, w in writes.items()},
        seconds=round(time.time() - started, 2),
    )
    log.info("ingest reviews: read=%d kept=%d rejected=%d duplicates=%d (users=%d items=%d)",
             n_read, review_counts.kept, review_counts.rejected, review_counts.duplicates, users, review_items)
    log.info("ingest items: read=%d kept=%d rejected=%d duplicates=%d", *asdict(item_counts).values())
    log.info("k-core (k=%d): %d interactions, %d users, %d items", cfg.split.kcore, *core_stats)
    return report
