"""Users split into partitions that workers or nodes hold; cohorts routed to them, and their
updates combined in cohort order into exactly the local round.

A partition is a contiguous block of training users (:func:`partition_bounds`). Each holder
keeps its block's ratings once; a round sends it only the ids of its sampled users and V. It
runs :func:`kernels.client_updates` on them (each user keyed by its global id, so its random
streams are those of the fused round) and returns the sparse updates (and, for dense updates
quantized with one scale, the few numbers their untouched rows' noise derives from).
:func:`combine` puts the pieces back in cohort order and reduces them with the native
:func:`kernels.reduce_updates`, which sums each row's clients in cohort order as
:func:`kernels.train_round` does: the result is the local round's, bit for bit, wherever the
partitions ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from .. import kernels
from .._validation import check_int
from ..kernels import ClientUpdates, DenseNoise, RoundResult
from ..server import round_summary

__all__ = ["Route", "partition_bounds", "partition_data", "route", "combine"]


def partition_bounds(num_clients: int, num_partitions: int) -> np.ndarray:
    """Block boundaries: partition ``p`` holds users ``[bounds[p], bounds[p+1])`` (sizes differ
    by at most one, larger blocks first, as ``numpy.array_split``)."""
    check_int(num_clients, "num_clients", minimum=0)
    check_int(num_partitions, "num_partitions", minimum=1)
    size, extra = divmod(num_clients, num_partitions)
    sizes = np.full(num_partitions, size, dtype=np.int64)
    sizes[:extra] += 1
    bounds = np.zeros(num_partitions + 1, dtype=np.int64)
    np.cumsum(sizes, out=bounds[1:])
    return bounds


def partition_data(data, lo: int, hi: int) -> SimpleNamespace:
    """Users ``[lo, hi)`` of ``data`` as CSR arrays (copies: a holder keeps only these), with
    ``stream_ids`` keeping each user's global id for its random streams."""
    a, b = int(data.indptr[lo]), int(data.indptr[hi])
    return SimpleNamespace(
        indptr=np.ascontiguousarray(data.indptr[lo : hi + 1] - a),
        items=data.items[a:b].copy(),
        ratings=data.ratings[a:b].copy(),
        stream_ids=np.arange(lo, hi, dtype=np.int64),
        num_clients=hi - lo,
        num_items=data.num_items,
    )


@dataclass(frozen=True)
class Route:
    """The sampled users of one partition: their ``positions`` in the cohort and their
    ``local`` indices in the partition (both in cohort order)."""

    partition: int
    positions: np.ndarray
    local: np.ndarray


def route(clients, bounds: np.ndarray) -> list[Route]:
    """Which partition holds each client of the cohort; only partitions with clients appear."""
    clients = np.asarray(clients, dtype=np.int64)
    owner = np.searchsorted(bounds, clients, side="right") - 1
    order = np.argsort(owner, kind="stable")  # cohort order within each partition
    parts, starts = np.unique(owner[order], return_index=True)
    out = []
    for p, positions in zip(parts, np.split(order, starts[1:])):
        out.append(Route(int(p), positions, clients[positions] - bounds[p]))
    return out


def _scatter(pieces, total: int, get):
    """One array in cohort order from each piece's per-client array ``get(updates)``."""
    arrays = [get(u) for _, u in pieces]
    if arrays[0] is None:
        return None
    out = np.empty((total,) + arrays[0].shape[1:], dtype=arrays[0].dtype)
    for (r, _), a in zip(pieces, arrays):
        out[r.positions] = a
    return out


def combine(
    routes: list[Route],
    updates: list[ClientUpdates],
    num_clients: int,
    num_items: int,
    dim: int,
    *,
    num_threads: int = 0,
) -> RoundResult:
    """The round's :class:`kernels.RoundResult` from each partition's :func:`kernels.client_updates`.

    Parameters
    ----------
    routes : list of Route
        From :func:`route` for the cohort.
    updates : list of ClientUpdates
        What each route's holder returned for its ``local`` clients, in that order.
    num_clients : int
        Cohort size.
    num_items, dim : int
        Shape of V.
    """
    if len(routes) != len(updates) or not routes:
        raise ValueError("routes and updates must pair one partition each (at least one)")
    pieces = list(zip(routes, updates))
    for r, u in pieces:
        if len(u) != len(r.positions):
            raise ValueError(f"partition {r.partition} returned {len(u)} clients for {len(r.positions)} sent")
    lengths = np.zeros(num_clients, dtype=np.int64)
    for r, u in pieces:
        lengths[r.positions] = np.diff(u.offsets)
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    entries = int(offsets[-1])
    rows = np.empty(entries, dtype=np.int32)
    values = np.empty((entries, dim), dtype=np.float32)
    bias = np.empty(entries, dtype=np.float32) if pieces[0][1].bias_values is not None else None
    for r, u in pieces:
        counts = np.diff(u.offsets)
        # Entry j of a client goes to its cohort position's segment, at the same offset.
        dst = np.repeat(offsets[r.positions] - u.offsets[:-1], counts) + np.arange(len(u.rows))
        rows[dst] = u.rows
        values[dst] = u.values
        if bias is not None:
            bias[dst] = u.bias_values
    stats = {
        key: _scatter(pieces, num_clients, lambda u, key=key: u.client_stats[key]) for key in pieces[0][1].client_stats
    }
    weights = stats["weight"]
    noise = None
    if pieces[0][1].noise is not None:  # dense quantized updates: each client's untouched-row noise
        order = np.argsort(np.concatenate([r.positions for r, _ in pieces]), kind="stable")
        noise = DenseNoise.concat(u.noise for _, u in pieces).take(order)
    delta, delta_bias, _ = kernels.reduce_updates(
        rows, values, offsets, weights, num_items=num_items, bias_values=bias, num_threads=num_threads, noise=noise
    )
    reporting = np.repeat(weights > 0, lengths)
    summary = round_summary(stats, int(np.unique(rows[reporting]).size))
    users = _scatter(pieces, num_clients, lambda u: u.users)
    user_bias = _scatter(pieces, num_clients, lambda u: u.user_bias)
    return RoundResult(delta, delta_bias, stats, summary, users, user_bias)
