"""Compression of model updates: stochastic quantization and a versioned wire format.

Any float array (any model, any framework) can be quantized to ``bits`` bits per value
(1..16) with unbiased stochastic rounding, optionally after a randomized Hadamard rotation, and
sent as real bytes:

>>> buf = encode(delta, 8, seed=round_seed)          # doctest: +SKIP
>>> decode(buf)                                       # doctest: +SKIP

Scheme
------
The array is viewed as ``rows x cols`` (the last axis is ``cols``; a 1-D array is one row).

* ``hadamard=True`` pads every row with zeros to the next power of two, multiplies it by random
  signs and applies the orthonormal fast Walsh-Hadamard transform (decoding inverts it and drops
  the padding). The rotation spreads outliers over the row, so the same bits give a lower error
  on heavy-tailed values.
* ``scaling="tensor"`` uses one scale for the whole (rotated) array, ``scaling="row"`` one per
  row: ``lo = min``, ``hi = max``, ``L = 2**bits - 1`` levels and ``step = (hi - lo) / L``
  (rounded up in float32). A value becomes ``index = min(floor((x - lo) / step + u), L)`` with
  ``u ~ U[0, 1)``, and decodes to ``lo + index * step``: ``E[decoded] = x`` and
  ``|decoded - x| <= step``. A constant group (``hi == lo``) is exact.
* The randomness is counter-based: one key ``derive_seed(seed, round, client, STREAM_QUANT)``,
  then one stream per row, so results never depend on ``num_threads``.

Wire format (version :data:`FORMAT_VERSION`, little-endian)
-----------------------------------------------------------
========  ======  ==============================================================
offset    bytes   field
========  ======  ==============================================================
0         4       magic ``b"FRQW"``
4         2       format version (u16)
6         1       dtype of the decoded values (1 = float32)
7         1       bits per value (1..16)
8         1       flags: 1 row scaling, 2 Hadamard rotation, 4 sparse rows
9         1       ndim (0..8; sparse: 2)
10        2       reserved (0)
12        8       key (u64): seeds the rounding noise and the Hadamard signs
20        8*ndim  shape (u64 each); sparse: ``(rows sent, cols)``
(sparse)  8       ``num_rows`` (u64): rows of the table the row ids index
(sparse)  4*n     row ids (u32)
.         8*G     scales: ``G`` pairs ``(lo, step)`` as float32; ``G`` is 0 without values,
                  the number of rows with row scaling, else 1
.         P       indices, ``bits`` each, densely packed least-significant bit first;
                  ``P = ceil(rows * padded_cols * bits / 8)``
end-4     4       CRC-32 (zlib's ``crc32``) of all preceding bytes
========  ======  ==============================================================

:func:`decode` checks every field, the exact length and the CRC, and raises ``ValueError``
saying what is wrong for truncated or corrupted buffers.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

import numpy as np

from .._rng import STREAM_QUANT
from .._validation import (
    check_bits,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_threads,
    real_array,
    to_float32,
)
from . import core as _core

__all__ = [
    "FORMAT_VERSION",
    "quantize",
    "quantize_accumulate",
    "encode",
    "decode",
    "encode_sparse",
    "decode_sparse",
    "encoded_size",
    "buffer_info",
    "decode_accumulate",
    "decode_accumulate_batch",
]

#: Version of the wire format written by :func:`encode` (the only version :func:`decode` reads).
FORMAT_VERSION: int = int(_core.WIRE_FORMAT_VERSION)

_UINT64 = 2**64
_MAX_NDIM = 8
_MAX_SPARSE_ROWS = 2**31
_SCALINGS = ("tensor", "row")


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _as_float32(x, name: str, *, ndim: int | None = None) -> np.ndarray:
    """Convert a real array-like to a C-contiguous float32 array (one copy at most)."""
    arr = real_array(x, name)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {arr.shape}")
    if arr.ndim > _MAX_NDIM:
        raise ValueError(f"{name} must have at most {_MAX_NDIM} dimensions; got shape {arr.shape}")
    return to_float32(arr, name)


def _check_scaling(scaling) -> bool:
    check_choice(scaling, "scaling", _SCALINGS)
    return scaling == "row"


def _check_threads(num_threads) -> int:
    return check_threads(num_threads)


def _key(seed, round, client) -> int:  # noqa: A002
    for value, name in ((seed, "seed"), (round, "round"), (client, "client")):
        check_int(value, name, minimum=0)
    return _core.derive_seed(int(seed) % _UINT64, int(round) % _UINT64, int(client) % _UINT64, STREAM_QUANT)


def _scheme(bits, scaling, hadamard, seed, round, client, num_threads):  # noqa: A002
    return (
        check_bits(bits),
        _check_scaling(scaling),
        check_bool(hadamard, "hadamard"),
        _key(seed, round, client),
        _check_threads(num_threads),
    )


def _as_buffer(buf, name: str = "buf") -> np.ndarray:
    """A zero-copy uint8 view of a bytes-like object."""
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise TypeError(
                f"{name} must be bytes-like or a 1-D uint8 array; got {buf.dtype} array of shape {buf.shape}"
            )
        return np.ascontiguousarray(buf)
    try:
        view = memoryview(buf)
    except TypeError:
        raise TypeError(f"{name} must be a bytes-like object; got {type(buf).__name__}") from None
    if not view.c_contiguous:
        raise ValueError(f"{name} must be a contiguous buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return np.frombuffer(view, dtype=np.uint8)


def _named(name: str, fn, *args):
    """Call a native decoder; its ValueError (a bad buffer) names the argument ``name``."""
    try:
        return fn(*args)
    except ValueError as e:
        msg = str(e)
        if msg.startswith(name):
            raise
        raise ValueError(f"{name}: {msg}") from None


def _check_out(out, name: str = "out") -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float64; got {type(out).__name__}")
    if out.dtype != np.float64:
        raise ValueError(f"{name} must have dtype float64; got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    if out.ndim > _MAX_NDIM:
        raise ValueError(f"{name} must have at most {_MAX_NDIM} dimensions; got shape {out.shape}")
    return out


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def quantize(
    x,
    bits: int,
    *,
    scaling: str = "tensor",
    hadamard: bool = False,
    seed: int = 0,
    round: int = 0,
    client: int = 0,
    num_threads: int = 0,
) -> np.ndarray:  # noqa: A002
    """Quantize-dequantize round trip: what the receiver of ``encode(x, ...)`` decodes.

    Parameters
    ----------
    x : array_like of real numbers, any shape with at most 8 axes
        Values to quantize; converted once to float32. Must be finite.
    bits : int
        Bits per value, 1..16 (``2**bits - 1`` quantization steps per scale group).
    scaling : {"tensor", "row"}
        One ``(lo, step)`` scale for the whole array, or one per row (last axis).
    hadamard : bool
        Rotate every row with a seeded randomized Hadamard transform before quantizing.
    seed, round, client : int
        Identify the random stream (``derive_seed(seed, round, client, STREAM_QUANT)``).
    num_threads : int
        Worker threads; 0 uses all cores. The result does not depend on it.

    Returns
    -------
    numpy.ndarray of float32, shape of ``x``
        Equal to ``decode(encode(x, bits, ...))`` for the same arguments.

    Raises
    ------
    TypeError
        ``x`` is not real numeric, or an argument has the wrong type.
    ValueError
        ``x`` holds NaN/inf, ``bits`` is outside 1..16, or ``scaling`` is unknown.
    """
    arr = _as_float32(x, "x")
    bits, row, had, key, threads = _scheme(bits, scaling, hadamard, seed, round, client, num_threads)
    return _core.quantize(arr, bits, row, had, key, threads)


def quantize_accumulate(
    x,
    bits: int,
    weight: float,
    out: np.ndarray,
    *,
    scaling: str = "tensor",
    hadamard: bool = False,
    seed: int = 0,
    round: int = 0,
    client: int = 0,  # noqa: A002
    num_threads: int = 0,
) -> np.ndarray:
    """Add ``weight * quantize(x, bits, ...)`` to a float64 accumulator without materialising it.

    The fused quantize -> dequantize -> accumulate of simulations: the same values the server
    would add after :func:`encode` and :func:`decode_accumulate`, with no bytes in between.

    Parameters
    ----------
    x : array_like of real numbers, any shape with at most 8 axes
        Values to quantize; converted once to float32. Must be finite.
    bits : int
        Bits per value, 1..16.
    weight : float
        Finite multiplier.
    out : numpy.ndarray of float64, shape of ``x``, C-contiguous and writeable
        The accumulator, updated in place.
    scaling, hadamard, seed, round, client, num_threads
        As in :func:`quantize`.

    Returns
    -------
    numpy.ndarray
        ``out``.
    """
    arr = _as_float32(x, "x")
    check_float(weight, "weight")
    _check_out(out)
    if out.shape != arr.shape:
        raise ValueError(f"out must have the shape of x {arr.shape}; got {out.shape}")
    bits, row, had, key, threads = _scheme(bits, scaling, hadamard, seed, round, client, num_threads)
    _core.quantize_accumulate(arr, bits, row, had, key, float(weight), out, threads)
    return out


def encode(
    x,
    bits: int,
    *,
    scaling: str = "tensor",
    hadamard: bool = False,
    seed: int = 0,
    round: int = 0,
    client: int = 0,
    num_threads: int = 0,
) -> bytes:  # noqa: A002
    """Quantize ``x`` and serialize it in the wire format (see the module documentation).

    Parameters
    ----------
    x : array_like of real numbers, any shape with at most 8 axes
        Values to send; converted once to float32. Must be finite.
    bits : int
        Bits per value, 1..16. With 8 bits the payload is 1 byte per value (4x smaller than
        float32), plus ``32 + 8 * ndim`` bytes of header, scale and CRC, and 8 bytes per extra
        scale group (``scaling="row"``).
    scaling, hadamard, seed, round, client, num_threads
        As in :func:`quantize`.

    Returns
    -------
    bytes
        ``encoded_size(x.shape, bits, scaling=..., hadamard=...)`` bytes.
    """
    arr = _as_float32(x, "x")
    bits, row, had, key, threads = _scheme(bits, scaling, hadamard, seed, round, client, num_threads)
    return _core.encode(arr, bits, row, had, key, threads)


def decode(buf, *, num_threads: int = 0) -> np.ndarray:
    """Decode a buffer written by :func:`encode`.

    Parameters
    ----------
    buf : bytes-like (bytes, bytearray, memoryview) or 1-D uint8 array
        The encoded array.
    num_threads : int
        Worker threads; 0 uses all cores.

    Returns
    -------
    numpy.ndarray of float32
        The dequantized array, in the shape that was encoded.

    Raises
    ------
    ValueError
        The buffer is truncated or corrupted (bad magic, unsupported version, invalid header
        field, wrong length, CRC mismatch), or holds a sparse update (use :func:`decode_sparse`).
    """
    return _named("buf", _core.decode, _as_buffer(buf), _check_threads(num_threads))


def encode_sparse(
    rows,
    values,
    bits: int,
    *,
    num_rows: int | None = None,
    scaling: str = "tensor",
    hadamard: bool = False,
    seed: int = 0,
    round: int = 0,
    client: int = 0,  # noqa: A002
    num_threads: int = 0,
) -> bytes:
    """Encode a sparse row update: the ids of the rows sent and their quantized values.

    Parameters
    ----------
    rows : array_like of integers, shape (n,)
        Row ids in ``[0, num_rows)``, stored as u32. Repeated ids are allowed (their values add
        up in :func:`decode_accumulate`).
    values : array_like of real numbers, shape (n, cols)
        The rows' values; converted once to float32. Must be finite.
    bits : int
        Bits per value, 1..16.
    num_rows : int, optional
        Number of rows of the table the ids index (at most ``2**31``); recorded in the header and
        checked on decode. Default: ``max(rows) + 1`` (0 without rows).
    scaling, hadamard, seed, round, client, num_threads
        As in :func:`quantize` (``scaling="row"`` gives each sent row its own scale).

    Returns
    -------
    bytes
        ``encoded_size((num_rows, cols), bits, ..., sparse_rows=n)`` bytes.
    """
    vals = _as_float32(values, "values", ndim=2)
    ids = np.asarray(rows)
    if ids.ndim != 1:
        raise ValueError(f"rows must be 1-D; got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        raise TypeError(f"rows must hold integers; got dtype {ids.dtype}")
    if len(ids) != vals.shape[0]:
        raise ValueError(f"rows has {len(ids)} ids but values has {vals.shape[0]} rows")
    ids = ids.astype(np.int64, copy=False)
    if num_rows is None:
        num_rows = int(ids.max()) + 1 if ids.size else 0
    check_int(num_rows, "num_rows", minimum=0)
    if num_rows > _MAX_SPARSE_ROWS:
        raise ValueError(f"num_rows must be <= 2**31; got {num_rows}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_rows):
        raise ValueError(f"rows must lie in [0, {num_rows}); got values in [{ids.min()}, {ids.max()}]")
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    bits, row, had, key, threads = _scheme(bits, scaling, hadamard, seed, round, client, num_threads)
    return _core.encode_sparse(ids, vals, int(num_rows), bits, row, had, key, threads)


def decode_sparse(buf, *, num_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decode a buffer written by :func:`encode_sparse`.

    Parameters
    ----------
    buf : bytes-like or 1-D uint8 array
        The encoded sparse update.
    num_threads : int
        Worker threads; 0 uses all cores.

    Returns
    -------
    rows : numpy.ndarray of int32, shape (n,)
        The row ids, in the order they were encoded.
    values : numpy.ndarray of float32, shape (n, cols)
        The dequantized rows.

    Raises
    ------
    ValueError
        The buffer is truncated or corrupted, or holds a dense array (use :func:`decode`).
    """
    rows, values, _ = _named("buf", _core.decode_sparse, _as_buffer(buf), _check_threads(num_threads))
    return rows, values


