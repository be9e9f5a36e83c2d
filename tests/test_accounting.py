"""Privacy accounting: (ε, δ) equal to dp-accounting called directly, a published figure, the
noise calibration, the budget stop, Poisson sampling, adaptive clipping, and checkpoints."""

import json
import math
import shutil

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import accounting, checkpoint
from fedrecon_fast.cli import main
from fedrecon_fast.privacy import adaptive_clip_update, value_noise_multiplier
from fedrecon_fast.sampling import poisson_sample_clients

dp_accounting = pytest.importorskip("dp_accounting", reason="the [dp] extra (dp-accounting) is not installed")
from dp_accounting.rdp import RdpAccountant  # noqa: E402

REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def direct_epsilon(sampling, n, m, z, rounds, delta, count_stddev=None):
    """ε from dp-accounting itself, with the events written out by hand."""
    g = dp_accounting.GaussianDpEvent
    if sampling == "fixed":  # replace-one: sensitivities 2C (sum) and 1 (count)
        parts = (
            [g(z / 2)] if count_stddev is None else [g(value_noise_multiplier(z, count_stddev) / 2), g(count_stddev)]
        )
        inner = parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(parts)
        acc = RdpAccountant(neighboring_relation=REPLACE_ONE)
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, inner), rounds)
    else:
        parts = [g(z)] if count_stddev is None else [g(value_noise_multiplier(z, count_stddev)), g(2 * count_stddev)]
        inner = parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(parts)
        acc = RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(m / n, inner), rounds)
    return acc.get_epsilon(delta)


