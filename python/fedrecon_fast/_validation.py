"""Argument checks shared by the whole package: clear errors that name the argument.

One rule for the exception type, everywhere:

* ``TypeError``: the argument is not the kind of thing asked for (a float where an integer is
  needed, a string where a number is, a non-numeric array, a bool where a number is, a
  number where a bool is, an object of the wrong class);
* ``ValueError``: it is the right kind but an unusable value (out of range, wrong shape or
  length, NaN or infinite, inconsistent with another argument).

Each layer validates what it receives once, with these helpers; what it passes further down is
already checked.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

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


def real_array(x, name: str) -> np.ndarray:
    """``x`` as an ndarray of a real numeric dtype (integers or floats; no copy when it is one)."""
    arr = np.asarray(x)
    if arr.dtype == object or arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array; got dtype {arr.dtype}")
    return arr


def _as_float32(x, name: str, ndim: int, check_finite: bool) -> np.ndarray:
    """Convert a real array-like of `ndim` dimensions to C-contiguous float32 (one copy at most)."""
    arr = real_array(x, name)
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
    if (
        not isinstance(x, np.ndarray)
        or x.dtype != np.float32
        or x.ndim != ndim
        or not x.flags.c_contiguous
        or not x.flags.writeable
    ):
        got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}".rstrip()
        raise error(f"{name} must be a writeable C-contiguous {ndim}-D float32 ndarray (updated in place); got {got}")
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


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False):
    """``value`` as a Python int (None passes with ``allow_none``): an integer (NumPy's too, not
    a bool) in ``[minimum, maximum]``."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {value}")
    return number


def check_bool(value, name: str) -> bool:
    """``value`` as a Python bool: ``True``/``False`` (or NumPy's), nothing else."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {value!r}")
    return bool(value)


def check_bits(value, name: str = "bits", *, allow_none: bool = False, allow_zero: bool = False):
    """Bits per quantized value: an integer in 1..16 (0 means float32 with ``allow_zero``)."""
    if value is None and allow_none:
        return None
    check_int(value, name)
    if not (1 <= value <= 16 or (allow_zero and value == 0)):
        raise ValueError(f"{name} must be in {'0..16 (0: float32)' if allow_zero else '1..16'}; got {value}")
    return int(value)


def check_fractions(value, name: str) -> tuple[float, float, float]:
    """Train/validation/test fractions: three finite numbers >= 0 summing to 1 (within 1e-6)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of three numbers (train, val, test); got {value!r}")
    try:
        fractions = tuple(float(f) for f in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of three numbers (train, val, test); got {value!r}") from None
    if len(fractions) != 3:
        raise ValueError(f"{name} must have three entries (train, val, test); got {len(fractions)}")
    if not all(math.isfinite(f) and f >= 0.0 for f in fractions):
        raise ValueError(f"{name} must be finite and non-negative; got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1; got {fractions} (sum {sum(fractions)})")
    return fractions


#: Largest ``num_threads`` accepted (the native int). More threads than 4 per core are never
#: started: the native pool caps a call at 4 x the hardware threads (results do not depend on it).
MAX_NUM_THREADS = 2**31 - 1


def check_threads(value, name: str = "num_threads") -> int:
    """``value`` is a thread count: an integer in [0, MAX_NUM_THREADS] (0: all cores)."""
    return check_int(value, name, minimum=0, maximum=MAX_NUM_THREADS)


def check_float(
    value, name: str, *, minimum: float | None = None, maximum: float | None = None, strict: bool = False
) -> float:
    """``value`` as a Python float: a finite real number (not a bool) in ``[minimum, maximum]``
    (``(minimum, maximum]`` when ``strict``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be finite; got {value}")
    number = float(value)
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}; got {value}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {value}")
    return number


def check_choice(value, name: str, choices) -> None:
    """``value`` is one of ``choices`` (a string where one is expected)."""
    if not isinstance(value, str) and all(isinstance(c, str) for c in choices):
        raise TypeError(f"{name} must be one of {sorted(choices)}; got {value!r}")
    try:
        known = value in choices
    except TypeError:  # unhashable, e.g. a list
        raise TypeError(f"{name} must be one of {sorted(choices)}; got {value!r}") from None
    if not known:
        raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}")
