import pytest

from persona4rec.config import ConfigError, load_config

pytestmark = pytest.mark.unit


def test_base_config_loads_embedded_defaults():
    cfg = load_config()
    assert cfg.ingest.format == "amazon2018"
    assert cfg.split.kcore == 5
    assert cfg.spark.conf["spark.databricks.delta.snapshotPartitions"] == "2"
    assert cfg.mode == "production"  # the product; leave-one-out is asked for explicitly


def test_target_layer_and_overrides_apply_in_order():
    cfg = load_config("test", ["split.kcore=10", "ingest.items_path=null",
                               "spark.conf.spark.sql.ansi.enabled=true"])
    assert cfg.spark.master == "local[2]"  # from test.yaml
    assert cfg.split.kcore == 10  # from --set
    assert cfg.ingest.items_path is None
    assert cfg.spark.conf["spark.sql.ansi.enabled"] == "true"
    assert cfg.spark.conf["spark.ui.showConsoleProgress"] == "false"  # base kept


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.split.kcore = 3


@pytest.mark.parametrize("override, message", [
    ("split.kcor=3", "unknown config key(s) ['kcor'] under 'split.'"),
    ("split.kcore=abc", "config key 'split.kcore' has bad value 'abc': expected an integer"),
    ("split.kcore=0", "config key 'split.kcore' has bad value 0: must be >= 1"),
    ("ingest.format=csv", "config key 'ingest.format' has bad value 'csv': expected one of"),
    ("ingest.rating_min=9", "config key 'ingest.rating_min' has bad value 9.0"),
    ("spark.ui_enabled=maybe", "config key 'spark.ui_enabled' has bad value 'maybe': expected true or false"),
    ("nonsense", "override 'nonsense' must look like key.path=value"),
    ("mode=nightly", "config key 'mode' has bad value 'nightly': expected one of ['production', 'evaluation']"),
    ("scoring.history_splits=[train,outside_core]", "config key 'scoring.history_splits' has bad value"),
])
def test_bad_values_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_target_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown config target 'nope'.*databricks"):
        load_config("nope")


def test_relative_paths_resolve_against_project_root(tmp_path):
    cfg = load_config()
    assert cfg.resolve_path("data/sample/reviews.jsonl").endswith("/data/sample/reviews.jsonl")
    assert cfg.resolve_path("/abs/x") == "/abs/x"
    assert cfg.resolve_path("dbfs:/x") == "dbfs:/x"


@pytest.mark.unit
def test_work_dirs_sit_next_to_the_tables():
    local = load_config("test", ["storage.root=/data/wh"])
    assert local.work_dir("checkpoints") == "/data/wh/_checkpoints"
    uc = load_config("test", ["storage.catalog=prod", "storage.schema=recs"])
    assert uc.work_dir("llm_journal") == "/Volumes/prod/recs/llm_journal"

    own = load_config("test", ["storage.root=s3://bucket/tables", "storage.work_dir=/Volumes/c/s/p4r"])
    assert own.work_dir("models") == "/Volumes/c/s/p4r/models"
    assert load_config("test", ["storage.root=file:///data/wh"]).work_dir("models") == "/data/wh/_models"


@pytest.mark.unit
@pytest.mark.parametrize("overrides, key", [
    (["storage.root=s3://bucket/tables"], "storage.root"),
    (["storage.root=abfss://c@acct.dfs.core.windows.net/t"], "storage.root"),
    (["storage.catalog=c", "storage.schema=s", "storage.work_dir=dbfs:/tmp/p4r"], "storage.work_dir"),
])
def test_object_store_work_dirs_fail_at_start_naming_the_key(overrides, key):
    """The LLM journal, checkpoints and model cache are written with open(): an object-store URI
    would fail on the executors hours later, so config refuses it and says what to set."""
    with pytest.raises(ConfigError, match=rf"config key '{key}' has bad value .* set storage.work_dir to a "
                                          r"Unity Catalog Volume"):
        load_config("test", overrides)
    # Tables may live on an object store as long as the working files do not.
    assert load_config("test", ["storage.root=s3://bucket/tables", "storage.work_dir=/mnt/p4r"])
    assert load_config("test", ["storage.catalog=c", "storage.schema=s"]).work_dir("checkpoints") == \
        "/Volumes/c/s/checkpoints"


@pytest.mark.unit
def test_local_path_inverts_spark_path():
    from persona4rec.config import local_path, spark_path

    for path in ("/tmp/work dir/x/part-00000.parquet", "/dbfs/p4r/x", "/Volumes/main/s/v/x"):
        assert local_path(spark_path(path)) == path
    assert local_path("file:///tmp/a%20b/part-1.parquet") == "/tmp/a b/part-1.parquet"
    assert local_path("dbfs:/Volumes/main/s/v/x") == "/Volumes/main/s/v/x"
    assert local_path("dbfs:/p4r/x") == "/dbfs/p4r/x"
