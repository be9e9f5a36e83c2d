"""Rounds run on other processes or machines that combine into the local result, bit for bit.

:class:`RayExecutor` (``pip install "fedrecon_fast[ray]"``; pass it, or ``backend="ray"``, to
:class:`fedrecon_fast.FedRecon`) gives each Ray actor one partition of the users, put once
per data set. A round sends each actor V and the ids of its sampled users; the actor runs the
native client updates and returns them, and the driver combines them in cohort order with the
native reduction (:mod:`fedrecon_fast.partitions`). Actors restart and calls are retried when a
worker dies: a round is a pure function of (V, seed, round, clients), so a retried call returns
the same bits.

The round with dense quantized updates has no per-client sparse form; it runs as shards of the
cohort instead. The native round sums client updates along a fixed binary tree over cohort
positions (a range of more than ``REDUCE_LEAF`` clients splits at its midpoint, rounded up; a
smaller one is summed in order), and a range's tree depends only on its length. So a shard that
is a node of that tree can run anywhere (:func:`kernels.train_round_partial`), and adding the
shards' float64 sums pairwise along the same tree gives, bit for bit, what one local
:func:`kernels.train_round` gives — for any number of shards or workers. Those shards need the
whole data set, which then goes to Ray's object store once.
"""

from __future__ import annotations

import os

import numpy as np

from . import kernels
from ._native import core as _core
from ._validation import as_index_array, check_int
from .kernels import PartialRound, RoundResult
from .partitions import round_summary, combine, partition_bounds, partition_data, routable, route

__all__ = ["REDUCE_LEAF", "shard_ranges", "combine_round", "RayExecutor"]

REDUCE_LEAF = int(_core.REDUCE_LEAF)


def _midpoint(a: int, b: int) -> int:
    return a + (b - a + 1) // 2


def shard_ranges(num_clients: int, num_shards: int) -> list[tuple[int, int]]:
    """Split cohort positions ``[0, num_clients)`` into about ``num_shards`` shards.

    The shards are contiguous, in order, and nodes of the reduction tree (the largest range is
    split first), so :func:`combine_round` can reproduce the local round from them. Fewer
    shards come back when the ranges reach ``REDUCE_LEAF`` clients.
    """
    check_int(num_clients, "num_clients", minimum=0)
    check_int(num_shards, "num_shards", minimum=1)
    ranges = [(0, num_clients)]
    while len(ranges) < num_shards:
        i = max(range(len(ranges)), key=lambda j: ranges[j][1] - ranges[j][0])
        a, b = ranges[i]
        if b - a <= REDUCE_LEAF:
            break
        ranges[i:i + 1] = [(a, _midpoint(a, b)), (_midpoint(a, b), b)]
    return ranges


def _add(left, right):
    """Sum of two sparse (rows, values, bias) float64 partials; None is an absent range."""
    if left is None:
        return right
    if right is None:
        return left
    rows = np.union1d(left[0], right[0])
    il, ir = np.searchsorted(rows, left[0]), np.searchsorted(rows, right[0])
    in_left = np.zeros(len(rows), dtype=bool)
    in_left[il] = True
    both = in_left[ir]
    out = []
    for lv, rv in ((left[1], right[1]), (left[2], right[2])):
        if lv is None:
            out.append(None)
            continue
        v = np.empty((len(rows),) + lv.shape[1:], dtype=np.float64)
        v[il] = lv
        # A row only one side has is copied, as the native tree does (never 0 + x).
        v[ir[both]] += rv[both]
        v[ir[~both]] = rv[~both]
        out.append(v)
    return rows, out[0], out[1]


def _tree_sum(a: int, b: int, parts: dict):
    if (a, b) in parts:
        return parts[(a, b)]
    if b - a <= REDUCE_LEAF:
        raise ValueError(f"shards must be nodes of the reduction tree (see shard_ranges); "
                         f"nothing covers clients [{a}, {b})")
    mid = _midpoint(a, b)
    return _add(_tree_sum(a, mid, parts), _tree_sum(mid, b, parts))


