"""Whole groups from a sorted Arrow stream: Spark's `sortWithinPartitions` + `mapInArrow` in place
of a `groupBy` with `collect_list`.

A grouping by `collect_list` builds one JVM array of structs per group (and falls back to a sort
past a few hundred groups anyway); sorting flat rows and cutting them into runs in the Python task
moves only flat columns through the JVM and Arrow. The catch is that Arrow batches end anywhere:
the run at the end of a batch may continue in the next, so it is held back until the key changes.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def run_starts(table: pa.Table | pa.RecordBatch, keys: Sequence[str]) -> np.ndarray:
    """Bool per row: True where the row's key differs from the previous row's (and on row 0)."""
    n = table.num_rows
    new = np.zeros(n, dtype=bool)
    if n:
        new[0] = True
        for k in keys:
            col = table.column(k)
            col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            new[1:] |= pc.not_equal(col.slice(1), col.slice(0, n - 1)).fill_null(True).to_numpy(zero_copy_only=False)
    return new


def sorted_runs(batches: Iterator[pa.RecordBatch], keys: Sequence[str]) -> Iterator[pa.Table]:
    """Tables holding only whole runs of equal `keys`, from batches sorted (or clustered) by them."""
    pending: list[pa.RecordBatch] = []
    for b in batches:
        if b.num_rows == 0:
            continue
        if pending and run_starts(pa.Table.from_batches([pending[-1].slice(pending[-1].num_rows - 1),
                                                         b.slice(0, 1)]), keys)[1]:
            yield pa.Table.from_batches(pending)
            pending = []
        starts = np.flatnonzero(run_starts(b, keys))
        last = int(starts[-1])
        if last > 0:
            yield pa.Table.from_batches([*pending, b.slice(0, last)])
            pending = []
        pending.append(b.slice(last))
    if pending:
        yield pa.Table.from_batches(pending)


def user_runs(t: pa.Table, key: str) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """(t as one chunk per column, start row of each run of `key`, rows per run): the flat-array +
    counts layout `rank_candidates` takes."""
    t = t.combine_chunks()
    starts = np.flatnonzero(run_starts(t, [key]))
    return t, starts, np.diff(np.append(starts, t.num_rows))