def encoded_size(
    shape, bits: int, *, scaling: str = "tensor", hadamard: bool = False, sparse_rows: int | None = None
) -> int:
    """Exact length in bytes of an encoding, without encoding anything.

    Parameters
    ----------
    shape : int or sequence of int
        Dense: the shape of the array (at most 8 axes). Sparse: the table's shape
        ``(num_rows, cols)``.
    bits : int
        Bits per value, 1..16.
    scaling : {"tensor", "row"}
    hadamard : bool
    sparse_rows : int, optional
        Number of rows sent in a sparse update; None for a dense array.

    Returns
    -------
    int
        ``len(encode(x, bits, ...))`` for ``x`` of that shape (dense), or
        ``len(encode_sparse(rows, values, bits, ...))`` with ``len(rows) == sparse_rows``.
        The size does not depend on the values or the seed.
    """
    if isinstance(shape, numbers.Integral) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints; got {shape!r}") from None
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
            raise TypeError(f"shape must hold integers; got {dims!r}")
        if d < 0:
            raise ValueError(f"shape entries must be >= 0; got {dims!r}")
    if len(dims) > _MAX_NDIM:
        raise ValueError(f"shape must have at most {_MAX_NDIM} entries; got {dims!r}")
    check_bits(bits)
    row = _check_scaling(scaling)
    had = check_bool(hadamard, "hadamard")
    if sparse_rows is None:
        n = -1
    else:
        check_int(sparse_rows, "sparse_rows", minimum=0)
        if len(dims) != 2:
            raise ValueError(f"a sparse update needs shape (num_rows, cols); got {dims!r}")
        if dims[0] > _MAX_SPARSE_ROWS:  # as encode_sparse: row ids are u32 read back as int32
            raise ValueError(f"shape[0] (num_rows) of a sparse update must be <= 2**31; got {dims!r}")
        n = int(sparse_rows)
    return int(_core.encoded_size([int(d) for d in dims], int(bits), row, had, n))


