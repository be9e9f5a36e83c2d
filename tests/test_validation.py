"""Bad inputs raise clear errors naming the argument, in the public kernels, in ClientConfig,
and in the private native functions (which must never crash, whatever they are given)."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import csr, random_client_data
from fedrecon_fast._native import core as _core
from fedrecon_fast._native.structs import client_config
from fedrecon_fast.config import ClientConfig
from fedrecon_fast.kernels import (
    client_updates,
    evaluate_users,
    infer_users,
    recommend_users,
    reconstruct_users,
    train_round,
)

KERNELS = [train_round, client_updates, reconstruct_users, evaluate_users, infer_users, recommend_users]
kernel_ids = [k.__name__ for k in KERNELS]
parametrize_kernels = pytest.mark.parametrize("kernel", KERNELS, ids=kernel_ids)

NUM_ITEMS, DIM = 6, 3


@pytest.fixture
def data():
    return random_client_data(np.random.default_rng(0), NUM_ITEMS, (0, 1, 4, 7))


@pytest.fixture
def V():
    return np.random.default_rng(1).normal(size=(NUM_ITEMS, DIM)).astype(np.float32)


# ------------------------------------------------------------------------------- public kernels


def result_arrays(out) -> list:
    """The arrays of a kernel's result (a dataclass, dict, tuple or array), in a fixed order."""
    if out is None:
        return []
    if dataclasses.is_dataclass(out):
        return [a for f in dataclasses.fields(out) for a in result_arrays(getattr(out, f.name))]
    if isinstance(out, dict):
        return [a for key in sorted(out) for a in result_arrays(out[key])]
    if isinstance(out, (tuple, list)):
        return [a for item in out for a in result_arrays(item)]
    return [np.asarray(out)]


def assert_same_result(a, b):
    arrays_a, arrays_b = result_arrays(a), result_arrays(b)
    assert len(arrays_a) == len(arrays_b)
    for x, y in zip(arrays_a, arrays_b):
        np.testing.assert_array_equal(x, y)


@parametrize_kernels
def test_valid_call_runs(kernel, data, V):
    # The baseline every other test in this file perturbs by one argument: float64 inputs are
    # converted once, to exactly what float32 inputs give, and the call computes something.
    out = kernel(V.astype(np.float64), data, [0, 2, 3], ClientConfig(), item_bias=np.zeros(NUM_ITEMS))
    assert_same_result(out, kernel(V, data, [0, 2, 3], ClientConfig(), item_bias=np.zeros(NUM_ITEMS, np.float32)))
    assert any(np.isfinite(a).any() for a in result_arrays(out) if a.dtype.kind == "f")


@parametrize_kernels
@pytest.mark.parametrize(
    "bad",
    [
        np.ones((NUM_ITEMS, DIM), dtype=np.complex64),
        np.full((NUM_ITEMS, DIM), None, dtype=object),
        np.full((NUM_ITEMS, DIM), "a"),
        np.ones((NUM_ITEMS, DIM), dtype=bool),
    ],
    ids=["complex", "object", "str", "bool"],
)
def test_item_factors_dtype(kernel, data, bad):
    with pytest.raises(TypeError, match="item_factors"):
        kernel(bad, data)


@parametrize_kernels
@pytest.mark.parametrize("shape", [(NUM_ITEMS,), (NUM_ITEMS, DIM, 1), ()], ids=["1d", "3d", "0d"])
def test_item_factors_ndim(kernel, data, shape):
    with pytest.raises(ValueError, match="item_factors"):
        kernel(np.zeros(shape, dtype=np.float32), data)


@parametrize_kernels
def test_item_factors_without_columns(kernel, data):
    with pytest.raises(ValueError, match="item_factors"):
        kernel(np.zeros((NUM_ITEMS, 0), dtype=np.float32), data)


@parametrize_kernels
def test_item_factors_with_fewer_rows_than_items(kernel, data, V):
    with pytest.raises(ValueError, match="item_factors"):
        kernel(V[: NUM_ITEMS - 1], data)


@parametrize_kernels
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_item_factors_not_finite(kernel, data, V, value):
    V[2, 1] = value
    with pytest.raises(ValueError, match="item_factors"):
        kernel(V, data)


