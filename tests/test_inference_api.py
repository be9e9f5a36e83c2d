"""GlobalModel.reconstruct / predict / recommend: input forms, original item ids, unknown items,
defaults, bad input, and whether a trained model's recommendations are any good."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal

import fedrecon_fast as ff
from fedrecon_fast.inference import INFERENCE_ROUND


def _trained(biases: bool, rounds: int = 40):
    data = ff.synthetic_ratings(num_users=400, num_items=300, seed=3).prepare(shuffle_seed=3)
    train, val, test = (data.subset(i) for i in ff.split_users(data.num_clients, seed=3))
    config = ff.preset("paper", dim=8, rounds=rounds, clients_per_round=40, biases=biases, seed=3, num_threads=2)
    model = ff.FedRecon(config).fit(train).model
    # Original ids that are not 0..I-1 and not sorted by row, to catch any index mix-up.
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1000, 1000 + 7 * model.num_items, 7))
    model.item_ids = ids
    test = ff.ClientData(test.indptr, test.items, test.ratings, test.timestamps, test.user_ids, ids)
    return model, test


@pytest.fixture(scope="module", params=[False, True], ids=["no-bias", "bias"])
def trained(request):
    return _trained(request.param)


def _user(test, c):
    lo, hi = test.indptr[c], test.indptr[c + 1]
    return test.item_ids[test.items[lo:hi]], test.ratings[lo:hi]


def test_recommend_returns_original_ids_of_the_native_top_k(trained):
    model, test = trained
    items, scores = model.recommend(test, k=7)
    rows, expected_scores = ff.recommend_users(
        model.item_factors,
        test,
        None,
        model.config.evaluation,
        k=7,
        item_bias=model.item_bias,
        global_mean=model.global_mean,
        seed=model.config.seed,
        round=INFERENCE_ROUND,
    )
    assert items.shape == scores.shape == (test.num_clients, 7)
    assert items.dtype == np.int64 and scores.dtype == np.float32
    assert_array_equal(items, np.where(rows >= 0, model.item_ids[rows], -1))
    assert (rows < 0).any()  # a test user rated every item: nothing left to recommend
    assert_array_equal(scores, expected_scores)
    for c in range(test.num_clients):
        assert not set(_user(test, c)[0].tolist()) & set(items[c].tolist())


def test_every_input_form_gives_the_same_result(trained):
    model, test = trained
    sub = test.subset(np.arange(5))
    items, scores = model.recommend(sub, k=6)
    users, bias = model.reconstruct(sub)
    # One user at a time, as arrays and as a dict.
    for c in range(5):
        ids, ratings = _user(sub, c)
        one_items, one_scores = model.recommend(ids, ratings, k=6)
        assert one_items.shape == (6,)
        assert_array_equal(one_items, items[c])
        assert_array_equal(one_scores, scores[c])
        u, b = model.reconstruct(list(ids), list(ratings))
        assert u.shape == (model.dim,) and u.dtype == np.float32
        assert_array_equal(u, users[c])
        assert (b is None) == (model.item_bias is None) and (b is None or b == bias[c])
        if len(set(ids.tolist())) == len(ids):
            d_items, _ = model.recommend(dict(zip(ids.tolist(), ratings.tolist())), k=6)
            assert_array_equal(d_items, items[c])
    # A DataFrame (users in increasing user_id order; rows in stored order per user).
    user, item_index, ratings = sub.to_coo()
    df = pd.DataFrame({"user_id": sub.user_ids[user], "item_id": sub.item_ids[item_index], "rating": ratings})
    order = np.argsort(sub.user_ids, kind="stable")
    df_items, df_scores = model.recommend(df, k=6)
    assert_array_equal(df_items, items[order])
    assert_array_equal(df_scores, scores[order])
    # A scipy.sparse matrix whose column j is original item id j (rows: users in order). Its
    # ratings come in increasing item id order, so compare with a ClientData in that order.
    cols = sub.item_ids[item_index]
    matrix = sp.csr_matrix((ratings, (user, cols)), shape=(5, int(cols.max()) + 1))
    o = np.lexsort((cols, user))
    by_id = ff.ClientData.from_coo(user[o], cols[o], ratings[o])
    sp_items, sp_scores = model.recommend(matrix, k=6)
    ref_items, ref_scores = model.recommend(by_id, k=6)
    assert_array_equal(sp_items, ref_items)
    assert_array_equal(sp_scores, ref_scores)


def test_a_client_data_with_its_own_item_mapping_is_remapped(trained):
    model, test = trained
    # New users' ratings as COO with original ids: from_coo builds its own (smaller) mapping.
    user, item_index, ratings = test.subset(np.arange(8)).to_coo()
    ids = test.item_ids[item_index]
    fresh = ff.ClientData.from_coo(user, ids, ratings)
    assert not np.array_equal(fresh.item_ids, model.item_ids)
    aligned = ff.ClientData(
        fresh.indptr,
        ff.inference.item_rows(model, fresh.item_ids)[fresh.items],
        fresh.ratings,
        None,
        fresh.user_ids,
        model.item_ids,
    )
    a = model.recommend(fresh, k=5)
    b = model.recommend(aligned, k=5)
    assert_array_equal(a[0], b[0])
    assert_array_equal(a[1], b[1])
    assert_array_equal(model.reconstruct(fresh)[0], model.reconstruct(aligned)[0])


def test_unknown_items_raise_or_are_dropped(trained):
    model, test = trained
    ids, ratings = _user(test, 0)
    bad = np.concatenate([ids, [5, 99999]])
    with pytest.raises(ValueError, match=r"unknown to the model: 5, 99999.*ignore_unknown"):
        model.recommend(bad, np.concatenate([ratings, [4.0, 2.0]]))
    kept = model.recommend(bad, np.concatenate([ratings, [4.0, 2.0]]), ignore_unknown=True)
    plain = model.recommend(ids, ratings)
    assert_array_equal(kept[0], plain[0])
    assert_array_equal(kept[1], plain[1])
    df = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [int(ids[0]), 123456, 7], "rating": [5.0, 4.0, 3.0]})
    with pytest.raises(ValueError, match=r"column 'item_id' has item ids unknown to the model: 7, 123456"):
        model.reconstruct(df)
    users, _ = model.reconstruct(df, ignore_unknown=True)
    assert users.shape == (2, model.dim)
    # Many unknown ids: the message lists ten and the count.
    with pytest.raises(ValueError, match=r"\(30 in all\)"):
        model.reconstruct(np.arange(30), np.ones(30))
    # Predictions for unknown ids: ValueError, or NaN with ignore_unknown.
    u, b = model.reconstruct(ids, ratings)
    with pytest.raises(ValueError, match="99999"):
        model.predict(u, [ids[0], 99999], b)
    p = model.predict(u, [ids[0], 99999], b, ignore_unknown=True)
    assert np.isfinite(p[0]) and np.isnan(p[1])


def test_predict_matches_the_recommended_scores(trained):
    model, test = trained
    sub = test.subset(np.arange(6))
    items, scores = model.recommend(sub, k=5)
    users, bias = model.reconstruct(sub)
    per_user = model.predict(users, items, bias)
    assert per_user.shape == (6, 5) and per_user.dtype == np.float32
    assert_allclose(per_user, scores, rtol=1e-5, atol=1e-5)
    shared = model.predict(users, model.item_ids[:4], bias)
    assert shared.shape == (6, 4)
    one = model.predict(users[2], items[2], None if bias is None else bias[2])
    assert one.shape == (5,)
    assert_allclose(one, scores[2], rtol=1e-5, atol=1e-5)
    # By hand: u . v + global_mean (+ b_u + b_i).
    row = ff.inference.item_rows(model, items[2, :1])[0]
    expected = users[2] @ model.item_factors[row] + model.global_mean
    if bias is not None:
        expected += bias[2] + model.item_bias[row]
    assert one[0] == pytest.approx(expected, rel=1e-5)


def test_include_seen_and_padding(trained):
    model, test = trained
    ids, ratings = _user(test, 1)
    k = model.num_items + 3
    items, scores = model.recommend(ids, ratings, k=k)
    unseen = model.num_items - len(set(ids.tolist()))
    assert np.all(items[unseen:] == -1) and np.isnan(scores[unseen:]).all()
    assert np.isfinite(scores[:unseen]).all()
    everything, _ = model.recommend(ids, ratings, k=k, exclude_seen=False)
    assert sorted(everything[: model.num_items].tolist()) == sorted(model.item_ids.tolist())
    assert np.all(everything[model.num_items :] == -1)


def test_defaults_are_the_models_evaluation_config_and_seed(trained):
    model, test = trained
    ids, ratings = _user(test, 2)
    u, _ = model.reconstruct(ids, ratings)
    same, _ = model.reconstruct(ids, ratings, config=model.config.evaluation, seed=model.config.seed)
    assert_array_equal(u, same)
    other, _ = model.reconstruct(ids, ratings, seed=model.config.seed + 1)
    assert not np.array_equal(u, other)  # SGD from a seeded random initial u
    exact = model.config.evaluation.__class__(recon="exact", ridge=3.0)
    a, _ = model.reconstruct(ids, ratings, config=exact, seed=1)
    b, _ = model.reconstruct(ids, ratings, config=exact, seed=2)
    assert_array_equal(a, b)
    # A model without a config reconstructs with the defaults and seed 0.
    bare = ff.GlobalModel(model.item_factors, model.item_bias, model.global_mean, model.item_ids)
    assert_array_equal(
        bare.reconstruct(ids, ratings)[0], model.reconstruct(ids, ratings, config=ff.ClientConfig(), seed=0)[0]
    )


def test_bad_inputs_name_the_argument(trained):
    model, test = trained
    ids, ratings = _user(test, 0)
    u, b = model.reconstruct(ids, ratings)
    cases = [
        (lambda: model.recommend(ids), TypeError, "ratings is required"),
        (lambda: model.recommend(test, ratings), TypeError, "ratings is only for"),
        (lambda: model.recommend({int(ids[0]): 4.0}, [1.0]), TypeError, "ratings is only for"),
        (lambda: model.recommend(ids, ratings[:-1]), ValueError, "same length"),
        (lambda: model.recommend(ids.astype(float), ratings), TypeError, "items"),
        (lambda: model.recommend(ids, np.where(np.arange(len(ids)) == 0, np.nan, ratings)), ValueError, "ratings"),
        (lambda: model.recommend(ids, ratings.astype(str)), TypeError, "ratings"),
        (lambda: model.recommend(ids, ratings, k=0), ValueError, "k must be"),
        (lambda: model.recommend(ids, ratings, k=None), TypeError, "k must be"),
        (lambda: model.recommend(ids, ratings, exclude_seen=1), TypeError, "exclude_seen"),
        (lambda: model.recommend(ids, ratings, ignore_unknown="yes"), TypeError, "ignore_unknown"),
        (lambda: model.recommend(ids, ratings, config="paper"), TypeError, "config"),
        (lambda: model.recommend(ids, ratings, seed=-2), ValueError, "seed"),
        (lambda: model.recommend(ids, ratings, num_threads=-1), ValueError, "num_threads"),
        (
            lambda: model.recommend(pd.DataFrame({"person": [1], "item_id": [1], "rating": [1.0]})),
            ValueError,
            "user_id",
        ),
        (lambda: model.predict(u[:-1], ids, b), ValueError, "users"),
        (lambda: model.predict(u, ids.reshape(1, -1), b), ValueError, "items"),
        (lambda: model.predict(np.stack([u, u]), np.stack([ids, ids, ids]), b), ValueError, "items"),
        (lambda: model.predict(u, [0.5], b), TypeError, "items"),
    ]
    if b is None:
        cases.append((lambda: model.predict(u, ids, 0.0), ValueError, "user_bias"))
    else:
        cases.append((lambda: model.predict(u, ids), ValueError, "user_bias"))
        cases.append((lambda: model.predict(np.stack([u, u]), ids, [b]), ValueError, "user_bias"))
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_empty_and_single_rating_users():
    model, test = _trained(True, rounds=2)
    # No known rating at all: cold start from the initial u (documented), still k items.
    items, scores = model.recommend([], [], k=4)
    assert (items >= 0).all() and np.isfinite(scores).all()
    items, _ = model.recommend({int(model.item_ids[0]): 5.0}, k=3)
    assert int(model.item_ids[0]) not in items.tolist()


def test_recommendations_rank_held_out_liked_items_above_chance():
    # Train on synthetic users with a real low-rank structure; for unseen test users hide a
    # third of their ratings, recommend from the rest, and count hidden liked items (rating
    # >= 4) in the top 10. Chance is 10 * hidden liked / candidates per user; an untrained
    # model is the control. Both must be clearly beaten.
    data = ff.synthetic_ratings(num_users=1500, num_items=500, seed=11).prepare(shuffle_seed=11)
    train, _, test = (data.subset(i) for i in ff.split_users(data.num_clients, seed=11))
    config = ff.preset("fast", dim=16, rounds=150, clients_per_round=100, seed=11, num_threads=2)
    trained = ff.FedRecon(config).fit(train).model
    untrained = ff.GlobalModel.initialize(train.item_ids, config, global_mean=trained.global_mean)

    rng = np.random.default_rng(5)
    user, items, ratings = test.to_coo()
    hidden = rng.random(len(items)) < 1 / 3
    shown = ff.ClientData(
        np.concatenate([[0], np.cumsum(np.bincount(user[~hidden], minlength=test.num_clients))]),
        items[~hidden],
        ratings[~hidden],
        None,
        test.user_ids,
        test.item_ids,
    )
    liked = hidden & (ratings >= 4)

    def hits(model):
        top, _ = model.recommend(shown, k=10)
        rows = ff.inference.item_rows(model, top)
        found = np.zeros((test.num_clients, test.num_items), dtype=bool)
        found[np.repeat(np.arange(test.num_clients), 10), rows.ravel()] = True
        return int(found[user[liked], items[liked]].sum())

    candidates = test.num_items - np.bincount(user[~hidden], minlength=test.num_clients)
    chance = float((10 * np.bincount(user[liked], minlength=test.num_clients) / candidates).sum())
    got, control = hits(trained), hits(untrained)
    assert chance > 20  # enough hidden liked items for the comparison to mean something
    # Measured: 166 hits, chance 58, untrained 52.
    assert got > 2 * chance, (got, chance)
    assert got > 2 * control, (got, control)
    # ReconEval's Recall@10 agrees (measured .15): far above random ranking (~10 / 500).
    metrics = ff.FedRecon(config, model=trained).evaluate(test, k=10)
    assert metrics["recall_at_10"] > 4 * 10 / test.num_items
