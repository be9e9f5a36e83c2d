"""Rounds run on other processes or machines that combine into the local result, bit for bit.

:class:`RayExecutor` (``pip install "fedrecon_fast[ray]"``; pass it, or ``backend="ray"``, to
:class:`fedrecon_fast.FedRecon`) gives each Ray actor one partition of the users, put once
per data set. A round sends each actor V and the ids of its sampled users; the actor runs the
native client updates and returns them, and the driver combines them in cohort order with the
native reduction (:mod:`fedrecon_fast.integrations.partitions`). Actors restart and calls are retried when a
worker dies: a round is a pure function of (V, seed, round, clients), so a retried call returns
the same bits.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import kernels
from .._validation import as_index_array, check_int
from ..kernels import RoundResult
from .partitions import combine, partition_bounds, partition_data, route

__all__ = ["RayExecutor"]


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
        return kernels.client_updates(
            item_factors,
            self.partition,
            local,
            config,
            item_bias=item_bias,
            users=users,
            user_bias=user_bias,
            num_threads=self.num_threads,
            **kwargs,
        )


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
    max_retries : int
        Restarts of each actor, and retries of each call, after a worker dies (-1: no limit).
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        address: str | None = None,
        threads_per_worker: int = 1,
        max_retries: int = 3,
    ):
        try:
            import ray
        except ImportError:
            raise ImportError('the Ray backend needs Ray: pip install "fedrecon_fast[ray]"') from None
        check_int(num_workers, "num_workers", minimum=1, allow_none=True)
        check_int(threads_per_worker, "threads_per_worker", minimum=1)
        check_int(max_retries, "max_retries", minimum=-1)
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            address = address or os.environ.get("RAY_ADDRESS")
            local: dict[str, Any] = (
                {} if address else {"num_cpus": num_workers * threads_per_worker if num_workers else None}
            )
            # We use no accelerators; this opts in to Ray's future default (and silences its warning).
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **local)
        if num_workers is None:
            num_workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_worker)
        self._actor = ray.remote(num_cpus=threads_per_worker, max_restarts=max_retries, max_task_retries=max_retries)(
            _PartitionWorker
        )
        self.num_workers = num_workers
        self.threads_per_worker = threads_per_worker
        self._workers: list | None = []
        self._partition_refs: list = []
        self._bounds = np.zeros(1, np.int64)
        self._data = None

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
        self._partition_refs = [
            self._ray.put(partition_data(data, int(lo), int(hi))) for lo, hi in zip(self._bounds[:-1], self._bounds[1:])
        ]
        self._workers = [self._actor.remote([ref], self.threads_per_worker) for ref in self._partition_refs]
        self._data = data

    def train_round(
        self,
        item_factors,
        data,
        clients=None,
        config=None,
        *,
        item_bias=None,
        users=None,
        user_bias=None,
        num_threads: int = 0,
        **kwargs,
    ) -> RoundResult:
        """:func:`kernels.train_round` with the clients run by the actors holding them."""
        self._hold(data)
        ray = self._ray
        clients = (
            np.arange(data.num_clients, dtype=np.int64)
            if clients is None
            else as_index_array(clients, "clients", upper=data.num_clients)
        )
        V = np.asarray(item_factors)
        if len(clients) == 0:  # nothing to send: the (empty) round is the local one
            return kernels.train_round(
                V,
                data,
                clients,
                config,
                item_bias=item_bias,
                users=users,
                user_bias=user_bias,
                num_threads=num_threads,
                **kwargs,
            )
        V_ref = ray.put(V)  # once per round, shared by every call
        bias_ref = None if item_bias is None else ray.put(np.asarray(item_bias))
        routes = route(clients, self._bounds)
        workers = self.workers
        futures = [
            workers[r.partition].updates.remote(
                V_ref,
                bias_ref,
                r.local,
                config,
                None if users is None else users[r.positions],
                None if user_bias is None else user_bias[r.positions],
                kwargs,
            )
            for r in routes
        ]
        return combine(routes, ray.get(futures), len(clients), *V.shape, num_threads=num_threads)

    def close(self) -> None:
        """Stop the actors (and Ray, if this executor started it)."""
        if self._workers is None:
            return
        for w in self._workers:
            self._ray.kill(w)
        self._workers = None
        self._partition_refs = []
        self._data = None
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
