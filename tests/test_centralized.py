"""Centralized matrix factorization: the native minibatch-SGD epoch (``_core.mf_sgd_epoch`` and
its wrapper ``fedrecon_fast.baselines.mf_sgd_epoch``) against the NumPy reference
(``reference.mf_sgd_epoch_reference``), hand-computed steps, determinism, in-place updates and
bad inputs."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedrecon_fast._native import core as _core
from reference import mf_sgd_epoch_reference

try:
    from fedrecon_fast.baselines import mf_sgd_epoch as wrapper_epoch
except ImportError:  # the wrapper is optional; _core is tested either way
    wrapper_epoch = None

needs_wrapper = pytest.mark.skipif(wrapper_epoch is None, reason="fedrecon_fast.baselines.mf_sgd_epoch missing")

# float32 tables after a whole epoch: native and reference differ only in float32 rounding of
# dot products (Eigen's vectorised order vs NumPy's), compounded over the epoch's steps.
RTOL, ATOL = 1e-4, 1e-5
SSE_RTOL = 1e-5


def make_problem(seed, num_users, num_items, dim, n, biases, global_mean=3.0, scale=0.3):
    """Random tables (float32, rows of norm ~scale * sqrt(dim)) and n ratings around the mean.

    Returns ``(tables, ratings)``: ``tables`` is a dict of the four arrays (biases None when not
    wanted); ``ratings`` a dict of ``user_ids`` (int64), ``item_ids`` (int32), ``ratings``
    (float32). Few users/items make repeated rows inside a batch common.
    """
    rng = np.random.default_rng([seed, num_users, num_items, dim, n, int(biases)])
    tables = dict(
        users=rng.normal(0.0, scale / np.sqrt(dim), size=(num_users, dim)).astype(np.float32),
        user_bias=rng.normal(0.0, 0.2, size=num_users).astype(np.float32) if biases else None,
        items=rng.normal(0.0, scale / np.sqrt(dim), size=(num_items, dim)).astype(np.float32),
        item_bias=rng.normal(0.0, 0.2, size=num_items).astype(np.float32) if biases else None,
    )
    ratings = dict(
        user_ids=rng.integers(0, num_users, size=n).astype(np.int64),
        item_ids=rng.integers(0, num_items, size=n).astype(np.int32),
        ratings=rng.uniform(global_mean - 1.0, global_mean + 1.0, size=n).astype(np.float32),
    )
    return tables, ratings


def copy_tables(tables):
    return {k: None if v is None else v.copy() for k, v in tables.items()}


def run_core(tables, ratings, global_mean, batch_size, lr, l2):
    """``_core.mf_sgd_epoch`` on ``tables`` in place; returns the SSE."""
    return _core.mf_sgd_epoch(
        tables["users"],
        tables["user_bias"],
        tables["items"],
        tables["item_bias"],
        global_mean,
        ratings["user_ids"],
        ratings["item_ids"],
        ratings["ratings"],
        batch_size,
        lr,
        l2,
    )


def run_wrapper(tables, ratings, global_mean, batch_size, lr, l2):
    return wrapper_epoch(
        tables["users"],
        tables["items"],
        ratings["user_ids"],
        ratings["item_ids"],
        ratings["ratings"],
        user_bias=tables["user_bias"],
        item_bias=tables["item_bias"],
        global_mean=global_mean,
        batch_size=batch_size,
        lr=lr,
        l2=l2,
    )


def run_reference(tables, ratings, global_mean, batch_size, lr, l2):
    return mf_sgd_epoch_reference(
        tables["users"],
        tables["user_bias"],
        tables["items"],
        tables["item_bias"],
        global_mean,
        ratings["user_ids"],
        ratings["item_ids"],
        ratings["ratings"],
        batch_size,
        lr,
        l2,
    )


def assert_tables_close(actual, expected):
    for name, value in expected.items():
        if value is None:
            assert actual[name] is None, name
        else:
            assert actual[name].dtype == np.float32, name
            assert_allclose(actual[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


def direct_sse(tables, ratings, global_mean):
    """SSE of the predictions of the given (pre-epoch) tables, in float64: the epoch's SSE when
    the whole epoch is one batch."""
    u = tables["users"][ratings["user_ids"]].astype(np.float64)
    v = tables["items"][ratings["item_ids"]].astype(np.float64)
    pred = np.einsum("ij,ij->i", u, v) + global_mean
    if tables["user_bias"] is not None:
        pred += tables["user_bias"][ratings["user_ids"]] + tables["item_bias"][ratings["item_ids"]]
    return float(np.sum((pred - ratings["ratings"]) ** 2))


# ------------------------------------------------------------------------------- against the reference

# (num_users, num_items, dim, n, batch_size)
SHAPES = [
    pytest.param(1, 1, 1, 20, 7, id="one-user-one-item"),  # every batch repeats both rows
    pytest.param(2, 3, 4, 50, 16, id="repeats-in-batch"),
    pytest.param(5, 4, 3, 30, 1, id="batch-1"),
    pytest.param(6, 9, 5, 10, 100, id="batch-larger-than-n"),
    pytest.param(6, 9, 5, 10, 10, id="batch-equals-n"),
    pytest.param(6, 9, 5, 11, 5, id="short-last-batch"),
    pytest.param(4, 4, 2, 1, 3, id="n-1"),
    pytest.param(4, 4, 2, 0, 3, id="n-0"),
    pytest.param(0, 0, 3, 0, 2, id="empty-tables"),
    pytest.param(40, 60, 16, 500, 32, id="I60-K16-b32"),
    pytest.param(30, 20, 50, 200, 8, id="K50-b8"),
]


@pytest.mark.parametrize("l2", [0.0, 0.05], ids=["no-l2", "l2"])
@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(("num_users", "num_items", "dim", "n", "batch_size"), SHAPES)
def test_epoch_matches_reference(num_users, num_items, dim, n, batch_size, biases, l2):
    tables, ratings = make_problem(1, num_users, num_items, dim, n, biases)
    native, expected = copy_tables(tables), copy_tables(tables)
    lr, mean = 0.1, 3.0

    sse = run_core(native, ratings, mean, batch_size, lr, l2)
    expected_sse = run_reference(expected, ratings, mean, batch_size, lr, l2)

    assert isinstance(sse, float)
    assert sse == pytest.approx(expected_sse, rel=SSE_RTOL, abs=1e-6)
    assert_tables_close(native, expected)
    # The epoch did something exactly when there were ratings (lr > 0, errors ~ 1).
    touched_users = np.zeros(num_users, dtype=bool)
    touched_users[ratings["user_ids"]] = True
    assert np.all(np.any(native["users"][touched_users] != tables["users"][touched_users], axis=1))
    assert_array_equal(native["users"][~touched_users], tables["users"][~touched_users])
    touched_items = np.zeros(num_items, dtype=bool)
    touched_items[ratings["item_ids"]] = True
    assert_array_equal(native["items"][~touched_items], tables["items"][~touched_items])
    if n == 0:
        assert sse == 0.0
    if batch_size >= n:
        # One batch: the SSE is the error of the initial tables.
        assert sse == pytest.approx(direct_sse(tables, ratings, mean), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("seed", range(16))
def test_random_sizes_match_reference(seed):
    rng = np.random.default_rng(seed)
    num_users, num_items = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    dim, n = int(rng.integers(1, 20)), int(rng.integers(0, 120))
    batch_size = int(rng.choice([1, 2, 3, max(n, 1), n + 7, int(rng.integers(1, 40))]))
    biases, l2 = bool(rng.integers(2)), float(rng.choice([0.0, 0.01, 0.2]))
    lr, mean = float(rng.uniform(0.01, 0.15)), float(rng.uniform(-1.0, 4.0))
    tables, ratings = make_problem(seed, num_users, num_items, dim, n, biases, global_mean=mean)
    native, expected = copy_tables(tables), copy_tables(tables)

    sse = run_core(native, ratings, mean, batch_size, lr, l2)
    expected_sse = run_reference(expected, ratings, mean, batch_size, lr, l2)

    assert sse == pytest.approx(expected_sse, rel=SSE_RTOL, abs=1e-6)
    assert_tables_close(native, expected)


@needs_wrapper
@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("batch_size", [1, 4, 1000])
def test_wrapper_matches_reference(batch_size, biases):
    tables, ratings = make_problem(3, 5, 7, 6, 90, biases)
    native, expected = copy_tables(tables), copy_tables(tables)
    sse = run_wrapper(native, ratings, 3.0, batch_size, 0.08, 0.03)
    expected_sse = run_reference(expected, ratings, 3.0, batch_size, 0.08, 0.03)
    assert sse == pytest.approx(expected_sse, rel=SSE_RTOL)
    assert_tables_close(native, expected)
    # Python lists of ids and float64 ratings are converted by the wrapper.
    again = copy_tables(tables)
    lists = dict(
        user_ids=ratings["user_ids"].tolist(),
        item_ids=ratings["item_ids"].tolist(),
        ratings=ratings["ratings"].astype(np.float64),
    )
    assert run_wrapper(again, lists, 3.0, batch_size, 0.08, 0.03) == sse
    for name, value in native.items():
        assert_array_equal(again[name], value)


def test_several_epochs_reduce_the_error():
    # Sanity of the whole procedure (not only agreement with the reference): training fits.
    # Ratings of a planted rank-2 model with biases; the fitted model starts small.
    tables, ratings = make_problem(4, 20, 15, 4, 600, True, scale=0.1)
    rng = np.random.default_rng(4)
    true_u, true_v = rng.normal(size=(20, 2)), rng.normal(size=(15, 2))
    true_bu, true_bi = rng.normal(0, 0.5, size=20), rng.normal(0, 0.5, size=15)
    uid, iid = ratings["user_ids"], ratings["item_ids"]
    ratings["ratings"] = (3.0 + np.einsum("ij,ij->i", true_u[uid], true_v[iid]) + true_bu[uid] + true_bi[iid]).astype(
        np.float32
    )
    sses = [run_core(tables, ratings, 3.0, 16, 0.1, 0.0) for _ in range(40)]
    assert all(np.isfinite(sses))
    assert sses[-1] < 0.1 * sses[0]


# ------------------------------------------------------------------------------- by hand


@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("l2", [0.0, 0.5], ids=["no-l2", "l2"])
@pytest.mark.parametrize("copies", [1, 2, 3])
def test_repeated_rating_in_one_batch_by_hand(copies, l2, biases):
    # u = 1, v = 2, r = 5 (plus b_u = 0.5, b_i = -0.5 with biases: same prediction), lr 0.1,
    # one batch holding the same rating `copies` times. err = 2 - 5 = -3 for each copy (all at
    # the pre-step values); the per-copy step is g = lr * 2/m * err = -0.6/m, summed over the m
    # copies: u -= m * g * v0 -> u + 1.2, v -= m * g * u0 -> v + 0.6, biases + 0.6. L2 decays each
    # row once: u = 0.9 * 1 + 1.2, v = 0.9 * 2 + 0.6 (1 - lr * 2 * l2 = 0.9).
    decay = 1.0 - 0.1 * 2 * l2
    tables = dict(
        users=np.array([[1.0]], np.float32),
        items=np.array([[2.0]], np.float32),
        user_bias=np.array([0.5], np.float32) if biases else None,
        item_bias=np.array([-0.5], np.float32) if biases else None,
    )
    ratings = dict(
        user_ids=np.zeros(copies, np.int64),
        item_ids=np.zeros(copies, np.int32),
        ratings=np.full(copies, 5.0, np.float32),
    )
    sse = run_core(tables, ratings, 0.0, copies, 0.1, l2)
    assert sse == pytest.approx(9.0 * copies)
    assert_allclose(tables["users"], [[decay * 1.0 + 1.2]], rtol=1e-6)
    assert_allclose(tables["items"], [[decay * 2.0 + 0.6]], rtol=1e-6)
    if biases:
        assert_allclose(tables["user_bias"], [1.1], rtol=1e-6)  # biases are not decayed
        assert_allclose(tables["item_bias"], [0.1], rtol=1e-5)


def test_batches_run_in_the_given_order():
    # Two ratings of the same (user, item), batch 1: the second step sees the first's result.
    # u = v = 1, r = 3, lr 0.1: err1 = -2 -> u = v = 1.4; err2 = 1.96 - 3 = -1.04 ->
    # u = v = 1.4 + 0.2 * 1.04 * 1.4 = 1.6912. SSE = 4 + 1.0816.
    users, items = np.ones((1, 1), np.float32), np.ones((1, 1), np.float32)
    sse = _core.mf_sgd_epoch(
        users,
        None,
        items,
        None,
        0.0,
        np.zeros(2, np.int64),
        np.zeros(2, np.int32),
        np.full(2, 3.0, np.float32),
        1,
        0.1,
        0.0,
    )
    assert sse == pytest.approx(5.0816, rel=1e-6)
    assert_allclose(users, [[1.6912]], rtol=1e-6)
    assert_allclose(items, [[1.6912]], rtol=1e-6)
    # The order matters: a different order of distinct ratings gives a different result.
    tables, ratings = make_problem(5, 3, 3, 2, 12, False)
    a, b = copy_tables(tables), copy_tables(tables)
    run_core(a, ratings, 3.0, 2, 0.1, 0.0)
    reversed_ratings = {k: v[::-1].copy() for k, v in ratings.items()}
    run_core(b, reversed_ratings, 3.0, 2, 0.1, 0.0)
    assert not np.array_equal(a["users"], b["users"])


# ------------------------------------------------------------------------------- determinism, in place


@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "bias"])
def test_deterministic(biases):
    tables, ratings = make_problem(6, 30, 40, 12, 700, biases)
    a, b = copy_tables(tables), copy_tables(tables)
    sse_a = run_core(a, ratings, 3.0, 8, 0.05, 0.01)
    sse_b = run_core(b, ratings, 3.0, 8, 0.05, 0.01)
    assert sse_a == sse_b
    for name, value in a.items():
        if value is not None:
            assert_array_equal(b[name], value, err_msg=name)
            assert not np.array_equal(value, tables[name]), name


@pytest.mark.parametrize("use_wrapper", [False, pytest.param(True, marks=needs_wrapper)], ids=["core", "wrapper"])
def test_updates_the_given_arrays_in_place(use_wrapper):
    tables, ratings = make_problem(7, 5, 6, 3, 40, True)
    before = copy_tables(tables)
    ids = {k: id(v) for k, v in tables.items()}
    sse = (run_wrapper if use_wrapper else run_core)(tables, ratings, 3.0, 4, 0.1, 0.0)
    assert isinstance(sse, float) and sse > 0
    for name, value in tables.items():
        assert id(value) == ids[name]  # same objects
        assert value.dtype == np.float32 and value.flags.c_contiguous
        assert not np.array_equal(value, before[name]), name  # ... and modified
    # The inputs describing the ratings are not written.
    fresh = make_problem(7, 5, 6, 3, 40, True)[1]
    for name, value in ratings.items():
        assert_array_equal(value, fresh[name])


def test_views_of_larger_arrays_are_updated_in_place():
    # A C-contiguous slice of rows is a valid table: only those rows of the base change.
    base = np.random.default_rng(8).normal(0.0, 0.3, size=(10, 4)).astype(np.float32)
    original = base.copy()
    users = base[2:5]
    items = np.random.default_rng(9).normal(0.0, 0.3, size=(3, 4)).astype(np.float32)
    _core.mf_sgd_epoch(
        users,
        None,
        items,
        None,
        3.0,
        np.array([0, 1, 2], np.int64),
        np.array([2, 1, 0], np.int32),
        np.full(3, 3.0, np.float32),
        2,
        0.1,
        0.0,
    )
    assert np.all(np.any(base[2:5] != original[2:5], axis=1))
    assert_array_equal(base[:2], original[:2])
    assert_array_equal(base[5:], original[5:])


# ------------------------------------------------------------------------------- bad input, _core


def core_args(**changes):
    """Arguments of a valid ``_core.mf_sgd_epoch`` call (3 users, 4 items, dim 2), some replaced."""
    args = dict(
        users=np.full((3, 2), 0.5, np.float32),
        user_bias=None,
        items=np.full((4, 2), 0.5, np.float32),
        item_bias=None,
        global_mean=3.0,
        user_ids=np.array([0, 1, 2, 1], np.int64),
        item_ids=np.array([3, 0, 1, 1], np.int32),
        ratings=np.array([1, 2, 3, 4], np.float32),
        batch_size=2,
        lr=0.1,
        l2=0.0,
    )
    args.update(changes)
    return args


def test_core_valid_call_runs():
    # The baseline every bad-input case below perturbs by one argument.
    args = core_args()
    users, items = args["users"].copy(), args["items"].copy()
    sse = _core.mf_sgd_epoch(**args)
    expected = mf_sgd_epoch_reference(
        users, None, items, None, 3.0, args["user_ids"], args["item_ids"], args["ratings"], 2, 0.1, 0.0
    )
    # First batch at the initial tables: predictions 3.5 for ratings 1 and 2.
    assert expected > 2.5**2 + 1.5**2
    assert sse == pytest.approx(expected, rel=1e-6)
    assert_allclose(args["users"], users, rtol=1e-6)
    assert_allclose(args["items"], items, rtol=1e-6)


F32, I64, I32 = np.float32, np.int64, np.int32


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"user_ids": np.array([0, 1, 3, 1], I64)}, IndexError, "user id 3"),
        ({"user_ids": np.array([0, -1, 2, 1], I64)}, IndexError, "user id -1"),
        ({"user_ids": np.array([0, 1, 2, 2**62], I64)}, IndexError, "user id"),
        ({"item_ids": np.array([3, 0, 4, 1], I32)}, IndexError, "item id 4"),
        ({"item_ids": np.array([3, 0, 1, -(2**31)], I32)}, IndexError, "item id"),
        ({"users": np.zeros((0, 2), F32)}, IndexError, "user id 0"),
        ({"user_ids": np.array([0, 1, 2], I64)}, ValueError, "same length"),
        ({"item_ids": np.array([0, 1, 2, 3, 0], I32)}, ValueError, "same length"),
        ({"ratings": np.ones(3, F32)}, ValueError, "same length"),
        ({"users": np.zeros(6, F32)}, ValueError, "2-D"),
        ({"items": np.zeros((4, 2, 1), F32)}, ValueError, "2-D"),
        ({"items": np.zeros((4, 3), F32)}, ValueError, "same number of columns"),
        ({"users": np.zeros((3, 0), F32), "items": np.zeros((4, 0), F32)}, ValueError, "dim"),
        ({"user_ids": np.zeros((4, 1), I64)}, ValueError, "1-D"),
        ({"item_ids": np.zeros((2, 2), I32)}, ValueError, "1-D"),
        ({"ratings": np.ones((4, 1), F32)}, ValueError, "1-D"),
        ({"user_bias": np.zeros(3, F32)}, ValueError, "together"),
        ({"item_bias": np.zeros(4, F32)}, ValueError, "together"),
        ({"user_bias": np.zeros(4, F32), "item_bias": np.zeros(4, F32)}, ValueError, "user_bias"),
        ({"user_bias": np.zeros(3, F32), "item_bias": np.zeros(3, F32)}, ValueError, "item_bias"),
        ({"user_bias": np.zeros((3, 1), F32), "item_bias": np.zeros(4, F32)}, ValueError, "user_bias"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": -5}, ValueError, "batch_size"),
        ({"lr": -0.1}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"l2": -1e-3}, ValueError, "l2"),
        # No conversions in the binding: wrong dtypes and layouts are refused.
        ({"users": np.zeros((3, 2))}, TypeError, "incompatible function arguments"),
        ({"users": np.zeros((2, 3), F32).T}, TypeError, "incompatible function arguments"),
        ({"user_ids": np.array([0, 1, 2, 1], I32)}, TypeError, "incompatible function arguments"),
        ({"item_ids": np.array([3, 0, 1, 1], I64)}, TypeError, "incompatible function arguments"),
        ({"ratings": np.ones(4)}, TypeError, "incompatible function arguments"),
        ({"user_ids": [0, 1, 2, 1]}, TypeError, "incompatible function arguments"),
        ({"batch_size": 2**31}, TypeError, "incompatible function arguments"),
    ],
    ids=lambda x: None if isinstance(x, (dict, type)) else str(x),
)
def test_core_rejects_bad_input(changes, error, match):
    args = core_args(**changes)
    tables = {k: args[k].copy() for k in ("users", "items") if args[k].ndim == 2}
    with pytest.raises(error, match=match):
        _core.mf_sgd_epoch(**args)
    # Checks come first: a rejected call leaves the tables untouched.
    for name, value in tables.items():
        assert_array_equal(args[name], value)


def test_core_rejects_read_only_tables():
    users = np.zeros((3, 2), F32)
    users.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _core.mf_sgd_epoch(**core_args(users=users))


# Anything that might crash the interpreter runs in a subprocess: out-of-range ids at the far
# ends of the integer ranges, empty and one-element arrays, and aliased tables.
def test_core_never_crashes_on_edge_cases():
    code = textwrap.dedent("""
        import numpy as np
        from fedrecon_fast._native import core as _core
        f32, i64, i32 = np.float32, np.int64, np.int32
        def call(users, items, uid, iid, r, ub=None, ib=None, bs=3):
            try:
                return repr(_core.mf_sgd_epoch(users, ub, items, ib, 0.0, np.array(uid, i64),
                                               np.array(iid, i32), np.array(r, f32), bs, 0.1, 0.1))
            except (ValueError, IndexError, TypeError) as e:
                return type(e).__name__
        U, V = np.ones((2, 3), f32), np.ones((3, 3), f32)
        print(call(U, V, [2**63 - 1], [0], [1.0]))
        print(call(U, V, [-2**63], [0], [1.0]))
        print(call(U, V, [0], [2**31 - 1], [1.0]))
        print(call(U, V, [0, 1], [0, -1], [1.0, 1.0]))
        print(call(np.ones((0, 3), f32), np.ones((0, 3), f32), [], [], []))
        print(call(U, U, [0, 1, 1, 0], [1, 1, 0, 0], [1.0, 2.0, 3.0, 4.0]))  # users is items
        print(call(U, V, [0, 1], [0, 1], [1.0, 2.0], ub=np.zeros(2, f32), ib=np.zeros(2, f32)))
        print(call(U, V, [0, 0, 0], [2, 2, 2], [1.0, 2.0, 3.0], bs=1))
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split()
    assert lines[:5] == ["IndexError", "IndexError", "IndexError", "IndexError", "0.0"], proc.stdout
    assert float(lines[5]) > 0  # aliasing is allowed: the same array is read and written
    assert lines[6] == "ValueError"  # item_bias of the wrong length
    assert float(lines[7]) > 0 and lines[8] == "done"


