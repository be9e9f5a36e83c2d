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
``FEDRECON_FUZZ_RANDOM=1``, which draws new examples on every run. ``FEDRECON_FUZZ_COUNT=FILE``
appends one line per test with the number of examples it ran (shrinking included).
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

# Nothing of hypothesis' is written into the repository: no example database (database=None
# below), and its other caches go to a temporary folder.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "fedrecon-fuzz-hypothesis"))
hypothesis = pytest.importorskip("hypothesis")
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

set_hypothesis_home_dir(os.environ["HYPOTHESIS_STORAGE_DIRECTORY"])
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import fedrecon_fast as ff  # noqa: E402
from fedrecon_fast import aggregation, compression, kernels, privacy  # noqa: E402
from fedrecon_fast._native.structs import client_config  # noqa: E402
from fedrecon_fast.cli import main as cli_main  # noqa: E402
from fedrecon_fast.movielens import load_movielens  # noqa: E402

pytestmark = pytest.mark.fuzz

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
_COUNT_FILE = os.environ.get("FEDRECON_FUZZ_COUNT")
_WEIGHTS: dict[str, float] = {}
_COUNTS: dict[str, int] = {}
_DEFAULT_PER_WEIGHT = 25  # CI: examples of a weight-1 test


def _examples(name: str) -> int:
    w = _WEIGHTS[name]
    if _TOTAL <= 0:
        return max(3, int(round(_DEFAULT_PER_WEIGHT * w)))
    return max(3, math.ceil(_TOTAL * w / sum(_WEIGHTS.values())))


def _settings(name: str) -> settings:
    return settings(
        max_examples=_examples(name),
        derandomize=not _RANDOM,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


def fuzz(weight: float = 1.0, /, **strategies):
    """``@given(**strategies)`` with this file's settings, budget and example logging."""

    def decorate(fn):
        name = fn.__name__
        _WEIGHTS[name] = weight

        params = list(inspect.signature(fn).parameters)

        def logged(*args, **kwargs):
            _COUNTS[name] = _COUNTS.get(name, 0) + 1
            kwargs.update(zip(params, args))
            if _LAST:
                with open(_LAST, "w") as f:
                    f.write(_short_repr(kwargs))
            return fn(**kwargs)

        logged.__signature__ = inspect.signature(fn)
        logged.__name__ = name
        inner = given(**strategies)(logged)

        fixtures = [p for p in inspect.signature(fn).parameters.values() if p.name not in strategies]

        def test(**kwargs):  # the parameters without a strategy are pytest fixtures
            _COUNTS[name] = 0
            try:
                with _address_space_cap():
                    _settings(name)(inner)(**kwargs)
            finally:
                if _COUNT_FILE:  # FEDRECON_FUZZ_COUNT=file: "test examples-run" lines, appended
                    with open(_COUNT_FILE, "a") as f:
                        f.write(f"{name} {_COUNTS[name]}\n")

        test.__signature__ = inspect.Signature(fixtures)

        test.__name__ = name
        test.__qualname__ = name
        test.__doc__ = fn.__doc__
        test.__module__ = fn.__module__
        test.__wrapped_fuzz__ = fn
        test.is_hypothesis_test = True  # for the pytest plugin (--hypothesis-show-statistics)
        return test

    return decorate


#: Address space a fuzz test may add to what the process already maps: an input that makes the
#: library allocate far more than it should then fails with MemoryError (shown with the input)
#: instead of the kernel's OOM killer taking down the run. Not under AddressSanitizer, whose
#: shadow memory is terabytes of address space.
ADDRESS_SPACE_HEADROOM = 6 << 30


def _mapped_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _address_space_cap():
    try:
        import resource
    except ImportError:  # not POSIX
        yield
        return
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = _mapped_bytes()
    if mapped is None:
        yield
        return
    cap = mapped + ADDRESS_SPACE_HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


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
            env = dict(os.environ, FEDRECON_FUZZ_CHILD="1", FEDRECON_FUZZ_LAST=str(last), PYTHONFAULTHANDLER="1")
            # The child budget must be the parent's: pass the resolved count through.
            env["FEDRECON_FUZZ_EXAMPLES"] = str(_TOTAL)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-x",
                    "--no-header",
                    f"{__file__}::{name}",
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=Path(__file__).resolve().parents[1],
                timeout=3600,
            )
            if proc.returncode != 0:
                crashed = proc.returncode < 0 or "Fatal Python error" in proc.stderr
                example = last.read_text() if last.exists() else "(none)"
                pytest.fail(
                    f"{'CRASH' if crashed else 'failure'} in the child (status {proc.returncode})\n"
                    f"last example: {example}\n--- stdout\n{proc.stdout[-8000:]}\n"
                    f"--- stderr\n{proc.stderr[-8000:]}",
                    pytrace=False,
                )

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
        event("accepted")
    except MemoryError as e:
        if not memory_ok:
            raise AssertionError(f"MemoryError on a request that is not huge: {e}") from e
        outcome.error = e
    except allowed as e:
        msg = str(e)
        assert msg.strip(), f"{type(e).__name__} without a message"
        lowered = msg.lower()
        assert any(n.lower() in lowered for n in names), f"{type(e).__name__} message names none of {names}: {msg!r}"
        outcome.error = e
        event(f"rejected: {type(e).__name__}: {re.sub(r'[0-9]+', 'N', msg)[:60]}")


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


def _chance(draw, p: float) -> bool:
    """True with probability p; hypothesis' simplest choice (0) gives False, the valid branch."""
    return p > 0 and draw(st.integers(0, 999)) >= 1000 - round(1000 * p)


def mostly(good, bad, p_bad: float = 0.08):
    """``good`` values, and with probability ``p_bad`` a ``bad`` one."""
    return st.integers(0, 999).flatmap(lambda k: bad if k >= 1000 - round(1000 * p_bad) else good)


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
def arrays(
    draw, shape=None, *, dtypes=None, odd: float = 0.1, max_dims: int = 3, max_side: int = 6, special: float = 0.15
):
    """An array of a random dtype (mostly floats), shape and layout, sometimes with NaN/inf."""
    if shape is None:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))
    if dtypes is None:
        dtypes = FLOAT_DTYPES + INT_DTYPES
    if odd and _chance(draw, odd):
        dtype = draw(st.sampled_from(ODD_DTYPES))
    else:
        dtype = draw(st.sampled_from(dtypes))
    dt = np.dtype(dtype)
    if dt.kind == "f":
        width = 8 * dt.itemsize
        arr = draw(hnp.arrays(dt, shape, elements=st.floats(-100, 100, width=width)))
        if arr.size and _chance(draw, special):
            flat = arr.reshape(-1)
            i = draw(st.integers(0, arr.size - 1))
            special_value = draw(
                st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38] + ([1e300, -1e300] if dt == np.float64 else []))
            )
            with np.errstate(over="ignore"):
                flat[i] = special_value
    else:
        arr = draw(hnp.arrays(dt, shape, elements=_elements(dt)))
    return draw(layouts(arr))


def ints(lo=-3, hi=2**64 + 3):
    """An integer argument: mostly small, sometimes huge or negative, sometimes not an int."""
    return mostly(
        st.integers(max(lo, 0), 5),
        st.one_of(
            st.integers(lo, hi),
            st.sampled_from([np.int64(3), np.uint64(2**64 - 1), np.int32(-1), np.uint8(7)]),
            st.sampled_from([None, 1.5, "3", True, float("nan")]),
        ),
        0.15,
    )


seeds = ints(-2, 2**70)
threads = mostly(st.integers(0, 3), st.sampled_from([-1, 2**31, 1.0, None, np.int64(2)]))
bits_args = mostly(
    st.integers(1, 16), st.one_of(st.integers(-2, 18), st.sampled_from([None, True, 8.0, "8", np.int16(4)]))
)
scalings = mostly(st.sampled_from(["tensor", "row"]), st.sampled_from(["Row", "", None, 1]))
bools = mostly(st.booleans(), st.sampled_from([np.bool_(True), 0, 1, "yes", None]))
reals = mostly(
    st.floats(0, 5),
    st.one_of(
        st.floats(-2, 5),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0, 1, -1, 1e-300, 1e300, None, "1", True, np.float32(0.5)]),
    ),
    0.15,
)


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


@fuzz(
    2,
    x=arrays(max_dims=4, odd=0.1),
    bits=bits_args,
    scaling=scalings,
    hadamard=bools,
    seed=seeds,
    round=seeds,
    client=seeds,
    num_threads=threads,
)
def test_fuzz_quantize_encode_decode(x, bits, scaling, hadamard, seed, round, client, num_threads):
    """quantize == decode(encode(x)), sizes and buffer_info agree, or a named error."""
    kw = dict(scaling=scaling, hadamard=hadamard, seed=seed, round=round, client=client, num_threads=num_threads)
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
    shape = [
        draw(st.one_of(st.integers(0, 5), st.sampled_from([2**20, 2**40, 2**56, 2**56 + 1, 2**63, 2**64 - 1])))
        for _ in range(min(ndim, 9))
    ]
    body = b"FRQW" + struct.pack("<HBBBBHQ", version, dtype, bits, flags, ndim, reserved, key)
    body += b"".join(struct.pack("<Q", s) for s in shape)
    rows = shape[0] if shape else 1
    if sparse:
        num_rows = draw(st.sampled_from([0, 1, 3, 8, 2**31, 2**31 + 1, 2**63]))
        body += struct.pack("<Q", num_rows)
        if rows <= 64:
            body += b"".join(
                struct.pack("<I", draw(st.sampled_from([0, 1, 2, 7, 2**31 - 1, 2**32 - 1]))) for _ in range(rows)
            )
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
            st.tuples(
                st.floats(width=32, allow_nan=True, allow_infinity=True),
                st.floats(width=32, allow_nan=True, allow_infinity=True),
            ),
        )
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
    with contract(
        "buf",
        "buffer",
        "header",
        "magic",
        "version",
        "dtype",
        "bits",
        "flags",
        "ndim",
        "reserved",
        "shape",
        "num_rows",
        "row id",
        "scale",
        "padding",
        "crc",
        "truncated",
        "length",
        "sparse",
        "bytes",
        allowed=(ValueError,),
        memory_ok=True,
    ) as c:
        info = compression.buffer_info(buf)
    if not c.ok:
        for fn in (compression.decode, compression.decode_sparse):
            with contract(
                "buf",
                "buffer",
                "header",
                "magic",
                "version",
                "dtype",
                "bits",
                "flags",
                "ndim",
                "reserved",
                "shape",
                "num_rows",
                "row id",
                "scale",
                "padding",
                "crc",
                "truncated",
                "length",
                "sparse",
                "bytes",
                allowed=(ValueError,),
                memory_ok=True,
            ) as d:
                fn(buf)
            assert not d.ok, f"buffer_info rejected the buffer ({c.error}) but {fn.__name__} decoded it"
        return
    shape = info["shape"]
    if _product(shape) * 4 > HUGE_BYTES or max(shape, default=0) > 2**40:
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
        assert values.shape == shape and values.dtype == np.float32 and np.isfinite(values).all()
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
    kw = dict(
        scaling=draw(st.sampled_from(["tensor", "row"])), hadamard=draw(st.booleans()), seed=draw(st.integers(0, 9))
    )
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
            del buf[draw(st.integers(0, len(buf))) :]
        elif op == "extend":
            buf += draw(st.binary(min_size=1, max_size=16))
        elif op == "field" and len(buf) >= 28:
            at = draw(st.sampled_from([4, 6, 7, 8, 9, 10, 12, 20]))
            width = {4: 2, 6: 1, 7: 1, 8: 1, 9: 1, 10: 2, 12: 8, 20: 8}[at]
            buf[at : at + width] = draw(st.binary(min_size=width, max_size=width))
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


