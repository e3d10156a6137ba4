"""Batch assembly: gather_into copies rows exactly and refuses mismatches; scatter_rows splits."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

DTYPES = [np.float32, np.float64, np.uint8, np.int64, np.float16]


@given(
    dtype=st.sampled_from(DTYPES),
    item_shape=st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
    rows=st.integers(1, 6),
    data=st.data(),
)
def test_gather_matches_stacking(core, dtype, item_shape, rows, data):
    count = data.draw(st.integers(0, rows))
    lead = data.draw(st.lists(st.booleans(), min_size=count, max_size=count))
    rng = np.random.default_rng(count)
    items = [(rng.random(item_shape) * 100).astype(dtype) for _ in range(count)]
    srcs = [item[None] if with_axis else item for item, with_axis in zip(items, lead)]
    dst = np.full((rows, *item_shape), 7, dtype=dtype)
    assert core.gather_into(dst, srcs) == count
    if count:
        np.testing.assert_array_equal(dst[:count], np.stack(items))
    assert (dst[count:] == 7).all()  # rows past len(srcs) untouched


def test_gather_image_batch(core):
    rng = np.random.default_rng(0)
    srcs = [rng.random((3, 224, 224), dtype=np.float32) for _ in range(32)]
    dst = np.empty((32, 3, 224, 224), np.float32)
    assert core.gather_into(dst, srcs) == 32
    np.testing.assert_array_equal(dst, np.stack(srcs))


def test_gather_accepts_tuple_and_list_views(core):
    dst = np.zeros((3, 2), np.int64)
    assert core.gather_into(dst, (np.array([1, 2]), np.array([[3, 4]]))) == 2
    assert dst.tolist() == [[1, 2], [3, 4], [0, 0]]


def test_gather_refuses_dtype_mismatch_naming_the_index(core):
    dst = np.zeros((4, 3), np.float32)
    srcs = [np.zeros(3, np.float32), np.zeros(3, np.float64)]
    with pytest.raises(ValueError, match=r"srcs\[1\] has dtype float64 but dst has dtype float32"):
        core.gather_into(dst, srcs)


def test_gather_refuses_shape_mismatch_naming_the_index(core):
    dst = np.zeros((4, 2, 3), np.float32)
    srcs = [np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32)]
    with pytest.raises(ValueError, match=r"srcs\[2\] has shape \(3, 2\) but a row of dst has shape \(2, 3\)"):
        core.gather_into(dst, srcs)
    with pytest.raises(ValueError, match=r"srcs\[0\] has shape \(2, 2, 3\)"):
        core.gather_into(dst, [np.zeros((2, 2, 3), np.float32)])


def test_gather_writes_nothing_unless_every_source_passes(core):
    dst = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"srcs\[1\]"):
        core.gather_into(dst, [np.ones(2, np.float32), np.ones(5, np.float32)])
    assert (dst == 0).all()


def test_gather_refuses_too_many_sources(core):
    with pytest.raises(ValueError, match="srcs has 3 arrays but dst holds only 2 rows"):
        core.gather_into(np.zeros((2, 1)), [np.zeros(1)] * 3)


def test_gather_refuses_non_contiguous_source(core):
    dst = np.zeros((2, 3), np.float64)
    strided = np.zeros(6)[::2]
    with pytest.raises(ValueError, match=r"srcs\[1\] must be C-contiguous"):
        core.gather_into(dst, [np.zeros(3), strided])


def test_gather_refuses_a_non_array_source(core):
    with pytest.raises(TypeError, match=r"srcs\[0\] must be a numpy array, got list"):
        core.gather_into(np.zeros((2, 3)), [[0.0, 0.0, 0.0]])


@pytest.mark.parametrize("make_dst", [
    lambda: np.zeros((4, 3))[:, :2],  # not C-contiguous
    lambda: np.zeros(()),  # no batch axis
])
def test_gather_refuses_a_bad_destination(core, make_dst):
    with pytest.raises(ValueError, match="dst must be a writable C-contiguous array with a batch axis"):
        core.gather_into(make_dst(), [])


def test_gather_refuses_a_read_only_destination(core):
    dst = np.zeros((2, 2))
    dst.flags.writeable = False
    with pytest.raises(ValueError, match="dst must be a writable"):
        core.gather_into(dst, [np.ones(2)])


def test_scatter_rows_are_independent_rows_of_one_copy(core):
    src = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    rows = core.scatter_rows(src, 3)
    assert len(rows) == 3
    for i, row in enumerate(rows):
        assert row.shape == (1, 2, 3)
        np.testing.assert_array_equal(row, src[i : i + 1])
    base = rows[0].base
    assert base is not None and all(row.base is base for row in rows)  # one allocation
    assert not np.shares_memory(base, src)
    src[:] = -1  # the backend reuses its output buffer
    assert rows[2][0, 1, 2] == 17.0


def test_scatter_rows_from_non_contiguous_output(core):
    src = np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2]
    rows = core.scatter_rows(src, 4)
    assert [row.tolist() for row in rows] == [[[0, 2, 4]], [[5, 7, 9]], [[10, 12, 14]], [[15, 17, 19]]]


def test_scatter_zero_rows(core):
    assert core.scatter_rows(np.zeros((2, 3)), 0) == []


@pytest.mark.parametrize("n", [-1, 5])
def test_scatter_refuses_n_out_of_range(core, n):
    with pytest.raises(ValueError, match=rf"n must be in 0\.\.4 \(rows of src\), got {n}"):
        core.scatter_rows(np.zeros((4, 2)), n)


def test_scatter_refuses_a_scalar(core):
    with pytest.raises(ValueError, match="src must have a batch axis"):
        core.scatter_rows(np.array(1.0, np.float32), 0)
