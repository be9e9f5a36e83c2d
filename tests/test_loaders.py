"""load_ratings: any ratings file (separators, headers, column names and orders, string ids,
dates, parquet) and any table (DataFrame, scipy.sparse, dict, tuple), plus the warning for a
headerless file whose user and item columns look swapped."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast.columns import resolve_columns
from fedrecon_fast.loaders import SwappedColumnsWarning, load_ratings

# Three users, four items; user 7 rated items 10 and 11, user 8 items 10 and 12, user 9 item 13.
USERS = [7, 7, 8, 8, 9]
ITEMS = [10, 11, 10, 12, 13]
RATINGS = [4.0, 3.5, 5.0, 1.0, 2.0]
TIMES = [100, 90, 80, 70, 60]


def assert_ratings(data: ff.ClientData, users=USERS, items=ITEMS, ratings=RATINGS, times=None):
    """``data`` holds exactly these (user, item, rating[, time]) rows (original ids, labels for
    string ids)."""
    u, i, r = data.to_coo()
    uid = data.user_ids[u] if data.user_labels is None else data.user_labels[data.user_ids[u]]
    iid = data.item_ids[i] if data.item_labels is None else data.item_labels[data.item_ids[i]]
    got = sorted(zip(uid.tolist(), iid.tolist(), r.tolist()))
    assert got == sorted(zip(users, items, ratings))
    if times is None:
        assert data.timestamps is None
    else:
        assert sorted(zip(uid.tolist(), iid.tolist(), data.timestamps.tolist())) == sorted(zip(users, items, times))


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(fmt, order=("user", "item", "rating", "time")):
    values = {"user": USERS, "item": ITEMS, "rating": RATINGS, "time": TIMES}
    return [fmt.format(*(values[c][k] for c in order)) for k in range(len(USERS))]


@pytest.mark.parametrize(
    ("header", "order"),
    [
        ("user,item,rating", ("user", "item", "rating")),
        ("rating,item,user", ("rating", "item", "user")),
        ("userId,movieId,rating,timestamp", ("user", "item", "rating", "time")),
        ("timestamp,rating,movieId,userId", ("time", "rating", "item", "user")),
        ("user_id,item_id,score,time", ("user", "item", "rating", "time")),
        ("UserID, ItemID , Stars", ("user", "item", "rating")),
    ],
)
def test_csv_header_finds_columns_by_name_in_any_order(tmp_path, header, order):
    path = write(tmp_path, "r.csv", [header] + rows(",".join(["{}"] * len(order)), order))
    assert_ratings(load_ratings(path), times=TIMES if "time" in order else None)


@pytest.mark.parametrize(
    ("sep", "name"),
    [
        ("\t", "r.tsv"),
        ("::", "r.dat"),
        (";", "r.txt"),
        ("|", "r.psv"),
        ("   ", "r.txt"),
        (" \t ", "r.txt"),
        (", ", "r.csv"),
    ],
)
def test_separators_are_sniffed(tmp_path, sep, name):
    path = write(tmp_path, name, rows(sep.join(["{}"] * 4)))
    assert_ratings(load_ratings(path), times=TIMES)


def test_headerless_three_columns_and_the_sep_option(tmp_path):
    path = write(tmp_path, "r.txt", rows("{};{};{}"))
    assert_ratings(load_ratings(path))
    assert_ratings(load_ratings(path, sep=";"))
    with pytest.raises(ValueError, match="columns"):  # read as one column per line
        load_ratings(path, sep=",")


@pytest.mark.parametrize(
    "columns",
    [
        "item,user,rating,timestamp",
        ["movieId", "userId", "rating", "time"],
        {"user": 1, "item": 0, "rating": 2, "timestamp": 3},
    ],
)
def test_columns_say_which_is_which(tmp_path, columns):
    path = write(tmp_path, "r.csv", rows("{},{},{},{}", ("item", "user", "rating", "time")))
    assert_ratings(load_ratings(path, columns=columns), times=TIMES)


def test_columns_by_header_name_and_skipped_columns(tmp_path):
    path = write(tmp_path, "r.csv", ["who,what,how,extra"] + rows("{},{},{},x", ("user", "item", "rating")))
    assert_ratings(load_ratings(path, columns="user=who,item=what,rating=how"))
    bare = write(tmp_path, "s.csv", rows("{},x,{},{}", ("user", "item", "rating")))
    assert_ratings(load_ratings(bare, columns="user,-,item,rating"))


def test_string_ids_dates_and_spaces(tmp_path):
    path = write(
        tmp_path,
        "r.csv",
        [
            "customer , product , score , date",
            "alice, tea , 4.5, 2001-02-03",
            "alice, milk, 3, 2001-02-04T10:00:00",
            "bob, tea, 1, 2001-02-05",
        ],
    )
    data = load_ratings(path)
    assert_ratings(
        data,
        ["alice", "alice", "bob"],
        ["tea", "milk", "tea"],
        [4.5, 3.0, 1.0],
        times=[981158400, 981280800, 981331200],
    )
    assert data.user_labels.tolist() == ["alice", "bob"] and data.item_labels.tolist() == ["milk", "tea"]


def test_a_model_keeps_string_item_ids(tmp_path):
    path = write(
        tmp_path, "r.csv", [f"u{u},i{(u * 7 + k) % 40},{1 + (u + k) % 5}" for u in range(60) for k in range(12)]
    )
    config = ff.preset("default", dim=4, rounds=3, clients_per_round=10)
    model = ff.FedRecon(config).fit(ff.split_ratings(path, config)).model
    assert model.item_labels is not None and model.item_labels[model.item_ids[0]] == "i0"
    model.save(tmp_path / "model")
    assert ff.GlobalModel.load(tmp_path / "model").item_labels.tolist() == model.item_labels.tolist()


def test_movielens_files_by_name_keep_their_strict_layout(tmp_path):
    path = write(tmp_path, "ratings.dat", rows("{}::{}::{}::{}"))
    assert_ratings(load_ratings(path), times=TIMES)
    assert_ratings(load_ratings(tmp_path), times=TIMES)  # the folder form
    bad = write(tmp_path, "u.data", ["1\t2\t3"])
    with pytest.raises(ValueError, match="line 1: expected 4 fields"):
        load_ratings(bad)


@pytest.mark.parametrize(
    ("lines", "kwargs", "match"),
    [
        (["who,what,how"] + rows("{},{},{}"), {}, r"no user or item or rating column .*user_id.*--columns"),
        (rows("{},{},{},{},{}", ("user", "item", "rating", "time", "time")), {}, "which columns"),
        (['"a",1,2'], {}, "quoted"),
        (["user,item,rating", "1,2"], {}, "line 2: expected 3 fields"),
        (["1,2,x"], {}, "line 1: rating is not a finite number"),
        (["1,2,3", "1,2,3,4"], {}, r"line 2: expected 3 fields separated by ','"),
        (["1,2,3", "x,2,3"], {}, "line 2: user id is not a non-negative integer"),
        (["1,2,3"], {"columns": "user,item,user"}, "user twice"),
        (["1,2,3"], {"columns": "user,item,colour"}, "unknown role 'colour'"),
        (["1,2,3"], {"sep": "\n"}, "sep must be"),
        (["onlyone"], {}, "separator"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, lines, kwargs, match):
    path = write(tmp_path, "r.csv", lines)
    with pytest.raises(ValueError, match=match):
        load_ratings(path, **kwargs)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_ratings(tmp_path / "nowhere.csv")
    with pytest.raises(FileNotFoundError, match="no ratings file in folder"):
        load_ratings(tmp_path)
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_ratings(tmp_path / "empty.csv")
    with pytest.raises(TypeError, match="cannot read ratings from a int"):
        load_ratings(3)


@pytest.mark.skipif(
    importlib.util.find_spec("pyarrow") is None or importlib.util.find_spec("pandas") is None,
    reason="parquet needs pyarrow and pandas (pip install '.[test]')",
)
def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"movieId": ITEMS, "rating": RATINGS, "userId": USERS, "timestamp": TIMES})
    df.to_parquet(tmp_path / "r.parquet")
    assert_ratings(load_ratings(tmp_path / "r.parquet"), times=TIMES)


def test_dataframes_with_common_names_and_string_ids():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"rating": RATINGS, "movieId": ITEMS, "userId": USERS})
    assert_ratings(load_ratings(df))
    assert_ratings(ff.ClientData.from_dataframe(df))
    named = pd.DataFrame({"uid": [str(u) for u in USERS], "iid": [f"m{i}" for i in ITEMS], "stars": RATINGS})
    data = load_ratings(named, columns={"user": "uid", "item": "iid", "rating": "stars"})
    assert_ratings(data, [str(u) for u in USERS], [f"m{i}" for i in ITEMS])
    strings = pd.DataFrame({"user": pd.array(["a", "b"], dtype="string"), "item": ["x", "y"], "rating": [1, 2]})
    assert_ratings(load_ratings(strings), ["a", "b"], ["x", "y"], [1.0, 2.0])


def test_sparse_dict_tuple_and_client_data():
    sp = pytest.importorskip("scipy.sparse")
    matrix = sp.csr_matrix((RATINGS, ([0, 0, 1, 1, 2], [0, 1, 0, 2, 3])), shape=(3, 4))
    assert_ratings(load_ratings(matrix), [0, 0, 1, 1, 2], [0, 1, 0, 2, 3])
    assert_ratings(load_ratings({"score": RATINGS, "item_id": ITEMS, "user_id": USERS}))
    assert_ratings(load_ratings((USERS, ITEMS, RATINGS, TIMES)), times=TIMES)
    data = ff.ClientData.from_coo(USERS, ITEMS, RATINGS)
    assert load_ratings(data) is data
    with pytest.raises(TypeError, match="columns"):
        load_ratings(data, columns="user,item,rating")


def test_resolve_columns_lists_what_it_knows():
    assert resolve_columns(["time", "Rating", "movie_id", "visitorid"], 4) == {
        "timestamp": 0,
        "rating": 1,
        "item": 2,
        "user": 3,
    }
    assert resolve_columns(None, 3) == {"user": 0, "item": 1, "rating": 2}
    with pytest.raises(ValueError, match="no item column"):
        resolve_columns(["user", "rating"], 2)


# ------------------------------------------------------------------------------- swapped columns


def _write_swapped(tmp_path, data, swap):
    u, i, r = data.to_coo()
    first, second = (data.item_ids[i], data.user_ids[u]) if swap else (data.user_ids[u], data.item_ids[i])
    path = tmp_path / "ratings.txt"
    np.savetxt(path, np.column_stack([first, second, r]), fmt="%d,%d,%g")
    return path


@pytest.mark.parametrize("shape", ["few-items", "many-items"])
def test_swapped_headerless_columns_warn(tmp_path, shape):
    # Users have at least 20 ratings, many items few: read swapped, every "item" has >= 20 ratings
    # while some "users" have 1 (many-items), or "users" outnumber "items" 5 to 1 (few-items).
    kw = (
        dict(num_users=60, num_items=1200, mean_ratings=30)
        if shape == "few-items"
        else dict(num_users=300, num_items=2000, mean_ratings=40, popularity=1.0)
    )
    data = ff.synthetic_ratings(seed=1, **kw)
    with pytest.warns(SwappedColumnsWarning, match="look swapped.*--columns item,user,rating"):
        load_ratings(_write_swapped(tmp_path, data, swap=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_ratings(_write_swapped(tmp_path, data, swap=False))  # the right way round: silent
        load_ratings(_write_swapped(tmp_path, data, swap=True), columns="item,user,rating")  # said outright


def test_labels_and_titles_survive_save_and_checkpoint(tmp_path):
    data = ff.ClientData.from_coo(["ann", "ann", "bo", "bo"], ["x", "ü é", "x", "z"], [4.0, 3.0, 5.0, 1.0])
    config = ff.preset("default", dim=2, rounds=2, clients_per_round=2)
    trainer = ff.FedRecon(config).fit(data)
    model = trainer.model
    assert model.set_titles([0, 2], ["Film \u00e9", ""]) == 2
    model.save(tmp_path / "model")
    back = ff.GlobalModel.load(tmp_path / "model")
    assert back.item_labels.tolist() == ["x", "z", "ü é"] and back.item_titles.tolist() == ["Film \u00e9", "", ""]
    trainer.save_checkpoint(tmp_path / "ckpt")
    resumed = ff.FedRecon.from_checkpoint(tmp_path / "ckpt", config)
    assert resumed.model.item_labels.tolist() == model.item_labels.tolist()