@fuzz(
    1,
    buf=st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=64).map(lambda b: b"FRQW" + b),
        st.sampled_from(
            [None, 1, "FRQW", [1, 2], np.zeros(4, np.int32), np.zeros((2, 2), np.uint8), np.zeros(8, np.uint8)[::2]]
        ),
    ),
    num_threads=threads,
)
def test_fuzz_decode_garbage(buf, num_threads):
    """Random bytes and non-buffers: TypeError/ValueError naming buf (or num_threads)."""
    for fn in (compression.decode, compression.decode_sparse):
        with contract("buf", "buffer", "magic", "num_threads", "truncated", "bytes"):
            fn(buf, num_threads=num_threads)
            raise AssertionError("garbage decoded")
    with contract("buf", "buffer", "magic", "truncated", "bytes"):
        compression.buffer_info(buf)
        raise AssertionError("garbage described")


@fuzz(
    2,
    rows=arrays(dtypes=INT_DTYPES + [np.float64], max_dims=2, max_side=6, odd=0.05),
    values=arrays(max_dims=3, max_side=5, odd=0.05),
    num_rows=st.one_of(st.none(), ints(-2, 2**32)),
    bits=bits_args,
    scaling=scalings,
    hadamard=bools,
    seed=seeds,
)
def test_fuzz_encode_sparse(rows, values, num_rows, bits, scaling, hadamard, seed):
    """encode_sparse -> decode_sparse returns the ids, values of the right shape, or a named error."""
    names = ("rows", "values", "num_rows", "bits", "scaling", "hadamard", "seed")
    with contract(*names) as c:
        buf = compression.encode_sparse(
            rows, values, bits, num_rows=num_rows, scaling=scaling, hadamard=hadamard, seed=seed
        )
    if not c.ok:
        return
    got_rows, got_values = compression.decode_sparse(buf)
    assert np.array_equal(got_rows, np.asarray(rows).astype(np.int64))
    assert got_values.shape == np.shape(values) and np.isfinite(got_values).all()
    info = compression.buffer_info(buf)
    assert info["sparse"] and info["num_rows"] == (
        num_rows if num_rows is not None else (int(np.max(rows)) + 1 if np.size(rows) else 0)
    )
    assert len(buf) == compression.encoded_size(
        (info["num_rows"], np.shape(values)[1]), bits, scaling=scaling, hadamard=hadamard, sparse_rows=len(rows)
    )


_dims = st.one_of(
    st.integers(0, 6),
    st.sampled_from([2**31, 2**56, 2**57, 2**63 - 1, 2**64, 2**100, -1]),
    st.sampled_from([1.0, "2", None, True, np.int64(3), np.uint64(2**63)]),
)


@fuzz(
    1,
    shape=st.one_of(st.lists(_dims, max_size=10).map(tuple), _dims),
    bits=bits_args,
    scaling=scalings,
    hadamard=bools,
    sparse_rows=st.one_of(st.none(), st.integers(-2, 6), st.sampled_from([2**56, 2**64, 1.5])),
)
def test_fuzz_encoded_size(shape, bits, scaling, hadamard, sparse_rows):
    """encoded_size is exact for small shapes and never crashes or overflows on huge ones."""
    with contract("shape", "bits", "scaling", "hadamard", "sparse_rows") as c:
        size = compression.encoded_size(shape, bits, scaling=scaling, hadamard=hadamard, sparse_rows=sparse_rows)
    if not c.ok:
        return
    assert isinstance(size, int) and size > 0
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if sparse_rows is None and _product(dims) <= 4096 and max(dims, default=0) <= 4096:
        assert size == len(compression.encode(np.zeros(dims, np.float32), bits, scaling=scaling, hadamard=hadamard))
    elif sparse_rows is not None and sparse_rows * dims[1] <= 4096 and dims[0] > 0:
        buf = compression.encode_sparse(
            np.zeros(sparse_rows, np.int64),
            np.zeros((sparse_rows, dims[1]), np.float32),
            bits,
            num_rows=dims[0],
            scaling=scaling,
            hadamard=hadamard,
        )
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
    if bufs and _chance(draw, 0.2):  # a foreign buffer in the batch
        other = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        bufs[draw(st.integers(0, len(bufs) - 1))] = compression.encode(np.zeros(other, np.float32), 8)
    weights = draw(
        st.one_of(
            hnp.arrays(np.float64, (len(bufs),), elements=st.floats(-3, 3)),
            hnp.arrays(np.float64, (len(bufs),), elements=st.floats(allow_nan=True, allow_infinity=True)),
            st.sampled_from([None, 1.0, [1.0] * (len(bufs) + 1), "w", np.ones((len(bufs), 1))]),
        )
    )
    out_shape = (7, shape[1]) if sparse else shape
    if _chance(draw, 0.25):
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
    with contract("bufs", "buffer", "weights", "out", "num_threads", "shape", "sparse", "row id", allowed=ALLOWED) as c:
        before = np.array(out, copy=True) if isinstance(out, np.ndarray) else None
        compression.decode_accumulate_batch(bufs, weights, out, num_threads=num_threads)
    if not c.ok:
        if isinstance(out, np.ndarray) and out.flags.writeable and before is not None:
            pass  # a rejected batch may have been validated before or after writing: not specified
        return
    expected = np.zeros(out.shape)
    scale = np.zeros(out.shape)  # sum of |terms|: the rounding (and FMA) error is relative to it
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # a huge weight may overflow to inf, as in NumPy
        for k, b in enumerate(bufs):
            info = compression.buffer_info(b)
            if info["sparse"]:
                r, v = compression.decode_sparse(b)
                np.add.at(expected, r, w[k] * v.astype(np.float64))
                np.add.at(scale, r, np.abs(w[k] * v.astype(np.float64)))
            else:
                expected += w[k] * compression.decode(b).astype(np.float64)
                scale += np.abs(w[k] * compression.decode(b).astype(np.float64))
        finite = np.isfinite(scale)
        # inf - inf outside the compared (finite) entries must not warn either
        assert np.all(np.abs(out - expected)[finite] <= 1e-12 * scale[finite] + 1e-300)


@fuzz(
    1,
    x=arrays(max_dims=3, odd=0.05),
    out=arrays(max_dims=3, odd=0.05, special=0),
    weight=reals,
    bits=bits_args,
    scaling=scalings,
    hadamard=bools,
    num_threads=threads,
)
def test_fuzz_quantize_accumulate(x, out, weight, bits, scaling, hadamard, num_threads):
    """quantize_accumulate adds weight * quantize(x) to out, or rejects the arguments by name."""
    out = np.array(out) if out.flags.writeable else out
    before = np.array(out, copy=True)
    with contract("x", "out", "weight", "bits", "scaling", "hadamard", "num_threads") as c:
        compression.quantize_accumulate(
            x, bits, weight, out, scaling=scaling, hadamard=hadamard, num_threads=num_threads
        )
    if not c.ok:
        assert _same(out, before), "a rejected call modified out"
        return
    q = compression.quantize(x, bits, scaling=scaling, hadamard=hadamard)
    # Equal up to the rounding of a fused multiply-add (the native loop may contract it).
    assert np.allclose(out, before + float(weight) * q.astype(np.float64), rtol=1e-12, atol=1e-300)


# --------------------------------------------------------------------------------------------
# aggregation and privacy
# --------------------------------------------------------------------------------------------

_AGG_NAMES = (
    "updates",
    "update",
    "weights",
    "weight",
    "dtype",
    "out",
    "num_threads",
    "shape",
    "rows",
    "values",
    "offsets",
    "num_rows",
    "clip",
    "noise_multiplier",
    "seed",
    "round",
    "expected_weight",
    "std",
    "num_examples",
    "cap",
)


@st.composite
def weight_arrays(draw, n: int):
    kind = draw(st.sampled_from(["none", "good", "good", "special", "wrong", "odd"]))
    if kind == "none":
        return None
    if kind == "good":
        return draw(
            hnp.arrays(
                draw(st.sampled_from([np.float64, np.float32, np.int64, np.uint8])), (n,), elements=st.integers(0, 3)
            )
        )
    if kind == "special":
        return draw(
            hnp.arrays(
                np.float64,
                (n,),
                elements=st.floats(-2, 2) | st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e308, 5e-324]),
            )
        )
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
        if updates and _chance(draw, 0.15):
            updates[draw(st.integers(0, len(updates) - 1))] = draw(arrays(max_dims=3, max_side=5))
        if _chance(draw, 0.1):
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
    stack = (
        np.stack([np.asarray(u) for u in materialised])
        if isinstance(materialised, (list, tuple))
        else np.asarray(materialised)
    )
    xs = _float32_or_none(stack)
    assert xs is not None, "non-finite updates were accepted"
    w = _ref_weights(weights, n)
    expected = np.tensordot(w, xs.astype(np.float64), axes=1) / w.sum()
    assert result.shape == stack.shape[1:]
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
        result = aggregation.weighted_mean_sparse(
            rows, values, offsets, weights, num_rows=num_rows, dtype=dtype, out=out, num_threads=num_threads
        )
    if not c.ok:
        return
    w = _ref_weights(weights, n)
    expected, _ = _sparse_reference(rows, values, offsets, w, num_rows)
    assert result.shape == (num_rows,) + row_shape
    scale = 1 + np.abs(np.asarray(values, dtype=np.float64)).max(initial=0)
    assert np.allclose(result.reshape(expected.shape), expected / w.sum(), rtol=1e-5, atol=1e-6 * scale)


@st.composite
def stream_ops(draw):
    shape = draw(
        st.one_of(
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
            st.integers(-1, 5),
            st.sampled_from([(2**31, 2), (3, 2**40), (2**31 - 1, 2**33), "x", (2.0, 3), (-1, 2)]),
        )
    )
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


@fuzz(
    2,
    case=stream_ops(),
    dp=st.booleans(),
    dtype=out_dtypes,
    clip=st.sampled_from([1.0, 0.5, 1e-3, 0.0, -1.0]),
    noise=st.sampled_from([0.0, 0.0, 1.0, -1.0, np.nan]),
    expected_weight=st.sampled_from([None, 2.0, 0.0]),
)
def test_fuzz_streaming_accumulators(case, dp, dtype, clip, noise, expected_weight):
    """WeightedMean / DPGaussianSum: every accepted update is in the result, rejected ones leave no trace."""
    shape, ops = case
    with contract(*_AGG_NAMES, memory_ok=True) as c:
        if dp:
            acc = privacy.DPGaussianSum(
                shape, clip=clip, noise_multiplier=noise, seed=0, round=0, expected_weight=expected_weight
            )
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
                ref2 = reference.reshape(full[0], _product(full[1:]))
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


