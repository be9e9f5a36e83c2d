"""Quantization and wire format (fedrecon_fast.compression) against the NumPy reference."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import reference_compression as ref
from fedrecon_fast import compression as C

SHAPES = [(0,), (1,), (7,), (3, 50), (1000,), (4, 33), (2, 0), (), (2, 3, 5)]
SCHEMES = [("tensor", False), ("row", False), ("tensor", True), ("row", True)]


def heavy(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32)


def patch_crc(buf: bytes) -> bytes:
    """Recompute the trailing CRC after an edit (to reach the checks behind it)."""
    return buf[:-4] + struct.pack("<I", zlib.crc32(buf[:-4]))


# --------------------------------------------------------------------------------------------
# round trips, error bounds, reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_matches_reference(bits, shape):
    x = heavy(shape, seed=bits)
    for scaling, hadamard in SCHEMES:
        kw = dict(scaling=scaling, hadamard=hadamard)
        # Execute
        buf = C.encode(x, bits, seed=11, **kw)
        y = C.decode(buf)
        # Assert: the bytes (header, scales, packed indices, CRC) are the reference's, bit for bit
        assert buf == ref.encode(x, bits, key=ref.quant_key(11), **kw)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert_array_equal(y, ref.decode(buf))
        assert_array_equal(y, C.quantize(x, bits, seed=11, **kw))
        assert len(buf) == C.encoded_size(x.shape, bits, **kw)
        assert zlib.crc32(buf[:-4]) == struct.unpack("<I", buf[-4:])[0]
        if x.size == 0:
            continue
        rows, cols = ref.rows_cols(x.shape)
        step = ref.steps(buf)[:, None]
        err = np.abs(y.astype(np.float64) - x).reshape(rows, cols)
        if not hadamard:
            # |q(x) - x| <= step per element (+ the float32 rounding of the decoded value)
            assert np.all(err <= step + np.spacing(np.abs(x)).reshape(rows, cols))
        else:
            # the rotation is orthonormal: the row's L2 error is at most step * sqrt(padded)
            padded = ref.next_pow2(cols)
            bound = step[:, 0] * np.sqrt(padded) * (1 + 1e-5) + 1e-5 * np.abs(x).reshape(rows, cols).max()
            assert np.all(np.sqrt((err**2).sum(axis=1)) <= bound)


def test_constant_and_length_one_arrays_are_exact():
    for x in (np.full((3, 7), 2.5, np.float32), np.array([-4.25], np.float32), np.float32(7.0)):
        for bits in (1, 8, 16):
            assert_array_equal(C.decode(C.encode(x, bits)), x)
            assert_array_equal(C.quantize(x, bits, scaling="row"), x)


def test_values_on_the_grid_are_exact():
    # Values already at quantization levels decode exactly, whatever the noise.
    x = np.array([0.0, 1.0, 2.0, 3.0, 1.0, 0.0], np.float32)
    for seed in range(5):
        assert_array_equal(C.quantize(x, 2, seed=seed), x)


def test_input_dtypes_are_converted_once():
    x = np.arange(-20, 20).reshape(4, 10)
    expected = C.encode(x.astype(np.float32), 6, seed=3)
    for arr in (x, x.astype(np.float64), x.astype(np.int8), x.tolist(), np.asfortranarray(x.astype(np.float32))):
        assert C.encode(arr, 6, seed=3) == expected


def test_stochastic_rounding_is_unbiased():
    # Prepare: 4000 rows holding the same 64 values; with row scaling every row has its own
    # noise stream (and, rotated, its own signs), so the column means estimate E[q(x)].
    rng = np.random.default_rng(5)
    x = rng.uniform(-1.0, 2.0, size=64).astype(np.float32)
    x[:2] = [-1.0, 2.0]
    n = 4000
    X = np.tile(x, (n, 1))
    for hadamard in (False, True):
        # Execute
        buf = C.encode(X, 2, scaling="row", hadamard=hadamard, seed=9)
        Q = C.decode(buf).astype(np.float64)
        # Assert: an error has standard deviation <= step / 2 (for a rotated row too: the
        # rotation is orthonormal and the errors of its coordinates are independent), so each
        # column mean lies within 5 standard errors of x: |mean - x| <= 5 * (step / 2) / sqrt(n)
        # (0.040 for step 1 without rotation).
        tol = 5 * (ref.steps(buf).max() / 2) / np.sqrt(n)
        assert np.abs(Q.mean(axis=0) - x).max() <= tol
        # and the rounding is random, not to the nearest level: columns hold two levels.
        assert np.mean(Q.min(axis=0) != Q.max(axis=0)) > 0.9


def test_hadamard_round_trip_is_exact_when_rotated_values_are_constant():
    # c * e_0 rotates to a constant row (first Hadamard column is all ones): step 0, so the
    # only error left is the float32 rounding of the forward and inverse transforms.
    for cols in (1, 2, 7, 50, 1000):
        x = np.zeros((3, cols), np.float32)
        x[:, 0] = [1.5, -3.0, 1e-3]
        y = C.decode(C.encode(x, 4, scaling="row", hadamard=True, seed=2))
        assert_allclose(y, x, rtol=1e-6, atol=1e-6 * np.abs(x).max())


def test_reference_hadamard_inverse_is_exact():
    rng = np.random.default_rng(0)
    for n in (1, 2, 8, 64, 1024):
        row = rng.normal(size=n).astype(np.float32)
        back = ref.unrotate(ref.rotate(row, key=7, r=3), key=7, r=3)
        assert_allclose(back, row, rtol=0, atol=2e-6 * np.abs(row).max())
        # orthonormal: the norm is kept
        assert_allclose(np.linalg.norm(ref.rotate(row, 7, 3)), np.linalg.norm(row), rtol=1e-5)


def test_rotation_lowers_error_on_heavy_tailed_data():
    x = np.random.default_rng(0).standard_t(2, size=(64, 1000)).astype(np.float32)
    for scaling in ("tensor", "row"):
        plain = np.mean((C.quantize(x, 4, scaling=scaling, seed=1) - x) ** 2)
        rotated = np.mean((C.quantize(x, 4, scaling=scaling, hadamard=True, seed=1) - x) ** 2)
        # measured: 0.011x (tensor), 0.044x (row)
        assert rotated < 0.25 * plain


# --------------------------------------------------------------------------------------------
# determinism, sizes
# --------------------------------------------------------------------------------------------


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 257)).astype(np.float32)
    long = rng.normal(size=70_001).astype(np.float32)
    rows = rng.integers(0, 500, size=400)
    vals = rng.normal(size=(400, 33)).astype(np.float32)
    for scaling, hadamard in SCHEMES:
        kw = dict(scaling=scaling, hadamard=hadamard, seed=4)
        bufs = {t: C.encode(x, 5, num_threads=t, **kw) for t in (1, 2, 4)}
        assert bufs[1] == bufs[2] == bufs[4]
        assert C.encode(long, 3, num_threads=1, **kw) == C.encode(long, 3, num_threads=4, **kw)
        q = [C.quantize(x, 5, num_threads=t, **kw) for t in (1, 2, 4)]
        assert_array_equal(q[0], q[1])
        assert_array_equal(q[0], q[2])
        d = [C.decode(bufs[1], num_threads=t) for t in (1, 2, 4)]
        assert_array_equal(d[0], d[1])
        assert_array_equal(d[0], d[2])
        sparse = [C.encode_sparse(rows, vals, 7, num_rows=500, num_threads=t, **kw) for t in (1, 2, 4)]
        assert sparse[0] == sparse[1] == sparse[2]
        accs = []
        for t in (1, 2, 4):
            out = np.zeros((500, 33))
            C.decode_accumulate_batch(sparse + [sparse[0]], [0.5, 1.0, 2.0, -1.0], out, num_threads=t)
            accs.append(out)
        assert_array_equal(accs[0], accs[1])
        assert_array_equal(accs[0], accs[2])


@pytest.mark.parametrize("shape", [(0,), (1,), (5,), (3, 50), (2, 0), (), (4, 3, 9), (185_000,)], ids=str)
def test_encoded_size_is_exact(shape):
    x = heavy(shape)
    for bits in (1, 3, 8, 13, 16):
        for scaling, hadamard in SCHEMES:
            kw = dict(scaling=scaling, hadamard=hadamard)
            assert C.encoded_size(shape, bits, **kw) == len(C.encode(x, bits, **kw))
    for n in (0, 1, 17):
        rows = np.arange(n) % 40
        vals = heavy((n, 19))
        for scaling, hadamard in SCHEMES:
            kw = dict(scaling=scaling, hadamard=hadamard)
            assert C.encoded_size((40, 19), 6, sparse_rows=n, **kw) == len(
                C.encode_sparse(rows, vals, 6, num_rows=40, **kw)
            )


def test_eight_bits_is_four_times_smaller_than_float32():
    x = heavy((185_000,))
    buf = C.encode(x, 8)
    # 20-byte fixed header + 8 (shape) + 8 (lo, step) + 185,000 payload + 4 (CRC)
    assert len(buf) == 185_040
    assert x.nbytes / len(buf) == pytest.approx(740_000 / 185_040)  # 3.99914
    assert x.nbytes / len(buf) > 3.999
    assert len(C.encode(x, 16)) == 2 * 185_000 + 40
    assert len(C.encode(x, 4)) == 185_000 // 2 + 40
    assert len(C.encode(x, 1)) == 185_000 // 8 + 40


def test_crc_matches_zlib_on_multi_chunk_buffers():
    # > 1 MiB, so the CRC is computed in parallel chunks and combined.
    x = heavy((3_000_000,))
    buf = C.encode(x, 8, num_threads=2)
    assert zlib.crc32(buf[:-4]) == struct.unpack("<I", buf[-4:])[0]
    assert C.buffer_info(buf)["nbytes"] == len(buf)


def test_buffer_info_describes_the_buffer():
    buf = C.encode_sparse([3, 1], np.ones((2, 5)), 5, num_rows=10, scaling="row", hadamard=True, seed=1)
    info = C.buffer_info(buf)
    assert info == dict(
        version=C.FORMAT_VERSION,
        dtype="float32",
        bits=5,
        scaling="row",
        hadamard=True,
        sparse=True,
        shape=(2, 5),
        num_rows=10,
        key=ref.quant_key(1),
        num_groups=2,
        padded_cols=8,
        payload_bytes=10,
        nbytes=len(buf),
    )


def test_seed_round_and_client_select_the_stream():
    x = heavy((4, 30))
    keys = {
        (s, r, c): C.buffer_info(C.encode(x, 3, seed=s, round=r, client=c))["key"]
        for s, r, c in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (7, 3, 5)]
    }
    assert keys == {k: ref.quant_key(*k) for k in keys}
    assert len(set(keys.values())) == len(keys)
    assert not np.array_equal(C.quantize(x, 3, seed=1), C.quantize(x, 3, seed=2))
    assert_array_equal(C.quantize(x, 3, seed=7, round=3, client=5), ref.quantize(x, 3, key=ref.quant_key(7, 3, 5)))


# --------------------------------------------------------------------------------------------
# corrupted buffers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_buffers():
    x = heavy((3, 50))
    return [
        C.encode(x, 5, scaling="row", hadamard=True, seed=3),
        C.encode_sparse([4, 0, 2], heavy((3, 6)), 7, num_rows=5, seed=3),
    ]


def test_every_truncation_is_rejected(good_buffers):
    for buf in good_buffers:
        decoder = C.decode_sparse if C.buffer_info(buf)["sparse"] else C.decode
        for cut in range(len(buf)):
            with pytest.raises(ValueError, match="truncated|too short|does not match"):
                decoder(buf[:cut])
        with pytest.raises(ValueError, match="does not match"):
            C.buffer_info(buf + b"\x00")


def test_every_flipped_byte_is_rejected(good_buffers):
    # Header, shape, row ids, scales, payload and CRC: every single-byte change is caught.
    for buf in good_buffers:
        for pos in range(len(buf)):
            bad = bytearray(buf)
            bad[pos] ^= 0x5A
            with pytest.raises(
                ValueError,
                match="magic|version|dtype|bits|flags|ndim|reserved|shape|num_rows|does not match|truncated|CRC",
            ):
                C.buffer_info(bytes(bad))
        bad = bytearray(buf)
        bad[-1] ^= 1
        with pytest.raises(ValueError, match="CRC-32 mismatch"):
            C.decode_accumulate(bytes(bad), 1.0, np.zeros((5, 6)))


def test_invalid_fields_are_named_even_with_a_valid_crc(good_buffers):
    dense, sparse = good_buffers
    cases = [
        (b"XXXX" + dense[4:], "bad magic"),
        (patch_crc(dense[:4] + struct.pack("<H", 2) + dense[6:]), "unsupported format version 2"),
        (patch_crc(dense[:4] + struct.pack("<H", 0) + dense[6:]), "unsupported format version 0"),
        (patch_crc(dense[:6] + b"\x02" + dense[7:]), "dtype"),
        (patch_crc(dense[:7] + b"\x00" + dense[8:]), "bits 0"),
        (patch_crc(dense[:7] + b"\x11" + dense[8:]), "bits 17"),
        (patch_crc(dense[:8] + b"\x0b" + dense[9:]), "flags"),
        (patch_crc(dense[:9] + b"\x09" + dense[10:]), "ndim 9"),
        (patch_crc(dense[:10] + b"\x01" + dense[11:]), "reserved"),
        (patch_crc(dense[:20] + struct.pack("<Q", 2**62) + dense[28:]), "shape entry 0"),
        (patch_crc(dense[:20] + struct.pack("<Q", 2**40) + dense[28:]), "does not match"),
        (dense[:-4] + b"\x00\x00\x00\x00", "CRC"),
        (b"", "too short"),
        (b"FRQW" + b"\x01\x00", "truncated"),
    ]
    p = ref.parse(sparse)
    off_rows = 20 + 16 + 8
    cases += [
        (patch_crc(sparse[:off_rows] + struct.pack("<I", 5) + sparse[off_rows + 4 :]), "row id 5"),
        (patch_crc(sparse[:36] + struct.pack("<Q", 2**31 + 1) + sparse[44:]), "num_rows"),
    ]
    off_scales = off_rows + 4 * len(p["rows"])
    cases += [
        (
            patch_crc(sparse[:off_scales] + struct.pack("<f", np.inf) + sparse[off_scales + 4 :]),
            "invalid scale of group 0",
        ),
        (
            patch_crc(sparse[: off_scales + 4] + struct.pack("<f", -1.0) + sparse[off_scales + 8 :]),
            "invalid scale of group 0",
        ),
    ]
    for buf, message in cases:
        with pytest.raises(ValueError, match=message):
            C.buffer_info(buf)
        with pytest.raises(ValueError, match=message):
            C.decode(buf)


def test_decode_refuses_the_other_kind(good_buffers):
    dense, sparse = good_buffers
    with pytest.raises(ValueError, match="decode_sparse"):
        C.decode(sparse)
    with pytest.raises(ValueError, match="use decode"):
        C.decode_sparse(dense)


# --------------------------------------------------------------------------------------------
# fused decode -> accumulate
# --------------------------------------------------------------------------------------------


def test_decode_accumulate_dense_equals_weighted_decode():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 70)).astype(np.float32)
    for scaling, hadamard in SCHEMES:
        buf = C.encode(x, 6, scaling=scaling, hadamard=hadamard, seed=8)
        out = rng.normal(size=x.shape)
        expected = out + 0.37 * C.decode(buf).astype(np.float64)
        assert C.decode_accumulate(buf, 0.37, out) is out
        assert_allclose(out, expected, rtol=1e-15, atol=1e-15)


def test_decode_accumulate_batch_equals_sequential_calls():
    rng = np.random.default_rng(4)
    x = [rng.normal(size=(30, 20)).astype(np.float32) for _ in range(5)]
    bufs = [C.encode(v, 4 + k, scaling=SCHEMES[k % 4][0], hadamard=SCHEMES[k % 4][1], seed=k) for k, v in enumerate(x)]
    w = rng.uniform(0.1, 2.0, size=5)
    batch = np.zeros((30, 20))
    C.decode_accumulate_batch(bufs, w, batch)
    one_by_one = np.zeros((30, 20))
    for b, wk in zip(bufs, w):
        C.decode_accumulate(b, wk, one_by_one)
    assert_array_equal(batch, one_by_one)  # same per-element order of additions
    expected = sum(wk * C.decode(b).astype(np.float64) for b, wk in zip(bufs, w))
    assert_allclose(batch, expected, rtol=1e-14, atol=1e-14)


def test_decode_accumulate_sparse_adds_into_rows():
    rng = np.random.default_rng(6)
    out = rng.normal(size=(50, 9))
    expected = out.copy()
    bufs, weights = [], [0.5, 2.0, 1.0]
    for k, w in enumerate(weights):
        rows = rng.integers(0, 50, size=20)  # with repeats
        hadamard = k == 1
        buf = C.encode_sparse(rows, rng.normal(size=(20, 9)), 8, num_rows=50, hadamard=hadamard, seed=k)
        r, v = C.decode_sparse(buf)
        np.add.at(expected, r, w * v.astype(np.float64))
        bufs.append(buf)
    C.decode_accumulate_batch(bufs, weights, out)
    assert_allclose(out, expected, rtol=1e-14, atol=1e-14)


def test_quantize_accumulate_equals_weighted_quantize():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(33, 70)).astype(np.float32)
    for scaling, hadamard in SCHEMES:
        kw = dict(scaling=scaling, hadamard=hadamard, seed=6)
        results = []
        for t in (1, 2, 4):
            out = np.ones(x.shape)
            assert C.quantize_accumulate(x, 5, -0.75, out, num_threads=t, **kw) is out
            results.append(out)
        assert_array_equal(results[0], results[1])
        assert_array_equal(results[0], results[2])
        expected = 1.0 - 0.75 * C.quantize(x, 5, **kw).astype(np.float64)
        assert_allclose(results[0], expected, rtol=1e-15, atol=1e-15)
        via_wire = np.ones(x.shape)
        C.decode_accumulate(C.encode(x, 5, **kw), -0.75, via_wire)
        assert_array_equal(results[0], via_wire)
    with pytest.raises(ValueError, match="out must have the shape of x"):
        C.quantize_accumulate(x, 5, 1.0, np.zeros((70, 33)))
    with pytest.raises(ValueError, match="float64"):
        C.quantize_accumulate(x, 5, 1.0, np.zeros(x.shape, np.float32))
    with pytest.raises(ValueError, match="weight must be finite"):
        C.quantize_accumulate(x, 5, np.inf, np.zeros(x.shape))


def test_decode_accumulate_validates_out_and_rows():
    buf = C.encode(np.ones((4, 3)), 8)
    with pytest.raises(ValueError, match="float64"):
        C.decode_accumulate(buf, 1.0, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        C.decode_accumulate(buf, 1.0, np.zeros((3, 4)).T)
    ro = np.zeros((4, 3))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        C.decode_accumulate(buf, 1.0, ro)
    with pytest.raises(ValueError, match=r"shape \(4, 3\) but out has shape \(3, 4\)"):
        C.decode_accumulate(buf, 1.0, np.zeros((3, 4)))
    with pytest.raises(TypeError, match="out"):
        C.decode_accumulate(buf, 1.0, [[0.0] * 3] * 4)
    with pytest.raises(ValueError, match="weight"):
        C.decode_accumulate(buf, np.nan, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="weights"):
        C.decode_accumulate_batch([buf, buf], [1.0], np.zeros((4, 3)))
    sparse = C.encode_sparse([0, 9], np.ones((2, 3)), 8)
    with pytest.raises(IndexError, match="row id 9"):
        C.decode_accumulate(sparse, 1.0, np.zeros((5, 3)))
    with pytest.raises(IndexError, match="row id 3"):
        C.decode_accumulate(C.encode_sparse([3], np.zeros((1, 0)), 8), 1.0, np.zeros((2, 0)))
    with pytest.raises(ValueError, match="sparse rows of 3 values"):
        C.decode_accumulate(sparse, 1.0, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="dense and sparse"):
        C.decode_accumulate_batch([sparse, buf], [1.0, 1.0], np.zeros((10, 3)))
    before = np.zeros((10, 3))
    C.decode_accumulate(sparse, 1.0, before)
    assert_array_equal(before[[0, 9]], 1.0)


# --------------------------------------------------------------------------------------------
# sparse updates, validation
# --------------------------------------------------------------------------------------------


def test_sparse_round_trip():
    rng = np.random.default_rng(8)
    rows = np.array([7, 0, 3, 7, 12], np.int64)
    vals = rng.normal(size=(5, 11)).astype(np.float32)
    for scaling, hadamard in SCHEMES:
        buf = C.encode_sparse(rows, vals, 10, num_rows=13, scaling=scaling, hadamard=hadamard, seed=5)
        assert buf == ref.encode_sparse(rows, vals, 13, 10, scaling=scaling, hadamard=hadamard, key=ref.quant_key(5))
        r, v = C.decode_sparse(buf)
        assert r.dtype == np.int32 and v.dtype == np.float32
        assert_array_equal(r, rows)
        assert_array_equal(v, ref.decode(buf))
        if not hadamard:
            assert np.all(np.abs(v - vals) <= ref.steps(buf)[:, None] + 1e-6)
    r, v = C.decode_sparse(C.encode_sparse(np.zeros(0, np.int32), np.zeros((0, 4)), 8))
    assert r.shape == (0,) and v.shape == (0, 4)
    assert C.buffer_info(C.encode_sparse([2, 5], np.ones((2, 4)), 8))["num_rows"] == 6


def test_sparse_rows_are_validated():
    vals = np.ones((2, 3))
    with pytest.raises(ValueError, match="rows must lie in"):
        C.encode_sparse([0, 5], vals, 8, num_rows=5)
    with pytest.raises(ValueError, match="rows must lie in"):
        C.encode_sparse([-1, 2], vals, 8)
    with pytest.raises(TypeError, match="rows must hold integers"):
        C.encode_sparse([0.0, 1.0], vals, 8)
    with pytest.raises(ValueError, match="rows has 3 ids but values has 2 rows"):
        C.encode_sparse([0, 1, 2], vals, 8)
    with pytest.raises(ValueError, match="values must be 2-D"):
        C.encode_sparse([0, 1], np.ones(2), 8)
    with pytest.raises(ValueError, match="num_rows"):
        C.encode_sparse([0, 1], vals, 8, num_rows=2**31 + 1)


def test_arguments_are_validated():
    x = np.ones((2, 3), np.float32)
    for bad_bits in (0, 17, -1):
        with pytest.raises(ValueError, match="bits must be in"):
            C.encode(x, bad_bits)
        with pytest.raises(ValueError, match="bits must be in"):
            C.encoded_size(x.shape, bad_bits)
    with pytest.raises(TypeError, match="bits"):
        C.quantize(x, 8.0)
    with pytest.raises(ValueError, match="scaling"):
        C.encode(x, 8, scaling="column")
    with pytest.raises(TypeError, match="hadamard"):
        C.encode(x, 8, hadamard="yes")
    with pytest.raises(TypeError, match="x must be a real numeric array"):
        C.encode(np.ones(3, complex), 8)
    with pytest.raises(TypeError, match="x must be a real numeric array"):
        C.quantize(np.ones(3, bool), 8)
    for bad in (np.nan, np.inf, -np.inf):
        y = np.ones(40_000, np.float32)
        y[12_345] = bad
        for hadamard in (False, True):
            with pytest.raises(ValueError, match="x contains NaN or infinite values"):
                C.encode(y, 8, hadamard=hadamard)
            with pytest.raises(ValueError, match="x contains NaN or infinite values"):
                C.quantize(y, 8, scaling="row", hadamard=hadamard)
    with pytest.raises(ValueError, match="values contains NaN"):
        C.encode_sparse([0], [[np.nan, 1.0]], 8)
    with pytest.raises(ValueError, match="x has values beyond the float32 range"):
        C.encode(np.array([1e39, 0.0]), 8)  # overflows float32 (an error, not a RuntimeWarning)
    with pytest.raises(ValueError, match="too wide a range"):
        C.encode(np.array([-3e38, 3e38], np.float32), 1)
    with pytest.raises(ValueError, match="x is too large: its Hadamard rotation overflows float32"):
        C.encode(np.array([[1.0, 2.0], [-3e38, 3e38]], np.float32), 8, hadamard=True)
    with pytest.raises(ValueError, match="seed"):
        C.encode(x, 8, seed=-1)
    with pytest.raises(ValueError, match="num_threads"):
        C.encode(x, 8, num_threads=-2)
    with pytest.raises(ValueError, match="at most 8"):
        C.encode(np.ones((1,) * 9), 8)
    with pytest.raises(TypeError, match="bytes-like"):
        C.decode("not bytes")
    with pytest.raises(TypeError, match="buf must be bytes-like or a 1-D uint8 array"):
        C.decode(np.zeros(30, np.int32))
    with pytest.raises(ValueError, match="sparse update needs shape"):
        C.encoded_size((3,), 8, sparse_rows=2)
    with pytest.raises(ValueError, match="shape entries"):
        C.encoded_size((3, -1), 8)


def test_buffers_of_any_bytes_like_type_decode():
    x = heavy((5, 6))
    buf = C.encode(x, 7)
    y = C.decode(buf)
    for form in (bytearray(buf), memoryview(buf), np.frombuffer(buf, np.uint8)):
        assert_array_equal(C.decode(form), y)
