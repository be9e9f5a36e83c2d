"""Configuration of FedRecon training: what a client does, what it sends, and a whole run.

Defaults follow TensorFlow Federated's ``build_fed_recon``; the ``paper`` preset is the
MovieLens 1M recipe of Singhal et al., "Federated Reconstruction: Partially Local Federated
Learning" (NeurIPS 2021), and ``fast`` is our best accuracy-per-second setup.

The settings that cross into the native kernels are grouped as the C++ structs they become
(:mod:`fedrecon_fast._native.structs` converts them): :class:`ClientConfig`
(``fedrecon::ClientConfig``), :class:`UpdateCodec` (``fedrecon::UpdateCodec``) and
:class:`DpParams` (``fedrecon::DpParams``). :class:`FedReconConfig` is the flat, user-facing
description of a run; :attr:`FedReconConfig.codec`, :attr:`FedReconConfig.dp` and
:attr:`FedReconConfig.data` give its groups (the data preparation,
:class:`fedrecon_fast.data.DataConfig`, lives with the data).
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass, field

from ._validation import FLOAT32_MAX, check_bits, check_bool, check_choice, check_float, check_int, check_threads
from .data import DataConfig

SPLITS = {"batches": 0, "random": 1, "reuse": 2}
_INT32_MAX = 2**31 - 1  # the native config's int fields
_INT64_MAX = 2**63 - 1
RECON_METHODS = {"sgd": 0, "exact": 1}
INITS = {"uniform": 0, "zeros": 1}
WEIGHTINGS = {"examples": 0, "uniform": 1}
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "adagrad", "yogi")
SCALINGS = ("tensor", "row")


def _store_builtin(obj, names, kind) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            object.__setattr__(obj, name, kind(value))


@dataclass(frozen=True)
class ClientConfig:
    """What each client does in a round (and in evaluation).

    Parameters
    ----------
    batch_size : int
        Examples per minibatch; one optimizer step per batch, loss = batch mean squared error.
    split : {"batches", "random", "reuse"}
        Support/query split: TFF ``split_dataset`` (even batches reconstruct, odd batches
        update), a disjoint random split with ``support_fraction``, or the same ratings for both.
    support_fraction : float
        Fraction of ratings in the support set for ``split="random"``.
    reshuffle : bool
        Permute each client's ratings anew every round before splitting (otherwise the stored,
        seeded order is used, as TFF does).
    recon : {"sgd", "exact"}
        Minibatch SGD on ``u`` or the exact ridge solution ``(VᵀV + ridge I)⁻¹ Vᵀ r``.
    init : {"uniform", "zeros"}
        Initial ``u``: U(-init_scale, init_scale) or zeros.
    recon_epochs, recon_steps_max, recon_lr, recon_l2
        Reconstruction schedule (``None`` = no step cap) and L2 (batch loss + l2 |u|²).
    ridge : float
        Ridge strength of exact reconstruction (> 0).
    update_epochs, update_steps_max, client_lr, update_l2
        Client update schedule on the touched rows of V, and its L2.
    joint : bool
        Also train ``u`` during the client update.
    weighting : {"examples", "uniform"}
        Client weight: number of query examples, or 1.
    """

    batch_size: int = 5
    split: str = "batches"
    support_fraction: float = 0.5
    reshuffle: bool = False
    recon: str = "sgd"
    init: str = "uniform"
    init_scale: float = 0.05
    recon_epochs: int = 1
    recon_steps_max: int | None = None
    recon_lr: float = 0.1
    recon_l2: float = 0.0
    ridge: float = 1.0
    update_epochs: int = 1
    update_steps_max: int | None = None
    client_lr: float = 0.1
    update_l2: float = 0.0
    joint: bool = False
    weighting: str = "examples"

    def __post_init__(self) -> None:
        check_int(self.batch_size, "batch_size", minimum=1, maximum=_INT32_MAX)
        check_choice(self.split, "split", SPLITS)
        check_float(self.support_fraction, "support_fraction", minimum=0.0, maximum=1.0)
        check_choice(self.recon, "recon", RECON_METHODS)
        check_choice(self.init, "init", INITS)
        check_float(self.init_scale, "init_scale", minimum=0.0, maximum=FLOAT32_MAX)
        check_int(self.recon_epochs, "recon_epochs", minimum=0, maximum=_INT32_MAX)
        check_int(self.recon_steps_max, "recon_steps_max", minimum=1, maximum=_INT64_MAX, allow_none=True)
        check_float(self.recon_lr, "recon_lr", minimum=0.0, maximum=FLOAT32_MAX)
        check_float(self.recon_l2, "recon_l2", minimum=0.0, maximum=FLOAT32_MAX)
        check_float(self.ridge, "ridge", minimum=0.0, maximum=FLOAT32_MAX, strict=True)
        check_int(self.update_epochs, "update_epochs", minimum=0, maximum=_INT32_MAX)
        check_int(self.update_steps_max, "update_steps_max", minimum=1, maximum=_INT64_MAX, allow_none=True)
        check_float(self.client_lr, "client_lr", minimum=0.0, maximum=FLOAT32_MAX)
        check_float(self.update_l2, "update_l2", minimum=0.0, maximum=FLOAT32_MAX)
        check_choice(self.weighting, "weighting", WEIGHTINGS)
        for name in ("reshuffle", "joint"):
            check_bool(getattr(self, name), name)
        # NumPy scalars pass the checks: store Python numbers, so to_dict() is JSON (model files).
        _store_builtin(
            self, ("batch_size", "recon_epochs", "recon_steps_max", "update_epochs", "update_steps_max"), int
        )
        _store_builtin(
            self, ("support_fraction", "init_scale", "recon_lr", "recon_l2", "ridge", "client_lr", "update_l2"), float
        )


@dataclass(frozen=True)
class UpdateCodec:
    """What a client sends for its update (the native ``fedrecon::UpdateCodec``, field by field).

    Parameters
    ----------
    bits : int
        0 sends float32; 1..16 quantizes the item-factor update to that many bits per value with
        unbiased stochastic rounding (:mod:`fedrecon_fast.compression`).
    row_scaling : bool
        One scale per row instead of one per client update.
    hadamard : bool
        Randomized Hadamard rotation of each row before quantizing.
    sparse : bool
        Only the touched rows (row ids + values); otherwise a dense ``num_items x dim`` delta.
    threshold : int
        Item factors with fewer elements than this stay float32 (TFF quantizes only variables
        of at least 20,000 elements).
    clip : float
        > 0: scale each client's update (factors and biases) to L2 norm at most ``clip``
        (DP-FedAvg); 0 leaves it unclipped.
    """

    bits: int = 0
    row_scaling: bool = False
    hadamard: bool = False
    sparse: bool = True
    threshold: int = 0
    clip: float = 0.0

    def __post_init__(self) -> None:
        check_bits(self.bits, "bits", allow_zero=True)
        for name in ("row_scaling", "hadamard", "sparse"):
            check_bool(getattr(self, name), name)
        check_int(self.threshold, "threshold", minimum=0, maximum=_INT64_MAX)
        check_float(self.clip, "clip", minimum=0.0)
        _store_builtin(self, ("bits", "threshold"), int)
        _store_builtin(self, ("row_scaling", "hadamard", "sparse"), bool)
        _store_builtin(self, ("clip",), float)

    def quantizes(self, num_items: int, dim: int) -> bool:
        """Whether an update of a ``num_items x dim`` model is quantized."""
        return self.bits > 0 and num_items * dim >= self.threshold


@dataclass(frozen=True)
class DpParams:
    """DP-FedAvg's Gaussian mechanism on a round's sum (``fedrecon::DpParams``; the kernels
    take the seed and round per call).

    Parameters
    ----------
    clip : float
        ``C > 0``: each client's update is clipped to this L2 norm.
    noise_multiplier : float
        ``z >= 0``: noise of standard deviation ``z * C`` on every coordinate of the sum.
    """

    clip: float
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        check_float(self.clip, "clip", minimum=0.0, strict=True)
        check_float(self.noise_multiplier, "noise_multiplier", minimum=0.0)
        _store_builtin(self, ("clip", "noise_multiplier"), float)

    @property
    def noise_std(self) -> float:
        """``z * C``: the noise's standard deviation on each coordinate of the sum."""
        return self.noise_multiplier * self.clip