@fuzz(
    2,
    batch=sparse_batches(),
    data=st.data(),
    clip=reals,
    noise=reals,
    seed=seeds,
    expected_weight=st.one_of(st.none(), reals),
    dense=st.booleans(),
)
def test_fuzz_dp_sum(batch, data, clip, noise, seed, expected_weight, dense):
    """dp_sum / dp_sum_sparse: norms, clip counts and (without noise) the clipped sum, or a named error."""
    rows, values, offsets, num_rows, n, row_shape = batch
    weights = data.draw(weight_arrays(n))
    with contract(*_AGG_NAMES) as c:
        if dense:
            res = privacy.dp_sum(
                values, weights, clip=clip, noise_multiplier=noise, seed=seed, expected_weight=expected_weight
            )
        else:
            res = privacy.dp_sum_sparse(
                rows,
                values,
                offsets,
                weights,
                num_rows=num_rows,
                clip=clip,
                noise_multiplier=noise,
                seed=seed,
                expected_weight=expected_weight,
            )
    if not c.ok:
        return
    w = _ref_weights(weights, len(values) if dense else n)
    assert np.isfinite(res.value).all() and res.num_updates == len(w)
    if dense:
        xs = _float32_or_none(values).reshape(len(values), _product(np.shape(values)[1:])).astype(np.float64)
        norms = np.sqrt((xs * xs).sum(axis=1))
        expected = (
            sum(w[i] * min(1.0, clip / norms[i]) * xs[i] if norms[i] > 0 else xs[i] * 0 for i in range(len(w)))
            if len(w)
            else np.zeros(xs.shape[1])
        )
    else:
        expected, norms = _sparse_reference(rows, values, offsets, w, num_rows, clip=clip)
    assert np.allclose(res.norms, norms, rtol=1e-6, atol=1e-30)
    assert res.num_clipped == int((norms > clip).sum())
    if noise == 0:
        assert np.allclose(
            res.value.reshape(-1),
            np.asarray(expected).reshape(-1) / res.denominator,
            rtol=1e-5,
            atol=1e-5 * (1 + float(clip)),
        )


@fuzz(
    1,
    x=arrays(max_dims=3, odd=0.05),
    clip=reals,
    shape=st.one_of(
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
        st.integers(-1, 5),
        st.sampled_from([(2**40, 2**40), (2**20, 2**20), (1.5,), "s", (2**31 - 1, 2**31)]),
    ),
    std=reals,
    seed=seeds,
    counts=arrays(max_dims=2, odd=0.05),
    cap=reals,
)
def test_fuzz_privacy_helpers(x, clip, shape, std, seed, counts, cap):
    """clip_by_norm, gaussian_noise and capped_weights: documented properties or a named error."""
    with contract("update", "clip") as c:
        clipped, was, norm = privacy.clip_by_norm(x, clip)
    if c.ok:
        xs = _float32_or_none(x).astype(np.float64)
        assert clipped.shape == np.shape(x) and math.isclose(norm, float(np.sqrt((xs * xs).sum())), rel_tol=1e-6)
        assert was == (norm > clip)
        # float32 rounding: relative 1e-7, or absolute near the subnormal range
        assert float(np.linalg.norm(clipped.astype(np.float64))) <= clip * (1 + 1e-6) + 1e-43 or not was
    with contract("shape", "std", "seed", memory_ok=True) as c:
        noise = privacy.gaussian_noise(shape, std, seed=seed)
    if c.ok:
        assert noise.dtype == np.float64 and np.isfinite(noise).all()
    with contract("num_examples", "cap") as c:
        w = privacy.capped_weights(counts, cap)
    if c.ok:
        assert ((w >= 0) & (w <= 1)).all()


# --------------------------------------------------------------------------------------------
# cohort kernels
# --------------------------------------------------------------------------------------------

_KERNEL_NAMES = (
    "item_factors",
    "item_bias",
    "global_mean",
    "data",
    "indptr",
    "items",
    "ratings",
    "clients",
    "client",
    "config",
    "seed",
    "round",
    "num_threads",
    "check_finite",
    "users",
    "user_bias",
    "user_default",
    "user_bias_default",
    "codec",
    "k",
    "relevance_threshold",
    "exclude_seen",
    "item id",
    "num_items",
    "rows",
    "values",
    "offsets",
    "weights",
    "dense update",
)


@st.composite
def client_datas(draw, max_clients: int = 7, max_items: int = 9):
    """A valid ClientData: empty clients, one-rating clients, sometimes one large client."""
    n = draw(st.integers(0, max_clients))
    sizes = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, 13]), min_size=n, max_size=n))
    if n and _chance(draw, 0.15):
        sizes[draw(st.integers(0, n - 1))] = draw(st.integers(100, 1500))  # a huge client
    num_items = draw(st.integers(1, max_items))
    nnz = sum(sizes)
    items = np.asarray(
        draw(st.lists(st.integers(0, num_items - 1), min_size=nnz, max_size=nnz))
        if nnz < 60
        else np.random.default_rng(nnz).integers(0, num_items, nnz),
        dtype=np.int64,
    )
    ratings = np.asarray(
        draw(
            st.lists(
                st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0, 0.5, -3.0, 100.0]),
                min_size=min(nnz, 60),
                max_size=min(nnz, 60),
            )
        ),
        dtype=np.float64,
    )
    if nnz > 60:
        ratings = np.random.default_rng(nnz + 1).uniform(1, 5, nnz)
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return ff.ClientData(indptr, items, ratings, item_ids=np.arange(num_items) * 10 + 3)


def client_configs():
    return st.builds(
        ff.ClientConfig,
        batch_size=st.sampled_from([1, 2, 5, 64]),
        split=st.sampled_from(["batches", "random", "reuse"]),
        support_fraction=st.sampled_from([0.0, 0.5, 1.0]),
        reshuffle=st.booleans(),
        recon=st.sampled_from(["sgd", "exact"]),
        init=st.sampled_from(["uniform", "zeros"]),
        init_scale=st.sampled_from([0.0, 0.05, 1.0]),
        recon_epochs=st.integers(0, 3),
        recon_steps_max=st.sampled_from([None, 1, 3]),
        recon_lr=st.sampled_from([0.0, 0.1, 1e3]),
        recon_l2=st.sampled_from([0.0, 0.5]),
        ridge=st.sampled_from([1e-30, 1.0, 1e30]),
        update_epochs=st.integers(0, 2),
        update_steps_max=st.sampled_from([None, 1, 2]),
        client_lr=st.sampled_from([0.0, 0.5, 1e6]),
        update_l2=st.sampled_from([0.0, 0.1]),
        joint=st.booleans(),
        weighting=st.sampled_from(["examples", "uniform"]),
    )


@st.composite
def item_factor_matrices(draw, num_items: int):
    kind = (
        "good"
        if not _chance(draw, 0.3)
        else draw(st.sampled_from(["more-rows", "more-rows", "fewer-rows", "1d", "no-cols", "nan", "nan", "odd"]))
    )
    dim = draw(st.integers(1, 4))
    rows = {"more-rows": num_items + 2, "fewer-rows": max(num_items - 1, 0)}.get(kind, num_items)
    if kind == "1d":
        return draw(arrays(shape=(rows,), dtypes=[np.float32], odd=0, special=0))
    if kind == "no-cols":
        return np.zeros((rows, 0), np.float32)
    if kind == "odd":
        return draw(arrays(max_dims=3, max_side=5))
    V = draw(
        arrays(
            shape=(rows, dim),
            dtypes=[np.float32, np.float32, np.float64, np.int8],
            odd=0,
            special=1.0 if kind == "nan" else 0,
        )
    )
    return V


@st.composite
def cohort_args(draw):
    data = draw(client_datas())
    V = draw(item_factor_matrices(data.num_items))
    dim = V.shape[1] if np.ndim(V) == 2 else 1
    rows = V.shape[0] if np.ndim(V) >= 1 else 0
    valid = st.lists(st.integers(0, data.num_clients - 1), max_size=6) if data.num_clients else st.just([])
    clients = draw(
        mostly(
            st.one_of(st.none(), valid),
            st.one_of(
                st.lists(st.integers(-3, data.num_clients + 3), max_size=4),
                st.sampled_from([[2**63 - 1], [0.0], np.array([[0]]), "0", [True], np.array([], np.float64)]),
                hnp.arrays(
                    st.sampled_from([np.int32, np.uint64, np.int8]),
                    st.integers(0, 3),
                    elements=st.integers(0, max(data.num_clients - 1, 0)),
                ),
            ),
            0.15,
        )
    )
    m = data.num_clients if clients is None else (len(clients) if isinstance(clients, (list, np.ndarray)) else 1)
    biased = draw(st.booleans())
    item_bias = draw(arrays(shape=(rows,), dtypes=FLOAT_DTYPES + [np.int16], odd=0.05, special=0.1)) if biased else None
    if biased and _chance(draw, 0.1):
        item_bias = draw(arrays(max_dims=2, max_side=5))
    kw = dict(
        config=draw(
            mostly(st.one_of(client_configs(), st.none()), st.sampled_from([{}, "paper", ff.preset("paper")]), 0.05)
        ),
        item_bias=item_bias,
        global_mean=draw(reals),
        seed=draw(seeds),
        round=draw(seeds),
        num_threads=draw(threads),
        check_finite=draw(st.booleans()),
    )
    if _chance(draw, 0.2):
        kw["user_default"] = draw(arrays(shape=(dim,), odd=0.05)) if not _chance(draw, 0.2) else draw(arrays())
        kw["user_bias_default"] = draw(reals)
    return data, V, clients, m, dim, kw


_CODEC_FIELDS = ("bits", "row_scaling", "hadamard", "sparse", "threshold", "clip")


@st.composite
def codec_args(draw, m: int, dim: int, biased: bool):
    fields = dict(
        bits=draw(st.one_of(st.just(0), bits_args)),
        row_scaling=draw(bools),
        hadamard=draw(bools),
        sparse=draw(bools),
        threshold=draw(mostly(st.integers(0, 40), ints())),
        clip=draw(mostly(st.floats(0, 5), reals)),
    )
    # The codec validates its own fields; a kernel takes only a codec (or None).
    with contract(*_CODEC_FIELDS) as c:
        codec = ff.UpdateCodec(**fields)
    kw = dict(codec=codec if c.ok else draw(st.sampled_from([None, fields, "8"])))
    if _chance(draw, 0.2):
        kw["users"] = draw(arrays(shape=(m, dim), odd=0.05)) if not _chance(draw, 0.2) else draw(arrays())
        if biased or _chance(draw, 0.2):
            kw["user_bias"] = draw(arrays(shape=(m,), odd=0.05))
    return kw


def _expect_stats(stats: dict, m: int):
    assert set(stats) >= {"weight", "loss_sum", "num_examples", "num_correct", "rows", "status"}
    for v in stats.values():
        assert v.shape == (m,)
    assert (stats["weight"] >= 0).all() and np.isfinite(stats["weight"]).all()


