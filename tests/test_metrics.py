"""ReconEval's metrics (MAE, Precision@k, HR@k, MAP@k, MRR@k, coverage@k next to RMSE, Recall@k
and NDCG@k) against a small NumPy reference written from their textbook definitions, plus the
leave-one-out protocol (HR@k, NDCG@k with one held-out rating per user)."""

from __future__ import annotations

import numpy as np
import pytest

import fedrecon_fast as ff
import reference as ref
from fedrecon_fast._rng import STREAM_DATA
from fedrecon_fast.config import ClientConfig
from fedrecon_fast.evaluation import (
    EVAL_ROUND,
    LOO_ROUND,
    _negatives,
    coverage,
    leave_one_out,
    recon_eval,
    summarize_ranking,
)


def numpy_metrics(model, data, config, k, threshold, seed):
    """Every metric of recon_eval from its definition: per user, reconstruct u with the
    reference, predict the query set, rank every non-support item by predicted rating (ties to
    the lower index) and compare the top k with the relevant query items."""
    V, b, mean = model.item_factors, model.item_bias, np.float32(model.global_mean)
    errors, per_user, shown = [], [], set()
    rmodel = ref.Model(V, b, mean, None, np.float32(0.0))
    for c in range(data.num_clients):
        items, ratings = ref._client_data(data, c)
        support, query = ref.split_client(len(items), c, config, seed, EVAL_ROUND)
        u, bu = ref.reconstruct(rmodel, items, ratings, support, config, seed, EVAL_ROUND, c)
        s = np.concatenate(support).astype(np.int64) if support else np.zeros(0, np.int64)
        q = np.concatenate(query).astype(np.int64) if query else np.zeros(0, np.int64)
        scores = V.astype(np.float64) @ u + mean + (bu + b if b is not None else 0.0)
        errors.append(scores[items[q]] - ratings[q])
        candidates = np.setdiff1d(np.arange(len(V)), items[s])
        top = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
        shown.update(top.tolist())
        relevant = set(items[q][ratings[q] >= threshold].tolist()) - set(items[s].tolist())
        if not relevant:
            continue
        hit = np.array([i in relevant for i in top], dtype=float)
        ranks = np.arange(1, len(top) + 1)
        ideal = min(k, len(relevant))
        per_user.append(
            dict(
                recall=hit.sum() / ideal,
                precision=hit.sum() / k,
                hit_rate=float(hit.any()),
                ndcg=(hit / np.log2(ranks + 1)).sum() / (1 / np.log2(np.arange(1, ideal + 1) + 1)).sum(),
                map=(np.cumsum(hit) / ranks * hit).sum() / ideal,
                mrr=1 / ranks[hit > 0][0] if hit.any() else 0.0,
            )
        )
    err = np.concatenate(errors)
    out = {
        "rmse": np.sqrt(np.mean(err**2)),
        "mae": np.mean(np.abs(err)),
        f"coverage_at_{k}": len(shown) / len(V),
        "ranking_users": len(per_user),
    }
    for name in per_user[0]:
        out[f"{name}_at_{k}"] = np.mean([p[name] for p in per_user])
    return out


@pytest.fixture(scope="module")
def trained():
    data = ff.synthetic_ratings(num_users=120, num_items=60, mean_ratings=25, seed=3).prepare(shuffle_seed=3)
    train, _, test = (data.subset(i) for i in ff.split_users(data.num_clients, seed=3))
    trainer = ff.FedRecon(ff.preset("fast", dim=6, rounds=20, clients_per_round=20, num_threads=2)).fit(train)
    return trainer.model, test


@pytest.mark.parametrize("k", [1, 5, 60])
@pytest.mark.parametrize("recon", ["exact", "sgd"])
def test_recon_eval_metrics_match_numpy_definitions(trained, k, recon):
    model, test = trained
    config = model.config.evaluation if recon == "exact" else ClientConfig(batch_size=5, recon_epochs=3)
    got = recon_eval(model, test, config=config, seed=7, k=k, relevance_threshold=4.0)
    expected = numpy_metrics(model, test, config, k, 4.0, seed=7)
    assert got["ranking_users"] == expected["ranking_users"] > 10
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    assert 0 < got[f"coverage_at_{k}"] <= 1


