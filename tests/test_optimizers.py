"""Tests for fedrecon_fast.optimizers (server optimizers, Reddi et al. 2021)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from fedrecon_fast.optimizers import (
    OPTIMIZER_NAMES,
    SGD,
    Adagrad,
    Adam,
    MomentumSGD,
    ServerOptimizer,
    Yogi,
    make_optimizer,
    optimizer_from_config,
)

N_ITEMS, DIM = 7, 3
N_STEPS = 6

# (name, kwargs) covering defaults and non-default hyperparameters.
CASES = [
    ("sgd", {}),
    ("sgd", {"lr": 0.3}),
    ("momentum", {}),
    ("momentum", {"lr": 0.5, "momentum": 0.7, "nesterov": True}),
    ("adam", {}),
    ("adam", {"lr": 0.05, "beta1": 0.8, "beta2": 0.99, "eps": 1e-3}),
    ("adagrad", {}),
    ("adagrad", {"lr": 0.3, "initial_accumulator": 0.5, "eps": 1e-4}),
    ("yogi", {}),
    ("yogi", {"lr": 0.02, "beta1": 0.5, "beta2": 0.9, "eps": 1e-2, "initial_accumulator": 0.01}),
    ("yogi", {"bias_correction": False}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in CASES]

EXPECTED_SLOTS = {
    "sgd": {},
    "momentum": {"velocity": 0.0},
    "adam": {"m": 0.0, "v": 0.0},
    "adagrad": {"accumulator": 0.1},
    "yogi": {"m": 0.0, "v": 1e-6},
}


def make_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "item_factors": rng.normal(size=(N_ITEMS, DIM)).astype(np.float32),
        "item_bias": rng.normal(size=(N_ITEMS,)).astype(np.float32),
    }


def make_updates(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [
        {
            "item_factors": (0.1 * rng.normal(size=(N_ITEMS, DIM))).astype(np.float32),
            "item_bias": (0.1 * rng.normal(size=(N_ITEMS,))).astype(np.float32),
        }
        for _ in range(n)
    ]


def copy_dict(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in d.items()}


# --------------------------------------------------------------------------
# Independent float64 reference implementations (one array, loop over steps).
# g = -delta is the pseudo-gradient. Each returns (final params, final slots).
# --------------------------------------------------------------------------


def ref_sgd(p, deltas, lr=1.0):
    p = p.astype(np.float64)
    for delta in deltas:
        g = -delta.astype(np.float64)
        p = p - lr * g
    return p, {}


def ref_momentum(p, deltas, lr=1.0, momentum=0.9, nesterov=False):
    p = p.astype(np.float64)
    vel = np.zeros_like(p)
    for delta in deltas:
        g = -delta.astype(np.float64)
        vel = momentum * vel - lr * g
        if nesterov:
            p = p + momentum * vel - lr * g
        else:
            p = p + vel
    return p, {"velocity": vel}


def ref_adam(p, deltas, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-7):
    # Keras / TFF form: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t),
    # p -= lr_t * m / (sqrt(v) + eps).
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, delta in enumerate(deltas, start=1):
        g = -delta.astype(np.float64)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        lr_t = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p = p - lr_t * m / (np.sqrt(v) + eps)
    return p, {"m": m, "v": v}


def ref_adagrad(p, deltas, lr=0.1, initial_accumulator=0.1, eps=1e-7):
    p = p.astype(np.float64)
    acc = np.full_like(p, initial_accumulator)
    for delta in deltas:
        g = -delta.astype(np.float64)
        acc = acc + g * g
        p = p - lr * g / (np.sqrt(acc) + eps)
    return p, {"accumulator": acc}


def ref_yogi(
    p,
    deltas,
    lr=0.01,
    beta1=0.9,
    beta2=0.999,
    eps=1e-3,
    initial_accumulator=1e-6,
    bias_correction=True,
):
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.full_like(p, initial_accumulator)
    for t, delta in enumerate(deltas, start=1):
        g = -delta.astype(np.float64)
        m = beta1 * m + (1 - beta1) * g
        v = v - (1 - beta2) * np.sign(v - g * g) * g * g
        scale = math.sqrt(1 - beta2**t) / (1 - beta1**t) if bias_correction else 1.0
        p = p - lr * scale * m / (np.sqrt(v) + eps)
    return p, {"m": m, "v": v}


REFERENCES = {
    "sgd": ref_sgd,
    "momentum": ref_momentum,
    "adam": ref_adam,
    "adagrad": ref_adagrad,
    "yogi": ref_yogi,
}


# --------------------------------------------------------------------------
# Numerical agreement with the references
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_matches_float64_reference(name, kwargs):
    rng = np.random.default_rng(1234)
    params = make_params(rng)
    initial = copy_dict(params)
    updates = make_updates(rng, N_STEPS)
    opt = make_optimizer(name, **kwargs)
    state = opt.init(params)
    for upd in updates:
        opt.apply(params, upd, state)

    assert int(state["step"]) == N_STEPS
    for key in params:
        want_p, want_slots = REFERENCES[name](initial[key], [u[key] for u in updates], **kwargs)
        # atol guards coordinates that pass close to zero (float32 rounding
        # of the absolute value there is ~1e-8 per step).
        np.testing.assert_allclose(params[key], want_p, rtol=1e-5, atol=1e-6)
        assert set(want_slots) == set(EXPECTED_SLOTS[name])
        for slot, want in want_slots.items():
            np.testing.assert_allclose(state[f"{key}/{slot}"], want, rtol=1e-5, atol=1e-9)
        # The step must actually have moved the parameters.
        assert not np.allclose(params[key], initial[key], rtol=0, atol=1e-6)


def test_sgd_lr_one_is_exact_fedavg():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    expected = copy_dict(params)
    opt = make_optimizer("sgd")
    state = opt.init(params)
    for upd in make_updates(rng, 3):
        opt.apply(params, upd, state)
        for k in expected:
            expected[k] = expected[k] + upd[k]  # float32 + float32, same rounding
        for k in params:
            assert params[k].dtype == np.float32
            assert np.array_equal(params[k], expected[k])


def test_momentum_accumulates_constant_update():
    lr, mu = 0.5, 0.9
    p = {"w": np.zeros(4, dtype=np.float32)}
    delta = {"w": np.full(4, 0.25, dtype=np.float32)}
    opt = make_optimizer("momentum", lr=lr, momentum=mu)
    state = opt.init(p)
    increments = []
    prev = p["w"].copy()
    for t in range(1, 5):
        opt.apply(p, delta, state)
        inc = p["w"] - prev
        prev = p["w"].copy()
        # step t moves by lr * delta * (1 + mu + ... + mu^(t-1))
        expected = lr * 0.25 * sum(mu**i for i in range(t))
        np.testing.assert_allclose(inc, expected, rtol=1e-6)
        increments.append(float(inc[0]))
    assert increments == sorted(increments) and increments[-1] > 2 * increments[0]


def test_nesterov_differs_from_classical_momentum():
    rng = np.random.default_rng(5)
    params_a = make_params(rng)
    params_b = copy_dict(params_a)
    updates = make_updates(rng, 2)
    classical = make_optimizer("momentum", momentum=0.9)
    nesterov = make_optimizer("momentum", momentum=0.9, nesterov=True)
    sa, sb = classical.init(params_a), nesterov.init(params_b)
    for upd in updates:
        classical.apply(params_a, upd, sa)
        nesterov.apply(params_b, upd, sb)
    # Same velocity, different parameter trajectory.
    np.testing.assert_array_equal(sa["item_bias/velocity"], sb["item_bias/velocity"])
    assert not np.allclose(params_a["item_bias"], params_b["item_bias"])


def test_adam_first_step_magnitude_is_lr():
    rng = np.random.default_rng(2)
    params = make_params(rng)
    before = copy_dict(params)
    upd = make_updates(rng, 1)[0]
    lr = 0.01
    opt = make_optimizer("adam", lr=lr)
    opt.apply(params, upd, opt.init(params))
    for k in params:
        step = params[k].astype(np.float64) - before[k]
        # |m_hat / sqrt(v_hat)| == 1 at t=1, so every coordinate moves by ~lr
        # in the direction of delta (|delta| ~ 0.1 >> eps).
        np.testing.assert_allclose(np.abs(step), lr, rtol=1e-3)
        assert np.all(np.sign(step) == np.sign(upd[k]))


def test_adam_eps_is_keras_epsilon_hat():
    # With |g| comparable to eps the placement of eps matters. Keras/TFF add
    # eps to sqrt(v) of the *uncorrected* v: at t=1 the step is
    # lr * |g| / (|g| + eps / sqrt(1 - b2)), not lr * |g| / (|g| + eps).
    lr, b2, eps, g = 0.01, 0.999, 1e-7, 1e-6
    p = {"w": np.zeros(3, dtype=np.float32)}
    opt = make_optimizer("adam", lr=lr, beta2=b2, eps=eps)
    opt.apply(p, {"w": np.full(3, g, dtype=np.float32)}, opt.init(p))
    keras = lr * g / (g + eps / math.sqrt(1 - b2))
    textbook = lr * g / (g + eps)
    np.testing.assert_allclose(p["w"], keras, rtol=1e-4)
    assert abs(float(p["w"][0]) - textbook) > 0.5 * textbook


def test_yogi_second_moment_sign_rule():
    b2 = 0.9
    p = {"w": np.zeros(1, dtype=np.float32)}
    opt = make_optimizer("yogi", beta2=b2, initial_accumulator=1.0)
    state = opt.init(p)
    v = state["w/v"]
    # g^2 = 4 > v = 1: v increases by (1 - b2) * g^2.
    opt.apply(p, {"w": np.array([2.0], np.float32)}, state)
    np.testing.assert_allclose(v, 1.0 + 0.1 * 4.0, rtol=1e-6)
    # g^2 = 0.25 < v = 1.4: v *decreases* by (1 - b2) * g^2 (additive, not
    # Adam's multiplicative b2 * v + (1 - b2) g^2 = 1.285).
    opt.apply(p, {"w": np.array([-0.5], np.float32)}, state)
    np.testing.assert_allclose(v, 1.4 - 0.1 * 0.25, rtol=1e-6)
    # g = 0: v unchanged (Adam would decay it).
    opt.apply(p, {"w": np.array([0.0], np.float32)}, state)
    np.testing.assert_allclose(v, 1.375, rtol=1e-6)


def test_yogi_bias_correction_scales_first_step():
    lr, b1, b2, eps, v0 = 0.01, 0.9, 0.999, 1e-3, 1e-6
    delta = np.array([0.2, -0.3], np.float32)
    steps = {}
    for bc in (True, False):
        p = {"w": np.zeros(2, dtype=np.float32)}
        opt = make_optimizer("yogi", lr=lr, bias_correction=bc)
        opt.apply(p, {"w": delta}, opt.init(p))
        steps[bc] = p["w"].astype(np.float64)
    g = -delta.astype(np.float64)
    m1 = (1 - b1) * g
    v1 = v0 + (1 - b2) * g * g  # v0 < g^2, so sign(v - g^2) = -1
    raw = -lr * m1 / (np.sqrt(v1) + eps)
    np.testing.assert_allclose(steps[False], raw, rtol=1e-5)
    np.testing.assert_allclose(steps[True], raw * math.sqrt(1 - b2) / (1 - b1), rtol=1e-5)


def test_float64_update_is_rounded_to_float32():
    rng = np.random.default_rng(9)
    pa = make_params(rng)
    pb = copy_dict(pa)
    upd32 = make_updates(rng, 1)[0]
    upd64 = {k: v.astype(np.float64) for k, v in upd32.items()}
    opt = make_optimizer("adam")
    sa, sb = opt.init(pa), opt.init(pb)
    opt.apply(pa, upd32, sa)
    opt.apply(pb, upd64, sb)
    for k in pa:
        assert pb[k].dtype == np.float32
        assert np.array_equal(pa[k], pb[k])


# --------------------------------------------------------------------------
# State layout, in-place semantics, persistence
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_layout(name):
    params = make_params(np.random.default_rng(3))
    opt = make_optimizer(name)
    state = opt.init(params)
    expected_keys = {"step"} | {f"{k}/{s}" for k in params for s in EXPECTED_SLOTS[name]}
    assert set(state) == expected_keys
    assert state["step"].shape == () and state["step"].dtype == np.int64
    assert int(state["step"]) == 0
    for k, p in params.items():
        for slot, init in EXPECTED_SLOTS[name].items():
            arr = state[f"{k}/{slot}"]
            assert arr.dtype == np.float32 and arr.shape == p.shape
            assert not np.shares_memory(arr, p)
            np.testing.assert_array_equal(arr, np.float32(init))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_apply_is_in_place(name):
    rng = np.random.default_rng(4)
    params = make_params(rng)
    param_objs = dict(params)
    views = {k: v[..., :2] for k, v in params.items()}
    before = copy_dict(params)
    opt = make_optimizer(name)
    state = opt.init(params)
    state_objs = dict(state)
    state_before = copy_dict(state)
    for upd in make_updates(rng, 2):
        opt.apply(params, upd, state)
    for k in params:
        assert params[k] is param_objs[k]
        assert np.shares_memory(params[k], views[k])
        assert np.array_equal(views[k], params[k][..., :2])  # view sees the new values
        assert not np.array_equal(params[k], before[k])
    for k in state:
        assert state[k] is state_objs[k]
        if EXPECTED_SLOTS[name] or k == "step":
            assert not np.array_equal(state[k], state_before[k])
    assert int(state["step"]) == 2


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_savez_roundtrip_continues_bit_identically(name, tmp_path):
    rng = np.random.default_rng(6)
    params_a = make_params(rng)
    updates = make_updates(rng, 5)
    opt = make_optimizer(name)
    state_a = opt.init(params_a)
    for upd in updates[:2]:
        opt.apply(params_a, upd, state_a)

    np.savez(tmp_path / "state.npz", **state_a)
    np.savez(tmp_path / "params.npz", **params_a)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as f:
        state_b = {k: f[k] for k in f.files}
    with np.load(tmp_path / "params.npz", allow_pickle=False) as f:
        params_b = {k: f[k] for k in f.files}
    assert set(state_b) == set(state_a)
    assert state_b["step"].shape == () and state_b["step"].dtype == np.int64

    for upd in updates[2:]:
        opt.apply(params_a, upd, state_a)
        opt.apply(params_b, upd, state_b)
    for k in params_a:
        assert np.array_equal(params_a[k].view(np.uint32), params_b[k].view(np.uint32))
    for k in state_a:
        assert state_a[k].dtype == state_b[k].dtype
        assert np.array_equal(state_a[k], state_b[k])
    assert int(state_b["step"]) == 5


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _setup(name="adam"):
    rng = np.random.default_rng(7)
    params = make_params(rng)
    opt = make_optimizer(name)
    state = opt.init(params)
    upd = make_updates(rng, 1)[0]
    return opt, params, state, upd


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda u: u.pop("item_bias"), r"missing: \['item_bias'\]"),
        (lambda u: u.update(extra=np.zeros(2, np.float32)), r"unexpected: \['extra'\]"),
        (
            lambda u: u.update(item_bias=np.zeros(N_ITEMS + 1, np.float32)),
            r"'item_bias' has shape",
        ),
        (lambda u: u["item_factors"].__setitem__((0, 0), np.nan), r"'item_factors'.*non-finite"),
        (lambda u: u["item_bias"].__setitem__(3, np.inf), r"'item_bias'.*non-finite"),
        (
            lambda u: u.update(item_bias=np.ones(N_ITEMS, np.int32)),
            r"'item_bias' must be a floating",  # a TypeError: the kind of array is wrong
        ),
        (
            lambda u: u.update(item_bias=np.full(N_ITEMS, 1e300)),
            r"'item_bias'.*non-finite",
        ),
    ],
    ids=["missing", "extra", "shape", "nan", "inf", "int", "overflow-float32"],
)
def test_apply_rejects_bad_update_without_side_effects(mutate, match):
    opt, params, state, upd = _setup()
    mutate(upd)
    params_before, state_before = copy_dict(params), copy_dict(state)
    with pytest.raises(TypeError if "floating" in match else ValueError, match=match):
        opt.apply(params, upd, state)
    for k in params:
        assert np.array_equal(params[k], params_before[k])
    for k in state:
        assert np.array_equal(state[k], state_before[k])


def test_apply_rejects_mismatched_state():
    opt, params, state, upd = _setup("adam")
    other_state = make_optimizer("adagrad").init(params)
    with pytest.raises(ValueError, match=r"missing: \[.*'item_bias/m'"):
        opt.apply(params, upd, other_state)
    del state["step"]
    with pytest.raises(ValueError, match=r"missing: \['step'\]"):
        opt.apply(params, upd, state)
    state["step"] = np.zeros((), np.int32)
    with pytest.raises(ValueError, match="'step' must be"):
        opt.apply(params, upd, state)
    state["step"] = np.zeros((), np.int64)
    state["item_bias/v"] = state["item_bias/v"].astype(np.float64)
    with pytest.raises(ValueError, match="'item_bias/v' must be a float32"):
        opt.apply(params, upd, state)


def test_init_and_apply_reject_bad_params():
    opt = make_optimizer("sgd")
    with pytest.raises(TypeError, match="'w' must be a float32"):
        opt.init({"w": np.zeros(3, np.float64)})
    with pytest.raises(TypeError, match="'w' must be a float32"):
        opt.init({"w": [0.0, 1.0]})
    frozen = np.zeros(3, np.float32)
    frozen.flags.writeable = False
    state = opt.init({"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="'w' is read-only"):
        opt.apply({"w": frozen}, {"w": np.ones(3, np.float32)}, state)


BAD_HYPERPARAMETERS = [
    ("sgd", {"lr": 0.0}, "lr"),
    ("sgd", {"lr": -1.0}, "lr"),
    ("sgd", {"lr": float("nan")}, "lr"),
    ("sgd", {"lr": float("inf")}, "lr"),
    ("sgd", {"lr": "0.1"}, "lr"),
    ("sgd", {"lr": True}, "lr"),
    ("momentum", {"momentum": 1.0}, "momentum"),
    ("momentum", {"momentum": -0.1}, "momentum"),
    ("momentum", {"nesterov": 1}, "nesterov"),
    ("adam", {"beta1": 1.0}, "beta1"),
    ("adam", {"beta1": -0.5}, "beta1"),
    ("adam", {"beta2": 1.5}, "beta2"),
    ("adam", {"beta2": float("nan")}, "beta2"),
    ("adam", {"eps": 0.0}, "eps"),
    ("adam", {"eps": -1e-8}, "eps"),
    ("adagrad", {"initial_accumulator": -0.1}, "initial_accumulator"),
    ("adagrad", {"eps": float("inf")}, "eps"),
    ("yogi", {"eps": 0.0}, "eps"),
    ("yogi", {"beta2": 1.0}, "beta2"),
    ("yogi", {"initial_accumulator": float("nan")}, "initial_accumulator"),
    ("yogi", {"bias_correction": "yes"}, "bias_correction"),
]


@pytest.mark.parametrize(("name", "kwargs", "arg"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise_naming_the_argument(name, kwargs, arg):
    # A value of the wrong kind (a string, a bool for a number, a number for a bool) is a
    # TypeError, a bad value of the right kind a ValueError: the package's one rule.
    value = next(iter(kwargs.values()))
    wrong_kind = isinstance(value, (str, bool)) or (
        arg in ("nesterov", "bias_correction") and not isinstance(value, bool)
    )
    with pytest.raises(TypeError if wrong_kind else ValueError, match=rf"^{arg} must"):
        make_optimizer(name, **kwargs)


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'") as excinfo:
        make_optimizer("rmsprop")
    for valid in ("sgd", "momentum", "adam", "adagrad", "yogi"):
        assert valid in str(excinfo.value)
    assert set(OPTIMIZER_NAMES) == {"sgd", "momentum", "adam", "adagrad", "yogi"}


def test_unknown_hyperparameter_is_rejected():
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['momentum'\]"):
        make_optimizer("adam", momentum=0.9)


def test_constructors_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        Adam(0.1)  # type: ignore[misc]
    opt = Adam(lr=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.lr = 0.2  # type: ignore[misc]
    assert opt.lr == 0.1


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def test_default_configs():
    assert make_optimizer("sgd").config() == {"name": "sgd", "lr": 1.0}
    assert make_optimizer("momentum").config() == {
        "name": "momentum",
        "lr": 1.0,
        "momentum": 0.9,
        "nesterov": False,
    }
    assert make_optimizer("adam").config() == {
        "name": "adam",
        "lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-7,
    }
    assert make_optimizer("adagrad").config() == {
        "name": "adagrad",
        "lr": 0.1,
        "initial_accumulator": 0.1,
        "eps": 1e-7,
    }
    assert make_optimizer("yogi").config() == {
        "name": "yogi",
        "lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-3,
        "initial_accumulator": 1e-6,
        "bias_correction": True,
    }


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_config_json_round_trip(name, kwargs):
    opt = make_optimizer(name, **kwargs)
    assert isinstance(opt, ServerOptimizer)
    cfg = opt.config()
    assert cfg["name"] == name == opt.name
    for k, v in kwargs.items():
        assert cfg[k] == v
    cfg_json = json.loads(json.dumps(cfg))
    cfg_copy = dict(cfg_json)
    rebuilt = optimizer_from_config(cfg_json)
    assert cfg_json == cfg_copy  # input not mutated
    assert type(rebuilt) is type(opt)
    assert rebuilt == opt
    assert rebuilt.config() == cfg


def test_numpy_scalar_hyperparameters_give_json_config():
    opt = make_optimizer("adam", lr=np.float32(0.5), beta1=np.float64(0.8))
    cfg = opt.config()
    assert type(cfg["lr"]) is float and type(cfg["beta1"]) is float
    assert json.loads(json.dumps(cfg)) == cfg


def test_optimizer_from_config_requires_name():
    with pytest.raises(ValueError, match="'name'"):
        optimizer_from_config({"lr": 0.1})
    with pytest.raises(TypeError, match="'name'"):
        optimizer_from_config(["sgd"])
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizer_from_config({"name": "fedprox"})


def test_classes_match_registry():
    assert isinstance(make_optimizer("sgd"), SGD)
    assert isinstance(make_optimizer("momentum"), MomentumSGD)
    assert isinstance(make_optimizer("adam"), Adam)
    assert isinstance(make_optimizer("adagrad"), Adagrad)
    assert isinstance(make_optimizer("yogi"), Yogi)


def test_apply_without_validation_gives_the_same_result():
    rng = np.random.default_rng(7)
    for name in ("sgd", "momentum", "adam", "adagrad", "yogi"):
        p1 = {"w": rng.standard_normal((5, 3)).astype(np.float32)}
        p2 = {"w": p1["w"].copy()}
        opt = make_optimizer(name)
        s1, s2 = opt.init(p1), opt.init(p2)
        for _ in range(3):
            d = {"w": rng.standard_normal((5, 3)).astype(np.float32)}
            opt.apply(p1, d, s1)
            opt.apply(p2, d, s2, validate=False)
        assert np.array_equal(p1["w"], p2["w"]), name
