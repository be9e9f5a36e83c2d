"""train_round(apply_lr=...) takes the server SGD step inside the native call: the model must
end up exactly where the dense delta plus optimizers.SGD puts it, and FedRecon.fit, which uses
it for plain SGD, must not change a bit."""

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import baselines, kernels
from fedrecon_fast._native import kernels as native_kernels


@pytest.fixture(scope="module")
def problem():
    data = ff.synthetic_ratings(num_users=300, num_items=600, seed=3).prepare(max_examples=200, shuffle_seed=3)
    rng = np.random.default_rng(3)
    V = rng.normal(0, 0.3, (data.num_items, 12)).astype(np.float32)
    b = rng.normal(0, 0.1, data.num_items).astype(np.float32)
    return data, V, b


def sgd_reference(V, delta, lr):
    """What optimizers.SGD does to V with the round's delta."""
    out = V.copy()
    if lr == 1.0:
        np.add(out, delta, out=out)
    else:
        out += np.multiply(delta, np.float32(lr))
    return out


CODECS = [
    ff.UpdateCodec(),
    ff.UpdateCodec(bits=8, sparse=True),
    ff.UpdateCodec(bits=4, sparse=True, row_scaling=True),
    ff.UpdateCodec(bits=6, sparse=False),
]  # the last: every row gets quantization noise


@pytest.mark.parametrize("codec", CODECS, ids=["plain", "q8-sparse", "q4-row", "q6-dense"])
@pytest.mark.parametrize("lr", [1.0, 0.37])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_in_place_step_equals_sgd_on_the_delta(problem, codec, lr, threads, bias):
    data, V0, b0 = problem
    clients = ff.sample_clients(data.num_clients, 40, seed=5, round=2)
    cfg = ff.ClientConfig(batch_size=5, recon_steps_max=20, update_steps_max=20, client_lr=0.3)
    common = dict(seed=5, round=2, num_threads=threads, global_mean=3.5, codec=codec)
    dense = ff.train_round(V0, data, clients, cfg, item_bias=b0 if bias else None, **common)
    V, b = V0.copy(), b0.copy()
    res = ff.train_round(V, data, clients, cfg, item_bias=b if bias else None, apply_lr=lr, **common)
    assert res.delta is None and res.delta_bias is None
    assert np.array_equal(V, sgd_reference(V0, dense.delta, lr))
    if bias:
        assert np.array_equal(b, sgd_reference(b0, dense.delta_bias, lr))
    else:
        assert np.array_equal(b, b0)
    assert res.summary.pop("nonfinite_rows") == 0
    assert res.summary == dense.summary
    for key, col in dense.client_stats.items():
        assert np.array_equal(res.client_stats[key], col), key
    # Rows nobody touched are never written (bit for bit, so -0.0 stays -0.0).
    untouched = ~np.any(dense.delta != 0, axis=1)
    if not codec.bits or codec.sparse:
        assert untouched.any()
    assert V[untouched].tobytes() == V0[untouched].tobytes()


def test_in_place_step_when_nobody_reports_leaves_the_model_alone(problem):
    data, V0, _ = problem
    cfg = ff.ClientConfig(update_epochs=0)  # no update steps: every client has weight 0
    V = V0.copy()
    res = ff.train_round(V, data, [0, 1, 2], cfg, apply_lr=1.0)
    assert res.summary["num_reporting"] == 0 and res.summary["nonfinite_rows"] == 0
    assert V.tobytes() == V0.tobytes()


def test_in_place_step_counts_rows_it_made_non_finite(problem):
    data, V0, _ = problem
    cfg = ff.ClientConfig(client_lr=3.0)  # some mean entries exceed 1, so lr * mean overflows
    dense = ff.train_round(V0, data, np.arange(30), cfg)
    with np.errstate(over="ignore"):
        expected = sgd_reference(V0, dense.delta, 3e38)
    V = V0.copy()
    res = ff.train_round(V, data, np.arange(30), cfg, apply_lr=3e38)
    assert np.array_equal(V, expected)
    bad = int((~np.isfinite(V)).any(axis=1).sum())
    assert 0 < bad < res.summary["rows_aggregated"]
    assert res.summary["nonfinite_rows"] == bad


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1e39])
def test_apply_lr_must_be_a_positive_finite_float32(problem, bad):
    data, V0, _ = problem
    with pytest.raises(ValueError, match="apply_lr"):
        ff.train_round(V0.copy(), data, [0], apply_lr=bad)


