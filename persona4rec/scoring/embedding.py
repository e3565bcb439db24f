"""Which encoder scores, and embedding text columns inside Spark.

The encoder is `models:/<registered_model>@champion`, and every output row names it by its
`version_key` (`model_version = <version>#<fingerprint>`); with no champion yet, the un-tuned base
encoder is used and every output row says so (`model_version = untuned:<name>`). The driver puts
the model in a folder the executors can read; each Python worker loads it once (module cache),
not once per batch, and encodes texts in batches.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from persona4rec.config import Config
from persona4rec.training.encoder import pick_device, resolve_model_name

log = logging.getLogger(__name__)
_WORKER_MODELS: dict[str, object] = {}
COMPLETE = "_COMPLETE"  # marks a whole model folder (resolve_encoder)


@dataclass(frozen=True)
class EncoderRef:
    path: str  # a folder SentenceTransformer can load
    version: str  # registry version_key ("<version>#<fingerprint>"), or "untuned:<base model>"
    max_seq_length: int | None = None  # tokens per text (as in training); None = the model's own
    device: str = "auto"  # where each task encodes: auto = the task's GPU when torch sees one (train.device)


def resolve_encoder(cfg: Config) -> EncoderRef:
    """The @champion as a folder the executors load, named (like every row it embeds) by its
    `version_key`: a folder or cached vectors of another registry's version with the same number
    are never taken for it. Loaded by version, not alias, so an alias moved meanwhile cannot put
    another model under this key; written to a temporary folder, marked complete last and renamed,
    so an interrupted copy is never loaded (where a rename is not atomic, e.g. a FUSE-mounted
    volume, the marker still says whether the copy is whole)."""
    import mlflow.sentence_transformers

    from persona4rec.training.registry import CHAMPION, alias_version, setup_mlflow, version_key

    client = setup_mlflow(cfg)
    name = cfg.mlflow.registered_model
    version = alias_version(client, name, CHAMPION)
    if version is None:
        log.warning("no @%s for %s at %s: scoring with the un-tuned encoder %s", CHAMPION,
                    name, cfg.tracking_uri(), cfg.train.base_model)
        return untuned_encoder(cfg)
    key = version_key(client, name, version)
    folder = os.path.join(cfg.work_dir("models"), f"{name}-v{key.replace('#', '-')}")
    complete = os.path.join(folder, COMPLETE)
    if not os.path.exists(complete):
        partial = f"{folder}.partial-{uuid.uuid4().hex[:12]}"
        mlflow.sentence_transformers.load_model(f"models:/{name}/{version}").save(partial)
        open(os.path.join(partial, COMPLETE), "w").close()  # written last: the copy is whole
        try:
            os.rename(partial, folder)
        except OSError:  # another run placed it first (theirs is the same model), or a broken copy is there
            shutil.rmtree(partial, ignore_errors=True)
        if not os.path.exists(complete):
            raise RuntimeError(f"could not place the champion encoder at {folder}: a folder without {COMPLETE} is "
                               "there (an interrupted copy): remove it and rerun")
    return EncoderRef(folder, key, cfg.train.max_seq_length, cfg.train.device)


def untuned_encoder(cfg: Config) -> EncoderRef:
    return EncoderRef(resolve_model_name(cfg.train.base_model), f"untuned:{cfg.train.base_model}",
                      cfg.train.max_seq_length, cfg.train.device)


def worker_model(path: str, max_seq_length: int | None = None, device: str = "auto"):
    """The model at `path`, loaded once per Python worker (texts longer than max_seq_length
    tokens are cut, as in training), on `device` (`task_device`: auto = the task's GPU when it
    has one, else the CPU)."""
    key = f"{path}@{max_seq_length}@{device}"
    model = _WORKER_MODELS.get(key)
    if model is None:
        from sentence_transformers import SentenceTransformer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = SentenceTransformer(path, device=task_device(device))
        if max_seq_length:
            model.max_seq_length = max_seq_length
        _WORKER_MODELS[key] = model
    return model


def task_device(requested: str) -> str:
    """`auto`: the GPU Spark assigned to this task (spark.task.resource.gpu.amount), else the GPU
    torch sees, else the CPU; anything else as given."""
    if requested != "auto":
        return requested
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    if gpus is not None and gpus.addresses:
        return f"cuda:{gpus.addresses[0]}"
    return pick_device("auto")


def embed_column(df: DataFrame, text_col: str, ref: EncoderRef, batch_size: int = 64) -> DataFrame:
    """df + `embedding` (array<float>, L2-normalised) + `model_version`; other columns kept."""
    schema = T.StructType(df.schema.fields + [T.StructField("embedding", T.ArrayType(T.FloatType())),
                                              T.StructField("model_version", T.StringType())])
    path, version, max_len, dev = ref.path, ref.version, ref.max_seq_length, ref.device

    def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        model = worker_model(path, max_len, dev)
        for pdf in batches:
            vecs = model.encode(pdf[text_col].tolist(), batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False).astype(np.float32)
            out = pdf.copy()
            out["embedding"] = list(vecs)
            out["model_version"] = version
            yield out

    return df.mapInPandas(encode, schema)


def text_hash(text_col: str) -> Column:
    """The content address of a text (sha2-256, hex): the key of `text_embeddings`, and
    `interaction_embeddings.text_hash`."""
    return F.sha2(F.col(text_col), 256)


def distinct_texts(texts: DataFrame) -> DataFrame:
    """text_hash, text: each distinct text of `texts` (column `text`) once."""
    return texts.select(text_hash("text").alias("text_hash"), "text").dropDuplicates(["text_hash"])


def encode_texts(hashed: DataFrame, ref: EncoderRef, batch_size: int = 64) -> DataFrame:
    """text_hash, embedding, model_version of `hashed` (distinct_texts' rows), spread over the
    cluster first: a de-duplication or anti-join's output may have been coalesced to a few
    partitions, and encoding is the expensive step."""
    spread = hashed.repartition(hashed.sparkSession.sparkContext.defaultParallelism)
    return embed_column(spread, "text", ref, batch_size).drop("text")


def embed_distinct(texts: DataFrame, ref: EncoderRef, batch_size: int = 64) -> DataFrame:
    """text_hash, embedding, model_version for every distinct text of `texts` (column `text`):
    a text many rows share — a persona's member that is also in a user's window, a summary that
    is also a persona text — is encoded once."""
    return encode_texts(distinct_texts(texts), ref, batch_size)


def with_vectors(df: DataFrame, text_col: str, vectors: DataFrame) -> DataFrame:
    """`df` + `embedding` + `model_version` looked up by the hash of `df[text_col]` in `vectors`
    (text_hash, embedding, model_version: embed_distinct's output or the text_embeddings cache),
    which must hold every text of `df` (callers build it from the same frames): a text it lacks
    fails the query naming its hash, never drops the row."""
    missing = F.raise_error(F.concat(F.lit(f"no embedding for a text of column '{text_col}' (text_hash "),
                                     F.coalesce(F.col("_text_hash"), F.lit("of a null text")), F.lit(")")))
    return (df.withColumn("_text_hash", text_hash(text_col))
            .join(vectors.select(F.col("text_hash").alias("_text_hash"), "embedding", "model_version"), "_text_hash",
                  "left")
            .withColumn("embedding", F.when(F.col("embedding").isNull(), missing).otherwise(F.col("embedding")))
            .drop("_text_hash"))
