"""A FedRecon round vectorised *across clients*: all sampled clients take their SGD steps in lockstep.

This is how a well-vectorised tensor-library implementation (PyTorch, JAX, NumPy) runs a cohort:
the clients' minibatches are padded into ``(clients, steps, batch)`` index tensors once, then step
``s`` of every client is one batched gather + two batched matrix products; the client update
keeps each client's touched rows in a padded ``(clients, rows, K)`` tensor and scatters the row
gradients back with an accumulating index-add. The number of Python-level iterations is the
longest schedule (about 80 for the paper recipe), not clients x steps.

The same code runs on two backends: ``"numpy"`` (always available; it validates the algorithm
against :func:`fedrecon_fast.train_round` in the tests) and ``"torch"`` (CPU, used by
``bench/torch_round.py`` only when ``import torch`` works; nothing here installs it).

Scope: the paper recipe: SGD reconstruction (any L2), client update without L2 and without
joint training, no biases. Building the padded tensors (:func:`build_lockstep`) needs the
per-client plans of :mod:`numpy_round` (the native random streams, drawn in pure Python) and is
done before the clock starts, like the NumPy baseline's plans: only :func:`lockstep_round` is
timed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from numpy_round import plan_round, reference

F32 = np.float32

__all__ = ["LockstepProblem", "build_lockstep", "lockstep_round"]


@dataclass
class LockstepProblem:
    """Padded per-step tensors of one cohort (NumPy arrays; moved to the backend on use).

    Reconstruction step ``s`` of client ``c`` uses the items ``r_items[c, s]`` (``r_mask`` marks
    real entries) with per-step factor ``r_scale[c, s] = 2/m`` (0 once the client's schedule has
    ended). Update step ``s`` uses the local rows ``q_loc[c, s]`` of ``rows[c]``; padding points at
    the extra scratch row ``R`` (``rows.shape[1] - 1``) whose update is thrown away.
    """

    u0: np.ndarray          # (C, K) float32
    r_items: np.ndarray     # (C, Sr, B) int64
    r_y: np.ndarray         # (C, Sr, B) float32
    r_mask: np.ndarray      # (C, Sr, B) float32
    r_scale: np.ndarray     # (C, Sr) float32
    r_active: np.ndarray    # (C, Sr) float32
    rows: np.ndarray        # (C, R + 1) int64, global row ids (scratch/padding: 0)
    row_mask: np.ndarray    # (C, R + 1) bool
    q_loc: np.ndarray       # (C, Su, B) int64
    q_y: np.ndarray         # (C, Su, B) float32
    q_mask: np.ndarray      # (C, Su, B) float32
    q_scale: np.ndarray     # (C, Su) float32
    weight: np.ndarray      # (C,) float64
    repeats: bool           # some batch rates one item twice (needs an accumulating scatter)


def build_lockstep(data, clients, config, seed: int, round: int, dim: int, plans=None) -> LockstepProblem:  # noqa: A002
    """Pad the cohort's schedules into step tensors (Python; not part of the timed round)."""
    if config.recon != "sgd" or config.update_l2 > 0 or config.joint:
        raise NotImplementedError("lockstep_round implements the paper recipe: SGD reconstruction, "
                                  "no update L2, no joint training")
    clients = np.asarray(clients, dtype=np.int64)
    if plans is None:
        plans = plan_round(data, clients, config, seed, round, dim)
    C = len(clients)
    recon, update = [], []
    for c, p in zip(clients, plans):
        lo = data.indptr[c]
        items = data.items[lo:data.indptr[c + 1]]
        ratings = data.ratings[lo:data.indptr[c + 1]]
        sb, qb = p.support_bounds, p.query_bounds
        nb, nq = len(sb) - 1, len(qb) - 1
        rs = reference.schedule_steps(nb, config.recon_epochs, config.recon_steps_max) if nb else 0
        us = reference.schedule_steps(nq, config.update_epochs, config.update_steps_max) if nq else 0
        recon.append([(items[p.support[sb[j]:sb[j + 1]]], ratings[p.support[sb[j]:sb[j + 1]]])
                      for j in (s % nb for s in range(rs))])
        executed = p.query[:qb[min(us, nq)]] if us else p.query[:0]
        rows, local = np.unique(items[executed], return_inverse=True)
        upd = [(local[qb[j]:qb[j + 1]], ratings[p.query[qb[j]:qb[j + 1]]]) for j in (s % nq for s in range(us))]
        update.append((rows, upd, len(p.query), len(executed) > len(rows)))
    B = max([len(y) for steps in recon for _, y in steps] + [len(y) for _, u, _, _ in update for _, y in u] + [1])
    Sr = max([len(steps) for steps in recon] + [0])
    Su = max([len(u) for _, u, _, _ in update] + [0])
    R = max([len(rows) for rows, _, _, _ in update] + [0])
    r_items = np.zeros((C, Sr, B), np.int64)
    r_y = np.zeros((C, Sr, B), F32)
    r_mask = np.zeros((C, Sr, B), F32)
    r_scale = np.zeros((C, Sr), F32)
    for c, steps in enumerate(recon):
        for s, (it, y) in enumerate(steps):
            r_items[c, s, :len(y)] = it
            r_y[c, s, :len(y)] = y
            r_mask[c, s, :len(y)] = 1
            r_scale[c, s] = F32(2.0) / F32(len(y))
    rows = np.zeros((C, R + 1), np.int64)
    row_mask = np.zeros((C, R + 1), bool)
    q_loc = np.full((C, Su, B), R, np.int64)  # padding -> scratch row R
    q_y = np.zeros((C, Su, B), F32)
    q_mask = np.zeros((C, Su, B), F32)
    q_scale = np.zeros((C, Su), F32)
    weight = np.zeros(C)
    repeats = False
    for c, (rws, steps, num_query, rep) in enumerate(update):
        rows[c, :len(rws)] = rws
        row_mask[c, :len(rws)] = True
        repeats |= rep
        for s, (loc, y) in enumerate(steps):
            q_loc[c, s, :len(y)] = loc
            q_y[c, s, :len(y)] = y
            q_mask[c, s, :len(y)] = 1
            q_scale[c, s] = F32(2.0) / F32(len(y))
        if steps and num_query:
            weight[c] = float(num_query) if config.weighting == "examples" else 1.0
    u0 = np.stack([p.u0 for p in plans]) if C else np.zeros((0, dim), F32)
    return LockstepProblem(u0, r_items, r_y, r_mask, r_scale, (r_scale > 0).astype(F32), rows,
                           row_mask, q_loc, q_y, q_mask, q_scale, weight, repeats)