def buffer_info(buf) -> dict:
    """Validate a buffer and describe it without decoding its values.

    Parameters
    ----------
    buf : bytes-like or 1-D uint8 array

    Returns
    -------
    dict
        ``version``, ``dtype``, ``bits``, ``scaling``, ``hadamard``, ``sparse``, ``shape`` (of
        the values: ``(n, cols)`` for a sparse update), ``num_rows`` (sparse; else None),
        ``key``, ``num_groups``, ``padded_cols``, ``payload_bytes`` and ``nbytes``.

    Raises
    ------
    ValueError
        The buffer is truncated or corrupted.
    """
    return dict(_named("buf", _core.buffer_info, _as_buffer(buf), 1))


def decode_accumulate(buf, weight: float, out: np.ndarray, *, num_threads: int = 0) -> np.ndarray:
    """Add ``weight * decode(buf)`` to a float64 accumulator, in place, without decoding to an array.

    Parameters
    ----------
    buf : bytes-like or 1-D uint8 array
        A dense buffer (:func:`encode`) or a sparse one (:func:`encode_sparse`).
    weight : float
        Finite multiplier.
    out : numpy.ndarray of float64, C-contiguous and writeable
        Dense: the shape of the encoded array. Sparse: ``(rows, cols)`` with every row id of the
        buffer below ``rows``; row ``i`` of the update is added to ``out[rows[i]]``.
    num_threads : int
        Worker threads; 0 uses all cores. The result does not depend on it.

    Returns
    -------
    numpy.ndarray
        ``out``.

    Raises
    ------
    ValueError
        Corrupted buffer, non-finite weight, or ``out`` of the wrong dtype, layout or shape.
    IndexError
        A row id of a sparse buffer is outside ``out``.
    """
    check_float(weight, "weight")
    return _accumulate([_as_buffer(buf)], [weight], out, num_threads, "buf")


