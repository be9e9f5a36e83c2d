"""Differentially private aggregation of client updates: DP-FedAvg's Gaussian mechanism.

Following McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018), a round of DP-FedAvg

1. clips each client update to L2 norm ``C``: ``Δ_i · min(1, C / ||Δ_i||)``. A dense update is
   clipped over the whole array; a sparse-row update over the values it sends (FedRecon's
   sparse updates, Singhal et al. 2021, send only the rows of V a client touched);
2. sums the clipped updates with weights ``w_i ∈ [0, 1]`` (1 for uniform weighting, or
   McMahan's capped weights ``min(n_i / n_cap, 1)``, see :func:`capped_weights`), in float64;
3. adds independent Gaussian noise ``N(0, (z·C)²)`` to **every coordinate of the sum** (the
   whole output table, also rows nobody sent, so the set of touched rows is not revealed).
   With ``w_i <= 1`` one client moves the sum by at most ``C``, so ``z`` is the noise
   multiplier of the Gaussian mechanism with sensitivity ``C``;
4. divides by a **fixed denominator** (``expected_weight``): McMahan et al.'s
   fixed-denominator estimator ``f̃_f = Σ_i w_i clip(Δ_i) / (q W)``, where ``q`` is the
   client sampling probability and ``W = Σ_k w_k`` over *all* clients, so ``q W`` is the
   expected total weight of a round (the expected number of clients with uniform weights,
   as TFF's ``DifferentiallyPrivateFactory.gaussian_fixed`` uses). The denominator is a public
   constant, so dividing by it costs no privacy; dividing by the round's actual ``Σ w_i``
   would be data-dependent and is deliberately not offered. Without ``expected_weight`` the
   noised sum itself is returned.

The noise standard deviation is ``z·C`` on the sum (``z·C / expected_weight`` on the mean).
:mod:`fedrecon_fast.accounting` turns ``z``, the sampling and the number of rounds into
``(ε, δ)`` with Google's ``dp_accounting``.

**Adaptive clipping** (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021; the semantics of TensorFlow Privacy's
``QuantileEstimatorQuery`` with geometric updates, as TFF's ``gaussian_adaptive`` uses):
:func:`adaptive_clip_update` moves ``C`` after each round toward the ``γ`` quantile of the
update norms, from a noised count of the updates that were not clipped, and
:func:`value_noise_multiplier` splits a total noise multiplier between the update and that
count so that both together cost what one Gaussian mechanism with the total multiplier costs.

Noise is reproducible: coordinate ``g`` of round ``round`` is a pure function of
``(seed, round, g)`` — SplitMix64 stream ``derive_seed(seed, round, 0, STREAM_PRIVACY)``, pairs of
outputs turned into two normals by a hand-written Box–Muller transform (see
:func:`gaussian_noise`) — so it never depends on ``num_threads``. Use a new ``round`` (or
seed) for every release: two releases with the same noise reveal their difference.

:class:`DPGaussianSum` has the ``add`` / ``add_sparse`` / ``result`` interface of
:class:`fedrecon_fast.aggregation.WeightedMean`, so a training loop can swap one for the other.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np

from ._native import core as _core
from ._validation import check_float, check_int, check_threads
from .aggregation import (
    _as_f32,
    _dense_updates,
    _output,
    _real_array,
    _row_values,
    _rows,
    _sparse_batch,
    _table_shape,
    _weight,
    _weights,
)

__all__ = [
    "STREAM_PRIVACY",
    "DPGaussianSum",
    "adaptive_clip_update",
    "value_noise_multiplier",
    "DPResult",
    "capped_weights",
    "clip_by_norm",
    "dp_sum",
    "dp_sum_sparse",
    "gaussian_noise",
    "privatize_mean",
]

#: Random stream of the DP noise (see :mod:`fedrecon_fast._rng` for streams 0-4).
from ._rng import STREAM_CLIP_COUNT, STREAM_PRIVACY, generator  # noqa: E402  (one table of streams)

_UINT64 = 2**64


@dataclass(frozen=True)
class DPResult:
    """A differentially private aggregate and what it reports.

    Attributes
    ----------
    value : ndarray
        ``(Σ_i w_i clip(Δ_i) + N(0, (z·C)²)) / denominator``.
    norms : ndarray, shape (n_clients,), float64
        Each update's L2 norm before clipping (not private: keep it on the server).
    num_updates : int
        Updates aggregated.
    num_clipped : int
        Updates whose norm exceeded ``clip`` (and were scaled down).
    clip : float
        The clipping norm ``C``.
    noise_multiplier : float
        ``z``.
    noise_std : float
        ``z·C``, the standard deviation of the noise on each coordinate of the sum.
    total_weight : float
        ``Σ_i w_i`` of the aggregated updates.
    denominator : float
        ``expected_weight``, or 1.0 for a plain noised sum.
    """

    value: np.ndarray
    norms: np.ndarray
    num_updates: int
    num_clipped: int
    clip: float
    noise_multiplier: float
    noise_std: float
    total_weight: float
    denominator: float

    @property
    def clipped_fraction(self) -> float:
        """``num_clipped / num_updates`` (0.0 without updates)."""
        return self.num_clipped / self.num_updates if self.num_updates else 0.0

    @property
    def value_noise_std(self) -> float:
        """Standard deviation of the noise in ``value``: ``z·C / denominator``."""
        return self.noise_std / self.denominator

    def metrics(self) -> dict:
        """The reportable numbers as a flat dict (for a round's metrics)."""
        return {"dp_clip": self.clip, "dp_noise_multiplier": self.noise_multiplier,
                "dp_noise_std": self.noise_std, "dp_num_clipped": self.num_clipped,
                "dp_clipped_fraction": self.clipped_fraction, "dp_denominator": self.denominator}


def _dp_params(clip, noise_multiplier, seed, round, expected_weight):
    check_float(clip, "clip", minimum=0.0, strict=True)
    check_float(noise_multiplier, "noise_multiplier", minimum=0.0)
    check_int(seed, "seed", minimum=0)
    check_int(round, "round", minimum=0)
    if expected_weight is None:
        denominator = 1.0
    else:
        check_float(expected_weight, "expected_weight", minimum=0.0, strict=True)
        denominator = float(expected_weight)
        if not math.isfinite(1.0 / denominator):  # a subnormal: its reciprocal overflows
            raise ValueError(f"expected_weight is too small: 1 / {denominator!r} overflows float64")
    return float(clip), float(noise_multiplier), int(seed) % _UINT64, int(round) % _UINT64, denominator


def _result(value, norms, summary: dict, denominator: float) -> DPResult:
    # Finite updates, weights and noise can still overflow float32 (or float64) once divided by
    # a tiny expected_weight: an error, not a silent infinity.
    if not np.isfinite(value).all():
        raise ValueError(f"the aggregate overflows {value.dtype} when divided by expected_weight="
                         f"{denominator!r}: pass a larger expected_weight (or dtype=numpy.float64)")
    return DPResult(value=value, norms=norms, num_updates=int(summary["num_updates"]),
                    num_clipped=int(summary["num_clipped"]), clip=summary["clip"],
                    noise_multiplier=summary["noise_multiplier"], noise_std=summary["noise_std"],
                    total_weight=summary["total_weight"], denominator=denominator)


def capped_weights(num_examples, cap: float) -> np.ndarray:
    """McMahan et al.'s per-client DP weights ``min(n_i / cap, 1)`` (float64, in [0, 1]).

    Parameters
    ----------
    num_examples : array_like, shape (n_clients,)
        Examples per client (>= 0).
    cap : float
        ``ŵ``: clients with at least ``cap`` examples get weight 1.
    """
    n = _real_array(num_examples, "num_examples")
    if n.ndim != 1:
        raise ValueError(f"num_examples must be 1-D; got shape {n.shape}")
    n = n.astype(np.float64)
    if not np.isfinite(n).all() or (n < 0).any():
        raise ValueError("num_examples must be finite and >= 0")
    check_float(cap, "cap", minimum=0.0, strict=True)
    with np.errstate(over="ignore"):  # n / a tiny cap is inf: weight 1 all the same
        return np.minimum(n / float(cap), 1.0)


def clip_by_norm(update, clip: float, *, num_threads: int = 0) -> tuple[np.ndarray, bool, float]:
    """Scale an update to L2 norm at most ``clip``: ``update · min(1, clip / ||update||)``.

    Parameters
    ----------
    update : array_like, any shape
        Converted once to float32. The norm is over all its values (for a sparse update, pass
        its values).
    clip : float
        ``C > 0``.
    num_threads : int
        0 uses all cores; the result does not depend on it.

    Returns
    -------
    clipped : ndarray, float32, same shape
        Unchanged values when ``||update|| <= clip``; otherwise scaled in float64 and rounded
        once to float32, so its norm is ``clip`` up to float32 rounding (relative 1e-7).
    was_clipped : bool
        ``||update|| > clip``.
    norm : float
        ``||update||`` before clipping (float64 sum of squares in a fixed order).

    Raises
    ------
    ValueError
        ``clip <= 0`` or a NaN/infinite value in ``update``.
    """
    x = _as_f32(_real_array(update, "update"), "update")
    check_float(clip, "clip", minimum=0.0, strict=True)
    check_threads(num_threads)
    clipped, norm = _core.clip_by_norm(x, float(clip), num_threads)
    return clipped, bool(norm > clip), float(norm)


def gaussian_noise(shape, std: float, *, seed: int, round: int = 0, num_threads: int = 0) -> np.ndarray:
    """The exact noise the DP kernels add for ``(seed, round)``: ``std · z_g``, float64.

    Coordinate ``g`` (in C order) pairs with its neighbour as ``p = g // 2``; pair ``p`` takes
    outputs ``2p`` and ``2p + 1`` of the SplitMix64 stream keyed
    ``derive_seed(seed, round, 0, STREAM_PRIVACY)`` — output ``j`` is
    ``mix64(key + j·0x9E3779B97F4A7C15)`` — as ``u1 = (a >> 11)·2⁻⁵³``, ``u2 = (b >> 11)·2⁻⁵³``,
    and Box–Muller gives ``z_{2p} = r cos θ``, ``z_{2p+1} = r sin θ`` with
    ``r = sqrt(-2 ln(1 - u1))`` and ``θ = 2π u2``.

    Parameters
    ----------
    shape : int or tuple of int
    std : float
        ``>= 0``.
    seed, round : int
    num_threads : int
        0 uses all cores; the result does not depend on it.
    """
    shape, num_rows, dim = _table_shape(shape)
    check_float(std, "std", minimum=0.0)
    check_int(seed, "seed", minimum=0)
    check_int(round, "round", minimum=0)
    check_threads(num_threads)
    out = _core.gaussian_noise(num_rows * dim, float(std), int(seed) % _UINT64, int(round) % _UINT64, num_threads)
    return out.reshape(shape)


def privatize_mean(update: dict, total_weight: float, *, clip: float, noise_multiplier: float,
                   expected_clients: int, seed: int, round: int = 0, num_threads: int = 0) -> None:
    """DP-FedAvg's server step on a round's weighted mean of clipped updates, in place.

    Each array of ``update`` (a dict of float32 means) becomes ``(mean · total_weight + noise) /
    expected_clients`` with Gaussian noise of std ``noise_multiplier · clip``
    (:func:`gaussian_noise` over all arrays in order): the noisy sum over a fixed denominator
    (McMahan et al. 2018).
    """
    sizes = [a.size for a in update.values()]
    noise = gaussian_noise(sum(sizes), noise_multiplier * clip, seed=seed, round=round, num_threads=num_threads)
    offset = 0
    for name, mean in update.items():
        noised = mean.astype(np.float64) * total_weight + noise[offset:offset + mean.size].reshape(mean.shape)
        update[name] = (noised / expected_clients).astype(np.float32)
        offset += mean.size


def dp_sum(updates, weights=None, *, clip: float, noise_multiplier: float, seed: int, round: int = 0,
           expected_weight: float | None = None, dtype=None, out=None, num_threads: int = 0) -> DPResult:
    """DP-FedAvg aggregation of dense updates: clip, weighted sum, Gaussian noise.

    ``value = (Σ_i w_i · clip_C(Δ_i) + N(0, (z·C)²)) / expected_weight`` (see the module
    docstring; without ``expected_weight`` the noised sum is returned).

    Parameters
    ----------
    updates : array_like, shape (n_clients, ...), or sequence of n_clients array_like
        One update per client (float32 after conversion). ``(0, ...)`` gives pure noise.
    weights : array_like, shape (n_clients,), optional
        In ``[0, 1]`` (default: all 1).
    clip : float
        ``C > 0``.
    noise_multiplier : float
        ``z >= 0`` (0: clipping only).
    seed, round : int
        Key the noise; use a new ``round`` every release.
    expected_weight : float, optional
        The fixed denominator ``q W`` (expected total weight per round).
    dtype : {numpy.float32, numpy.float64}, optional
        Default float32, or that of ``out``.
    out : ndarray, optional
        Where to write ``value`` (exact shape, float32/float64, C-contiguous, writeable).
    num_threads : int
        0 uses all cores; the result does not depend on it.

    Returns
    -------
    DPResult
        ``value`` has the updates' shape.

    Raises
    ------
    ValueError
        Bad parameters, weights outside ``[0, 1]``, mismatched shapes, non-finite values.
    """
    clip, z, seed, round, denominator = _dp_params(clip, noise_multiplier, seed, round, expected_weight)
    arrays, shape = _dense_updates(updates)
    w = _weights(weights, len(arrays), dp=True)
    float64, out = _output(out, shape, dtype, arrays)
    check_threads(num_threads)
    value, norms, summary = _core.dp_sum_dense(arrays, int(np.prod(shape, dtype=np.int64)), w, clip, z, seed,
                                               round, denominator, float64, num_threads, out=out)
    return _result(value.reshape(shape) if out is None else out, norms, summary, denominator)


def dp_sum_sparse(rows, values, offsets, weights=None, *, num_rows: int, clip: float,
                  noise_multiplier: float, seed: int, round: int = 0,
                  expected_weight: float | None = None, dtype=None, out=None,
                  num_threads: int = 0) -> DPResult:
    """DP-FedAvg aggregation of sparse-row updates into a ``(num_rows, ...)`` table.

    The layout of ``rows``/``values``/``offsets`` is that of
    :func:`fedrecon_fast.aggregation.weighted_mean_sparse`. Each client is clipped over the
    values it sends; noise ``N(0, (z·C)²)`` is added to every coordinate of the table.
    Other parameters as in :func:`dp_sum`.

    Returns
    -------
    DPResult
        ``value`` has shape ``(num_rows,) + values.shape[1:]``.
    """
    clip, z, seed, round, denominator = _dp_params(clip, noise_multiplier, seed, round, expected_weight)
    rows, values, offsets, num_rows, row_shape = _sparse_batch(rows, values, offsets, num_rows)
    w = _weights(weights, offsets.shape[0] - 1, dp=True)
    shape = (num_rows,) + row_shape
    float64, out = _output(out, shape, dtype, (values,))
    check_threads(num_threads)
    value, norms, summary = _core.dp_sum_sparse(offsets, rows, values, w, num_rows, clip, z, seed, round,
                                                denominator, float64, num_threads, out=out)
    return _result(value.reshape(shape) if out is None else out, norms, summary, denominator)


class DPGaussianSum:
    """Streaming DP-FedAvg aggregate: clip each update as it arrives, add noise at the end.

    A drop-in for :class:`~fedrecon_fast.aggregation.WeightedMean` (``add`` / ``add_sparse`` /
    ``result``), whose result is ``(Σ_i w_i clip_C(Δ_i) + N(0, (z·C)²)) / expected_weight``.
    Bit-identical to :func:`dp_sum` / :func:`dp_sum_sparse` for the same updates in the same
    order. Memory is row-sparse until a dense update arrives, as for ``WeightedMean``.

    Parameters
    ----------
    shape : int or tuple of int
        Shape of the updates and of the result; rows are the first axis.
    clip : float
        ``C > 0``.
    noise_multiplier : float
        ``z >= 0``.
    seed, round : int
        Key the noise of this aggregate (one release per ``(seed, round)``).
    expected_weight : float, optional
        The fixed denominator ``q W``; without it ``result`` is the noised sum.
    num_threads : int
        0 uses all cores; results do not depend on it.
    """

    def __init__(self, shape, *, clip: float, noise_multiplier: float, seed: int, round: int = 0,
                 expected_weight: float | None = None, num_threads: int = 0):
        self._shape, num_rows, dim = _table_shape(shape)
        clip, z, seed, round, self._denominator = _dp_params(clip, noise_multiplier, seed, round,
                                                             expected_weight)
        check_threads(num_threads)
        self._num_threads = num_threads
        self._acc = _core.GaussianSum(num_rows, dim, clip, z, seed, round)
        self._norms: list[float] = []

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def num_updates(self) -> int:
        return int(self._acc.summary()["num_updates"])

    @property
    def num_clipped(self) -> int:
        return int(self._acc.summary()["num_clipped"])

    @property
    def clipped_fraction(self) -> float:
        n = self.num_updates
        return self.num_clipped / n if n else 0.0

    @property
    def total_weight(self) -> float:
        return float(self._acc.summary()["total_weight"])

    @property
    def noise_std(self) -> float:
        """``z·C``: standard deviation of the noise on each coordinate of the sum."""
        return float(self._acc.summary()["noise_std"])

    @property
    def norms(self) -> np.ndarray:
        """Norms before clipping of the updates added so far (float64)."""
        return np.asarray(self._norms, dtype=np.float64)

    def add(self, update, weight: float = 1.0) -> float:
        """Clip a dense update (over the whole array) and add it with ``weight`` in [0, 1].

        Returns its norm before clipping. A rejected update leaves the sum unchanged.
        """
        x = _real_array(update, "update")
        if x.shape != self._shape:
            raise ValueError(f"update must have shape {self._shape}; got {x.shape}")
        w = _weight(weight, dp=True)
        norm = float(self._acc.add_dense(_as_f32(x, "update"), w, self._num_threads))
        self._norms.append(norm)
        return norm

    def add_sparse(self, rows, values, weight: float = 1.0) -> float:
        """Clip a sparse-row update (over ``values``) and add it with ``weight`` in [0, 1].

        Returns its norm before clipping. A rejected update leaves the sum unchanged.
        """
        if not self._shape:
            raise ValueError("add_sparse needs a shape with a row axis; this accumulator is 0-d")
        rows = _rows(rows, self._shape[0])
        values, _ = _row_values(values, rows.shape[0], self._shape[1:])
        w = _weight(weight, dp=True)
        norm = float(self._acc.add_sparse(rows, values, w, self._num_threads))
        self._norms.append(norm)
        return norm

    def result(self, dtype=None, *, out=None) -> np.ndarray:
        """The noised (clipped, weighted) sum divided by ``expected_weight``.

        ``dtype`` defaults to float32 (or that of ``out``); ``out`` as in :func:`dp_sum`.
        """
        return self.finalize(dtype, out=out).value

    def finalize(self, dtype=None, *, out=None) -> DPResult:
        """The result with its DP report (clip fraction, noise std, noise multiplier)."""
        float64, out = _output(out, self._shape, dtype)
        value = self._acc.finalize(self._denominator, float64, self._num_threads, out=out)
        return _result(value.reshape(self._shape) if out is None else out, self.norms, self._acc.summary(),
                       self._denominator)

    def reset(self) -> None:
        """Forget every update (same noise key: use a new object for a new round)."""
        self._acc.reset()
        self._norms.clear()

    def __repr__(self) -> str:
        s = self._acc.summary()
        return (f"DPGaussianSum(shape={self._shape}, clip={s['clip']}, noise_multiplier={s['noise_multiplier']}, "
                f"num_updates={s['num_updates']}, num_clipped={s['num_clipped']})")


def value_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's own noise multiplier when adaptive clipping spends part of the budget.

    Adaptive clipping releases two Gaussian sums per round: the clipped updates (noise
    multiplier ``z_v`` relative to ``C``) and the count of unclipped updates, each contributing
    ``±1/2`` (noise std ``σ_b``, so multiplier ``2 σ_b``). Together they are one Gaussian
    mechanism with ``z = (z_v⁻² + (2 σ_b)⁻²)^(-1/2)`` (Andrew et al. 2021, Theorem 1), so for a
    total ``z`` the update gets ``z_v = (z⁻² - (2 σ_b)⁻²)^(-1/2)``, as TFF's
    ``DifferentiallyPrivateFactory.gaussian_adaptive`` computes.

    Parameters
    ----------
    noise_multiplier : float
        The total ``z >= 0`` (0: no noise on either).
    count_stddev : float
        ``σ_b``; must exceed ``z / 2`` when ``z > 0``.
    """
    check_float(noise_multiplier, "noise_multiplier", minimum=0.0)
    check_float(count_stddev, "count_stddev", minimum=0.0)
    if noise_multiplier == 0:
        return 0.0
    if 2.0 * count_stddev <= noise_multiplier:
        raise ValueError(f"the clipped-count noise std ({count_stddev:g}) is too small for a total noise "
                         f"multiplier of {noise_multiplier:g}: it must exceed {noise_multiplier / 2:g} (raise "
                         "dp_clip_count_stddev or clients_per_round, or lower the noise multiplier)")
    return (noise_multiplier ** -2 - (2.0 * count_stddev) ** -2) ** -0.5


def adaptive_clip_update(clip: float, num_unclipped: int, num_records: int, *, target_quantile: float,
                         learning_rate: float, count_stddev: float, expected_records: float, seed: int,
                         round: int) -> tuple[float, float]:
    """One step of the private quantile estimator that adapts the clip norm (geometric update).

    ``b = clip01((Σ_i (1[||Δ_i|| <= C] - 1/2) + N(0, σ_b²)) / expected_records + 1/2)`` estimates
    the fraction of unclipped updates, and ``C ← C · exp(-learning_rate · (b - target_quantile))``:
    the clip norm shrinks while more than ``target_quantile`` of the updates fit under it and
    grows otherwise, converging to the ``target_quantile`` quantile of the update norms.

    Parameters
    ----------
    clip : float
        The round's clip norm ``C > 0``.
    num_unclipped, num_records : int
        Updates of the round with norm ``<= C``, and all updates counted (the reporting clients).
    target_quantile : float
        ``γ`` in [0, 1].
    learning_rate : float
        ``η >= 0``: the clip moves by a factor of at most ``exp(η)`` per round.
    count_stddev : float
        ``σ_b >= 0``, the noise std of the count (0: the exact count).
    expected_records : float
        The fixed denominator (the expected cohort size).
    seed, round : int
        Key the count's noise: ``derive_seed(seed, round, 0, STREAM_CLIP_COUNT)``.

    Returns
    -------
    new_clip : float
    unclipped_fraction : float
        The noised estimate ``b``.
    """
    check_float(clip, "clip", minimum=0.0, strict=True)
    check_int(num_records, "num_records", minimum=0)
    check_int(num_unclipped, "num_unclipped", minimum=0, maximum=num_records)
    check_float(target_quantile, "target_quantile", minimum=0.0, maximum=1.0)
    check_float(learning_rate, "learning_rate", minimum=0.0)
    check_float(count_stddev, "count_stddev", minimum=0.0)
    check_float(expected_records, "expected_records", minimum=0.0, strict=True)
    check_int(seed, "seed", minimum=0)
    check_int(round, "round", minimum=0)
    # Each record adds ±1/2 (sensitivity 1/2 under add/remove), centred so the noise has
    # nothing to bias.
    shifted = num_unclipped - 0.5 * num_records
    if count_stddev > 0:
        shifted += count_stddev * float(generator(seed, round, 0, STREAM_CLIP_COUNT).standard_normal())
    fraction = min(1.0, max(0.0, shifted / expected_records + 0.5))
    return float(clip) * math.exp(-learning_rate * (fraction - target_quantile)), fraction
