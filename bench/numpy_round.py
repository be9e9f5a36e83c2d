"""A straightforward, well-written NumPy FedRecon round: the baseline the native round is timed against.

This is the code a careful researcher writes, not the per-rating oracle of ``tests/reference.py``:
a Python loop over clients and, inside a client, a loop over SGD steps with every step vectorised
over its minibatch (gather the batch's rows, errors with one matrix-vector product, the gradient
with one more). It has the semantics of :func:`fedrecon_fast.train_round` (DESIGN.md §1), so its
delta is checked against the native one:

- split: TFF ``split_dataset`` (or the random / reuse splits), with the native per-client
  ``STREAM_SPLIT`` permutation when ``reshuffle`` is on;
- u initialised from the native per-client ``STREAM_INIT`` stream;
- reconstruction: ``recon_epochs`` passes over the support batches capped at ``recon_steps_max``,
  ``u -= lr (2/m Σ err v + 2 l2 u)``;
- client update on the distinct rows of the executed query batches, errors at the pre-step
  values, ``W[row] -= lr 2/m err u`` (repeated rows in a batch add up), optional L2 and joint u;
- weight = query-set size (or 1), non-finite clients weight 0, float64 weighted mean.

The random streams are the native SplitMix64 ones, drawn with the pure-Python helpers of
``tests/reference.py`` (the spec) by :func:`client_plan`. Drawing them in pure Python costs about
as much as the arithmetic, and a researcher's own code would use ``numpy.random`` instead, so the
benchmarks draw the plans *before* starting the clock (:func:`plan_round`) and time
:func:`numpy_round` with ``plans=`` given: the NumPy baseline is timed without its RNG, which
favours the baseline.

Biases are not implemented (the paper recipe has none).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference  # noqa: E402  (the spec: RNG streams, split, schedules)

F32 = np.float32

__all__ = ["ClientPlan", "client_plan", "plan_round", "numpy_round", "numpy_reconstruct",
           "numpy_evaluate", "NumpyRoundResult", "schedule_counts"]


@dataclass(frozen=True)
class ClientPlan:
    """Everything random about one client in one round.

    ``support``/``query`` are the positions of the client's ratings in batch order, concatenated;
    batch ``j`` is ``[bounds[j], bounds[j + 1])``. ``u0`` is the initial user embedding.
    """

    support: np.ndarray
    support_bounds: np.ndarray
    query: np.ndarray
    query_bounds: np.ndarray
    u0: np.ndarray


def _concat(batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    bounds = np.zeros(len(batches) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in batches], out=bounds[1:])
    pos = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    return pos.astype(np.int64), bounds


def client_plan(n: int, client: int, config, seed: int, round: int, dim: int) -> ClientPlan:  # noqa: A002
    """The split and the initial u of client ``client`` (with ``n`` ratings), from the native streams."""
    support, query = reference.split_client(n, client, config, seed, round)
    sp, sb = _concat(support)
    qp, qb = _concat(query)
    return ClientPlan(sp, sb, qp, qb, reference.init_user(dim, config, seed, round, client))


def plan_round(data, clients, config, seed: int, round: int, dim: int) -> list[ClientPlan]:  # noqa: A002
    """:func:`client_plan` of every sampled client (pure Python: draw it outside the timed region)."""
    sizes = np.diff(data.indptr)
    return [client_plan(int(sizes[c]), int(c), config, seed, round, dim) for c in np.asarray(clients)]


def schedule_counts(sizes: np.ndarray, config) -> dict:
    """Per client: reconstruction steps and examples, update steps and examples (no RNG needed).

    Batch *sizes* do not depend on the permutation, so this uses the unshuffled split.
    """
    cfg = replace(config, reshuffle=False)
    out = {k: np.zeros(len(sizes), dtype=np.int64)
           for k in ("recon_steps", "recon_examples", "update_steps", "update_examples")}
    for i, n in enumerate(np.asarray(sizes)):
        n = int(n)
        if cfg.split == "random":  # the permutation does not change the batch sizes
            ns = int(np.floor(float(F32(cfg.support_fraction)) * n + 0.5))
            ns = min(max(ns, 1), n - 1) if n >= 2 else min(ns, n)
            support = reference._cut(np.arange(ns), cfg.batch_size)
            query = reference._cut(np.arange(ns, n), cfg.batch_size)
        else:
            support, query = reference.split_client(n, 0, cfg, 0, 0)
        if cfg.recon == "sgd" and support:
            rs = reference.schedule_steps(len(support), cfg.recon_epochs, cfg.recon_steps_max)
            out["recon_steps"][i] = rs
            out["recon_examples"][i] = sum(len(support[s % len(support)]) for s in range(rs))
        if query:
            us = reference.schedule_steps(len(query), cfg.update_epochs, cfg.update_steps_max)
            out["update_steps"][i] = us
            out["update_examples"][i] = sum(len(query[s % len(query)]) for s in range(us))
    return out


@dataclass(frozen=True)
class NumpyRoundResult:
    delta: np.ndarray
    client_stats: dict
    summary: dict


def _reconstruct(V, items, ratings, plan: ClientPlan, config) -> tuple[np.ndarray, int]:
    """One client's u (and the reconstruction examples processed), V frozen.

    SGD: gather the support rows once, then per step one matvec for the errors and one for the
    gradient. Exact: the ridge solution from the float32 Gram matrix, solved in float64.
    """
    K = V.shape[1]
    if config.recon == "exact":
        X = V[items[plan.support]]
        A = (X.T @ X).astype(np.float64) + float(F32(config.ridge)) * np.eye(K)
        rhs = (X.T @ ratings[plan.support]).astype(np.float64)
        return np.linalg.solve(A, rhs).astype(F32), len(plan.support)
    u = plan.u0.copy()
    nb = len(plan.support_bounds) - 1
    steps = reference.schedule_steps(nb, config.recon_epochs, config.recon_steps_max) if nb else 0
    if not steps:
        return u, 0
    lr, l2 = F32(config.recon_lr), F32(config.recon_l2)
    X_all = V[items[plan.support]]
    y_all = ratings[plan.support]
    b = plan.support_bounds
    batches = [(X_all[b[j]:b[j + 1]], y_all[b[j]:b[j + 1]], lr * F32(2.0 / (b[j + 1] - b[j])))
               for j in range(nb)]
    examples = 0
    for s in range(steps):
        X, y, scale = batches[s % nb]
        err = X @ u - y
        if l2 > 0:
            u -= scale * (err @ X) + (lr * F32(2.0) * l2) * u
        else:
            u -= scale * (err @ X)
        examples += len(y)
    return u, examples


def numpy_reconstruct(item_factors, data, clients, config, *, seed: int = 0, round: int = 0,  # noqa: A002
                      plans: list[ClientPlan] | None = None) -> np.ndarray:
    """``(m, K)`` float32 users reconstructed on their support sets, like
    :func:`fedrecon_fast.reconstruct_users` without biases (SGD or exact)."""
    V = np.ascontiguousarray(item_factors, dtype=F32)
    clients = np.asarray(clients, dtype=np.int64)
    if plans is None:
        plans = plan_round(data, clients, config, seed, round, V.shape[1])
    users = np.empty((len(clients), V.shape[1]), dtype=F32)
    for i, c in enumerate(clients):
        lo, hi = data.indptr[c], data.indptr[c + 1]
        users[i] = _reconstruct(V, data.items[lo:hi], data.ratings[lo:hi], plans[i], config)[0]
    return users


def numpy_evaluate(item_factors, data, clients, config, *, seed: int = 0, round: int = 0,  # noqa: A002
                   plans: list[ClientPlan] | None = None) -> dict:
    """ReconEval per client like :func:`fedrecon_fast.evaluate_users` without biases: reconstruct,
    then score the whole query set with one matvec."""
    V = np.ascontiguousarray(item_factors, dtype=F32)
    clients = np.asarray(clients, dtype=np.int64)
    if plans is None:
        plans = plan_round(data, clients, config, seed, round, V.shape[1])
    out = {"sq_err_sum": np.zeros(len(clients)), "num_examples": np.zeros(len(clients), np.int64),
           "num_correct": np.zeros(len(clients), np.int64)}
    for i, c in enumerate(clients):
        lo, hi = data.indptr[c], data.indptr[c + 1]
        items, ratings = data.items[lo:hi], data.ratings[lo:hi]
        u = _reconstruct(V, items, ratings, plans[i], config)[0]
        q = plans[i].query
        err = V[items[q]] @ u - ratings[q]
        e64 = err.astype(np.float64)
        out["sq_err_sum"][i] = e64 @ e64
        out["num_examples"][i] = len(q)
        out["num_correct"][i] = np.count_nonzero(np.abs(err) <= F32(0.5))
    return out


def numpy_round(item_factors, data, clients, config, *, seed: int = 0, round: int = 0,  # noqa: A002
                plans: list[ClientPlan] | None = None) -> NumpyRoundResult:
    """One FedRecon round in NumPy (no biases); same results as :func:`fedrecon_fast.train_round`.

    ``plans`` (from :func:`plan_round`) skips drawing the random streams.
    """
    V = np.ascontiguousarray(item_factors, dtype=F32)
    num_items, K = V.shape
    clients = np.asarray(clients, dtype=np.int64)
    if plans is None:
        plans = plan_round(data, clients, config, seed, round, K)
    indptr, items_all, ratings_all = data.indptr, data.items, data.ratings

    c_lr, c_l2 = F32(config.client_lr), F32(config.update_l2)
    decay = F32(1.0) - c_lr * F32(2.0) * c_l2
    m_stats = {k: np.zeros(len(clients), dtype=t) for k, t in (
        ("weight", np.float64), ("loss_sum", np.float64), ("num_examples", np.int64),
        ("num_correct", np.int64), ("rows", np.int64), ("recon_examples", np.int64),
        ("status", np.int8))}
    acc = np.zeros((num_items, K))  # float64 accumulator of Σ w_i Δ_i
    total_weight = 0.0

    for i, c in enumerate(clients):
        plan = plans[i]
        lo, hi = indptr[c], indptr[c + 1]
        items, ratings = items_all[lo:hi], ratings_all[lo:hi]

        u, m_stats["recon_examples"][i] = _reconstruct(V, items, ratings, plan, config)

        # Client update on the distinct rows of the query batches the schedule executes.
        nq = len(plan.query_bounds) - 1
        steps = reference.schedule_steps(nq, config.update_epochs, config.update_steps_max) if nq else 0
        num_query = len(plan.query)
        if steps == 0 or num_query == 0:
            m_stats["status"][i] = reference.STATUS_NO_QUERY
            continue
        qb = plan.query_bounds
        executed = plan.query[:qb[min(steps, nq)]]
        rows, local = np.unique(items[executed], return_inverse=True)
        repeats = len(rows) < len(executed)
        W = V[rows]  # a copy
        W0 = W.copy()
        y_all = ratings[executed]
        errors = np.empty(sum(qb[(s % nq) + 1] - qb[s % nq] for s in range(steps)), dtype=F32)
        batches = [(local[qb[j]:qb[j + 1]], y_all[qb[j]:qb[j + 1]], c_lr * F32(2.0 / (qb[j + 1] - qb[j])))
                   for j in range(min(steps, nq))]
        pos = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for s in range(steps):
                loc, y, scale = batches[s % nq]
                X = W[loc]
                err = X @ u - y
                errors[pos:pos + len(y)] = err
                pos += len(y)
                if c_l2 > 0:
                    W[np.unique(loc)] *= decay
                if repeats:
                    np.subtract.at(W, loc, np.multiply.outer(scale * err, u))
                else:
                    W[loc] -= np.multiply.outer(scale * err, u)
                if config.joint:
                    u -= scale * (err @ X) + (c_lr * F32(2.0) * c_l2) * u
            delta = W - W0
            e64 = errors.astype(np.float64)
            loss = float(e64 @ e64)
        correct = int(np.count_nonzero(np.abs(errors) <= F32(0.5)))
        examples = len(errors)
        m_stats["loss_sum"][i] = loss
        m_stats["num_examples"][i] = examples
        m_stats["num_correct"][i] = correct
        if not (np.isfinite(delta).all() and np.isfinite(loss)):
            m_stats["status"][i] = reference.STATUS_NONFINITE
            continue
        w = float(num_query) if config.weighting == "examples" else 1.0
        m_stats["weight"][i] = w
        m_stats["rows"][i] = len(rows)
        acc[rows] += w * delta.astype(np.float64)  # rows are distinct within a client
        total_weight += w

    delta = (acc * (1.0 / total_weight)).astype(F32) if total_weight > 0 else acc.astype(F32)
    summary = {"total_weight": total_weight,
               "loss_sum": float(m_stats["loss_sum"].sum()),
               "num_examples": int(m_stats["num_examples"].sum()),
               "num_reporting": int((m_stats["weight"] > 0).sum())}
    return NumpyRoundResult(delta, m_stats, summary)
