"""The native training loop (kernels.train_rounds) and FedRecon.fit's use of it: rounds run in
one native call must give exactly what the same rounds called one by one from Python give."""

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import kernels
from fedrecon_fast.server import Server


@pytest.fixture(scope="module")
def data():
    return ff.synthetic_ratings(num_users=300, num_items=500, seed=4).prepare(max_examples=200, shuffle_seed=4)


CONFIGS = {
    "paper": dict(),
    "l2-bias": dict(update_l2=0.01, recon_l2=0.01),
    "exact": dict(recon="exact", ridge=2.0),
    "random-split": dict(split="random", support_fraction=0.3),
}
CODECS = {
    "plain": ff.UpdateCodec(),
    "q8-sparse": ff.UpdateCodec(bits=8, sparse=True),
    "clip": ff.UpdateCodec(clip=0.05),
    "q6-dense": ff.UpdateCodec(bits=6, sparse=False),
}


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dim", [9, 16])  # the loop pads rows of 9 floats to 16 and reads rows of 16 in place
def test_train_rounds_equals_the_rounds_one_by_one(data, name, codec, threads, dim):
    # Prepare: the same model twice; biases for one configuration
    cfg = ff.ClientConfig(recon_steps_max=10, update_steps_max=10, client_lr=0.3, **CONFIGS[name])
    rng = np.random.default_rng(0)
    V0 = rng.normal(0, 0.1, (data.num_items, dim)).astype(np.float32)
    b0 = rng.normal(0, 0.1, data.num_items).astype(np.float32) if name == "l2-bias" else None
    common = dict(global_mean=3.0, seed=7, num_threads=threads, codec=CODECS[codec])
    lr = 0.8
    # Execute: a Python loop of sample_clients + train_round(apply_lr), and the native loop
    V1, b1 = V0.copy(), None if b0 is None else b0.copy()
    summaries = []
    for r in range(3, 8):
        clients = ff.sample_clients(data.num_clients, 25, 7, r)
        res = ff.train_round(V1, data, clients, cfg, item_bias=b1, round=r, apply_lr=lr, **common)
        summaries.append(res.summary)
    V2, b2 = V0.copy(), None if b0 is None else b0.copy()
    rec = kernels.train_rounds(
        V2, data, cfg, item_bias=b2, first_round=3, num_rounds=5, clients_per_round=25, lr=lr, **common
    )
    # Assert: the same model bit for bit, and the same per-round summaries
    assert np.array_equal(V1, V2)
    if b0 is not None:
        assert np.array_equal(b1, b2)
    assert len(rec["clients"]) == 5 and (rec["clients"] == 25).all() and (rec["seconds"] > 0).all()
    for i, s in enumerate(summaries):
        for key, value in s.items():
            assert rec[key][i] == value, (i, key)


def test_train_rounds_stops_after_a_diverged_round(data):
    V = np.full((data.num_items, 4), 0.1, np.float32)
    cfg = ff.ClientConfig(client_lr=1e30, recon_lr=1e30)
    rec = kernels.train_rounds(V, data, cfg, num_rounds=10, clients_per_round=20)
    assert len(rec["clients"]) == 1
    assert rec["num_nonfinite"][0] == 20 or rec["nonfinite_rows"][0] > 0


def test_train_rounds_writes_back_the_rounds_before_it_stopped(data):
    # The loop runs on a padded copy of V (4 -> 8 floats a row); a huge server step makes it stop
    # early, and the caller's V then holds what the rounds run wrote, as the per-round path leaves it.
    V = np.full((data.num_items, 4), 0.1, np.float32)
    rec = kernels.train_rounds(V, data, ff.ClientConfig(), num_rounds=10, clients_per_round=20, lr=3e38)
    ran = len(rec["clients"])
    assert ran < 10 and (rec["nonfinite_rows"][-1] > 0 or rec["num_nonfinite"][-1] == 20)
    assert not np.array_equal(V, np.full_like(V, 0.1))
    W = np.full((data.num_items, 4), 0.1, np.float32)
    for r in range(ran):
        clients = ff.sample_clients(data.num_clients, 20, 0, r)
        ff.train_round(W, data, clients, ff.ClientConfig(), round=r, apply_lr=3e38)
    assert np.array_equal(V, W, equal_nan=True)


def test_train_rounds_rejects_bad_arguments(data):
    V = np.zeros((data.num_items, 4), np.float32)
    with pytest.raises(ValueError, match="clients_per_round"):
        kernels.train_rounds(V, data, clients_per_round=0)
    with pytest.raises(ValueError, match="num_rounds"):
        kernels.train_rounds(V, data, num_rounds=-1)
    with pytest.raises(ValueError, match="lr"):
        kernels.train_rounds(V, data, lr=0.0)
    with pytest.raises(TypeError, match="item_factors"):
        kernels.train_rounds(V.astype(np.float64), data)
    with pytest.raises(TypeError, match="item_factors"):
        V.setflags(write=False)
        kernels.train_rounds(V, data)


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_fit_native_chunks_equal_the_per_round_path(data, preset):
    # A per-round callback keeps fit on the Python path: the model and history must not differ.
    tr, va, _ = ff.split_users(data.num_clients, seed=0)
    train, val = data.subset(tr), data.subset(va)
    cfg = ff.preset(preset, rounds=12, clients_per_round=30, dim=6, eval_every=5)
    native = ff.FedRecon(cfg)
    native.fit(train, val)
    seen = []
    python = ff.FedRecon(cfg)
    python.fit(train, val, callback=seen.append)
    assert len(seen) == 12
    assert np.array_equal(native.model.item_factors, python.model.item_factors)
    assert native.round == python.round == 12
    timing = {"round_seconds"}
    for a, b in zip(native.history, python.history):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert [h["round"] for h in native.history if "val_rmse" in h] == [5, 10, 12]


def test_fit_takes_the_native_loop_only_when_nothing_needs_python(data):
    tr, _, _ = ff.split_users(data.num_clients, seed=0)
    train = data.subset(tr)
    plain = ff.FedRecon(ff.preset("paper", rounds=1, dim=4))
    plain.fit(train, rounds=0)
    server = Server(plain.state)
    assert plain._native_rounds(server, None)
    assert not plain._native_rounds(server, print)
    for override in (
        dict(server_optimizer="adam", server_lr=0.01),
        dict(dp_clip=1.0, weighting="uniform"),
        dict(learn_user_default=True),
    ):
        t = ff.FedRecon(ff.preset("paper", rounds=1, dim=4, **override))
        t.fit(train, rounds=0)
        assert not t._native_rounds(Server(t.state), None), override
