"""A well-vectorised PyTorch CPU FedRecon round (optional peer; used only if ``import torch`` works).

The algorithm is :func:`lockstep_round.lockstep_round` (all clients step in lockstep, batched
gathers and matrix products, an accumulating ``index_put_`` for the row updates, a float64
``index_add_`` for the weighted mean); with ``backend="numpy"`` the very same code is validated
against the native round in ``bench/test_bench_round.py``. Nothing installs torch: when it is
missing, :func:`available` is False and the benchmark skips this column.
"""

from __future__ import annotations

from lockstep_round import build_lockstep, lockstep_round, to_backend

__all__ = ["available", "torch_version", "prepare", "torch_round"]


def available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def torch_version() -> str | None:
    if not available():
        return None
    import torch

    return torch.__version__


def prepare(data, clients, config, seed, round, dim, plans=None, *, num_threads=None):  # noqa: A002
    """The cohort's padded step tensors as torch tensors (not timed); sets torch's thread count."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    return to_backend(build_lockstep(data, clients, config, seed, round, dim, plans), "torch")


def torch_round(item_factors, problem, config):
    """The round's delta (NumPy float32) and per-client loss sums; ``item_factors`` a torch tensor
    or a NumPy array."""
    import torch

    V = item_factors if isinstance(item_factors, torch.Tensor) else torch.from_numpy(item_factors)
    with torch.no_grad():
        return lockstep_round(V, problem, config, backend="torch")
