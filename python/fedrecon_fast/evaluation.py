"""ReconEval (Singhal et al. 2021): metrics of a global model on users it never saw.

For each evaluation user the ratings are split into support and query sets, the user's
embedding is reconstructed on the support set with V frozen, and every query rating is scored
once. Metrics are pooled over all query ratings (example-weighted): MSE, RMSE = sqrt(pooled
MSE), and rating accuracy = fraction with |r - r_hat| <= 0.5.
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
                q10, q50, q90 = np.quantile(values, [0.1, 0.5, 0.9])
                out[name] = {"mean": float(values.mean()), "std": float(values.std()),
                             "p10": float(q10), "p50": float(q50), "p90": float(q90)}
    return out


def recon_eval(model, data, clients=None, config: ClientConfig | None = None, *, seed: int = 0,
               num_threads: int = 0, per_user: bool = False) -> dict:
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
        Also report mean/std/quantiles of per-user RMSE and accuracy.

    Returns
    -------
    dict
        ``loss`` (MSE), ``rmse``, ``accuracy``, ``users`` and ``ratings`` scored.
    """
    if config is None:
        config = model.config.evaluation if model.config is not None else ClientConfig()
    stats = kernels.evaluate_users(
        model.item_factors, data, clients, config, item_bias=model.item_bias,
        global_mean=model.global_mean, seed=seed, round=EVAL_ROUND, num_threads=num_threads,
        **model.default_kwargs())
    return summarize(stats["sq_err_sum"], stats["num_examples"], stats["num_correct"], per_user=per_user)
