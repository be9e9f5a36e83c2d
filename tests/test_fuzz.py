"""Property-based fuzzing (hypothesis) of the public API and of the CLI.

Every public entry point gets random shapes, dtypes, memory layouts (non-contiguous and
reversed views, Fortran order, read-only arrays), NaN/inf, empty and large clients,
out-of-range ids, negative/zero weights, bad configurations, truncated and corrupted wire
buffers and malformed ratings files. The contract checked everywhere:

* a call either succeeds, and then its result satisfies the documented properties (shapes,
  dtypes, agreement with a NumPy reference or with another entry point), or it raises
  ``ValueError``, ``TypeError`` or ``IndexError`` (``OSError`` for files) whose message names
  the offending argument;
* nothing else escapes (``MemoryError`` only where the request itself needs more than
  :data:`HUGE_BYTES` of memory), no warning is emitted (pytest turns warnings into errors), and
  the interpreter never crashes: the tests most likely to crash natively run in a child process
  (:func:`isolated`), so a crash fails that test and shows the input that caused it;
* the CLI exits 0 or 2, prints exactly one line on stderr when it fails (no traceback), and
  leaves no ``--out``/``--save`` folder behind when it fails.

Example counts: ``FEDRECON_FUZZ_EXAMPLES`` is the total number of examples of the whole file,
shared by the tests in proportion to their weights (default: a small CI-sized run, about 30 s).
The nightly-size campaign is ``FEDRECON_FUZZ_EXAMPLES=10000 python -m pytest tests/test_fuzz.py``.
Runs are deterministic (``derandomize=True``, no example database) unless
``FEDRECON_FUZZ_RANDOM=1``, which draws new examples on every run.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import fedrecon_fast as ff  # noqa: E402
from fedrecon_fast import aggregation, compression, kernels, privacy  # noqa: E402
from fedrecon_fast.cli import main as cli_main  # noqa: E402
from fedrecon_fast.movielens import load_movielens  # noqa: E402

# --------------------------------------------------------------------------------------------
# Infrastructure: example budget, settings, crash isolation, the error contract
# --------------------------------------------------------------------------------------------

ALLOWED = (ValueError, TypeError, IndexError)
#: A request whose output alone needs more than this may raise MemoryError (as NumPy does).
HUGE_BYTES = 1 << 32

_TOTAL = int(os.environ.get("FEDRECON_FUZZ_EXAMPLES", "0") or 0)
_RANDOM = os.environ.get("FEDRECON_FUZZ_RANDOM", "") not in ("", "0")
_CHILD = os.environ.get("FEDRECON_FUZZ_CHILD", "") == "1"
_LAST = os.environ.get("FEDRECON_FUZZ_LAST")  # the child writes each example here first
_WEIGHTS: dict[str, float] = {}
_DEFAULT_PER_WEIGHT = 25  # CI: examples of a weight-1 test


def _examples(name: str) -> int:
    w = _WEIGHTS[name]
    if _TOTAL <= 0:
        return max(3, int(round(_DEFAULT_PER_WEIGHT * w)))
    return max(3, math.ceil(_TOTAL * w / sum(_WEIGHTS.values())))


def _settings(name: str) -> settings:
    return settings(max_examples=_examples(name), derandomize=not _RANDOM, database=None, deadline=None,
                    print_blob=True, suppress_health_check=list(HealthCheck))


def fuzz(weight: float = 1.0, /, **strategies):
    """``@given(**strategies)`` with this file's settings, budget and example logging."""

    def decorate(fn):
        name = fn.__name__
        _WEIGHTS[name] = weight

        params = list(inspect.signature(fn).parameters)

        def logged(*args, **kwargs):
            kwargs.update(zip(params, args))
            if _LAST:
                with open(_LAST, "w") as f:
                    f.write(_short_repr(kwargs))
            return fn(**kwargs)

        logged.__signature__ = inspect.signature(fn)
        logged.__name__ = name
        inner = given(**strategies)(logged)

        def test():
            _settings(name)(inner)()

        test.__name__ = name
        test.__qualname__ = name
        test.__doc__ = fn.__doc__
        test.__module__ = fn.__module__
        test.__wrapped_fuzz__ = fn
        return test

    return decorate


def _short_repr(value) -> str:
    with np.printoptions(threshold=50, edgeitems=5):
        text = repr(value)
    return text if len(text) < 20000 else text[:20000] + "..."


def isolated(test):
    """Run a fuzz test in a child interpreter: a native crash fails this test only.

    The child writes every example to a file before running it, so after a crash the
    message shows the input that crashed it. With ``FEDRECON_FUZZ_CHILD=1`` (in the child, or
    to debug in-process) the test runs here.
    """
    if _CHILD:
        return test
    name = test.__name__

    def run_in_child():
        with tempfile.TemporaryDirectory() as tmp:
            last = Path(tmp) / "last_example.txt"
            env = dict(os.environ, FEDRECON_FUZZ_CHILD="1", FEDRECON_FUZZ_LAST=str(last),
                       PYTHONFAULTHANDLER="1")
            # The child budget must be the parent's: pass the resolved count through.
            env["FEDRECON_FUZZ_EXAMPLES"] = str(_TOTAL)
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "--no-header",
                 f"{__file__}::{name}"],
                capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
                timeout=3600)
            if proc.returncode != 0:
                crashed = proc.returncode < 0 or "Fatal Python error" in proc.stderr
                example = last.read_text() if last.exists() else "(none)"
                pytest.fail(f"{'CRASH' if crashed else 'failure'} in the child (status {proc.returncode})\n"
                            f"last example: {example}\n--- stdout\n{proc.stdout[-8000:]}\n"
                            f"--- stderr\n{proc.stderr[-8000:]}", pytrace=False)

    run_in_child.__name__ = name
    run_in_child.__qualname__ = name
    run_in_child.__doc__ = test.__doc__
    return run_in_child


