"""DP-FedAvg aggregation (fedrecon_fast.privacy): clipping against NumPy, the documented noise
stream reproduced in NumPy, noise statistics, seeding, thread-count invariance, streaming vs
batch bit-identity, and validation errors that name the argument."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedrecon_fast._rng import derive_seed, mix64_array
from fedrecon_fast.aggregation import WeightedMean
from fedrecon_fast.privacy import (
    STREAM_PRIVACY,
    DPGaussianSum,
    capped_weights,
    clip_by_norm,
    dp_sum,
    dp_sum_sparse,
    gaussian_noise,
)

F32_RTOL, F32_ATOL = 2.0**-23, 1e-12
THREADS = (1, 2, 4)


# ---------------------------------------------------------------------------------------------
# NumPy references


def ref_clip(x, clip):
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt(np.sum(x * x))
    return x * min(1.0, clip / norm) if norm > 0 else x, norm


def ref_dp_sum_dense(stack, weights, clip):
    """Σ w_i clip(x_i) in float64 (no noise) and the norms."""
    clipped, norms = zip(*(ref_clip(x, clip) for x in stack))
    return np.tensordot(np.asarray(weights, dtype=np.float64), np.stack(clipped), axes=1), np.array(norms)


def ref_dp_sum_sparse(rows, values, offsets, weights, clip, num_rows):
    out = np.zeros((num_rows,) + values.shape[1:])
    norms = []
    for i, w in enumerate(weights):
        lo, hi = offsets[i], offsets[i + 1]
        clipped, norm = ref_clip(values[lo:hi], clip)
        np.add.at(out, rows[lo:hi], w * clipped)
        norms.append(norm)
    return out, np.array(norms)


def ref_noise(seed, round, count, first=0):
    """The documented stream: pair p = g // 2 takes SplitMix64 outputs 2p and 2p + 1, Box–Muller."""
    key = np.uint64(derive_seed(seed, round, 0, STREAM_PRIVACY))
    gamma = np.uint64(0x9E3779B97F4A7C15)
    g = np.arange(first, first + count, dtype=np.uint64)
    p = g >> np.uint64(1)
    a = mix64_array(key + (np.uint64(2) * p) * gamma)
    b = mix64_array(key + (np.uint64(2) * p + np.uint64(1)) * gamma)
    u1 = (a >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u2 = (b >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(1.0 - u1))
    angle = 2.0 * np.pi * u2
    return np.where(g % np.uint64(2) == 0, radius * np.cos(angle), radius * np.sin(angle))


def random_sparse(rng, num_clients, num_rows, dim, max_rows=12):
    sizes = rng.integers(0, max_rows + 1, size=num_clients)
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    rows = rng.integers(0, num_rows, size=offsets[-1]).astype(np.int32)
    values = rng.normal(size=(offsets[-1], dim)).astype(np.float32)
    return rows, values, offsets


# ---------------------------------------------------------------------------------------------
# Clipping


def test_clip_by_norm_scales_large_updates_to_the_clip_norm():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 7)).astype(np.float32) * 10
    clipped, was_clipped, norm = clip_by_norm(x, 2.5)
    ref, ref_norm = ref_clip(x, 2.5)
    assert was_clipped
    assert norm == pytest.approx(ref_norm, rel=1e-12)
    assert clipped.dtype == np.float32 and clipped.shape == x.shape
    assert_allclose(clipped, ref, rtol=F32_RTOL, atol=F32_ATOL)
    # Norm <= C up to one float32 rounding per value.
    assert np.linalg.norm(clipped.astype(np.float64)) <= 2.5 * (1 + 1e-6)
    assert np.linalg.norm(clipped.astype(np.float64)) == pytest.approx(2.5, rel=1e-6)


@pytest.mark.parametrize(("scale", "clip"), [(0.0, 1.0), (0.01, 1.0), (1.0, 5.0)])
def test_clip_by_norm_leaves_small_updates_unchanged(scale, clip):
    x = (np.array([[3.0, -4.0], [0.0, 0.0]]) * scale).astype(np.float32)  # norm 5 * scale
    clipped, was_clipped, norm = clip_by_norm(x, clip)
    assert not was_clipped  # (1.0, 5.0): a norm exactly at the clip is not clipped
    assert norm == pytest.approx(5.0 * scale, rel=1e-7)
    assert_array_equal(clipped, x)


