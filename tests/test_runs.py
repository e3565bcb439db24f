"""sorted_runs: whole groups out of a sorted Arrow stream, whatever the batch boundaries."""

import numpy as np
import pyarrow as pa
import pytest

from persona4rec.scoring.runs import run_starts, sorted_runs


def batches_of(keys_a, keys_b, cuts):
    t = pa.table({"a": keys_a, "b": keys_b, "v": list(range(len(keys_a)))})
    edges = [0, *cuts, len(keys_a)]
    return [t.slice(lo, hi - lo).to_batches()[0] if hi > lo else pa.RecordBatch.from_pylist([], t.schema)
            for lo, hi in zip(edges, edges[1:])]


@pytest.mark.parametrize("seed", range(20))
def test_every_run_comes_out_whole_and_once_whatever_the_batch_cuts(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    a = np.sort(rng.integers(0, 4, n))
    b = [f"u{x}" for x in rng.integers(0, 3, n)]
    order = np.lexsort((b, a))
    a, b = a[order].tolist(), [b[i] for i in order]
    cuts = sorted(rng.choice(np.arange(0, n + 1), size=int(rng.integers(0, 6)), replace=True).tolist())
    tables = list(sorted_runs(iter(batches_of(a, b, cuts)), ["a", "b"]))
    assert [v for t in tables for v in t.column("v").to_pylist()] == list(range(n))  # nothing lost or repeated
    seen = set()
    for t in tables:
        keys = list(zip(t.column("a").to_pylist(), t.column("b").to_pylist()))
        assert not seen & set(keys)  # a run never spans two tables
        seen |= set(keys)


def test_run_starts_marks_each_change_of_any_key():
    t = pa.table({"a": [1, 1, 1, 2, 2], "b": ["x", "x", "y", "y", "y"]})
    assert run_starts(t, ["a", "b"]).tolist() == [True, False, True, True, False]
    assert run_starts(t, ["a"]).tolist() == [True, False, False, True, False]


def test_user_runs_gives_each_runs_start_and_length():
    from persona4rec.scoring.runs import user_runs
    t = pa.Table.from_batches(batches_of([1, 1, 1, 1, 2], ["a", "a", "b", "b", "b"], [3]))
    one, starts, counts = user_runs(t, "b")
    assert one.column("b").num_chunks == 1 and starts.tolist() == [0, 2] and counts.tolist() == [2, 3]