def _limit_address_space():
    limit = 3 * 1024**3
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_core_batch_size_far_larger_than_n_costs_nothing():
    # batch_size only cuts the ratings: one batch of 3 here. Run under a 3 GB address-space
    # limit so that a huge allocation fails fast instead of swapping the test machine.
    code = textwrap.dedent("""
        import numpy as np
        from fedrecon_fast._native import core as _core
        u, v = np.ones((3, 8), np.float32), np.ones((4, 8), np.float32)
        print(_core.mf_sgd_epoch(u, None, v, None, 0.0, np.array([0, 1, 2], np.int64),
                                 np.array([0, 1, 3], np.int32), np.full(3, 8.0, np.float32),
                                 2**31 - 1, 0.1, 0.0))
    """)
    # AddressSanitizer (tools/sanitize.sh) reserves terabytes of shadow memory at start-up, which
    # an address-space limit forbids; there its allocator reports a huge allocation instead.
    under_asan = "libasan" in os.environ.get("LD_PRELOAD", "")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=None if under_asan else _limit_address_space,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "0.0", proc.stdout + proc.stderr[-2000:]


# ------------------------------------------------------------------------------- bad input, wrapper


def wrapper_args(**changes):
    args = core_args()
    out = dict(
        users=args["users"],
        items=args["items"],
        user_ids=args["user_ids"],
        item_ids=args["item_ids"],
        ratings=args["ratings"],
        user_bias=None,
        item_bias=None,
        global_mean=3.0,
        batch_size=2,
        lr=0.1,
        l2=0.0,
    )
    out.update(changes)
    return out