def decode_accumulate_batch(bufs: Sequence, weights, out: np.ndarray, *, num_threads: int = 0) -> np.ndarray:
    """Add ``sum_k weights[k] * decode(bufs[k])`` to a float64 accumulator in one parallel call.

    Every element adds the buffers in the order given, so the result is identical for any
    ``num_threads`` and equal to calling :func:`decode_accumulate` once per buffer.

    Parameters
    ----------
    bufs : sequence of bytes-like
        All dense with the shape of ``out``, or all sparse with ``out.shape[1]`` columns.
    weights : array_like of float, shape (len(bufs),)
        Finite weights, one per buffer.
    out : numpy.ndarray of float64, C-contiguous and writeable
        The accumulator (see :func:`decode_accumulate`).
    num_threads : int
        Worker threads; 0 uses all cores.

    Returns
    -------
    numpy.ndarray
        ``out``.
    """
    if isinstance(bufs, (bytes, bytearray, memoryview, np.ndarray)):
        raise TypeError("bufs must be a sequence of buffers; use decode_accumulate for one buffer")
    arrays = [_as_buffer(b, f"bufs[{k}]") for k, b in enumerate(bufs)]
    return _accumulate(arrays, weights, out, num_threads, "bufs[0]")


def _accumulate(arrays: list, weights, out, num_threads, single_name: str) -> np.ndarray:
    """decode_accumulate(_batch) after the buffers were viewed as uint8 arrays."""
    w = np.asarray(weights)
    if w.dtype == object or w.dtype.kind not in "fiu":
        raise TypeError(f"weights must be real numbers; got dtype {w.dtype}")
    if w.ndim == 0 and len(arrays) == 1:
        w = w.reshape(1)
    if w.shape != (len(arrays),):
        raise ValueError(f"weights must have shape ({len(arrays)},), one per buffer; got {w.shape}")
    w = np.ascontiguousarray(w, dtype=np.float64)
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite")
    _check_out(out)
    threads = _check_threads(num_threads)
    try:
        _core.decode_accumulate(arrays, w, out, threads)
    except ValueError as e:  # a bad buffer, or buffers that do not fit out: name the buffer
        msg = str(e)
        if len(arrays) == 1:
            msg = f"{single_name}: {msg}"
        else:
            msg = re.sub(r"^buffer (\d+)", r"bufs[\1]", msg)
            msg = msg if msg.startswith("bufs") else f"bufs: {msg}"
        raise ValueError(msg) from None
    return out