def test_apply_lr_needs_the_models_own_writeable_float32_arrays(problem):
    data, V0, b0 = problem
    with pytest.raises(TypeError, match="item_factors"):
        ff.train_round(V0.astype(np.float64), data, [0], apply_lr=1.0)  # a copy would lose the step
    with pytest.raises(TypeError, match="item_factors"):
        ff.train_round(np.asfortranarray(V0), data, [0], apply_lr=1.0)
    with pytest.raises(TypeError, match="item_factors"):
        ff.train_round(V0.tolist(), data, [0], apply_lr=1.0)
    frozen = V0.copy()
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match="item_factors"):
        ff.train_round(frozen, data, [0], apply_lr=1.0)
    with pytest.raises(TypeError, match="item_bias"):
        ff.train_round(V0.copy(), data, [0], item_bias=b0.astype(np.float64), apply_lr=1.0)
    assert native_kernels._in_place_args(None, V0, None) == {}


def _fit(train, in_place, trainer_class=ff.FedRecon, **kw):
    cfg = ff.preset("paper", rounds=25, clients_per_round=40, dim=8, **kw)
    trainer = trainer_class(cfg)
    trainer.in_place_step = in_place
    calls = []
    original = kernels.train_round

    def spy(*args, **kwargs):
        calls.append("apply_lr" in kwargs)
        return original(*args, **kwargs)

    kernels.train_round = spy
    try:
        trainer.fit(train)
    finally:
        kernels.train_round = original
    return trainer, calls


TIMING = ("seconds",)


def _without_timing(history):
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)} for row in history]


def assert_same_training(a, b):
    """Two trainers ended bit for bit alike: model, history (but timings), optimizer state."""
    assert a.model.item_factors.tobytes() == b.model.item_factors.tobytes()
    if a.model.item_bias is not None:
        assert a.model.item_bias.tobytes() == b.model.item_bias.tobytes()
    assert _without_timing(a.history) == _without_timing(b.history)
    assert set(a.state.optimizer_state) == set(b.state.optimizer_state)
    for key in a.state.optimizer_state:
        assert a.state.optimizer_state[key].tobytes() == b.state.optimizer_state[key].tobytes(), key


@pytest.mark.parametrize(
    ("trainer_class", "kw"),
    [
        (ff.FedRecon, dict()),
        (ff.FedRecon, dict(server_lr=0.6)),
        (ff.FedRecon, dict(biases=True)),
        (ff.FedRecon, dict(num_threads=2)),
        (ff.FedRecon, dict(quantize_bits=4, quantize_threshold=0)),
        (baselines.FedAvg, dict(biases=True)),
    ],
    ids=["paper", "lr0.6", "bias", "2threads", "q4-dense", "fedavg"],
)
def test_fit_with_the_in_place_step_is_bit_identical(problem, trainer_class, kw):
    data, _, _ = problem
    a, calls_a = _fit(data, True, trainer_class, **kw)
    b, calls_b = _fit(data, False, trainer_class, **kw)
    assert all(calls_a) and not any(calls_b)  # the fast path ran, and only where asked
    assert_same_training(a, b)
    if trainer_class is baselines.FedAvg:
        assert a.users.tobytes() == b.users.tobytes()


def test_fit_keeps_the_dense_step_where_the_kernel_cannot_take_it(problem):
    data, _, _ = problem
    for kw in (dict(server_optimizer="adam", server_lr=0.01), dict(dp_clip=1.0, dp_noise=0.0, weighting="uniform")):
        _, calls = _fit(data, True, **kw)
        assert calls and not any(calls), kw


