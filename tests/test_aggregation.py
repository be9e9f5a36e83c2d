"""Weighted aggregation (fedrecon_fast.aggregation) against NumPy references: dense, sparse-row,
batch and streaming forms; float64 accumulation; bit-identity of streaming vs batch and across
thread counts; validation errors that name the argument."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedrecon_fast.aggregation import WeightedMean, weighted_mean, weighted_mean_sparse

# A float32 result of a float64 mean is the reference rounded once: within half an ulp of
# float32 (2^-24 relative), plus float64 summation-order differences (~1e-16 relative to the
# terms), hence a tiny absolute floor for values near 0.
F32_RTOL, F32_ATOL = 2.0**-23, 1e-12
F64_RTOL = 1e-12
THREADS = (1, 2, 4)


# ---------------------------------------------------------------------------------------------
# NumPy references


def ref_mean_dense(stack: np.ndarray, weights) -> np.ndarray:
    return np.average(np.asarray(stack, dtype=np.float64), axis=0, weights=weights)


def ref_sum_sparse(rows, values, offsets, weights, num_rows) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(len(rows), -1)
    out = np.zeros((num_rows, values.shape[1]))
    for i, w in enumerate(weights):
        lo, hi = offsets[i], offsets[i + 1]
        np.add.at(out, rows[lo:hi], w * values[lo:hi])
    return out


def ref_mean_sparse(rows, values, offsets, weights, num_rows) -> np.ndarray:
    return ref_sum_sparse(rows, values, offsets, weights, num_rows) / np.sum(weights)


def random_sparse(rng, num_clients: int, num_rows: int, dim: int, max_rows: int = 12, repeats: bool = True):
    """Clients with 0..max_rows entries (client 1 always empty); ids may repeat within a client."""
    sizes = rng.integers(0, max_rows + 1, size=num_clients)
    if num_clients > 1:
        sizes[1] = 0
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if repeats:
        rows = rng.integers(0, num_rows, size=offsets[-1]).astype(np.int32)
    else:
        rows = np.concatenate([rng.choice(num_rows, size=s, replace=False) for s in sizes]).astype(np.int32)
    values = rng.normal(size=(offsets[-1], dim)).astype(np.float32)
    return rows, values, offsets


def densify(rows, values, num_rows):
    """One client's sparse rows as a dense table (ids must not repeat)."""
    out = np.zeros((num_rows,) + values.shape[1:], dtype=np.float32)
    out[rows] = values
    return out


# ---------------------------------------------------------------------------------------------
# Dense batch


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 5), (1, 1), (6,), (4, 0), (40, 20_000)])
@pytest.mark.parametrize("as_list", [False, True])
def test_dense_mean_matches_np_average(shape, as_list):
    # Prepare
    rng = np.random.default_rng(1)
    stack = rng.normal(size=shape).astype(np.float32)
    weights = rng.uniform(0.1, 10.0, size=shape[0])
    updates = list(stack) if as_list else stack
    # Execute
    out32 = weighted_mean(updates, weights)
    out64 = weighted_mean(updates, weights, dtype=np.float64)
    # Assert
    ref = ref_mean_dense(stack, weights)
    assert out32.dtype == np.float32 and out32.shape == shape[1:]
    assert out64.dtype == np.float64 and out64.shape == shape[1:]
    assert_allclose(out32, ref, rtol=F32_RTOL, atol=F32_ATOL)
    assert_allclose(out64, ref, rtol=F64_RTOL, atol=1e-15)


def test_dense_mean_hand_computed_and_converts_dtypes():
    # float64 and int inputs are converted once to float32.
    out = weighted_mean(np.array([[1.0, 2.0], [3.0, 4.0]]), [1, 3])
    assert_array_equal(out, np.array([2.5, 3.5], dtype=np.float32))
    assert_array_equal(weighted_mean([[1, 2], [5, 8]]), np.array([3.0, 5.0], dtype=np.float32))


