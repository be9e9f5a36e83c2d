"""pytest-benchmark: ReconEval of users (reconstruct on support, score the query set), native vs
the NumPy step-vectorised peer vs the per-rating oracle; each benchmark checks its result.
"""

import numpy as np
import pytest
from _problems import ff, paper_problem, reference
from numpy_round import numpy_evaluate, plan_round


@pytest.fixture(scope="module")
def problem():
    config, train, model, _ = paper_problem(synthetic=True)
    clients = ff.sample_clients(train.num_clients, 100, config.seed, 3)
    expected = reference.evaluate_users(model.item_factors, train, clients, config.client, seed=0, round=3)
    plans = plan_round(train, clients, config.client, 0, 3, config.dim)
    return config.client, train, model.item_factors, clients, expected, plans


def check(got, expected):
    np.testing.assert_allclose(got["sq_err_sum"], expected["sq_err_sum"], rtol=1e-4)
    np.testing.assert_array_equal(got["num_examples"], expected["num_examples"])
    # a prediction within float32 rounding of the 0.5 threshold may flip: allow one per 10,000
    assert np.abs(got["num_correct"] - expected["num_correct"]).sum() <= expected["num_examples"].sum() // 10_000


@pytest.mark.benchmark(group="evaluate")
def test_evaluate_reference(benchmark, problem):
    cc, train, V, clients, expected, _ = problem
    got = benchmark.pedantic(reference.evaluate_users, args=(V, train, clients, cc),
                             kwargs=dict(seed=0, round=3), rounds=1, iterations=1)
    check(got, expected)


@pytest.mark.benchmark(group="evaluate")
def test_evaluate_numpy(benchmark, problem):
    cc, train, V, clients, expected, plans = problem
    got = benchmark.pedantic(numpy_evaluate, args=(V, train, clients, cc),
                             kwargs=dict(seed=0, round=3, plans=plans), rounds=3, iterations=1)
    check(got, expected)


@pytest.mark.benchmark(group="evaluate")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"threads={t}")
def test_evaluate_native(benchmark, problem, threads):
    cc, train, V, clients, expected, _ = problem
    got = benchmark(ff.evaluate_users, V, train, clients, cc, seed=0, round=3, num_threads=threads)
    check(got, expected)