def test_summarize_ranking_by_hand():
    # Three users with a relevant item at k = 2: hits at ranks {2}, {1, 2}, none; one without.
    out = summarize_ranking(
        hits=[1, 2, 0, 0],
        num_relevant=[1, 3, 2, 0],
        ndcg=[0.63, 1.0, 0.0, np.nan],
        k=2,
        ap=[0.5, 1.0, 0.0, np.nan],
        rr=[0.5, 1.0, 0.0, np.nan],
        top_items=[[4, 3], [0, 3], [1, -1], [4, 0]],
        num_items=10,
    )
    assert out["precision_at_2"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["hit_rate_at_2"] == pytest.approx(2 / 3)
    assert out["map_at_2"] == pytest.approx(0.5)
    assert out["mrr_at_2"] == pytest.approx(0.5)
    assert out["coverage_at_2"] == pytest.approx(0.4)  # items 0, 1, 3, 4 of 10
    assert out["ranking_users"] == 3


def test_coverage_ignores_padding_and_counts_each_item_once():
    assert coverage([[2, 2, -1], [-1, -1, -1]], 4) == 0.25
    assert coverage(np.zeros((0, 3), np.int64), 5) == 0.0
    assert np.isnan(coverage(np.zeros((0, 1), np.int64), 0))


# ------------------------------------------------------------------------------- leave-one-out


def numpy_leave_one_out(model, data, k, seed, negatives):
    """HR@k and NDCG@k: each user's most recent rating is held out, u is reconstructed from the
    others (inference: every remaining rating), and the held-out item is ranked among the
    ``negatives`` unrated items with the smallest keys mix64(derive_seed(seed, LOO_ROUND, user,
    STREAM_DATA) ^ item) (None: every unrated item), ties to the lower item index."""
    hits, gains = [], []
    for c in range(data.num_clients):
        lo, hi = data.indptr[c], data.indptr[c + 1]
        if hi - lo < 2:
            continue
        order = lo + np.argsort(data.timestamps[lo:hi], kind="stable")
        held, rest = order[-1], np.sort(order[:-1])
        users, bias = model.reconstruct(data.item_ids[data.items[rest]], data.ratings[rest], seed=seed)
        scores = model.item_factors.astype(np.float64) @ users + model.global_mean
        if bias is not None:
            scores = scores + bias + model.item_bias
        unrated = np.setdiff1d(np.arange(model.num_items), data.items[lo:hi])
        if negatives is not None:
            base = ref.derive_seed(seed, LOO_ROUND, int(data.user_ids[c]), STREAM_DATA)
            keys = [ref.mix64(base ^ int(i)) for i in unrated]
            unrated = unrated[np.argsort(keys, kind="stable")[:negatives]]
        target = data.items[held]
        rank = sum(1 for i in unrated if scores[i] > scores[target] or (scores[i] == scores[target] and i < target))
        hits.append(float(rank < k))
        gains.append(1 / np.log2(rank + 2) if rank < k else 0.0)
    return np.mean(hits), np.mean(gains), len(hits)


@pytest.mark.parametrize("negatives", [None, 5, 99])
@pytest.mark.parametrize("k", [1, 10])
def test_leave_one_out_matches_numpy_definitions(trained, k, negatives):
    model, test = trained
    got = leave_one_out(model, test, k=k, negatives=negatives, seed=5)
    hr, ndcg, users = numpy_leave_one_out(model, test, k, seed=5, negatives=negatives)
    assert got["loo_users"] == users > 10
    assert got[f"loo_hit_rate_at_{k}"] == pytest.approx(hr)
    assert got[f"loo_ndcg_at_{k}"] == pytest.approx(ndcg)
    assert got["loo_negatives"] == negatives


def test_leave_one_out_negatives_are_unrated_distinct_and_keyed_by_user():
    data = ff.synthetic_ratings(num_users=40, num_items=30, mean_ratings=20, min_ratings=5, seed=0)
    neg = _negatives(data, 10, seed=3)
    for u in range(data.num_clients):
        rated = set(data.items[data.indptr[u] : data.indptr[u + 1]].tolist())
        drawn = neg[u][neg[u] >= 0].tolist()
        assert len(drawn) == len(set(drawn)) == min(10, 30 - len(rated)) and not rated & set(drawn)
        assert (neg[u][len(drawn) :] == -1).all()
    # A user's negatives do not depend on the other users in the call.
    np.testing.assert_array_equal(_negatives(data.subset([7, 3]), 10, seed=3), neg[[7, 3]])
    assert not np.array_equal(_negatives(data, 10, seed=4), neg)


def test_leave_one_out_holds_out_the_last_stored_rating_without_timestamps():
    # u > 0 after reconstruction from positive ratings, so candidates rank by V: 2, 3, then 0/1.
    V = np.array([[1.0], [1.0], [3.0], [2.0]], np.float32)
    model = ff.GlobalModel(V, None, 0.0, np.arange(4), ff.preset("fast", dim=1, biases=False))

    def loo(items):
        data = ff.ClientData(indptr=[0, 3], items=items, ratings=[4.0, 4.0, 5.0], item_ids=np.arange(4))
        return leave_one_out(model, data, k=1)

    assert loo([0, 1, 2]) == {"loo_hit_rate_at_1": 1.0, "loo_ndcg_at_1": 1.0, "loo_users": 1, "loo_negatives": 99}
    assert loo([2, 1, 3])["loo_hit_rate_at_1"] == 1.0  # 3 held out, the best candidate left
    assert loo([3, 1, 0])["loo_hit_rate_at_1"] == 0.0  # 0 held out, item 2 ranks first
    assert loo([3, 0, 1])["loo_ndcg_at_1"] == 0.0