def lockstep_round(item_factors, problem: LockstepProblem, config, *, backend: str = "numpy"):
    """The round's float32 delta ``Σ w_i Δ_i / Σ w_i`` (float64 sums) and per-client loss sums.

    ``backend="torch"`` takes torch tensors from :func:`to_backend` (or NumPy arrays, converted).
    """
    if backend == "torch":
        import torch as xp

        def arr(a):
            return a if isinstance(a, xp.Tensor) else xp.from_numpy(np.ascontiguousarray(a))

        def zeros64(shape):
            return xp.zeros(shape, dtype=xp.float64)
    else:
        xp = np

        def arr(a):
            return a

        def zeros64(shape):
            return np.zeros(shape)

    V = arr(item_factors)
    P = {k: arr(getattr(problem, k)) for k in ("u0", "r_items", "r_y", "r_mask", "r_scale", "r_active",
                                               "rows", "row_mask", "q_loc", "q_y", "q_mask", "q_scale",
                                               "weight")}
    num_items, K = V.shape
    C, Sr, _ = P["r_items"].shape
    Su = P["q_loc"].shape[1]
    # Python floats holding the float32 values: both backends then compute in float32.
    lr, l2, c_lr = (float(F32(x)) for x in (config.recon_lr, config.recon_l2, config.client_lr))

    # Reconstruction, all clients at once: e = (X u - y) masked, u -= lr (2/m eᵀX + 2 l2 u).
    U = P["u0"].clone() if backend == "torch" else P["u0"].copy()
    for s in range(Sr):
        X = V[P["r_items"][:, s]]                                     # (C, B, K)
        err = ((X @ U[:, :, None])[:, :, 0] - P["r_y"][:, s]) * P["r_mask"][:, s]
        grad = (err[:, None, :] @ X)[:, 0, :]                         # (C, K)
        if l2 > 0:
            U -= lr * (P["r_scale"][:, s, None] * grad + (2.0 * l2) * P["r_active"][:, s, None] * U)
        else:
            U -= (lr * P["r_scale"][:, s])[:, None] * grad

    # Client update on each client's padded rows W (C, R + 1, K); row R is the padding sink.
    W = V[P["rows"]]
    W0 = W.clone() if backend == "torch" else W.copy()
    cidx = (xp.arange(C)[:, None])
    loss = zeros64((C,))
    for s in range(Su):
        loc = P["q_loc"][:, s]                                        # (C, B)
        X = W[cidx, loc]                                              # (C, B, K)
        err = ((X @ U[:, :, None])[:, :, 0] - P["q_y"][:, s]) * P["q_mask"][:, s]
        e64 = err.double() if backend == "torch" else err.astype(np.float64)
        loss += (e64 * e64).sum(1)
        step = (c_lr * P["q_scale"][:, s])[:, None] * err            # (C, B)
        upd = step[:, :, None] * U[:, None, :]                        # (C, B, K)
        if backend == "torch":
            W.index_put_((cidx.expand_as(loc), loc), -upd, accumulate=True)
        elif problem.repeats:
            np.subtract.at(W, (np.broadcast_to(cidx, loc.shape), loc), upd)
        else:
            W[cidx, loc] -= upd   # padding entries all hit the scratch row; its value is discarded

    delta = (W - W0)[:, :-1]
    mask = P["row_mask"][:, :-1]
    if backend == "torch":
        finite = xp.isfinite(delta).flatten(1).all(1) & xp.isfinite(loss)
        w = P["weight"] * finite.double()
        acc = xp.zeros((num_items, K), dtype=xp.float64)
        vals = (w[:, None, None] * delta.double())[mask]
        acc.index_add_(0, P["rows"][:, :-1][mask], vals)
        total = float(w.sum())
        out = (acc * (1.0 / total)).float() if total > 0 else acc.float()
        return out.numpy(), loss.numpy()
    finite = np.isfinite(delta).reshape(C, -1).all(1) & np.isfinite(loss)
    w = P["weight"] * finite
    acc = np.zeros((num_items, K))
    np.add.at(acc, P["rows"][:, :-1][mask], (w[:, None, None] * delta.astype(np.float64))[mask])
    total = float(w.sum())
    return ((acc * (1.0 / total)).astype(F32) if total > 0 else acc.astype(F32)), loss


def to_backend(problem: LockstepProblem, backend: str):
    """The problem's arrays as backend tensors (so that the timed call converts nothing)."""
    if backend != "torch":
        return problem
    import torch

    fields = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
              for k, v in vars(problem).items()}
    return LockstepProblem(**fields)