@dataclass(frozen=True)
class FedReconConfig:
    """A whole FedRecon training run.

    Parameters
    ----------
    dim : int
        Embedding dimension K.
    client : ClientConfig
        Client behaviour in training (and in ReconEval unless ``eval_client`` is given).
    eval_client : ClientConfig, optional
        Split and reconstruction schedule of ReconEval, when it differs from training (e.g.
        FedAvg trains without reconstruction but is evaluated with it).
    rounds, clients_per_round : int
        Training rounds and clients sampled per round (without replacement).
    server_optimizer : {"sgd", "momentum", "adam", "adagrad", "yogi"}
        Applied to ``-Δ`` as the gradient; ``server_lr`` is its learning rate and
        ``server_options`` its other hyperparameters.
    biases : bool
        Global mean, item biases (global) and user biases (local, reconstructed).
    item_init_scale : float
        ``V`` starts from U(-item_init_scale, item_init_scale).
    max_examples, min_examples : int
        Per-client caps (most recent ratings kept) and minimum (smaller clients are dropped;
        the default 1 drops users without ratings).
    user_split : tuple of float
        Train/validation/test fractions of users.
    eval_every : int
        Evaluate on validation users every N rounds (0: only after the last round).
    seed, num_threads : int
        Seed of every random choice; threads for the native kernels (0: all cores).
    quantize_bits : int, optional
        Quantize each client's update to this many bits (1..16) with stochastic rounding
        (unbiased), for variables of at least ``quantize_threshold`` elements; ``None`` sends
        float32.
    quantize_threshold : int
        Smallest variable (in elements, the whole variable) that is quantized; TFF uses 20,000.
    quantize_scaling : {"tensor", "row"}
        One min/max per client update, or one per row.
    hadamard : bool
        Randomized Hadamard rotation of each row before quantization.
    sparse_updates : bool
        Clients send only the rows they touched (row ids + values), not a dense delta.
    dp_clip, dp_noise : float, optional
        DP-FedAvg: clip each client update to L2 norm ``dp_clip``, add Gaussian noise of
        standard deviation ``dp_noise * dp_clip`` to the sum, divide by ``clients_per_round``.
        Requires ``weighting="uniform"``. With adaptive clipping ``dp_clip`` is the initial
        clip and ``dp_noise`` the total noise multiplier (update and clipped count together,
        TFF's convention). See :mod:`fedrecon_fast.accounting` for what is guaranteed.
    dp_delta : float, optional
        ``δ`` at which ``ε`` is reported after every round (``dp_epsilon`` in the history;
        needs the ``[dp]`` extra).
    dp_target_epsilon : float, optional
        A privacy budget: with ``dp_noise`` left at 0, the noise multiplier is calibrated so
        that ``rounds`` rounds cost at most this ``ε`` at ``dp_delta``; training stops before a
        round that would exceed it. Needs ``dp_clip`` and ``dp_delta``.
    dp_target_quantile : float, optional
        Adaptive clipping (Andrew et al. 2021): after each round the clip norm moves toward this
        quantile of the update norms, ``C ← C exp(-dp_clip_lr (b̃ - γ))``, from a count of
        unclipped updates noised with std ``dp_clip_count_stddev`` (default ``0.05 *
        clients_per_round``, as TFF). None keeps the clip fixed.
    sampling : {"fixed", "poisson"}
        Each round's cohort: ``clients_per_round`` distinct clients, or every client
        independently with probability ``clients_per_round / num_clients``
        (:func:`fedrecon_fast.sampling.poisson_sample_clients`).
    learn_user_default : bool
        Learn a global default for ``u`` (and ``b_u``) federatedly: every client starts
        reconstruction from it (SGD) or shrinks toward it (exact), reports its embedding's
        offset from it as part of its update, and the server averages the offsets like any
        other update. Users without ratings (cold start) get the default. Not with DP.
    """

    dim: int = 50
    client: ClientConfig = field(default_factory=ClientConfig)
    rounds: int = 100
    clients_per_round: int = 100
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_options: tuple = ()
    biases: bool = False
    item_init_scale: float = 0.05
    max_examples: int | None = None
    min_examples: int = 1
    user_split: tuple = (0.8, 0.1, 0.1)
    eval_every: int = 0
    seed: int = 0
    num_threads: int = 0
    eval_client: ClientConfig | None = None
    quantize_bits: int | None = None
    quantize_threshold: int = 20000
    quantize_scaling: str = "tensor"
    hadamard: bool = False
    sparse_updates: bool = False
    dp_clip: float | None = None
    dp_noise: float = 0.0
    learn_user_default: bool = False
    dp_delta: float | None = None
    dp_target_epsilon: float | None = None
    dp_target_quantile: float | None = None
    dp_clip_lr: float = 0.2
    dp_clip_count_stddev: float | None = None
    sampling: str = "fixed"

    def __post_init__(self) -> None:
        check_int(self.dim, "dim", minimum=1, maximum=_INT32_MAX)
        if not isinstance(self.client, ClientConfig):
            raise TypeError(f"client must be a ClientConfig; got {type(self.client).__name__}")
        if self.eval_client is not None and not isinstance(self.eval_client, ClientConfig):
            raise TypeError(f"eval_client must be a ClientConfig or None; got {type(self.eval_client).__name__}")
        check_int(self.rounds, "rounds", minimum=0, maximum=_INT64_MAX)
        check_int(self.clients_per_round, "clients_per_round", minimum=1, maximum=_INT64_MAX)
        check_choice(self.server_optimizer, "server_optimizer", SERVER_OPTIMIZERS)
        check_float(self.server_lr, "server_lr", minimum=0.0, strict=True)
        try:
            options = dict(self.server_options)
        except (TypeError, ValueError):
            raise TypeError(
                f"server_options must be a dict (or pairs) of optimizer hyperparameters; got {self.server_options!r}"
            ) from None
        object.__setattr__(self, "server_options", tuple(options.items()))
        check_bool(self.biases, "biases")
        check_float(self.item_init_scale, "item_init_scale", minimum=0.0)
        data = DataConfig(self.max_examples, self.min_examples, self.user_split)
        object.__setattr__(self, "user_split", data.user_split)
        check_int(self.eval_every, "eval_every", minimum=0, maximum=_INT64_MAX)
        check_bits(self.quantize_bits, "quantize_bits", allow_none=True)
        check_int(self.quantize_threshold, "quantize_threshold", minimum=0, maximum=_INT64_MAX)
        check_choice(self.quantize_scaling, "quantize_scaling", SCALINGS)
        for name in ("hadamard", "sparse_updates", "learn_user_default"):
            check_bool(getattr(self, name), name)
        if self.dp_clip is not None:
            check_float(self.dp_clip, "dp_clip", minimum=0.0, strict=True)
            if self.client.weighting != "uniform":
                raise ValueError("dp_clip (DP-FedAvg) needs uniform client weighting: set weighting='uniform'")
        if self.learn_user_default and self.dp_clip is not None:
            raise ValueError("learn_user_default is not covered by DP clipping: use one or the other")
        check_float(self.dp_noise, "dp_noise", minimum=0.0)
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ValueError("dp_noise needs dp_clip (the noise is dp_noise * dp_clip)")
        self._check_privacy()
        check_int(self.seed, "seed", minimum=0)
        check_threads(self.num_threads)
        _store_builtin(
            self,
            (
                "dim",
                "rounds",
                "clients_per_round",
                "max_examples",
                "min_examples",
                "eval_every",
                "quantize_bits",
                "quantize_threshold",
                "seed",
                "num_threads",
            ),
            int,
        )
        _store_builtin(
            self,
            (
                "server_lr",
                "item_init_scale",
                "dp_clip",
                "dp_noise",
                "dp_delta",
                "dp_target_epsilon",
                "dp_target_quantile",
                "dp_clip_lr",
                "dp_clip_count_stddev",
            ),
            float,
        )

    def _check_privacy(self) -> None:
        """The accounting, budget, adaptive clipping and sampling options."""
        check_choice(self.sampling, "sampling", {"fixed", "poisson"})
        if self.dp_delta is not None:
            check_float(self.dp_delta, "dp_delta", minimum=0.0, maximum=1.0, strict=True)
            if self.dp_delta >= 1:
                raise ValueError(f"dp_delta must be < 1; got {self.dp_delta}")
        if self.dp_target_epsilon is not None:
            check_float(self.dp_target_epsilon, "dp_target_epsilon", minimum=0.0, strict=True)
            if self.dp_clip is None or self.dp_delta is None:
                raise ValueError("dp_target_epsilon needs dp_clip and dp_delta (the budget is an (epsilon, delta))")
        check_float(self.dp_clip_lr, "dp_clip_lr", minimum=0.0)
        if self.dp_clip_count_stddev is not None:
            check_float(self.dp_clip_count_stddev, "dp_clip_count_stddev", minimum=0.0)
        if self.dp_target_quantile is not None:
            check_float(self.dp_target_quantile, "dp_target_quantile", minimum=0.0, maximum=1.0)
            if self.dp_clip is None:
                raise ValueError("dp_target_quantile (adaptive clipping) needs dp_clip, the initial clip norm")
            stddev = 0.05 * self.clients_per_round if self.dp_clip_count_stddev is None else self.dp_clip_count_stddev
            if self.dp_noise > 0 and 2 * stddev <= self.dp_noise:
                raise ValueError(
                    f"dp_noise {self.dp_noise:g} needs a clipped-count noise std above "
                    f"{self.dp_noise / 2:g} (dp_clip_count_stddev is {stddev:g})"
                )

    @property
    def codec(self) -> UpdateCodec:
        """What each client sends: quantization, dense or sparse rows, and the DP clip."""
        return UpdateCodec(
            bits=self.quantize_bits or 0,
            row_scaling=self.quantize_scaling == "row",
            hadamard=self.hadamard,
            sparse=self.sparse_updates,
            threshold=self.quantize_threshold,
            clip=self.dp_clip or 0.0,
        )

    @property
    def dp(self) -> DpParams | None:
        """DP-FedAvg's clip and noise multiplier (None without ``dp_clip``)."""
        return None if self.dp_clip is None else DpParams(self.dp_clip, self.dp_noise)

    @property
    def data(self) -> DataConfig:
        """How the ratings are prepared and split into users (:func:`fedrecon_fast.split_ratings`)."""
        return DataConfig(self.max_examples, self.min_examples, self.user_split)

    @property
    def evaluation(self) -> ClientConfig:
        """The client configuration ReconEval uses."""
        return self.eval_client if self.eval_client is not None else self.client

    def replace(self, **changes) -> FedReconConfig:
        """A copy with some fields changed; client fields may be given directly too."""
        client_fields = {f.name for f in dataclasses.fields(ClientConfig)}
        client_changes = {k: changes.pop(k) for k in list(changes) if k in client_fields}
        unknown = set(changes) - {f.name for f in dataclasses.fields(FedReconConfig)}
        if unknown:
            raise ValueError(f"unknown configuration field(s): {sorted(unknown)}")
        if client_changes:
            changes["client"] = dataclasses.replace(changes.get("client", self.client), **client_changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-serialisable form (round trip with :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["server_options"] = dict(self.server_options)
        d["user_split"] = list(self.user_split)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FedReconConfig:
        d = dict(d)
        client = ClientConfig(**d.pop("client", {}))
        if d.get("eval_client") is not None:
            d["eval_client"] = ClientConfig(**d["eval_client"])
        d["user_split"] = tuple(d.get("user_split", (0.8, 0.1, 0.1)))
        return cls(client=client, **d)


PAPER = FedReconConfig(
    dim=50,
    # reshuffle: tf.data's shuffle(seed=...) re-shuffles on every iteration by default, so a
    # TFF client's seeded order is new each round; on validation users this is worth ~0.012
    # RMSE and matches an independent TFF-faithful run (~.911 test RMSE on ML-1M 1-2999).
    client=ClientConfig(
        batch_size=5,
        split="batches",
        reshuffle=True,
        recon="sgd",
        init="uniform",
        init_scale=0.05,
        recon_epochs=5,
        recon_steps_max=50,
        recon_lr=0.1,
        update_epochs=1,
        update_steps_max=50,
        client_lr=0.5,
    ),
    rounds=500,
    clients_per_round=100,
    server_optimizer="sgd",
    server_lr=1.0,
    biases=False,
    max_examples=300,
)

# Tuned on validation users of MovieLens 1M (users 1-2999) only, never on test users: exact
# ridge reconstruction with ridge 3 (grid 0.3..10) and biases; val RMSE .877 vs .915 (paper).
FAST = PAPER.replace(recon="exact", ridge=3.0, biases=True)

# What `train` and split_ratings use without a preset: chosen on validation users only, of
# MovieLens 1M (users 1-2999) and six seeded synthetic sets of other sizes, sparsity and rating
# scales (tools/select_default.py; docs/default_preset.md). Ridge 2 instead of fast's 3 (tuned
# on ML-1M alone) has the best mean validation RMSE of the candidates that keep fast's
# Recall@10; exact reconstruction with biases never diverged there, where `paper` does.
DEFAULT = PAPER.replace(recon="exact", ridge=2.0, biases=True)

PRESETS = {"default": DEFAULT, "paper": PAPER, "fast": FAST}


def preset(name: str, **overrides) -> FedReconConfig:
    """A named configuration (``"default"``, ``"paper"`` or ``"fast"``), optionally with fields
    changed. ``preset_help()`` lists what each sets."""
    check_choice(name, "preset", PRESETS)
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def describe(config: FedReconConfig) -> str:
    """The settings of a configuration that shape training, in one line."""
    c = config.client
    if c.recon == "exact":
        recon = f"exact ridge reconstruction (ridge {c.ridge:g})"
    else:
        steps = f", at most {c.recon_steps_max} steps" if c.recon_steps_max else ""
        recon = f"SGD reconstruction (lr {c.recon_lr:g}, {c.recon_epochs} epochs{steps})"
    steps = f", at most {c.update_steps_max} steps" if c.update_steps_max else ""
    cap = f", at most {config.max_examples} ratings per user" if config.max_examples else ""
    return (
        f"K = {config.dim}, {'biases' if config.biases else 'no biases'}, {recon}, client update lr "
        f"{c.client_lr:g} ({c.update_epochs} epoch{steps}), batch {c.batch_size}, server "
        f"{config.server_optimizer} lr {config.server_lr:g}, {config.rounds} rounds x "
        f"{config.clients_per_round} clients{cap}"
    )


def preset_help() -> str:
    """The presets and what each sets (the CLI's ``train --help``)."""
    notes = {
        "default": "the default: exact reconstruction with biases, chosen on seven data sets (sparse or "
        "dense, stars or half stars)",
        "paper": "the published MovieLens 1M recipe of Singhal et al. (2021), exactly",
        "fast": "paper plus exact reconstruction and biases (tuned on MovieLens 1M)",
    }
    lines = ["presets (--preset NAME; --rounds, --clients-per-round and --dim override theirs):"]
    for name in PRESETS:
        lines.append(
            textwrap.fill(
                f"{notes.get(name, '')}: {describe(PRESETS[name])}.",
                width=88,
                initial_indent=f"  {name:8} ",
                subsequent_indent=" " * 11,
            )
        )
    return "\n".join(lines)
