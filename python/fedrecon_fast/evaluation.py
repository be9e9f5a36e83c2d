"""ReconEval (Singhal et al. 2021): metrics of a global model on users it never saw.

For each evaluation user the ratings are split into support and query sets, the user's
embedding is reconstructed on the support set with V frozen, and every query rating is scored
once. Metrics are pooled over all query ratings (example-weighted): MSE, RMSE = sqrt(pooled
MSE), and rating accuracy = fraction with |r - r_hat| <= 0.5.

Also MAE = mean |r - r_hat| over the same pooled query ratings.

Ranking metrics at a cut-off k (top-k recommendation quality): the candidates of a user are all
items except its support items, ranked by predicted rating (ties to the lower item index); its
relevant items are the distinct query items it rated at least ``relevance_threshold`` (4.0 by
default, "liked" on MovieLens' 1-5 scale; None makes every query item relevant) that are
candidates. With ``hits`` the relevant items in the top k and ranks counted from 1:

- Recall@k = hits / min(k, |relevant|); Precision@k = hits / k;
- HR@k (hit rate) = 1 if hits > 0, else 0;
- NDCG@k uses binary gains 1 / log2(rank + 1) and the ideal DCG of min(k, |relevant|) hits;
- MAP@k: the mean of AP@k = (sum of Precision@rank at the rank of each hit) / min(k, |relevant|);
- MRR@k: the mean of 1 / (rank of the first hit), 0 without a hit in the top k.

These are averaged over the users with at least one relevant item (users without one are
excluded and counted). Catalogue coverage@k is the fraction of all items that appear in at
least one evaluated user's top k.

:func:`leave_one_out` is the protocol of federated recommendation papers (HR@k and NDCG@k with
one held-out rating per user).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import kernels
from ._validation import check_int
from .config import ClientConfig

# Evaluation draws its random streams from a round number training never uses, so the same
# users get the same support/query split and initial u at every evaluation.
EVAL_ROUND = 2**64 - 1


def summarize(sq_err_sum, num_examples, num_correct, *, per_user: bool = False, abs_err_sum=None) -> dict:
    """Pool per-user sums into metrics; optionally add per-user distributions.

    With ``abs_err_sum`` (per-user sums of ``|r - r_hat|``) the result also has ``mae``.
    """
    sq = np.asarray(sq_err_sum, dtype=np.float64)
    n = np.asarray(num_examples, dtype=np.int64)
    correct = np.asarray(num_correct, dtype=np.int64)
    total = int(n.sum())
    mse = float(sq.sum() / total) if total else float("nan")
    out: dict[str, Any] = {
        "loss": mse,
        "rmse": float(np.sqrt(mse)) if total else float("nan"),
        "accuracy": float(correct.sum() / total) if total else float("nan"),
        "users": int((n > 0).sum()),
        "ratings": total,
    }
    if abs_err_sum is not None:
        out["mae"] = float(np.sum(abs_err_sum, dtype=np.float64) / total) if total else float("nan")
    if per_user:
        scored = n > 0
        user_rmse = np.sqrt(sq[scored] / n[scored])
        user_acc = correct[scored] / n[scored]
        for name, values in (("user_rmse", user_rmse), ("user_accuracy", user_acc)):
            if values.size:
                out[name] = _distribution(values)
    return out


def _distribution(values: np.ndarray) -> dict:
    """Mean, std and the 10/50/90% quantiles of per-user values."""
    q10, q50, q90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p10": float(q10),
        "p50": float(q50),
        "p90": float(q90),
    }


def summarize_ranking(
    hits,
    num_relevant,
    ndcg,
    k: int,
    *,
    per_user: bool = False,
    ap=None,
    rr=None,
    top_items=None,
    num_items: int | None = None,
) -> dict:
    """Mean ranking metrics at cut-off k over the users with a relevant item.

    Returns ``recall_at_{k}``, ``ndcg_at_{k}``, ``precision_at_{k}`` and ``hit_rate_at_{k}``
    (NaN when no user has a relevant item), ``ranking_users`` (users averaged) and
    ``ranking_users_without_relevant`` (excluded). With ``ap`` and ``rr`` (per-user average
    precision and reciprocal rank) also ``map_at_{k}`` and ``mrr_at_{k}``; with ``top_items``
    (users x k item indices, -1 padding) and ``num_items`` also ``coverage_at_{k}``, the
    fraction of the catalogue in at least one top k. With ``per_user``, mean/std/quantiles of
    Recall@k and NDCG@k as ``user_recall_at_{k}`` and ``user_ndcg_at_{k}``.
    """
    hits = np.asarray(hits, dtype=np.int64)
    rel = np.asarray(num_relevant, dtype=np.int64)
    ranked = rel > 0
    hits_r = hits[ranked]
    per_user_values = {
        "recall": hits_r / np.minimum(k, rel[ranked]),
        "precision": hits_r / k,
        "hit_rate": (hits_r > 0).astype(np.float64),
        "ndcg": np.asarray(ndcg, dtype=np.float64)[ranked],
    }
    if ap is not None:
        per_user_values["map"] = np.asarray(ap, dtype=np.float64)[ranked]
    if rr is not None:
        per_user_values["mrr"] = np.asarray(rr, dtype=np.float64)[ranked]
    out: dict[str, Any] = {
        f"{name}_at_{k}": float(v.mean()) if v.size else float("nan") for name, v in per_user_values.items()
    }
    out["ranking_users"] = int(ranked.sum())
    out["ranking_users_without_relevant"] = int((~ranked).sum())
    if top_items is not None:
        if num_items is None:
            raise ValueError("num_items is needed with top_items (coverage is over the catalogue)")
        out[f"coverage_at_{k}"] = coverage(top_items, num_items)
    if per_user and ranked.any():
        out[f"user_recall_at_{k}"] = _distribution(per_user_values["recall"])
        out[f"user_ndcg_at_{k}"] = _distribution(per_user_values["ndcg"])
    return out


def coverage(top_items, num_items: int) -> float:
    """Catalogue coverage: the fraction of ``num_items`` items in at least one row of
    ``top_items`` (item indices; negative entries are padding). NaN for an empty catalogue."""
    top = np.asarray(top_items, dtype=np.int64).ravel()
    if num_items <= 0:
        return float("nan")
    shown = np.zeros(num_items, dtype=bool)
    shown[top[top >= 0]] = True
    return float(shown.sum() / num_items)


def recon_eval(
    model,
    data,
    clients=None,
    config: ClientConfig | None = None,
    *,
    seed: int = 0,
    num_threads: int = 0,
    per_user: bool = False,
    k: int | None = 10,
    relevance_threshold: float | None = 4.0,
) -> dict:
    """ReconEval of ``model`` on clients of ``data`` (default: all), in one native call.

    Parameters
    ----------
    model : GlobalModel
    data : ClientData
        Must share the model's item indexing (e.g. a subset of the data it was trained on).
    clients : array_like of int, optional
        Which clients of ``data`` to evaluate (default: all).
    config : ClientConfig, optional
        Split and reconstruction schedule (default: the model's training config).
    per_user : bool
        Also report mean/std/quantiles of per-user RMSE and accuracy (and of the ranking
        metrics).
    k : int or None
        Cut-off of the ranking metrics; None skips ranking (RMSE and accuracy only, at the
        cost of a plain ReconEval: ranking scores every item for every user).
    relevance_threshold : float or None
        Query ratings at least this count as relevant (default 4.0); None: every query item.

    Returns
    -------
    dict
        ``loss`` (MSE), ``rmse``, ``mae``, ``accuracy``, ``users`` and ``ratings`` scored; with
        ``k`` also ``recall_at_{k}``, ``precision_at_{k}``, ``hit_rate_at_{k}``,
        ``ndcg_at_{k}``, ``map_at_{k}``, ``mrr_at_{k}``, ``coverage_at_{k}``,
        ``ranking_users`` and ``ranking_users_without_relevant`` (see the module docstring).
    """
    if config is None:
        config = model.config.evaluation if model.config is not None else ClientConfig()
    stats = kernels.evaluate_users(
        model.item_factors,
        data,
        clients,
        config,
        item_bias=model.item_bias,
        global_mean=model.global_mean,
        seed=seed,
        round=EVAL_ROUND,
        num_threads=num_threads,
        k=k,
        relevance_threshold=relevance_threshold,
        **model.default_kwargs(),
    )
    out = summarize(
        stats["sq_err_sum"],
        stats["num_examples"],
        stats["num_correct"],
        per_user=per_user,
        abs_err_sum=stats["abs_err_sum"],
    )
    if k is not None:
        out.update(
            summarize_ranking(
                stats["hits"],
                stats["num_relevant"],
                stats["ndcg"],
                k,
                per_user=per_user,
                ap=stats["ap"],
                rr=stats["rr"],
                top_items=stats["top_items"],
                num_items=model.num_items,
            )
        )
    return out


def leave_one_out(
    model,
    data,
    clients=None,
    *,
    k: int = 10,
    negatives: int | None = 99,
    config: ClientConfig | None = None,
    seed: int | None = None,
    num_threads: int = 0,
) -> dict:
    """Leave-one-out HR@k and NDCG@k, the protocol of federated recommendation papers.

    Each user's most recent rating (by timestamp, ties to the later stored one; without
    timestamps the last one stored) is held out, and its item counts as the one relevant item
    whatever the rating. The user's ``u`` is reconstructed from all the other ratings as for a
    new user (:func:`fedrecon_fast.inference.reconstruct`: every rating reconstructs, V
    frozen). The held-out item is then ranked by predicted rating (ties to the lower item
    index) among ``negatives`` items the user has not rated, drawn uniformly without
    replacement (99: the protocol of He et al., "Neural Collaborative Filtering", 2017, used by
    FedNCF, FedFast and most federated recommenders; all unrated items when fewer are left), or
    with ``negatives=None`` among every item the user has not rated. Users with fewer than two
    ratings are skipped.

    Parameters
    ----------
    model : GlobalModel
    data : ClientData
        Must share the model's item indexing (e.g. a subset of the data it was trained on).
    clients : array_like of int, optional
        Which clients of ``data`` to evaluate (default: all).
    k : int
        Cut-off.
    negatives : int or None
        Sampled negative items per user (default 99); None ranks against every unrated item.
    config, seed, num_threads
        As for :meth:`fedrecon_fast.GlobalModel.recommend` (defaults: the model's evaluation
        schedule and training seed; all cores). The negatives of a user depend only on the
        seed and its user id.

    Returns
    -------
    dict
        ``loo_hit_rate_at_{k}`` (fraction of users whose held-out item is in their top k),
        ``loo_ndcg_at_{k}`` (mean of ``1 / log2(rank + 1)`` for a hit at rank ``rank``
        counted from 1, else 0), ``loo_users`` (users evaluated) and ``loo_negatives``.
    """
    from .data import _sort_by_group_then_key
    from .inference import INFERENCE_ROUND, _settings

    check_int(k, "k", minimum=1)
    check_int(negatives, "negatives", minimum=1, allow_none=True)
    if data.num_items != model.num_items:
        raise ValueError(
            f"data has {data.num_items} items, the model {model.num_items}: evaluate a subset "
            "of the data the model was trained on"
        )
    if clients is not None:
        data = data.subset(clients)
    data = data.subset(data.sizes >= 2)
    config, seed = _settings(model, config, seed)
    sizes = data.sizes
    row = data._row_index()
    if data.timestamps is None:
        order = np.arange(data.nnz, dtype=np.int64)
    else:
        order = _sort_by_group_then_key(row, data.timestamps, data.num_clients)
    held = order[data.indptr[1:] - 1]  # each user's last entry in time order
    keep = np.ones(data.nnz, dtype=bool)
    keep[held] = False
    rest = data._take(np.flatnonzero(keep), np.concatenate([[0], np.cumsum(sizes - 1)]), data.user_ids)
    target = data.items[held].astype(np.int64)
    common = dict(
        item_bias=model.item_bias,
        global_mean=model.global_mean,
        seed=seed,
        round=INFERENCE_ROUND,
        num_threads=num_threads,
        check_finite=False,
        **model.default_kwargs(),
    )
    if negatives is None:
        top, _ = kernels.recommend_users(model.item_factors, rest, None, config, k=k, exclude_seen=True, **common)
        match = top == target[:, None]
        rank = np.where(match.any(axis=1), np.argmax(match, axis=1), k)
    else:
        users, user_bias = kernels.infer_users(model.item_factors, rest, None, config, **common)
        candidates = np.column_stack([target, _negatives(data, negatives, seed)])
        rows = np.maximum(candidates, 0)
        V = model.item_factors
        scores = np.einsum("mk,mnk->mn", users, V[rows])
        if user_bias is not None:
            scores += user_bias[:, None] + model.item_bias[rows]
        scores[candidates < 0] = -np.inf  # padding
        pos = scores[:, :1]
        # Ties go to the lower item index, as in every ranking of the package.
        ahead = (scores[:, 1:] > pos) | ((scores[:, 1:] == pos) & (candidates[:, 1:] < target[:, None]))
        rank = np.where(np.isnan(pos[:, 0]), k, ahead.sum(axis=1))
    hit = rank < k
    gain = np.where(hit, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0)
    n = data.num_clients
    return {
        f"loo_hit_rate_at_{k}": float(hit.mean()) if n else float("nan"),
        f"loo_ndcg_at_{k}": float(gain.mean()) if n else float("nan"),
        "loo_users": n,
        "loo_negatives": negatives,
    }


# Leave-one-out draws its negatives with a round number nothing else uses.
LOO_ROUND = 2**64 - 3


def _negatives(data, count: int, seed: int) -> np.ndarray:
    """``count`` distinct items per user that the user did not rate, uniformly at random:
    the unrated items with the smallest keys ``mix64(derive_seed(seed, LOO_ROUND, user id,
    STREAM_DATA) ^ item)``, in key order; -1 pads users with fewer unrated items. A user's
    negatives depend only on the seed, its id and its ratings. Vectorised over chunks of users
    (a users x items key matrix of bounded size per chunk)."""
    from ._rng import STREAM_DATA, derive_seed_array, mix64_array

    n_users, n_items = data.num_clients, data.num_items
    out = np.full((n_users, count), -1, dtype=np.int64)
    if n_users == 0 or n_items == 0:
        return out
    base = derive_seed_array(seed, LOO_ROUND, data.user_ids, STREAM_DATA).astype(np.uint64)
    row = data._row_index()
    items = np.arange(n_items, dtype=np.uint64)
    width = min(count, n_items)
    chunk = max(1, (1 << 22) // n_items)
    for lo in range(0, n_users, chunk):
        hi = min(n_users, lo + chunk)
        keys = mix64_array(base[lo:hi, None] ^ items[None, :])
        mine = (row >= lo) & (row < hi)
        keys[row[mine] - lo, data.items[mine]] = np.iinfo(np.uint64).max  # rated: never drawn
        best = (
            np.argpartition(keys, width - 1, axis=1)[:, :width]
            if width < n_items
            else np.broadcast_to(np.arange(n_items), keys.shape)
        )
        best = np.take_along_axis(best, np.argsort(np.take_along_axis(keys, best, axis=1), axis=1), axis=1)
        rated = np.take_along_axis(keys, best, axis=1) == np.iinfo(np.uint64).max
        out[lo:hi, :width] = np.where(rated, -1, best)
    return out