SETTINGS = [  # (sampling, n, m, z, rounds, delta, count stddev)
    ("fixed", 4832, 100, 1.0, 500, 1e-5, None),
    ("fixed", 1000, 50, 2.5, 40, 1e-6, None),
    ("poisson", 4832, 100, 1.0, 500, 1e-5, None),
    ("poisson", 100_000, 1000, 0.7, 2000, 1e-7, None),
    ("poisson", 4832, 100, 1.0, 300, 1e-5, 5.0),
    ("fixed", 4832, 100, 1.5, 300, 1e-5, 5.0),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_epsilon_equals_dp_accounting_called_directly(setting):
    sampling, n, m, z, rounds, delta, stddev = setting
    acc = accounting.PrivacyAccountant(num_clients=n, clients_per_round=m, sampling=sampling, clip_count_stddev=stddev)
    acc.compose(z, rounds)
    assert acc.epsilon(delta) == direct_epsilon(sampling, n, m, z, rounds, delta, stddev)


def test_round_by_round_composition_equals_one_composition():
    step = accounting.PrivacyAccountant(num_clients=2000, clients_per_round=40, sampling="poisson")
    for _ in range(25):
        step.compose(1.1)
    assert step.rounds == 25 and step.ledger.tolist() == [[1.1, 25.0]]
    assert step.epsilon(1e-5) == direct_epsilon("poisson", 2000, 40, 1.1, 25, 1e-5)


def test_adaptive_clippings_count_is_counted():
    """The count's noise spends budget: the update alone (its own multiplier) would cost less,
    and update + count cost what one Gaussian with the total multiplier costs."""
    n, m, z, sb = 5000, 100, 1.0, 1.0
    both = accounting.PrivacyAccountant(num_clients=n, clients_per_round=m, sampling="poisson", clip_count_stddev=sb)
    both.compose(z, 200)
    alone = accounting.PrivacyAccountant(num_clients=n, clients_per_round=m, sampling="poisson")
    alone.compose(value_noise_multiplier(z, sb), 200)
    total = accounting.PrivacyAccountant(num_clients=n, clients_per_round=m, sampling="poisson")
    total.compose(z, 200)
    assert alone.epsilon(1e-5) < both.epsilon(1e-5)
    assert both.epsilon(1e-5) == pytest.approx(total.epsilon(1e-5), rel=1e-9)


def test_fixed_size_cohorts_are_accounted_with_replace_one_sensitivity():
    """Replacing one user moves the clipped sum by 2C: the same z costs more than Poisson's."""
    fixed = accounting.PrivacyAccountant(num_clients=4832, clients_per_round=100, sampling="fixed")
    poisson = accounting.PrivacyAccountant(num_clients=4832, clients_per_round=100, sampling="poisson")
    fixed.compose(2.0, 100)
    poisson.compose(2.0, 100)
    half = RdpAccountant(neighboring_relation=REPLACE_ONE)
    half.compose(dp_accounting.SampledWithoutReplacementDpEvent(4832, 100, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert fixed.epsilon(1e-5) == half.get_epsilon(1e-5) > poisson.epsilon(1e-5)


def test_abadi_et_al_2016_moments_accountant_figure():
    """Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), Section 3.1: with
    q = 0.01, σ = 4, δ = 1e-5 and T = 10,000 steps the moments accountant gives ε ≈ 1.26 (two
    decimals). Their bound converts the log moments (the RDP curve) with
    ε = min_α RDP(α) + log(1/δ) / (α - 1) (Mironov 2017, Prop. 3); dp-accounting's default
    conversion is tighter, so ours reports less for the same curve."""
    acc = accounting.PrivacyAccountant(num_clients=60_000, clients_per_round=600, sampling="poisson")
    acc.compose(4.0, 10_000)
    orders, rdp = acc.rdp()
    classic = float(np.min(rdp + math.log(1 / 1e-5) / (orders - 1)))
    assert abs(classic - 1.26) <= 0.005
    assert acc.epsilon(1e-5) < classic


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
@pytest.mark.slow
def test_calibrated_noise_is_the_smallest_within_budget(sampling):
    kw = dict(num_clients=3000, clients_per_round=60, sampling=sampling)
    z = accounting.calibrate_noise_multiplier(4.0, 1e-5, 50, tol=1e-3, **kw)
    acc = accounting.PrivacyAccountant(**kw)
    assert acc.epsilon(1e-5, extra_rounds=50, noise_multiplier=z) <= 4.0
    assert acc.epsilon(1e-5, extra_rounds=50, noise_multiplier=z - 2e-3) > 4.0


def test_calibration_refuses_a_count_noise_that_alone_exceeds_the_budget():
    with pytest.raises(ValueError, match="clipped-count noise std"):
        accounting.calibrate_noise_multiplier(
            0.5, 1e-5, 100, num_clients=1000, clients_per_round=20, sampling="poisson", clip_count_stddev=0.2
        )


def test_ledger_round_trip_and_validation():
    acc = accounting.PrivacyAccountant(num_clients=500, clients_per_round=10, sampling="poisson")
    acc.compose(1.0, 3)
    acc.compose(2.0, 4)
    other = accounting.PrivacyAccountant(num_clients=500, clients_per_round=10, sampling="poisson")
    other.restore(acc.ledger)
    assert other.rounds == 7 and other.epsilon(1e-6) == acc.epsilon(1e-6)
    with pytest.raises(ValueError, match="ledger"):
        other.restore([[1.0, 2.5]])
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.epsilon(1e-5, extra_rounds=1)


# --------------------------------------------------------------------------------------------
# Poisson sampling


def test_poisson_sampling_is_keyed_by_seed_and_round():
    a = poisson_sample_clients(10_000, 0.01, seed=3, round=7)
    assert np.array_equal(a, poisson_sample_clients(10_000, 0.01, seed=3, round=7))
    assert not np.array_equal(a, poisson_sample_clients(10_000, 0.01, seed=3, round=8))
    assert len(np.unique(a)) == len(a) and a.min() >= 0 and a.max() < 10_000
    assert poisson_sample_clients(0, 0.5, seed=0, round=0).size == 0


def test_poisson_sampling_takes_each_client_with_the_rate():
    n, q, rounds = 400, 0.05, 4000
    counts = np.zeros(n)
    sizes = []
    for r in range(rounds):
        c = poisson_sample_clients(n, q, seed=1, round=r)
        counts[c] += 1
        sizes.append(len(c))
    # Each client's frequency is Binomial(rounds, q)/rounds: std sqrt(q(1-q)/rounds) = 0.0034.
    assert np.abs(counts / rounds - q).max() < 6 * math.sqrt(q * (1 - q) / rounds)
    # Cohort sizes vary as Binomial(n, q) (variance n q (1 - q) = 19), not fixed.
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.15)


# --------------------------------------------------------------------------------------------
# Adaptive clipping


def test_adaptive_clip_converges_to_the_target_quantile_of_the_norms():
    """Update norms log-normal; the clip must settle at their γ quantile for several γ."""
    rng = np.random.default_rng(0)
    for gamma in (0.3, 0.5, 0.8):
        clip = 0.01
        tail = []
        for r in range(400):
            norms = rng.lognormal(mean=0.0, sigma=0.5, size=200)
            clip, _ = adaptive_clip_update(
                clip,
                int((norms <= clip).sum()),
                200,
                target_quantile=gamma,
                learning_rate=0.2,
                count_stddev=10.0,
                expected_records=200,
                seed=5,
                round=r,
            )
            if r >= 300:
                tail.append(clip)
        true_quantile = math.exp(0.5 * math.sqrt(2) * _erfinv(2 * gamma - 1))
        assert np.mean(tail) == pytest.approx(true_quantile, rel=0.05), gamma


def _erfinv(y: float) -> float:
    lo, hi = -6.0, 6.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid) < y else (lo, mid)
    return (lo + hi) / 2


def test_adaptive_clip_update_follows_tff_semantics():
    # No noise: b = unclipped / expected; C · exp(-η (b - γ)).
    clip, b = adaptive_clip_update(
        2.0, 30, 40, target_quantile=0.5, learning_rate=0.2, count_stddev=0.0, expected_records=40, seed=0, round=0
    )
    assert b == 0.75 and clip == pytest.approx(2.0 * math.exp(-0.2 * 0.25), rel=1e-15)
    # The estimate is clipped to [0, 1] and the noise is keyed by (seed, round).
    _, b = adaptive_clip_update(
        1.0, 40, 40, target_quantile=0.5, learning_rate=0.2, count_stddev=0.0, expected_records=10, seed=0, round=0
    )
    assert b == 1.0
    noisy = [
        adaptive_clip_update(
            1.0, 5, 10, target_quantile=0.5, learning_rate=0.2, count_stddev=2.0, expected_records=10, seed=1, round=r
        )
        for r in (0, 0, 1)
    ]
    assert noisy[0] == noisy[1] != noisy[2]


def test_value_noise_multiplier_splits_the_total():
    z, sb = 1.2, 3.0
    zv = value_noise_multiplier(z, sb)
    assert (zv**-2 + (2 * sb) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    assert value_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="too small"):
        value_noise_multiplier(2.0, 1.0)


# --------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def data():
    return ff.synthetic_ratings(num_users=600, num_items=150, seed=2).prepare(max_examples=100, shuffle_seed=2)


def dp_config(**kw):
    base = dict(dim=8, rounds=8, clients_per_round=30, dp_clip=0.3, weighting="uniform", dp_delta=1e-5)
    base.update(kw)
    return ff.preset("paper", **base)


def test_history_reports_epsilon_after_every_round(data):
    cfg = dp_config(dp_noise=1.3, sampling="poisson")
    trainer = ff.FedRecon(cfg).fit(data)
    eps = [h["dp_epsilon"] for h in trainer.history]
    for r, e in enumerate(eps, start=1):
        assert e == direct_epsilon("poisson", data.num_clients, 30, 1.3, r, 1e-5)
    assert all(h["dp_delta"] == 1e-5 for h in trainer.history)
    assert sorted(eps) == eps and len(set(eps)) == len(eps)
    assert len({h["clients"] for h in trainer.history}) > 1  # Poisson cohorts vary in size


@pytest.mark.slow
def test_target_epsilon_calibrates_then_the_budget_stops_training(data, caplog):
    cfg = dp_config(dp_target_epsilon=6.0)
    trainer = ff.FedRecon(cfg).fit(data)
    z = trainer.config.dp_noise
    assert z > 0 and trainer.model.config.dp_noise == z
    assert trainer.history[-1]["dp_epsilon"] <= 6.0 and trainer.round == 8
    assert trainer.history[-1]["dp_epsilon"] == direct_epsilon("fixed", data.num_clients, 30, z, 8, 1e-5)
    with caplog.at_level("WARNING", logger="fedrecon_fast.training"):
        trainer.fit(data, rounds=5)
    assert trainer.round == 8  # one more round would exceed the budget
    assert "privacy budget" in caplog.text


def test_explicit_noise_with_a_budget_runs_until_the_budget(data):
    cfg = dp_config(dp_noise=0.6, dp_target_epsilon=10.0, rounds=200, sampling="poisson")
    trainer = ff.FedRecon(cfg).fit(data)
    assert 0 < trainer.round < 200
    acc = accounting.PrivacyAccountant(num_clients=data.num_clients, clients_per_round=30, sampling="poisson")
    assert acc.epsilon(1e-5, extra_rounds=trainer.round, noise_multiplier=0.6) <= 10.0
    assert acc.epsilon(1e-5, extra_rounds=trainer.round + 1, noise_multiplier=0.6) > 10.0


def test_adaptive_clipping_in_training_settles_at_the_median_update_norm(data):
    cfg = dp_config(dp_clip=30.0, dp_noise=0.5, dp_target_quantile=0.5, dp_clip_lr=0.5, rounds=40)
    trainer = ff.FedRecon(cfg).fit(data)
    clips = [h["dp_clip"] for h in trainer.history]
    assert clips[0] == 30.0 and clips[-1] < 10.0  # nothing was clipped at 30: the clip fell
    late = trainer.history[-15:]
    clipped = sum(h["dp_clipped"] for h in late) / sum(h["reporting"] for h in late)
    assert 0.3 < clipped < 0.7
    # The norms the clip tracks: updates of the final model (the clip is applied before norms
    # are reported, so measure them unclipped).
    u = ff.client_updates(trainer.model.item_factors, data, np.arange(300), cfg.client, seed=0, round=40)
    norms = [np.linalg.norm(u.client(k)[1].astype(np.float64)) for k in range(len(u))]
    lo, hi = np.quantile(norms, [0.3, 0.7])
    assert lo < np.mean(clips[-10:]) < hi


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
@pytest.mark.slow
def test_dp_state_survives_a_checkpoint_exactly(data, tmp_path, sampling):
    cfg = dp_config(rounds=9, sampling=sampling, dp_target_quantile=0.5, dp_target_epsilon=9.0)
    whole = ff.FedRecon(cfg).fit(data)
    ff.FedRecon(cfg).fit(data, rounds=6, checkpoint_dir=tmp_path, checkpoint_every=4)
    shutil.rmtree(tmp_path / "ckpt-00000006")
    resumed = ff.FedRecon.from_checkpoint(tmp_path, cfg)  # dp_noise 0: take the calibrated one
    assert resumed.round == 4 and resumed.config.dp_noise == whole.config.dp_noise
    resumed.fit(data, rounds=5)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "round_seconds"} for h in hs]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    assert np.array_equal(resumed.model.item_factors, whole.model.item_factors)
    assert resumed._privacy.accountant.ledger.tolist() == whole._privacy.accountant.ledger.tolist()
    extra = checkpoint.latest(tmp_path)["extra"]
    assert set(extra) == {"dp_ledger", "dp_clip"} and extra["dp_ledger"].size == 2


