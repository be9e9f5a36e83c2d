"""Privacy accounting of DP-FedAvg training: ``(ε, δ)`` so far, noise calibration, a budget.

What is guaranteed
------------------
**User-level** differential privacy of the released global model (every round's noised
aggregate): one client is one user, and its whole contribution to a round (its clipped update
and, with adaptive clipping, its bit in the clipped count) is bounded. The adjacency relation
and the privacy amplification depend on how the round's clients are sampled
(``FedReconConfig.sampling``):

* ``"fixed"`` (the default): a cohort of ``m`` distinct clients out of ``n``. The matching
  analysis is sampling without replacement under the **replace-one** relation (``n`` is public;
  neighbouring data sets differ in one user's data), Wang, Balle and Kasiviswanathan,
  "Subsampled Rényi Differential Privacy and Analytical Moments Accountant" (AISTATS 2019),
  dp-accounting's ``SampledWithoutReplacementDpEvent``. Replacing one user moves the sum of
  clipped updates by up to ``2 C``, so the accountant sees the noise multiplier ``z / 2``.
* ``"poisson"``: every client takes part independently with probability ``q = m / n``; the
  **add-or-remove-one** relation (one user's data present or absent) and the Poisson
  subsampled Gaussian (Mironov, Talwar and Zhang 2019), ``PoissonSampledDpEvent``, with
  sensitivity ``C`` and multiplier ``z``.

The accountant is dp-accounting's Rényi-DP accountant over its default orders, converted to
``(ε, δ)`` with its (tight) conversion. Not covered: updates quantized after clipping (rounding
can push a norm past ``C``), ``learn_user_default`` (refused with DP), and anything released
besides the model (the per-round metrics that read clients' losses are not private).

The accountant's state is the list of ``(noise multiplier, rounds)`` it composed, so a
checkpoint of a few numbers restores it exactly.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ._validation import check_choice, check_float, check_int

__all__ = [
    "SAMPLINGS",
    "PrivacyAccountant",
    "RunPrivacy",
    "calibrated_config",
    "round_event",
    "neighboring_relation",
    "calibrate_noise_multiplier",
    "count_stddev",
]

#: Client sampling schemes the accountant knows (see :mod:`fedrecon_fast.sampling`).
SAMPLINGS = ("fixed", "poisson")
# Lower end of the calibration's search: the without-replacement bound divides by z², and no
# useful budget is met with less noise than this.
_MIN_NOISE = 1e-2


def _dp():
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise ImportError('privacy accounting needs dp-accounting: pip install "fedrecon_fast[dp]"') from None
    return dp_accounting, rdp


def count_stddev(clients_per_round: int, stddev: float | None = None) -> float:
    """Noise std of adaptive clipping's count: ``stddev``, or TFF's default ``0.05 · m``."""
    return 0.05 * clients_per_round if stddev is None else float(stddev)


def neighboring_relation(sampling: str):
    """dp-accounting's neighbouring relation for a sampling scheme (see the module docstring)."""
    check_choice(sampling, "sampling", SAMPLINGS)
    dp_accounting, _ = _dp()
    rel = dp_accounting.NeighboringRelation
    return rel.REPLACE_ONE if sampling == "fixed" else rel.ADD_OR_REMOVE_ONE


def round_event(
    noise_multiplier: float,
    *,
    num_clients: int,
    clients_per_round: int,
    sampling: str = "fixed",
    clip_count_stddev: float | None = None,
):
    """One DP-FedAvg round as a dp-accounting ``DpEvent``.

    Parameters
    ----------
    noise_multiplier : float
        ``z``: the noise std on the sum of clipped updates is ``z · C``. With adaptive clipping
        ``z`` is the total (TFF's convention), split by
        :func:`fedrecon_fast.privacy.value_noise_multiplier` between the update and the count.
    num_clients, clients_per_round : int
        ``n`` training clients, ``m`` per round (the expected number with Poisson sampling).
    sampling : {"fixed", "poisson"}
    clip_count_stddev : float, optional
        ``σ_b`` of adaptive clipping's count; None without adaptive clipping.
    """
    from .privacy import value_noise_multiplier

    dp_accounting, _ = _dp()
    check_float(noise_multiplier, "noise_multiplier", minimum=0.0)
    check_int(num_clients, "num_clients", minimum=1)
    check_int(clients_per_round, "clients_per_round", minimum=1)
    check_choice(sampling, "sampling", SAMPLINGS)
    gaussian = dp_accounting.GaussianDpEvent
    # Multipliers relative to the add/remove sensitivities (C for the sum, 1/2 for the count).
    if clip_count_stddev is None:
        parts = [noise_multiplier]
    else:
        parts = [value_noise_multiplier(noise_multiplier, clip_count_stddev), 2.0 * clip_count_stddev]
    m = min(clients_per_round, num_clients)
    if sampling == "fixed":
        # Replace-one doubles both sensitivities.
        inner = [gaussian(p / 2.0) for p in parts]
        inner = inner[0] if len(inner) == 1 else dp_accounting.ComposedDpEvent(inner)
        return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, m, inner)
    inner = [gaussian(p) for p in parts]
    inner = inner[0] if len(inner) == 1 else dp_accounting.ComposedDpEvent(inner)
    return dp_accounting.PoissonSampledDpEvent(m / num_clients, inner)


