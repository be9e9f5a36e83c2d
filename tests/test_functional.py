"""client_step + server_step reproduce FedRecon's fused native round, and reject bad inputs."""

import doctest

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import functional as F


@pytest.fixture(scope="module")
def train():
    data = ff.synthetic_ratings(num_users=150, num_items=90, seed=4).prepare(max_examples=300, shuffle_seed=4)
    return data.subset(ff.split_users(data.num_clients, seed=4)[0])


def run_functional(config, train, rounds):
    state = F.server_init(config, data=train)
    for _ in range(rounds):
        cohort = ff.sample_clients(train.num_clients, config.clients_per_round, config.seed, state.round)
        results = [F.client_step(state.model, train, config, client=int(c), round=state.round) for c in cohort]
        state = F.server_step(state, results)
        yield state


CONFIGS = {
    "paper": ("paper", {}),
    "fast-biases-exact": ("fast", {}),
    "sparse-8bit": ("paper", dict(quantize_bits=8, quantize_threshold=0, sparse_updates=True)),
    "dense-4bit-tensor": ("paper", dict(quantize_bits=4, quantize_threshold=0)),
    "dense-3bit-row-hadamard-biases": (
        "fast",
        dict(quantize_bits=3, quantize_threshold=0, quantize_scaling="row", hadamard=True),
    ),
    "dp": ("paper", dict(dp_clip=0.5, dp_noise=0.3, weighting="uniform")),
    "adam": ("fast", dict(server_optimizer="adam", server_lr=0.01)),
}


@pytest.mark.parametrize("cohort", [20, 110])
@pytest.mark.parametrize("name", CONFIGS)
def test_client_and_server_steps_equal_the_fused_round(train, name, cohort):
    preset, overrides = CONFIGS[name]
    config = ff.preset(preset, dim=8, rounds=3, clients_per_round=cohort, seed=2, **overrides)
    trainer = ff.FedRecon(config).fit(train)
    states = list(run_functional(config, train, 3))
    final = states[-1].model
    # server_step reduces along the fused round's tree over cohort positions: bit-equal.
    assert np.array_equal(final.item_factors, trainer.model.item_factors)
    if trainer.model.item_bias is not None:
        assert np.array_equal(final.item_bias, trainer.model.item_bias)
    for state, row in zip(states, trainer.history):
        for key, value in row.items():
            if key != "round_seconds":
                assert state.metrics[key] == value, key
    assert states[-1].broadcasted_bits == trainer.broadcasted_bits
    assert states[-1].aggregated_bits == trainer.aggregated_bits


def test_own_ratings_with_client_id_equal_a_row_of_the_training_data(train):
    config = ff.preset("fast", dim=8)
    model = ff.GlobalModel.initialize(train.item_ids, config, global_mean=3.5)
    k = 7
    lo, hi = train.indptr[k], train.indptr[k + 1]
    own = (train.items[lo:hi], train.ratings[lo:hi])
    a = F.client_step(model, train, config, client=k, round=3)
    b = F.client_step(model, own, config, client_id=k, round=3)
    c = F.client_step(model, train.subset([k]), config, client_id=k, round=3)
    params = {"item_factors": model.item_factors, "item_bias": model.item_bias, "global_mean": 3.5}
    d = F.client_step(params, own, config, client_id=k, round=3)
    for r in (b, c, d):
        assert np.array_equal(r.update.rows, a.update.rows)
        assert np.array_equal(r.update.values, a.update.values)
        assert np.array_equal(r.update.bias_values, a.update.bias_values)
        assert r.weight == a.weight and r.metrics == a.metrics
    # Another client id is another random stream (split order and initial u).
    e = F.client_step(model, own, config.replace(recon="sgd", reshuffle=True), client_id=k + 1, round=3)
    f = F.client_step(model, own, config.replace(recon="sgd", reshuffle=True), client_id=k, round=3)
    assert not np.array_equal(e.update.values, f.update.values)


def test_client_result_contents(train):
    config = ff.preset("paper", dim=8, quantize_bits=8, quantize_threshold=0, sparse_updates=True)
    model = ff.GlobalModel.initialize(train.item_ids, config)
    r = F.client_step(model, train, config, client=3, round=1)
    u = r.update
    assert r.weight == r.metrics["num_examples"] > 0 and r.metrics["status"] == 0
    assert len(u) == r.metrics["rows"] and u.values.shape == (len(u), 8) and u.bias_values is None
    assert len(np.unique(u.rows)) == len(u) and np.isin(u.rows, train.items[train.indptr[3] : train.indptr[4]]).all()
    rows, values = ff.compression.decode_sparse(u.encoded)
    assert np.array_equal(rows, u.rows) and np.array_equal(values, u.values)
    assert r.metrics["bytes"] == len(u.encoded)
    assert r.metrics["rmse"] == pytest.approx(np.sqrt(r.metrics["loss_sum"] / r.metrics["num_examples"]))
    delta, bias = u.to_dense()
    assert delta.shape == model.item_factors.shape and bias is None
    assert np.array_equal(delta[u.rows], u.values) and np.count_nonzero(delta.any(1)) <= len(u)
    # Deterministic from (seed, round, client id).
    again = F.client_step(model, train, config, client=3, round=1)
    assert np.array_equal(again.update.values, u.values) and again.update.encoded == u.encoded