def test_equal_weights_equal_np_mean():
    rng = np.random.default_rng(2)
    stack = rng.normal(size=(17, 333)).astype(np.float32)
    ref = np.mean(stack, axis=0, dtype=np.float64)
    for weights in (None, np.full(17, 3.5)):
        assert_allclose(weighted_mean(stack, weights), ref, rtol=F32_RTOL, atol=F32_ATOL)
        assert_allclose(weighted_mean(stack, weights, dtype=np.float64), ref, rtol=F64_RTOL, atol=1e-15)


def test_sums_run_in_float64():
    # In float32, 1e8 + 1 == 1e8, so a float32 sum would give 0 here.
    out = weighted_mean(np.array([[1e8], [1.0], [-1e8]], dtype=np.float32))
    assert_array_equal(out, np.array([1.0 / 3.0], dtype=np.float32))


def test_zero_weight_client_has_no_influence():
    stack = np.array([[1e30, -7.0], [2.0, 3.0]], dtype=np.float32)
    assert_array_equal(weighted_mean(stack, [0.0, 2.0]), stack[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_mean_is_identical_for_any_thread_count(dtype):
    rng = np.random.default_rng(3)
    stack = rng.normal(size=(13, 70_001)).astype(np.float32)  # several 16K-coordinate blocks
    weights = rng.uniform(0.0, 5.0, size=13)
    results = [weighted_mean(stack, weights, dtype=dtype, num_threads=t) for t in THREADS + (0,)]
    for r in results[1:]:
        assert_array_equal(r, results[0])


# ---------------------------------------------------------------------------------------------
# Sparse batch


@pytest.mark.parametrize(("num_clients", "num_rows", "dim"), [(9, 50, 4), (30, 7, 1), (5, 1, 3), (4, 3000, 16)])
def test_sparse_mean_matches_reference(num_clients, num_rows, dim):
    rng = np.random.default_rng(4)
    rows, values, offsets = random_sparse(rng, num_clients, num_rows, dim)
    weights = rng.uniform(0.1, 4.0, size=num_clients)
    out = weighted_mean_sparse(rows, values, offsets, weights, num_rows=num_rows)
    out64 = weighted_mean_sparse(rows, values, offsets, weights, num_rows=num_rows, dtype=np.float64)
    ref = ref_mean_sparse(rows, values, offsets, weights, num_rows)
    assert out.shape == (num_rows, dim) and out.dtype == np.float32
    assert_allclose(out, ref, rtol=F32_RTOL, atol=F32_ATOL)
    assert_allclose(out64, ref, rtol=F64_RTOL, atol=1e-15)


def test_sparse_mean_untouched_rows_are_zero_and_hand_case():
    # Client 0 sends rows 1 and 3, client 1 row 3 twice (the two entries add up), weights 1 and 3.
    rows = np.array([1, 3, 3, 3], dtype=np.int32)
    values = np.array([[2.0, 4.0], [1.0, 1.0], [2.0, 0.0], [2.0, 4.0]], dtype=np.float32)
    out = weighted_mean_sparse(rows, values, [0, 2, 4], [1.0, 3.0], num_rows=5)
    expected = np.zeros((5, 2), dtype=np.float32)
    expected[1] = [0.5, 1.0]
    expected[3] = [(1.0 + 3 * 4.0) / 4, (1.0 + 3 * 4.0) / 4]
    assert_array_equal(out, expected)


def test_sparse_mean_with_1d_values_and_extra_axes():
    rng = np.random.default_rng(5)
    rows = np.array([0, 4, 4, 2], dtype=np.int64)  # any integer dtype
    offsets = np.array([0, 1, 4])
    values1 = rng.normal(size=4).astype(np.float32)
    out1 = weighted_mean_sparse(rows, values1, offsets, num_rows=6)
    assert out1.shape == (6,)
    assert_allclose(out1, ref_mean_sparse(rows, values1, offsets, [1, 1], 6).ravel(), rtol=F32_RTOL, atol=F32_ATOL)
    values3 = rng.normal(size=(4, 2, 3)).astype(np.float32)
    out3 = weighted_mean_sparse(rows, values3, offsets, [2.0, 1.0], num_rows=6)
    assert out3.shape == (6, 2, 3)
    ref3 = ref_mean_sparse(rows, values3, offsets, [2.0, 1.0], 6).reshape(6, 2, 3)
    assert_allclose(out3, ref3, rtol=F32_RTOL, atol=F32_ATOL)


def test_sparse_mean_equals_dense_mean_of_densified_updates():
    # Without repeated ids a sparse client is its dense table with zeros elsewhere, and adding
    # w * 0 changes no float64 sum: both forms agree bit for bit.
    rng = np.random.default_rng(6)
    rows, values, offsets = random_sparse(rng, 8, 40, 3, repeats=False)
    weights = rng.uniform(0.5, 2.0, size=8)
    dense = np.stack(
        [densify(rows[offsets[i] : offsets[i + 1]], values[offsets[i] : offsets[i + 1]], 40) for i in range(8)]
    )
    assert_array_equal(weighted_mean_sparse(rows, values, offsets, weights, num_rows=40), weighted_mean(dense, weights))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_mean_is_identical_for_any_thread_count(dtype):
    rng = np.random.default_rng(7)
    rows, values, offsets = random_sparse(rng, 200, 9000, 8, max_rows=60)  # 2048 rows per block
    weights = rng.uniform(0.0, 3.0, size=200)
    results = [
        weighted_mean_sparse(rows, values, offsets, weights, num_rows=9000, dtype=dtype, num_threads=t)
        for t in THREADS + (0,)
    ]
    for r in results[1:]:
        assert_array_equal(r, results[0])


def sequential_mean(contributions, num_rows_or_shape, total_weight):
    """Client-order float64 reference: acc[r] += w * v for each (row, w, v) in order, then
    acc * (1 / Σw). NumPy's float64 elementwise + and * are the IEEE operations the kernel
    performs, so this reproduces its bits exactly."""
    acc = np.zeros(num_rows_or_shape)
    for row, w, v in contributions:
        acc[row] += w * np.asarray(v, dtype=np.float64)
    return acc * (1.0 / total_weight)


def test_dense_mean_float64_is_the_client_order_sum_bit_for_bit():
    rng = np.random.default_rng(15)
    # Magnitudes spread over 6 decades, so that another summation order rounds differently.
    stack = (rng.normal(size=(21, 300)) * 10.0 ** rng.uniform(-3, 3, size=(21, 1))).astype(np.float32)
    weights = rng.uniform(0.1, 3.0, size=21)
    total = 0.0
    for w in weights:
        total += w
    ref = sequential_mean([(slice(None), w, x) for x, w in zip(stack, weights)], 300, total)
    assert_array_equal(weighted_mean(stack, weights, dtype=np.float64), ref)
    # A different order really gives other bits here (the check above is not vacuous).
    assert not np.array_equal(weighted_mean(stack[::-1], weights[::-1], dtype=np.float64), ref)


def test_sparse_mean_float64_sums_each_row_in_client_order_bit_for_bit():
    rng = np.random.default_rng(16)
    rows, values, offsets = random_sparse(rng, 40, 5, 3, max_rows=8)  # ~60 contributions per row
    values *= (10.0 ** rng.uniform(-3, 3, size=(len(rows), 1))).astype(np.float32)
    weights = rng.uniform(0.1, 3.0, size=40)
    total = 0.0
    for w in weights:
        total += w
    contributions = [(rows[e], weights[i], values[e]) for i in range(40) for e in range(offsets[i], offsets[i + 1])]
    ref = sequential_mean(contributions, (5, 3), total)
    assert_array_equal(weighted_mean_sparse(rows, values, offsets, weights, num_rows=5, dtype=np.float64), ref)
    assert not np.array_equal(sequential_mean(contributions[::-1], (5, 3), total), ref)


def misaligned_out(shape, dtype):
    """An ``out`` one element past a 64-byte boundary, NaN-fenced on both sides: (out, buffer)."""
    item = np.dtype(dtype).itemsize
    size = int(np.prod(shape))
    buf = np.full(size + 32, np.nan, dtype=dtype)
    start = (-buf.ctypes.data % 64 + item) // item
    return buf[start : start + size].reshape(shape), buf, start


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.slow
def test_means_into_a_table_past_the_cache_are_exact(dtype):
    """Tables of 32 MiB and more are staged per block and written with non-temporal stores, by
    the batch and the streaming means alike: same values, whatever the thread count or the
    alignment of ``out`` (the copy's unaligned head and tail)."""
    rng = np.random.default_rng(17)
    num_rows, dim = 70_000, 130  # 34.7 MiB in float32; 520-byte rows straddle cache lines
    rows, values, offsets = random_sparse(rng, 50, num_rows, dim, max_rows=60)
    rows[:5] = [0, num_rows - 1, 1, 0, num_rows - 2]  # the table's first and last lines
    weights = rng.uniform(0.1, 3.0, size=50)
    total = 0.0
    for w in weights:
        total += w
    expected = ref_sum_sparse(rows, values, offsets, weights, num_rows) * (1.0 / total)
    stack = rng.normal(size=(2, num_rows, dim)).astype(np.float32)
    x0, x1 = stack.astype(np.float64)
    expected_dense = (1.0 * x0 + 3.0 * x1) * (1.0 / 4.0)  # the kernel's float64 operations
    if dtype is np.float32:
        expected, expected_dense = expected.astype(np.float32), expected_dense.astype(np.float32)
    for t in THREADS:
        out, buf, start = misaligned_out((num_rows, dim), dtype)
        assert weighted_mean_sparse(rows, values, offsets, weights, num_rows=num_rows, out=out, num_threads=t) is out
        assert_array_equal(out, expected)
        acc = WeightedMean((num_rows, dim), num_threads=t)
        for i, w in enumerate(weights):
            acc.add_sparse(rows[offsets[i] : offsets[i + 1]], values[offsets[i] : offsets[i + 1]], w)
        out[...] = np.nan
        assert acc.result(out=out) is out
        assert_array_equal(out, expected)
        out[...] = np.nan
        assert weighted_mean(stack, [1.0, 3.0], out=out, num_threads=t) is out
        assert_array_equal(out, expected_dense)
        acc = WeightedMean((num_rows, dim), num_threads=t)
        acc.add(stack[0], 1.0)
        acc.add(stack[1], 3.0)
        out[...] = np.nan
        assert acc.result(out=out) is out
        assert_array_equal(out, expected_dense)
        assert np.isnan(buf[:start]).all() and np.isnan(buf[start + out.size :]).all()


# ---------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_dense_is_bit_identical_to_batch(dtype):
    rng = np.random.default_rng(8)
    # 21 clients: the batch kernel takes them 8 at a time, then one by one.
    stack = rng.normal(size=(21, 30, 700)).astype(np.float32)
    weights = rng.uniform(0.0, 4.0, size=21)
    acc = WeightedMean((30, 700), num_threads=2)
    for x, w in zip(stack, weights):
        acc.add(x, w)
    assert acc.num_updates == 21
    assert acc.total_weight == pytest.approx(weights.sum(), rel=1e-15)
    assert_array_equal(acc.result(dtype), weighted_mean(stack, weights, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_sparse_is_bit_identical_to_batch(dtype):
    rng = np.random.default_rng(9)
    rows, values, offsets = random_sparse(rng, 25, 300, 5, max_rows=30)
    weights = rng.uniform(0.0, 4.0, size=25)
    weights[3] = 0.0
    acc = WeightedMean((300, 5))
    for i, w in enumerate(weights):
        acc.add_sparse(rows[offsets[i] : offsets[i + 1]], values[offsets[i] : offsets[i + 1]], w)
    expected = weighted_mean_sparse(rows, values, offsets, weights, num_rows=300, dtype=dtype)
    assert_array_equal(acc.result(dtype), expected)
    # Only rows that clients with a positive weight sent are stored.
    sent = {int(r) for i, w in enumerate(weights) if w > 0 for r in rows[offsets[i] : offsets[i + 1]]}
    assert acc.rows_held == len(sent) < 300


def test_streaming_mixed_sparse_and_dense_equals_dense_batch():
    # Sparse adds first (row-sparse storage), then a dense add switches to a full table.
    rng = np.random.default_rng(10)
    rows, values, offsets = random_sparse(rng, 6, 50, 4, repeats=False)
    dense_clients = rng.normal(size=(3, 50, 4)).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, size=9)
    acc = WeightedMean((50, 4))
    stack = []
    for i in range(6):
        r, v = rows[offsets[i] : offsets[i + 1]], values[offsets[i] : offsets[i + 1]]
        acc.add_sparse(r, v, weights[i])
        stack.append(densify(r, v, 50))
    for j in range(3):
        acc.add(dense_clients[j], weights[6 + j])
        stack.append(dense_clients[j])
    assert acc.rows_held == 50
    assert_array_equal(acc.result(), weighted_mean(stack, weights))


def test_streaming_is_identical_for_any_thread_count():
    rng = np.random.default_rng(11)
    stack = rng.normal(size=(5, 40_000)).astype(np.float32)
    rows, values, offsets = random_sparse(rng, 5, 40_000, 1, max_rows=100)
    results = []
    for t in THREADS:
        acc = WeightedMean((40_000,), num_threads=t)
        for i in range(5):
            acc.add_sparse(rows[offsets[i] : offsets[i + 1]], values[offsets[i] : offsets[i + 1]].ravel(), 1.0 + i)
            acc.add(stack[i], 0.5 * i)
        results.append(acc.result(np.float64))
    for r in results[1:]:
        assert_array_equal(r, results[0])


def test_reset_forgets_everything_and_reused_storage_starts_from_zero():
    rng = np.random.default_rng(12)
    acc = WeightedMean((100, 3))
    acc.add_sparse([1, 2, 3], rng.normal(size=(3, 3)) * 1e6, 5.0)
    acc.reset()
    assert acc.num_updates == 0 and acc.total_weight == 0.0 and acc.rows_held == 0
    # The same rows again (their storage is reused) and new ones.
    rows = np.array([3, 2, 50], dtype=np.int32)
    values = rng.normal(size=(3, 3)).astype(np.float32)
    acc.add_sparse(rows, values, 2.0)
    assert_array_equal(acc.result(), weighted_mean_sparse(rows, values, [0, 3], [2.0], num_rows=100))
    acc.add(np.ones((100, 3)), 1.0)
    acc.reset()
    acc.add_sparse([7], [[1.0, 2.0, 3.0]], 1.0)
    expected = np.zeros((100, 3), dtype=np.float32)
    expected[7] = [1, 2, 3]
    assert_array_equal(acc.result(), expected)


def test_weighted_sum_is_the_float64_sum():
    acc = WeightedMean(3)
    acc.add([1.0, 2.0, 3.0], 2.0)
    acc.add([1.0, 0.0, -1.0], 0.5)
    s = acc.weighted_sum()
    assert s.dtype == np.float64
    assert_array_equal(s, [2.5, 4.0, 5.5])
    assert_array_equal(acc.result(np.float64), s / 2.5)


def test_concurrent_adds_from_python_threads_are_all_counted():
    # The kernels release the GIL; the accumulator's lock keeps concurrent adds whole.
    rng = np.random.default_rng(13)
    stack = rng.normal(size=(8, 50_000)).astype(np.float32)
    acc = WeightedMean((50_000,), num_threads=1)

    def work(k):
        for _ in range(10):
            acc.add(stack[k], 1.0)
            acc.add_sparse([k, 100 + k], [1.0, 2.0], 0.0)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acc.num_updates == 160
    assert acc.total_weight == 80.0
    assert_allclose(acc.result(), ref_mean_dense(stack, np.ones(8)), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Validation: errors name the argument


def _sparse_ok():
    return np.array([0, 1], dtype=np.int32), np.ones((2, 2), dtype=np.float32), np.array([0, 1, 2])


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, -1.0], "weights"),
        ([1.0, np.nan], "weights"),
        ([1.0, np.inf], "weights"),
        ([0.0, 0.0], "weights"),
        ([1.0, 2.0, 3.0], "weights"),
        ([[1.0, 2.0]], "weights"),
    ],
)
def test_bad_weights_are_rejected(weights, match):
    stack = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        weighted_mean(stack, weights)
    rows, values, offsets = _sparse_ok()
    with pytest.raises(ValueError, match=match):
        weighted_mean_sparse(rows, values, offsets, weights, num_rows=2)