@contextlib.contextmanager
def contract(*names, allowed=ALLOWED, memory_ok: bool = False):
    """The error contract: an allowed exception whose message names one of ``names``.

    Yields a namespace whose ``.ok`` tells the caller whether the body completed.
    """
    outcome = SimpleNamespace(ok=False, error=None)
    try:
        yield outcome
        outcome.ok = True
    except MemoryError as e:
        if not memory_ok:
            raise AssertionError(f"MemoryError on a request that is not huge: {e}") from e
        outcome.error = e
    except allowed as e:
        msg = str(e)
        assert msg.strip(), f"{type(e).__name__} without a message"
        lowered = msg.lower()
        assert any(n.lower() in lowered for n in names), \
            f"{type(e).__name__} message names none of {names}: {msg!r}"
        outcome.error = e


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

FLOAT_DTYPES = [np.float32, np.float64, np.float16]
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64]
ODD_DTYPES = [np.bool_, np.complex64, np.dtype("U3"), np.dtype(object), np.dtype("M8[s]")]


def _elements(dtype):
    dt = np.dtype(dtype)
    if dt.kind == "f":
        width = 8 * dt.itemsize
        return st.floats(-1e3, 1e3, width=width) | st.floats(width=width, allow_nan=True, allow_infinity=True)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return st.integers(int(info.min), int(info.max)) | st.integers(max(int(info.min), -5), min(int(info.max), 50))
    if dt.kind == "b":
        return st.booleans()
    if dt.kind == "c":
        return st.complex_numbers(max_magnitude=10, width=8 * dt.itemsize)
    if dt.kind == "U":
        return st.text(max_size=3)
    if dt.kind == "M":
        return st.integers(0, 2**40).map(lambda s: np.datetime64(s, "s"))
    return st.sampled_from([None, 1, "a", 2.5])


@st.composite
def layouts(draw, arr: np.ndarray) -> np.ndarray:
    """The same values in another memory layout (a view or a copy)."""
    kind = draw(st.sampled_from(["C", "C", "F", "strided", "reversed", "readonly"]))
    if kind == "F":
        return np.asfortranarray(arr)
    if kind == "strided" and arr.ndim >= 1:
        base = np.repeat(arr, 2, axis=0)  # every row twice: [::2] is arr, non-contiguous
        return base[::2]
    if kind == "reversed" and arr.ndim >= 1:
        return np.ascontiguousarray(arr[::-1])[::-1]
    if kind == "readonly":
        view = arr.view()
        view.flags.writeable = False
        return view
    return arr


@st.composite
def arrays(draw, shape=None, *, dtypes=None, odd: float = 0.1, max_dims: int = 3, max_side: int = 6,
           special: float = 0.15):
    """An array of a random dtype (mostly floats), shape and layout, sometimes with NaN/inf."""
    if shape is None:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))
    if dtypes is None:
        dtypes = FLOAT_DTYPES + INT_DTYPES
    if odd and draw(st.floats(0, 1)) < odd:
        dtype = draw(st.sampled_from(ODD_DTYPES))
    else:
        dtype = draw(st.sampled_from(dtypes))
    dt = np.dtype(dtype)
    if dt.kind == "f":
        width = 8 * dt.itemsize
        arr = draw(hnp.arrays(dt, shape, elements=st.floats(-100, 100, width=width)))
        if arr.size and draw(st.floats(0, 1)) < special:
            flat = arr.reshape(-1)
            i = draw(st.integers(0, arr.size - 1))
            special_value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38] +
                                                 ([1e300, -1e300] if dt == np.float64 else [])))
            with np.errstate(over="ignore"):
                flat[i] = special_value
    else:
        arr = draw(hnp.arrays(dt, shape, elements=_elements(dt)))
    return draw(layouts(arr))


def ints(lo=-3, hi=2**64 + 3):
    """An integer argument: mostly small, sometimes huge or negative, sometimes not an int."""
    return st.one_of(st.integers(max(lo, 0), 5), st.integers(lo, hi),
                     st.sampled_from([np.int64(3), np.uint64(2**64 - 1), np.int32(-1), np.uint8(7)]),
                     st.sampled_from([None, 1.5, "3", True, float("nan")]))


seeds = ints(-2, 2**70)
threads = st.one_of(st.integers(0, 3), st.sampled_from([-1, 2**31, 1.0, None, np.int64(2)]))
bits_args = st.one_of(st.integers(-2, 18), st.sampled_from([None, True, 8.0, "8", np.int16(4)]))
scalings = st.sampled_from(["tensor", "row", "Row", "", None, 1])
bools = st.sampled_from([False, True, False, True, np.bool_(True), 0, 1, "yes", None])
reals = st.one_of(st.floats(-2, 5), st.floats(allow_nan=True, allow_infinity=True),
                  st.sampled_from([0, 1, -1, 0.0, 1e-300, 1e300, None, "1", True, np.float32(0.5)]))


