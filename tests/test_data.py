"""ClientData (CSR ratings per client), its constructors and the data splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedrecon_fast._rng import STREAM_DATA, derive_seed, mix64
from fedrecon_fast.data import ClientData, split_by_time, split_users


def random_coo(seed=0, n_users=30, n_items=40, density=0.3, with_time=True):
    """Random ratings with arbitrary (negative, large, unsorted) ids and unique (user, item) pairs."""
    rng = np.random.default_rng(seed)
    user_pool = rng.choice(2 * 10**12, size=n_users, replace=False) - 10**12
    item_pool = rng.choice(10**9, size=n_items, replace=False) - 5000
    mask = rng.random((n_users, n_items)) < density
    u, i = np.nonzero(mask)
    perm = rng.permutation(u.size)
    users, items = user_pool[u[perm]], item_pool[i[perm]]
    ratings = rng.integers(1, 11, size=u.size) / 2.0
    ts = rng.integers(0, 50, size=u.size) if with_time else None  # many ties on purpose
    return users, items, ratings, ts


def triples(data: ClientData):
    u, i, r = data.to_coo()
    return sorted(zip(data.user_ids[u].tolist(), data.item_ids[i].tolist(), r.tolist()))


def small():
    # users 5, 3, 9; items 100, 7, 42
    return ClientData.from_coo(
        users=[5, 3, 5, 3, 9, 5],
        items=[100, 7, 7, 100, 42, 42],
        ratings=[1, 2, 3, 4, 5.5, 2],
        timestamps=[10, 5, 1, 3, 0, 10],
    )


# --------------------------------------------------------------------------- from_coo


def test_from_coo_round_trip_and_mapping():
    users, items, ratings, ts = random_coo()
    data = ClientData.from_coo(users, items, ratings, ts)
    assert triples(data) == sorted(zip(users.tolist(), items.tolist(), ratings.tolist()))
    np.testing.assert_array_equal(data.user_ids, np.unique(users))
    np.testing.assert_array_equal(data.item_ids, np.unique(items))
    assert data.num_clients == np.unique(users).size
    assert data.num_items == np.unique(items).size
    assert data.nnz == users.size
    np.testing.assert_array_equal(data.sizes, np.diff(data.indptr))
    assert data.sizes.sum() == data.nnz


def test_from_coo_dtypes_are_exact():
    users, items, ratings, ts = random_coo()
    data = ClientData.from_coo(
        users.astype(np.int32), items.astype(np.int64), ratings.astype(np.float64), ts.astype(np.int32)
    )
    assert data.indptr.dtype == np.int64
    assert data.items.dtype == np.int32
    assert data.ratings.dtype == np.float32
    assert data.timestamps.dtype == np.int64
    assert data.user_ids.dtype == np.int64 and data.item_ids.dtype == np.int64


def test_from_coo_orders_by_timestamp_then_input_order():
    users, items, ratings, ts = random_coo(seed=3)
    data = ClientData.from_coo(users, items, ratings, ts)
    u, _, _ = data.to_coo()
    # within each client: timestamps non-decreasing, ties in input order
    pos_of = {(a, b): k for k, (a, b) in enumerate(zip(users.tolist(), items.tolist()))}
    orig = np.array([pos_of[(data.user_ids[a], data.item_ids[b])] for a, b in zip(u.tolist(), data.items.tolist())])
    key = np.lexsort((orig, ts[orig], u))
    np.testing.assert_array_equal(key, np.arange(data.nnz))
    np.testing.assert_array_equal(data.timestamps, ts[orig])


def test_from_coo_without_timestamps_keeps_input_order():
    data = ClientData.from_coo([2, 1, 2, 1, 2], [10, 11, 12, 13, 11], [1, 2, 3, 4, 5])
    assert data.timestamps is None
    np.testing.assert_array_equal(data.user_ids, [1, 2])
    np.testing.assert_array_equal(data.item_ids, [10, 11, 12, 13])
    np.testing.assert_array_equal(data.indptr, [0, 2, 5])
    np.testing.assert_array_equal(data.item_ids[data.items], [11, 13, 10, 12, 11])
    np.testing.assert_array_equal(data.ratings, [2, 4, 1, 3, 5])


def test_from_coo_small_example():
    data = small()
    np.testing.assert_array_equal(data.user_ids, [3, 5, 9])
    np.testing.assert_array_equal(data.item_ids, [7, 42, 100])
    np.testing.assert_array_equal(data.indptr, [0, 2, 5, 6])
    np.testing.assert_array_equal(data.timestamps, [3, 5, 1, 10, 10, 0])
    np.testing.assert_array_equal(data.items, [2, 0, 0, 2, 1, 1])
    np.testing.assert_array_equal(data.ratings, [4, 2, 3, 1, 2, 5.5])


def test_from_coo_empty_input():
    data = ClientData.from_coo([], [], [])
    assert (data.num_clients, data.num_items, data.nnz) == (0, 0, 0)
    np.testing.assert_array_equal(data.indptr, [0])
    assert data.sizes.size == 0
    with_ts = ClientData.from_coo(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), [])
    assert with_ts.timestamps.dtype == np.int64 and with_ts.timestamps.size == 0


def test_from_coo_accepts_datetime64_timestamps():
    ts = np.array(["2000-01-01T00:00:10", "2000-01-01T00:00:00"], dtype="datetime64[s]")
    data = ClientData.from_coo([1, 1], [1, 2], [3, 4], ts)
    np.testing.assert_array_equal(data.timestamps, [946684800, 946684810])
    np.testing.assert_array_equal(data.ratings, [4, 3])


@pytest.mark.parametrize("bad_ids", ["users", "items"])
def test_from_coo_rejects_float_ids(bad_ids):
    kwargs = dict(users=[1, 2], items=[1, 2], ratings=[1.0, 2.0])
    kwargs[bad_ids] = [1.0, 2.0]
    with pytest.raises(TypeError, match=bad_ids):
        ClientData.from_coo(**kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_from_coo_rejects_non_finite_ratings(bad):
    with pytest.raises(ValueError, match="ratings"):
        ClientData.from_coo([1, 2], [1, 2], [1.0, bad])


def test_from_coo_rejects_ratings_beyond_float32():
    with pytest.raises(ValueError, match="ratings"):
        ClientData.from_coo([1], [1], [1e300])


def test_from_coo_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same length"):
        ClientData.from_coo([1, 2], [1], [1.0, 2.0])
    with pytest.raises(ValueError, match="timestamps"):
        ClientData.from_coo([1, 2], [1, 2], [1.0, 2.0], timestamps=[1])
    with pytest.raises(ValueError, match="one-dimensional"):
        ClientData.from_coo([[1, 2]], [[1, 2]], [[1.0, 2.0]])
    with pytest.raises(TypeError, match="ratings"):
        ClientData.from_coo([1], [1], ["a"])


# --------------------------------------------------------------------------- validation


def valid_fields():
    return dict(
        indptr=np.array([0, 2, 3]),
        items=np.array([0, 1, 1]),
        ratings=np.array([1.0, 2.0, 3.0]),
        timestamps=np.array([1, 2, 3]),
        user_ids=np.array([10, 20]),
        item_ids=np.array([7, 8]),
    )


@pytest.mark.parametrize(
    "field, value, exc",
    [
        ("indptr", np.array([1, 2, 3]), ValueError),
        ("indptr", np.array([0, 3, 2]), ValueError),
        ("indptr", np.array([0, 2, 4]), ValueError),
        ("indptr", np.array([0.0, 2.0, 3.0]), TypeError),
        ("items", np.array([0, 1, 2]), ValueError),
        ("items", np.array([0, -1, 1]), ValueError),
        ("items", np.array([0.0, 1.0, 1.0]), TypeError),
        ("ratings", np.array([1.0, np.nan, 3.0]), ValueError),
        ("ratings", np.array([1.0, 2.0]), ValueError),
        ("timestamps", np.array([1, 2]), ValueError),
        ("timestamps", np.array([1.0, 2.0, 3.0]), TypeError),
        ("user_ids", np.array([10]), ValueError),
        ("user_ids", np.array([10, 10]), ValueError),
        ("item_ids", np.array([7, 7]), ValueError),
    ],
)
def test_constructor_validation_names_the_field(field, value, exc):
    fields = valid_fields()
    fields[field] = value
    with pytest.raises(exc, match=field):
        ClientData(**fields)


def test_constructor_converts_dtypes_and_defaults_ids():
    data = ClientData(
        indptr=np.array([0, 1, 3], dtype=np.int32), items=[2, 0, 1], ratings=np.array([1, 2, 3], dtype=np.int16)
    )
    assert data.indptr.dtype == np.int64 and data.items.dtype == np.int32
    assert data.ratings.dtype == np.float32 and data.timestamps is None
    np.testing.assert_array_equal(data.user_ids, [0, 1])
    np.testing.assert_array_equal(data.item_ids, [0, 1, 2])


def test_client_data_is_immutable_without_touching_caller_arrays():
    fields = valid_fields()
    data = ClientData(**fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.items = np.array([0, 0, 0])
    for name in ("indptr", "items", "ratings", "timestamps", "user_ids", "item_ids"):
        assert not getattr(data, name).flags.writeable, name
    with pytest.raises(ValueError):
        data.ratings[0] = 5.0
    assert fields["ratings"].flags.writeable
    fields["ratings"][0] = 4.0  # the caller's array stays usable


# --------------------------------------------------------------------------- from_dataframe


def test_from_dataframe_with_and_without_timestamps():
    pd = pytest.importorskip("pandas")
    users, items, ratings, ts = random_coo(seed=5)
    df = pd.DataFrame({"user_id": users, "item_id": items, "rating": ratings, "timestamp": ts})
    a = ClientData.from_dataframe(df)
    b = ClientData.from_coo(users, items, ratings, ts)
    for name in ("indptr", "items", "ratings", "timestamps", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    no_ts = ClientData.from_dataframe(df.drop(columns="timestamp"))
    assert no_ts.timestamps is None
    assert triples(no_ts) == triples(b)


def test_from_dataframe_custom_columns_and_datetimes():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(
        {
            "u": pd.array([3, 1, 3], dtype="Int64"),
            "m": [9, 9, 8],
            "r": [4.0, 5.0, 3.5],
            "when": pd.to_datetime(["2001-01-01", "2000-01-01", "2000-06-01"]),
        }
    )
    data = ClientData.from_dataframe(df, user_col="u", item_col="m", rating_col="r", timestamp_col="when")
    np.testing.assert_array_equal(data.user_ids, [1, 3])
    np.testing.assert_array_equal(data.ratings, [5.0, 3.5, 4.0])
    assert data.timestamps[0] == 946684800


def test_from_dataframe_errors_name_the_column():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "rating": [1.0, 2.0]})
    with pytest.raises(ValueError, match="item_id"):
        ClientData.from_dataframe(df.drop(columns="item_id"))
    with pytest.raises(ValueError, match="rating"):
        ClientData.from_dataframe(df.assign(rating=[1.0, np.nan]))
    with pytest.raises(TypeError, match="user_id"):
        ClientData.from_dataframe(df.assign(user_id=[1.5, 2.0]))
    with pytest.raises(TypeError, match="item_id"):
        ClientData.from_dataframe(df.assign(item_id=[1, "b"]))  # neither integers nor strings
    with pytest.raises(TypeError, match="DataFrame"):
        ClientData.from_dataframe({"user_id": [1]})


# --------------------------------------------------------------------------- from_scipy


@pytest.mark.parametrize("fmt", ["coo_array", "csr_matrix", "csc_array", "lil_matrix"])
def test_from_scipy(fmt):
    sp = pytest.importorskip("scipy.sparse")
    coo = sp.coo_array(([1.0, 0.0, 3.0, 2.0, 4.5], ([0, 0, 2, 2, 3], [4, 3, 0, 0, 1])), shape=(5, 6))
    matrix = getattr(sp, fmt)(coo)
    data = ClientData.from_scipy(matrix)
    np.testing.assert_array_equal(data.indptr, [0, 1, 1, 2, 3, 3])  # empty rows kept
    np.testing.assert_array_equal(data.items, [4, 0, 1])  # explicit zero dropped
    np.testing.assert_array_equal(data.ratings, [1.0, 5.0, 4.5])  # duplicates summed
    np.testing.assert_array_equal(data.user_ids, np.arange(5))
    np.testing.assert_array_equal(data.item_ids, np.arange(6))  # all columns kept
    assert data.timestamps is None
    coo.data[0] = 7.0
    assert data.ratings[0] == 1.0  # no aliasing of the caller's matrix


def test_from_scipy_validation():
    sp = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match="scipy.sparse"):
        ClientData.from_scipy(np.eye(3))
    with pytest.raises(ValueError, match="ratings"):
        ClientData.from_scipy(sp.csr_array(np.array([[np.nan, 1.0]])))


# --------------------------------------------------------------------------- subset


def test_subset_keeps_mapping_and_order():
    users, items, ratings, ts = random_coo(seed=7)
    data = ClientData.from_coo(users, items, ratings, ts)
    pick = np.array([5, 0, 17, 3])
    sub = data.subset(pick)
    assert sub.num_clients == 4
    np.testing.assert_array_equal(sub.item_ids, data.item_ids)
    np.testing.assert_array_equal(sub.user_ids, data.user_ids[pick])
    for k, c in enumerate(pick):
        lo, hi = data.indptr[c], data.indptr[c + 1]
        s_lo, s_hi = sub.indptr[k], sub.indptr[k + 1]
        np.testing.assert_array_equal(sub.items[s_lo:s_hi], data.items[lo:hi])
        np.testing.assert_array_equal(sub.ratings[s_lo:s_hi], data.ratings[lo:hi])
        np.testing.assert_array_equal(sub.timestamps[s_lo:s_hi], data.timestamps[lo:hi])


def test_subset_mask_empty_and_errors():
    data = small()
    masked = data.subset(np.array([True, False, True]))
    np.testing.assert_array_equal(masked.user_ids, [3, 9])
    empty = data.subset(np.array([], dtype=np.int64))
    assert empty.num_clients == 0 and empty.nnz == 0 and empty.num_items == data.num_items
    with pytest.raises(ValueError, match="clients"):
        data.subset([0, 3])
    with pytest.raises(ValueError, match="clients"):
        data.subset([-1])
    with pytest.raises(ValueError, match="duplicates"):
        data.subset([1, 1])
    with pytest.raises(ValueError, match="mask"):
        data.subset(np.array([True, False]))
    with pytest.raises(TypeError, match="clients"):
        data.subset([0.0])


# --------------------------------------------------------------------------- prepare


def test_prepare_keeps_the_most_recent_ratings_in_stored_order():
    # stored order deliberately not chronological
    data = ClientData(
        indptr=[0, 5, 7],
        items=[0, 1, 2, 3, 4, 0, 1],
        ratings=[1, 2, 3, 4, 5, 1, 2],
        timestamps=[50, 10, 40, 20, 30, 1, 2],
        user_ids=[1, 2],
    )
    out = data.prepare(max_examples=3)
    np.testing.assert_array_equal(out.indptr, [0, 3, 5])
    np.testing.assert_array_equal(out.timestamps, [50, 40, 30, 1, 2])
    np.testing.assert_array_equal(out.items, [0, 2, 4, 0, 1])
    np.testing.assert_array_equal(out.item_ids, data.item_ids)


def test_prepare_cap_with_ties_and_without_timestamps():
    tied = ClientData(indptr=[0, 4], items=[0, 1, 2, 3], ratings=[1, 2, 3, 4], timestamps=[5, 5, 5, 1])
    np.testing.assert_array_equal(tied.prepare(max_examples=2).items, [1, 2])
    plain = ClientData(indptr=[0, 4, 5], items=[0, 1, 2, 3, 0], ratings=[1, 2, 3, 4, 5])
    out = plain.prepare(max_examples=2)
    np.testing.assert_array_equal(out.items, [2, 3, 0])
    np.testing.assert_array_equal(out.indptr, [0, 2, 3])


def test_prepare_min_examples_drops_small_clients():
    data = small()  # sizes 2, 3, 1
    out = data.prepare(min_examples=2)
    np.testing.assert_array_equal(out.user_ids, [3, 5])
    np.testing.assert_array_equal(out.item_ids, data.item_ids)
    capped = data.prepare(max_examples=2, min_examples=2)
    np.testing.assert_array_equal(capped.sizes, [2, 2])
    assert data.prepare() is data


def test_prepare_shuffle_is_a_seeded_per_client_permutation():
    users, items, ratings, ts = random_coo(seed=11, n_users=50)
    data = ClientData.from_coo(users, items, ratings, ts)
    a = data.prepare(shuffle_seed=1)
    b = data.prepare(shuffle_seed=1)
    c = data.prepare(shuffle_seed=2)
    np.testing.assert_array_equal(a.items, b.items)
    assert not np.array_equal(a.items, c.items)
    assert not np.array_equal(a.items, data.items)
    np.testing.assert_array_equal(a.indptr, data.indptr)
    for k in range(data.num_clients):
        lo, hi = data.indptr[k], data.indptr[k + 1]
        assert sorted(zip(a.items[lo:hi], a.ratings[lo:hi], a.timestamps[lo:hi])) == sorted(
            zip(data.items[lo:hi], data.ratings[lo:hi], data.timestamps[lo:hi])
        )


def test_prepare_shuffle_matches_documented_keys():
    data = small()
    out = data.prepare(shuffle_seed=42)
    for k in range(data.num_clients):
        lo, hi = data.indptr[k], data.indptr[k + 1]
        seed = derive_seed(42, 0, int(data.user_ids[k]), STREAM_DATA)
        keys = [mix64(seed ^ p) for p in range(hi - lo)]
        order = np.argsort(np.array(keys, dtype=np.uint64), kind="stable")
        np.testing.assert_array_equal(out.items[lo:hi], data.items[lo:hi][order])


def test_prepare_shuffle_independent_of_other_users():
    users, items, ratings, ts = random_coo(seed=13, n_users=60)
    data = ClientData.from_coo(users, items, ratings, ts)
    pick = np.array([40, 2, 33, 7, 59])
    shuffled_then_subset = data.prepare(shuffle_seed=9).subset(pick)
    subset_then_shuffled = data.subset(pick).prepare(shuffle_seed=9)
    for name in ("indptr", "items", "ratings", "timestamps", "user_ids"):
        np.testing.assert_array_equal(getattr(shuffled_then_subset, name), getattr(subset_then_shuffled, name))
    # and the same ratings under another user id are shuffled differently
    renamed = ClientData(
        indptr=data.indptr,
        items=data.items,
        ratings=data.ratings,
        timestamps=data.timestamps,
        user_ids=data.user_ids + 1,
        item_ids=data.item_ids,
    )
    assert not np.array_equal(renamed.prepare(shuffle_seed=9).items, data.prepare(shuffle_seed=9).items)


def test_prepare_argument_validation():
    data = small()
    with pytest.raises(ValueError, match="max_examples"):
        data.prepare(max_examples=0)
    with pytest.raises(ValueError, match="min_examples"):
        data.prepare(min_examples=-1)
    with pytest.raises(ValueError, match="max_examples"):
        data.prepare(max_examples=2, min_examples=3)
    with pytest.raises(TypeError, match="shuffle_seed"):
        data.prepare(shuffle_seed=1.5)


# --------------------------------------------------------------------------- split_users


def test_split_users_paper_sizes():
    train, val, test = split_users(6040)
    assert (train.size, val.size, test.size) == (4832, 604, 604)
    everything = np.concatenate([train, val, test])
    np.testing.assert_array_equal(np.sort(everything), np.arange(6040))
    for part in (train, val, test):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)


def test_split_users_is_seeded():
    a = split_users(1000, seed=3)
    b = split_users(1000, seed=3)
    c = split_users(1000, seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], np.arange(800))  # shuffled, not a prefix


@pytest.mark.parametrize(
    "n, fractions, sizes",
    [
        (2999, (0.8, 0.1, 0.1), (2399, 299, 301)),
        (10, (0.5, 0.5, 0.0), (5, 5, 0)),
        (7, (1.0, 0.0, 0.0), (7, 0, 0)),
        (0, (0.8, 0.1, 0.1), (0, 0, 0)),
        (1, (0.8, 0.1, 0.1), (0, 0, 1)),
    ],
)
def test_split_users_sizes(n, fractions, sizes):
    parts = split_users(n, fractions, seed=0)
    assert tuple(p.size for p in parts) == sizes


@pytest.mark.parametrize("fractions", [(0.8, 0.2), (0.8, 0.1, 0.2), (1.2, -0.1, -0.1), (np.nan, 0.5, 0.5)])
def test_split_users_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_users(10, fractions)


# --------------------------------------------------------------------------- split_by_time


def test_split_by_time_orders_and_sizes():
    users, items, ratings, ts = random_coo(seed=17, n_users=40, density=0.5)
    data = ClientData.from_coo(users, items, ratings, ts).prepare(shuffle_seed=0)  # unsorted times
    train, val, test = split_by_time(data)
    sizes = data.sizes
    np.testing.assert_array_equal(train.sizes, np.floor(0.8 * sizes + 1e-9).astype(int))
    np.testing.assert_array_equal(val.sizes, np.floor(0.1 * sizes + 1e-9).astype(int))
    np.testing.assert_array_equal(train.sizes + val.sizes + test.sizes, sizes)
    for part in (train, val, test):
        np.testing.assert_array_equal(part.user_ids, data.user_ids)
        np.testing.assert_array_equal(part.item_ids, data.item_ids)
    for k in range(data.num_clients):
        t_tr = train.timestamps[train.indptr[k] : train.indptr[k + 1]]
        t_va = val.timestamps[val.indptr[k] : val.indptr[k + 1]]
        t_te = test.timestamps[test.indptr[k] : test.indptr[k + 1]]
        joined = np.concatenate([t_tr, t_va, t_te])
        assert np.all(np.diff(joined) >= 0)  # train <= val <= test, each in time order
        lo, hi = data.indptr[k], data.indptr[k + 1]
        rows = [(train, k), (val, k), (test, k)]
        got = sorted(
            zip(
                *[
                    np.concatenate([p.items[p.indptr[j] : p.indptr[j + 1]] for p, j in rows]),
                    np.concatenate([p.ratings[p.indptr[j] : p.indptr[j + 1]] for p, j in rows]),
                ]
            )
        )
        assert got == sorted(zip(data.items[lo:hi], data.ratings[lo:hi]))


def test_split_by_time_ties_are_stable_and_small_clients():
    data = ClientData(
        indptr=[0, 10, 11],
        items=np.arange(11) % 4,
        ratings=np.arange(11),
        timestamps=[3] * 10 + [0],
        item_ids=np.arange(4),
    )
    train, val, test = split_by_time(data)
    np.testing.assert_array_equal(train.ratings, np.arange(8))
    np.testing.assert_array_equal(val.ratings, [8])
    np.testing.assert_array_equal(test.ratings, [9, 10])
    np.testing.assert_array_equal(test.indptr, [0, 1, 2])


def test_split_by_time_requires_timestamps():
    data = ClientData.from_coo([1, 2], [1, 2], [3.0, 4.0])
    with pytest.raises(ValueError, match="timestamps"):
        split_by_time(data)
    with pytest.raises(ValueError, match="fractions"):
        split_by_time(small(), (0.5, 0.6, 0.1))