def _check_in_place_step(V, cd, clients, kw, res, lr):
    """train_round(apply_lr=lr) on copies of the model: a named error, or the model exactly
    where SGD with the dense round's delta puts it (untouched rows: V + 0)."""
    event("in-place step")
    copy = lambda a: a.copy() if isinstance(a, np.ndarray) else a  # noqa: E731
    V2, b2 = copy(V), copy(kw["item_bias"])
    with contract("apply_lr", *_KERNEL_NAMES) as c:
        out = kernels.train_round(V2, cd, clients, **dict(kw, item_bias=b2), apply_lr=lr)
    if not c.ok:
        return
    assert out.delta is None and out.delta_bias is None and out.summary["nonfinite_rows"] >= 0
    for before, after, delta in ((V, V2, res.delta), (kw["item_bias"], b2, res.delta_bias)):
        if delta is None:
            continue
        with np.errstate(all="ignore"):
            expected = before + (delta if lr == 1.0 else np.multiply(delta, np.float32(lr)))
        assert np.array_equal(after, expected, equal_nan=True), "in-place step differs from SGD on the delta"


@isolated
@fuzz(4, args=cohort_args(), data=st.data(), kind=st.sampled_from(["train_round", "client_updates"]))
def test_fuzz_update_kernels(args, data, kind):
    """train_round / client_updates: well-formed results, finite aggregates, independent of the
    thread count, or a named error."""
    cd, V, clients, m, dim, kw = args
    kw.update(data.draw(codec_args(m, dim, kw["item_bias"] is not None)))
    fn = getattr(kernels, kind)
    with contract(*_KERNEL_NAMES) as c:
        res = fn(V, cd, clients, **kw)
    if not c.ok:
        return
    num_items = np.shape(V)[0]
    m = len(res.client_stats["weight"])
    _expect_stats(res.client_stats, m)
    v_finite = np.isfinite(np.asarray(V, dtype=np.float64)).all()
    if kind == "train_round":
        assert res.delta.shape == (num_items, dim) and res.delta.dtype == np.float32
        if v_finite and (kw["item_bias"] is None or np.isfinite(kw["item_bias"]).all()):
            assert np.isfinite(res.delta).all(), "a non-finite client leaked into the aggregate"
        assert (res.delta_bias is None) == (kw["item_bias"] is None)
        again = fn(V, cd, clients, **dict(kw, num_threads=1 if kw["num_threads"] != 1 else 2))
        assert np.array_equal(res.delta, again.delta, equal_nan=True), "result depends on num_threads"
        if data.draw(st.booleans()):
            lr = data.draw(st.one_of(st.sampled_from([1.0, 0.5]), reals))
            _check_in_place_step(V, cd, clients, kw, res, lr)
    elif kind == "client_updates":
        assert res.offsets.shape == (m + 1,) and res.offsets[0] == 0 and res.offsets[-1] == len(res.rows)
        assert res.values.shape == (len(res.rows), dim)
        assert len(res.rows) == 0 or (res.rows.min() >= 0 and res.rows.max() < num_items)
        if len(res.rows) and kw["item_bias"] is None:
            # The unfused path reduces to the fused round exactly, whatever the codec.
            delta, _, total = kernels.reduce_updates(
                res.rows, res.values, res.offsets, res.weights, num_items=num_items, noise=res.noise
            )
            fused = kernels.train_round(V, cd, clients, **kw)
            assert np.array_equal(delta, fused.delta, equal_nan=True)


@isolated
@fuzz(
    4,
    args=cohort_args(),
    kind=st.sampled_from(["reconstruct_users", "evaluate_users", "infer_users", "recommend_users"]),
    k=st.one_of(st.none(), st.integers(-1, 12), st.sampled_from([2**40, 1.5, "3", True])),
    relevance=st.one_of(st.none(), reals),
    exclude_seen=bools,
)
def test_fuzz_user_kernels(args, kind, k, relevance, exclude_seen):
    """reconstruct / evaluate / infer / recommend: shapes, counts and ranges, or a named error."""
    cd, V, clients, m, dim, kw = args
    fn = getattr(kernels, kind)
    extra = {}
    if kind == "evaluate_users":
        extra = dict(k=k, relevance_threshold=relevance)
    elif kind == "recommend_users":
        extra = dict(k=10 if k is None else k, exclude_seen=exclude_seen)
        if isinstance(k, int) and k > 10**6:
            return  # an (m, k) result of that size needs the memory it asks for: not a fuzz case
    with contract(*_KERNEL_NAMES) as c:
        res = fn(V, cd, clients, **kw, **extra)
    if not c.ok:
        return
    ids = np.arange(cd.num_clients) if clients is None else np.asarray(clients).reshape(-1).astype(np.int64)
    m = len(ids)
    num_items = np.shape(V)[0]
    if kind in ("reconstruct_users", "infer_users"):
        users, ub = res
        assert users.shape == (m, dim) and users.dtype == np.float32
        assert (ub is None) == (kw["item_bias"] is None)
    elif kind == "evaluate_users":
        sizes = np.diff(cd.indptr)[ids]
        assert res["num_examples"].shape == (m,) and (res["num_examples"] <= sizes).all()
        # A reconstruction that diverges (e.g. large V with the default lr) scores NaN: reported, not hidden.
        assert (res["num_correct"] <= res["num_examples"]).all() and not (res["sq_err_sum"] < 0).any()
        if k is not None:
            assert (res["hits"] <= np.minimum(k, res["num_relevant"])).all()
    else:
        top, scores = res
        assert top.shape == scores.shape == (m, extra["k"])
        assert ((top == -1) | ((top >= 0) & (top < num_items))).all()
        assert np.array_equal(top == -1, np.isnan(scores))
        for row in top:
            real = row[row >= 0]
            assert len(set(real.tolist())) == len(real), "an item recommended twice"


CSR_LIES = [
    None,
    None,
    "indptr-down",
    "indptr-neg",
    "indptr-big",
    "item-big",
    "item-neg",
    "dtype",
    "noncontig",
    "short",
    "num-items",
    "2-d",
    "nan-rating",
]


@st.composite
def hostile_csr(draw):
    """Duck-typed client data (the kernels accept any object with indptr/items/ratings) with at
    most one lie: wrong dtypes, decreasing indptr, items outside V, num_items beyond V's rows, a
    short or 2-D array. (A NaN rating is not a lie about the structure: its client does not
    report, as any client whose update is not finite.)"""
    n = draw(st.integers(0, 5))
    nnz = draw(st.integers(0, 12)) if n else 0
    indptr = np.sort(draw(hnp.arrays(np.int64, (n + 1,), elements=st.integers(0, nnz))))
    indptr[0], indptr[-1] = 0, nnz
    items = draw(hnp.arrays(np.int32, (nnz,), elements=st.integers(0, 5)))
    ratings = draw(hnp.arrays(np.float32, (nnz,), elements=st.floats(0, 5, width=32)))
    num_items = draw(st.sampled_from([6, 0, 3, -1]))
    lie = draw(st.sampled_from(CSR_LIES))
    if lie == "indptr-down" and n >= 2:
        indptr[1] = nnz + 5
    elif lie == "indptr-neg" and n >= 2:
        indptr[1] = -(10**12)
    elif lie == "indptr-big":
        indptr[-1] = 2**62
    elif lie == "item-big" and nnz:
        items[draw(st.integers(0, nnz - 1))] = 2**31 - 1
    elif lie == "item-neg" and nnz:
        items[draw(st.integers(0, nnz - 1))] = -7
    elif lie == "dtype":
        items = items.astype(np.int64)
    elif lie == "noncontig":
        ratings = np.repeat(ratings, 2)[::2]
    elif lie == "short" and nnz:
        ratings = ratings[:-1]
    elif lie == "num-items":
        num_items = draw(st.sampled_from([7, 10**9]))
    elif lie == "2-d":
        indptr = indptr[None, :]
    elif lie == "nan-rating" and nnz:
        ratings[draw(st.integers(0, nnz - 1))] = np.nan
    return SimpleNamespace(
        indptr=indptr, items=items, ratings=ratings, num_items=num_items, num_clients=max(np.shape(indptr)[-1] - 1, 0)
    )


@isolated
@fuzz(
    3,
    data=hostile_csr(),
    dim=st.integers(1, 3),
    kind=st.sampled_from(
        ["train_round", "client_updates", "evaluate_users", "recommend_users", "infer_users", "reconstruct_users"]
    ),
    clients=st.one_of(st.none(), st.lists(st.integers(0, 5), max_size=4), st.lists(st.integers(-1, 6), max_size=4)),
)
def test_fuzz_kernels_reject_inconsistent_csr(data, dim, kind, clients):
    """The kernels validate the CSR they are given: a CSR that lies about what the call reads is
    refused with a named error (never a crash, an out-of-bounds read or a result), and one that
    does not is accepted."""
    V = np.full((6, dim), 0.1, np.float32)
    extra = {"k": 3} if kind == "recommend_users" else {}
    with contract(*_KERNEL_NAMES) as c:
        getattr(kernels, kind)(V, data, clients, ff.ClientConfig(batch_size=2), **extra)
    lie = _csr_lie(data, clients, num_rows=len(V))
    if lie is not None:
        event(f"lie: {lie.split(':')[0]}")
        assert not c.ok, f"{kind} accepted a CSR that lies ({lie})"
    else:
        assert c.ok, f"{kind} refused a consistent CSR: {c.error!r}"


def _csr_lie(data, clients, num_rows: int) -> str | None:
    """What is wrong with ``data`` for a call on ``clients`` (None: nothing): the arrays' kinds
    and lengths, ``num_items`` against V's rows, the clients, and what each client read spans."""
    indptr, items, ratings = data.indptr, data.items, data.ratings
    for name, a, dtype in (("indptr", indptr, np.int64), ("items", items, np.int32), ("ratings", ratings, np.float32)):
        if a.dtype != dtype or a.ndim != 1 or not a.flags.c_contiguous:
            return f"{name}: {a.dtype} {a.shape}"
    if len(items) != len(ratings) or len(indptr) < 1 or indptr[0] != 0 or indptr[-1] != len(items):
        return "lengths: indptr does not run from 0 to len(items) == len(ratings)"
    if data.num_items > num_rows:
        return f"num_items: {data.num_items} > {num_rows} rows of V"
    n = len(indptr) - 1
    used = range(n) if clients is None else clients
    for c in used:
        if not 0 <= c < n:
            return f"clients: {c} outside [0, {n})"
        lo, hi = indptr[c], indptr[c + 1]
        if lo < 0 or hi < lo or hi > len(items):
            return f"indptr: client {c} spans [{lo}, {hi})"
        if ((items[lo:hi] < 0) | (items[lo:hi] >= num_rows)).any():
            return f"items: client {c} rates an item outside V"
    return None