def _same(a, b) -> bool:
    """Equal arrays (NaN equal to NaN for floating dtypes)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return np.array_equal(a, b, equal_nan=True)
    return a.shape == b.shape and bool((a == b).all())


def _product(shape) -> int:
    p = 1
    for d in shape:
        p *= int(d)
    return p


# --------------------------------------------------------------------------------------------
# compression: quantize / encode / decode and the wire format
# --------------------------------------------------------------------------------------------

_SCHEME_NAMES = ("x", "bits", "scaling", "hadamard", "seed", "round", "client", "num_threads")


@fuzz(2, x=arrays(max_dims=4, odd=0.1), bits=bits_args, scaling=scalings, hadamard=bools,
      seed=seeds, round=seeds, client=seeds, num_threads=threads)
def test_fuzz_quantize_encode_decode(x, bits, scaling, hadamard, seed, round, client, num_threads):
    """quantize == decode(encode(x)), sizes and buffer_info agree, or a named error."""
    kw = dict(scaling=scaling, hadamard=hadamard, seed=seed, round=round, client=client,
              num_threads=num_threads)
    with contract(*_SCHEME_NAMES) as c:
        q = compression.quantize(x, bits, **kw)
    if not c.ok:
        with contract(*_SCHEME_NAMES):  # encode rejects the same arguments
            compression.encode(x, bits, **kw)
            raise AssertionError(f"quantize raised {c.error!r} but encode accepted the arguments")
        return
    assert q.shape == np.shape(x) and q.dtype == np.float32 and np.isfinite(q).all()
    buf = compression.encode(x, bits, **kw)
    assert len(buf) == compression.encoded_size(np.shape(x), bits, scaling=scaling, hadamard=hadamard)
    dec = compression.decode(buf, num_threads=1)
    assert dec.shape == q.shape and np.array_equal(dec.view(np.uint32), q.view(np.uint32))
    info = compression.buffer_info(buf)
    assert info["shape"] == np.shape(x) and info["bits"] == bits and info["nbytes"] == len(buf)
    out = np.zeros(np.shape(x), dtype=np.float64)
    compression.decode_accumulate(buf, 2.0, out)
    assert np.array_equal(out, 2.0 * q.astype(np.float64))
    if x.size and not hadamard:
        xf = np.asarray(x, dtype=np.float64)
        lo, hi = xf.min(), xf.max()
        assert np.all(np.abs(q - xf) <= (hi - lo) / (2**bits - 1) * 1.0001 + 1e-30 + np.abs(xf) * 1e-6)


def _crc_fixed(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


@st.composite
def wire_buffers(draw):
    """Hand-built buffers: every header field random (sometimes valid), CRC correct or not,
    payload sized right or not, so decoding gets past each check in turn."""
    version = draw(st.sampled_from([1, 1, 1, 0, 2, 0xFFFF]))
    dtype = draw(st.sampled_from([1, 1, 1, 0, 2]))
    bits = draw(st.sampled_from([1, 2, 3, 7, 8, 9, 12, 16, 16, 0, 17, 255]))
    flags = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x80]))
    sparse = bool(flags & 4)
    ndim = draw(st.sampled_from([2, 2, 1, 0, 3, 8, 9]) if not sparse else st.sampled_from([2, 2, 2, 1, 3]))
    reserved = draw(st.sampled_from([0, 0, 0, 1]))
    key = draw(st.integers(0, 2**64 - 1))
    shape = [draw(st.one_of(st.integers(0, 5), st.sampled_from([2**20, 2**40, 2**56, 2**56 + 1, 2**63, 2**64 - 1])))
             for _ in range(min(ndim, 9))]
    body = b"FRQW" + struct.pack("<HBBBBHQ", version, dtype, bits, flags, ndim, reserved, key)
    body += b"".join(struct.pack("<Q", s) for s in shape)
    rows = shape[0] if shape else 1
    if sparse:
        num_rows = draw(st.sampled_from([0, 1, 3, 8, 2**31, 2**31 + 1, 2**63]))
        body += struct.pack("<Q", num_rows)
        if rows <= 64:
            body += b"".join(struct.pack("<I", draw(st.sampled_from([0, 1, 2, 7, 2**31 - 1, 2**32 - 1])))
                             for _ in range(rows))
    # Scales and payload: the size the header implies (when it is small), or random bytes.
    row_scaling, hadamard = bool(flags & 1), bool(flags & 2)
    cols = shape[-1] if shape else 1
    padded = (1 << max(0, (cols - 1).bit_length())) if hadamard and cols else cols
    if ndim == 0:
        rows_all = 1
    else:
        rows_all = _product(shape[:-1]) if not sparse else rows
    values = rows_all * padded
    if values <= 4096 and 1 <= bits <= 16:
        groups = 0 if values == 0 else (rows_all if row_scaling else 1)
        scale = st.one_of(
            st.tuples(st.floats(-10, 10, width=32), st.floats(0, 1, width=32)),
            st.tuples(st.floats(width=32, allow_nan=True, allow_infinity=True),
                      st.floats(width=32, allow_nan=True, allow_infinity=True)))
        for _ in range(groups):
            lo, step = draw(scale)
            body += struct.pack("<ff", lo, step)
        payload = (values * bits + 7) // 8
        body += draw(st.binary(min_size=payload, max_size=payload))
    else:
        body += draw(st.binary(max_size=64))
    cut = draw(st.sampled_from([None, None, None, 0, 3, 4, 20, -1, -5]))
    if cut is not None:
        body = body[:cut]
    return _crc_fixed(body) if draw(st.booleans()) or cut is None else body + draw(st.binary(max_size=8))


def _check_decoded(buf):
    """Decode a buffer every way; either all agree or all reject it with ValueError."""
    info = None
    with contract("buf", "buffer", "header", "magic", "version", "dtype", "bits", "flags", "ndim", "reserved",
                  "shape", "num_rows", "row id", "scale", "padding", "crc", "truncated", "length", "sparse",
                  "bytes", allowed=(ValueError,), memory_ok=True) as c:
        info = compression.buffer_info(buf)
    if not c.ok:
        for fn in (compression.decode, compression.decode_sparse):
            with contract("buf", "buffer", "header", "magic", "version", "dtype", "bits", "flags", "ndim",
                          "reserved", "shape", "num_rows", "row id", "scale", "padding", "crc",
                          "truncated", "length", "sparse", "bytes", allowed=(ValueError,), memory_ok=True) as d:
                fn(buf)
            assert not d.ok, f"buffer_info rejected the buffer ({c.error}) but {fn.__name__} decoded it"
        return
    shape = info["shape"]
    if _product(shape) * 4 > HUGE_BYTES:
        return
    if info["sparse"]:
        rows, values = compression.decode_sparse(buf, num_threads=2)
        assert values.shape == shape and rows.shape == (shape[0],) and rows.dtype == np.int32
        assert rows.size == 0 or (rows.min() >= 0 and rows.max() < info["num_rows"])
        with contract("decode"):
            compression.decode(buf)
            raise AssertionError("decode accepted a sparse buffer")
        table = max(int(rows.max()) + 1 if rows.size else 0, 1)
        out = np.zeros((table, shape[1]), dtype=np.float64)
        compression.decode_accumulate(buf, 1.0, out)
        expected = np.zeros_like(out)
        np.add.at(expected, rows, values.astype(np.float64))
        assert np.array_equal(out, expected, equal_nan=True)
        if rows.size:
            with contract("row id", allowed=(IndexError,)):
                compression.decode_accumulate(buf, 1.0, np.zeros((int(rows.max()), shape[1])))
                raise AssertionError("a row id outside out was accepted")
    else:
        values = compression.decode(buf, num_threads=2)
        assert values.shape == shape and values.dtype == np.float32
        if not info["hadamard"]:
            assert np.isfinite(values).all()
        assert np.array_equal(values, compression.decode(buf, num_threads=1), equal_nan=True)
        out = np.zeros(shape, dtype=np.float64)
        compression.decode_accumulate(buf, 1.0, out)
        assert np.array_equal(out, values.astype(np.float64), equal_nan=True)


@isolated
@fuzz(3, buf=wire_buffers())
def test_fuzz_decode_hand_built_buffers(buf):
    """Buffers with every header field fuzzed (CRC usually right): decode or a clear ValueError."""
    _check_decoded(buf)


@st.composite
def mutated_buffers(draw):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
    bits = draw(st.integers(1, 16))
    kw = dict(scaling=draw(st.sampled_from(["tensor", "row"])), hadamard=draw(st.booleans()),
              seed=draw(st.integers(0, 9)))
    if draw(st.booleans()) and x.ndim == 2:
        rows = draw(hnp.arrays(np.int64, (x.shape[0],), elements=st.integers(0, 9)))
        buf = bytearray(compression.encode_sparse(rows, x, bits, num_rows=10, **kw))
    else:
        buf = bytearray(compression.encode(x, bits, **kw))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "extend", "field"]))
        if op == "flip" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))):]
        elif op == "extend":
            buf += draw(st.binary(min_size=1, max_size=16))
        elif op == "field" and len(buf) >= 28:
            at = draw(st.sampled_from([4, 6, 7, 8, 9, 10, 12, 20]))
            width = {4: 2, 6: 1, 7: 1, 8: 1, 9: 1, 10: 2, 12: 8, 20: 8}[at]
            buf[at:at + width] = draw(st.binary(min_size=width, max_size=width))
    if draw(st.booleans()) and len(buf) >= 4:  # recompute the CRC so the parser looks further
        buf = bytearray(_crc_fixed(bytes(buf[:-4])))
    kind = draw(st.sampled_from([bytes, bytearray, memoryview, "array"]))
    if kind == "array":
        return np.frombuffer(bytes(buf), dtype=np.uint8)
    return kind(bytes(buf)) if kind is not bytearray else bytearray(buf)


@isolated
@fuzz(3, buf=mutated_buffers())
def test_fuzz_decode_mutated_buffers(buf):
    """Valid buffers with flipped bits, overwritten fields, truncation or junk appended."""
    _check_decoded(buf)


@fuzz(1, buf=st.one_of(st.binary(max_size=64), st.binary(max_size=64).map(lambda b: b"FRQW" + b),
                              st.sampled_from([None, 1, "FRQW", [1, 2], np.zeros(4, np.int32),
                                               np.zeros((2, 2), np.uint8), np.zeros(8, np.uint8)[::2]])),
      num_threads=threads)
def test_fuzz_decode_garbage(buf, num_threads):
    """Random bytes and non-buffers: TypeError/ValueError naming buf (or num_threads)."""
    for fn in (compression.decode, compression.decode_sparse):
        with contract("buf", "buffer", "magic", "num_threads", "truncated", "bytes"):
            fn(buf, num_threads=num_threads)
            raise AssertionError("garbage decoded")
    with contract("buf", "buffer", "magic", "truncated", "bytes"):
        compression.buffer_info(buf)
        raise AssertionError("garbage described")


@fuzz(2, rows=arrays(dtypes=INT_DTYPES + [np.float64], max_dims=2, max_side=6, odd=0.05),
      values=arrays(max_dims=3, max_side=5, odd=0.05), num_rows=st.one_of(st.none(), ints(-2, 2**32)),
      bits=bits_args, scaling=scalings, hadamard=bools, seed=seeds)
def test_fuzz_encode_sparse(rows, values, num_rows, bits, scaling, hadamard, seed):
    """encode_sparse -> decode_sparse returns the ids, values of the right shape, or a named error."""
    names = ("rows", "values", "num_rows", "bits", "scaling", "hadamard", "seed")
    with contract(*names) as c:
        buf = compression.encode_sparse(rows, values, bits, num_rows=num_rows, scaling=scaling,
                                        hadamard=hadamard, seed=seed)
    if not c.ok:
        return
    got_rows, got_values = compression.decode_sparse(buf)
    assert np.array_equal(got_rows, np.asarray(rows).astype(np.int64))
    assert got_values.shape == np.shape(values) and np.isfinite(got_values).all()
    info = compression.buffer_info(buf)
    assert info["sparse"] and info["num_rows"] == (num_rows if num_rows is not None
                                                    else (int(np.max(rows)) + 1 if np.size(rows) else 0))
    assert len(buf) == compression.encoded_size((info["num_rows"], np.shape(values)[1]), bits, scaling=scaling,
                                                hadamard=hadamard, sparse_rows=len(rows))


_dims = st.one_of(st.integers(0, 6), st.sampled_from([2**31, 2**56, 2**57, 2**63 - 1, 2**64, 2**100, -1]),
                  st.sampled_from([1.0, "2", None, True, np.int64(3), np.uint64(2**63)]))


@fuzz(1, shape=st.one_of(st.lists(_dims, max_size=10).map(tuple), _dims),
      bits=bits_args, scaling=scalings, hadamard=bools,
      sparse_rows=st.one_of(st.none(), st.integers(-2, 6), st.sampled_from([2**56, 2**64, 1.5])))
def test_fuzz_encoded_size(shape, bits, scaling, hadamard, sparse_rows):
    """encoded_size is exact for small shapes and never crashes or overflows on huge ones."""
    with contract("shape", "bits", "scaling", "hadamard", "sparse_rows") as c:
        size = compression.encoded_size(shape, bits, scaling=scaling, hadamard=hadamard, sparse_rows=sparse_rows)
    if not c.ok:
        return
    assert isinstance(size, int) and size > 0
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if sparse_rows is None and _product(dims) <= 4096:
        assert size == len(compression.encode(np.zeros(dims, np.float32), bits, scaling=scaling,
                                              hadamard=hadamard))
    elif sparse_rows is not None and sparse_rows * dims[1] <= 4096 and dims[0] > 0:
        buf = compression.encode_sparse(np.zeros(sparse_rows, np.int64), np.zeros((sparse_rows, dims[1]), np.float32),
                                        bits, num_rows=dims[0], scaling=scaling, hadamard=hadamard)
        assert size == len(buf)


@st.composite
def accumulate_cases(draw):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    n = draw(st.integers(0, 4))
    bufs, arrays_ = [], []
    sparse = draw(st.booleans()) and len(shape) == 2
    for k in range(n):
        x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-5, 5, width=32)))
        b = draw(st.integers(1, 16))
        if sparse:
            rows = draw(hnp.arrays(np.int64, (shape[0],), elements=st.integers(0, 6)))
            bufs.append(compression.encode_sparse(rows, x, b, num_rows=7, client=k))
            arrays_.append((rows, x))
        else:
            bufs.append(compression.encode(x, b, client=k))
    if bufs and draw(st.floats(0, 1)) < 0.2:  # a foreign buffer in the batch
        other = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        bufs[draw(st.integers(0, len(bufs) - 1))] = compression.encode(np.zeros(other, np.float32), 8)
    weights = draw(st.one_of(
        hnp.arrays(np.float64, (len(bufs),), elements=st.floats(-3, 3)),
        hnp.arrays(np.float64, (len(bufs),), elements=st.floats(allow_nan=True, allow_infinity=True)),
        st.sampled_from([None, 1.0, [1.0] * (len(bufs) + 1), "w", np.ones((len(bufs), 1))])))
    out_shape = (7, shape[1]) if sparse else shape
    if draw(st.floats(0, 1)) < 0.25:
        out_shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7))
    out = draw(st.sampled_from(["f64", "f64", "f64", "f32", "list", "fortran", "readonly"]))
    arr = np.zeros(out_shape, dtype=np.float32 if out == "f32" else np.float64)
    if out == "list":
        arr = arr.tolist()
    elif out == "fortran" and arr.ndim >= 2 and arr.shape[0] > 1 and arr.shape[1] > 1:
        arr = np.asfortranarray(arr)
    elif out == "readonly":
        arr.flags.writeable = False
    container = draw(st.sampled_from([list, tuple, iter]))
    return container(bufs), weights, arr


@fuzz(2, case=accumulate_cases(), num_threads=threads)
def test_fuzz_decode_accumulate_batch(case, num_threads):
    """out += Σ w_k decode(buf_k) equals decoding each buffer, or a named error."""
    bufs, weights, out = case
    bufs = list(bufs) if not isinstance(bufs, (list, tuple)) else bufs
    with contract("bufs", "buffer", "weights", "out", "num_threads", "shape", "sparse", "row id",
                  allowed=ALLOWED) as c:
        before = np.array(out, copy=True) if isinstance(out, np.ndarray) else None
        compression.decode_accumulate_batch(bufs, weights, out, num_threads=num_threads)
    if not c.ok:
        if isinstance(out, np.ndarray) and out.flags.writeable and before is not None:
            pass  # a rejected batch may have been validated before or after writing: not specified
        return
    expected = np.zeros(out.shape)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    for k, b in enumerate(bufs):
        info = compression.buffer_info(b)
        if info["sparse"]:
            r, v = compression.decode_sparse(b)
            np.add.at(expected, r, w[k] * v.astype(np.float64))
        else:
            expected += w[k] * compression.decode(b).astype(np.float64)
    assert np.allclose(out, expected, rtol=1e-12, atol=1e-12)


@fuzz(1, x=arrays(max_dims=3, odd=0.05), out=arrays(max_dims=3, odd=0.05, special=0),
      weight=reals, bits=bits_args, scaling=scalings, hadamard=bools, num_threads=threads)
def test_fuzz_quantize_accumulate(x, out, weight, bits, scaling, hadamard, num_threads):
    """quantize_accumulate adds weight * quantize(x) to out, or rejects the arguments by name."""
    out = np.array(out) if out.flags.writeable else out
    before = np.array(out, copy=True)
    with contract("x", "out", "weight", "bits", "scaling", "hadamard", "num_threads") as c:
        compression.quantize_accumulate(x, bits, weight, out, scaling=scaling, hadamard=hadamard,
                                        num_threads=num_threads)
    if not c.ok:
        assert _same(out, before), "a rejected call modified out"
        return
    q = compression.quantize(x, bits, scaling=scaling, hadamard=hadamard)
    assert np.array_equal(out, before + float(weight) * q.astype(np.float64))


# --------------------------------------------------------------------------------------------
# aggregation and privacy
# --------------------------------------------------------------------------------------------

_AGG_NAMES = ("updates", "update", "weights", "weight", "dtype", "out", "num_threads", "shape", "rows",
              "values", "offsets", "num_rows", "clip", "noise_multiplier", "seed", "round",
              "expected_weight", "std", "num_examples", "cap")


@st.composite
def weight_arrays(draw, n: int):
    kind = draw(st.sampled_from(["none", "good", "good", "special", "wrong", "odd"]))
    if kind == "none":
        return None
    if kind == "good":
        return draw(hnp.arrays(draw(st.sampled_from([np.float64, np.float32, np.int64, np.uint8])), (n,),
                               elements=st.integers(0, 3)))
    if kind == "special":
        return draw(hnp.arrays(np.float64, (n,), elements=st.floats(-2, 2) | st.sampled_from(
            [0.0, np.nan, np.inf, -np.inf, 1e308, 5e-324])))
    if kind == "wrong":
        return draw(arrays(max_dims=2, max_side=4))
    return draw(st.sampled_from([1.0, "w", [1, "a"], [[1.0] * n], [True] * n]))


def _ref_weights(weights, n, dp=False):
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    return w


out_dtypes = st.sampled_from([None, None, np.float32, np.float64, "float64", np.float16, int, "x", object])


@st.composite
def outs(draw, shape):
    kind = draw(st.sampled_from(["none", "none", "f32", "f64", "wrong-shape", "fortran", "readonly", "list"]))
    if kind == "none" or _product(shape) > 4096 or any(d > 4096 for d in shape):
        return None
    if kind in ("f32", "f64", "fortran", "readonly"):
        arr = np.full(shape, 7.0, dtype=np.float32 if kind == "f32" else np.float64)
        if kind == "fortran" and arr.ndim >= 2 and arr.shape[0] > 1 and arr.shape[1] > 1:
            arr = np.asfortranarray(arr)
        if kind == "readonly":
            arr.flags.writeable = False
        return arr
    if kind == "list":
        return np.zeros(shape).tolist()
    return np.zeros(draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))


@st.composite
def dense_batches(draw):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    n = draw(st.integers(0, 5))
    stack = draw(arrays(shape=(n,) + shape, odd=0.05))
    if draw(st.booleans()):
        updates = list(stack)
        if updates and draw(st.floats(0, 1)) < 0.15:
            updates[draw(st.integers(0, len(updates) - 1))] = draw(arrays(max_dims=3, max_side=5))
        if draw(st.floats(0, 1)) < 0.1:
            updates = tuple(updates) if draw(st.booleans()) else iter(updates)
    else:
        updates = stack
    return updates, shape, n


def _float32_or_none(values):
    """The float32 conversion the API does, or None when it must reject the values."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        f = arr.astype(np.float32)
    return f if np.isfinite(f).all() else None