def test_server_step_leaves_the_state_alone_unless_inplace(train):
    config = ff.preset("paper", dim=8, clients_per_round=5, server_optimizer="adam", server_lr=0.01)
    state = F.server_init(config, data=train)
    V0 = state.model.item_factors.copy()
    results = [F.client_step(state.model, train, config, client=c) for c in range(5)]
    new = F.server_step(state, results)
    assert np.array_equal(state.model.item_factors, V0) and state.round == 0
    assert int(state.optimizer_state["step"]) == 0 and int(new.optimizer_state["step"]) == 1
    assert not np.array_equal(new.model.item_factors, V0) and new.round == 1
    same = F.server_step(state, results, inplace=True)
    assert same.model is state.model and np.array_equal(state.model.item_factors, new.model.item_factors)


def test_non_finite_clients_do_not_report_and_all_of_them_is_divergence(train):
    config = ff.preset("paper", dim=8, client_lr=1e30, update_epochs=5, update_steps_max=None)
    state = F.server_init(config, data=train)
    results = [F.client_step(state.model, train, config, client=c) for c in range(4)]
    assert all(r.weight == 0 and r.metrics["status"] == 1 and len(r.update) == 0 for r in results)
    V0 = state.model.item_factors.copy()
    with pytest.raises(FloatingPointError, match="training diverged in round 0"):
        F.server_step(state, results)
    assert np.array_equal(state.model.item_factors, V0)
    fine = F.client_step(state.model, train, ff.preset("paper", dim=8), client=5)
    new = F.server_step(state, results + [fine])
    assert new.metrics["nonfinite"] == 4 and new.metrics["reporting"] == 1


def test_client_evaluate_equals_recon_eval(train):
    config = ff.preset("fast", dim=8)
    model = ff.GlobalModel.initialize(train.item_ids, config, global_mean=3.5)
    users = [F.client_evaluate(model, train, config, client=k) for k in range(train.num_clients)]
    pooled = ff.evaluation.summarize(
        [u["sq_err_sum"] for u in users],
        [u["num_examples"] for u in users],
        [u["num_correct"] for u in users],
        abs_err_sum=[u["abs_err_sum"] for u in users],
    )
    expected = ff.recon_eval(model, train, config=config.evaluation, seed=config.seed, k=None)
    assert pooled == expected
    assert users[3]["rmse"] == ff.recon_eval(model, train, [3], config.evaluation, seed=config.seed)["rmse"]


def test_module_example_runs():
    failures, tests = doctest.testmod(F, optionflags=doctest.ELLIPSIS)
    assert tests > 0 and failures == 0


def test_bad_inputs_are_named(train):
    config = ff.preset("fast", dim=8)
    model = ff.GlobalModel.initialize(train.item_ids, config)
    own = (train.items[:5], train.ratings[:5])
    with pytest.raises(TypeError, match="model must be a GlobalModel or a dict"):
        F.client_step(model.item_factors, train, config, client=0)
    with pytest.raises(ValueError, match="item_factors"):
        F.client_step({"V": model.item_factors}, train, config, client=0)
    with pytest.raises(ValueError, match="unknown keys"):
        F.client_step({"item_factors": model.item_factors, "user": 1}, train, config, client=0)
    with pytest.raises(TypeError, match="config must be"):
        F.client_step(model, train, {"dim": 8}, client=0)
    with pytest.raises(ValueError, match="client is required"):
        F.client_step(model, train, config)
    with pytest.raises(ValueError, match="client must lie in"):
        F.client_step(model, train, config, client=train.num_clients)
    with pytest.raises(TypeError, match="client must be an integer"):
        F.client_step(model, train, config, client=1.0)
    with pytest.raises(ValueError, match="client_id is required"):
        F.client_step(model, own, config)
    with pytest.raises(ValueError, match="client_id must be >= 0"):
        F.client_step(model, own, config, client_id=-1)
    with pytest.raises(ValueError, match="items must lie in"):
        F.client_step(model, (np.array([0, 10_000]), np.ones(2)), config, client_id=0)
    with pytest.raises(TypeError, match="items must be a 1-D integer array"):
        F.client_step(model, (np.array([0.0, 1.0]), np.ones(2)), config, client_id=0)
    with pytest.raises(ValueError, match="ratings must have length 5"):
        F.client_step(model, (own[0], own[1][:3]), config, client_id=0)
    with pytest.raises(ValueError, match="ratings contains NaN"):
        F.client_step(model, (own[0], np.full(5, np.nan)), config, client_id=0)
    with pytest.raises(TypeError, match="data must be a ClientData"):
        F.client_step(model, [own], config, client_id=0)
    with pytest.raises(ValueError, match="round must be >= 0"):
        F.client_step(model, train, config, client=0, round=-1)

    state = F.server_init(config, model=model)
    good = F.client_step(model, train, config, client=0)
    with pytest.raises(TypeError, match="state must be a ServerState"):
        F.server_step(model, [good])
    with pytest.raises(ValueError, match="at least one"):
        F.server_step(state, [])
    with pytest.raises(TypeError, match="sequence of ClientResult"):
        F.server_step(state, good)
    with pytest.raises(TypeError, match=r"results\[1\] must be a ClientResult"):
        F.server_step(state, [good, good.update])
    narrow = F.client_step(
        ff.GlobalModel.initialize(train.item_ids, config.replace(dim=4)), train, config.replace(dim=4), client=0
    )
    with pytest.raises(ValueError, match=r"results\[0\] does not fit the model"):
        F.server_step(state, [narrow])
    unbiased = F.client_step({"item_factors": model.item_factors}, train, config, client=0)
    with pytest.raises(ValueError, match="lacks item-bias values"):
        F.server_step(state, [unbiased])
    with pytest.raises(ValueError, match=r"results\[0\].weight must be >= 0"):
        F.server_step(state, [F.ClientResult(good.update, -1.0, good.metrics)])
    with pytest.raises(ValueError, match="give model or data"):
        F.server_init(config)
    with pytest.raises(TypeError, match="config must be a FedReconConfig"):
        F.server_init(config.client, data=train)