def test_clip_by_norm_is_identical_for_any_thread_count():
    x = np.random.default_rng(2).normal(size=100_003).astype(np.float32)
    results = [clip_by_norm(x, 3.0, num_threads=t) for t in THREADS]
    for clipped, _, norm in results[1:]:
        assert_array_equal(clipped, results[0][0])
        assert norm == results[0][2]


# ---------------------------------------------------------------------------------------------
# DP sums without noise: clipping + weighted sum against NumPy


def test_dp_sum_dense_without_noise_matches_reference():
    rng = np.random.default_rng(3)
    stack = (rng.normal(size=(12, 5, 6)) * rng.uniform(0.05, 2.0, size=(12, 1, 1))).astype(np.float32)
    weights = rng.uniform(0.0, 1.0, size=12)
    res = dp_sum(stack, weights, clip=1.5, noise_multiplier=0.0, seed=0)
    ref, norms = ref_dp_sum_dense(stack, weights, 1.5)
    assert_allclose(res.value, ref, rtol=F32_RTOL, atol=F32_ATOL)
    assert_allclose(res.norms, norms, rtol=1e-12)
    assert res.num_updates == 12
    assert res.num_clipped == int((norms > 1.5).sum())
    assert 0 < res.num_clipped < 12
    assert res.clipped_fraction == res.num_clipped / 12
    assert res.noise_std == 0.0 and res.denominator == 1.0
    assert res.total_weight == pytest.approx(weights.sum())


def test_dp_sum_sparse_without_noise_matches_reference():
    rng = np.random.default_rng(4)
    rows, values, offsets = random_sparse(rng, 15, 40, 3)
    weights = rng.uniform(0.0, 1.0, size=15)
    res = dp_sum_sparse(rows, values, offsets, weights, num_rows=40, clip=2.0, noise_multiplier=0.0, seed=1)
    ref, norms = ref_dp_sum_sparse(rows, values, offsets, weights, 2.0, 40)
    assert res.value.shape == (40, 3)
    assert_allclose(res.value, ref, rtol=F32_RTOL, atol=F32_ATOL)
    assert_allclose(res.norms, norms, rtol=1e-12)
    assert res.num_clipped == int((norms > 2.0).sum()) > 0
    assert_array_equal(res.value[~np.isin(np.arange(40), rows)], 0.0)  # untouched rows, no noise


def test_one_client_moves_the_clipped_sum_by_at_most_clip():
    # The sensitivity bound behind the noise multiplier: ||S - S_without_k|| <= w_k C <= C.
    rng = np.random.default_rng(5)
    stack = (rng.normal(size=(6, 50)) * 5).astype(np.float32)
    full = dp_sum(stack, clip=0.7, noise_multiplier=0.0, seed=0, dtype=np.float64).value
    for k in range(6):
        rest = dp_sum(np.delete(stack, k, axis=0), clip=0.7, noise_multiplier=0.0, seed=0, dtype=np.float64).value
        assert np.linalg.norm(full - rest) <= 0.7 * (1 + 1e-9)


def test_expected_weight_is_a_fixed_denominator():
    rng = np.random.default_rng(6)
    stack = rng.normal(size=(4, 1000)).astype(np.float32)
    kwargs = dict(clip=1.0, noise_multiplier=1.3, seed=9, round=2, dtype=np.float64)
    total = dp_sum(stack, **kwargs)
    mean = dp_sum(stack, expected_weight=8.0, **kwargs)
    assert mean.denominator == 8.0 and mean.noise_std == pytest.approx(1.3)
    assert mean.value_noise_std == pytest.approx(1.3 / 8.0)
    assert_allclose(mean.value * 8.0, total.value, rtol=1e-14, atol=1e-14)


