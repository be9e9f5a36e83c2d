"""Pure-NumPy reference of the native compression kernels (the test oracle).

It restates ``cpp/src/quantize.cpp`` and ``cpp/src/wire.cpp`` for readability, not speed (a
Python loop over rows): the same counter-based random streams, the same float32/float64
arithmetic and the same byte layout, so that its buffers can be compared with the native ones
byte for byte.

The array is viewed as ``rows x cols`` (last axis = cols; a 0-d array is one value).

Random numbers (``key = derive_seed(seed, round, client, STREAM_QUANT)``): output ``k`` of the
stream with seed ``s`` is ``mix64(s + k * GAMMA)`` (the native ``Rng(s)``).

- Rounding noise of value ``j`` of row ``r``: ``z`` = output ``j // 2`` of the stream
  ``derive_seed(key, 0, r, 0)``; ``u = (z >> 40) * 2**-24`` for even ``j``,
  ``((z >> 16) & 0xFFFFFF) * 2**-24`` for odd ``j``.
- Hadamard sign of value ``j`` of row ``r``: bit ``j % 64`` of output ``j // 64`` of the stream
  ``derive_seed(key, 0, r, 1)``; a set bit means -1.

Quantization of a group with ``lo = min``, ``hi = max``: ``L = 2**bits - 1``;
``step = float32((hi - lo) / L)`` in double, raised to the next float32 while
``step * L < hi - lo``; ``index = min(floor((x - lo) / step + u), L)`` in double;
``decoded = float32(lo + index * step)`` in double. A group with ``hi == lo`` has step 0 and
index 0.

Hadamard rotation of a row padded with zeros to ``P = next power of two``: multiply by the
signs, apply the unnormalized fast Walsh-Hadamard transform stage by stage (``h = 1, 2, 4 ...``:
``(a, b) <- (a + b, a - b)`` in float32), multiply by ``float32(1 / sqrt(P))``. The inverse
transforms first and applies the signs last.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from reference import derive_seed

MASK64 = 2**64 - 1
GAMMA = 0x9E3779B97F4A7C15
STREAM_QUANT = 2
MAGIC = b"FRQW"
VERSION = 1
DTYPE_FLOAT32 = 1
FLAG_ROW, FLAG_HADAMARD, FLAG_SPARSE = 1, 2, 4

F32 = np.float32
F64 = np.float64
U64 = np.uint64


# --------------------------------------------------------------------------------------------
# random streams
# --------------------------------------------------------------------------------------------


def quant_key(seed: int, round: int = 0, client: int = 0) -> int:  # noqa: A002
    """The key stored in the header."""
    return derive_seed(seed, round, client, STREAM_QUANT)


def _mix64_array(z: np.ndarray) -> np.ndarray:
    """SplitMix64 output for each state of a uint64 array (array arithmetic wraps silently)."""
    z = z + U64(GAMMA)
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


def stream_outputs(seed: int, ks: np.ndarray) -> np.ndarray:
    """Outputs number ``ks`` (a uint64 array) of the stream with this seed."""
    base = np.full(ks.shape, seed & MASK64, dtype=U64)
    return _mix64_array(base + ks.astype(U64) * U64(GAMMA))


def noise(key: int, row: int, n: int) -> np.ndarray:
    """The ``n`` uniforms (float64, multiples of 2**-24) of a row's rounding noise."""
    j = np.arange(n, dtype=U64)
    z = stream_outputs(derive_seed(key, 0, row, 0), j >> U64(1))
    bits = np.where(j % U64(2) == 0, z >> U64(40), (z >> U64(16)) & U64(0xFFFFFF))
    return bits.astype(F64) * 2.0**-24


def signs(key: int, row: int, n: int) -> np.ndarray:
    """The ``n`` Hadamard signs (float32 +-1) of a row."""
    j = np.arange(n, dtype=U64)
    z = stream_outputs(derive_seed(key, 0, row, 1), j >> U64(6))
    bit = (z >> (j & U64(63))) & U64(1)
    return np.where(bit == 1, F32(-1), F32(1))


# --------------------------------------------------------------------------------------------
# Hadamard rotation
# --------------------------------------------------------------------------------------------


