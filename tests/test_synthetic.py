"""Seeded synthetic ratings with MovieLens-like statistics."""

from __future__ import annotations

import numpy as np
import pytest

from fedrecon_fast.data import ClientData
from fedrecon_fast.synthetic import synthetic_ratings


@pytest.fixture(scope="module")
def default_data() -> ClientData:
    return synthetic_ratings()


def test_shape_and_types(default_data):
    d = default_data
    assert isinstance(d, ClientData)
    assert d.num_clients == 2000 and d.num_items == 1500
    np.testing.assert_array_equal(d.user_ids, np.arange(2000))
    np.testing.assert_array_equal(d.item_ids, np.arange(1500))
    assert d.timestamps is not None


def test_deterministic_given_seed():
    a = synthetic_ratings(300, 200, seed=5)
    b = synthetic_ratings(300, 200, seed=5)
    c = synthetic_ratings(300, 200, seed=6)
    for name in ("indptr", "items", "ratings", "timestamps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not (np.array_equal(a.indptr, c.indptr) and np.array_equal(a.items, c.items))


def test_counts_are_heavy_tailed_within_bounds(default_data):
    sizes = default_data.sizes
    assert sizes.min() >= 20 and sizes.max() <= 1500
    assert 0.85 * 80 <= sizes.mean() <= 1.15 * 80
    assert np.median(sizes) < sizes.mean()  # right-skewed, like MovieLens
    assert sizes.max() > 4 * np.median(sizes)


def test_ratings_look_like_movielens(default_data):
    r = np.asarray(default_data.ratings)
    np.testing.assert_array_equal(r, np.rint(r))
    assert set(np.unique(r).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 3.3 <= r.mean() <= 3.9
    assert 0.8 <= r.std() <= 1.3
    share = np.bincount(r.astype(int), minlength=6)[1:] / r.size
    assert share[3] > share[0] and share[3] > share[1]  # 4 stars far more common than 1 or 2


def test_items_distinct_per_user_and_popularity_skewed(default_data):
    d = default_data
    user, items, _ = d.to_coo()
    pairs = user * d.num_items + items
    assert np.unique(pairs).size == d.nnz  # sampled without replacement
    counts = np.sort(np.bincount(items, minlength=d.num_items))[::-1]
    # top 10% of items: about 23% of ratings here (uniform: 10%; ML-1M: 44%; see _ZIPF_EXPONENT)
    assert counts[:150].sum() > 0.2 * d.nnz
    assert counts[0] > 10 * max(counts[-150:].mean(), 1)  # about 13x here


def test_timestamps_strictly_increasing_per_user(default_data):
    d = default_data
    t = d.timestamps
    inner = np.ones(d.nnz, dtype=bool)
    inner[d.indptr[:-1][d.sizes > 0]] = False  # first rating of each user
    assert np.all(np.diff(t)[inner[1:]] > 0)
    assert t.min() >= 900_000_000  # Unix seconds around 2000


def test_low_rank_signal_is_consistent_across_users(default_data):
    d = default_data
    user, items, r = d.to_coo()
    means = []
    for half in (user % 2 == 0, user % 2 == 1):
        total = np.bincount(items[half], weights=r[half], minlength=d.num_items)
        count = np.bincount(items[half], minlength=d.num_items)
        means.append(np.where(count >= 20, total / np.maximum(count, 1), np.nan))
    ok = ~np.isnan(means[0]) & ~np.isnan(means[1])
    assert ok.sum() > 100
    assert np.corrcoef(means[0][ok], means[1][ok])[0, 1] > 0.5  # item quality is shared


def test_edge_parameters():
    full = synthetic_ratings(20, 15, min_ratings=15, mean_ratings=15, seed=1)
    np.testing.assert_array_equal(full.sizes, 15)  # everyone rates every item
    capped = synthetic_ratings(30, 10, min_ratings=2, mean_ratings=500, seed=2)
    assert capped.sizes.max() == 10
    exact = synthetic_ratings(10, 50, min_ratings=7, mean_ratings=7, noise=0.0, rank=1)
    np.testing.assert_array_equal(exact.sizes, 7)
    single = synthetic_ratings(1, 1, min_ratings=1, mean_ratings=1)
    assert single.nnz == 1


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(num_users=0), ValueError, "num_users"),
        (dict(num_items=0), ValueError, "num_items"),
        (dict(num_users=2.5), TypeError, "num_users"),
        (dict(rank=0), ValueError, "rank"),
        (dict(min_ratings=0), ValueError, "min_ratings"),
        (dict(num_items=10, min_ratings=11), ValueError, "min_ratings"),
        (dict(mean_ratings=10), ValueError, "mean_ratings"),
        (dict(mean_ratings=float("nan")), ValueError, "mean_ratings"),
        (dict(noise=-0.1), ValueError, "noise"),
        (dict(noise="0.5"), TypeError, "noise"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_argument_validation_names_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        synthetic_ratings(**kwargs)


def test_half_stars_and_a_long_popularity_tail():
    d = synthetic_ratings(400, 2000, mean_ratings=30, popularity=1.0, half_stars=True, seed=2)
    r = np.asarray(d.ratings)
    np.testing.assert_array_equal(2 * r, np.rint(2 * r))
    assert r.min() == 0.5 and r.max() == 5.0 and (r != np.rint(r)).mean() > 0.3
    counts = np.bincount(d.items, minlength=d.num_items)
    flat = np.bincount(synthetic_ratings(400, 2000, mean_ratings=30, seed=2).items, minlength=d.num_items)
    # Zipf exponent 1 leaves most of the catalogue rated at most twice; the default 0.4 does not.
    assert (counts <= 2).mean() > 0.5 > (flat <= 2).mean()


@pytest.mark.parametrize(("kwargs", "error"), [({"popularity": -1.0}, ValueError), ({"half_stars": 1}, TypeError)])
def test_bad_shape_arguments_name_themselves(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        synthetic_ratings(10, 30, **kwargs)