def test_zero_clients_give_pure_noise():
    res = dp_sum(
        np.zeros((0, 3000), dtype=np.float32), clip=2.0, noise_multiplier=0.5, seed=4, round=1, dtype=np.float64
    )
    assert res.num_updates == 0 and res.clipped_fraction == 0.0 and res.norms.shape == (0,)
    assert_allclose(res.value, 1.0 * ref_noise(4, 1, 3000), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Noise


def test_noise_is_the_documented_stream():
    # Odd offset and odd length: a block may start or end in the middle of a Box–Muller pair.
    full = gaussian_noise((3, 1001), 2.5, seed=123, round=7)
    assert full.dtype == np.float64 and full.shape == (3, 1001)
    assert_allclose(full.ravel(), 2.5 * ref_noise(123, 7, 3003), rtol=1e-12, atol=1e-14)


def test_noise_statistics():
    # 10^6 draws: the mean's standard error is 1e-3 σ and the sample std's is 7e-4 σ, so the
    # bounds below sit at > 5 standard errors.
    z, clip = 1.7, 0.8
    res = dp_sum(
        np.zeros((1, 1_000_000), dtype=np.float32),
        clip=clip,
        noise_multiplier=z,
        seed=11,
        expected_weight=4.0,
        dtype=np.float64,
    )
    sigma = z * clip / 4.0
    assert res.noise_std == pytest.approx(z * clip) and res.noise_multiplier == z
    assert res.value_noise_std == pytest.approx(sigma)
    x = res.value / sigma
    assert abs(x.mean()) < 0.005
    assert abs(x.std() - 1.0) < 0.004
    # Gaussian shape: P(|z| < 1) = 0.6827, P(|z| < 2) = 0.9545, excess kurtosis 0.
    assert abs(np.mean(np.abs(x) < 1.0) - 0.6827) < 0.003
    assert abs(np.mean(np.abs(x) < 2.0) - 0.9545) < 0.002
    assert abs(np.mean(x**4) - 3.0) < 0.05
    # Neighbouring coordinates (the two halves of a Box–Muller pair) are uncorrelated.
    assert abs(np.mean(x[0::2] * x[1::2])) < 0.01


def test_same_seed_same_noise_other_seed_or_round_other_noise():
    def run(seed, round):
        return dp_sum(
            np.zeros((2, 5000), dtype=np.float32), clip=1.0, noise_multiplier=1.0, seed=seed, round=round
        ).value

    a = run(5, 0)
    assert_array_equal(a, run(5, 0))
    for other in (run(6, 0), run(5, 1)):
        assert np.mean(a == other) < 0.01
        assert abs(np.corrcoef(a, other)[0, 1]) < 0.1


def test_sparse_noise_covers_every_row_of_the_table():
    rows = np.array([2], dtype=np.int32)
    res = dp_sum_sparse(
        rows,
        np.ones((1, 4), dtype=np.float32),
        [0, 1],
        num_rows=500,
        clip=1.0,
        noise_multiplier=0.3,
        seed=2,
        dtype=np.float64,
    )
    noise = 0.3 * ref_noise(2, 0, 2000).reshape(500, 4)
    expected = noise.copy()
    expected[2] += 0.5  # the update [1, 1, 1, 1] has norm 2, clipped to 1
    assert_allclose(res.value, expected, rtol=1e-12, atol=1e-14)
    assert res.num_clipped == 1


# ---------------------------------------------------------------------------------------------
# Determinism: threads, streaming == batch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dp_sums_are_identical_for_any_thread_count(dtype):
    rng = np.random.default_rng(7)
    stack = (rng.normal(size=(9, 40_000)) * rng.uniform(0.05, 0.2, size=(9, 1))).astype(np.float32)  # norms 10..40
    rows, values, offsets = random_sparse(rng, 50, 10_000, 4, max_rows=80)
    values *= 2.0  # norms up to ~36
    kw = dict(clip=20.0, noise_multiplier=0.7, seed=3, round=4, dtype=dtype)
    dense = [dp_sum(stack, **kw, num_threads=t) for t in THREADS]
    sparse = [dp_sum_sparse(rows, values, offsets, num_rows=10_000, **kw, num_threads=t) for t in THREADS]
    for results in (dense, sparse):
        for r in results[1:]:
            assert_array_equal(r.value, results[0].value)
            assert_array_equal(r.norms, results[0].norms)
    assert 0 < dense[0].num_clipped < 9
    assert 0 < sparse[0].num_clipped < 50


@pytest.mark.parametrize("expected_weight", [None, 3.0])
def test_streaming_dp_is_bit_identical_to_batch(expected_weight):
    rng = np.random.default_rng(8)
    stack = (rng.normal(size=(7, 20, 30)) * rng.uniform(0.01, 0.2, size=(7, 1, 1))).astype(np.float32)
    weights = rng.uniform(0.0, 1.0, size=7)
    kw = dict(clip=1.0, noise_multiplier=0.9, seed=21, round=3, expected_weight=expected_weight)
    batch = dp_sum(stack, weights, **kw)
    acc = DPGaussianSum((20, 30), **kw, num_threads=2)
    norms = [acc.add(x, w) for x, w in zip(stack, weights)]
    report = acc.finalize()
    assert_array_equal(acc.result(), batch.value)
    assert_array_equal(report.value, batch.value)
    assert_array_equal(np.array(norms), batch.norms)
    assert report.num_clipped == batch.num_clipped == acc.num_clipped
    assert 0 < acc.num_clipped < 7 and acc.clipped_fraction == acc.num_clipped / 7
    assert report.noise_std == batch.noise_std == pytest.approx(0.9)


def test_streaming_sparse_dp_is_bit_identical_to_batch():
    rng = np.random.default_rng(9)
    rows, values, offsets = random_sparse(rng, 20, 300, 4)
    weights = rng.uniform(0.0, 1.0, size=20)
    kw = dict(clip=1.5, noise_multiplier=0.4, seed=1, round=8, expected_weight=10.0, dtype=np.float64)
    batch = dp_sum_sparse(rows, values, offsets, weights, num_rows=300, **kw)
    acc = DPGaussianSum((300, 4), **{k: v for k, v in kw.items() if k != "dtype"})
    for i, w in enumerate(weights):
        acc.add_sparse(rows[offsets[i] : offsets[i + 1]], values[offsets[i] : offsets[i + 1]], w)
    assert_array_equal(acc.result(np.float64), batch.value)
    assert_array_equal(acc.norms, batch.norms)


def test_dp_gaussian_sum_without_noise_or_clipping_is_a_weighted_sum():
    # With z = 0 and a clip no update reaches, DPGaussianSum / total weight is WeightedMean.
    rng = np.random.default_rng(10)
    stack = rng.normal(size=(5, 64)).astype(np.float32)
    weights = np.array([0.2, 1.0, 0.5, 0.0, 0.9])
    dp = DPGaussianSum(64, clip=1e6, noise_multiplier=0.0, seed=0, expected_weight=float(weights.sum()))
    mean = WeightedMean(64)
    for x, w in zip(stack, weights):
        dp.add(x, w)
        mean.add(x, w)
    assert dp.num_clipped == 0
    assert_allclose(dp.result(np.float64), mean.result(np.float64), rtol=1e-15, atol=1e-16)


def test_dp_reset_and_metrics():
    acc = DPGaussianSum((10,), clip=1.0, noise_multiplier=0.5, seed=3)
    acc.add(np.full(10, 5.0), 1.0)
    m = acc.finalize().metrics()
    assert m["dp_num_clipped"] == 1 and m["dp_clipped_fraction"] == 1.0
    assert m["dp_noise_std"] == 0.5 and m["dp_noise_multiplier"] == 0.5 and m["dp_clip"] == 1.0
    acc.reset()
    assert acc.num_updates == 0 and acc.num_clipped == 0 and acc.norms.shape == (0,)
    assert_allclose(acc.result(np.float64), 0.5 * ref_noise(3, 0, 10), rtol=1e-12, atol=1e-15)


def test_capped_weights():
    assert_array_equal(capped_weights([0, 5, 10, 20], 10), [0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="num_examples"):
        capped_weights([-1, 2], 10)
    with pytest.raises(ValueError, match="cap"):
        capped_weights([1, 2], 0)


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"clip": 0.0}, ValueError, "clip"),
        ({"clip": -1.0}, ValueError, "clip"),
        ({"clip": np.inf}, ValueError, "clip"),
        ({"noise_multiplier": -0.1}, ValueError, "noise_multiplier"),
        ({"noise_multiplier": np.nan}, ValueError, "noise_multiplier"),
        ({"expected_weight": 0.0}, ValueError, "expected_weight"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"round": -2}, ValueError, "round"),
        ({"dtype": np.int8}, ValueError, "dtype"),
    ],
)
def test_bad_dp_parameters_are_rejected(kwargs, exc, match):
    base = dict(clip=1.0, noise_multiplier=1.0, seed=0)
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        dp_sum(np.ones((2, 3), dtype=np.float32), **base)
    if "dtype" not in kwargs:
        with pytest.raises(exc, match=match):
            DPGaussianSum((2, 3), **base)