def next_pow2(n: int) -> int:
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalized fast Walsh-Hadamard transform of a float32 vector (length a power of two)."""
    y = np.asarray(x, dtype=F32).copy()
    n, h = len(y), 1
    while h < n:
        blocks = y.reshape(-1, 2, h)
        a, b = blocks[:, 0, :], blocks[:, 1, :]
        y = np.stack([a + b, a - b], axis=1).reshape(-1)
        h *= 2
    return y


def hadamard_scale(n: int) -> np.float32:
    return F32(1.0 / np.sqrt(float(n)))


def rotate(row: np.ndarray, key: int, r: int) -> np.ndarray:
    """Forward rotation of one row, zero-padded to the next power of two."""
    n = next_pow2(len(row))
    padded = np.zeros(n, dtype=F32)
    padded[: len(row)] = row
    return fwht(padded * signs(key, r, n)) * hadamard_scale(n)


def unrotate(row: np.ndarray, key: int, r: int) -> np.ndarray:
    """Inverse rotation of one padded row (not truncated)."""
    n = len(row)
    return (fwht(row) * hadamard_scale(n)) * signs(key, r, n)


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------


def make_group(lo, hi, bits: int) -> tuple[np.float32, np.float32]:
    """``(lo, step)`` of a group with values in ``[lo, hi]``."""
    levels = 2**bits - 1
    span = float(hi) - float(lo)
    if span == 0.0:
        return F32(lo), F32(0.0)
    step = F32(span / levels)
    while float(step) * levels < span:
        step = np.nextafter(step, F32(np.inf))
    return F32(lo), step


def dequantize(index: np.ndarray, lo, step) -> np.ndarray:
    return (F64(lo) + index.astype(F64) * F64(step)).astype(F32)


def rows_cols(shape: tuple) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


def quantize_matrix(values: np.ndarray, bits: int, row_scaling: bool, key: int):
    """Indices (uint32, shape of ``values``) and groups ``[(lo, step), ...]`` of a 2-D matrix."""
    rows, cols = values.shape
    levels = 2**bits - 1
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint32), []
    if row_scaling:
        groups = [make_group(values[r].min(), values[r].max(), bits) for r in range(rows)]
    else:
        groups = [make_group(values.min(), values.max(), bits)]
    index = np.zeros(values.shape, dtype=np.uint32)
    for r in range(rows):
        lo, step = groups[r if row_scaling else 0]
        if step == 0:
            continue
        t = (values[r].astype(F64) - F64(lo)) / F64(step) + noise(key, r, cols)
        index[r] = np.minimum(np.floor(t), levels).astype(np.uint32)
    return index, groups


def _prepare(x, hadamard: bool, key: int) -> np.ndarray:
    """The rows x padded_cols float32 matrix that gets quantized."""
    x = np.asarray(x, dtype=F32)
    rows, cols = rows_cols(x.shape)
    m = x.reshape(rows, cols)
    if hadamard and m.size:
        m = np.stack([rotate(m[r], key, r) for r in range(rows)])
    return m


def _reconstruct(index, groups, row_scaling, hadamard, key, cols) -> np.ndarray:
    rows = index.shape[0]
    out = np.zeros(index.shape, dtype=F32)
    for r in range(rows):
        if groups:
            lo, step = groups[r if row_scaling else 0]
            out[r] = dequantize(index[r], lo, step)
        if hadamard and out.shape[1]:
            out[r] = unrotate(out[r], key, r)
    return out[:, :cols]


def quantize(x, bits: int, *, scaling: str = "tensor", hadamard: bool = False, key: int = 0) -> np.ndarray:
    """Quantize-dequantize round trip (the native ``quantize``)."""
    x = np.asarray(x, dtype=F32)
    row = scaling == "row"
    m = _prepare(x, hadamard, key)
    index, groups = quantize_matrix(m, bits, row, key)
    return _reconstruct(index, groups, row, hadamard, key, rows_cols(x.shape)[1]).reshape(x.shape)


# --------------------------------------------------------------------------------------------
# wire format
# --------------------------------------------------------------------------------------------


def pack(index: np.ndarray, bits: int) -> bytes:
    """Dense little-endian bit packing of the flat indices."""
    flat = index.reshape(-1).astype(np.uint32)
    if flat.size == 0:
        return b""
    bitarr = ((flat[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bitarr.reshape(-1), bitorder="little").tobytes()


def unpack(payload: bytes, n: int, bits: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    bitarr = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), bitorder="little")[: n * bits]
    weights = 1 << np.arange(bits, dtype=np.uint32)
    return (bitarr.reshape(n, bits).astype(np.uint32) * weights).sum(axis=1).astype(np.uint32)


def _header(bits, flags, shape, key) -> bytes:
    return (
        MAGIC
        + struct.pack("<HBBBBHQ", VERSION, DTYPE_FLOAT32, bits, flags, len(shape), 0, key & MASK64)
        + b"".join(struct.pack("<Q", int(d)) for d in shape)
    )


def _body(m, bits, row_scaling, key) -> bytes:
    index, groups = quantize_matrix(m, bits, row_scaling, key)
    scales = b"".join(struct.pack("<ff", lo, step) for lo, step in groups)
    return scales + pack(index, bits)


def _with_crc(data: bytes) -> bytes:
    return data + struct.pack("<I", zlib.crc32(data))


def encode(x, bits: int, *, scaling: str = "tensor", hadamard: bool = False, key: int = 0) -> bytes:
    """The buffer the native ``encode`` writes."""
    x = np.asarray(x, dtype=F32)
    row = scaling == "row"
    flags = (FLAG_ROW if row else 0) | (FLAG_HADAMARD if hadamard else 0)
    m = _prepare(x, hadamard, key)
    return _with_crc(_header(bits, flags, x.shape, key) + _body(m, bits, row, key))


def encode_sparse(
    rows, values, num_rows: int, bits: int, *, scaling: str = "tensor", hadamard: bool = False, key: int = 0
) -> bytes:
    """The buffer the native ``encode_sparse`` writes."""
    values = np.asarray(values, dtype=F32)
    ids = np.asarray(rows, dtype=np.int64)
    row = scaling == "row"
    flags = (FLAG_ROW if row else 0) | (FLAG_HADAMARD if hadamard else 0) | FLAG_SPARSE
    m = _prepare(values, hadamard, key)
    head = _header(bits, flags, values.shape, key) + struct.pack("<Q", num_rows)
    head += ids.astype("<u4").tobytes()
    return _with_crc(head + _body(m, bits, row, key))


def parse(buf: bytes) -> dict:
    """Fields of a well-formed buffer (no validation: the oracle only reads good buffers)."""
    version, dtype, bits, flags, ndim, _, key = struct.unpack_from("<HBBBBHQ", buf, 4)
    off = 20
    shape = struct.unpack_from(f"<{ndim}Q", buf, off)
    off += 8 * ndim
    out = dict(
        version=version,
        dtype=dtype,
        bits=bits,
        row_scaling=bool(flags & FLAG_ROW),
        hadamard=bool(flags & FLAG_HADAMARD),
        sparse=bool(flags & FLAG_SPARSE),
        shape=shape,
        key=key,
    )
    rows, cols = rows_cols(shape)
    if out["sparse"]:
        out["num_rows"] = struct.unpack_from("<Q", buf, off)[0]
        off += 8
        out["rows"] = np.frombuffer(buf, dtype="<u4", count=rows, offset=off).astype(np.int32)
        off += 4 * rows
    padded = next_pow2(cols) if out["hadamard"] else cols
    n_groups = 0 if rows * padded == 0 else (rows if out["row_scaling"] else 1)
    out["groups"] = [struct.unpack_from("<ff", buf, off + 8 * g) for g in range(n_groups)]
    off += 8 * n_groups
    out["index"] = unpack(buf[off : len(buf) - 4], rows * padded, bits).reshape(rows, padded)
    out["rows_cols"] = (rows, cols)
    return out


def decode(buf: bytes) -> np.ndarray:
    """Decoded values of a buffer (dense: the array; sparse: the (n, cols) values)."""
    p = parse(buf)
    rows, cols = p["rows_cols"]
    groups = [(F32(lo), F32(step)) for lo, step in p["groups"]]
    m = _reconstruct(p["index"], groups, p["row_scaling"], p["hadamard"], p["key"], cols)
    return m.reshape(p["shape"])


def steps(buf: bytes) -> np.ndarray:
    """Per-row quantization step (float64, one per row of the rows x cols view)."""
    p = parse(buf)
    rows, _ = p["rows_cols"]
    s = np.array([step for _, step in p["groups"]], dtype=F64)
    if not p["row_scaling"]:
        s = np.repeat(s if s.size else np.zeros(1), rows)
    return s