def test_fit_rejects_a_non_finite_model_before_the_first_round(problem):
    data, _, _ = problem
    trainer = ff.FedRecon(ff.preset("paper", rounds=2, clients_per_round=10, dim=8))
    trainer.fit(data, rounds=0)
    trainer.model.item_factors[3, 1] = np.nan
    with pytest.raises(FloatingPointError, match="item_factors is non-finite"):
        trainer.fit(data, rounds=1)


def test_in_place_divergence_is_the_same_clear_error(problem):
    data, _, _ = problem
    messages = []
    for in_place in (True, False):
        trainer = ff.FedRecon(ff.preset("paper", rounds=3, clients_per_round=30, dim=8, client_lr=3.0, server_lr=3e38))
        trainer.in_place_step = in_place
        with pytest.raises(FloatingPointError) as err:
            with np.errstate(over="ignore"):
                trainer.fit(data)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


# ---------------------------------------------------------------------------------------------
# Server SGD with momentum in the native round (ServerMomentum)


def momentum_reference(p, vel, delta, lr, momentum, nesterov):
    """optimizers.MomentumSGD's step on (p, vel) with the round's delta, written out in NumPy:
    the float32 roundings in its order."""
    p, vel = p.copy(), vel.copy()
    lr_d = np.multiply(delta, np.float32(lr))
    vel *= np.float32(momentum)
    vel += lr_d
    if nesterov:
        p += lr_d
        p += np.multiply(vel, np.float32(momentum))
    else:
        p += vel
    return p, vel


def _velocities(shape_v, shape_b, seed):
    rng = np.random.default_rng(seed)
    vel = rng.normal(0, 0.05, shape_v).astype(np.float32)
    vel.flat[::7] = -0.0  # -0 * m + 0 must come out +0, as in NumPy
    vel_b = rng.normal(0, 0.05, shape_b).astype(np.float32)
    vel_b[::5] = -0.0
    return vel, vel_b


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cohort", ["40 clients", "nobody"])
def test_momentum_step_in_place_equals_momentum_sgd_on_the_delta(problem, nesterov, momentum, threads, bias, cohort):
    data, V0, b0 = problem
    clients = ff.sample_clients(data.num_clients, 40, seed=5, round=2) if cohort == "40 clients" else []
    cfg = ff.ClientConfig(batch_size=5, recon_steps_max=20, update_steps_max=20, client_lr=0.3)
    common = dict(seed=5, round=2, num_threads=threads, global_mean=3.5)
    vel0, velb0 = _velocities(V0.shape, b0.shape, 4)
    dense = ff.train_round(V0, data, clients, cfg, item_bias=b0 if bias else None, **common)
    V, b, vel, velb = V0.copy(), b0.copy(), vel0.copy(), velb0.copy()
    m = kernels.ServerMomentum(momentum, nesterov, vel, velb if bias else None)
    res = ff.train_round(V, data, clients, cfg, item_bias=b if bias else None, apply_lr=0.7, momentum=m, **common)
    want_V, want_vel = momentum_reference(V0, vel0, dense.delta, 0.7, momentum, nesterov)
    assert V.tobytes() == want_V.tobytes() and vel.tobytes() == want_vel.tobytes()
    if bias:
        want_b, want_velb = momentum_reference(b0, velb0, dense.delta_bias, 0.7, momentum, nesterov)
        assert b.tobytes() == want_b.tobytes() and velb.tobytes() == want_velb.tobytes()
    else:
        assert b.tobytes() == b0.tobytes() and velb.tobytes() == velb0.tobytes()
    if momentum > 0:
        assert not np.array_equal(V, V0)  # every row moved (untouched rows by their velocity)
    assert res.summary["nonfinite_rows"] == 0


def test_momentum_counts_every_row_it_leaves_non_finite(problem):
    data, V0, _ = problem
    V, vel = V0.copy(), np.zeros_like(V0)
    vel[5, 0] = np.float32(3e38)  # an untouched row's velocity that overflows the row
    V[5, 0] = np.float32(3e38)
    res = ff.train_round(V, data, [], apply_lr=1.0, momentum=kernels.ServerMomentum(0.99, False, vel))
    assert res.summary["nonfinite_rows"] == 1 and np.isinf(V[5, 0])


