"""The server half of a FedRecon round: one owner for every route that trains.

After a round's clients have reported and their updates are reduced to the weighted mean
``Δ = Σ w_i Δ_i / Σ w_i`` (by the fused native round, or :func:`fedrecon_fast.kernels.reduce_updates`
over updates computed one client at a time), the server (Algorithm 1 of Singhal et al.,
"Federated Reconstruction: Partially Local Federated Learning", NeurIPS 2021):

1. adds DP-FedAvg's Gaussian noise to the sum over a fixed denominator (when training with
   differential privacy, :func:`fedrecon_fast.privacy.privatize_mean`);
2. applies the server optimizer with ``-Δ`` as the gradient;
3. checks that the model stayed finite and that not every client diverged;
4. counts the bits broadcast and received and reports the round's metrics.

:class:`Server` does these steps on a :class:`ServerState`. :class:`fedrecon_fast.FedRecon`
(locally, on Ray, or as the Flower App's ServerApp), :func:`fedrecon_fast.functional.server_step`
and Flower's per-user strategy all go through it, so a round's server step is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from . import divergence
from .config import DpParams, FedReconConfig
from .kernels import ServerMomentum
from .model import GlobalModel
from .optimizers import MomentumSGD, ServerOptimizer, make_optimizer
from .privacy import privatize_mean

__all__ = ["FixedPrivacy", "Server", "ServerState", "model_params", "round_summary", "server_optimizer"]

# Kernel status codes of a client (ClientStats::status).
STATUS_OK, STATUS_NONFINITE, STATUS_NO_QUERY = 0, 1, 2


@dataclass
class ServerState:
    """The server's side of FedRecon between rounds.

    Attributes
    ----------
    model : GlobalModel
        The global model (V and optional biases).
    config : FedReconConfig
        Server optimizer, DP and accounting settings (and the clients' settings).
    optimizer_state : dict of ndarray
        State of the server optimizer (plain arrays, see :mod:`fedrecon_fast.optimizers`);
        None until the first round.
    round : int
        Rounds completed; pass it as ``round`` to :func:`~fedrecon_fast.functional.client_step`
        for the next round.
    broadcasted_bits, aggregated_bits : int
        Cumulative bits sent to / received from clients (from real encoded sizes).
    metrics : dict
        Metrics of the last round (the keys of ``FedRecon.history`` rows).
    """

    model: GlobalModel
    config: FedReconConfig
    optimizer_state: dict | None
    round: int = 0
    broadcasted_bits: int = 0
    aggregated_bits: int = 0
    metrics: dict = field(default_factory=dict)

    def params(self) -> dict:
        """The trained arrays by name (:func:`model_params`), not copies."""
        return model_params(self.model)


def model_params(model: GlobalModel) -> dict:
    """What the server optimizer trains: ``item_factors`` [, ``item_bias``] [, ``user_default``
    [, ``user_bias_default``]] (the last as a one-element float32 array)."""
    params = {"item_factors": model.item_factors}
    if model.item_bias is not None:
        params["item_bias"] = model.item_bias
    if model.user_default is not None:
        params["user_default"] = model.user_default
        if model.item_bias is not None:
            params["user_bias_default"] = np.array([model.user_bias_default], np.float32)
    return params


def server_optimizer(config: FedReconConfig) -> ServerOptimizer:
    """The server optimizer ``config`` names, with its learning rate and options."""
    return make_optimizer(config.server_optimizer, lr=config.server_lr, **dict(config.server_options))


class RoundPrivacy(Protocol):
    """DP-FedAvg as the server applies it in a round (:class:`fedrecon_fast.accounting.RunPrivacy`
    keeps it between rounds; :class:`FixedPrivacy` has none)."""

    clip: float
    value_noise_multiplier: float
    expected_clients: float

    def end_round(self, summary: dict, round: int) -> dict: ...


class FixedPrivacy:
    """A fixed clip and noise multiplier, nothing kept between rounds (no accounting, no
    adaptive clipping): what one :func:`~fedrecon_fast.functional.server_step` can apply.

    Parameters
    ----------
    dp : DpParams
    expected_clients : float
        The fixed denominator of the noised mean.
    """

    def __init__(self, dp: DpParams, expected_clients: float):
        self.clip = dp.clip
        self.value_noise_multiplier = dp.noise_multiplier
        self.expected_clients = expected_clients

    def end_round(self, summary: dict, round: int) -> dict:
        """The round's DP metrics."""
        return {
            "dp_clip": self.clip,
            "dp_noise_multiplier": self.value_noise_multiplier,
            "dp_noise_std": self.value_noise_multiplier * self.clip,
        }


def _sequential_sum(x: np.ndarray) -> float:
    # cumsum adds left to right, as the native round totals its clients.
    return float(np.cumsum(x, dtype=np.float64)[-1]) if len(x) else 0.0


def round_summary(stats: dict, rows_aggregated: int) -> dict:
    """A round's totals from its per-client statistics (the native round's ``summary``, with the
    same sums in the same order).

    Parameters
    ----------
    stats : dict of ndarray
        Per client, in cohort order: ``weight``, ``loss_sum``, ``num_examples``,
        ``num_correct``, ``rows``, ``bytes``, ``clipped``, ``status``.
    rows_aggregated : int
        Distinct rows of V that reporting clients sent.
    """
    ok = stats["status"] != STATUS_NONFINITE
    reporting = ok & (stats["weight"] > 0)

    def total(key, mask) -> int:
        return int(stats[key][mask].sum())  # exact integer sums

    return {
        "total_weight": _sequential_sum(np.where(reporting, stats["weight"], 0.0)),
        "loss_sum": _sequential_sum(np.where(ok, stats["loss_sum"], 0.0)),
        "num_examples": total("num_examples", ok),
        "num_correct": total("num_correct", ok),
        "num_reporting": int(reporting.sum()),
        "num_nonfinite": int((~ok).sum()),
        "rows_sent": total("rows", reporting),
        "rows_aggregated": rows_aggregated,
        "bytes_sent": total("bytes", reporting),
        "num_clipped": total("clipped", reporting),
    }


class Server:
    """The server step of FedRecon's rounds on ``state``, which it updates in place.

    Parameters
    ----------
    state : ServerState
        Its ``optimizer_state`` is initialised here when it is None.
    """

    def __init__(self, state: ServerState):
        self.state = state
        self.optimizer = server_optimizer(state.config)
        # The arrays the optimizer updates in place, for as long as this server runs rounds.
        self.params = model_params(state.model)
        if state.optimizer_state is None:
            state.optimizer_state = self.optimizer.init(self.params)
        self.optimizer_state: dict = state.optimizer_state

    def in_place_step(self) -> dict | None:
        """The arguments with which a native round takes the server step itself
        (:func:`fedrecon_fast.kernels.train_round`'s ``apply_lr`` and ``momentum``): server SGD,
        or SGD with momentum (its velocity is this server's optimizer state), on V and the
        item biases only, with no DP noise to add to the mean first; otherwise None."""
        cfg = self.state.config
        if cfg.dp_clip is not None or not set(self.params) <= {"item_factors", "item_bias"}:
            return None
        if cfg.server_optimizer == "sgd":
            return {"apply_lr": self.optimizer.lr}
        if isinstance(self.optimizer, MomentumSGD):
            opt, slots = self.optimizer, self.optimizer_state
            momentum = ServerMomentum(
                opt.momentum,
                opt.nesterov,
                slots["item_factors/velocity"],
                slots.get("item_bias/velocity"),
            )
            return {"apply_lr": opt.lr, "momentum": momentum}
        return None

    def stepped_in_place(self) -> None:
        """Count a step that the native round took itself (:meth:`in_place_step`)."""
        self.optimizer.count_step(self.optimizer_state)

    def apply(self, result, *, privacy: RoundPrivacy | None = None, num_threads: int = 0) -> bool:
        """Apply a round's aggregate (``result.delta``, ``result.delta_bias``; with a learned
        user default, the clients' final ``result.users``) to the model; returns whether it stayed
        finite.

        The aggregate is finite float32 of the right shapes (the kernels check), so the
        optimizer's own validation pass is skipped; the model is checked after the step.
        """
        state = self.state
        update = {"item_factors": result.delta}
        if result.delta_bias is not None:
            update["item_bias"] = result.delta_bias
        if "user_default" in self.params:
            update.update(_default_update(state.model, result))
        if privacy is not None:
            privatize_mean(
                update,
                result.summary["total_weight"],
                clip=privacy.clip,
                noise_multiplier=privacy.value_noise_multiplier,
                expected_clients=privacy.expected_clients,
                seed=state.config.seed,
                round=state.round,
                num_threads=num_threads,
            )
        self.optimizer.apply(self.params, update, self.optimizer_state, validate=False)
        if "user_bias_default" in self.params:
            state.model.user_bias_default = float(self.params["user_bias_default"][0])
        return bool(np.isfinite(state.model.item_factors).all())

    def finish_round(
        self, summary: dict, num_clients: int, *, finite: bool, privacy: RoundPrivacy | None = None
    ) -> dict:
        """Check, count and report the round just applied; advance ``state.round``.

        Parameters
        ----------
        summary : dict
            The round's totals (the native ``summary``, or :func:`round_summary`).
        num_clients : int
            Clients the model was broadcast to.
        finite : bool
            Whether the model is finite after the step.
        privacy : RoundPrivacy, optional
            Accounts for the round (and adapts the clip) when training with DP.

        Returns
        -------
        dict
            The round's metrics: ``round`` (rounds done), ``clients``, ``reporting``,
            ``nonfinite``, ``train_loss``/``train_rmse``/``train_accuracy`` on the query
            batches, ``train_examples``, ``rows_sent``, the bits of the round and in total, and
            with DP the clipping and noise (and ``dp_epsilon`` with accounting).

        Raises
        ------
        FloatingPointError
            The model became non-finite, or every sampled client's update was non-finite; the
            message names the likely cause.
        """
        state = self.state
        cfg = state.config
        r = state.round
        if not finite:
            raise FloatingPointError(
                f"the global model became non-finite in round {r}; {divergence.explain(cfg, state.model.item_factors)}"
            )
        s = summary
        # The server broadcasts the float32 model to every sampled client; clients send their
        # encoded updates (sizes counted by the native codec).
        params = self.params
        broadcast = 32 * num_clients * sum(p.size for p in params.values())
        aggregated = 8 * s["bytes_sent"]
        if "user_default" in params:  # each reporting client's float32 offset from the default
            aggregated += 32 * s["num_reporting"] * (params["user_default"].size + ("user_bias_default" in params))
        state.broadcasted_bits += broadcast
        state.aggregated_bits += aggregated
        if s["num_reporting"] == 0 and s["num_nonfinite"] > 0:
            raise FloatingPointError(
                f"training diverged in round {r}: all {s['num_nonfinite']} sampled clients produced "
                f"non-finite updates; {divergence.explain(cfg, state.model.item_factors)}"
            )
        n = s["num_examples"]
        dp = {}
        if privacy is not None:
            # dp_noise_std first, so the history's columns keep their order; the round's own
            # numbers (an adapted clip, the update's share of the noise) replace it.
            dp = {
                "dp_clipped": s["num_clipped"],
                "dp_clip_fraction": s["num_clipped"] / s["num_reporting"] if s["num_reporting"] else 0.0,
                "dp_noise_std": cfg.dp_noise * (cfg.dp_clip or 0.0),
            }
            dp.update(privacy.end_round(s, r))
        state.round += 1
        state.metrics = {
            "round": state.round,
            "clients": num_clients,
            "reporting": s["num_reporting"],
            "nonfinite": s["num_nonfinite"],
            "train_loss": s["loss_sum"] / n if n else float("nan"),
            "train_rmse": float(np.sqrt(s["loss_sum"] / n)) if n else float("nan"),
            "train_accuracy": s["num_correct"] / n if n else float("nan"),
            "train_examples": n,
            "rows_sent": s["rows_sent"],
            "broadcasted_bits": broadcast,
            "aggregated_bits": aggregated,
            "broadcasted_bits_total": state.broadcasted_bits,
            "aggregated_bits_total": state.aggregated_bits,
            **dp,
        }
        return dict(state.metrics)


def _default_update(model: GlobalModel, result) -> dict:
    """Weighted mean of the reporting clients' offsets from the learned default u (and b_u)."""
    w = result.client_stats["weight"]
    reporting = w > 0
    total = w[reporting].sum()
    u0 = model.user_default
    weights = (w[reporting] / total)[:, None] if total > 0 else np.zeros((0, 1))
    offsets = result.users[reporting].astype(np.float64) - u0
    update = {"user_default": (weights * offsets).sum(0).astype(np.float32)}
    if result.user_bias is not None:
        db = result.user_bias[reporting].astype(np.float64) - model.user_bias_default
        update["user_bias_default"] = np.array([(weights[:, 0] * db).sum()], np.float32)
    return update
