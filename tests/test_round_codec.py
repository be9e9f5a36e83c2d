"""The fused round's update codec equals the real wire format, client by client.

Each client's update, clipped and quantized inside the native round, must aggregate to exactly
what encoding it with fedrecon_fast.compression and decoding would give, and the bytes counted
must be the real encoded sizes.
"""

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import compression as C


@pytest.fixture(scope="module")
def setup():
    d = ff.synthetic_ratings(num_users=200, num_items=120, seed=5).prepare(max_examples=300, shuffle_seed=5)
    cfg = ff.preset("paper", dim=12)
    V = ff.GlobalModel.initialize(d.item_ids, cfg).item_factors
    return d, cfg.client, V, np.arange(0, 60, 3)


CODECS = [
    ff.UpdateCodec(bits=8, sparse=True),
    ff.UpdateCodec(bits=4, sparse=True, row_scaling=True, hadamard=True),
    ff.UpdateCodec(bits=8, sparse=False),
    ff.UpdateCodec(bits=3, sparse=False, row_scaling=True),
    ff.UpdateCodec(bits=6, sparse=False, hadamard=True),
    ff.UpdateCodec(bits=1, sparse=False, row_scaling=True, hadamard=True),
]


@pytest.mark.parametrize(
    "codec",
    CODECS,
    ids=lambda c: (
        f"b{c.bits}-{'sparse' if c.sparse else 'dense'}{'-row' if c.row_scaling else ''}{'-had' if c.hadamard else ''}"
    ),
)
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_round_equals_encode_decode_through_the_wire(setup, codec, threads):
    d, cfg, V, clients = setup
    raw = ff.client_updates(V, d, clients, cfg, seed=3, round=7)
    w = raw.weights
    fused = ff.train_round(V, d, clients, cfg, seed=3, round=7, num_threads=threads, codec=codec)
    acc = np.zeros(V.shape)
    sizes = []
    for k, c in enumerate(clients):
        if w[k] <= 0:
            continue
        rows, vals, _ = raw.client(k)
        common = dict(
            scaling="row" if codec.row_scaling else "tensor", hadamard=codec.hadamard, seed=3, round=7, client=int(c)
        )
        if codec.sparse:
            buf = C.encode_sparse(rows, vals, codec.bits, num_rows=V.shape[0], **common)
        else:
            dense = np.zeros(V.shape, np.float32)
            dense[rows] = vals
            buf = C.encode(dense, codec.bits, **common)
        C.decode_accumulate(buf, float(w[k]), acc)
        sizes.append(len(buf))
    # The round divides as its contract says: the sum times 1 / total weight.
    assert np.array_equal(fused.delta, (acc * (1.0 / w.sum())).astype(np.float32))
    assert np.array_equal(fused.client_stats["bytes"][w > 0], sizes)
    assert fused.summary["bytes_sent"] == sum(sizes)
    if not codec.sparse and not codec.row_scaling:
        assert np.count_nonzero(np.abs(fused.delta).sum(1)) > fused.summary["rows_aggregated"]  # noisy zeros


def test_float32_bytes_and_threshold(setup):
    d, cfg, V, clients = setup
    K = V.shape[1]
    sparse = ff.train_round(V, d, clients, cfg, seed=1)
    rows = sparse.client_stats["rows"][sparse.client_stats["weight"] > 0]
    assert sparse.summary["bytes_sent"] == int((rows * (4 + 4 * K)).sum())
    dense = ff.train_round(V, d, clients, cfg, seed=1, codec=ff.UpdateCodec(sparse=False))
    assert dense.summary["bytes_sent"] == dense.summary["num_reporting"] * V.size * 4
    assert np.array_equal(dense.delta, sparse.delta)  # unquantized: identical aggregate
    # Below the threshold the variable stays float32.
    skipped = ff.train_round(V, d, clients, cfg, seed=1, codec=ff.UpdateCodec(bits=8, threshold=V.size + 1))
    assert np.array_equal(skipped.delta, sparse.delta)
    assert skipped.summary["bytes_sent"] == sparse.summary["bytes_sent"]


def test_clipping_bounds_every_update(setup):
    d, cfg, V, clients = setup
    raw = ff.client_updates(V, d, clients, cfg, seed=2)
    norms = np.array([np.linalg.norm(raw.client(k)[1]) for k in range(len(clients))])
    clip = float(np.median(norms[raw.weights > 0]))
    clipped = ff.client_updates(V, d, clients, cfg, seed=2, codec=ff.UpdateCodec(clip=clip))
    for k in range(len(clients)):
        n = np.linalg.norm(clipped.client(k)[1])
        assert n <= clip * (1 + 1e-5)
        if norms[k] <= clip:
            assert np.array_equal(clipped.client(k)[1], raw.client(k)[1])
    assert clipped.client_stats["clipped"].sum() == int((norms > clip).sum()) > 0
    fused = ff.train_round(V, d, clients, cfg, seed=2, codec=ff.UpdateCodec(clip=clip))
    assert fused.summary["num_clipped"] == clipped.client_stats["clipped"].sum()


def test_codec_validation(setup):
    d, cfg, V, clients = setup
    with pytest.raises(ValueError, match="bits"):
        ff.UpdateCodec(bits=17)
    with pytest.raises(TypeError, match="row_scaling"):
        ff.UpdateCodec(bits=8, row_scaling="col")
    with pytest.raises(ValueError, match="clip"):
        ff.UpdateCodec(clip=-1.0)
    with pytest.raises(TypeError, match="codec must be an UpdateCodec"):
        ff.train_round(V, d, clients, cfg, codec={"bits": 8})
    # A dense update quantized with one scale: rows plus the noise of its untouched rows.
    ups = ff.client_updates(V, d, clients, cfg, codec=ff.UpdateCodec(bits=8, sparse=False))
    assert ups.noise is not None and len(ups.noise.lo) == len(clients)
    with pytest.raises(TypeError, match="DenseNoise"):
        ff.kernels.reduce_updates(ups.rows, ups.values, ups.offsets, ups.weights, num_items=V.shape[0], noise=(1, 2))
    with pytest.raises(ValueError, match="noise must describe"):
        ff.kernels.reduce_updates(
            ups.rows, ups.values, ups.offsets, ups.weights, num_items=V.shape[0], noise=ups.noise.take(np.arange(2))
        )