def test_non_numeric_weights_and_updates_are_type_errors():
    with pytest.raises(TypeError, match="weights"):
        weighted_mean(np.ones((2, 2)), ["a", "b"])
    with pytest.raises(TypeError, match="updates"):
        weighted_mean(np.array([[1 + 2j]]))
    with pytest.raises(TypeError, match="updates"):
        weighted_mean([np.ones(2), np.array(["x", "y"])])
    with pytest.raises(TypeError, match="updates"):
        weighted_mean(42)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_rejected(bad):
    stack = np.ones((3, 20_000), dtype=np.float32)
    stack[2, 19_999] = bad
    with pytest.raises(ValueError, match="updates"):
        weighted_mean(stack)
    with pytest.raises(ValueError, match="updates"):
        weighted_mean(list(stack), [1.0, 1.0, 0.0])  # even with weight 0
    rows, values, offsets = _sparse_ok()
    values[1, 0] = bad
    with pytest.raises(ValueError, match="values"):
        weighted_mean_sparse(rows, values, offsets, num_rows=2)


def test_inconsistent_dense_shapes_are_rejected():
    with pytest.raises(ValueError, match="updates"):
        weighted_mean([np.ones(3), np.ones(4)])
    with pytest.raises(ValueError, match="updates"):
        weighted_mean([])
    with pytest.raises(ValueError, match="updates"):
        weighted_mean(np.array(1.0, dtype=np.float32))


