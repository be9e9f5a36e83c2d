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

import numpy as np

from . import kernels
from ._validation import check_int
from .config import ClientConfig

# Evaluation draws its random streams from a round number training never uses, so the same
# users get the same support/query split and initial u at every evaluation.
EVAL_ROUND = 2**64 - 1


def summarize(sq_err_sum, num_examples, num_correct, *, per_user: bool = False,
              abs_err_sum=None) -> dict:
    """Pool per-user sums into metrics; optionally add per-user distributions.

    With ``abs_err_sum`` (per-user sums of ``|r - r_hat|``) the result also has ``mae``.
    """
    sq = np.asarray(sq_err_sum, dtype=np.float64)
    n = np.asarray(num_examples, dtype=np.int64)
    correct = np.asarray(num_correct, dtype=np.int64)
    total = int(n.sum())
    mse = float(sq.sum() / total) if total else float("nan")
    out = {
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
    return {"mean": float(values.mean()), "std": float(values.std()),
            "p10": float(q10), "p50": float(q50), "p90": float(q90)}


def summarize_ranking(hits, num_relevant, ndcg, k: int, *, per_user: bool = False, ap=None,
                      rr=None, top_items=None, num_items: int | None = None) -> dict:
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
    out = {f"{name}_at_{k}": float(v.mean()) if v.size else float("nan") for name, v in per_user_values.items()}
    out["ranking_users"] = int(ranked.sum())
    out["ranking_users_without_relevant"] = int((~ranked).sum())
    if top_items is not None:
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


def recon_eval(model, data, clients=None, config: ClientConfig | None = None, *, seed: int = 0,
               num_threads: int = 0, per_user: bool = False, k: int | None = 10,
               relevance_threshold: float | None = 4.0) -> dict:
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
        model.item_factors, data, clients, config, item_bias=model.item_bias,
        global_mean=model.global_mean, seed=seed, round=EVAL_ROUND, num_threads=num_threads,
        k=k, relevance_threshold=relevance_threshold, **model.default_kwargs())
    out = summarize(stats["sq_err_sum"], stats["num_examples"], stats["num_correct"], per_user=per_user,
                    abs_err_sum=stats["abs_err_sum"])
    if k is not None:
        out.update(summarize_ranking(stats["hits"], stats["num_relevant"], stats["ndcg"], k,
                                     per_user=per_user, ap=stats["ap"], rr=stats["rr"],
                                     top_items=stats["top_items"], num_items=model.num_items))
    return out


def leave_one_out(model, data, clients=None, *, k: int = 10, config: ClientConfig | None = None,
                  seed: int | None = None, num_threads: int = 0) -> dict:
    """Leave-one-out HR@k and NDCG@k, the protocol of federated recommendation papers.

    Each user's most recent rating (by timestamp, ties to the later stored one; without
    timestamps the last one stored) is held out. The user's ``u`` is reconstructed from all
    the other ratings as for a new user (:func:`fedrecon_fast.inference.reconstruct`: every
    rating reconstructs, V frozen), every item the user has not rated is ranked by predicted
    rating (ties to the lower item index), and the held-out item counts as the one relevant
    item, whatever its rating. Users with fewer than two ratings are skipped.

    Parameters
    ----------
    model : GlobalModel
    data : ClientData
        Must share the model's item indexing (e.g. a subset of the data it was trained on).
    clients : array_like of int, optional
        Which clients of ``data`` to evaluate (default: all).
    k : int
        Cut-off.
    config, seed, num_threads
        As for :meth:`fedrecon_fast.GlobalModel.recommend` (defaults: the model's evaluation
        schedule and training seed; all cores).

    Returns
    -------
    dict
        ``loo_hit_rate_at_{k}`` (fraction of users whose held-out item is in their top k),
        ``loo_ndcg_at_{k}`` (mean of ``1 / log2(rank + 1)`` for a hit at rank ``rank``
        counted from 1, else 0) and ``loo_users`` (users evaluated).
    """
    from .data import _sort_by_group_then_key
    from .inference import INFERENCE_ROUND, _settings

    check_int(k, "k", minimum=1)
    if data.num_items != model.num_items:
        raise ValueError(f"data has {data.num_items} items, the model {model.num_items}: evaluate a subset "
                         "of the data the model was trained on")
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
    top, _ = kernels.recommend_users(
        model.item_factors, rest, None, config, k=k, exclude_seen=True, item_bias=model.item_bias,
        global_mean=model.global_mean, seed=seed, round=INFERENCE_ROUND, num_threads=num_threads,
        check_finite=False, **model.default_kwargs())
    match = top == data.items[held].astype(np.int64)[:, None]
    hit = match.any(axis=1)
    gain = np.where(hit, 1.0 / np.log2(np.argmax(match, axis=1) + 2.0), 0.0)
    users = data.num_clients
    return {f"loo_hit_rate_at_{k}": float(hit.mean()) if users else float("nan"),
            f"loo_ndcg_at_{k}": float(gain.mean()) if users else float("nan"),
            "loo_users": users}