@fuzz(2, batch=dense_batches(), data=st.data(), dtype=out_dtypes, num_threads=threads)
def test_fuzz_weighted_mean(batch, data, dtype, num_threads):
    """weighted_mean equals the float64 NumPy weighted mean, or a named error."""
    updates, shape, n = batch
    weights = data.draw(weight_arrays(n))
    out = data.draw(outs(shape))
    materialised = list(updates) if not isinstance(updates, (np.ndarray, list, tuple)) else updates
    with contract(*_AGG_NAMES) as c:
        result = aggregation.weighted_mean(materialised, weights, dtype=dtype, out=out, num_threads=num_threads)
    if not c.ok:
        return
    stack = np.stack([np.asarray(u) for u in materialised]) if isinstance(materialised, (list, tuple)) \
        else np.asarray(materialised)
    xs = _float32_or_none(stack)
    assert xs is not None, "non-finite updates were accepted"
    w = _ref_weights(weights, n)
    expected = np.tensordot(w, xs.astype(np.float64), axes=1) / w.sum()
    assert result.shape == shape
    assert np.allclose(result, expected, rtol=1e-5, atol=1e-6 * (1 + np.abs(xs).max(initial=0)))
    if out is not None:
        assert result is out


@st.composite
def sparse_batches(draw):
    num_rows = draw(st.one_of(st.integers(0, 6), st.sampled_from([-1, 2**31, 2**63, 1.5, None])))
    row_shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))
    n_clients = draw(st.integers(0, 4))
    sizes = draw(st.lists(st.integers(0, 4), min_size=n_clients, max_size=n_clients))
    nnz = sum(sizes)
    hi = num_rows if isinstance(num_rows, int) and 0 < num_rows < 100 else 6
    if draw(st.booleans()):
        rows = draw(hnp.arrays(np.int64, (nnz,), elements=st.integers(0, max(hi - 1, 0))))
    else:
        rows = draw(hnp.arrays(np.int64, (nnz,), elements=st.integers(-2, 2**31 + 2) | st.integers(0, 5)))
        rows = rows.astype(draw(st.sampled_from([np.int32, np.int64, np.uint64, np.int8, np.float64])))
    values = draw(arrays(shape=(nnz,) + row_shape, odd=0.05))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    mutation = draw(st.sampled_from(["none"] * 6 + ["decreasing", "start", "end", "float", "2d", "short"]))
    if mutation == "decreasing" and len(offsets) > 2:
        offsets[1] = offsets[-1] + 1
    elif mutation == "start":
        offsets[0] = 1
    elif mutation == "end":
        offsets[-1] += 1
    elif mutation == "float":
        offsets = offsets.astype(np.float64)
    elif mutation == "2d":
        offsets = offsets[None, :]
    elif mutation == "short":
        offsets = offsets[:0]
    return rows, values, offsets, num_rows, n_clients, row_shape


