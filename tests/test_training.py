"""The FedRecon trainer: it learns, it is deterministic, and its pieces behave."""

import numpy as np
import pytest

import fedrecon_fast as ff
import reference as ref


@pytest.fixture(scope="module")
def splits():
    data = ff.synthetic_ratings(num_users=400, num_items=300, seed=1).prepare(max_examples=300, shuffle_seed=1)
    tr, va, te = ff.split_users(data.num_clients, seed=1)
    return data.subset(tr), data.subset(va), data.subset(te)


def small(preset="paper", **kw):
    kw = {"rounds": 40, "clients_per_round": 40, "dim": 8, **kw}
    return ff.preset(preset, **kw)


# Untrained, "paper" predicts about 0 (RMSE ~3.7); "fast" already has the global mean and a
# reconstructed user bias (RMSE ~0.97), so its required gain is smaller.
@pytest.mark.parametrize(("name", "gain"), [("paper", 2.0), ("fast", 0.1)])
def test_training_lowers_reconeval_rmse_on_unseen_users(splits, name, gain):
    # Prepare
    train, val, test = splits
    untrained = ff.FedRecon(small(name, rounds=0)).fit(train).evaluate(test)
    # Execute
    trainer = ff.FedRecon(small(name)).fit(train, val)
    trained = trainer.evaluate(test)
    # Assert: a clear gain over the untrained model, and sane metrics
    assert trained["rmse"] < untrained["rmse"] - gain
    assert trained["rmse"] < 1.3
    assert 0.2 < trained["accuracy"] <= 1.0
    assert trained["users"] == test.num_clients and trained["ratings"] > 0
    assert "val_rmse" in trainer.history[-1] and len(trainer.history) == 40


def test_same_seed_same_model_for_any_thread_count(splits):
    train, val, _ = splits
    models = [ff.FedRecon(small("fast", rounds=5, num_threads=t)).fit(train).model for t in (1, 2, 3)]
    for m in models[1:]:
        assert np.array_equal(m.item_factors, models[0].item_factors)
        assert np.array_equal(m.item_bias, models[0].item_bias)
    other = ff.FedRecon(small("fast", rounds=5, seed=7)).fit(train).model
    assert not np.array_equal(other.item_factors, models[0].item_factors)


def test_fit_in_two_calls_equals_one_call(splits):
    train, _, _ = splits
    once = ff.FedRecon(small(rounds=6)).fit(train)
    twice = ff.FedRecon(small(rounds=6)).fit(train, rounds=2).fit(train, rounds=4)
    assert twice.round == 6
    assert np.array_equal(once.model.item_factors, twice.model.item_factors)


def test_history_metrics_and_eval_schedule(splits):
    train, val, _ = splits
    trainer = ff.FedRecon(small(rounds=6, eval_every=3)).fit(train, val)
    evaluated = [h["round"] for h in trainer.history if "val_rmse" in h]
    assert evaluated == [3, 6]
    h = trainer.history[0]
    assert h["clients"] == 40 and h["reporting"] <= 40 and h["nonfinite"] == 0
    assert h["train_rmse"] == pytest.approx(np.sqrt(h["train_loss"]))
    assert trainer.train_seconds > 0 and trainer.eval_seconds > 0


def test_divergence_stops_training_with_a_clear_error(splits):
    # (Dropping and counting individual non-finite clients is tested on the kernels.)
    train, _, _ = splits
    trainer = ff.FedRecon(small(rounds=2, client_lr=1e30))
    with pytest.raises(FloatingPointError, match="training diverged in round"):
        trainer.fit(train)
    assert np.isfinite(trainer.model.item_factors).all()


def test_sample_clients_is_a_pure_function_of_seed_and_round():
    a = ff.sample_clients(100, 30, seed=3, round=5)
    assert len(np.unique(a)) == 30 and a.min() >= 0 and a.max() < 100
    assert np.array_equal(a, ff.sample_clients(100, 30, seed=3, round=5))
    assert not np.array_equal(a, ff.sample_clients(100, 30, seed=3, round=6))
    assert np.array_equal(np.sort(ff.sample_clients(10, 30, seed=0, round=0)), np.arange(10))


@pytest.mark.parametrize(
    ("num_clients", "m"), [(0, 5), (1, 1), (7, 3), (100, 100), (2399, 100), (70_000, 9), (10**9, 50), (2**62 + 3, 20)]
)
@pytest.mark.parametrize("seed", [0, 11])
def test_sample_clients_matches_reference(num_clients, m, seed):
    # Both the dense and the hash-table population paths draw the reference shuffle exactly.
    for r in (0, 1, 2**64 - 1):
        assert np.array_equal(ff.sample_clients(num_clients, m, seed, r), ref.sample_clients(num_clients, m, seed, r))