@pytest.mark.parametrize("weights", [[0.5, 1.5], [-0.1, 0.5], [np.nan, 0.5], [1.0]])
def test_dp_weights_must_lie_in_unit_interval(weights):
    with pytest.raises(ValueError, match="weights"):
        dp_sum(np.ones((2, 3), dtype=np.float32), weights, clip=1.0, noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match="weights"):
        dp_sum_sparse([0, 1], np.ones((2, 3)), [0, 1, 2], weights, num_rows=2, clip=1.0, noise_multiplier=1.0, seed=0)


def test_dp_rejects_non_finite_values_and_bad_rows():
    bad = np.ones((2, 3), dtype=np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="updates"):
        dp_sum(bad, [1.0, 0.0], clip=1.0, noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match="values"):
        dp_sum_sparse([0, 1], bad, [0, 1, 2], num_rows=2, clip=1.0, noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match="update"):
        clip_by_norm(bad, 1.0)
    with pytest.raises(ValueError, match="clip"):
        clip_by_norm(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="rows"):
        dp_sum_sparse([0, 2], np.ones((2, 3)), [0, 1, 2], num_rows=2, clip=1.0, noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match="offsets"):
        dp_sum_sparse([0, 1], np.ones((2, 3)), [0, 2, 1], num_rows=2, clip=1.0, noise_multiplier=1.0, seed=0)