def test_momentum_arguments_are_checked(problem):
    data, V0, b0 = problem
    V, b = V0.copy(), b0.copy()
    vel, velb = np.zeros_like(V), np.zeros_like(b)
    M = kernels.ServerMomentum
    with pytest.raises(ValueError, match="momentum needs apply_lr"):
        ff.train_round(V, data, [0], momentum=M(0.9, False, vel))
    with pytest.raises(TypeError, match="momentum must be a ServerMomentum"):
        ff.train_round(V, data, [0], apply_lr=1.0, momentum=(0.9, False, vel))
    with pytest.raises(ValueError, match=r"momentum.momentum must be in \[0, 1\)"):
        ff.train_round(V, data, [0], apply_lr=1.0, momentum=M(1.0, False, vel))
    with pytest.raises(TypeError, match="momentum.velocity must be a writeable"):
        ff.train_round(V, data, [0], apply_lr=1.0, momentum=M(0.9, False, vel.astype(np.float64)))
    with pytest.raises(ValueError, match="momentum.velocity must have item_factors' shape"):
        ff.train_round(V, data, [0], apply_lr=1.0, momentum=M(0.9, False, vel[:-1]))
    with pytest.raises(ValueError, match="velocity_bias must be given exactly when item_bias is"):
        ff.train_round(V, data, [0], item_bias=b, apply_lr=1.0, momentum=M(0.9, False, vel))
    with pytest.raises(ValueError, match="velocity_bias must be given exactly when item_bias is"):
        ff.train_round(V, data, [0], apply_lr=1.0, momentum=M(0.9, False, vel, velb))
    with pytest.raises(ValueError, match="must not overlap"):
        ff.train_round(V, data, [0], apply_lr=1.0, momentum=M(0.9, False, V))
    with pytest.raises(ValueError, match="must not overlap"):
        ff.train_round(V, data, [0], item_bias=b, apply_lr=1.0, momentum=M(0.9, False, vel, b))
    assert np.array_equal(V, V0) and np.array_equal(b, b0) and not vel.any()  # nothing was written


MOMENTUM_FITS = {
    "momentum": dict(server_optimizer="momentum", server_lr=0.1, server_options={"momentum": 0.9}),
    "nesterov-bias": dict(
        server_optimizer="momentum", server_lr=0.1, server_options={"momentum": 0.9, "nesterov": True}, biases=True
    ),
    "2threads-bias": dict(
        server_optimizer="momentum", server_lr=0.3, server_options={"momentum": 0.5}, biases=True, num_threads=2
    ),
}


@pytest.mark.parametrize("kw", list(MOMENTUM_FITS.values()), ids=list(MOMENTUM_FITS))
@pytest.mark.parametrize("route", ["native loop", "per round"])
@pytest.mark.parametrize("dim", [8, 11])  # the native loop pads rows of 11 floats (V and the velocity) to 16
def test_fit_with_server_momentum_in_the_native_round_is_bit_identical(problem, kw, route, dim):
    data, _, _ = problem
    taken = []

    def run(in_place):
        cfg = ff.preset("paper", rounds=20, clients_per_round=40, dim=dim, **kw)
        trainer = ff.FedRecon(cfg)
        trainer.in_place_step = in_place
        rounds_fn, round_fn = kernels.train_rounds, kernels.train_round

        def spy_rounds(*a, **k):
            taken.append(("loop", k.get("momentum") is not None))
            return rounds_fn(*a, **k)

        def spy_round(*a, **k):
            taken.append(("round", k.get("momentum") is not None))
            return round_fn(*a, **k)

        kernels.train_rounds, kernels.train_round = spy_rounds, spy_round
        try:
            trainer.fit(data, callback=(lambda row: None) if route == "per round" else None)
        finally:
            kernels.train_rounds, kernels.train_round = rounds_fn, round_fn
        return trainer

    a = run(True)
    native = list(taken)
    taken.clear()
    b = run(False)
    expected = "loop" if route == "native loop" else "round"
    assert native and all(t == (expected, True) for t in native)  # the momentum step ran natively
    assert taken and all(t == ("round", False) for t in taken)  # and not in the reference run
    assert_same_training(a, b)