def _sparse_reference(rows, values, offsets, w, num_rows, clip=None):
    xs = _float32_or_none(values)
    assert xs is not None, "non-finite values were accepted"
    flat = xs.reshape(len(xs), _product(xs.shape[1:])).astype(np.float64)
    out = np.zeros((num_rows, flat.shape[1]))
    norms = []
    for i in range(len(offsets) - 1):
        lo, hi = offsets[i], offsets[i + 1]
        v = flat[lo:hi]
        norm = float(np.sqrt((v * v).sum()))
        norms.append(norm)
        scale = min(1.0, clip / norm) if clip is not None and norm > 0 else 1.0
        np.add.at(out, np.asarray(rows[lo:hi], dtype=np.int64), w[i] * scale * v)
    return out, np.array(norms)


@fuzz(2, batch=sparse_batches(), data=st.data(), dtype=out_dtypes, num_threads=threads)
def test_fuzz_weighted_mean_sparse(batch, data, dtype, num_threads):
    """weighted_mean_sparse equals a NumPy scatter-add reference, or a named error."""
    rows, values, offsets, num_rows, n, row_shape = batch
    weights = data.draw(weight_arrays(n))
    shape = ((num_rows,) if isinstance(num_rows, int) and num_rows >= 0 else (0,)) + row_shape
    out = data.draw(outs(shape))
    with contract(*_AGG_NAMES) as c:
        result = aggregation.weighted_mean_sparse(rows, values, offsets, weights, num_rows=num_rows, dtype=dtype,
                                                  out=out, num_threads=num_threads)
    if not c.ok:
        return
    w = _ref_weights(weights, n)
    expected, _ = _sparse_reference(rows, values, offsets, w, num_rows)
    assert result.shape == (num_rows,) + row_shape
    scale = 1 + np.abs(np.asarray(values, dtype=np.float64)).max(initial=0)
    assert np.allclose(result.reshape(num_rows, -1), expected / w.sum(), rtol=1e-5, atol=1e-6 * scale)


