"""Name the likely cause when training diverges.

Minibatch SGD on a user embedding ``u`` with V frozen (reconstruction) is stable only while
``recon_lr * |v|^2 < 2`` for the item rows ``v`` it sees (a batch-mean step moves a prediction
by ``recon_lr * |v|^2 / batch`` times its error per example, and batches of similar rows add
up). Item rows start at ``|v|^2 ~ K * item_init_scale^2 / 3``, so a large K alone can break
it; rows also grow in training. The client update on V has the same condition with ``|u|^2``,
which only the clients know. :func:`explain` checks the first condition on the current model
and otherwise points at the client update's learning rate and at missing biases.
"""

from __future__ import annotations

import numpy as np

__all__ = ["explain"]


def explain(config, item_factors) -> str:
    """A sentence on the likely cause of a divergence of ``config`` with this V, and what to do.

    Parameters
    ----------
    config : FedReconConfig
    item_factors : ndarray, shape (num_items, dim)
        V as it was when training stopped (non-finite rows are ignored).
    """
    client = config.client
    V = np.asarray(item_factors)
    rows = V[np.isfinite(V).all(axis=1)] if V.size else V
    norms = np.einsum("ij,ij->i", rows, rows, dtype=np.float64) if rows.size else np.zeros(0)
    typical = float(np.quantile(norms, 0.99)) if norms.size else 0.0
    initial = config.dim * config.item_init_scale**2 / 3
    if client.recon == "sgd" and client.recon_lr * initial >= 1.0:
        return (
            f"likely cause: SGD reconstruction is unstable from the start, recon_lr {client.recon_lr:g} x "
            f"|v|^2 = {client.recon_lr * initial:.3g} (stable below about 2): K = {config.dim} with "
            f"item_init_scale {config.item_init_scale:g} starts item rows at |v|^2 = K a^2 / 3 = "
            f"{initial:.3g}; lower dim K (--dim) or recon_lr below {1.0 / initial:.2g}, or use exact "
            "reconstruction (recon='exact', as the default preset does)"
        )
    if client.recon == "sgd" and client.recon_lr * typical >= 1.0:
        return (
            f"likely cause: item rows grew in training until SGD reconstruction became unstable, recon_lr "
            f"{client.recon_lr:g} x |v|^2 = {client.recon_lr * typical:.3g} (99th percentile; stable below "
            f"about 2); lower client_lr (now {client.client_lr:g}, it grows the rows) or recon_lr, or use "
            "exact reconstruction with biases (the default preset)"
        )
    advice = [f"lower client_lr (now {client.client_lr:g})"]
    if client.recon == "sgd":
        advice.append(f"or recon_lr (now {client.recon_lr:g})")
    if not config.biases:
        advice.append(
            "or train with biases (biases=True): without them predictions start near 0, far from the "
            "ratings, and the first updates are large"
        )
    if client.recon == "sgd" or not config.biases:
        advice.append("or use the default preset (exact reconstruction with biases)")
    return (
        f"likely cause: the client update's learning rate, client_lr {client.client_lr:g} with batches of "
        f"{client.batch_size} and K = {config.dim} (too large a step for users with long embeddings u); "
        + " ".join(advice)
    )