def test_streaming_dp_rejections_leave_the_sum_unchanged():
    acc = DPGaussianSum((4, 2), clip=1.0, noise_multiplier=0.2, seed=1)
    acc.add_sparse([1], [[3.0, 4.0]], 1.0)
    before = acc.result()
    with pytest.raises(ValueError, match="weight"):
        acc.add(np.ones((4, 2)), 1.5)
    with pytest.raises(ValueError, match="update"):
        acc.add(np.full((4, 2), np.inf), 1.0)
    with pytest.raises(ValueError, match="update"):
        acc.add(np.ones(8), 1.0)
    with pytest.raises(ValueError, match="rows"):
        acc.add_sparse([5], [[1.0, 1.0]], 1.0)
    with pytest.raises(ValueError, match="values"):
        acc.add_sparse([0], [[np.nan, 1.0]], 1.0)
    assert acc.num_updates == 1 and acc.num_clipped == 1 and acc.total_weight == 1.0
    assert_array_equal(acc.norms, [5.0])
    assert_array_equal(acc.result(), before)


def test_dp_out_buffers():
    rng = np.random.default_rng(11)
    stack = rng.normal(size=(3, 100)).astype(np.float32)
    kw = dict(clip=1.0, noise_multiplier=0.5, seed=2)
    out = np.full(100, np.nan, dtype=np.float64)
    res = dp_sum(stack, **kw, out=out)
    assert res.value is out
    assert_array_equal(out, dp_sum(stack, **kw, dtype=np.float64).value)
    out = np.full((10, 3), np.nan, dtype=np.float32)
    res = dp_sum_sparse([1, 4], np.ones((2, 3)), [0, 1, 2], num_rows=10, **kw, out=out)
    assert res.value is out and np.isfinite(out).all()
    acc = DPGaussianSum(100, **kw)
    acc.add(stack[0])
    out = np.full(100, np.nan, dtype=np.float32)
    assert acc.result(out=out) is out
    assert_array_equal(out, acc.result())
    with pytest.raises(ValueError, match="out"):
        dp_sum(stack, **kw, out=np.zeros(99, dtype=np.float32))
    with pytest.raises(ValueError, match="out"):
        acc.result(out=np.zeros(100, dtype=np.int64))