@pytest.mark.parametrize(
    ("rows", "exc"),
    [
        ([0, 2], ValueError),
        ([-1, 0], ValueError),
        ([0.0, 1.0], TypeError),
        ([[0, 1]], ValueError),
    ],
)
def test_bad_rows_are_rejected(rows, exc):
    _, values, offsets = _sparse_ok()
    with pytest.raises(exc, match="rows"):
        weighted_mean_sparse(rows, values, offsets, num_rows=2)


@pytest.mark.parametrize("offsets", [[1, 1, 2], [0, 2, 1], [0, 1, 3], [0, 1], [[0, 1, 2]]])
def test_bad_offsets_are_rejected(offsets):
    rows, values, _ = _sparse_ok()
    values = np.ones((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="offsets"):
        weighted_mean_sparse(rows, values, offsets, [1.0] * max(1, np.asarray(offsets).size - 1), num_rows=2)


def test_bad_values_num_rows_dtype_threads_are_rejected():
    rows, values, offsets = _sparse_ok()
    with pytest.raises(ValueError, match="values"):
        weighted_mean_sparse(rows, values[:1], offsets, num_rows=2)
    with pytest.raises(ValueError, match="num_rows"):
        weighted_mean_sparse(rows, values, offsets, num_rows=-1)
    with pytest.raises(TypeError, match="num_rows"):
        weighted_mean_sparse(rows, values, offsets, num_rows=2.0)
    with pytest.raises(ValueError, match="dtype"):
        weighted_mean(np.ones((2, 2)), dtype=np.int32)
    with pytest.raises(ValueError, match="num_threads"):
        weighted_mean(np.ones((2, 2)), num_threads=-1)
    with pytest.raises(ValueError, match="shape"):
        WeightedMean((3, -1))


def test_streaming_rejections_leave_the_accumulator_unchanged():
    acc = WeightedMean((4, 2))
    acc.add_sparse([1], [[1.0, 2.0]], 2.0)
    before = acc.result()
    bad = np.ones((4, 2))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="update"):
        acc.add(bad, 1.0)
    with pytest.raises(ValueError, match="update"):
        acc.add(np.ones((2, 4)), 1.0)
    with pytest.raises(ValueError, match="weight"):
        acc.add(np.ones((4, 2)), -1.0)
    with pytest.raises(ValueError, match="weight"):
        acc.add(np.ones((4, 2)), np.inf)
    with pytest.raises(TypeError, match="weight"):
        acc.add(np.ones((4, 2)), "1")
    with pytest.raises(ValueError, match="rows"):
        acc.add_sparse([0, 4], np.ones((2, 2)), 1.0)
    with pytest.raises(ValueError, match="values"):
        acc.add_sparse([0, 2], [[1.0, 1.0], [np.inf, 0.0]], 1.0)
    with pytest.raises(ValueError, match="values"):
        acc.add_sparse([0, 2], np.ones((2, 3)), 1.0)
    assert acc.num_updates == 1 and acc.total_weight == 2.0 and acc.rows_held == 1
    assert_array_equal(acc.result(), before)