def combine_round(ranges, parts, num_items: int, dim: int) -> RoundResult:
    """Combine the shards' partial sums into the round's :class:`kernels.RoundResult`.

    Parameters
    ----------
    ranges : list of (int, int)
        The shards' cohort positions, from :func:`shard_ranges`, in order.
    parts : list of PartialRound
        What :func:`kernels.train_round_partial` returned for each shard.
    num_items, dim : int
        Shape of the model's item matrix.
    """
    if len(ranges) != len(parts) or not ranges:
        raise ValueError("ranges and parts must pair one shard each (at least one)")
    for k, ((a, b), p) in enumerate(zip(ranges, parts)):
        if not isinstance(p, PartialRound):
            raise TypeError(f"parts[{k}] must be a PartialRound; got {type(p).__name__}")
        if len(p.client_stats["weight"]) != b - a or (k and ranges[k - 1][1] != a):
            raise ValueError(f"parts[{k}] does not match shard {ranges[k]} of contiguous ranges")
    m = ranges[-1][1]
    stats = {key: np.concatenate([p.client_stats[key] for p in parts]) for key in parts[0].client_stats}
    touched = np.unique(np.concatenate([p.touched for p in parts]))
    summary = round_summary(stats, len(touched))
    has_bias = parts[0].bias is not None
    delta = np.zeros((num_items, dim), dtype=np.float32)
    delta_bias = np.zeros(num_items, dtype=np.float32) if has_bias else None
    if summary["total_weight"] > 0:
        rows, values, bias = _tree_sum(0, m, {r: (p.rows, p.values, p.bias) for r, p in zip(ranges, parts)})
        inv_total = 1.0 / summary["total_weight"]  # the native round scales by the reciprocal
        delta[rows] = (values * inv_total).astype(np.float32)
        if has_bias:
            delta_bias[rows] = (bias * inv_total).astype(np.float32)
    users = user_bias = None
    if parts[0].users is not None:
        users = np.concatenate([p.users for p in parts])
        if parts[0].user_bias is not None:
            user_bias = np.concatenate([p.user_bias for p in parts])
    return RoundResult(delta, delta_bias, stats, summary, users, user_bias)


class _PartitionWorker:
    """A Ray actor holding one partition of the users (its constructor argument, so a restarted
    actor holds it again)."""

    def __init__(self, partition_ref: list, num_threads: int):
        import ray

        # The partition arrives as a reference in a list (Ray does not resolve nested
        # references), fetched here: a restarted actor runs this again and gets it back, since
        # the driver keeps the reference alive.
        self.partition = ray.get(partition_ref[0])
        self.num_threads = num_threads

    def pid(self) -> int:
        return os.getpid()

    def updates(self, item_factors, item_bias, local, config, users, user_bias, kwargs):
        return kernels.client_updates(item_factors, self.partition, local, config, item_bias=item_bias,
                                      users=users, user_bias=user_bias, num_threads=self.num_threads, **kwargs)

    def shard(self, item_factors, item_bias, data, clients, config, users, user_bias, kwargs):
        return kernels.train_round_partial(item_factors, data, clients, config, item_bias=item_bias,
                                           users=users, user_bias=user_bias,
                                           num_threads=self.num_threads, **kwargs)


