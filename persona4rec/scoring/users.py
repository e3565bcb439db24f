"""User vectors: the γ-decayed mean of each user's last k cached interaction embeddings.

Kept as the Delta table `user_vectors`, refreshed incrementally at the start of every scoring run:
a user's vector is recomputed only when the model version, the history splits or the history
itself changed (detected by a per-user signature: count and xor of row hashes, an aggregation
over scalar columns that never reads the embeddings). The nightly run therefore reads one vector
per user instead of k embeddings, and only users with new interactions pay for the rest.

The computation avoids a `collect_list` of arrays (a slow object aggregation): the history rows
are shuffled by user and sorted, and one pass over each partition's Arrow batches — carrying a
user that straddles two batches over to the next — yields one vector per user.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from persona4rec.schemas import ALL_HISTORY, INTERACTION_EMBEDDINGS, ITEM_ID, SPLIT, TS, USER_ID, USER_VECTORS
from persona4rec.scoring.rank import decayed_user_vectors, segments
from persona4rec.scoring.runs import sorted_runs
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)

_OUT = pa.schema([(USER_ID, pa.string()), ("vector", pa.list_(pa.float32()))])


def _vectors_of_sorted(batch: pa.RecordBatch, k: int, gamma: float) -> pa.RecordBatch:
    """Rows sorted by (user, ts, seq), every user complete → one row per user."""
    users = batch.column(USER_ID).to_numpy(zero_copy_only=False)
    first = np.concatenate([[True], users[1:] != users[:-1]])
    counts = np.diff(np.append(np.flatnonzero(first), len(users)))
    owner, pos, _ = segments(counts)
    last_k = pos >= counts[owner] - k
    emb = batch.column("embedding").filter(pa.array(last_k))
    lengths = emb.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False)
    d = int(lengths[0]) if len(lengths) else 0
    if len(lengths) and (lengths.min() != d or lengths.max() != d or d <= 0):
        bad = int(np.argmax(lengths != d))
        raise ValueError(f"interaction_embeddings: user {users[np.flatnonzero(last_k)[bad]]!r} has an embedding "
                         f"of length {lengths[bad]} (field 'embedding'), others have {d}: rerun build_index")
    flat = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), d)
    vec = decayed_user_vectors(flat, np.minimum(counts, k), gamma)
    values = pa.array(vec.ravel(), pa.float32())
    offsets = pa.array(np.arange(0, len(vec) * d + 1, d, dtype=np.int32))
    return pa.RecordBatch.from_arrays([pa.array(users[first], pa.string()), pa.ListArray.from_arrays(offsets, values)],
                                      schema=_OUT)


def compute_user_vectors(history: DataFrame, k: int, gamma: float) -> DataFrame:
    """history: user_id, ts, seq, embedding rows → user_id, vector (last k, newest weight 1)."""
    ordered = history.select(USER_ID, TS, "seq", "embedding").repartition(USER_ID) \
        .sortWithinPartitions(USER_ID, TS, "seq")

    def per_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for t in sorted_runs(batches, [USER_ID]):  # a user may continue in the next batch: runs come whole
            yield _vectors_of_sorted(t.combine_chunks().to_batches()[0], k, gamma)

    return ordered.mapInArrow(per_partition, "user_id string, vector array<float>")


def refresh(store: TableStore, model_version: str, splits: tuple[str, ...] | None, k: int, gamma: float) -> dict:
    """Bring `user_vectors` up to date with `interaction_embeddings` for this model version.

    splits None = every kept interaction (production), else only those splits (evaluation). A
    vector is recomputed when anything it depends on changed: the model version, the history
    (its rows, order and texts), which interactions count as history, k or γ."""
    rows = store.read(INTERACTION_EMBEDDINGS.name).filter(F.col("model_version") == model_version)
    if splits is not None:
        rows = rows.filter(F.col(SPLIT).isin(*splits))
    split_key = ALL_HISTORY if splits is None else ",".join(sorted(splits))
    signature = rows.groupBy(USER_ID).agg(
        F.count("*").cast("int").alias("n_history"),
        F.bit_xor(F.xxhash64(ITEM_ID, TS, "seq", "text_hash")).alias("history_signature")).select(
        USER_ID, F.lit(model_version).alias("model_version"), F.lit(split_key).alias("history_splits"),
        "n_history", "history_signature", F.lit(k).alias("k"), F.lit(float(gamma)).alias("gamma")).persist()
    store.ensure(USER_VECTORS)  # and fail clearly on a table from an older version
    current = store.read(USER_VECTORS.name).select(*signature.columns)
    stale = signature.join(current, signature.columns, "left_anti").persist()
    n = stale.count()
    if n:
        todo = rows.join(stale.select(USER_ID), USER_ID, "left_semi")
        store.upsert(compute_user_vectors(todo, k, gamma).join(stale, USER_ID), USER_VECTORS)
    stale.unpersist()
    # A user left with no history in these splits keeps no stale vector.
    gone = store.read(USER_VECTORS.name).join(signature.select(USER_ID), USER_ID, "left_anti")
    removed = gone.count()
    if removed:
        store.delete_keys(USER_VECTORS, gone.select(USER_ID))
    signature.unpersist()
    log.info("user_vectors (model %s, splits %s): %d recomputed, %d removed", model_version, split_key, n, removed)
    return {"recomputed": n, "removed": removed}