def test_result_without_positive_weight_names_weights():
    acc = WeightedMean((3,))
    with pytest.raises(ValueError, match="weights"):
        acc.result()
    acc.add([1.0, 2.0, 3.0], 0.0)
    with pytest.raises(ValueError, match="weights"):
        acc.result()


# ---------------------------------------------------------------------------------------------
# Output buffers


def test_out_buffers_are_filled_completely_and_returned():
    rng = np.random.default_rng(14)
    stack = rng.normal(size=(6, 5, 4)).astype(np.float32)
    rows, values, offsets = random_sparse(rng, 6, 30, 4)
    for dtype in (np.float32, np.float64):
        out = np.full((5, 4), np.nan, dtype=dtype)  # garbage from a previous round
        assert weighted_mean(stack, out=out) is out
        assert_array_equal(out, weighted_mean(stack, dtype=dtype))
        out = np.full((30, 4), np.nan, dtype=dtype)
        assert weighted_mean_sparse(rows, values, offsets, num_rows=30, out=out) is out
        assert_array_equal(out, weighted_mean_sparse(rows, values, offsets, num_rows=30, dtype=dtype))
        acc = WeightedMean((5, 4))
        acc.add(stack[0], 2.0)
        out = np.full((5, 4), np.nan, dtype=dtype)
        assert acc.result(out=out) is out
        assert_array_equal(out, acc.result(dtype))


def test_bad_out_buffers_are_rejected():
    stack = np.ones((3, 4, 2), dtype=np.float32)
    bad = {
        "shape": np.zeros((2, 4), dtype=np.float32),
        "dtype": np.zeros((4, 2), dtype=np.int32),
        "order": np.zeros((2, 4), dtype=np.float32).T,
        "readonly": np.zeros((4, 2), dtype=np.float32),
        "overlap": stack[1],
    }
    bad["readonly"].flags.writeable = False
    for out in bad.values():
        with pytest.raises(ValueError, match="out"):
            weighted_mean(stack, out=out)
    with pytest.raises(ValueError, match="out"):
        weighted_mean(stack, dtype=np.float64, out=np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(TypeError, match="out"):
        weighted_mean(stack, out=[[0.0] * 2] * 4)
    with pytest.raises(ValueError, match="out"):
        WeightedMean((4, 2)).result(out=np.zeros(8, dtype=np.float32))