@st.composite
def stream_ops(draw):
    shape = draw(st.one_of(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
                           st.integers(-1, 5), st.sampled_from([(2**31, 2), (3, 2**40), (2**31 - 1, 2**33), "x",
                                                                (2.0, 3), (-1, 2)])))
    ops = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["dense", "dense", "sparse", "sparse", "bad"]))
        real = tuple(shape) if isinstance(shape, tuple) else ((shape,) if isinstance(shape, int) else ())
        small = all(isinstance(d, int) and 0 <= d <= 8 for d in real)
        weight = draw(st.one_of(st.floats(0, 2), st.sampled_from([0, 1, -1, np.nan, np.inf, 1.5, "1", None])))
        if kind == "dense" and small:
            ops.append(("dense", draw(arrays(shape=real, odd=0.05)), weight))
        elif kind == "sparse" and small and real:
            n = draw(st.integers(0, 4))
            rows = draw(hnp.arrays(np.int64, (n,), elements=st.integers(-1, max(real[0], 1))))
            ops.append(("sparse", rows, draw(arrays(shape=(n,) + real[1:], odd=0.05)), weight))
        else:
            ops.append(("dense", draw(arrays(max_dims=3, max_side=4)), weight))
    return shape, ops


@fuzz(2, case=stream_ops(), dp=st.booleans(), dtype=out_dtypes, clip=st.sampled_from([1.0, 0.5, 1e-3, 0.0, -1.0]),
      noise=st.sampled_from([0.0, 0.0, 1.0, -1.0, np.nan]), expected_weight=st.sampled_from([None, 2.0, 0.0]))