@pytest.mark.slow
def test_cli_target_epsilon_reports_epsilon_and_the_noise_it_chose(tmp_path, capsys):
    args = [
        "train",
        "--rounds",
        "6",
        "--clients-per-round",
        "40",
        "--dim",
        "4",
        "--no-progress",
        "--json",
        "--dp-clip",
        "0.5",
        "--dp-target-epsilon",
        "8",
        "--dp-delta",
        "1e-5",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert 0 < result["dp_epsilon"] <= 8 and result["dp_delta"] == 1e-5 and result["dp_noise"] > 0
    n = result["train_users"]
    assert result["dp_epsilon"] == direct_epsilon("fixed", n, 40, result["dp_noise"], 6, 1e-5)
    assert "user-level" in result["dp_guarantee"] and any(line.startswith("privacy: (") for line in out)
    # A run killed after round 4 and resumed (--resume with the same options, noise left to
    # the calibration) ends where the uninterrupted run ended.
    ckpt = tmp_path / "ckpt"
    assert main(args + ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]) == 0
    shutil.rmtree(ckpt / "ckpt-00000006")
    capsys.readouterr()
    assert main(args + ["--checkpoint-dir", str(ckpt), "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("dp_epsilon", "dp_noise", "rounds_run", "test_rmse"):
        assert resumed[key] == result[key], key


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dp_target_epsilon=1.0), "dp_target_epsilon needs dp_clip and dp_delta"),
        (dict(dp_clip=1.0, weighting="examples"), "uniform"),
        (dict(dp_clip=1.0, weighting="uniform", dp_target_epsilon=1.0), "needs dp_clip and dp_delta"),
        (dict(dp_clip=1.0, weighting="uniform", dp_delta=1.5), "dp_delta"),
        (dict(dp_target_quantile=0.5), "needs dp_clip"),
        (dict(dp_clip=1.0, weighting="uniform", dp_target_quantile=1.5), "dp_target_quantile"),
        (dict(dp_clip=1.0, weighting="uniform", dp_target_quantile=0.5, dp_noise=20.0), "clipped-count noise std"),
        (dict(sampling="uniform"), "sampling"),
    ],
)
def test_config_rejects_inconsistent_privacy_options(kw, match):
    with pytest.raises(ValueError, match=match):
        ff.FedReconConfig().replace(**kw)
