"""ReconEval (Singhal et al. 2021): metrics of a global model on users it never saw.

For each evaluation user the ratings are split into support and query sets, the user's
embedding is reconstructed on the support set with V frozen, and every query rating is scored
once. Metrics are pooled over all query ratings (example-weighted): MSE, RMSE = sqrt(pooled
MSE), and rating accuracy = fraction with |r - r_hat| <= 0.5.

Ranking metrics at a cut-off k (top-k recommendation quality): the candidates of a user are all
items except its support items, ranked by predicted rating (ties to the lower item index); its
relevant items are the distinct query items it rated at least ``relevance_threshold`` (4.0 by
default, "liked" on MovieLens' 1-5 scale; None makes every query item relevant) that are
candidates. Recall@k = hits / min(k, |relevant|); NDCG@k uses binary gains 1 / log2(rank + 1)
and the ideal DCG of min(k, |relevant|) hits. Both are averaged over the users with at least
one relevant item (users without one are excluded and counted).
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .config import ClientConfig

# Evaluation draws its random streams from a round number training never uses, so the same
# users get the same support/query split and initial u at every evaluation.
EVAL_ROUND = 2**64 - 1


def summarize(sq_err_sum, num_examples, num_correct, *, per_user: bool = False) -> dict:
    """Pool per-user sums into metrics; optionally add per-user distributions."""
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


def summarize_ranking(hits, num_relevant, ndcg, k: int, *, per_user: bool = False) -> dict:
    """Mean Recall@k and NDCG@k over the users with a relevant item.

    Returns ``recall_at_{k}``, ``ndcg_at_{k}`` (NaN when no user has a relevant item),
    ``ranking_users`` (users averaged) and ``ranking_users_without_relevant`` (excluded); with
    ``per_user`` also mean/std/quantiles as ``user_recall_at_{k}`` and ``user_ndcg_at_{k}``.
    """
    hits = np.asarray(hits, dtype=np.int64)
    rel = np.asarray(num_relevant, dtype=np.int64)
    ndcg = np.asarray(ndcg, dtype=np.float64)
    ranked = rel > 0
    recall = hits[ranked] / np.minimum(k, rel[ranked])
    ndcg = ndcg[ranked]
    out = {
        f"recall_at_{k}": float(recall.mean()) if recall.size else float("nan"),
        f"ndcg_at_{k}": float(ndcg.mean()) if ndcg.size else float("nan"),
        "ranking_users": int(ranked.sum()),
        "ranking_users_without_relevant": int((~ranked).sum()),
    }
    if per_user and recall.size:
        out[f"user_recall_at_{k}"] = _distribution(recall)
        out[f"user_ndcg_at_{k}"] = _distribution(ndcg)
    return out


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
        ``loss`` (MSE), ``rmse``, ``accuracy``, ``users`` and ``ratings`` scored; with ``k``
        also ``recall_at_{k}``, ``ndcg_at_{k}``, ``ranking_users`` and
        ``ranking_users_without_relevant`` (see the module docstring).
    """
    if config is None:
        config = model.config.evaluation if model.config is not None else ClientConfig()
    stats = kernels.evaluate_users(
        model.item_factors, data, clients, config, item_bias=model.item_bias,
        global_mean=model.global_mean, seed=seed, round=EVAL_ROUND, num_threads=num_threads,
        k=k, relevance_threshold=relevance_threshold, **model.default_kwargs())
    out = summarize(stats["sq_err_sum"], stats["num_examples"], stats["num_correct"], per_user=per_user)
    if k is not None:
        out.update(summarize_ranking(stats["hits"], stats["num_relevant"], stats["ndcg"], k,
                                     per_user=per_user))
    return out
