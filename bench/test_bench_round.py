"""pytest-benchmark: one FedRecon round, native vs NumPy reference (each also a correctness check).

``pytest bench --benchmark-only`` times; ``pytest bench --benchmark-disable`` only checks.
"""

import numpy as np
import pytest
from _problems import ff, paper_problem, reference_round


@pytest.fixture(scope="module")
def problem():
    config, train, model, _ = paper_problem(synthetic=True)
    clients = ff.sample_clients(train.num_clients, config.clients_per_round, config.seed, 0)
    expected = reference_round(model, train, clients, config, config.seed, 0)
    return config, train, model, clients, expected


@pytest.mark.benchmark(group="round")
def test_round_reference(benchmark, problem):
    config, train, model, clients, expected = problem
    got = benchmark.pedantic(reference_round, args=(model, train, clients, config, config.seed, 0),
                             rounds=1, iterations=1)
    np.testing.assert_array_equal(got.delta, expected.delta)


@pytest.mark.benchmark(group="round")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"threads={t}")
def test_round_native(benchmark, problem, threads):
    config, train, model, clients, expected = problem
    got = benchmark(ff.train_round, model.item_factors, train, clients, config.client,
                    seed=config.seed, round=0, num_threads=threads)
    np.testing.assert_allclose(got.delta, expected.delta, rtol=1e-3, atol=1e-5)