class RayExecutor:
    """Runs each round's clients on Ray actors that each hold a partition of the users.

    Results are bit-identical to the local executor for any number of workers (see the
    module docstring). Actors restart after a failure and their calls are retried, up to
    ``max_retries`` times each.

    Parameters
    ----------
    num_workers : int, optional
        Actors to start (default: the cluster's CPUs divided by ``threads_per_worker``).
    address : str, optional
        A running cluster (``"auto"``, ``"ray://head:10001"``); default: the ``RAY_ADDRESS``
        environment variable, else a local Ray started here.
    threads_per_worker : int
        Native threads (and Ray CPUs) per actor.
    shards_per_worker : int
        Shards per actor and round of the dense-quantized fallback.
    max_retries : int
        Restarts of each actor, and retries of each call, after a worker dies (-1: no limit).
    """

    def __init__(self, num_workers: int | None = None, *, address: str | None = None,
                 threads_per_worker: int = 1, shards_per_worker: int = 1, max_retries: int = 3):
        try:
            import ray
        except ImportError:
            raise ImportError('the Ray backend needs Ray: pip install "fedrecon_fast[ray]"') from None
        check_int(num_workers, "num_workers", minimum=1, allow_none=True)
        check_int(threads_per_worker, "threads_per_worker", minimum=1)
        check_int(shards_per_worker, "shards_per_worker", minimum=1)
        check_int(max_retries, "max_retries", minimum=-1)
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            address = address or os.environ.get("RAY_ADDRESS")
            local = {} if address else {"num_cpus": num_workers * threads_per_worker if num_workers else None}
            # We use no accelerators; this opts in to Ray's future default (and silences its warning).
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, **local)
        if num_workers is None:
            num_workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_worker)
        self._actor = ray.remote(num_cpus=threads_per_worker, max_restarts=max_retries,
                                 max_task_retries=max_retries)(_PartitionWorker)
        self.num_workers = num_workers
        self.threads_per_worker = threads_per_worker
        self.shards_per_worker = shards_per_worker
        self._workers: list | None = []
        self._partition_refs: list = []
        self._bounds = None
        self._data = self._data_ref = None

    @property
    def workers(self) -> list:
        """The actors, one per partition (empty until the first round)."""
        if self._workers is None:
            raise ValueError("this RayExecutor is closed")
        return list(self._workers)

    def _hold(self, data) -> None:
        """Give each actor its partition of ``data`` (once per data set)."""
        if data is self._data:
            return
        for w in self.workers:
            self._ray.kill(w)
        self._bounds = partition_bounds(data.num_clients, self.num_workers)
        self._partition_refs = [self._ray.put(partition_data(data, int(lo), int(hi)))
                                for lo, hi in zip(self._bounds[:-1], self._bounds[1:])]
        self._workers = [self._actor.remote([ref], self.threads_per_worker) for ref in self._partition_refs]
        self._data, self._data_ref = data, None

    def train_round(self, item_factors, data, clients=None, config=None, *, item_bias=None,
                    users=None, user_bias=None, num_threads: int = 0, **kwargs) -> RoundResult:
        """:func:`kernels.train_round` with the clients run by the actors holding them."""
        self._hold(data)
        ray = self._ray
        clients = np.arange(data.num_clients, dtype=np.int64) if clients is None else \
            as_index_array(clients, "clients", upper=data.num_clients)
        V = np.asarray(item_factors)
        if len(clients) == 0:  # nothing to send: the (empty) round is the local one
            return kernels.train_round(V, data, clients, config, item_bias=item_bias, users=users,
                                       user_bias=user_bias, num_threads=num_threads, **kwargs)
        V_ref = ray.put(V)  # once per round, shared by every call
        bias_ref = None if item_bias is None else ray.put(np.asarray(item_bias))
        if not routable(**kwargs):
            return self._sharded(V_ref, bias_ref, V.shape, data, clients, config, users, user_bias, kwargs)
        routes = route(clients, self._bounds)
        futures = [self._workers[r.partition].updates.remote(
            V_ref, bias_ref, r.local, config, None if users is None else users[r.positions],
            None if user_bias is None else user_bias[r.positions], kwargs) for r in routes]
        return combine(routes, ray.get(futures), len(clients), *V.shape, num_threads=num_threads)

    def _sharded(self, V_ref, bias_ref, shape, data, clients, config, users, user_bias, kwargs) -> RoundResult:
        """Shards of the cohort on the whole data set (dense quantized updates)."""
        if self._data_ref is None:  # the clients' ratings go to the object store once
            self._data_ref = self._ray.put(data)
        ranges = shard_ranges(len(clients), self.num_workers * self.shards_per_worker)
        futures = []
        for k, (a, b) in enumerate(ranges):
            state = (None, None) if users is None else (
                users[a:b], None if user_bias is None else user_bias[a:b])
            worker = self._workers[k % self.num_workers]
            futures.append(worker.shard.remote(V_ref, bias_ref, self._data_ref, clients[a:b], config, *state,
                                               kwargs))
        return combine_round(ranges, self._ray.get(futures), *shape)

    def close(self) -> None:
        """Stop the actors (and Ray, if this executor started it)."""
        if self._workers is None:
            return
        for w in self._workers:
            self._ray.kill(w)
        self._workers = None
        self._partition_refs = []
        self._data = self._data_ref = None
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
