"""Weighted aggregation of client updates, for any model in any framework.

The server step of federated averaging (and of Federated Reconstruction, Singhal et al.,
NeurIPS 2021, Algorithm 1) is the weighted mean of the clients' updates

    Δ = Σ_i w_i Δ_i / Σ_i w_i,

where a client sends either a dense array or a few rows of a table (row ids + values; a row
nobody sent gets 0). Sums run in float64 in native code with the GIL released.

Determinism
-----------
Each output coordinate is the float64 sum of its contributions **in client order** (and, for a
client that sends a row twice, in the order of its entries), starting from 0. Threads only split
the set of coordinates, so results are bit-identical for every ``num_threads``, and the
streaming :class:`WeightedMean` (one client at a time) returns exactly the bits of
:func:`weighted_mean` / :func:`weighted_mean_sparse` for the same clients in the same order.

Functions
---------
weighted_mean
    Dense batch: a ``(n_clients, ...)`` stack or a list of same-shape arrays.
weighted_mean_sparse
    Sparse-row batch: concatenated ``rows``/``values`` with per-client ``offsets``.
WeightedMean
    Streaming accumulator (``add`` / ``add_sparse`` / ``result``). Its storage is row-sparse
    until a dense update arrives, so a huge table that clients touch sparsely costs memory in
    proportion to the rows touched.

Differentially private aggregation (clipping + Gaussian noise) is in
:mod:`fedrecon_fast.privacy`; its :class:`~fedrecon_fast.privacy.DPGaussianSum` has the same
``add`` / ``add_sparse`` / ``result`` interface as :class:`WeightedMean`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._validation import check_float, check_int, check_threads, real_array, to_float32
from . import core as _core

__all__ = [
    "WeightedMean",
    "weighted_mean",
    "weighted_mean_sparse",
    "DPGaussianSum",
    "DPResult",
    "clip_by_norm",
    "dp_sum",
    "dp_sum_sparse",
    "gaussian_noise",
]

_MAX_ROWS = 2**31 - 1
_UINT64 = 2**64
_MAX_ELEMENTS = 2**59  # float64 sums of that many elements still have a byte size in int64


# --------------------------------------------------------------------------------------------
# Argument checks


def _as_f32(arr: np.ndarray, name: str) -> np.ndarray:
    return to_float32(arr, name)


def _dense_updates(updates, name: str = "updates") -> tuple[list[np.ndarray], tuple[int, ...]]:
    """A stack ``(n, ...)`` or a sequence of same-shape arrays -> (float32 arrays, item shape).

    A stack is converted once and split into row views (no copy); list items are converted one
    by one, so a list of float32 arrays is never copied.
    """
    if isinstance(updates, np.ndarray):
        arr = real_array(updates, name)
        if arr.ndim < 1:
            raise ValueError(f"{name} must have a leading client axis; got a 0-d array")
        arr = _as_f32(arr, name)
        shape = arr.shape[1:]
        return list(arr.reshape(arr.shape[0], int(np.prod(shape, dtype=np.int64)))), shape
    if isinstance(updates, (str, bytes)) or not isinstance(updates, Sequence):
        raise TypeError(
            f"{name} must be an array of shape (n_clients, ...) or a list of arrays; got {type(updates).__name__}"
        )
    if len(updates) == 0:
        raise ValueError(f"{name} is an empty list: pass an array of shape (0, ...) to give the shape")
    arrays = [real_array(u, f"{name}[{i}]") for i, u in enumerate(updates)]
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise ValueError(
                f"{name} must all have the same shape; {name}[0] has shape {shape} but {name}[{i}] has shape {a.shape}"
            )
    return [_as_f32(a, f"{name}[{i}]").reshape(-1) for i, a in enumerate(arrays)], shape


def _weights(weights, n: int, *, dp: bool = False) -> np.ndarray:
    """Per-client weights as float64: finite, >= 0 (<= 1 for DP), positive sum (not for DP)."""
    if weights is None:
        return np.ones(n, dtype=np.float64)
    w = real_array(weights, "weights")
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"weights must have shape ({n},), one per client; got {w.shape}")
    w = np.ascontiguousarray(w, dtype=np.float64)
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite")
    if (w < 0).any():
        raise ValueError(f"weights must be >= 0; got minimum {w.min()}")
    if dp:
        if (w > 1).any():
            raise ValueError(
                "weights must lie in [0, 1] for DP, so that one client moves the sum by "
                f"at most clip (cap them, e.g. with capped_weights); got maximum {w.max()}"
            )
    else:
        with np.errstate(over="ignore"):  # an overflowing sum is an error below, not a warning
            total = w.sum()
        if not np.isfinite(total):
            raise ValueError("weights must have a finite sum")
        if not total > 0:
            raise ValueError("weights must have a positive sum")
    return w


def _weight(weight, *, dp: bool = False) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"weight must be a real number; got {weight!r}")
    w = float(weight)
    if not np.isfinite(w) or w < 0:
        raise ValueError(f"weight must be finite and >= 0; got {weight}")
    if dp and w > 1:
        raise ValueError(f"weight must lie in [0, 1] for DP; got {weight}")
    return w


def _num_rows(num_rows) -> int:
    check_int(num_rows, "num_rows", minimum=0)
    if num_rows > _MAX_ROWS:
        raise ValueError(f"num_rows must be < 2**31; got {num_rows}")
    return int(num_rows)


def _rows(rows, num_rows: int) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.ndim != 1:
        raise ValueError(f"rows must be 1-D; got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"rows must hold integers; got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_rows):
        raise ValueError(f"rows must lie in [0, {num_rows}); got values in [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _row_values(values, num_entries: int, row_shape: tuple[int, ...] | None, name: str = "values"):
    """Values of sparse rows -> ((num_entries, dim) float32, row shape)."""
    arr = real_array(values, name)
    if arr.ndim < 1 or arr.shape[0] != num_entries:
        raise ValueError(f"{name} must have one row per entry of rows ({num_entries}); got shape {arr.shape}")
    if row_shape is not None and arr.shape[1:] != row_shape:
        raise ValueError(f"{name} must have shape (len(rows),) + {row_shape}; got {arr.shape}")
    shape = arr.shape[1:]
    return _as_f32(arr, name).reshape(num_entries, int(np.prod(shape, dtype=np.int64))), shape


def _offsets(offsets, num_entries: int) -> np.ndarray:
    arr = np.asarray(offsets)
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D with n_clients + 1 entries; got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"offsets must hold integers; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr[0] != 0 or arr[-1] != num_entries:
        raise ValueError(f"offsets must run from 0 to len(rows) = {num_entries}; got {arr[0]} .. {arr[-1]}")
    if (np.diff(arr) < 0).any():
        raise ValueError("offsets must be non-decreasing")
    return arr


def _sparse_batch(rows, values, offsets, num_rows):
    num_rows = _num_rows(num_rows)
    rows = _rows(rows, num_rows)
    values, row_shape = _row_values(values, rows.shape[0], None)
    offsets = _offsets(offsets, rows.shape[0])
    return rows, values, offsets, num_rows, row_shape


def _output(out, shape: tuple[int, ...], dtype, inputs=()) -> tuple[bool, np.ndarray | None]:
    """(float64 result?, out). ``out`` must be an ndarray of exactly ``shape``, float32 or float64,
    C-contiguous, writeable and disjoint from the inputs; ``dtype`` (if given) must agree."""
    if out is None:
        return _float64(np.float32 if dtype is None else dtype), None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray; got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}; got {out.shape}")
    if out.dtype not in (np.float32, np.float64):
        raise ValueError(f"out must be float32 or float64; got {out.dtype}")
    if dtype is not None and _float64(dtype) != (out.dtype == np.float64):
        raise ValueError(f"out has dtype {out.dtype} but dtype={np.dtype(dtype)} was asked for")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    if any(np.may_share_memory(out, a) for a in inputs):
        raise ValueError("out must not overlap the inputs")
    return out.dtype == np.float64, out


def _float64(dtype) -> bool:
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype must be float32 or float64; got {dtype!r}") from err
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dt}")
    return dt == np.float64


def _table_shape(shape) -> tuple[tuple[int, ...], int, int]:
    """Result shape -> (shape, num_rows, dim): rows index the first axis, dim the rest."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    try:
        shape = tuple(shape)
    except TypeError as err:
        raise TypeError(f"shape must be an int or a tuple of ints; got {shape!r}") from err
    for s in shape:
        check_int(s, "shape", minimum=0)
    shape = tuple(int(s) for s in shape)
    if not shape:
        return shape, 1, 1
    if shape[0] > _MAX_ROWS:
        raise ValueError(f"shape[0] (the rows) must be < 2**31; got shape {shape}")
    dim = 1
    for s in shape[1:]:
        dim *= s
    if shape[0] * dim > _MAX_ELEMENTS:
        raise ValueError(f"shape {shape} is too large: at most 2**59 elements")
    return shape, shape[0], dim


