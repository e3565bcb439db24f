"""The blocked path's vector transport: user vectors routed as bytes come back as the same floats."""

import numpy as np
import pyarrow as pa
import pytest

from persona4rec.scoring.blocks import packed_array, unpacked_matrix

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3)])
def test_packed_vectors_round_trip_under_any_slice(dtype, tol):
    v = np.random.default_rng(0).normal(size=(7, 16)).astype(np.float32)
    users = pa.array([f"U{i}" for i in range(7)])
    packed = packed_array(pa.array(list(v), pa.list_(pa.float32())), dtype)
    assert packed.type == pa.binary() and packed.nbytes >= 7 * 16 * np.dtype(dtype).itemsize
    for lo, n in ((0, 7), (2, 3), (6, 1), (3, 0)):
        got = unpacked_matrix(packed.slice(lo, n), dtype, 16, users.slice(lo, n))
        assert got.dtype == np.float32 and got.shape == (n, 16)
        assert np.abs(got - v[lo:lo + n]).max(initial=0.0) <= tol
    # taken rows (what a filter or a shuffle hands the task) are a fresh array
    got = unpacked_matrix(packed.take(pa.array([5, 1])), dtype, 16, users.take(pa.array([5, 1])))
    assert np.abs(got - v[[5, 1]]).max() <= tol


def test_a_vector_of_another_length_names_its_user():
    ragged = pa.array([[0.1] * 4, [0.2] * 3, [0.3] * 4], pa.list_(pa.float32()))
    with pytest.raises(ValueError, match=r"user 'U1' has a vector of length 3 \(field 'vector'\).* dimension 4"):
        unpacked_matrix(packed_array(ragged, "float32"), "float32", 4, pa.array(["U0", "U1", "U2"]))
