"""Fail fast on impossible sizes: the memory a training run will need, before it starts.

:func:`estimate_training` adds up the large allocations of a run from its sizes (items x K,
clients per round, ratings per client, threads); :func:`check_training` compares the total
with the memory the machine has available and refuses a run that cannot fit, naming both
numbers and the parts that dominate. The estimate is an upper bound of the big arrays, not a
measurement: Python, NumPy and the data set itself come on top.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

__all__ = ["MemoryEstimateError", "estimate_training", "available_memory", "check_training", "format_bytes"]

_F32 = 4
_F64 = 8


class MemoryEstimateError(MemoryError):
    """A run that would need more memory than the machine has available."""


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def estimate_training(num_items: int, config, *, client_sizes=None, num_threads: Optional[int] = None) -> dict:
    """The large allocations of training with ``config`` on ``num_items`` items, in bytes.

    Parameters
    ----------
    num_items : int
        Rows of V.
    config : FedReconConfig
        The run (dim, clients per round, reconstruction, server optimizer, ...).
    client_sizes : array_like of int, optional
        Ratings per training client (after the cap); default: ``config.max_examples`` or 300.
    num_threads : int, optional
        Worker threads (default: ``config.num_threads``, 0 meaning all cores).

    Returns
    -------
    dict
        Bytes per part: ``model`` (V, biases), ``server`` (the dense mean update and the
        optimizer's state), ``round updates`` (every sampled client's touched rows, held until
        the round is aggregated), ``workers`` (per-thread scratch: K x K systems of exact
        reconstruction, gathered rows, item maps), and ``total``.
    """
    K = int(config.dim)
    D = K + int(config.biases)
    padded = -(-K // 8) * 8
    if client_sizes is None or len(client_sizes) == 0:
        largest = mean = float(config.max_examples or 300)
    else:
        sizes = np.asarray(client_sizes, dtype=np.float64)
        largest, mean = float(sizes.max()), float(sizes.mean())
    threads = num_threads if num_threads is not None else config.num_threads
    threads = threads or os.cpu_count() or 1
    cohort = min(int(config.clients_per_round), 1 << 40)
    v = num_items * K * _F32
    model = v + (num_items * _F32 if config.biases else 0)
    optimizer_copies = {"sgd": 0, "momentum": 1, "adagrad": 1, "adam": 2, "yogi": 2}[config.server_optimizer]
    in_place = config.server_optimizer == "sgd" and config.dp_clip is None and not config.learn_user_default
    server = v * (optimizer_copies + (0 if in_place else 1))
    # Each client's update covers the rows its query set touches (half its ratings, or all of
    # them when support and query are the same), K floats each; the whole cohort's updates live
    # until aggregation.
    query_share = 1.0 if config.client.split == "reuse" else 0.5
    updates = cohort * query_share * mean * K * _F32
    exact = 32 * D * D if (config.client.recon == "exact" or config.evaluation.recon == "exact") else 0
    per_thread = exact + 2 * largest * padded * _F32 + num_items * (_F32 + _F64)
    parts = {"model": model, "server": server, "round updates": updates, "workers": threads * per_thread}
    parts["total"] = sum(parts.values())
    return {k: int(v) for k, v in parts.items()}


def available_memory() -> tuple[Optional[int], Optional[int]]:
    """``(available, total)`` bytes of memory on this machine (None where unknown).

    Linux: ``MemAvailable`` and ``MemTotal`` of /proc/meminfo; elsewhere the physical pages
    (``os.sysconf``) for both.
    """
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        pass
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return total, total
    except (AttributeError, ValueError, OSError):
        return None, None


def check_training(
    num_items: int, config, *, client_sizes=None, num_threads: Optional[int] = None, available: Optional[int] = None
) -> dict:
    """Refuse (:class:`MemoryEstimateError`) a run whose estimate exceeds the memory available.

    ``available`` defaults to :func:`available_memory`; when it is unknown nothing is refused.
    Returns the estimate (:func:`estimate_training`).
    """
    estimate = estimate_training(num_items, config, client_sizes=client_sizes, num_threads=num_threads)
    total_memory = None
    if available is None:
        available, total_memory = available_memory()
    if available is not None and estimate["total"] > available:
        parts = ", ".join(
            f"{name} {format_bytes(b)}"
            for name, b in sorted(((k, v) for k, v in estimate.items() if k != "total"), key=lambda kv: -kv[1])
            if b
        )
        machine = f"{format_bytes(available)} available" + (f" of {format_bytes(total_memory)}" if total_memory else "")
        hint = "lower dim (--dim)"
        if config.client.recon == "exact" or config.evaluation.recon == "exact":
            hint += ", use SGD reconstruction (exact reconstruction solves a K x K system per thread) or fewer threads"
        hint += " or clients_per_round (--clients-per-round)"
        raise MemoryEstimateError(
            f"training needs about {format_bytes(estimate['total'])} of memory ({parts}; K = {config.dim}, "
            f"{num_items} items, {config.clients_per_round} clients per round), but this machine has {machine}: "
            f"{hint}"
        )
    return estimate