# --------------------------------------------------------------------------------------------
# Public API


def weighted_mean(updates, weights=None, *, dtype=None, out=None, num_threads: int = 0) -> np.ndarray:
    """Weighted mean of dense client updates, ``Σ_i w_i x_i / Σ_i w_i``, summed in float64.

    Parameters
    ----------
    updates : array_like, shape (n_clients, ...), or sequence of n_clients array_like
        One update per client (any real dtype; converted once to float32). A list of float32
        C-contiguous arrays is used in place, without stacking.
    weights : array_like, shape (n_clients,), optional
        Finite, ``>= 0``, with a positive sum (default: all 1, i.e. the plain mean).
    dtype : {numpy.float32, numpy.float64}, optional
        Of the result (the sums are float64 either way); default float32, or that of ``out``.
    out : ndarray, optional
        Where to write the result: exact shape, float32 or float64, C-contiguous, writeable,
        not overlapping ``updates``. Reusing a buffer saves the page faults of a new one.
    num_threads : int
        0 uses all cores. The result does not depend on it.

    Returns
    -------
    ndarray, shape updates.shape[1:] (or the arrays' shape)
        ``out`` when given.

    Raises
    ------
    ValueError
        Bad weights, mismatched shapes, or a NaN/infinite value in ``updates``.
    TypeError
        Non-numeric input.
    """
    arrays, shape = _dense_updates(updates)
    w = _weights(weights, len(arrays))
    float64, out = _output(out, shape, dtype, arrays)
    check_threads(num_threads)
    result, _ = _core.weighted_mean_dense(arrays, int(np.prod(shape, dtype=np.int64)), w, float64, num_threads, out=out)
    return result.reshape(shape) if out is None else out