@parametrize_kernels
@pytest.mark.parametrize(
    "bias",
    [
        np.zeros(NUM_ITEMS - 1),
        np.zeros(NUM_ITEMS + 1),
        np.zeros((NUM_ITEMS, 1)),
        np.array([0.0] * (NUM_ITEMS - 1) + [np.nan]),
    ],
    ids=["short", "long", "2d", "nan"],
)
def test_item_bias_mismatch(kernel, data, V, bias):
    with pytest.raises(ValueError, match="item_bias"):
        kernel(V, data, item_bias=bias)


@parametrize_kernels
def test_item_bias_dtype(kernel, data, V):
    with pytest.raises(TypeError, match="item_bias"):
        kernel(V, data, item_bias=np.zeros(NUM_ITEMS, dtype=complex))


@parametrize_kernels
@pytest.mark.parametrize("clients", [[0, 4], [-1], [1, 2, 99]], ids=["n", "negative", "large"])
def test_client_id_out_of_range(kernel, data, V, clients):
    with pytest.raises(ValueError, match="clients"):
        kernel(V, data, clients)


@parametrize_kernels
@pytest.mark.parametrize("clients", [[0.0, 1.0], np.array([1.5]), ["a"]], ids=["float", "fraction", "str"])
def test_client_ids_must_be_integers(kernel, data, V, clients):
    with pytest.raises(TypeError, match="clients"):
        kernel(V, data, clients)


@parametrize_kernels
def test_clients_must_be_1d(kernel, data, V):
    with pytest.raises(ValueError, match="clients"):
        kernel(V, data, [[0, 1]])


@parametrize_kernels
def test_item_id_beyond_item_factors(kernel, V):
    # The data claims 6 items but holds id 9: the native core rejects it (an IndexError
    # naming the item id, as for every out-of-range id from the core).
    bad = csr([0, 2, 3], [1, 9, 2], [3.0, 4.0, 5.0], NUM_ITEMS)
    with pytest.raises(IndexError, match="item id 9"):
        kernel(V, bad)
    # Only the sampled clients are read: client 1 gives what it gives beside a valid client 0.
    good = csr([0, 2, 3], [1, 4, 2], [3.0, 4.0, 5.0], NUM_ITEMS)
    assert_same_result(kernel(V, bad, [1]), kernel(V, good, [1]))


@parametrize_kernels
def test_data_must_look_like_client_data(kernel, V):
    with pytest.raises(TypeError, match="data"):
        kernel(V, np.zeros((3, 3)))


@parametrize_kernels
def test_config_must_be_a_client_config(kernel, data, V):
    with pytest.raises(TypeError, match="config"):
        kernel(V, data, None, {"batch_size": 5})


@parametrize_kernels
@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("seed", -1, ValueError),
        ("seed", 1.5, TypeError),
        ("round", -2, ValueError),
        ("num_threads", -1, ValueError),
        ("global_mean", np.nan, ValueError),
        ("global_mean", "3", TypeError),
    ],
)
def test_scalar_arguments(kernel, data, V, name, value, error):
    with pytest.raises(error, match=name):
        kernel(V, data, **{name: value})


def test_check_finite_false_lets_non_finite_values_through(data, V):
    # Without the check, NaN rows make every client that touches them non-finite (weight 0).
    V[:] = np.nan
    out = train_round(V, data, None, ClientConfig(batch_size=1), check_finite=False)
    reporting = out.client_stats["status"] != 2
    assert reporting.any()
    assert np.all(out.client_stats["status"][reporting] == 1)
    assert out.summary["num_nonfinite"] == reporting.sum()
    assert not out.delta.any()


# ------------------------------------------------------------------------------- ClientConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("batch_size", -3),
        ("split", "even-odd"),
        ("recon", "newton"),
        ("init", "normal"),
        ("weighting", "size"),
        ("support_fraction", 1.5),
        ("support_fraction", -0.1),
        ("init_scale", -0.05),
        ("recon_epochs", -1),
        ("update_epochs", -1),
        ("recon_steps_max", 0),
        ("update_steps_max", -5),
        ("recon_lr", -0.1),
        ("client_lr", -1e-3),
        ("client_lr", np.inf),
        ("recon_lr", np.nan),
        ("recon_l2", -1.0),
        ("update_l2", -0.5),
        ("ridge", 0.0),
        ("ridge", -1.0),
    ],
)
def test_client_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ClientConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 2.5),
        ("batch_size", True),
        ("recon_epochs", "3"),
        ("client_lr", "0.1"),
        ("reshuffle", 1),
        ("joint", "yes"),
    ],
)
def test_client_config_rejects_bad_types(field, value):
    with pytest.raises(TypeError, match=field):
        ClientConfig(**{field: value})


