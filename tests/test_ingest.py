"""The ingest job end to end on small files: every format, every bad-input class, idempotence."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import functions as F

from conftest import ROOT, SHARED_DATA, make_config, write_lines
from persona4rec.ingest import job as ingest
from persona4rec.ingest.readers import InputError
from persona4rec.tables import TableStore

pytestmark = pytest.mark.spark


def amazon_review(user, item, ts, text="Fine product.", rating=4.0):
    return {"reviewerID": user, "asin": item, "overall": rating, "unixReviewTime": ts,
            "reviewText": text, "summary": "s"}


def dense_amazon(users=4, items=4, t0=1_300_000_000):
    """Every user reviews every item: survives k-core with k <= min(users, items)."""
    return [amazon_review(f"U{u}", f"I{i}", t0 + 100 * u + i) for u in range(users) for i in range(items)]


def run_ingest(spark, tmp_path, *overrides):
    cfg = make_config(tmp_path, *overrides)
    return ingest.run(spark, cfg), TableStore(spark, cfg)


def test_sample_ingests_with_exact_counts_and_a_rerun_changes_nothing(spark, tmp_path):
    report, store = run_ingest(spark, tmp_path)
    assert (report.reviews.read, report.reviews.kept, report.reviews.rejected,
            report.reviews.duplicates) == (240, 237, 0, 3)
    assert (report.items.read, report.items.kept, report.items.duplicates) == (47, 29, 18)
    assert (report.core_interactions, report.core_users, report.core_items) == (186, 28, 20)
    items = store.read("items")
    assert items.count() == 30  # 29 with metadata + 1 reviewed item without any
    assert items.filter(~F.col("has_metadata")).count() == 1
    assert items.filter(F.col("title").contains("<")).count() == 0

    again, _ = run_ingest(spark, tmp_path)
    for table in ("reviews", "items", "splits"):
        w = again.writes[table]
        assert (w.get("numTargetRowsInserted", 0), w.get("numTargetRowsUpdated", 0),
                w.get("numTargetRowsDeleted", 0)) == (0, 0, 0), table


def test_bad_input_goes_to_rejected_records_and_counts_add_up(spark, tmp_path):
    good = dense_amazon(3, 3)
    lines = [*good,
             b'{"reviewerID": "X1", "asin": "I0", "overall": 5.0, "unixReviewTime": 1300000000, "reviewText": "caf\xe9"}',
             '{"reviewerID": "X2", "asin": "I0", "overall": 5.0',
             "[1, 2, 3]",
             {"asin": "I0", "overall": 5.0, "unixReviewTime": 1300000000, "reviewText": "no user"},
             amazon_review("X3", "I0", 1300000000, rating="five"),
             amazon_review("X4", "I0", 1300000000, text="   "),
             amazon_review("X5", "I0", 1300000000, rating=9.0),
             amazon_review("X6", "I0", 4_102_444_800),
             amazon_review("U0", "I0", 1_299_999_999, text="an older duplicate")]
    src = write_lines(tmp_path / "in" / "reviews.json.gz", lines)
    meta = write_lines(tmp_path / "in" / "meta.jsonl", [
        {"asin": "I0", "title": "<span class=\"x\""}, {"asin": "I1", "title": "One"},
        {"title": "no asin"}, "{broken"])
    report, store = run_ingest(spark, tmp_path, f"ingest.reviews_path={src}",
                               f"ingest.items_path={meta}", "split.kcore=3")
    r = report.reviews
    assert (r.read, r.kept, r.rejected, r.duplicates) == (len(lines), 9, 8, 1)
    assert r.read == r.kept + r.rejected + r.duplicates
    assert (report.items.read, report.items.kept, report.items.rejected) == (4, 2, 2)

    rejected = {(x.table, x.source_line): x for x in store.read("rejected_records").collect()}
    want = {10: ("undecodable_bytes", None), 11: ("malformed_json", None),
            12: ("not_an_object", None), 13: ("missing_field", "reviewerID"),
            14: ("wrong_type", "overall"), 15: ("empty_text", "reviewText"),
            16: ("out_of_range", "overall"), 17: ("future_timestamp", "unixReviewTime")}
    for line, (reason, field) in want.items():
        rec = rejected[("reviews", line)]
        assert (rec.reason, rec.field) == (reason, field), line
        assert rec.source_file == str(src) and rec.raw and rec.message
    assert rejected[("reviews", 10)].raw.endswith('caf\\xe9"}')
    assert {rejected[("items", n)].reason for n in (3, 4)} == {"missing_field", "malformed_json"}
    kept = store.read("reviews").filter("user_id = 'U0' AND item_id = 'I0'").first()
    assert kept.review_text == "Fine product."  # the later review of the pair won

    again, _ = run_ingest(spark, tmp_path, f"ingest.reviews_path={src}", f"ingest.items_path={meta}",
                          "split.kcore=3")
    assert again.writes["rejected_records"].get("numTargetRowsInserted", 0) == 0
    assert store.read("rejected_records").count() == 10


def test_hostile_files_become_rejected_records_and_a_rerun_commits_nothing(spark, tmp_path):
    """A gzip cut mid-stream beside a valid file, 1e400 timestamps, vote counts past int32, NUL
    bytes and invalid UTF-8: no crash, every good line kept, each bad one a rejected record."""
    import gzip

    folder = tmp_path / "in"
    write_lines(folder / "a.jsonl", dense_amazon(3, 3))
    body = b"".join(json.dumps(amazon_review(f"T{n}", f"I{n % 3}", 1_300_000_000 + n, "x" * 300)).encode() + b"\n"
                    for n in range(60))
    packed = gzip.compress(body)
    (folder / "b.json.gz").write_bytes(packed[: len(packed) // 2])  # cut mid-stream
    hostile = [
        b'{"reviewerID": "H1", "asin": "I0", "overall": 5.0, "unixReviewTime": 1e400, "reviewText": "inf"}',
        b'{"reviewerID": "H2", "asin": "I0", "overall": 5.0, "unixReviewTime": -1e400, "reviewText": "-inf"}',
        json.dumps({**amazon_review("H3", "I1", 1_300_000_000), "vote": "3,000,000,000"}).encode(),
        json.dumps({**amazon_review("H4", "I1", 1_300_000_000), "helpful": [3_000_000_000, 3_000_000_001]}).encode(),
        b'{"reviewerID": "H5", "asin": "I2", "overall": 5.0, "unixReviewTime": 1300000000, "reviewText": "a\x00b"}',
        b'\x00\x00{"reviewerID": "H6"}',
        b'{"reviewerID": "H7", "asin": "I2", "overall": 5.0, "unixReviewTime": 1300000000, "reviewText": "\xff\xfe"}',
        json.dumps({**amazon_review("H8", "I2", 1_300_000_000), "overall": 10 ** 400}).encode(),
    ]
    write_lines(folder / "c.jsonl", hostile)
    report, store = run_ingest(spark, tmp_path, f"ingest.reviews_path={folder}", "ingest.items_path=null",
                               "ingest.format=amazon2014", "split.kcore=3")
    r = report.reviews
    assert r.read == r.kept + r.rejected + r.duplicates
    from_gz = store.read("reviews").filter(F.col("user_id").startswith("T")).count()
    assert 10 < from_gz < 60 and r.kept == 9 + from_gz  # the good lines before the cut are kept
    rejected = store.read("rejected_records").collect()
    reasons = {(x.source_file.rsplit("/", 1)[-1], x.source_line): (x.reason, x.field) for x in rejected}
    assert reasons[("b.json.gz", from_gz + 1)][0] == "truncated_file"
    assert [x.message for x in rejected if x.reason == "truncated_file"][0].startswith(f"{folder}/b.json.gz cannot")
    assert {k[1]: v for k, v in reasons.items() if k[0] == "c.jsonl"} == {
        1: ("out_of_range", "unixReviewTime"), 2: ("out_of_range", "unixReviewTime"),
        3: ("out_of_range", "vote"), 4: ("out_of_range", "helpful"), 5: ("malformed_json", None),
        6: ("malformed_json", None), 7: ("undecodable_bytes", None), 8: ("out_of_range", "overall")}

    versions = {t: store.version(t) for t in ("reviews", "items", "splits", "rejected_records")}
    again, _ = run_ingest(spark, tmp_path, f"ingest.reviews_path={folder}", "ingest.items_path=null",
                          "ingest.format=amazon2014", "split.kcore=3")
    assert {t: store.version(t) for t in versions} == versions  # nothing new: no Delta version at all
    assert all(w["operation"] == "MERGE (no change)" for w in again.writes.values()), again.writes


def test_amazon2023_yelp_and_parquet_inputs(spark, tmp_path):
    reviews23 = [{"user_id": f"U{u}", "asin": f"C{i}", "parent_asin": f"P{i}", "rating": 5.0,
                  "timestamp": 1_600_000_000_000 + 1000 * (10 * u + i), "title": "t", "text": "good",
                  "verified_purchase": True, "helpful_vote": 1} for u in range(3) for i in range(3)]
    meta23 = [{"parent_asin": f"P{i}", "title": f"Pen {i}", "main_category": "Office",
               "categories": ["Office"], "features": ["f"], "description": ["d"], "details": {}}
              for i in range(3)]
    src = write_lines(tmp_path / "a23" / "r.jsonl", reviews23)
    meta = write_lines(tmp_path / "a23" / "m.jsonl.gz", meta23)
    report, store = run_ingest(spark, tmp_path / "a", "ingest.format=amazon2023",
                               f"ingest.reviews_path={src}", f"ingest.items_path={meta}", "split.kcore=3")
    assert report.reviews.kept == 9 and report.core_interactions == 9
    assert {r.item_id for r in store.read("items").collect()} == {"P0", "P1", "P2"}

    yelp = [{"review_id": f"r{u}{i}", "user_id": f"u{u}", "business_id": f"b{i}", "stars": 4,
             "date": f"2019-01-0{i + 1} 10:00:0{u}", "text": "tasty"} for u in range(3) for i in range(3)]
    biz = [{"business_id": f"b{i}", "name": f"Diner {i}", "categories": "Restaurants, Diners"} for i in range(3)]
    pq = tmp_path / "yelp_pq"
    spark.createDataFrame(yelp).write.parquet(str(pq / "reviews"))
    write_lines(tmp_path / "yelp_biz" / "business.json", biz)
    report, store = run_ingest(spark, tmp_path / "y", "ingest.format=yelp",
                               f"ingest.reviews_path={pq / 'reviews'}",
                               f"ingest.items_path={tmp_path / 'yelp_biz'}", "split.kcore=3")
    assert (report.reviews.read, report.reviews.kept) == (9, 9)
    assert store.read("items").filter("title = 'Diner 1'").first().main_category == "Restaurants"
    splits = store.read("splits").groupBy("split").count().collect()
    assert {r.split: r["count"] for r in splits} == {"train": 3, "validation": 3, "test": 3}


def test_amazon2014_without_metadata_flags_items(spark, tmp_path):
    src = write_lines(tmp_path / "r.json.gz", dense_amazon(3, 3))
    report, store = run_ingest(spark, tmp_path, "ingest.format=amazon2014",
                               f"ingest.reviews_path={src}", "ingest.items_path=null", "split.kcore=3")
    assert report.items.read == 0
    assert store.read("items").filter("has_metadata").count() == 0
    assert store.read("items").count() == 3


@pytest.mark.integration
def test_wrong_path_fails_before_spark_starts_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "ingest.py"), "--target", "test",
                           "--set", f"storage.root={tmp_path / 'wh'}", "--set", f"ingest.reviews_path={tmp_path}/nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    # One line, naming the key and the path; no Spark or JVM output (it never started).
    assert proc.stderr.strip() == (f"error: ingest.reviews_path='{tmp_path}/nope': no such file or folder; set "
                                   "ingest.reviews_path to an existing path")
    assert not (tmp_path / "wh").exists()


def test_wrong_path_fails_fast_with_the_key_named(spark, tmp_path):
    with pytest.raises(InputError, match="ingest.reviews_path=.*no such file or folder"):
        run_ingest(spark, tmp_path, f"ingest.reviews_path={tmp_path}/missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no data files"):
        run_ingest(spark, tmp_path, f"ingest.reviews_path={tmp_path / 'empty'}")


@pytest.mark.integration
@pytest.mark.slow
def test_job_entry_point_writes_tables_a_fresh_session_reads(spark, tmp_path):
    """`python jobs/ingest.py` in its own process (its own Spark), read back here."""
    warehouse = tmp_path / "wh"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "ingest.py"), "--target", "test",
         "--set", f"storage.root={warehouse}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["reviews"]["kept"] == 237
    assert summary["spark"] == {"master": "local[2]", "shuffle_partitions": 2}  # nothing launched it: config
    table = DeltaTable.forPath(spark, str(warehouse / "reviews"))
    assert table.toDF().count() == 237
    ops = [r.operation for r in spark.sql(f"DESCRIBE HISTORY delta.`{warehouse / 'splits'}`").collect()]
    assert "MERGE" in ops


@pytest.mark.integration
@pytest.mark.slow
def test_spark_submit_runs_the_job_on_the_launchers_master_and_settings(tmp_path):
    """The same job file under spark-submit, with the Delta package on the command line: the
    launcher's --master and --conf win over the config's local defaults (test.yaml: local[2], 2)."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "spark-submit"), "--packages",
         "io.delta:delta-spark_4.2_2.13:4.4.0", "--conf", "spark.ui.enabled=false",
         "--master", "local[1]", "--conf", "spark.sql.shuffle.partitions=3",
         str(ROOT / "jobs" / "ingest.py"), "--target", "test",
         "--set", f"storage.root={tmp_path / 'wh'}"],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PYSPARK_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["core_interactions"] == 186
    assert summary["spark"] == {"master": "local[1]", "shuffle_partitions": 3}
    assert (tmp_path / "wh" / "reviews" / "_delta_log").is_dir()