@fuzz(
    2,
    rows=arrays(dtypes=INT_DTYPES + [np.float64], max_dims=2, max_side=6, odd=0.05),
    values=arrays(max_dims=3, max_side=5, odd=0.05),
    offsets=st.one_of(
        hnp.arrays(np.int64, st.integers(0, 5), elements=st.integers(-1, 7)), arrays(max_dims=2, max_side=4)
    ),
    weights=st.one_of(arrays(max_dims=1, max_side=5), st.none()),
    num_items=st.one_of(st.integers(-1, 8), st.sampled_from([2**31, 2**40, 1.5, None])),  # 2**31: too many
    bias=st.one_of(st.none(), arrays(max_dims=1, max_side=6)),
)
def test_fuzz_reduce_updates(rows, values, offsets, weights, num_items, bias):
    """reduce_updates: the weighted mean of sparse updates (scatter-add reference), or a named error."""
    with contract(*_KERNEL_NAMES) as c:
        delta, delta_bias, total = kernels.reduce_updates(
            rows, values, offsets, weights, num_items=num_items, bias_values=bias
        )
    if not c.ok:
        return
    w = np.asarray(weights, dtype=np.float64)
    off = np.asarray(offsets, dtype=np.int64)
    ref = np.zeros((num_items, np.shape(values)[1]))
    for i in range(len(off) - 1):
        np.add.at(
            ref,
            np.asarray(rows, dtype=np.int64)[off[i] : off[i + 1]],
            w[i] * _float32_or_none(values)[off[i] : off[i + 1]].astype(np.float64),
        )
    assert math.isclose(total, w.sum(), rel_tol=1e-12)
    if total > 0:
        assert np.allclose(delta, ref / total, rtol=1e-5, atol=1e-6)
    assert (delta_bias is None) == (bias is None)


# --------------------------------------------------------------------------------------------
# data: ClientData and its constructors, splits
# --------------------------------------------------------------------------------------------

_DATA_NAMES = (
    "indptr",
    "items",
    "ratings",
    "timestamps",
    "user_ids",
    "item_ids",
    "users",
    "clients",
    "max_examples",
    "min_examples",
    "shuffle_seed",
    "fractions",
    "num_clients",
    "seed",
    "data",
    "column",
    "df",
    "matrix",
    "user_col",
    "item_col",
    "rating_col",
    "timestamp_col",
)


@st.composite
def id_arrays(draw, n: int, *, lo=0, hi=20):
    dtypes = (
        [np.int64]
        + ([np.int32] if -(2**31) <= lo and hi < 2**31 else [])
        + ([np.uint16] if 0 <= lo and hi < 2**16 else [])
    )
    good = hnp.arrays(st.sampled_from(dtypes), (n,), elements=st.integers(lo, hi))
    return draw(
        mostly(
            good,
            st.one_of(
                arrays(shape=(n,), odd=0.3),
                arrays(max_dims=2, max_side=5),
                st.sampled_from([[1.5] * n, ["a"] * n, None, 3]),
                hnp.arrays(np.int64, (n,), elements=st.integers(-(2**63), 2**63 - 1)),
            ),
            0.15,
        )
    )


@fuzz(2, data=st.data(), n=st.integers(0, 8))
def test_fuzz_client_data_constructor(data, n):
    """ClientData(...) validates every field: an invariant-respecting object or a named error."""
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    nnz = int(indptr[-1])
    indptr = data.draw(
        mostly(
            st.just(indptr),
            st.one_of(id_arrays(n + 1, lo=-2, hi=nnz + 2), st.just(indptr[::-1].copy()), st.just(indptr[:0])),
        )
    )
    kw = dict(
        items=data.draw(id_arrays(nnz, hi=6)),
        ratings=data.draw(
            mostly(hnp.arrays(np.float64, (nnz,), elements=st.floats(0, 5)), arrays(shape=(nnz,), odd=0.3, special=0.5))
        ),
        timestamps=data.draw(
            st.one_of(
                st.none(),
                id_arrays(nnz, hi=2**40),
                hnp.arrays("M8[s]", (nnz,), elements=st.integers(0, 2**40).map(lambda s: np.datetime64(s, "s"))),
            )
        ),
        user_ids=data.draw(st.one_of(st.none(), id_arrays(n, hi=10))),
        item_ids=data.draw(st.one_of(st.none(), id_arrays(7, hi=30), id_arrays(3, hi=30))),
    )
    with contract(*_DATA_NAMES) as c:
        cd = ff.ClientData(indptr, **kw)
    if not c.ok:
        return
    assert cd.indptr.dtype == np.int64 and cd.items.dtype == np.int32 and cd.ratings.dtype == np.float32
    assert cd.num_clients == len(cd.indptr) - 1 and cd.nnz == len(cd.items) == len(cd.ratings)
    assert (np.diff(cd.indptr) >= 0).all() and np.isfinite(cd.ratings).all()
    assert cd.nnz == 0 or (cd.items.min() >= 0 and cd.items.max() < cd.num_items)
    assert len(np.unique(cd.user_ids)) == cd.num_clients and len(np.unique(cd.item_ids)) == cd.num_items
    with pytest.raises(ValueError):
        cd.ratings[:1] = 0  # read-only, even when empty ("assignment destination is read-only")
        if cd.nnz == 0:
            raise ValueError("empty")


@fuzz(2, data=st.data(), n=st.integers(0, 30), with_ts=st.booleans())
def test_fuzz_from_coo_and_prepare(data, n, with_ts):
    """from_coo groups every rating under its user; prepare/subset/splits keep the invariants."""
    users = data.draw(id_arrays(n, lo=-5, hi=6))
    items = data.draw(id_arrays(n, lo=-5, hi=9))
    ratings = data.draw(
        mostly(
            hnp.arrays(np.float32, (n,), elements=st.floats(-5, 5, width=32)), arrays(shape=(n,), odd=0.3, special=0.5)
        )
    )
    ts = data.draw(id_arrays(n, lo=0, hi=50)) if with_ts else None
    with contract(*_DATA_NAMES) as c:
        cd = ff.ClientData.from_coo(users, items, ratings, ts)
    if not c.ok:
        return
    # Every (user, item, rating) triple is kept, under the right user.
    u, i, r = cd.to_coo()

    def original(ids, labels):  # string ids come back through their labels
        return (ids if labels is None else labels[ids]).tolist()

    def given_ids(a):
        a = np.asarray(a)
        return a.tolist() if a.dtype.kind in "US" else a.astype(np.int64).tolist()

    got = sorted(zip(original(cd.user_ids[u], cd.user_labels), original(cd.item_ids[i], cd.item_labels), r.tolist()))
    want = sorted(zip(given_ids(users), given_ids(items), np.asarray(ratings, dtype=np.float32).tolist()))
    assert got == want
    kw = dict(
        max_examples=data.draw(st.one_of(st.none(), ints(-1, 10))),
        min_examples=data.draw(mostly(st.integers(0, 4), ints(-1, 10))),
        shuffle_seed=data.draw(st.one_of(st.none(), seeds)),
    )
    with contract(*_DATA_NAMES) as c:
        prepared = cd.prepare(**kw)
    if c.ok:
        sizes = prepared.sizes
        if kw["max_examples"] is not None:
            assert (sizes <= kw["max_examples"]).all()
        assert (sizes >= kw["min_examples"]).all()
    fractions = data.draw(
        mostly(
            st.just((0.8, 0.1, 0.1)),
            st.one_of(
                st.tuples(reals, reals, reals), st.sampled_from([(1.0,), (0.5, 0.5, 0.0, 0.0), "abc", None, (1, 0, 0)])
            ),
        )
    )
    with contract(*_DATA_NAMES) as c:
        parts = ff.split_users(cd.num_clients, fractions, seed=data.draw(seeds))
    if c.ok:
        assert sorted(np.concatenate(parts).tolist()) == list(range(cd.num_clients))
    with contract(*_DATA_NAMES) as c:
        parts = ff.split_by_time(cd, fractions)
    if c.ok:
        assert sum(p.nnz for p in parts) == cd.nnz
    chosen = data.draw(
        mostly(
            st.lists(st.integers(0, max(cd.num_clients - 1, 0)), max_size=4, unique=True)
            if cd.num_clients
            else st.just([]),
            st.one_of(
                st.lists(st.integers(-2, cd.num_clients + 2), max_size=4), arrays(max_dims=1, max_side=5, odd=0.3)
            ),
        )
    )
    with contract(*_DATA_NAMES) as c:
        sub = cd.subset(chosen)
    if c.ok and not (isinstance(chosen, np.ndarray) and chosen.dtype == bool):
        assert sub.num_clients == len(chosen)


_DF_COLUMNS = {
    "int": lambda n, d: d.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 5))),
    "float-int": lambda n, d: d.draw(hnp.arrays(np.float64, (n,), elements=st.integers(0, 5).map(float))),
    "float": lambda n, d: d.draw(hnp.arrays(np.float64, (n,), elements=st.floats(0, 5) | st.just(np.nan))),
    "str": lambda n, d: [str(x) for x in range(n)],
    "nullable": lambda n, d: "nullable",
    "datetime": lambda n, d: d.draw(
        hnp.arrays("M8[ns]", (n,), elements=st.integers(0, 2**50).map(lambda s: np.datetime64(s, "ns")))
    ),
    "tz": lambda n, d: "tz",
    "bool": lambda n, d: d.draw(hnp.arrays(np.bool_, (n,))),
    "object-mixed": lambda n, d: [1, "a", None, 2.5, b"x"][:n] + [1] * max(0, n - 5),
}


@fuzz(1, data=st.data(), n=st.integers(0, 8))
def test_fuzz_from_dataframe(data, n):
    """from_dataframe on columns of any dtype (nullable, datetime, tz-aware, strings, NaN)."""
    pd = pytest.importorskip("pandas")
    cols = {}
    for name, default in (("user_id", "int"), ("item_id", "int"), ("rating", "float"), ("timestamp", "int")):
        kind = data.draw(mostly(st.just(default), st.sampled_from(sorted(_DF_COLUMNS)), 0.3))
        value = _DF_COLUMNS[kind](n, data)
        if isinstance(value, str) and value == "nullable":
            value = pd.array(
                data.draw(st.lists(st.one_of(st.integers(0, 5), st.none()), min_size=n, max_size=n)), dtype="Int64"
            )
        elif isinstance(value, str) and value == "tz":
            value = pd.date_range("2000-01-01", periods=n, freq="h", tz="Europe/Paris")
        cols[name] = value
    if data.draw(st.booleans()) and n:
        del cols[data.draw(st.sampled_from(sorted(cols)))]
    df = pd.DataFrame(cols)
    with contract(*_DATA_NAMES, "user_id", "item_id", "rating", "timestamp", "not found") as c:
        cd = ff.ClientData.from_dataframe(df)
    if c.ok:
        assert cd.nnz == len(df)


@fuzz(
    1,
    data=st.data(),
    shape=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    fmt=st.sampled_from(["csr", "csc", "coo", "lil", "dok", "bsr"]),
    dtype=st.sampled_from([np.float64, np.float32, np.int8, np.bool_, np.complex64, np.uint64]),
)
def test_fuzz_from_scipy(data, shape, fmt, dtype):
    """from_scipy on every sparse format and dtype, with NaN/inf and explicit zeros."""
    sp = pytest.importorskip("scipy.sparse")
    dense = data.draw(
        hnp.arrays(
            np.float64,
            shape,
            elements=st.sampled_from([0.0, 0.0, 1.0, 4.5, -2.0]) | st.sampled_from([np.nan, np.inf])
            if _chance(data.draw, 0.2)
            else st.sampled_from([0.0, 0.0, 1.0, 4.5, -2.0]),
        )
    )
    with np.errstate(invalid="ignore"):
        m = sp.coo_matrix(dense.astype(dtype) if dtype != np.bool_ else dense != 0).asformat(fmt)
    with contract(*_DATA_NAMES) as c:
        cd = ff.ClientData.from_scipy(m)
    if c.ok:
        assert cd.num_clients == shape[0] and cd.num_items == shape[1]
        assert cd.nnz == int(np.count_nonzero(m.toarray()))