def test_client_config_accepts_boundaries():
    config = ClientConfig(
        batch_size=1,
        support_fraction=0.0,
        init_scale=0.0,
        recon_epochs=0,
        update_epochs=0,
        recon_lr=0.0,
        client_lr=0.0,
        recon_steps_max=1,
        ridge=1e-6,
    )
    native = client_config(config)
    assert (native.batch_size, native.recon_steps_max, native.update_steps_max) == (1, 1, 0)


# ------------------------------------------------------------------------------- private _core


def core_args(**changes):
    """Arguments of a valid direct ``_core`` call, with some replaced."""
    args = dict(
        item_factors=np.ones((4, 2), dtype=np.float32),
        item_bias=None,
        global_mean=0.0,
        indptr=np.array([0, 2, 5], dtype=np.int64),
        items=np.array([0, 1, 2, 3, 1], dtype=np.int32),
        ratings=np.array([1, 2, 3, 4, 5], dtype=np.float32),
        clients=np.array([0, 1], dtype=np.int64),
        config=client_config(ClientConfig(batch_size=1)),
        seed=0,
        round=0,
        num_threads=2,
    )
    args.update(changes)
    return args


CORE_FUNCTIONS = [
    _core.train_round,
    _core.client_updates,
    _core.reconstruct_users,
    _core.evaluate_users,
    _core.infer_users,
    functools.partial(_core.recommend_users, k=3),
]
parametrize_core = pytest.mark.parametrize("fn", CORE_FUNCTIONS, ids=kernel_ids)


@parametrize_core
def test_core_valid_call_runs(fn):
    # The baseline the core tests perturb: a result for each of the 2 clients, the same again.
    out = fn(**core_args())
    arrays = result_arrays(out)
    assert arrays and any(a.ndim and a.shape[0] == 2 for a in arrays)
    assert_same_result(out, fn(**core_args()))


def _native_config(**fields):
    c = client_config(ClientConfig())
    for name, value in fields.items():
        setattr(c, name, value)
    return c


@parametrize_core
@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"ratings": np.ones(4, dtype=np.float32)}, ValueError, "items and ratings"),
        ({"indptr": np.array([0, 2, 4], dtype=np.int64)}, ValueError, "indptr"),
        ({"indptr": np.array([0, 2, 6], dtype=np.int64)}, ValueError, "indptr"),
        ({"indptr": np.array([1, 2, 5], dtype=np.int64)}, ValueError, "indptr"),
        ({"indptr": np.array([0, 6, 5], dtype=np.int64)}, ValueError, "indptr"),
        ({"indptr": np.zeros(0, dtype=np.int64)}, ValueError, "indptr"),
        ({"indptr": np.zeros((1, 3), dtype=np.int64)}, ValueError, "indptr"),
        ({"items": np.array([0, 1, 2, 4, 1], dtype=np.int32)}, IndexError, "item id 4"),
        ({"items": np.array([0, -1, 2, 3, 1], dtype=np.int32)}, IndexError, "item id -1"),
        ({"clients": np.array([0, 2], dtype=np.int64)}, IndexError, "client id 2"),
        ({"clients": np.array([-1], dtype=np.int64)}, IndexError, "client id -1"),
        ({"clients": np.zeros((1, 1), dtype=np.int64)}, ValueError, "clients"),
        ({"item_factors": np.ones((4, 0), dtype=np.float32)}, ValueError, "item_factors"),
        ({"item_factors": np.ones(4, dtype=np.float32)}, ValueError, "item_factors"),
        ({"item_bias": np.ones(3, dtype=np.float32)}, ValueError, "item_bias"),
        ({"config": _native_config(batch_size=0)}, ValueError, "batch_size"),
        ({"config": _native_config(split=3)}, ValueError, "split"),
        ({"config": _native_config(recon=-1)}, ValueError, "recon"),
        ({"config": _native_config(recon=1, ridge=0.0)}, ValueError, "ridge"),
        ({"config": _native_config(client_lr=-1.0)}, ValueError, "client_lr"),
        ({"config": _native_config(support_fraction=2.0)}, ValueError, "support_fraction"),
        # The bindings never convert: wrong dtypes or layouts are refused. (pybind11's message
        # lists the whole signature, so it cannot single out the argument.)
        ({"item_factors": np.ones((4, 2))}, TypeError, "incompatible function arguments"),
        ({"item_factors": np.ones((2, 4), dtype=np.float32).T}, TypeError, "incompatible function arguments"),
        ({"items": np.array([0, 1, 2, 3, 1], dtype=np.int64)}, TypeError, "incompatible function arguments"),
        ({"indptr": np.array([0, 2, 5], dtype=np.int32)}, TypeError, "incompatible function arguments"),
        ({"clients": [0, 1]}, TypeError, "incompatible function arguments"),
    ],
    ids=lambda x: None if isinstance(x, (dict, type)) else str(x),
)
def test_core_rejects_inconsistent_arrays(fn, changes, error, match):
    with pytest.raises(error, match=match):
        fn(**core_args(**changes))


