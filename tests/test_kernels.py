"""Native cohort kernels against the NumPy reference (tests/reference.py), plus determinism,
client-order independence, non-finite handling and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import reference as ref
from conftest import csr, random_client_data
from fedrecon_fast.config import ClientConfig
from fedrecon_fast.kernels import (
    client_updates,
    derive_seed,
    evaluate_users,
    reconstruct_users,
    train_round,
)

# float32 tolerances: native and reference differ only in float32 rounding and summation
# order (Eigen's vectorised dot products vs NumPy's), observed up to ~2e-7 absolute.
RTOL, ATOL = 1e-4, 1e-5
# float64 sums of float32 squared errors. An error r_hat - r of a rating near 3 carries ~3e-7
# absolute rounding, so a tiny squared error is only good to ~1e-6 absolute.
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6

# Configuration cases: (ClientConfig overrides, with biases?, global mean). Learning rates are
# kept <= 0.2: with the data scale of make_problem, SGD then stays stable even when every
# rating hits the same row (num_items 1, dim 1, batch 1). A diverging run amplifies float32
# rounding exponentially and cannot be compared (test_nonfinite_* covers divergence).
CASES = {
    "default": ({}, False, 0.0),
    "global-mean": ({"client_lr": 0.2}, False, 3.0),
    "batches-reshuffle": ({"reshuffle": True, "recon_lr": 0.2}, False, 0.0),
    "random": ({"split": "random"}, False, 0.0),
    "random-0.3-reshuffle": ({"split": "random", "support_fraction": 0.3, "reshuffle": True}, True, 3.0),
    "random-0.0": ({"split": "random", "support_fraction": 0.0}, False, 0.0),
    "random-1.0": ({"split": "random", "support_fraction": 1.0}, False, 0.0),
    "reuse": ({"split": "reuse", "init_scale": 0.5}, False, 0.0),
    "reuse-reshuffle-bias": ({"split": "reuse", "reshuffle": True}, True, 3.0),
    "exact": ({"recon": "exact", "ridge": 0.5, "client_lr": 0.2}, False, 0.0),
    "exact-bias": ({"recon": "exact", "ridge": 2.0}, True, 3.0),
    "exact-random": ({"recon": "exact", "split": "random", "support_fraction": 0.6}, True, 2.5),
    "sgd-bias": ({"recon_lr": 0.2, "client_lr": 0.2}, True, 3.0),
    "zeros-init": ({"init": "zeros", "recon_epochs": 2}, False, 0.0),
    "epochs-and-caps": (
        {"recon_epochs": 5, "recon_steps_max": 7, "update_epochs": 3, "update_steps_max": 4, "init_scale": 0.3},
        False,
        0.0,
    ),
    "update-cap-1": ({"update_steps_max": 1, "update_epochs": 2}, True, 3.0),
    "many-epochs": ({"recon_epochs": 4, "update_epochs": 4, "recon_lr": 0.05, "client_lr": 0.05}, True, 3.0),
    "l2": ({"recon_l2": 0.1, "update_l2": 0.05, "update_epochs": 2}, False, 0.0),
    "joint": ({"joint": True, "update_epochs": 2, "init_scale": 0.3}, False, 0.0),
    "joint-l2-bias": ({"joint": True, "update_l2": 0.05, "recon_l2": 0.02, "update_epochs": 2}, True, 3.0),
    "uniform-weighting": ({"weighting": "uniform", "split": "random"}, True, 3.0),
    "no-update-steps": ({"update_epochs": 0}, False, 0.0),
    "no-recon-steps": ({"recon_epochs": 0, "init_scale": 0.4}, False, 0.0),
    "client-lr-0": ({"client_lr": 0.0, "recon": "exact"}, False, 0.0),
}

# (num_items, dim, batch_size, num_threads); batch 64 is larger than every client.
SHAPES = [
    pytest.param(1, 1, 1, 1, id="I1-K1-b1-t1"),
    pytest.param(7, 3, 2, 2, id="I7-K3-b2-t2"),
    pytest.param(30, 16, 5, 3, id="I30-K16-b5-t3"),
    pytest.param(50, 50, 64, 2, id="I50-K50-b64-t2"),
    # Rows past 128 floats take the kernels' dynamic-size path.
    pytest.param(40, 130, 3, 2, id="I40-K130-b3-t2"),
]


def make_problem(case: str, num_items: int, dim: int, batch_size: int, seed: int = 0, cases=CASES):
    """Random data, V, item biases and config for a case of ``cases``; all seeded from the
    arguments.

    Ratings are ``global_mean + U(-1, 1)`` and rows of V have norms in [0.5, 1.5], so the
    reconstructed ``|u|`` stays below ~2 and the learning rates of CASES are stable.
    """
    overrides, biases, global_mean = cases[case]
    rng = np.random.default_rng([seed % 2**32, num_items, dim, batch_size, sorted(cases).index(case)])
    data = random_client_data(rng, num_items, rating_range=(global_mean - 1.0, global_mean + 1.0))
    V = rng.normal(size=(num_items, dim))
    V *= rng.uniform(0.5, 1.5, size=(num_items, 1)) / np.linalg.norm(V, axis=1, keepdims=True)
    V = V.astype(np.float32)
    item_bias = rng.normal(0.0, 0.2, size=num_items).astype(np.float32) if biases else None
    config = ClientConfig(batch_size=batch_size, **overrides)
    # A sample of clients in a scrambled order, one of them twice.
    clients = rng.permutation(data.num_clients)[: data.num_clients - 2]
    clients = np.append(clients, clients[0])
    kwargs = dict(item_bias=item_bias, global_mean=global_mean, seed=seed, round=3)
    return V, data, clients, config, kwargs


def assert_stats_match(native: dict, expected: dict) -> None:
    """Per-client stats: counts, weights and statuses exact, loss up to float rounding."""
    for name in ("weight", "num_examples", "num_correct", "rows", "status"):
        assert native[name].dtype == expected[name].dtype, name
        assert_array_equal(native[name], expected[name], err_msg=name)
    assert_allclose(native["loss_sum"], expected["loss_sum"], rtol=LOSS_RTOL, atol=LOSS_ATOL)


# ------------------------------------------------------------------------------- RNG


@pytest.mark.parametrize(
    "args",
    [
        (0, 0, 0, 0),
        (1, 2, 3, 4),
        (42, 7, 123456, 1),
        (2**64 - 1, 2**63, 2**32 + 5, 3),
        (-1, 0, -7, 2),
        (2**70 + 9, 5, 0, 0),
    ],
)
def test_derive_seed_matches_reference(args):
    assert derive_seed(*args) == ref.derive_seed(*args)


def test_reference_splitmix64_known_values():
    # Published SplitMix64 outputs for state 0 (Vigna's reference implementation).
    rng = ref.Rng(0)
    assert [rng.next() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_reference_rng_ranges():
    rng = ref.Rng(123)
    u = np.array([rng.uniform01() for _ in range(2000)])
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.03
    b = np.array([rng.below(7) for _ in range(2000)])
    assert set(b.tolist()) == set(range(7))
    assert sorted(ref.fisher_yates(50, ref.Rng(9)).tolist()) == list(range(50))


@pytest.mark.parametrize("init", ["uniform", "zeros"])
@pytest.mark.parametrize("dim", [1, 3, 16, 50])
def test_initial_user_is_bit_exact(init, dim):
    # No reconstruction steps: u is exactly the initial draw of stream kStreamInit.
    rng = np.random.default_rng(dim)
    data = random_client_data(rng, 5, (0, 1, 4, 9))
    V = rng.normal(size=(5, dim)).astype(np.float32)
    config = ClientConfig(recon_epochs=0, init=init, init_scale=0.7)
    clients = np.array([3, 0, 2, 1])
    users, user_bias = reconstruct_users(V, data, clients, config, seed=11, round=4, num_threads=2)
    expected = np.stack([ref.init_user(dim, config, 11, 4, int(c)) for c in clients])
    assert user_bias is None
    assert_array_equal(users, expected)
    if init == "uniform":
        assert np.all(np.abs(users) < 0.7) and len(np.unique(users)) == users.size


# ------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("seed", [0, 2**63 + 12345])
@pytest.mark.parametrize(("num_items", "dim", "batch_size", "num_threads"), SHAPES)
@pytest.mark.parametrize("case", list(CASES))
def test_train_round_matches_reference(case, num_items, dim, batch_size, num_threads, seed):
    V, data, clients, config, kwargs = make_problem(case, num_items, dim, batch_size, seed)

    out = train_round(V, data, clients, config, num_threads=num_threads, **kwargs)
    delta, delta_bias, stats, summary = ref.train_round(V, data, clients, config, **kwargs)

    assert out.delta.dtype == np.float32 and out.delta.shape == V.shape
    assert_allclose(out.delta, delta, rtol=RTOL, atol=ATOL)
    if delta_bias is None:
        assert out.delta_bias is None
    else:
        assert out.delta_bias.dtype == np.float32
        assert_allclose(out.delta_bias, delta_bias, rtol=RTOL, atol=ATOL)
    assert_stats_match(out.client_stats, stats)
    assert set(out.summary) == set(summary)
    for name, value in summary.items():
        if isinstance(value, float):
            assert out.summary[name] == pytest.approx(value, rel=LOSS_RTOL, abs=LOSS_ATOL), name
        else:
            assert out.summary[name] == value, name
    # Untouched rows are exactly zero.
    untouched = np.ones(num_items, dtype=bool)
    for c in clients:
        untouched[data.items[data.indptr[c] : data.indptr[c + 1]]] = False
    assert not out.delta[untouched].any()


@pytest.mark.parametrize(("num_items", "dim", "batch_size", "num_threads"), SHAPES)
@pytest.mark.parametrize("case", list(CASES))
def test_client_updates_match_reference(case, num_items, dim, batch_size, num_threads):
    V, data, clients, config, kwargs = make_problem(case, num_items, dim, batch_size, seed=5)

    out = client_updates(V, data, clients, config, num_threads=num_threads, **kwargs)
    expected = ref.client_updates(V, data, clients, config, **kwargs)

    assert len(out) == len(clients)
    sizes = [len(r.rows) for r in expected]
    assert_array_equal(out.offsets, np.concatenate([[0], np.cumsum(sizes)]))
    assert out.rows.dtype == np.int32 and out.values.dtype == np.float32
    assert out.values.shape == (sum(sizes), dim)
    for k, r in enumerate(expected):
        rows, values, bias_values = out.client(k)
        assert_array_equal(rows, r.rows)  # same rows in the same (first-use) order
        assert_allclose(values, r.delta, rtol=RTOL, atol=ATOL)
        if r.bias_delta is None:
            assert bias_values is None
        else:
            assert_allclose(bias_values, r.bias_delta, rtol=RTOL, atol=ATOL)
    stats = ref._stats_columns([r.stats for r in expected])
    assert_stats_match(out.client_stats, stats)
    assert_array_equal(out.weights, stats["weight"])


@pytest.mark.parametrize(("num_items", "dim", "batch_size", "num_threads"), SHAPES)
@pytest.mark.parametrize("case", list(CASES))
def test_reconstruct_users_matches_reference(case, num_items, dim, batch_size, num_threads):
    V, data, clients, config, kwargs = make_problem(case, num_items, dim, batch_size, seed=9)

    users, user_bias = reconstruct_users(V, data, clients, config, num_threads=num_threads, **kwargs)
    expected_users, expected_bias = ref.reconstruct_users(V, data, clients, config, **kwargs)

    assert users.dtype == np.float32 and users.shape == (len(clients), dim)
    assert_allclose(users, expected_users, rtol=RTOL, atol=ATOL)
    if expected_bias is None:
        assert user_bias is None
    else:
        assert user_bias.dtype == np.float32
        assert_allclose(user_bias, expected_bias, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("num_items", "dim", "batch_size", "num_threads"), SHAPES)
@pytest.mark.parametrize("case", list(CASES))
def test_evaluate_users_matches_reference(case, num_items, dim, batch_size, num_threads):
    V, data, clients, config, kwargs = make_problem(case, num_items, dim, batch_size, seed=13)

    out = evaluate_users(V, data, clients, config, num_threads=num_threads, **kwargs)
    expected = ref.evaluate_users(V, data, clients, config, **kwargs)

    assert_array_equal(out["num_examples"], expected["num_examples"])
    assert_array_equal(out["num_correct"], expected["num_correct"])
    assert_allclose(out["sq_err_sum"], expected["sq_err_sum"], rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert_allclose(out["abs_err_sum"], expected["abs_err_sum"], rtol=LOSS_RTOL, atol=LOSS_ATOL)


# ------------------------------------------------------------------------------- properties


def _big_problem():
    """Many clients and > 64 touched rows, so threads and reduction blocks both matter."""
    rng = np.random.default_rng(2024)
    sizes = rng.integers(0, 60, size=300)
    data = random_client_data(rng, 400, sizes)
    V = rng.normal(0.0, 0.3, size=(400, 8)).astype(np.float32)
    item_bias = rng.normal(0.0, 0.2, size=400).astype(np.float32)
    clients = rng.permutation(300)[:250]
    return V, data, clients, item_bias


@pytest.mark.parametrize(
    "config",
    [
        ClientConfig(),
        ClientConfig(split="random", reshuffle=True, joint=True, update_l2=0.01),
        ClientConfig(recon="exact", update_epochs=2, update_steps_max=5),
    ],
    ids=["default", "random-joint", "exact"],
)
def test_bit_identical_for_any_thread_count(config):
    V, data, clients, item_bias = _big_problem()
    kw = dict(item_bias=item_bias, global_mean=3.0, seed=77, round=1)
    rounds = [train_round(V, data, clients, config, num_threads=t, **kw) for t in (1, 2, 4)]
    updates = [client_updates(V, data, clients, config, num_threads=t, **kw) for t in (1, 2, 4)]
    users = [reconstruct_users(V, data, clients, config, num_threads=t, **kw) for t in (1, 2, 4)]
    evals = [evaluate_users(V, data, clients, config, num_threads=t, **kw) for t in (1, 2, 4)]

    assert rounds[0].summary["rows_aggregated"] > 64
    for r in rounds[1:]:
        assert np.array_equal(r.delta, rounds[0].delta)
        assert np.array_equal(r.delta_bias, rounds[0].delta_bias)
        assert r.summary == rounds[0].summary
        for name, column in rounds[0].client_stats.items():
            assert np.array_equal(r.client_stats[name], column), name
    for u in updates[1:]:
        assert np.array_equal(u.offsets, updates[0].offsets)
        assert np.array_equal(u.rows, updates[0].rows)
        assert np.array_equal(u.values, updates[0].values)
        assert np.array_equal(u.bias_values, updates[0].bias_values)
    for u, b in users[1:]:
        assert np.array_equal(u, users[0][0]) and np.array_equal(b, users[0][1])
    for e in evals[1:]:
        for name, column in evals[0].items():
            assert np.array_equal(e[name], column), name


def test_client_order_does_not_change_per_client_updates():
    V, data, clients, item_bias = _big_problem()
    config = ClientConfig(split="random", reshuffle=True, joint=True)
    kw = dict(item_bias=item_bias, global_mean=3.0, seed=3, round=8, num_threads=3)
    order = np.random.default_rng(1).permutation(len(clients))

    a = client_updates(V, data, clients, config, **kw)
    b = client_updates(V, data, clients[order], config, **kw)

    for j, k in enumerate(order):
        rows_a, values_a, bias_a = a.client(k)
        rows_b, values_b, bias_b = b.client(j)
        assert np.array_equal(rows_a, rows_b)
        assert np.array_equal(values_a, values_b)
        assert np.array_equal(bias_a, bias_b)
    for name, column in a.client_stats.items():
        assert np.array_equal(b.client_stats[name], column[order]), name
    # The aggregate only changes by the float64 summation order.
    ra = train_round(V, data, clients, config, **kw)
    rb = train_round(V, data, clients[order], config, **kw)
    assert_allclose(rb.delta, ra.delta, rtol=1e-6, atol=1e-9)
    assert rb.summary["rows_aggregated"] == ra.summary["rows_aggregated"]


def test_nonfinite_client_gets_weight_zero():
    # batch_size 1, split "batches": client 0 runs two query steps on the same row (item 1),
    # client 1 one step (item 3), client 2 none. With lr 1e30 the first step moves a row to
    # ~1e30 and the second step on it overflows to inf; a single step stays finite.
    data = csr([0, 4, 6, 7], [0, 1, 0, 1, 2, 3, 4], [3.0, 4.0, 2.0, 5.0, 1.0, 3.0, 2.0], 6)
    rng = np.random.default_rng(1)
    V = rng.normal(0.0, 0.5, size=(6, 4)).astype(np.float32)
    config = ClientConfig(batch_size=1, client_lr=1e30, init_scale=0.5)

    out = train_round(V, data, None, config, seed=1, num_threads=2)
    delta, _, stats, summary = ref.train_round(V, data, None, config, seed=1)

    assert_array_equal(out.client_stats["status"], [1, 0, 2])
    assert_array_equal(out.client_stats["weight"], [0.0, 1.0, 0.0])
    assert_array_equal(out.client_stats["rows"], [0, 1, 0])
    assert_array_equal(out.client_stats["num_examples"], [2, 1, 0])
    assert out.summary["num_nonfinite"] == 1
    assert out.summary["num_reporting"] == 1
    assert out.summary["total_weight"] == 1.0
    assert np.isfinite(out.delta).all()
    assert_stats_match(out.client_stats, stats)
    # The dropped client's (finite, huge) loss and its examples still count in the summary.
    for name, value in summary.items():
        assert out.summary[name] == pytest.approx(value, rel=LOSS_RTOL), name
    # Only client 1's single row moved, by client 1's own update (weight 1 of 1).
    assert np.count_nonzero(out.delta.any(axis=1)) == 1
    assert_allclose(out.delta, delta, rtol=RTOL)
    updates = client_updates(V, data, None, config, seed=1)
    assert_array_equal(updates.offsets, [0, 0, 1, 1])
    assert_array_equal(updates.weights, [0.0, 1.0, 0.0])


@pytest.mark.parametrize(
    ("sizes", "config", "clients"),
    [
        ((3, 7, 12), ClientConfig(update_epochs=0), None),
        ((0, 1, 1, 0), ClientConfig(batch_size=2), None),  # no client has a query batch
        ((3, 7, 12), ClientConfig(), []),  # empty cohort
    ],
    ids=["no-update-epochs", "no-query-data", "empty-cohort"],
)
def test_round_without_reports_returns_zero_delta(sizes, config, clients):
    data = random_client_data(np.random.default_rng(4), 9, sizes)
    V = np.random.default_rng(5).normal(size=(9, 3)).astype(np.float32)
    bias = np.ones(9, dtype=np.float32)

    out = train_round(V, data, clients, config, item_bias=bias, global_mean=3.0, num_threads=2)

    assert out.delta.shape == (9, 3) and not out.delta.any()
    assert out.delta_bias.shape == (9,) and not out.delta_bias.any()
    assert out.summary["total_weight"] == 0.0
    assert out.summary["num_reporting"] == 0
    assert out.summary["rows_aggregated"] == 0
    assert np.all(out.client_stats["status"] == 2)
    assert len(out.client_stats["status"]) == (data.num_clients if clients is None else len(clients))


# ------------------------------------------------------------------------------- hand checks


def test_batches_split_and_step_cap_pick_the_touched_rows():
    # batch_size 2 over items 0..8: batches [0,1] [2,3] [4,5] [6,7] [8]; odd batches are the
    # query set; a cap of one update step touches only the first query batch.
    data = csr([0, 9], range(9), [3.0] * 9, 9)
    V = np.full((9, 2), 0.5, dtype=np.float32)
    full = client_updates(V, data, None, ClientConfig(batch_size=2))
    capped = client_updates(V, data, None, ClientConfig(batch_size=2, update_steps_max=1))
    assert_array_equal(full.rows, [2, 3, 6, 7])
    assert_array_equal(capped.rows, [2, 3])
    # The weight counts the whole query set, not only the executed steps.
    assert capped.weights[0] == 4.0 and capped.client_stats["num_examples"][0] == 2


def test_one_step_by_hand():
    # Exact reconstruction on the support rating (item 0, v = 1, r = 2, ridge 1):
    # u = 1 * 2 / (1 + 1) = 1. Query rating (item 1, v = 0.5, r = 3): err = 0.5 - 3 = -2.5,
    # and one SGD step with lr 0.1 on the batch MSE gives Δv = -0.1 * 2 * err * u = 0.5.
    data = csr([0, 2], [0, 1], [2.0, 3.0], 3)
    V = np.array([[1.0], [0.5], [7.0]], dtype=np.float32)
    config = ClientConfig(batch_size=1, recon="exact", ridge=1.0, client_lr=0.1)
    out = train_round(V, data, None, config)
    assert_allclose(out.delta, [[0.0], [0.5], [0.0]], rtol=1e-6)
    assert out.client_stats["loss_sum"][0] == pytest.approx(6.25)
    assert out.summary["num_correct"] == 0
    users, _ = reconstruct_users(V, data, None, config)
    assert_allclose(users, [[1.0]], rtol=1e-6)
    ev = evaluate_users(V, data, None, config)
    assert ev["sq_err_sum"][0] == pytest.approx(6.25) and ev["num_examples"][0] == 1


# ------------------------------------------------------------------------------- stored users

# Stateful baselines pass each sampled client's stored u (and b_u) in and get the final values
# back. Same layout as CASES. FedAvg: no reconstruction, u trained jointly with V on all ratings.
STATEFUL_CASES = {
    "fedavg": ({"recon_epochs": 0, "split": "reuse", "joint": True}, False, 0.0),
    "fedavg-bias": ({"recon_epochs": 0, "split": "reuse", "joint": True, "client_lr": 0.2}, True, 3.0),
    "fedavg-l2-bias-epochs": (
        {"recon_epochs": 0, "split": "reuse", "joint": True, "reshuffle": True, "update_l2": 0.05, "update_epochs": 2},
        True,
        3.0,
    ),
    "fedavg-capped": (
        {"recon_epochs": 0, "split": "reuse", "joint": True, "update_epochs": 3, "update_steps_max": 4},
        False,
        2.0,
    ),
    # FedRecon from the stored u: SGD reconstruction starts at the stored row.
    "fedrecon-stored": ({}, False, 0.0),
    "fedrecon-stored-bias": ({"recon_epochs": 2, "recon_lr": 0.2}, True, 3.0),
    "fedrecon-stored-joint-random": (
        {"split": "random", "joint": True, "recon_l2": 0.02, "update_l2": 0.02},
        True,
        3.0,
    ),
    # Exact reconstruction ignores the stored u.
    "exact-stored-joint": ({"recon": "exact", "ridge": 0.5, "joint": True}, True, 3.0),
}


def make_stateful_problem(case: str, num_items: int, dim: int, batch_size: int, seed: int = 0):
    """:func:`make_problem` for STATEFUL_CASES, plus stored ``users`` (one row per sampled
    position; the client that is sampled twice gets two different rows) and ``user_bias``."""
    V, data, clients, config, kwargs = make_problem(case, num_items, dim, batch_size, seed, cases=STATEFUL_CASES)
    rng = np.random.default_rng([seed, dim, 99])
    kwargs["users"] = rng.normal(0.0, 0.3, size=(len(clients), dim)).astype(np.float32)
    if kwargs["item_bias"] is not None:
        kwargs["user_bias"] = rng.normal(0.0, 0.2, size=len(clients)).astype(np.float32)
    return V, data, clients, config, kwargs


def assert_users_match(users, user_bias, expected_users, expected_bias, dim):
    assert users.dtype == np.float32 and users.shape == (len(expected_users), dim)
    assert_allclose(users, expected_users, rtol=RTOL, atol=ATOL)
    if expected_bias is None:
        assert user_bias is None
    else:
        assert user_bias.dtype == np.float32 and user_bias.shape == expected_bias.shape
        assert_allclose(user_bias, expected_bias, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("num_items", "dim", "batch_size", "num_threads"), SHAPES)
@pytest.mark.parametrize("case", list(STATEFUL_CASES))
def test_stateful_train_round_matches_reference(case, num_items, dim, batch_size, num_threads):
    V, data, clients, config, kwargs = make_stateful_problem(case, num_items, dim, batch_size, seed=21)
    stored_users = kwargs["users"].copy()

    out = train_round(V, data, clients, config, num_threads=num_threads, **kwargs)
    delta, delta_bias, stats, summary, users, user_bias = ref.train_round(V, data, clients, config, **kwargs)

    assert_users_match(out.users, out.user_bias, users, user_bias, dim)
    assert_allclose(out.delta, delta, rtol=RTOL, atol=ATOL)
    if delta_bias is not None:
        assert_allclose(out.delta_bias, delta_bias, rtol=RTOL, atol=ATOL)
    assert_stats_match(out.client_stats, stats)
    for name, value in summary.items():
        assert out.summary[name] == pytest.approx(value, rel=LOSS_RTOL, abs=LOSS_ATOL), name
    assert_array_equal(kwargs["users"], stored_users)  # the input is not modified
    # The returned rows are really trained: every reporting client's u moved (joint) or was
    # reconstructed (SGD recon); with recon_epochs=0 a client without steps keeps its row.
    # (With batch 64 and split "batches" no client has query data, so none reports.)
    reporting = out.client_stats["weight"] > 0
    assert reporting.any() or (config.split == "batches" and batch_size == 64)
    if config.joint or config.recon_epochs > 0:
        assert np.all(np.any(out.users[reporting] != stored_users[reporting], axis=1))
    if config.recon == "sgd" and config.recon_epochs == 0:
        idle = out.client_stats["status"] == ref.STATUS_NO_QUERY
        assert_array_equal(out.users[idle], stored_users[idle])
        if out.user_bias is not None:
            assert_array_equal(out.user_bias[idle], kwargs["user_bias"][idle])


@pytest.mark.parametrize(("num_items", "dim", "batch_size", "num_threads"), SHAPES)
@pytest.mark.parametrize("case", list(STATEFUL_CASES))
def test_stateful_client_updates_match_reference(case, num_items, dim, batch_size, num_threads):
    V, data, clients, config, kwargs = make_stateful_problem(case, num_items, dim, batch_size, seed=22)

    out = client_updates(V, data, clients, config, num_threads=num_threads, **kwargs)
    expected = ref.client_updates(V, data, clients, config, **kwargs)
    users, user_bias = ref.final_users(expected, dim, kwargs["item_bias"] is not None)

    assert_users_match(out.users, out.user_bias, users, user_bias, dim)
    assert_array_equal(out.offsets, np.concatenate([[0], np.cumsum([len(r.rows) for r in expected])]))
    for k, r in enumerate(expected):
        rows, values, bias_values = out.client(k)
        assert_array_equal(rows, r.rows)
        assert_allclose(values, r.delta, rtol=RTOL, atol=ATOL)
        if r.bias_delta is not None:
            assert_allclose(bias_values, r.bias_delta, rtol=RTOL, atol=ATOL)
    assert_stats_match(out.client_stats, ref._stats_columns([r.stats for r in expected]))


@pytest.mark.parametrize("case", ["fedavg", "fedrecon-stored-bias", "fedavg-l2-bias-epochs"])
def test_stored_users_are_read_by_position(case):
    # The cohort samples one client twice (first and last position) with two different stored
    # rows: each position starts from its own row, so the two final rows differ.
    V, data, clients, config, kwargs = make_stateful_problem(case, 30, 4, 3, seed=23)
    assert clients[0] == clients[-1] and data.indptr[clients[0] + 1] > data.indptr[clients[0]]
    out = train_round(V, data, clients, config, num_threads=2, **kwargs)
    assert not np.array_equal(out.users[0], out.users[-1])
    # Swapping the two stored rows swaps the two results.
    swapped = kwargs["users"].copy()
    swapped[[0, -1]] = swapped[[-1, 0]]
    kw = dict(kwargs, users=swapped)
    if kwargs.get("user_bias") is not None:
        kw["user_bias"] = kwargs["user_bias"].copy()
        kw["user_bias"][[0, -1]] = kw["user_bias"][[-1, 0]]
    out2 = train_round(V, data, clients, config, num_threads=3, **kw)
    assert_array_equal(out2.users[[0, -1]], out.users[[-1, 0]])
    assert_array_equal(out2.users[1:-1], out.users[1:-1])


@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(
    "config",
    [
        ClientConfig(recon_epochs=0, split="reuse", joint=True, batch_size=4),
        ClientConfig(recon_epochs=0, split="reuse", joint=True, update_l2=0.01, reshuffle=True, update_epochs=2),
        ClientConfig(split="random", recon_epochs=2),
    ],
    ids=["fedavg", "fedavg-l2-reshuffle", "fedrecon-stored"],
)
def test_stateful_bit_identical_for_any_thread_count(config, biases):
    V, data, clients, item_bias = _big_problem()
    rng = np.random.default_rng(5)
    users = rng.normal(0.0, 0.1, size=(len(clients), V.shape[1])).astype(np.float32)
    kw = dict(
        item_bias=item_bias if biases else None,
        global_mean=3.0,
        seed=5,
        round=2,
        users=users,
        user_bias=rng.normal(0.0, 0.1, size=len(clients)).astype(np.float32) if biases else None,
    )
    rounds = [train_round(V, data, clients, config, num_threads=t, **kw) for t in (1, 2, 4)]
    updates = [client_updates(V, data, clients, config, num_threads=t, **kw) for t in (1, 2, 4)]

    assert rounds[0].users.shape == users.shape and not np.array_equal(rounds[0].users, users)
    assert (rounds[0].user_bias is not None) == biases
    for r in rounds[1:] + updates:
        assert np.array_equal(r.users, rounds[0].users)
        assert np.array_equal(r.user_bias, rounds[0].user_bias)
    for r in rounds[1:]:
        assert np.array_equal(r.delta, rounds[0].delta)
        assert r.summary == rounds[0].summary


def test_no_stored_users_gives_none():
    V, data, clients, config, kwargs = make_problem("sgd-bias", 7, 3, 2)
    out = train_round(V, data, clients, config, **kwargs)
    updates = client_updates(V, data, clients, config, **kwargs)
    assert out.users is None and out.user_bias is None
    assert updates.users is None and updates.user_bias is None
    # ... and the result is the one of the reference without stored users (a 4-tuple).
    delta, *_ = ref.train_round(V, data, clients, config, **kwargs)
    assert_allclose(out.delta, delta, rtol=RTOL, atol=ATOL)


def test_stored_users_are_the_starting_point_of_sgd_reconstruction():
    V, data, clients, config, kwargs = make_problem("default", 30, 4, 3, seed=1)
    users = np.random.default_rng(2).normal(0.0, 1.0, size=(len(clients), 4)).astype(np.float32)
    fresh = train_round(V, data, clients, config, **kwargs)
    stored = train_round(V, data, clients, config, users=users, **kwargs)
    assert not np.allclose(stored.delta, fresh.delta, rtol=1e-3, atol=1e-4)
    # Without reconstruction steps or joint training, the stored rows pass through unchanged.
    still = ClientConfig(batch_size=3, recon_epochs=0)
    out = train_round(V, data, clients, still, users=users, **kwargs)
    assert_array_equal(out.users, users)
    assert out.users is not users  # a new array
    # FedAvg: a client without ratings (no steps at all) keeps its stored row exactly, the
    # others train theirs jointly with V.
    fedavg = ClientConfig(batch_size=3, recon_epochs=0, split="reuse", joint=True)
    everyone = np.arange(data.num_clients)
    stored = np.random.default_rng(3).normal(0.0, 0.3, size=(data.num_clients, 4)).astype(np.float32)
    out = train_round(V, data, everyone, fedavg, users=stored, **kwargs)
    empty = np.diff(data.indptr) == 0
    assert empty.sum() == 2 and np.all(out.client_stats["status"][empty] == ref.STATUS_NO_QUERY)
    assert_array_equal(out.users[empty], stored[empty])
    assert np.all(np.any(out.users[~empty] != stored[~empty], axis=1))
    # And a zero stored u with zero-init and no steps equals the users=None round exactly.
    zeros = ClientConfig(batch_size=3, recon_epochs=0, init="zeros")
    a = train_round(V, data, clients, zeros, **kwargs)
    b = train_round(V, data, clients, zeros, users=np.zeros_like(users), **kwargs)
    assert_array_equal(a.delta, b.delta)


@pytest.mark.parametrize("joint", [False, True])
def test_exact_reconstruction_ignores_stored_users(joint):
    V, data, clients, config, kwargs = make_problem("exact-bias", 30, 4, 3, seed=2)
    config = ClientConfig(batch_size=3, recon="exact", ridge=2.0, joint=joint)
    rng = np.random.default_rng(3)
    users = rng.normal(0.0, 1.0, size=(len(clients), 4)).astype(np.float32)
    user_bias = rng.normal(0.0, 1.0, size=len(clients)).astype(np.float32)

    plain = train_round(V, data, clients, config, **kwargs)
    out = train_round(V, data, clients, config, users=users, user_bias=user_bias, **kwargs)

    assert_array_equal(out.delta, plain.delta)
    assert_array_equal(out.delta_bias, plain.delta_bias)
    if not joint:
        # The final u is the exact reconstruction itself.
        recon_u, recon_bu = reconstruct_users(V, data, clients, config, **kwargs)
        assert_array_equal(out.users, recon_u)
        assert_array_equal(out.user_bias, recon_bu)
    else:
        assert not np.allclose(out.users, users)


@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "bias"])
def test_diverging_client_returns_its_stored_user(biases):
    # The setting of test_nonfinite_client_gets_weight_zero, trained jointly: client 0 overflows
    # (status 1), client 1 takes one huge but finite step, client 2 has no query data.
    data = csr([0, 4, 6, 7], [0, 1, 0, 1, 2, 3, 4], [3.0, 4.0, 2.0, 5.0, 1.0, 3.0, 2.0], 6)
    rng = np.random.default_rng(1)
    V = rng.normal(0.0, 0.5, size=(6, 4)).astype(np.float32)
    users = rng.normal(0.0, 0.5, size=(3, 4)).astype(np.float32)
    kw = dict(seed=1, users=users)
    if biases:
        kw.update(
            item_bias=rng.normal(0.0, 0.1, size=6).astype(np.float32),
            global_mean=3.0,
            user_bias=np.array([0.25, -0.5, 0.125], dtype=np.float32),
        )
    config = ClientConfig(batch_size=1, client_lr=1e30, joint=True)

    out = train_round(V, data, None, config, num_threads=2, **kw)
    updates = client_updates(V, data, None, config, num_threads=2, **kw)
    *_, ref_users, ref_bias = ref.train_round(V, data, None, config, **kw)

    assert_array_equal(out.client_stats["status"], [1, 0, 2])
    for res in (out, updates):
        assert_array_equal(res.users[0], users[0])  # bit-exact: the stored row, untouched
        assert np.isfinite(res.users).all()
        assert np.abs(res.users[1]).max() > 1e20  # client 1's u took the huge step
        assert not np.array_equal(res.users[2], users[2])  # client 2 reconstructed
        if biases:
            assert res.user_bias[0] == kw["user_bias"][0]
            assert np.isfinite(res.user_bias).all()
        else:
            assert res.user_bias is None
    assert_users_match(out.users, out.user_bias, ref_users, ref_bias, 4)


# ------------------------------------------------------------------------------- learned default u

DEFAULT_CASES = ["default", "sgd-bias", "exact", "exact-bias", "random-0.0", "joint-l2-bias", "no-recon-steps"]


@pytest.mark.parametrize("case", DEFAULT_CASES)
@pytest.mark.parametrize("num_threads", [1, 3])
def test_learned_user_default_matches_reference(case, num_threads):
    V, data, clients, config, kwargs = make_problem(case, 40, 6, 3, seed=21)
    rng = np.random.default_rng(21)
    kwargs.update(
        user_default=rng.normal(0.0, 0.3, 6).astype(np.float32),
        user_bias_default=float(rng.normal(0.0, 0.2)) if kwargs["item_bias"] is not None else 0.0,
    )

    out = train_round(V, data, clients, config, num_threads=num_threads, **kwargs)
    delta, delta_bias, stats, _ = ref.train_round(V, data, clients, config, **kwargs)
    assert_allclose(out.delta, delta, rtol=RTOL, atol=ATOL)
    if delta_bias is not None:
        assert_allclose(out.delta_bias, delta_bias, rtol=RTOL, atol=ATOL)
    assert_stats_match(out.client_stats, stats)

    users, user_bias = reconstruct_users(V, data, clients, config, num_threads=num_threads, **kwargs)
    expected_users, expected_bias = ref.reconstruct_users(V, data, clients, config, **kwargs)
    assert_allclose(users, expected_users, rtol=RTOL, atol=ATOL)
    if expected_bias is not None:
        assert_allclose(user_bias, expected_bias, rtol=RTOL, atol=ATOL)

    ev = evaluate_users(V, data, clients, config, num_threads=num_threads, **kwargs)
    expected = ref.evaluate_users(V, data, clients, config, **kwargs)
    assert_array_equal(ev["num_correct"], expected["num_correct"])
    assert_allclose(ev["sq_err_sum"], expected["sq_err_sum"], rtol=LOSS_RTOL, atol=LOSS_ATOL)

    # The default changes the result (it is really used) ...
    plain = reconstruct_users(
        V, data, clients, config, num_threads=num_threads, **{k: v for k, v in kwargs.items() if "default" not in k}
    )
    assert not np.allclose(users, plain[0])


@pytest.mark.parametrize("recon", ["sgd", "exact"])
def test_user_without_support_data_keeps_the_learned_default(recon):
    V, data, _, _, kwargs = make_problem("exact-bias", 30, 5, 3, seed=4)
    config = ClientConfig(recon=recon)
    clients = np.flatnonzero(np.diff(data.indptr) == 0)  # clients without any rating
    assert len(clients) > 0
    u0 = np.linspace(-0.5, 0.5, 5).astype(np.float32)
    users, user_bias = reconstruct_users(V, data, clients, config, user_default=u0, user_bias_default=0.25, **kwargs)
    assert_array_equal(users, np.tile(u0, (len(clients), 1)))
    assert_array_equal(user_bias, np.full(len(clients), 0.25, np.float32))


def test_user_default_is_validated():
    V, data, clients, config, kwargs = make_problem("default", 20, 4, 2)
    with pytest.raises(ValueError, match="user_default"):
        train_round(V, data, clients, config, user_default=np.zeros(3), **kwargs)
    with pytest.raises(ValueError, match="user_default"):
        evaluate_users(V, data, clients, config, user_default=[0.0, np.nan, 0.0, 0.0], **kwargs)
    with pytest.raises((TypeError, ValueError), match="user_bias_default"):
        reconstruct_users(V, data, clients, config, user_default=np.zeros(4), user_bias_default="x", **kwargs)