# --------------------------------------------------------------------------------------------
# MovieLens loaders and the CLI
# --------------------------------------------------------------------------------------------

_RATING_RE = re.compile(rb"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_UINT_RE = re.compile(rb"\d{1,18}")
_FORMATS = {"u.data": b"\t", "ratings.dat": b"::", "ratings.csv": b","}


def reference_parse(name: str, raw: bytes):
    """The documented loader rules, line by line: ``(users, items, ratings, timestamps)`` or
    ``(None, line number or None)`` for a file that must be rejected."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if name in _FORMATS:
        delim = _FORMATS[name]
    else:
        first = raw.split(b"\n", 1)[0]
        delim = next((d for d in (b"::", b"\t", b",") if d in first), None)
        if delim is None:
            return None, None
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    start = 0
    if delim == b"," and lines:
        head = lines[0].lstrip()
        if head and not head[:1].isdigit():
            names = [f.strip().lower() for f in lines[0].strip().decode("utf-8", "replace").split(",")]
            if names != ["userid", "movieid", "rating", "timestamp"]:
                return None, 1
            start = 1
    cols = ([], [], [], [])
    for number, line in enumerate(lines[start:], start=start + 1):
        line = line[:-1] if line.endswith(b"\r") else line
        if not line:
            continue
        fields = line.split(delim)
        if len(fields) != 4:
            return None, number
        u, i, r, t = fields
        if not all(_UINT_RE.fullmatch(f) for f in (u, i, t)):
            return None, number
        if len(r) > 32 or not _RATING_RE.fullmatch(r) or not math.isfinite(float(r)):
            return None, number
        for col, value in zip(cols, (int(u), int(i), float(r), int(t))):
            col.append(value)
    return cols, None


def reference_parse_ratings(name: str, raw: bytes):
    """What ``train --data`` reads (:func:`fedrecon_fast.load_ratings`): MovieLens file names
    by :func:`reference_parse`, other names by :func:`reference_parse_any`."""
    if name in _FORMATS:
        return reference_parse(name, raw)
    return reference_parse_any(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw)


def _split_blanks(line: bytes) -> list:
    return re.split(rb"[ \t]+", line.strip(b" \t"))


def reference_parse_any(raw: bytes):
    """The rules of fedrecon_fast.loaders for a file of another name (sniffed separator,
    header by the absence of numbers, column types from the first data line); string ids stay
    bytes, dates text."""
    lines = [(n, line[:-1] if line.endswith(b"\r") else line) for n, line in enumerate(raw.split(b"\n"), start=1)]
    sample = [(n, line) for n, line in lines if line.strip()][:50]
    if not sample:
        return None, None
    first = sample[0][1]
    if b"::" in first:
        sep = b"::"
    else:
        present = [c for c in (b"\t", b",", b";", b"|") if c in first]
        sep = next(
            (c for c in present if len({line.count(c) for _, line in sample}) == 1), present[0] if present else None
        )
        if sep is None:
            if len(first.split()) < 3:
                return None, None
    split = _split_blanks if sep is None else (lambda line: line.split(sep))
    head = [f.strip(b" ") for f in split(first)]
    if any(b'"' in line for _, line in sample):
        return None, None
    header = not any(_RATING_RE.fullmatch(f) for f in head)
    if header:  # named columns: decided by fedrecon_fast.columns, not modelled here
        return None, None
    if not 3 <= len(head) <= 4:
        return None, None
    kinds = (
        ["uint" if _UINT_RE.fullmatch(f.strip()) else "str" for f in head[:2]]
        + ["real"]
        + (["uint" if _UINT_RE.fullmatch(head[3].strip()) else "date"] if len(head) == 4 else [])
    )
    cols = ([], [], [], [])
    for number, line in lines:
        if not line.strip(b" \t" if sep is None else b" "):
            continue
        fields = [f.strip(b" ") for f in split(line)]  # spaces around fields do not count
        if len(fields) != len(head):
            return None, number
        for kind, f in zip(kinds, fields):
            if kind == "uint" and not _UINT_RE.fullmatch(f):
                return None, number
            if kind == "str" and (not 0 < len(f) <= 256 or b"\0" in f):
                return None, number
            if kind == "real" and (len(f) > 32 or not _RATING_RE.fullmatch(f) or not math.isfinite(float(f))):
                return None, number
            if kind == "date":
                try:
                    np.datetime64(f.decode("ascii"), "s")
                except (UnicodeDecodeError, ValueError):
                    return None, number
        for col, value in zip(cols, fields):
            col.append(value)
    return cols, None


_JUNK = [
    b"",
    b" ",
    b"x",
    b"nan",
    b"NaN",
    b"inf",
    b"-inf",
    b"-1",
    b"1e400",
    b"3.5.1",
    b"\x00",
    b"\xff\xfe",
    b"99999999999999999999",
    b"0x10",
    b"+1",
    b".5",
    b"5.",
    b"1e3",
    b"\xe2\x82\xac",
    b"\t",
    b"::",
    b",",
]


@st.composite
def ratings_files(draw, p: float = 1.0, max_lines: int = 12, users: int = 6):
    """A MovieLens-like ratings file: mostly well-formed lines, with corruptions (their rates
    scaled by ``p``)."""
    name = draw(st.sampled_from(["u.data", "ratings.dat", "ratings.csv", "ratings.csv", "other.txt", "r.tsv"]))
    delim = _FORMATS.get(name) or draw(st.sampled_from([b"::", b"\t", b","]))
    lines = []
    if delim == b"," and draw(st.booleans()):
        lines.append(
            draw(
                mostly(
                    st.just(b"userId,movieId,rating,timestamp"),
                    st.sampled_from(
                        [b"user,item,rating,ts", b"userId,movieId,rating", b"  UserId , MOVIEID,rating,timestamp "]
                    ),
                    0.3,
                )
            )
        )
    for _ in range(draw(st.integers(0, max_lines))):
        fields = [
            str(draw(st.integers(1, users))).encode(),
            str(draw(st.integers(1, 9))).encode(),
            draw(st.sampled_from([b"1", b"2", b"3", b"4", b"5", b"3.5", b"0.5"])),
            str(draw(st.integers(0, 2**31))).encode(),
        ]
        if _chance(draw, 0.12 * p):
            fields[draw(st.integers(0, 3))] = draw(st.sampled_from(_JUNK))
        if _chance(draw, 0.05 * p):
            fields = fields[: draw(st.integers(0, 3))]
        if _chance(draw, 0.05 * p):
            fields.append(b"7")
        line = delim.join(fields)
        if _chance(draw, 0.05 * p):
            line = draw(st.binary(max_size=12))
        if _chance(draw, 0.05):
            line = b""
        lines.append(line)
    eol = draw(mostly(st.just(b"\n"), st.just(b"\r\n"), 0.2))
    raw = eol.join(lines) + (eol if lines and draw(st.booleans()) else b"")
    if _chance(draw, 0.1):
        raw = b"\xef\xbb\xbf" + raw
    if raw and _chance(draw, 0.1 * p):
        raw = raw[: draw(st.integers(0, len(raw)))]
    if _chance(draw, 0.03 * p):
        raw = draw(st.binary(max_size=80))
    return name, raw


def _load(path):
    try:
        return load_movielens(path), None
    except (ValueError, OSError) as e:
        return None, e


def _reference_client_data(cols):
    """ClientData of the reference's accepted columns: uint and real fields as numbers, string
    ids as text, dates as seconds."""

    def ids(values):
        if all(_UINT_RE.fullmatch(v) for v in values):
            return np.array([int(v) for v in values], dtype=np.int64)
        return np.array([v.decode("utf-8", "replace") for v in values], dtype=str)

    users, items, ratings, times = cols
    ts = None
    if times:
        ts = np.array(
            [int(t) if _UINT_RE.fullmatch(t) else int(np.datetime64(t.decode(), "s").astype(np.int64)) for t in times],
            dtype=np.int64,
        )
    return ff.ClientData.from_coo(ids(users), ids(items), np.array([float(r) for r in ratings]), ts)


@fuzz(2, case=ratings_files(), sep=st.sampled_from([b"::", b"\t", b",", b";", b" ", b" , "]))
def test_fuzz_load_ratings(case, sep):
    """load_ratings on a file of another name agrees with its documented rules: the same ratings
    (string ids through their labels), or ValueError at the same line."""
    from fedrecon_fast.loaders import SwappedColumnsWarning, load_ratings

    _, raw = case
    for d in (b"::", b"\t", b","):  # re-separate the MovieLens-like lines
        raw = raw.replace(d, sep)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ratings.txt"
        path.write_bytes(raw)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SwappedColumnsWarning)
                data, error = load_ratings(path), None
        except (ValueError, OSError) as e:
            data, error = None, e
        expected, line = reference_parse_any(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw)
        if expected is None:
            if line is not None:
                assert error is not None, f"the loader accepted a file the rules reject (line {line})"
                assert f"line {line}" in str(error), (line, str(error))
            if error is not None:
                assert isinstance(error, ValueError) and str(path) in str(error) and "\n" not in str(error), error
            return
        assert error is None, f"the loader rejected a valid file: {error}"
        ref = _reference_client_data(expected)
        for field in ("indptr", "items", "ratings", "timestamps", "user_ids", "item_ids", "user_labels", "item_labels"):
            a, b = getattr(data, field), getattr(ref, field)
            assert (a is None and b is None) or np.array_equal(a, b), field


@fuzz(3, case=ratings_files())
def test_fuzz_load_movielens(case):
    """The loader agrees with the documented rules: the same ratings, or ValueError at the same line."""
    name, raw = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(raw)
        data, error = _load(path)
        expected, line = reference_parse(name, raw)
        if expected is None:
            assert error is not None, f"the loader accepted a file the rules reject (line {line})"
            assert isinstance(error, ValueError) and str(path) in str(error), error
            if line is not None:
                assert f"line {line}" in str(error), (line, str(error))
            assert "\n" not in str(error)
            return
        assert error is None, f"the loader rejected a valid file: {error}"
        ref = ff.ClientData.from_coo(
            *[np.asarray(c, dtype=np.float64 if k == 2 else np.int64) for k, c in enumerate(expected)]
        )
        for field in ("indptr", "items", "ratings", "timestamps", "user_ids", "item_ids"):
            assert np.array_equal(getattr(data, field), getattr(ref, field)), field
        # The folder form finds the same file.
        if name in _FORMATS:
            again, _ = _load(Path(tmp))
            assert again is not None and np.array_equal(again.ratings, data.ratings)


def _run_cli(argv):
    """main(argv) in-process: (exit status, stdout, stderr). argparse errors exit via SystemExit."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    detail = re.sub(r"[0-9]+", "N", re.sub(r"'[^']*'|/\S+", "X", err.getvalue().strip()))[:70]
    event(f"exit {code}: {detail}" if code else "exit 0")
    return code, out.getvalue(), err.getvalue()


