"""pytest-benchmark: reconstruction of users' local embeddings with V frozen (SGD and exact),
native vs the NumPy step-vectorised peer vs the per-rating oracle; each benchmark checks its result.
"""

import dataclasses

import numpy as np
import pytest
from _problems import ff, paper_problem, reference
from numpy_round import numpy_reconstruct, plan_round

METHODS = {"sgd": {}, "exact": {"recon": "exact", "ridge": 3.0}}


@pytest.fixture(scope="module")
def problems():
    config, train, model, _ = paper_problem(synthetic=True)
    clients = ff.sample_clients(train.num_clients, 100, config.seed, 7)
    out = {}
    for name, changes in METHODS.items():
        cc = dataclasses.replace(config.client, **changes)
        expected, _ = reference.reconstruct_users(model.item_factors, train, clients, cc, seed=0, round=7)
        plans = plan_round(train, clients, cc, 0, 7, config.dim)
        out[name] = (cc, train, model.item_factors, clients, expected, plans)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_reconstruct_reference(benchmark, problems, method):
    cc, train, V, clients, expected, _ = problems[method]
    benchmark.group = f"reconstruct-{method}"
    got, _ = benchmark.pedantic(reference.reconstruct_users, args=(V, train, clients, cc),
                                kwargs=dict(seed=0, round=7), rounds=1, iterations=1)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("method", list(METHODS))
def test_reconstruct_numpy(benchmark, problems, method):
    cc, train, V, clients, expected, plans = problems[method]
    benchmark.group = f"reconstruct-{method}"
    got = benchmark.pedantic(numpy_reconstruct, args=(V, train, clients, cc),
                             kwargs=dict(seed=0, round=7, plans=plans), rounds=3, iterations=1)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"threads={t}")
def test_reconstruct_native(benchmark, problems, method, threads):
    cc, train, V, clients, expected, _ = problems[method]
    benchmark.group = f"reconstruct-{method}"
    got, bias = benchmark(ff.reconstruct_users, V, train, clients, cc, seed=0, round=7, num_threads=threads)
    assert bias is None
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
