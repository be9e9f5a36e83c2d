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
    assert a.model.item_factors.tobytes() == b.model.item_factors.tobytes()
    if a.model.item_bias is not None:
        assert a.model.item_bias.tobytes() == b.model.item_bias.tobytes()
    assert _without_timing(a.history) == _without_timing(b.history)
    assert set(a.state.optimizer_state) == set(b.state.optimizer_state)
    for key in a.state.optimizer_state:
        assert np.array_equal(a.state.optimizer_state[key], b.state.optimizer_state[key]), key
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