MUSICAL = SHARED_DATA / "amazon2014_musical_instruments_5" / "reviews_Musical_Instruments_5.json.gz"
MAGAZINE = SHARED_DATA / "amazon2018_magazine_subscriptions_5"


@pytest.mark.slow
@pytest.mark.skipif(not MUSICAL.exists(), reason="shared dataset not present")
def test_musical_instruments_counts(spark, tmp_path):
    report, store = run_ingest(spark, tmp_path, "ingest.format=amazon2014",
                               f"ingest.reviews_path={MUSICAL}", "ingest.items_path=null")
    r = report.reviews
    assert r.read == 10_261
    assert (r.kept, r.rejected, r.duplicates) == (10_254, 7, 0)  # 7 reviews have empty text
    assert (report.users, report.review_items) == (1_429, 900)
    reasons = store.read("rejected_records").groupBy("reason").count().collect()
    assert {x.reason: x["count"] for x in reasons} == {"empty_text": 7}


@pytest.mark.slow
@pytest.mark.skipif(not MAGAZINE.exists(), reason="shared dataset not present")
def test_magazine_subscriptions_ingests_with_metadata(spark, tmp_path):
    report, store = run_ingest(
        spark, tmp_path, "ingest.format=amazon2018",
        f"ingest.reviews_path={MAGAZINE / 'Magazine_Subscriptions_5.json.gz'}",
        f"ingest.items_path={MAGAZINE / 'meta_Magazine_Subscriptions.json.gz'}")
    r = report.reviews
    assert (r.read, r.rejected, r.duplicates) == (2_375, 1, 73)
    items = store.read("items")
    assert items.filter("has_metadata").join(store.read("reviews").select("item_id").distinct(),
                                             "item_id").count() == 151
    assert items.filter(F.col("title").contains("<span")).count() == 0
