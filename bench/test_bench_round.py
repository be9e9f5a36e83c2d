"""pytest-benchmark: one FedRecon round (paper recipe, 100 clients), native vs NumPy peers vs the
per-rating oracle, all in group "round"; every benchmark also checks its delta.

``pytest bench --benchmark-only`` times; ``pytest bench --benchmark-disable`` only checks.
The NumPy peers get their random streams (pure Python) drawn in the fixture, outside the clock.
"""

import numpy as np
import pytest
import torch_round
from _problems import ff, paper_problem, reference_round
from lockstep_round import build_lockstep, lockstep_round
from numpy_round import numpy_round, plan_round

RTOL, ATOL = 1e-3, 1e-5


@pytest.fixture(scope="module")
def problem():
    config, train, model, _ = paper_problem(synthetic=True)
    clients = ff.sample_clients(train.num_clients, config.clients_per_round, config.seed, 0)
    expected = reference_round(model, train, clients, config, config.seed, 0)
    plans = plan_round(train, clients, config.client, config.seed, 0, config.dim)
    return config, train, model, clients, expected, plans


@pytest.mark.benchmark(group="round")
def test_round_reference(benchmark, problem):
    config, train, model, clients, expected, _ = problem
    got = benchmark.pedantic(reference_round, args=(model, train, clients, config, config.seed, 0),
                             rounds=1, iterations=1)
    np.testing.assert_array_equal(got.delta, expected.delta)


@pytest.mark.benchmark(group="round")
def test_round_numpy_loop(benchmark, problem):
    config, train, model, clients, expected, plans = problem
    got = benchmark.pedantic(numpy_round, args=(model.item_factors, train, clients, config.client),
                             kwargs=dict(seed=config.seed, round=0, plans=plans), rounds=3, iterations=1)
    np.testing.assert_allclose(got.delta, expected.delta, rtol=RTOL, atol=ATOL)
    for key in ("weight", "num_examples", "recon_examples", "num_correct", "rows", "status"):
        np.testing.assert_array_equal(got.client_stats[key], expected.client_stats[key], err_msg=key)


@pytest.mark.benchmark(group="round")
def test_round_numpy_vectorised(benchmark, problem):
    config, train, model, clients, expected, plans = problem
    steps = build_lockstep(train, clients, config.client, config.seed, 0, config.dim, plans)
    delta, loss = benchmark.pedantic(lockstep_round, args=(model.item_factors, steps, config.client),
                                     rounds=3, iterations=1)
    np.testing.assert_allclose(delta, expected.delta, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(loss, expected.client_stats["loss_sum"], rtol=1e-4)


@pytest.mark.benchmark(group="round")
@pytest.mark.skipif(not torch_round.available(), reason="torch is not installed")
def test_round_torch(benchmark, problem):
    config, train, model, clients, expected, plans = problem
    steps = torch_round.prepare(train, clients, config.client, config.seed, 0, config.dim, plans)
    delta, _ = benchmark(torch_round.torch_round, model.item_factors, steps, config.client)
    np.testing.assert_allclose(delta, expected.delta, rtol=RTOL, atol=ATOL)


@pytest.mark.benchmark(group="round")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"threads={t}")
def test_round_native(benchmark, problem, threads):
    config, train, model, clients, expected, _ = problem
    got = benchmark(ff.train_round, model.item_factors, train, clients, config.client,
                    seed=config.seed, round=0, num_threads=threads)
    np.testing.assert_allclose(got.delta, expected.delta, rtol=RTOL, atol=ATOL)


def test_round_threads_bit_identical(problem):
    config, train, model, clients, _, _ = problem
    one, two = (ff.train_round(model.item_factors, train, clients, config.client, seed=config.seed,
                               round=0, num_threads=t) for t in (1, 2))
    np.testing.assert_array_equal(one.delta, two.delta)


def test_numpy_round_edge_cases():
    """The NumPy peers on clients with 0..57 ratings, repeated items and every split/option."""
    from types import SimpleNamespace

    rng = np.random.default_rng(1)
    sizes = np.array([0, 1, 2, 3, 5, 8, 13, 40, 21, 57, 100, 7])
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    data = SimpleNamespace(indptr=indptr, items=rng.integers(0, 6, indptr[-1]).astype(np.int32),
                           ratings=rng.uniform(1, 5, indptr[-1]).astype(np.float32),
                           num_clients=len(sizes), num_items=6)
    V = rng.uniform(-0.5, 0.5, (6, 16)).astype(np.float32)
    clients = np.arange(len(sizes))
    configs = [ff.preset("paper").client,
               ff.ClientConfig(batch_size=3, recon_l2=0.1, recon_epochs=2, update_epochs=2, reshuffle=True),
               ff.ClientConfig(batch_size=4, split="random", update_l2=0.05, joint=True, weighting="uniform"),
               ff.ClientConfig(batch_size=2, split="reuse", recon_steps_max=3, update_steps_max=2),
               ff.ClientConfig(recon="exact", ridge=2.0, batch_size=3)]
    for cfg in configs:
        native = ff.train_round(V, data, clients, cfg, seed=3, round=2)
        got = numpy_round(V, data, clients, cfg, seed=3, round=2)
        np.testing.assert_allclose(got.delta, native.delta, rtol=RTOL, atol=ATOL)
        for key in ("weight", "num_examples", "recon_examples", "num_correct", "rows", "status"):
            np.testing.assert_array_equal(got.client_stats[key], native.client_stats[key], err_msg=key)
        if cfg.recon == "sgd" and cfg.update_l2 == 0 and not cfg.joint:
            delta, loss = lockstep_round(V, build_lockstep(data, clients, cfg, 3, 2, 16), cfg)
            np.testing.assert_allclose(delta, native.delta, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(loss, native.client_stats["loss_sum"], rtol=1e-4)