# A sampled client whose indptr entries lie outside [0, nnz] (while indptr itself starts at 0,
# ends at nnz and is non-decreasing at that client) makes the core read outside `items`.
# Run in a subprocess so that a crash fails this test only.
_OUT_OF_BOUNDS_INDPTR = {
    "beyond-nnz": ("[0, 1000000, 5]", "[0]"),
    "negative": ("[0, -(10**12), 5]", "[1]"),  # once a segfault: run in a subprocess
}


@pytest.mark.parametrize("case", list(_OUT_OF_BOUNDS_INDPTR))
def test_core_rejects_indptr_outside_the_ratings(case):
    indptr, clients = _OUT_OF_BOUNDS_INDPTR[case]
    code = textwrap.dedent(f"""
        import numpy as np
        from fedrecon_fast._native import core as _core
        from fedrecon_fast._native.structs import client_config
        from fedrecon_fast.config import ClientConfig
        try:
            _core.evaluate_users(
                np.ones((4, 2), np.float32), None, 0.0, np.array({indptr}, np.int64),
                np.zeros(5, np.int32), np.ones(5, np.float32), np.array({clients}, np.int64),
                client_config(ClientConfig(batch_size=1)), 0, 0, 1)
        except ValueError as e:
            print("ValueError:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ValueError:") and "indptr" in proc.stdout


# ------------------------------------------------------------------------------- stored users

STATEFUL_KERNELS = [train_round, client_updates]
parametrize_stateful = pytest.mark.parametrize("kernel", STATEFUL_KERNELS, ids=[k.__name__ for k in STATEFUL_KERNELS])
COHORT = [0, 2, 3]


@parametrize_stateful
@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "bias"])
def test_valid_stateful_call_runs(kernel, data, V, biases):
    # The baseline of the tests below: users may be any real array-like (converted once).
    kw = dict(item_bias=np.zeros(NUM_ITEMS), user_bias=[0.0, 1, 2]) if biases else {}
    out = kernel(V, data, COHORT, ClientConfig(), users=np.ones((3, DIM), dtype=np.float64), **kw)
    assert out.users.shape == (3, DIM) and out.users.dtype == np.float32
    assert (out.user_bias is not None) == biases


@parametrize_stateful
@pytest.mark.parametrize(
    "shape",
    [(2, DIM), (4, DIM), (3, DIM + 1), (3, DIM - 1), (3,), (3 * DIM,), (3, DIM, 1), ()],
    ids=["fewer-rows", "more-rows", "wide", "narrow", "1d", "flat", "3d", "0d"],
)
def test_users_shape(kernel, data, V, shape):
    with pytest.raises(ValueError, match="users"):
        kernel(V, data, COHORT, users=np.zeros(shape, dtype=np.float32))


@parametrize_stateful
def test_users_rows_follow_the_default_cohort(kernel, data, V):
    # clients=None samples every client: users needs one row per client of data.
    assert kernel(V, data, users=np.zeros((data.num_clients, DIM))).users.shape == (data.num_clients, DIM)
    with pytest.raises(ValueError, match="users"):
        kernel(V, data, users=np.zeros((3, DIM)))


@parametrize_stateful
@pytest.mark.parametrize(
    "bad",
    [
        np.ones((3, DIM), dtype=np.complex64),
        np.full((3, DIM), None, dtype=object),
        np.full((3, DIM), "a"),
        np.ones((3, DIM), dtype=bool),
    ],
    ids=["complex", "object", "str", "bool"],
)
def test_users_dtype(kernel, data, V, bad):
    with pytest.raises(TypeError, match="users"):
        kernel(V, data, COHORT, users=bad)


@parametrize_stateful
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_users_not_finite(kernel, data, V, value):
    users = np.zeros((3, DIM), dtype=np.float32)
    users[1, 2] = value
    with pytest.raises(ValueError, match="users"):
        kernel(V, data, COHORT, users=users)


@parametrize_stateful
@pytest.mark.parametrize(
    "kw",
    [
        dict(users=np.zeros((3, DIM)), user_bias=np.zeros(3)),  # user_bias without item_bias
        dict(users=np.zeros((3, DIM)), item_bias=np.zeros(NUM_ITEMS)),  # item_bias without user_bias
        dict(user_bias=np.zeros(3)),  # user_bias without users
        dict(user_bias=np.zeros(3), item_bias=np.zeros(NUM_ITEMS)),
    ],
    ids=["no-item-bias", "no-user-bias", "no-users", "no-users-with-item-bias"],
)
def test_user_bias_goes_with_item_bias_and_users(kernel, data, V, kw):
    with pytest.raises(ValueError, match="user_bias"):
        kernel(V, data, COHORT, **kw)


@parametrize_stateful
@pytest.mark.parametrize(
    ("bias", "error"),
    [
        (np.zeros(2), ValueError),
        (np.zeros(4), ValueError),
        (np.zeros((3, 1)), ValueError),
        (np.array([0.0, np.nan, 0.0]), ValueError),
        (np.zeros(3, dtype=complex), TypeError),
    ],
    ids=["short", "long", "2d", "nan", "complex"],
)
def test_user_bias_values(kernel, data, V, bias, error):
    with pytest.raises(error, match="user_bias"):
        kernel(V, data, COHORT, item_bias=np.zeros(NUM_ITEMS), users=np.zeros((3, DIM)), user_bias=bias)


CORE_STATEFUL = [_core.train_round, _core.client_updates]


@pytest.mark.parametrize("fn", CORE_STATEFUL, ids=["train_round", "client_updates"])
@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"users": np.zeros((3, 2), dtype=np.float32)}, ValueError, "users"),
        ({"users": np.zeros((2, 3), dtype=np.float32)}, ValueError, "users"),
        ({"users": np.zeros(4, dtype=np.float32)}, ValueError, "users"),
        (
            {"users": np.zeros((2, 2), dtype=np.float32), "user_bias": np.zeros(2, dtype=np.float32)},
            ValueError,
            "user_bias",
        ),
        ({"user_bias": np.zeros(2, dtype=np.float32)}, ValueError, "user_bias"),
        (
            {"users": np.zeros((2, 2), dtype=np.float32), "item_bias": np.zeros(4, dtype=np.float32)},
            ValueError,
            "user_bias",
        ),
        (
            {
                "users": np.zeros((2, 2), dtype=np.float32),
                "item_bias": np.zeros(4, dtype=np.float32),
                "user_bias": np.zeros(3, dtype=np.float32),
            },
            ValueError,
            "user_bias",
        ),
        (
            {
                "users": np.zeros((2, 2), dtype=np.float32),
                "item_bias": np.zeros(4, dtype=np.float32),
                "user_bias": np.zeros((2, 1), dtype=np.float32),
            },
            ValueError,
            "user_bias",
        ),
        ({"users": np.zeros((2, 2))}, TypeError, "incompatible function arguments"),
        ({"users": np.zeros((2, 4), dtype=np.float32)[:, ::2]}, TypeError, "incompatible function arguments"),
    ],
    ids=[
        "rows",
        "cols",
        "1d",
        "bias-without-item-bias",
        "bias-without-users",
        "missing-bias",
        "bias-length",
        "bias-2d",
        "float64",
        "strided",
    ],
)
def test_core_rejects_bad_user_state(fn, changes, error, match):
    with pytest.raises(error, match=match):
        fn(**core_args(**changes))


@pytest.mark.parametrize("fn", CORE_STATEFUL, ids=["train_round", "client_updates"])
def test_core_user_state_round_trip(fn):
    users = np.arange(4, dtype=np.float32).reshape(2, 2)
    out = fn(**core_args(users=users, config=_native_config(batch_size=1, recon_epochs=0)))
    final = out[4] if isinstance(out, tuple) else out["users"]
    assert final.shape == (2, 2) and final.dtype == np.float32
    # No reconstruction steps, no joint training: the stored rows come back, in a new array.
    assert np.array_equal(final, users) and final is not users
    assert np.array_equal(users, np.arange(4, dtype=np.float32).reshape(2, 2))  # input not written