def weighted_mean_sparse(
    rows, values, offsets, weights=None, *, num_rows: int, dtype=None, out=None, num_threads: int = 0
) -> np.ndarray:
    """Weighted mean of sparse-row client updates into a ``(num_rows, ...)`` table.

    Client ``i`` sent the rows ``rows[offsets[i]:offsets[i+1]]`` with values
    ``values[offsets[i]:offsets[i+1]]``. Row ``r`` of the result is
    ``Σ_i w_i (sum of client i's values for row r) / Σ_i w_i`` over all clients (a client that
    did not send ``r`` counts as 0 there), and 0 for a row nobody sent.

    Parameters
    ----------
    rows : array_like of int, shape (n_entries,)
        Row ids in ``[0, num_rows)``, all clients concatenated.
    values : array_like, shape (n_entries, ...)
        One row of values per entry (float32 after conversion), e.g. ``(n_entries, K)``.
    offsets : array_like of int, shape (n_clients + 1,)
        Non-decreasing, from 0 to ``n_entries``.
    weights : array_like, shape (n_clients,), optional
        As in :func:`weighted_mean` (default: all 1).
    num_rows : int
        Rows of the table (``< 2**31``).
    dtype : {numpy.float32, numpy.float64}, optional
        Default float32, or that of ``out``.
    out : ndarray, optional
        As in :func:`weighted_mean`; every element is written.
    num_threads : int
        0 uses all cores; the result does not depend on it.

    Returns
    -------
    ndarray, shape (num_rows,) + values.shape[1:]
        ``out`` when given.

    Raises
    ------
    ValueError
        Row ids out of range (``rows``), bad ``offsets`` or ``weights``, shape mismatch, or a
        NaN/infinite value in ``values``.
    TypeError
        Non-integer ids or offsets, non-numeric values.
    """
    rows, values, offsets, num_rows, row_shape = _sparse_batch(rows, values, offsets, num_rows)
    w = _weights(weights, offsets.shape[0] - 1)
    float64, out = _output(out, (num_rows,) + row_shape, dtype, (values,))
    check_threads(num_threads)
    result, _ = _core.weighted_mean_sparse(offsets, rows, values, w, num_rows, float64, num_threads, out=out)
    return result.reshape((num_rows,) + row_shape) if out is None else out