def _one_line_error(code, err, *, where=None):
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err and "error" in lines[0]
    if where is not None:
        assert where in lines[0], (where, lines[0])


_BAD_TRAIN_OPTIONS = {
    ("--dim", "0"),
    ("--rounds", "-1"),
    ("--clients-per-round", "x"),
    ("--quantize-bits", "17"),
    ("--dp-clip", "-1"),
    ("--dp-clip", "nan"),
    ("--dp-noise", "1"),
    ("--preset", "nope"),
    ("--rank-k", "0"),
    ("--seed", "-3"),
    ("--bogus",),
}


_GOOD_TRAIN_OPTIONS = [
    ("--dim", "2"),
    ("--rounds", "0"),
    ("--rounds", "3"),
    ("--clients-per-round", "1"),
    ("--quantize-bits", "4", "--quantize-threshold", "0"),
    ("--sparse-updates",),
    ("--dp-clip", "0.5"),
    ("--dp-noise", "1", "--dp-clip", "1"),
    ("--preset", "fast"),
    ("--eval-every", "1"),
    ("--learn-user-default",),
    ("--threads", "2"),
    ("--hadamard",),
    ("--quantize-scaling", "row"),
    ("--rank-k", "1"),
]


@fuzz(
    2,
    case=mostly(ratings_files(p=0, max_lines=40, users=15), ratings_files(max_lines=40, users=15), 0.3),
    out=st.booleans(),
    save=st.booleans(),
    options=st.lists(
        mostly(st.sampled_from(_GOOD_TRAIN_OPTIONS), st.sampled_from(sorted(_BAD_TRAIN_OPTIONS)), 0.15), max_size=3
    ),
)
def test_fuzz_cli_train(case, out, save, options):
    """fedrecon-fast train --data FILE: exit 0 with its outputs, or exit 2 with one line naming
    the problem (file and line for bad ratings) and no --out/--save folder left behind."""
    name, raw = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(raw)
        out_dir, save_dir = Path(tmp) / "out", Path(tmp) / "model"
        argv = [
            "train",
            "--data",
            path,
            "--rounds",
            "1",
            "--clients-per-round",
            "3",
            "--dim",
            "3",
            "--no-progress",
            "--threads",
            "1",
            "--json",
        ] + [a for o in options for a in o]
        argv += (["--out", out_dir] if out else []) + (["--save", save_dir] if save else [])
        code, stdout, stderr = _run_cli(argv)
        if code == 0:
            result = json.loads(stdout.strip().splitlines()[-1])
            assert result["train_users"] >= 1
            assert not out or (out_dir / "metrics.json").is_file()
            assert not save or (save_dir / "manifest").is_file()
            return
        expected, line = reference_parse_ratings(name, raw)
        flat = [a for o in options for a in o]
        bad_option = any(tuple(o) in _BAD_TRAIN_OPTIONS for o in options) or (
            "--learn-user-default" in flat and "--dp-clip" in flat
        )  # a conflict, reported first
        if expected is None and line is not None and not bad_option:
            _one_line_error(code, stderr, where=f"{path}', line {line}")
        elif bad_option:
            _one_line_error(code, stderr, where="-")  # names the option (or its config field)
        else:
            _one_line_error(code, stderr)
        assert not out_dir.exists(), "a failed run left its --out folder behind"
        assert not save_dir.exists(), "a failed run left its --save folder behind"
        assert sorted(p.name for p in Path(tmp).iterdir()) == [name], "stray files after a failed run"


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_model") / "model"
    data = ff.synthetic_ratings(num_users=40, num_items=30, seed=1)
    trainer = ff.FedRecon(ff.preset("paper", dim=3, rounds=2, clients_per_round=5))
    trainer.fit(data)
    trainer.model.save(path)
    return path


@st.composite
def user_rating_files(draw):
    lines = []
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from([b"item,rating", b"# comment", b"", b"movie, stars"])))
    for _ in range(draw(st.integers(0, 6))):
        item = draw(mostly(st.integers(0, 30).map(lambda i: str(i).encode()), st.sampled_from(_JUNK)))
        rating = draw(mostly(st.sampled_from([b"1", b"4.5", b" 3 "]), st.sampled_from(_JUNK)))
        line = item + b"," + rating
        if _chance(draw, 0.05):
            line += b",9"
        if _chance(draw, 0.05):
            line = draw(st.binary(max_size=10))
        lines.append(line)
    raw = b"\n".join(lines)
    if _chance(draw, 0.05):
        raw = draw(st.binary(max_size=40))
    return raw


def reference_user_ratings(raw: bytes):
    """cli.read_user_ratings' documented rules: (ok, line of the first problem or None)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False, None
    first, count = True, 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = [f.strip() for f in stripped.split(",")]
        if first:
            first = False
            try:
                float(fields[0])
            except ValueError:
                continue
        if len(fields) != 2:
            return False, number
        try:
            int(fields[0])
            r = float(fields[1])
        except ValueError:
            return False, number
        if not math.isfinite(r):
            return False, number
        count += 1
    return count > 0, None


@fuzz(
    2,
    raw=user_rating_files(),
    k=st.sampled_from(["3", "1", "0", "x", "100000000000"]),
    flags=st.lists(st.sampled_from(["--include-seen", "--ignore-unknown", "--json"]), max_size=3, unique=True),
)
def test_fuzz_cli_recommend(saved_model_dir, raw, k, flags):
    """fedrecon-fast recommend --ratings FILE: exit 0 with k items, or exit 2 with one line
    naming the file (and the line of a malformed rating)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "user.csv"
        path.write_bytes(raw)
        code, stdout, stderr = _run_cli(["recommend", "--model", saved_model_dir, "--ratings", path, "--k", k] + flags)
        ok, line = reference_user_ratings(raw)
        if code == 0:
            assert ok, "the CLI accepted ratings the documented rules reject"
            return
        if k in ("0", "x"):
            _one_line_error(code, stderr, where="--k")
            return
        if not ok:
            _one_line_error(code, stderr, where=f"{path}:{line}" if line else str(path))
        else:  # valid lines, so the only other failure is item ids the model does not know
            assert "--ignore-unknown" not in flags
            _one_line_error(code, stderr, where=str(path))


# --------------------------------------------------------------------------------------------
# configuration, optimizers, synthetic data
# --------------------------------------------------------------------------------------------

_CLIENT_FIELDS = {
    "batch_size": st.integers(1, 9),
    "split": st.sampled_from(["batches", "random", "reuse"]),
    "support_fraction": st.floats(0, 1),
    "reshuffle": st.booleans(),
    "recon": st.sampled_from(["sgd", "exact"]),
    "init": st.sampled_from(["uniform", "zeros"]),
    "init_scale": st.floats(0, 1),
    "recon_epochs": st.integers(0, 3),
    "recon_steps_max": st.one_of(st.none(), st.integers(1, 5)),
    "recon_lr": st.floats(0, 1),
    "recon_l2": st.floats(0, 1),
    "ridge": st.floats(0.01, 10),
    "update_epochs": st.integers(0, 3),
    "update_steps_max": st.one_of(st.none(), st.integers(1, 5)),
    "client_lr": st.floats(0, 1),
    "update_l2": st.floats(0, 1),
    "joint": st.booleans(),
    "weighting": st.sampled_from(["examples", "uniform"]),
}
_RUN_FIELDS = {
    "dim": st.integers(1, 4),
    "rounds": st.integers(0, 3),
    "clients_per_round": st.integers(1, 5),
    "server_optimizer": st.sampled_from(["sgd", "momentum", "adam", "adagrad", "yogi"]),
    "server_lr": st.floats(0.01, 2),
    "biases": st.booleans(),
    "item_init_scale": st.floats(0, 1),
    "max_examples": st.one_of(st.none(), st.integers(1, 20)),
    "min_examples": st.integers(0, 3),
    "user_split": st.sampled_from([(0.8, 0.1, 0.1), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0)]),
    "eval_every": st.integers(0, 2),
    "seed": st.integers(0, 2**64),
    "num_threads": st.integers(0, 2),
    "quantize_bits": st.one_of(st.none(), st.integers(1, 16)),
    "quantize_threshold": st.integers(0, 50),
    "quantize_scaling": st.sampled_from(["tensor", "row"]),
    "hadamard": st.booleans(),
    "sparse_updates": st.booleans(),
    "learn_user_default": st.booleans(),
}
_WRONG = st.sampled_from(
    [
        None,
        -1,
        0,
        1.5,
        "x",
        True,
        float("nan"),
        float("inf"),
        [],
        {},
        (1, 2, 3),
        2**70,
        np.int64(3),
        np.float64(0.5),
        ("a", "b", "c"),
    ]
)


@st.composite
def config_kwargs(draw, fields):
    kw = {}
    for name, strategy in fields.items():
        if draw(st.booleans()):
            kw[name] = draw(mostly(strategy, _WRONG, 0.1))
    if _chance(draw, 0.05):
        kw["no_such_field"] = 1
    return kw


@fuzz(
    2,
    client_kw=config_kwargs(_CLIENT_FIELDS),
    run_kw=config_kwargs(_RUN_FIELDS),
    dp=st.one_of(st.none(), st.tuples(reals, reals)),
    preset_name=st.sampled_from([None, "paper", "fast", "nope", 3]),
)
def test_fuzz_configs(client_kw, run_kw, dp, preset_name):
    """ClientConfig / FedReconConfig / preset / replace / from_dict: a valid object that round-trips
    through to_dict, or a ValueError/TypeError naming the field."""
    names = (
        tuple(_CLIENT_FIELDS)
        + tuple(_RUN_FIELDS)
        + ("dp_clip", "dp_noise", "preset", "field", "client", "weighting", "unexpected keyword", "no_such_field")
    )
    with contract(*names) as c:
        client = ff.ClientConfig(**client_kw)
    if not c.ok:
        return
    kw = dict(run_kw)
    if dp is not None:
        kw["dp_clip"], kw["dp_noise"] = dp
    with contract(*names) as c:
        cfg = (
            ff.FedReconConfig(client=client, **kw) if preset_name is None else ff.preset(preset_name, **kw, **client_kw)
        )
    if not c.ok:
        return
    again = ff.FedReconConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    native = client_config(cfg.client)
    assert native.batch_size == cfg.client.batch_size