def test_fuzz_streaming_accumulators(case, dp, dtype, clip, noise, expected_weight):
    """WeightedMean / DPGaussianSum: every accepted update is in the result, rejected ones leave no trace."""
    shape, ops = case
    with contract(*_AGG_NAMES, memory_ok=True) as c:
        if dp:
            acc = privacy.DPGaussianSum(shape, clip=clip, noise_multiplier=noise, seed=0, round=0,
                                        expected_weight=expected_weight)
        else:
            acc = aggregation.WeightedMean(shape)
    if not c.ok:
        return
    full = acc.shape
    size = _product(full)
    reference = np.zeros(size) if size * 8 <= HUGE_BYTES else None
    total = 0.0
    accepted = 0
    for op in ops:
        if op[0] == "dense":
            _, x, w = op
            with contract(*_AGG_NAMES) as c:
                acc.add(x, w)
            if c.ok:
                xs = _float32_or_none(x).reshape(-1).astype(np.float64)
                scale = min(1.0, clip / np.linalg.norm(xs)) if dp and np.linalg.norm(xs) > clip else 1.0
                reference += float(w) * scale * xs
        else:
            _, rows, values, w = op
            with contract(*_AGG_NAMES) as c:
                acc.add_sparse(rows, values, w)
            if c.ok:
                v = _float32_or_none(values).reshape(len(rows), _product(full[1:])).astype(np.float64)
                scale = min(1.0, clip / np.linalg.norm(v)) if dp and np.linalg.norm(v) > clip else 1.0
                ref2 = reference.reshape(full[0], size // full[0] if full[0] else 0)
                np.add.at(ref2, rows, float(w) * scale * v)
        if c.ok:
            total += float(w)
            accepted += 1
    assert acc.num_updates == accepted
    with contract(*_AGG_NAMES, memory_ok=True) as c:
        result = acc.result(dtype)
    if not c.ok or reference is None:
        return
    if dp:
        if noise == 0.0:
            denom = expected_weight or 1.0
            assert np.allclose(result.reshape(-1), reference / denom, rtol=1e-5, atol=1e-5)
    else:
        assert total > 0, "a mean over zero total weight was returned"
        assert np.allclose(result.reshape(-1), reference / total, rtol=1e-5, atol=1e-4)


@fuzz(2, batch=sparse_batches(), data=st.data(), clip=reals, noise=reals, seed=seeds,
      expected_weight=st.one_of(st.none(), reals), dense=st.booleans())
def test_fuzz_dp_sum(batch, data, clip, noise, seed, expected_weight, dense):
    """dp_sum / dp_sum_sparse: norms, clip counts and (without noise) the clipped sum, or a named error."""
    rows, values, offsets, num_rows, n, row_shape = batch
    weights = data.draw(weight_arrays(n))
    with contract(*_AGG_NAMES) as c:
        if dense:
            res = privacy.dp_sum(values, weights, clip=clip, noise_multiplier=noise, seed=seed,
                                 expected_weight=expected_weight)
        else:
            res = privacy.dp_sum_sparse(rows, values, offsets, weights, num_rows=num_rows, clip=clip,
                                        noise_multiplier=noise, seed=seed, expected_weight=expected_weight)
    if not c.ok:
        return
    w = _ref_weights(weights, len(values) if dense else n)
    assert np.isfinite(res.value).all() and res.num_updates == len(w)
    if dense:
        xs = _float32_or_none(values).reshape(len(values), _product(np.shape(values)[1:])).astype(np.float64)
        norms = np.sqrt((xs * xs).sum(axis=1))
        expected = sum(w[i] * min(1.0, clip / norms[i]) * xs[i] if norms[i] > 0 else xs[i] * 0
                       for i in range(len(w))) if len(w) else np.zeros(xs.shape[1])
    else:
        expected, norms = _sparse_reference(rows, values, offsets, w, num_rows, clip=clip)
    assert np.allclose(res.norms, norms, rtol=1e-6, atol=1e-30)
    assert res.num_clipped == int((norms > clip).sum())
    if noise == 0:
        assert np.allclose(res.value.reshape(-1), np.asarray(expected).reshape(-1) / res.denominator,
                           rtol=1e-5, atol=1e-5 * (1 + float(clip)))


@fuzz(1, x=arrays(max_dims=3, odd=0.05), clip=reals, shape=st.one_of(
          hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5), st.integers(-1, 5),
          st.sampled_from([(2**40, 2**40), (2**20, 2**20), (1.5,), "s", (2**31 - 1, 2**31)])),
      std=reals, seed=seeds, counts=arrays(max_dims=2, odd=0.05), cap=reals)
def test_fuzz_privacy_helpers(x, clip, shape, std, seed, counts, cap):
    """clip_by_norm, gaussian_noise and capped_weights: documented properties or a named error."""
    with contract("update", "clip") as c:
        clipped, was, norm = privacy.clip_by_norm(x, clip)
    if c.ok:
        xs = _float32_or_none(x).astype(np.float64)
        assert clipped.shape == np.shape(x) and math.isclose(norm, float(np.sqrt((xs * xs).sum())), rel_tol=1e-6)
        assert was == (norm > clip)
        assert float(np.linalg.norm(clipped.astype(np.float64))) <= clip * (1 + 1e-6) or not was
    with contract("shape", "std", "seed", memory_ok=True) as c:
        noise = privacy.gaussian_noise(shape, std, seed=seed)
    if c.ok:
        assert noise.dtype == np.float64 and np.isfinite(noise).all()
    with contract("num_examples", "cap") as c:
        w = privacy.capped_weights(counts, cap)
    if c.ok:
        assert ((w >= 0) & (w <= 1)).all()