class WeightedMean:
    """Streaming weighted mean: add client updates one at a time, read the mean at the end.

    Holds the float64 sum ``Σ w_i x_i`` and the total weight ``Σ w_i`` in native memory. The
    result is bit-identical to :func:`weighted_mean` / :func:`weighted_mean_sparse` for the
    same updates in the same order, whatever ``num_threads``. Dense and sparse updates can be
    mixed. Rows are the first axis of ``shape``; a sparse update sends some of them.

    Parameters
    ----------
    shape : int or tuple of int
        Shape of every update and of the result, e.g. ``(num_items, K)``.
    num_threads : int
        Threads of each native call (0: all cores).

    Examples
    --------
    >>> acc = WeightedMean((1000, 8))
    >>> acc.add_sparse([3, 7], np.ones((2, 8)), weight=2.0)
    >>> acc.add(np.zeros((1000, 8)), weight=2.0)
    >>> float(acc.result()[3, 0])
    0.5
    """

    def __init__(self, shape, *, num_threads: int = 0):
        self._shape, num_rows, dim = _table_shape(shape)
        check_threads(num_threads)
        self._num_threads = num_threads
        self._acc = _core.WeightedSum(num_rows, dim)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the updates and of the result."""
        return self._shape

    @property
    def num_updates(self) -> int:
        """Updates added so far (including those of weight 0)."""
        return self._acc.num_updates

    @property
    def total_weight(self) -> float:
        """``Σ w_i`` of the updates added so far (float64, summed in order)."""
        return self._acc.total_weight

    @property
    def rows_held(self) -> int:
        """Rows the accumulator stores a sum for (all rows once a dense update was added)."""
        return self._acc.rows_held

    def add(self, update, weight: float = 1.0) -> None:
        """Add a dense update: ``sum += weight * update``, ``total_weight += weight``.

        Parameters
        ----------
        update : array_like, shape ``self.shape``
        weight : float
            Finite and ``>= 0``.

        Raises
        ------
        ValueError
            Wrong shape, bad weight, or a NaN/infinite value (the accumulator is unchanged).
        """
        x = real_array(update, "update")
        if x.shape != self._shape:
            raise ValueError(f"update must have shape {self._shape}; got {x.shape}")
        w = _weight(weight)
        self._acc.add_dense(_as_f32(x, "update"), w, w, self._num_threads)

    def add_sparse(self, rows, values, weight: float = 1.0) -> None:
        """Add a sparse-row update: ``sum[rows[e]] += weight * values[e]`` for every entry.

        Parameters
        ----------
        rows : array_like of int, shape (n,)
            Row ids in ``[0, shape[0])`` (a repeated id adds twice).
        values : array_like, shape (n,) + shape[1:]
        weight : float
            Finite and ``>= 0``.

        Raises
        ------
        ValueError
            Row ids out of range (``rows``), wrong shape, bad weight, or a NaN/infinite value;
            the accumulator is then unchanged.
        """
        if not self._shape:
            raise ValueError("add_sparse needs a shape with a row axis; this accumulator is 0-d")
        rows = _rows(rows, self._shape[0])
        values, _ = _row_values(values, rows.shape[0], self._shape[1:])
        w = _weight(weight)
        self._acc.add_sparse(rows, values, w, w)

    def result(self, dtype=None, *, out=None) -> np.ndarray:
        """The weighted mean ``Σ w_i x_i / Σ w_i`` (0 on rows no update touched).

        Parameters
        ----------
        dtype : {numpy.float32, numpy.float64}, optional
            Default float32, or that of ``out``.
        out : ndarray, optional
            Where to write it (as in :func:`weighted_mean`).

        Raises
        ------
        ValueError
            No update with a positive weight yet (names ``weights``).
        """
        float64, out = _output(out, self._shape, dtype)
        result = self._acc.mean(float64, self._num_threads, out=out)
        return result.reshape(self._shape) if out is None else out

    def weighted_sum(self, dtype=np.float64) -> np.ndarray:
        """The weighted sum ``Σ w_i x_i`` (float64 by default, exactly as accumulated)."""
        return self._acc.sum(_float64(dtype), self._num_threads).reshape(self._shape)

    def reset(self) -> None:
        """Forget every update (the shape stays)."""
        self._acc.reset()

    def __repr__(self) -> str:
        return f"WeightedMean(shape={self._shape}, num_updates={self.num_updates}, total_weight={self.total_weight})"


# --------------------------------------------------------------------------------------------
# Differentially private sums (DP-FedAvg's Gaussian mechanism; the policy is fedrecon_fast.privacy)


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
        return {
            "dp_clip": self.clip,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_noise_std": self.noise_std,
            "dp_num_clipped": self.num_clipped,
            "dp_clipped_fraction": self.clipped_fraction,
            "dp_denominator": self.denominator,
        }


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
        raise ValueError(
            f"the aggregate overflows {value.dtype} when divided by expected_weight="
            f"{denominator!r}: pass a larger expected_weight (or dtype=numpy.float64)"
        )
    return DPResult(
        value=value,
        norms=norms,
        num_updates=int(summary["num_updates"]),
        num_clipped=int(summary["num_clipped"]),
        clip=summary["clip"],
        noise_multiplier=summary["noise_multiplier"],
        noise_std=summary["noise_std"],
        total_weight=summary["total_weight"],
        denominator=denominator,
    )


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
    x = _as_f32(real_array(update, "update"), "update")
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


def dp_sum(
    updates,
    weights=None,
    *,
    clip: float,
    noise_multiplier: float,
    seed: int,
    round: int = 0,
    expected_weight: float | None = None,
    dtype=None,
    out=None,
    num_threads: int = 0,
) -> DPResult:
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
    value, norms, summary = _core.dp_sum_dense(
        arrays, int(np.prod(shape, dtype=np.int64)), w, clip, z, seed, round, denominator, float64, num_threads, out=out
    )
    return _result(value.reshape(shape) if out is None else out, norms, summary, denominator)


def dp_sum_sparse(
    rows,
    values,
    offsets,
    weights=None,
    *,
    num_rows: int,
    clip: float,
    noise_multiplier: float,
    seed: int,
    round: int = 0,
    expected_weight: float | None = None,
    dtype=None,
    out=None,
    num_threads: int = 0,
) -> DPResult:
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
    value, norms, summary = _core.dp_sum_sparse(
        offsets, rows, values, w, num_rows, clip, z, seed, round, denominator, float64, num_threads, out=out
    )
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

    def __init__(
        self,
        shape,
        *,
        clip: float,
        noise_multiplier: float,
        seed: int,
        round: int = 0,
        expected_weight: float | None = None,
        num_threads: int = 0,
    ):
        self._shape, num_rows, dim = _table_shape(shape)
        clip, z, seed, round, self._denominator = _dp_params(clip, noise_multiplier, seed, round, expected_weight)
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
        x = real_array(update, "update")
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
        return _result(
            value.reshape(self._shape) if out is None else out, self.norms, self._acc.summary(), self._denominator
        )

    def reset(self) -> None:
        """Forget every update (same noise key: use a new object for a new round)."""
        self._acc.reset()
        self._norms.clear()

    def __repr__(self) -> str:
        s = self._acc.summary()
        return (
            f"DPGaussianSum(shape={self._shape}, clip={s['clip']}, noise_multiplier={s['noise_multiplier']}, "
            f"num_updates={s['num_updates']}, num_clipped={s['num_clipped']})"
        )