@functools.lru_cache(maxsize=32)
def _event_rdp(
    noise_multiplier: float, num_clients: int, clients_per_round: int, sampling: str, clip_count_stddev: float | None
) -> np.ndarray:
    """RDP of one round at dp-accounting's default orders (cached: a round's costs ~0.1-0.5 s)."""
    _, rdp = _dp()
    accountant = rdp.RdpAccountant(neighboring_relation=neighboring_relation(sampling))
    accountant.compose(
        round_event(
            noise_multiplier,
            num_clients=num_clients,
            clients_per_round=clients_per_round,
            sampling=sampling,
            clip_count_stddev=clip_count_stddev,
        )
    )
    values = np.array(accountant.rdp, dtype=np.float64)
    values.flags.writeable = False
    return values


class PrivacyAccountant:
    """``(ε, δ)`` of the DP rounds run so far, for one training set-up.

    Composition follows dp-accounting's ``RdpAccountant`` exactly: the RDP curve is
    ``Σ_runs count · rdp(event)`` in the order the runs were composed, which is what a fresh
    ``RdpAccountant`` composing the same ``(event, count)`` pairs holds, so :meth:`epsilon`
    equals its ``get_epsilon`` bit for bit.

    Parameters
    ----------
    num_clients, clients_per_round : int
    sampling : {"fixed", "poisson"}
    clip_count_stddev : float, optional
        Adaptive clipping's count noise ``σ_b`` (None: fixed clipping).
    """

    def __init__(
        self,
        *,
        num_clients: int,
        clients_per_round: int,
        sampling: str = "fixed",
        clip_count_stddev: float | None = None,
    ):
        check_int(num_clients, "num_clients", minimum=1)
        check_int(clients_per_round, "clients_per_round", minimum=1)
        check_choice(sampling, "sampling", SAMPLINGS)
        if clip_count_stddev is not None:
            check_float(clip_count_stddev, "clip_count_stddev", minimum=0.0)
            clip_count_stddev = float(clip_count_stddev)
        self.num_clients = int(num_clients)
        self.clients_per_round = int(clients_per_round)
        self.sampling = sampling
        self.clip_count_stddev = clip_count_stddev
        self._runs: list[tuple[float, int]] = []

    def event(self, noise_multiplier: float):
        """The ``DpEvent`` of one round with ``noise_multiplier``."""
        return round_event(
            noise_multiplier,
            num_clients=self.num_clients,
            clients_per_round=self.clients_per_round,
            sampling=self.sampling,
            clip_count_stddev=self.clip_count_stddev,
        )

    def compose(self, noise_multiplier: float, rounds: int = 1) -> None:
        """Account for ``rounds`` more rounds with ``noise_multiplier``."""
        check_float(noise_multiplier, "noise_multiplier", minimum=0.0)
        check_int(rounds, "rounds", minimum=0)
        if rounds == 0:
            return
        z = float(noise_multiplier)
        if self._runs and self._runs[-1][0] == z:
            self._runs[-1] = (z, self._runs[-1][1] + int(rounds))
        else:
            self._runs.append((z, int(rounds)))

    @property
    def rounds(self) -> int:
        """Rounds composed so far."""
        return sum(count for _, count in self._runs)

    @property
    def ledger(self) -> np.ndarray:
        """The composed runs as a ``(k, 2)`` float64 array of ``(noise multiplier, rounds)``."""
        return np.array(self._runs, dtype=np.float64).reshape(-1, 2)

    def restore(self, ledger) -> None:
        """Replace the composed rounds by a :attr:`ledger` (e.g. from a checkpoint)."""
        ledger = np.asarray(ledger, dtype=np.float64)
        if (
            ledger.ndim != 2
            or ledger.shape[1] != 2
            or not np.isfinite(ledger).all()
            or (ledger < 0).any()
            or (ledger[:, 1] != np.round(ledger[:, 1])).any()
        ):
            raise ValueError("ledger must be (k, 2) rows of (noise multiplier >= 0, whole rounds >= 0)")
        self._runs = [(float(z), int(c)) for z, c in ledger]

    def _rdp(self, runs) -> np.ndarray:
        _, rdp = _dp()
        total = np.zeros(len(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS), dtype=np.float64)
        for z, count in runs:
            total += count * _event_rdp(
                z, self.num_clients, self.clients_per_round, self.sampling, self.clip_count_stddev
            )
        return total

    def rdp(self) -> tuple[np.ndarray, np.ndarray]:
        """``(orders, rdp)``: the Rényi-DP curve of the rounds so far (for other conversions)."""
        _, rdp = _dp()
        return np.array(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64), self._rdp(self._runs)

    def epsilon(self, delta: float, *, extra_rounds: int = 0, noise_multiplier: float | None = None) -> float:
        """``ε`` at ``delta`` of the rounds so far (plus ``extra_rounds`` more with
        ``noise_multiplier``, to check a budget before spending it). ``inf`` without noise."""
        _, rdp = _dp()
        check_float(delta, "delta", minimum=0.0, maximum=1.0)
        check_int(extra_rounds, "extra_rounds", minimum=0)
        runs = list(self._runs)
        if extra_rounds:
            if noise_multiplier is None:
                raise ValueError("extra_rounds needs the noise_multiplier of those rounds")
            runs.append((float(noise_multiplier), int(extra_rounds)))
        if not runs:
            return 0.0
        orders = rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
        return float(rdp.rdp_privacy_accountant.compute_epsilon(orders, self._rdp(runs), delta)[0])

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(num_clients={self.num_clients}, clients_per_round={self.clients_per_round}, "
            f"sampling={self.sampling!r}, rounds={self.rounds})"
        )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    num_clients: int,
    clients_per_round: int,
    sampling: str = "fixed",
    clip_count_stddev: float | None = None,
    tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier (within ``tol``) whose ``rounds`` rounds cost at most
    ``target_epsilon`` at ``delta`` (dp-accounting's ``calibrate_dp_mechanism``).

    With adaptive clipping (``clip_count_stddev``) the result is the total multiplier ``z``; it
    must stay below ``2 σ_b`` (ValueError otherwise: the count alone would exceed the budget).
    """
    dp_accounting, rdp = _dp()
    check_float(target_epsilon, "target_epsilon", minimum=0.0, strict=True)
    check_float(delta, "delta", minimum=0.0, maximum=1.0, strict=True)
    check_int(rounds, "rounds", minimum=1)
    check_float(tol, "tol", minimum=0.0, strict=True)
    relation = neighboring_relation(sampling)

    def event(z: float):
        one = round_event(z, num_clients=num_clients, clients_per_round=clients_per_round, sampling=sampling)
        return dp_accounting.SelfComposedDpEvent(one, rounds)

    # The count's share is calibrated with it: the total multiplier is what the accountant sees.
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: rdp.RdpAccountant(neighboring_relation=relation),
        event,
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(_MIN_NOISE, 1.0),
        tol=tol,
    )
    # calibrate_dp_mechanism keeps ε(z) <= target, up to float rounding of the bisection.
    z = float(z)
    if clip_count_stddev is not None and 2.0 * clip_count_stddev <= z:
        raise ValueError(
            f"reaching epsilon {target_epsilon:g} in {rounds} rounds needs a noise multiplier of "
            f"{z:.4g}, more than twice the clipped-count noise std {clip_count_stddev:g}: raise "
            "dp_clip_count_stddev (or clients_per_round), or allow a larger epsilon"
        )
    return z if math.isfinite(z) else float("inf")


def calibrated_config(config, num_clients: int):
    """``config`` with ``dp_noise`` calibrated to ``dp_target_epsilon`` over ``config.rounds``
    rounds on ``num_clients`` training clients (unchanged unless a target is set and
    ``dp_noise`` is 0, i.e. left for the calibration)."""
    if config.dp_target_epsilon is None or config.dp_noise > 0:
        return config
    if config.rounds == 0:
        return config
    stddev = (
        count_stddev(config.clients_per_round, config.dp_clip_count_stddev)
        if config.dp_target_quantile is not None
        else None
    )
    z = calibrate_noise_multiplier(
        config.dp_target_epsilon,
        config.dp_delta,
        config.rounds,
        num_clients=num_clients,
        clients_per_round=config.clients_per_round,
        sampling=config.sampling,
        clip_count_stddev=stddev,
    )
    return config.replace(dp_noise=z)


def resumed_config(config, saved):
    """``config`` for continuing a run saved with ``saved``: a noise multiplier left to the
    calibration (``dp_noise`` 0 with a target) takes the one the run was calibrated with."""
    if (
        config.dp_target_epsilon is not None
        and config.dp_noise == 0
        and saved.dp_noise > 0
        and saved.dp_target_epsilon == config.dp_target_epsilon
    ):
        return config.replace(dp_noise=saved.dp_noise)
    return config


class RunPrivacy:
    """The DP state of one training run between rounds: the clip norm (which adaptive clipping
    moves), the accountant, and the budget.

    Parameters
    ----------
    config : FedReconConfig
        With ``dp_clip`` set (the initial clip with adaptive clipping).
    num_clients : int
        Training clients (the population the sampling draws from).
    """

    def __init__(self, config, num_clients: int):
        from .privacy import value_noise_multiplier

        self.config = config
        self.expected_clients = min(config.clients_per_round, num_clients)
        self.clip = float(config.dp_clip)
        self.adaptive = config.dp_target_quantile is not None
        self.count_stddev: float | None = None
        self.noise_multiplier = config.dp_noise
        self.value_noise_multiplier = config.dp_noise
        if self.adaptive:  # the update and the clipped count share the noise
            self.count_stddev = count_stddev(config.clients_per_round, config.dp_clip_count_stddev)
            self.value_noise_multiplier = value_noise_multiplier(config.dp_noise, self.count_stddev)
        self.accountant = PrivacyAccountant(
            num_clients=num_clients,
            clients_per_round=config.clients_per_round,
            sampling=config.sampling,
            clip_count_stddev=self.count_stddev,
        )

    def can_run_round(self) -> bool:
        """Whether one more round stays within ``dp_target_epsilon`` (always, without a target)."""
        cfg = self.config
        if cfg.dp_target_epsilon is None:
            return True
        return (
            self.accountant.epsilon(cfg.dp_delta, extra_rounds=1, noise_multiplier=self.noise_multiplier)
            <= cfg.dp_target_epsilon
        )

    def end_round(self, summary: dict, round: int) -> dict:
        """Account for the round just run (and adapt the clip); its metrics for the history."""
        from .privacy import adaptive_clip_update

        cfg = self.config
        used = self.clip
        self.accountant.compose(self.noise_multiplier)
        row = {
            "dp_clip": used,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_noise_std": self.value_noise_multiplier * used,
        }
        if self.count_stddev is not None:  # adaptive clipping
            reporting = int(summary["num_reporting"])
            self.clip, fraction = adaptive_clip_update(
                used,
                reporting - int(summary["num_clipped"]),
                reporting,
                target_quantile=cfg.dp_target_quantile,
                learning_rate=cfg.dp_clip_lr,
                count_stddev=self.count_stddev,
                expected_records=self.expected_clients,
                seed=cfg.seed,
                round=round,
            )
            row["dp_unclipped_estimate"] = fraction
        if cfg.dp_delta is not None:
            row.update(dp_epsilon=self.accountant.epsilon(cfg.dp_delta), dp_delta=cfg.dp_delta)
        return row

    def state(self) -> dict:
        """Arrays for a checkpoint: the accountant's ledger and the current clip."""
        return {"dp_ledger": self.accountant.ledger, "dp_clip": np.array([self.clip], dtype=np.float64)}

    def restore(self, arrays: dict) -> None:
        """Take back :meth:`state` (missing keys leave a fresh run)."""
        if "dp_ledger" in arrays:
            self.accountant.restore(arrays["dp_ledger"])
        if "dp_clip" in arrays:
            clip = np.asarray(arrays["dp_clip"], dtype=np.float64).reshape(-1)
            if clip.shape != (1,) or not (np.isfinite(clip[0]) and clip[0] > 0):
                raise ValueError("dp_clip must hold one positive clip norm")
            self.clip = float(clip[0])