def test_sample_clients_is_uniform():
    # Each of 20 clients is drawn 5 times in 100 rounds on average; the position in the cohort
    # is uniform too (chi-square over 5,000 draws, generous bounds).
    counts = np.zeros((20, 5))
    for r in range(1000):
        for pos, c in enumerate(ff.sample_clients(20, 5, seed=1, round=r)):
            counts[c, pos] += 1
    expected = 1000 * 5 / 100
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 160  # 99 degrees of freedom: P(chi2 > 160) < 1e-4


def test_sample_clients_rejects_bad_arguments():
    with pytest.raises(ValueError, match="clients_per_round"):
        ff.sample_clients(10, 0, 0, 0)
    with pytest.raises(ValueError, match="num_clients"):
        ff.sample_clients(-1, 3, 0, 0)
    with pytest.raises(TypeError, match="seed"):
        ff.sample_clients(10, 3, 0.5, 0)


def test_every_server_optimizer_trains(splits):
    train, val, _ = splits
    for name, lr in (("sgd", 1.0), ("momentum", 0.5), ("adam", 0.01), ("adagrad", 0.1), ("yogi", 0.01)):
        trainer = ff.FedRecon(small(rounds=10, server_optimizer=name, server_lr=lr)).fit(train)
        assert np.isfinite(trainer.evaluate(val)["rmse"]), name