@needs_wrapper
def test_wrapper_valid_call_runs():
    args = wrapper_args()
    expected = core_args()
    assert wrapper_epoch(**args) == _core.mf_sgd_epoch(**expected)
    assert_array_equal(args["users"], expected["users"])
    assert not np.array_equal(args["users"], core_args()["users"])


@needs_wrapper
@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"user_ids": [0, 1, 3, 1]}, ValueError, "user_ids"),
        ({"user_ids": [0, -1, 2, 1]}, ValueError, "user_ids"),
        ({"item_ids": [3, 0, 4, 1]}, ValueError, "item_ids"),
        ({"user_ids": [0, 1, 2]}, ValueError, "ratings|length"),
        ({"item_ids": [0, 1, 2]}, ValueError, "length"),
        ({"ratings": [1.0, 2.0]}, ValueError, "ratings"),
        ({"user_ids": [[0, 1, 2, 1]]}, ValueError, "user_ids"),
        ({"users": np.zeros(6, F32)}, ValueError, "users"),
        ({"items": np.zeros((4, 2, 1), F32)}, ValueError, "items"),
        ({"items": np.zeros((4, 3), F32)}, ValueError, "dim"),
        ({"users": np.zeros((3, 2))}, ValueError, "users"),  # float64: cannot update in place
        ({"users": np.zeros((2, 3), F32).T}, ValueError, "users"),
        ({"user_bias": np.zeros(3, F32)}, ValueError, "together"),
        ({"item_bias": np.zeros(4, F32)}, ValueError, "together"),
        ({"user_bias": np.zeros(4, F32), "item_bias": np.zeros(4, F32)}, ValueError, "user_bias"),
        ({"user_bias": np.zeros(3, F32), "item_bias": np.zeros(3, F32)}, ValueError, "item_bias"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"l2": float("nan")}, ValueError, "l2"),
        ({"global_mean": float("inf")}, ValueError, "global_mean"),
        ({"ratings": [1.0, 2.0, float("nan"), 4.0]}, ValueError, "ratings"),
    ],
    ids=lambda x: None if isinstance(x, (dict, type)) else str(x),
)
def test_wrapper_rejects_bad_input(changes, error, match):
    args = wrapper_args(**changes)
    users = args["users"].copy()
    with pytest.raises(error, match=match):
        wrapper_epoch(**args)
    assert_array_equal(args["users"], users)


@needs_wrapper
def test_wrapper_rejects_read_only_tables():
    users = np.zeros((3, 2), F32)
    users.flags.writeable = False
    with pytest.raises(ValueError, match="users"):
        wrapper_epoch(**wrapper_args(users=users))
