"""Inference kernels (infer_users, recommend_users) and ranking metrics of ReconEval against the
NumPy reference (tests/reference.py), plus determinism, ties, padding and hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import fedrecon_fast as ff
import reference as ref
from conftest import csr, random_client_data
from fedrecon_fast._native.structs import client_config
from fedrecon_fast.config import ClientConfig
from fedrecon_fast.evaluation import summarize_ranking
from fedrecon_fast.kernels import evaluate_users, infer_users, recommend_users
from test_kernels import ATOL, RTOL, SHAPES, make_problem

# Same layout as test_kernels.CASES: (ClientConfig overrides, with biases?, global mean).
# Inference ignores the split (every rating reconstructs), so the split cases must agree with
# "reuse"; the schedule (batches, epochs, caps, exact/SGD, init, reshuffle) still applies.
CASES = {
    "default": ({}, False, 0.0),
    "global-mean": ({"recon_lr": 0.2}, False, 3.0),
    "reshuffle": ({"reshuffle": True, "recon_lr": 0.2}, False, 0.0),
    "random-split-ignored": ({"split": "random", "support_fraction": 0.3}, True, 3.0),
    "exact": ({"recon": "exact", "ridge": 0.5}, False, 0.0),
    "exact-bias": ({"recon": "exact", "ridge": 2.0}, True, 3.0),
    "sgd-bias": ({"recon_lr": 0.2, "reshuffle": True}, True, 3.0),
    "zeros-init": ({"init": "zeros", "recon_epochs": 2}, False, 0.0),
    "epochs-and-caps": ({"recon_epochs": 5, "recon_steps_max": 7, "init_scale": 0.3}, True, 2.5),
    "l2": ({"recon_l2": 0.1}, False, 0.0),
    "no-recon-steps": ({"recon_epochs": 0, "init_scale": 0.4}, True, 3.0),
}


def problem(case, num_items, dim, batch_size, seed):
    return make_problem(case, num_items, dim, batch_size, seed, cases=CASES)


def assert_top_k_match(items, scores, expected_items, expected_scores):
    """Native top-k against the reference. Scores agree up to float32 rounding; the items
    agree wherever the reference's neighbouring scores are not within that rounding (a near-tie
    may legitimately swap), and padding (-1 / NaN) agrees exactly."""
    assert items.dtype == np.int64 and scores.dtype == np.float32
    assert items.shape == expected_items.shape and scores.shape == expected_scores.shape
    assert_array_equal(items < 0, expected_items < 0)
    assert_array_equal(np.isnan(scores), items < 0)
    assert_allclose(scores, expected_scores, rtol=RTOL, atol=ATOL)
    for row in range(items.shape[0]):
        s = expected_scores[row]
        for r in range(items.shape[1]):
            if items[row, r] < 0:
                continue
            close = [
                abs(s[q] - s[r]) <= ATOL + RTOL * abs(s[r])
                for q in (r - 1, r + 1)
                if 0 <= q < len(s) and not np.isnan(s[q])
            ]
            if not any(close):
                assert items[row, r] == expected_items[row, r], (row, r)


# ------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize(("num_items", "dim", "batch_size", "num_threads"), SHAPES)
@pytest.mark.parametrize("case", list(CASES))
def test_infer_users_matches_reference(case, num_items, dim, batch_size, num_threads, seed):
    V, data, clients, config, kwargs = problem(case, num_items, dim, batch_size, seed)

    users, user_bias = infer_users(V, data, clients, config, num_threads=num_threads, **kwargs)
    expected_users, expected_bias = ref.infer_users(V, data, clients, config, **kwargs)

    assert users.dtype == np.float32 and users.shape == (len(clients), dim)
    assert_allclose(users, expected_users, rtol=RTOL, atol=ATOL)
    if expected_bias is None:
        assert user_bias is None
    else:
        assert user_bias.dtype == np.float32
        assert_allclose(user_bias, expected_bias, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("exclude_seen", [True, False], ids=["exclude-seen", "include-seen"])
@pytest.mark.parametrize(("num_items", "dim", "batch_size", "num_threads"), SHAPES)
@pytest.mark.parametrize("case", list(CASES))
def test_recommend_users_matches_reference(case, num_items, dim, batch_size, num_threads, exclude_seen):
    V, data, clients, config, kwargs = problem(case, num_items, dim, batch_size, seed=3)
    # k = 1, a middle value, and more than there are items (padding).
    for k in sorted({1, max(1, num_items // 3), num_items + 2}):
        items, scores = recommend_users(
            V, data, clients, config, k=k, exclude_seen=exclude_seen, num_threads=num_threads, **kwargs
        )
        expected = ref.recommend_users(V, data, clients, config, k=k, exclude_seen=exclude_seen, **kwargs)
        assert_top_k_match(items, scores, *expected)
        # Never a rated item when excluded; scores non-increasing along a row.
        for i, c in enumerate(clients):
            seen = set(data.items[data.indptr[c] : data.indptr[c + 1]].tolist())
            got = [x for x in items[i].tolist() if x >= 0]
            if exclude_seen:
                assert not seen & set(got)
                assert len(got) == min(k, num_items - len(seen))
            else:
                assert len(got) == min(k, num_items)
            assert len(set(got)) == len(got)
            assert np.all(np.diff(scores[i][: len(got)]) <= 0)


@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(
    "config", [ClientConfig(reshuffle=True), ClientConfig(recon="exact", ridge=2.0)], ids=["sgd-reshuffle", "exact"]
)
def test_inference_is_bit_identical_for_any_thread_count_and_position(config, biases):
    rng = np.random.default_rng(11)
    data = random_client_data(rng, 300, rng.integers(0, 60, size=200))
    V = rng.normal(0.0, 0.3, size=(300, 12)).astype(np.float32)
    kw = dict(
        item_bias=rng.normal(0.0, 0.2, size=300).astype(np.float32) if biases else None,
        global_mean=3.0,
        seed=5,
        round=2,
    )
    clients = rng.permutation(200)
    users = [infer_users(V, data, clients, config, num_threads=t, **kw) for t in (1, 2, 3)]
    recs = [recommend_users(V, data, clients, config, k=15, num_threads=t, **kw) for t in (1, 2, 3)]
    for (u, b), (items, scores) in zip(users[1:], recs[1:]):
        assert_array_equal(u, users[0][0])
        assert_array_equal(b, users[0][1])
        assert_array_equal(items, recs[0][0])
        assert_array_equal(scores, recs[0][1])
    # A user's result depends only on its ratings: alone, or at another place in the batch.
    for pos in (0, 17, 199):
        u, b = infer_users(V, data, [clients[pos]], config, num_threads=1, **kw)
        items, scores = recommend_users(V, data, [clients[pos]], config, k=15, **kw)
        assert_array_equal(u[0], users[0][0][pos])
        assert_array_equal(items[0], recs[0][0][pos])
        assert_array_equal(scores[0], recs[0][1][pos])
    # ... and it does depend on the seed (SGD from a random initial u).
    if config.recon == "sgd":
        other = infer_users(V, data, clients, config, **dict(kw, seed=6))[0]
        assert not np.array_equal(other, users[0][0])


def test_ties_go_to_the_lower_item_index():
    # Items 1, 4 and 6 share one row of V (so one score, exactly); 0 and 5 share a better one.
    V = np.array([[2.0], [1.0], [0.5], [-1.0], [1.0], [2.0], [1.0], [0.0]], dtype=np.float32)
    data = csr([0, 1, 3], [2, 3, 7], [4.0, 5.0, 1.0], 8)
    config = ClientConfig(recon="exact", ridge=1.0, batch_size=1)
    items, scores = recommend_users(V, data, None, config, k=6, num_threads=2)
    # User 0 (rated item 2 with 4.0: u > 0): 0, 5 tie, then 1, 4, 6 tie, then 7 (score 0).
    assert_array_equal(items[0], [0, 5, 1, 4, 6, 7])
    assert scores[0][0] == scores[0][1] and scores[0][2] == scores[0][3] == scores[0][4]
    # User 1 (u < 0 from rating 5 on v = -1): the lowest factors rank first, 3 and 7 are seen.
    assert_array_equal(items[1], [2, 1, 4, 6, 0, 5])
    expected = ref.recommend_users(V, data, None, config, k=6)
    assert_array_equal(items, expected[0])


def test_nan_scores_are_never_recommended_and_padding_is_minus_one():
    # Rows 1 and 3 of V are NaN (a corrupted model, checks off): their scores are NaN, so they
    # are skipped; k beyond the remaining candidates pads with -1 / NaN.
    V = np.array([[1.0], [np.nan], [2.0], [np.nan], [3.0]], dtype=np.float32)
    data = csr([0, 1], [0], [5.0], 5)
    config = ClientConfig(recon="exact", batch_size=1)
    items, scores = recommend_users(V, data, None, config, k=4, check_finite=False)
    assert_array_equal(items, [[4, 2, -1, -1]])
    assert np.isfinite(scores[0, :2]).all() and np.isnan(scores[0, 2:]).all()
    # A diverged reconstruction (u NaN) scores NaN everywhere: no recommendations at all.
    wild = ClientConfig(recon_lr=1e30, batch_size=1, recon_epochs=4)
    data = csr([0, 3], [0, 2, 4], [5.0, -5.0, 5.0], 5)
    V = np.array([[1.0], [-1.0], [2.0], [-2.0], [3.0]], dtype=np.float32)
    u, _ = infer_users(V, data, None, wild)
    assert np.isnan(u).all()
    items, scores = recommend_users(V, data, None, wild, k=3, exclude_seen=False)
    assert_array_equal(items, [[-1, -1, -1]]) and np.isnan(scores).all()


def test_users_without_ratings_get_the_initial_embedding():
    rng = np.random.default_rng(2)
    V = rng.normal(size=(6, 3)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    data = csr([0, 0, 2], [1, 2], [4.0, 2.0], 6)
    u, bu = infer_users(V, data, None, ClientConfig(init="zeros"), item_bias=bias, global_mean=3.0)
    assert not u[0].any() and bu[0] == 0.0
    # With u = 0 and b_u = 0 the scores are global_mean + b_i: items ranked by their bias.
    items, scores = recommend_users(V, data, [0], ClientConfig(init="zeros"), k=6, item_bias=bias, global_mean=3.0)
    assert_array_equal(items[0], np.argsort(-bias, kind="stable"))
    assert_allclose(scores[0], 3.0 + bias[items[0]], rtol=1e-6)


# ------------------------------------------------------------------------------- ranking metrics

THRESHOLDS = {"none": None, "mid": "mid"}  # "mid": global mean + 0.2, so about 40% are relevant


@pytest.mark.parametrize("threshold", list(THRESHOLDS))
@pytest.mark.parametrize(("num_items", "dim", "batch_size", "num_threads"), SHAPES)
@pytest.mark.parametrize("case", ["default", "exact-bias", "sgd-bias", "random-split-ignored", "reshuffle"])
def test_ranking_metrics_match_reference(case, num_items, dim, batch_size, num_threads, threshold):
    V, data, clients, config, kwargs = problem(case, num_items, dim, batch_size, seed=4)
    if case == "random-split-ignored":
        config = ClientConfig(batch_size=batch_size, split="random", support_fraction=0.3)
    thr = None if threshold == "none" else kwargs["global_mean"] + 0.2
    for k in sorted({1, 3, num_items + 1}):
        out = evaluate_users(V, data, clients, config, num_threads=num_threads, k=k, relevance_threshold=thr, **kwargs)
        expected = ref.evaluate_users(V, data, clients, config, k=k, relevance_threshold=thr, **kwargs)
        assert_array_equal(out["num_relevant"], expected["num_relevant"])
        assert_array_equal(out["hits"], expected["hits"])
        for name in ("ndcg", "ap", "rr"):
            assert_allclose(out[name], expected[name], rtol=1e-12, equal_nan=True, err_msg=name)
            assert_array_equal(np.isnan(out[name]), out["num_relevant"] == 0)
        assert_array_equal(out["top_items"], expected["top_items"])
        assert np.all(out["hits"] <= np.minimum(k, out["num_relevant"]))


def test_ranking_does_not_change_the_rating_metrics():
    V, data, clients, config, kwargs = problem("sgd-bias", 30, 16, 5, seed=1)
    plain = evaluate_users(V, data, clients, config, num_threads=2, **kwargs)
    ranked = evaluate_users(V, data, clients, config, num_threads=3, k=5, **kwargs)
    assert set(plain) == {"sq_err_sum", "abs_err_sum", "num_examples", "num_correct"}
    assert set(ranked) == set(plain) | {"num_relevant", "hits", "ndcg", "ap", "rr", "top_items"}
    for name in plain:
        assert_array_equal(ranked[name], plain[name])


def test_ranking_metrics_are_bit_identical_for_any_thread_count():
    rng = np.random.default_rng(8)
    data = random_client_data(rng, 200, rng.integers(0, 50, size=150))
    V = rng.normal(0.0, 0.5, size=(200, 8)).astype(np.float32)
    outs = [
        evaluate_users(
            V, data, None, ClientConfig(split="random"), k=10, relevance_threshold=3.0, num_threads=t, global_mean=3.0
        )
        for t in (1, 2, 3)
    ]
    for o in outs[1:]:
        for name, column in outs[0].items():
            assert_array_equal(o[name], column, err_msg=name)


def test_ranking_metrics_by_hand():
    # batch 1, split "batches": support = positions 0, 2 (items 0, 1, rated 5), query =
    # positions 1, 3 (item 3 rated 5, item 2 rated 1). Exact reconstruction gives u > 0, so
    # the candidates 2, 3, 4 rank 4, 3, 2. Relevant (>= 4): {3}, found at rank 2.
    V = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]], dtype=np.float32)
    data = csr([0, 4], [0, 3, 1, 2], [5.0, 5.0, 5.0, 1.0], 5)
    config = ClientConfig(batch_size=1, recon="exact")
    at2 = evaluate_users(V, data, None, config, k=2)
    assert at2["num_relevant"][0] == 1 and at2["hits"][0] == 1
    assert at2["ndcg"][0] == pytest.approx(1.0 / np.log2(3.0))
    at1 = evaluate_users(V, data, None, config, k=1)
    assert at1["hits"][0] == 0 and at1["ndcg"][0] == 0.0
    # Every query item relevant: {2, 3}; at k = 3 both are hit, at ranks 2 and 3.
    every = evaluate_users(V, data, None, config, k=3, relevance_threshold=None)
    assert every["num_relevant"][0] == 2 and every["hits"][0] == 2
    assert every["ndcg"][0] == pytest.approx((1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3)))
    # Reuse: the query items are all support items, never candidates: nothing is relevant.
    reuse = evaluate_users(V, data, None, ClientConfig(batch_size=1, recon="exact", split="reuse"), k=3)
    assert reuse["num_relevant"][0] == 0 and np.isnan(reuse["ndcg"][0])


def test_summarize_ranking_averages_users_with_a_relevant_item():
    # Users: 2 of 3 relevant hit at k=2 (recall 2/2), 1 of 1 (1/1), 0 of 5 (0/2), none relevant.
    out = summarize_ranking([2, 1, 0, 0], [3, 1, 5, 0], [0.9, 0.6, 0.0, np.nan], 2, per_user=True)
    assert out["recall_at_2"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert out["ndcg_at_2"] == pytest.approx(0.5)
    assert out["ranking_users"] == 3 and out["ranking_users_without_relevant"] == 1
    assert out["user_recall_at_2"]["p50"] == 1.0
    empty = summarize_ranking([0], [0], [np.nan], 10)
    assert np.isnan(empty["recall_at_10"]) and np.isnan(empty["ndcg_at_10"])
    assert empty["ranking_users"] == 0 and empty["ranking_users_without_relevant"] == 1


def test_recon_eval_and_fedrecon_evaluate_report_ranking_metrics():
    data = ff.synthetic_ratings(num_users=200, num_items=120, seed=1).prepare(shuffle_seed=1)
    train, val, test = (data.subset(i) for i in ff.split_users(data.num_clients, seed=1))
    trainer = ff.FedRecon(ff.preset("paper", dim=4, rounds=3, clients_per_round=20, eval_every=1)).fit(train, val)
    # Validation during training stays RMSE-only (ranking scores every item for every user).
    assert all("recall_at_10" not in k for h in trainer.history for k in h)
    m = trainer.evaluate(test)
    assert {"recall_at_10", "ndcg_at_10", "ranking_users", "ranking_users_without_relevant"} <= set(m)
    assert m["ranking_users"] + m["ranking_users_without_relevant"] == test.num_clients
    assert 0 <= m["recall_at_10"] <= 1 and 0 <= m["ndcg_at_10"] <= 1
    five = trainer.evaluate(test, k=5, relevance_threshold=None)
    assert "recall_at_5" in five and five["ranking_users"] >= m["ranking_users"]
    assert five["rmse"] == m["rmse"]
    plain = ff.recon_eval(trainer.model, test, k=None)
    assert not any(k.startswith(("recall", "ndcg", "ranking")) for k in plain)
    stats = evaluate_users(trainer.model.item_factors, test, None, trainer.config.evaluation, k=10, round=2**64 - 1)
    assert (
        m["recall_at_10"] == summarize_ranking(stats["hits"], stats["num_relevant"], stats["ndcg"], 10)["recall_at_10"]
    )


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kernel", "kwargs", "error", "match"),
    [
        (recommend_users, {"k": 0}, ValueError, "k must be"),
        (recommend_users, {"k": 2.0}, TypeError, "k must be"),
        (recommend_users, {"k": True}, TypeError, "k must be"),
        (recommend_users, {"exclude_seen": "yes"}, TypeError, "exclude_seen"),
        (evaluate_users, {"k": 0}, ValueError, "k must be"),
        (evaluate_users, {"k": 3, "relevance_threshold": float("nan")}, ValueError, "relevance_threshold"),
        (evaluate_users, {"k": 3, "relevance_threshold": "4"}, TypeError, "relevance_threshold"),
        (infer_users, {"config": "fast"}, TypeError, "config"),
        (infer_users, {"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kernel, kwargs, error, match):
    rng = np.random.default_rng(0)
    data = random_client_data(rng, 6, (0, 1, 4))
    V = rng.normal(size=(6, 3)).astype(np.float32)
    kwargs = dict(kwargs)
    config = kwargs.pop("config", ClientConfig())
    with pytest.raises(error, match=match):
        kernel(V, data, None, config, **kwargs)


def test_native_functions_reject_bad_k_and_items():
    from fedrecon_fast._native import core as _core

    V = np.ones((4, 2), np.float32)
    args = (
        V,
        None,
        0.0,
        np.array([0, 2], np.int64),
        np.array([0, 4], np.int32),
        np.ones(2, np.float32),
        np.array([0], np.int64),
        client_config(ClientConfig()),
        0,
        0,
        1,
    )
    with pytest.raises(ValueError, match="k must be"):
        _core.recommend_users(*args[:6], np.array([0], np.int64), args[7], 0, 0, 1, k=0)
    with pytest.raises(ValueError, match="k must be"):
        _core.evaluate_users(*args, k=-1)
    with pytest.raises(ValueError, match="relevance_threshold"):
        _core.evaluate_users(*args, k=2, relevance_threshold=float("nan"))
    with pytest.raises(IndexError, match="item id 4"):
        _core.recommend_users(*args, k=2)
    with pytest.raises(IndexError, match="item id 4"):
        _core.infer_users(*args)
    with pytest.raises(IndexError, match="client id 3"):
        _core.infer_users(*args[:6], np.array([3], np.int64), *args[7:])
