"""Argument checks shared by the public API: clear errors that name the argument."""

from __future__ import annotations

import math
import numbers

import numpy as np

#: Largest finite float32: a Python float passed to a native float32 parameter must not exceed it.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def to_float32(arr: np.ndarray, name: str) -> np.ndarray:
    """A real numeric ndarray as C-contiguous float32 (no copy when it already is one; 0-d stays
    0-d). Finite values beyond the float32 range raise ValueError naming ``name`` instead of
    silently becoming infinities (with a RuntimeWarning)."""
    if arr.dtype == np.float32:
        return np.asarray(arr, order="C")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(arr, dtype=np.float32, order="C")
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4 and out.size:
        overflow = np.isinf(out)
        if overflow.any() and np.isfinite(np.asarray(arr)[overflow]).any():
            raise ValueError(f"{name} has values beyond the float32 range (|x| > 3.4e38)")
    return out


def _as_float32(x, name: str, ndim: int, check_finite: bool) -> np.ndarray:
    """Convert a real array-like of `ndim` dimensions to C-contiguous float32 (one copy at most)."""
    arr = np.asarray(x)
    if arr.dtype == object or arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array; got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {arr.shape}")
    arr = to_float32(arr, name)
    if check_finite and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def as_float32_matrix(x, name: str, *, cols: int | None = None, check_finite: bool = True) -> np.ndarray:
    """A real 2-D array-like as C-contiguous float32, optionally with `cols` columns."""
    arr = _as_float32(x, name, 2, check_finite)
    if cols is not None and arr.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns; got shape {arr.shape}")
    return arr


def as_float32_vector(x, name: str, *, size: int | None = None, check_finite: bool = True) -> np.ndarray:
    """A real 1-D array-like as C-contiguous float32, optionally of length `size`."""
    arr = _as_float32(x, name, 1, check_finite)
    if size is not None and arr.shape[0] != size:
        raise ValueError(f"{name} must have length {size}; got {arr.shape[0]}")
    return arr


def writable_float32(x, name: str, ndim: int, *, error: type = ValueError) -> np.ndarray:
    """``x`` itself if it is a writeable C-contiguous ``ndim``-D float32 ndarray, for arrays a
    kernel updates in place (a converted copy would silently lose the update); else ``error``."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != ndim \
            or not x.flags.c_contiguous or not x.flags.writeable:
        got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}".rstrip()
        raise error(f"{name} must be a writeable C-contiguous {ndim}-D float32 ndarray "
                    f"(updated in place); got {got}")
    return x


def as_index_array(x, name: str, *, upper: int) -> np.ndarray:
    """Convert integer ids to a C-contiguous int64 array and check 0 <= id < upper."""
    arr = np.asarray(x)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= upper):
        raise ValueError(f"{name} must lie in [0, {upper}); got values in [{arr.min()}, {arr.max()}]")
    return arr


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {value}")


#: Largest ``num_threads`` accepted (the native int). More threads than 4 per core are never
#: started: the native pool caps a call at 4 x the hardware threads (results do not depend on it).
MAX_NUM_THREADS = 2**31 - 1


def check_threads(value, name: str = "num_threads") -> None:
    """``value`` is a thread count: an integer in [0, MAX_NUM_THREADS] (0: all cores)."""
    check_int(value, name, minimum=0, maximum=MAX_NUM_THREADS)


def check_float(value, name: str, *, minimum: float | None = None, maximum: float | None = None,
                strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be finite; got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}; got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {value}")


def check_choice(value, name: str, choices) -> None:
    try:
        known = value in choices
    except TypeError:  # unhashable, e.g. a list
        raise TypeError(f"{name} must be one of {sorted(choices)}; got {value!r}") from None
    if not known:
        raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}")