@fuzz(
    1,
    data=st.data(),
    name=mostly(
        st.sampled_from(["sgd", "momentum", "adam", "adagrad", "yogi"]), st.sampled_from(["SGD", "", None, 1, "adamw"])
    ),
)
def test_fuzz_optimizers(data, name):
    """make_optimizer + init/apply: params move by a finite step, or a named error and no change."""
    from fedrecon_fast.optimizers import make_optimizer

    hyper = {
        k: data.draw(mostly(st.floats(0.01, 0.99), _WRONG, 0.15))
        for k in data.draw(
            st.lists(
                st.sampled_from(
                    ["lr", "momentum", "beta1", "beta2", "epsilon", "initial_accumulator", "nesterov", "bogus"]
                ),
                max_size=3,
                unique=True,
            )
        )
    }
    with contract(
        "name",
        "optimizer",
        "lr",
        "momentum",
        "beta1",
        "beta2",
        "epsilon",
        "initial_accumulator",
        "nesterov",
        "bogus",
        "hyperparameter",
    ) as c:
        opt = make_optimizer(name, **hyper)
    if not c.ok:
        return
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4))
    params = {"item_factors": np.zeros(shape, np.float32)}
    state = opt.init(params)
    update = {"item_factors": data.draw(arrays(shape=shape, odd=0.05, special=0.2))}
    if _chance(data.draw, 0.2):
        update = data.draw(
            st.sampled_from(
                [
                    {},
                    {"item_factors": np.zeros((9, 9), np.float32)},
                    {"item_factors": np.zeros(shape, np.float32), "x": np.zeros(1)},
                    {"item_factors": "x"},
                ]
            )
        )
    before = params["item_factors"].copy()
    with contract(
        "update",
        "item_factors",
        "params",
        "state",
        "shape",
        "key",
        "NaN",
        "float32",
        allowed=ALLOWED + (FloatingPointError,),
    ) as c:  # a diverging step: documented
        opt.apply(params, update, state)
    if c.ok:
        assert np.isfinite(params["item_factors"]).all()
    elif not isinstance(c.error, FloatingPointError):
        assert np.array_equal(params["item_factors"], before), "a rejected update changed the parameters"


@fuzz(
    1,
    num_users=mostly(st.integers(0, 30), ints(-2, 10**12)),
    num_items=mostly(st.integers(1, 30), ints(-2, 10**12)),
    rank=mostly(st.integers(1, 5), ints()),
    mean_ratings=mostly(st.floats(1, 40), reals),
    min_ratings=mostly(st.integers(1, 5), ints()),
    noise=mostly(st.floats(0, 2), reals),
    seed=seeds,
)
def test_fuzz_synthetic_ratings(num_users, num_items, rank, mean_ratings, min_ratings, noise, seed):
    """synthetic_ratings: a ClientData with the asked shape and ratings in 1..5, or a named error."""
    with contract(
        "num_users", "num_items", "rank", "mean_ratings", "min_ratings", "noise", "seed", memory_ok=True
    ) as c:
        if (
            isinstance(num_users, int)
            and isinstance(num_items, int)
            and num_users * max(num_items, 1) > 10**6
            and num_users > 0
            and num_items > 0
            and isinstance(min_ratings, int)
            and 1 <= min_ratings
        ):
            return  # a legitimately huge request: not a fuzz case
        data = ff.synthetic_ratings(
            num_users, num_items, rank=rank, mean_ratings=mean_ratings, min_ratings=min_ratings, noise=noise, seed=seed
        )
    if c.ok:
        assert data.num_clients == num_users and data.num_items == num_items
        assert data.nnz == 0 or (data.ratings.min() >= 1 and data.ratings.max() <= 5)


# --------------------------------------------------------------------------------------------
# inference, the functional API and training
# --------------------------------------------------------------------------------------------


@st.composite
def global_models(draw):
    n = draw(st.integers(0, 8))
    dim = draw(st.integers(1, 3))
    V = draw(
        mostly(hnp.arrays(np.float32, (n, dim), elements=st.floats(-1, 1, width=32)), arrays(max_dims=3, max_side=4))
    )
    ids = draw(
        mostly(
            st.just(np.arange(n) * 7 + 1),
            st.one_of(
                hnp.arrays(np.int64, (n,), elements=st.integers(-5, 5), unique=True),
                id_arrays(n, hi=3),
                st.just(np.arange(n)[::-1].copy()),
            ),
        )
    )
    bias = draw(st.one_of(st.none(), hnp.arrays(np.float32, (n,), elements=st.floats(-1, 1, width=32))))
    mean = draw(mostly(st.floats(0, 5), reals))
    default = draw(st.one_of(st.none(), st.none(), hnp.arrays(np.float32, (dim,), elements=st.floats(-1, 1, width=32))))
    return V, bias, mean, ids, default


@fuzz(
    2,
    parts=global_models(),
    data=st.data(),
    ignore_unknown=bools,
    k=mostly(st.integers(1, 12), ints(-2, 10**6)),
    exclude_seen=bools,
    seed=st.one_of(st.none(), seeds),
)
def test_fuzz_inference(parts, data, ignore_unknown, k, exclude_seen, seed):
    """GlobalModel + reconstruct / predict / recommend for one user (dict or arrays) or many
    (ClientData): shapes, known ids, NaN only for unknown items, or a named error."""
    V, bias, mean, ids, default = parts
    with contract("item_factors", "item_bias", "global_mean", "item_ids", "user_default", "dim") as c:
        model = ff.GlobalModel(V, bias, mean, ids, None, default)
    if not c.ok:
        return
    known = model.item_ids.tolist()
    n_ratings = data.draw(st.integers(0, 6))
    items = data.draw(
        mostly(
            st.lists(st.sampled_from(known), min_size=n_ratings, max_size=n_ratings) if known else st.just([]),
            st.one_of(
                st.lists(st.integers(-3, 100), max_size=6),
                arrays(max_dims=2, max_side=4),
                st.sampled_from([[2**64 - 1], [1.5], "ab", None]),
            ),
        )
    )
    ratings = data.draw(
        mostly(
            st.lists(st.floats(1, 5), min_size=np.size(items), max_size=np.size(items)),
            st.one_of(arrays(max_dims=1, max_side=6, special=0.5), st.sampled_from([[np.nan], [1e300], ["x"], None])),
        )
    )
    form = data.draw(st.sampled_from(["arrays", "dict", "clientdata"]))
    names = (
        "data",
        "items",
        "ratings",
        "ignore_unknown",
        "k",
        "exclude_seen",
        "seed",
        "item ids",
        "users",
        "user_bias",
        "config",
        "num_threads",
    )
    arg, rest = items, (ratings,)
    if form == "dict":
        try:
            arg, rest = dict(zip(items, ratings)), ()
        except TypeError:  # not iterable, or unhashable ids: not a dict
            pass
    elif form == "clientdata":
        with contract(*_DATA_NAMES) as c:
            arg, rest = ff.ClientData.from_coo([0] * np.size(items), items, ratings), ()
        if not c.ok:
            return
    with contract(*names) as c:
        users, ub = model.reconstruct(arg, *rest, ignore_unknown=ignore_unknown, seed=seed)
        top, scores = model.recommend(
            arg, *rest, k=k, exclude_seen=exclude_seen, ignore_unknown=ignore_unknown, seed=seed
        )
    if not c.ok:
        return
    single = not isinstance(arg, ff.ClientData)
    assert users.shape == ((model.dim,) if single else (arg.num_clients, model.dim))
    if single:
        assert top.shape == scores.shape == (min(k, max(model.num_items, 1)),)  # k capped at the catalogue
        real = top[~np.isnan(scores)]
        assert set(real.tolist()) <= set(known)
        pred = model.predict(users, known, ub, ignore_unknown=False) if known else None
        if pred is not None:
            assert pred.shape == (len(known),)


@fuzz(
    2,
    cd=client_datas(max_clients=5),
    data=st.data(),
    use_tuple=st.booleans(),
    sparse=st.booleans(),
    bits=st.one_of(st.none(), st.integers(1, 16)),
)
def test_fuzz_functional_client_and_server_step(cd, data, use_tuple, sparse, bits):
    """client_step / client_evaluate on random clients (ids, tuples, out-of-range items), and
    server_step on their results and on tampered ones."""
    from fedrecon_fast.functional import client_evaluate

    cfg = ff.preset(
        "paper", dim=2, rounds=1, clients_per_round=2, sparse_updates=sparse, quantize_bits=bits, quantize_threshold=0
    )
    state = ff.server_init(cfg, data=cd)
    client = data.draw(mostly(st.integers(0, max(cd.num_clients - 1, 0)), ints(-2, 2**40)))
    client_id = data.draw(st.one_of(st.none(), mostly(st.integers(0, 50), ints(-2, 2**70))))
    if use_tuple:
        items = data.draw(
            mostly(
                st.lists(st.integers(0, cd.num_items - 1), max_size=6),
                st.lists(st.integers(-2, cd.num_items + 2), max_size=6),
            )
        )
        ratings = data.draw(
            mostly(
                st.lists(st.floats(1, 5), min_size=len(items), max_size=len(items)),
                arrays(max_dims=1, max_side=6, special=0.5),
            )
        )
        arg, kw = (np.asarray(items), ratings), {"client_id": client_id}
    else:
        arg, kw = cd, {"client": client, "client_id": client_id}
    names = ("client", "client_id", "items", "ratings", "data", "seed", "round")
    with contract(*names) as c:
        result = ff.client_step(state.model, arg, cfg, round=0, **kw)
        metrics = client_evaluate(state.model, arg, cfg, **kw)
    if not c.ok:
        return
    assert result.weight >= 0 and metrics["num_examples"] >= 0
    tamper = data.draw(st.sampled_from(["none", "none", "weight", "shape", "type", "empty"]))
    results = [result]
    if tamper == "weight":
        results = [ff.ClientResult(result.update, data.draw(reals), result.metrics)]
    elif tamper == "shape":
        u = result.update
        results = [
            ff.ClientResult(
                ff.ClientUpdate(u.rows, np.zeros((len(u.rows), 5), np.float32), u.bias_values, u.num_rows),
                result.weight,
                result.metrics,
            )
        ]
    elif tamper == "type":
        results = [result.update]
    elif tamper == "empty":
        results = []
    with contract("results", "weight", "state", allowed=ALLOWED + (FloatingPointError,)) as c:
        new = ff.server_step(state, results)
    if c.ok:
        assert new.round == 1 and np.isfinite(new.model.item_factors).all()


@fuzz(
    2,
    cd=client_datas(max_clients=7),
    client_kw=config_kwargs(_CLIENT_FIELDS),
    run_kw=config_kwargs(_RUN_FIELDS),
    split=st.booleans(),
)
def test_fuzz_training(cd, client_kw, run_kw, split):
    """FedRecon.fit + evaluate on small random data and configurations: a finite model and sane
    metrics, a named error, or the documented FloatingPointError when training diverges."""
    names = (
        tuple(_CLIENT_FIELDS)
        + tuple(_RUN_FIELDS)
        + ("train", "val", "data", "clients", "no_such_field", "client", "learn_user_default", "unexpected keyword")
    )
    run_kw = {k: v for k, v in run_kw.items() if k not in ("rounds",)}
    with contract(*names) as c:
        cfg = ff.FedReconConfig(client=ff.ClientConfig(**client_kw), rounds=2, **run_kw)
    if not c.ok:
        return
    trainer = ff.FedRecon(cfg)
    with contract(*names, allowed=ALLOWED + (FloatingPointError,)) as c:
        data = cd.prepare(max_examples=cfg.max_examples, min_examples=cfg.min_examples, shuffle_seed=cfg.seed % 2**63)
        every_other = np.arange(data.num_clients) % 2 == 0
        train, val = (data.subset(every_other), data.subset(~every_other)) if split else (data, None)
        trainer.fit(train, val)
        metrics = trainer.evaluate(data, k=3)
    if c.ok:
        assert np.isfinite(trainer.model.item_factors).all()
        assert metrics["ratings"] >= 0
