"""Reading raw files into parsed rows, with every bad record kept as evidence.

JSON lines are read by our own Python reader inside `mapInPandas` (one task per file), not by
Spark's JSON source, because the contract is that every rejected record names its file and line
and keeps its raw text, and that undecodable bytes are told apart from malformed JSON; Spark's
reader gives neither line numbers nor strict decoding. Parquet is read by Spark and each row goes
through the same parser as JSON text, so the validation rules are one code path.
"""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from typing import Callable, Iterable, Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.errors import InputError
from persona4rec.ingest.formats import decode_object
from persona4rec.ingest.records import Reason, Rejected

JSONL_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)

REJECT_COLUMNS = [
    T.StructField("_reason", T.StringType(), True),
    T.StructField("_field", T.StringType(), True),
    T.StructField("_message", T.StringType(), True),
    T.StructField("_raw", T.StringType(), True),
]
SOURCE_COLUMNS = [
    T.StructField("source_format", T.StringType(), False),
    T.StructField("source_file", T.StringType(), False),
    T.StructField("source_line", T.LongType(), True),
]


def list_input_files(path: str, key: str) -> list[str]:
    """Files named by a file path, a folder (all data files below it) or a glob; sorted.

    `dbfs:/x` is read through its FUSE mount `/dbfs/x`; Unity Catalog volumes are plain paths.
    """
    local = "/dbfs/" + path[len("dbfs:/"):] if path.startswith("dbfs:/") else path
    if "://" in local:
        raise InputError(f"{key}={path!r}: JSON lines are read from a local or mounted path "
                         "(a folder, /Volumes/..., /dbfs/...); for object storage, convert to Parquet")
    if any(ch in local for ch in "*?["):
        candidates = glob.glob(local, recursive=True)
    elif os.path.isdir(local):
        candidates = [os.path.join(d, f) for d, _, fs in os.walk(local) for f in fs]
    elif os.path.isfile(local):
        return [local]
    else:
        raise InputError(f"{key}={path!r}: no such file or folder; set {key} to an existing path")
    files = sorted(
        f for f in candidates
        if os.path.isfile(f) and not os.path.basename(f).startswith((".", "_"))
        and f.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    )
    if not files:
        raise InputError(f"{key}={path!r}: no data files ({', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}) there")
    return files


def input_type_of(files: list[str], configured: str, key: str) -> str:
    if configured != "auto":
        return configured
    kinds = {"parquet" if f.lower().endswith(PARQUET_SUFFIXES) else "jsonl" for f in files}
    if len(kinds) > 1:
        raise InputError(f"{key} mixes Parquet and JSON lines files; point it at one kind or set ingest.input_type")
    return kinds.pop()


class UnreadableRest:
    """Stands in for the rest of a file that cannot be read (a gzip stream cut short or
    corrupt): one rejected record, after every good line before the break was kept."""

    def __init__(self, message: str):
        self.message = message


def parse_records(
    records: Iterable[tuple[str, int | None, bytes | str | UnreadableRest]],
    parse: Callable[[dict], dict],
    fmt: str,
) -> Iterator[dict]:
    """(file, line, raw) → one row dict per record: parsed fields, or the reject columns set."""
    for source_file, source_line, raw in records:
        row = {"source_format": fmt, "source_file": source_file, "source_line": source_line,
               "_reason": None, "_field": None, "_message": None, "_raw": None}
        if isinstance(raw, UnreadableRest):
            row.update(_reason=Reason.TRUNCATED_FILE.value, _message=raw.message)
            yield row
            continue
        text = raw
        try:
            if isinstance(raw, bytes):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    text = raw.decode("utf-8", errors="backslashreplace")
                    raise Rejected(Reason.UNDECODABLE, None,
                                   f"bytes {exc.start}-{exc.end} are not valid UTF-8: {exc.reason}") from None
            try:
                row.update(parse(decode_object(text, fmt)))
            except (OverflowError, ValueError, TypeError) as exc:  # a value no rule foresaw: this record only
                reason = Reason.OUT_OF_RANGE if isinstance(exc, OverflowError) else Reason.WRONG_TYPE
                raise Rejected(reason, None, f"{type(exc).__name__}: {str(exc)[:200]}") from None
        except Rejected as rej:
            row.update(_reason=rej.reason.value, _field=rej.field, _message=rej.message, _raw=text)
        yield row


def _file_lines(path: str) -> Iterator[tuple[str, int, bytes | UnreadableRest]]:
    """Non-blank lines with their 1-based numbers. A compressed stream that ends early or breaks
    yields the lines before the break, then one UnreadableRest: the file's good lines and the
    run's other files are kept, and the loss is a rejected record, not a failed job."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    n = 0
    with opener(path, "rb") as fh:
        try:
            for n, line in enumerate(fh, start=1):
                line = line.rstrip(b"\r\n")
                if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if line.strip():  # blank lines are not records
                    yield path, n, line
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            yield path, n + 1, UnreadableRest(f"{path} cannot be read past line {n}: {type(exc).__name__}: {exc}")


def _batched(rows: Iterator[dict], columns: list[str], size: int) -> Iterator[pd.DataFrame]:
    # Object dtype and explicit None: pandas would otherwise fill absent values with NaN, which
    # Arrow cannot turn into a null array or map.
    batch: list[list] = []
    for row in rows:
        batch.append([row.get(c) for c in columns])
        if len(batch) >= size:
            yield pd.DataFrame(batch, columns=columns, dtype=object)
            batch = []
    if batch:
        yield pd.DataFrame(batch, columns=columns, dtype=object)


def read_parsed(
    spark: SparkSession,
    files: list[str],
    input_type: str,
    parse: Callable[[dict], dict],
    fmt: str,
    fields: list[T.StructField],
    batch_rows: int,
) -> DataFrame:
    """Parsed rows with schema `fields` + source columns + reject columns (null when kept)."""
    schema = T.StructType([T.StructField(f.name, f.dataType, True) for f in fields]
                          + SOURCE_COLUMNS + REJECT_COLUMNS)
    columns = schema.fieldNames()

    if input_type == "jsonl":
        def read_files(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            for pdf in batches:
                for path in pdf["path"]:
                    yield from _batched(parse_records(_file_lines(path), parse, fmt), columns, batch_rows)

        paths = spark.sparkContext.parallelize([(f,) for f in files], len(files))
        return spark.createDataFrame(paths, "path string").mapInPandas(read_files, schema)

    if input_type == "parquet":
        raw = spark.read.parquet(*files).select(
            F.col("_metadata.file_path").alias("path"), F.to_json(F.struct("*")).alias("raw"))

        def parse_rows(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            for pdf in batches:
                records = ((p, None, r) for p, r in zip(pdf["path"], pdf["raw"]))
                yield from _batched(parse_records(records, parse, fmt), columns, batch_rows)

        return raw.mapInPandas(parse_rows, schema)

    raise InputError(f"unknown input type '{input_type}': use jsonl or parquet (ingest.input_type)")