def test_paper_preset_is_the_published_recipe():
    p = ff.preset("paper")
    c = p.client
    assert (p.dim, p.rounds, p.clients_per_round, p.max_examples, p.biases) == (50, 500, 100, 300, False)
    assert (p.server_optimizer, p.server_lr) == ("sgd", 1.0)
    assert (c.batch_size, c.split, c.recon, c.init, c.init_scale) == (5, "batches", "sgd", "uniform", 0.05)
    assert c.reshuffle  # seeded per (seed, round, client), as tf.data's shuffle each iteration
    assert (c.recon_epochs, c.recon_steps_max, c.recon_lr) == (5, 50, 0.1)
    assert (c.update_epochs, c.update_steps_max, c.client_lr) == (1, 50, 0.5)
    assert (c.recon_l2, c.update_l2, c.joint, c.weighting) == (0.0, 0.0, False, "examples")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="preset"):
        ff.preset("nope")
    with pytest.raises(ValueError, match="client_lr"):
        ff.preset("paper", client_lr=-1.0)
    with pytest.raises(ValueError, match="dim"):
        ff.FedReconConfig(dim=0)
    with pytest.raises(ValueError, match="server_optimizer"):
        ff.FedReconConfig(server_optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown configuration"):
        ff.preset("paper", colour="red")
    with pytest.raises(TypeError, match="batch_size"):
        ff.ClientConfig(batch_size=2.5)
    cfg = ff.preset("fast", rounds=3)
    assert ff.FedReconConfig.from_dict(cfg.to_dict()) == cfg


def test_fit_rejects_empty_or_mismatched_data(splits):
    train, _, _ = splits
    with pytest.raises(ValueError, match="no clients"):
        ff.FedRecon(small()).fit(train.subset(np.array([], dtype=np.int64)))
    import scipy.sparse as sp

    matrix = sp.csr_matrix(([4.0, 5.0], ([0, 2], [1, 1])), shape=(3, train.num_items))
    with pytest.raises(ValueError, match="without ratings"):
        ff.FedRecon(small()).fit(ff.ClientData.from_scipy(matrix))
    other = ff.synthetic_ratings(num_users=50, num_items=20, seed=0)
    trainer = ff.FedRecon(small(rounds=1)).fit(train)
    with pytest.raises(ValueError, match="item indexing"):
        trainer.fit(other, rounds=1)


def test_dp_fedavg_fixed_denominator_and_seeded_noise(splits):
    train, _, _ = splits
    plain = ff.FedRecon(small(rounds=3, weighting="uniform")).fit(train)
    # A clip no update reaches and no noise: the fixed denominator (clients_per_round) equals
    # the number of reporting clients here, so the model is unchanged.
    loose = ff.FedRecon(small(rounds=3, weighting="uniform", dp_clip=1e9)).fit(train)
    assert all(h["reporting"] == 40 for h in loose.history)
    np.testing.assert_allclose(loose.model.item_factors, plain.model.item_factors, rtol=1e-6, atol=1e-7)
    assert loose.history[-1]["dp_clipped"] == 0 and loose.history[-1]["dp_noise_std"] == 0
    noisy = [ff.FedRecon(small(rounds=3, weighting="uniform", dp_clip=0.05, dp_noise=1.0)).fit(train) for _ in range(2)]
    assert np.array_equal(noisy[0].model.item_factors, noisy[1].model.item_factors)
    assert not np.allclose(noisy[0].model.item_factors, plain.model.item_factors)
    assert noisy[0].history[0]["dp_clipped"] > 0
    assert noisy[0].history[0]["dp_clip_fraction"] == noisy[0].history[0]["dp_clipped"] / 40
    assert noisy[0].history[0]["dp_noise_std"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="uniform"):
        small(dp_clip=1.0)


def test_bits_are_counted_every_round(splits):
    train, _, _ = splits
    t = ff.FedRecon(small(rounds=2, quantize_bits=8, quantize_threshold=0, sparse_updates=True)).fit(train)
    h = t.history
    model_floats = t.model.item_factors.size
    assert h[0]["broadcasted_bits"] == 32 * 40 * model_floats
    assert h[1]["aggregated_bits_total"] == h[0]["aggregated_bits"] + h[1]["aggregated_bits"] == t.aggregated_bits
    assert 0 < h[0]["aggregated_bits"] < 8 * 2 * h[0]["rows_sent"] * 8


# ----------------------------------------------------------------- learned default u (cold start)


@pytest.mark.parametrize("name", ["paper", "fast"])
def test_learned_user_default_is_the_weighted_mean_of_the_clients_offsets(splits, name):
    train, _, _ = splits
    trainer = ff.FedRecon(small(name, rounds=3, learn_user_default=True))
    trainer.fit(train, rounds=2)
    model = trainer.model
    u0, b0 = model.user_default.copy(), model.user_bias_default
    # The next round by hand: every client starts from the default, the server (SGD, lr 1)
    # moves it by the example-weighted mean of the final embeddings' offsets.
    cfg, r = trainer.config, trainer.round
    clients = ff.sample_clients(train.num_clients, cfg.clients_per_round, cfg.seed, r)
    state = {"users": np.tile(u0, (len(clients), 1))}
    if model.item_bias is not None:
        state["user_bias"] = np.full(len(clients), b0, np.float32)
    res = ff.train_round(
        model.item_factors,
        train,
        clients,
        cfg.client,
        item_bias=model.item_bias,
        global_mean=model.global_mean,
        seed=cfg.seed,
        round=r,
        **model.default_kwargs(),
        **state,
    )
    w = res.client_stats["weight"]
    expected = u0 + ((w[:, None] * (res.users - u0)).sum(0) / w.sum()).astype(np.float32)
    trainer.fit(train, rounds=1)
    np.testing.assert_allclose(model.user_default, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(model.user_default, u0)
    if model.item_bias is not None:
        expected_b = b0 + (w * (res.user_bias - b0)).sum() / w.sum()
        assert model.user_bias_default == pytest.approx(expected_b, rel=1e-5, abs=1e-7)


def test_learned_user_default_trains_saves_and_serves_cold_start(splits, tmp_path):
    train, val, test = splits
    trainer = ff.FedRecon(small("fast", learn_user_default=True)).fit(train, val)
    model = trainer.model
    assert trainer.evaluate(test)["rmse"] < 1.3
    # Reconstruction really starts from the default: a user without support data keeps it.
    nobody = ff.ClientData(
        np.zeros(3, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), item_ids=train.item_ids
    )  # two users without ratings
    users, user_bias = ff.reconstruct_users(
        model.item_factors,
        nobody,
        [0, 1],
        model.config.client,
        item_bias=model.item_bias,
        global_mean=model.global_mean,
        **model.default_kwargs(),
    )
    assert np.array_equal(user_bias, np.full(2, np.float32(model.user_bias_default)))
    assert np.array_equal(users, np.tile(model.user_default, (2, 1)))
    loaded = ff.GlobalModel.load(model.save(tmp_path / "m"))
    assert np.array_equal(loaded.user_default, model.user_default)
    assert loaded.user_bias_default == model.user_bias_default
    assert ff.recon_eval(loaded, test) == ff.recon_eval(model, test)
    # Same seed, same default, whatever the thread count.
    again = ff.FedRecon(small("fast", learn_user_default=True, num_threads=1)).fit(train, val).model
    assert np.array_equal(again.user_default, model.user_default)


def test_learned_user_default_rejects_dp_and_stateful_fedavg():
    with pytest.raises(ValueError, match="learn_user_default"):
        ff.preset("paper", learn_user_default=True, dp_clip=1.0, weighting="uniform")
    from fedrecon_fast.baselines import FedAvg, fedavg_config

    with pytest.raises(ValueError, match="learn_user_default"):
        FedAvg(fedavg_config(learn_user_default=True))
    with pytest.raises(TypeError, match="learn_user_default"):
        ff.preset("paper", learn_user_default=1)
