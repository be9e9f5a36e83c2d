"""pytest-benchmark: top-10 recommendations for 300 new users (reconstruct from all ratings, score
every item, exclude the rated ones), native vs the per-user NumPy reference; each benchmark
checks its result against the reference.
"""

import numpy as np
import pytest
from _problems import ff, paper_problem, reference

K = 10


@pytest.fixture(scope="module")
def problem():
    config, train, model, _ = paper_problem(synthetic=True)
    users = train.subset(np.arange(300))
    V = model.item_factors
    expected = reference.recommend_users(V, users, None, config.client, k=K, seed=0, round=3)
    return config.client, users, V, expected


def check(got, expected):
    items, scores = got
    np.testing.assert_allclose(scores, expected[1], rtol=1e-4, atol=1e-5)
    # Scores closer than float32 rounding may swap places: compare the sets of the top 10 loosely.
    same = [len(set(a) & set(b)) for a, b in zip(items.tolist(), expected[0].tolist())]
    assert np.mean(same) >= K - 0.1


@pytest.mark.benchmark(group="recommend")
def test_recommend_reference(benchmark, problem):
    cc, users, V, expected = problem
    got = benchmark.pedantic(reference.recommend_users, args=(V, users, None, cc),
                             kwargs=dict(k=K, seed=0, round=3), rounds=1, iterations=1)
    check(got, expected)


@pytest.mark.benchmark(group="recommend")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"threads={t}")
def test_recommend_native(benchmark, problem, threads):
    cc, users, V, expected = problem
    got = benchmark(ff.recommend_users, V, users, None, cc, k=K, seed=0, round=3, num_threads=threads)
    check(got, expected)
