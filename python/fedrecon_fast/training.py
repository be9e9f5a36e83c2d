"""The FedRecon trainer: round orchestration around the fused native round.

Each round samples clients (a pure function of (seed, round)), runs the whole cohort in one
native call (reconstruct u locally → update the touched rows of V → weighted mean of the
updates), and applies the server optimizer with -Δ as the gradient (Algorithm 1 of Singhal
et al., "Federated Reconstruction: Partially Local Federated Learning", NeurIPS 2021).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from . import accounting, divergence, kernels, memory, splits
from ._guards import one_fit_at_a_time
from ._signals import stop_requested
from .kernels import sample_clients
from ._validation import check_int
from .config import FedReconConfig
from .evaluation import recon_eval
from .model import GlobalModel
from .optimizers import make_optimizer
from .privacy import privatize_mean
from .sampling import poisson_rate, poisson_sample_clients

logger = logging.getLogger(__name__)


def round_clients(config: FedReconConfig, num_clients: int, round: int) -> np.ndarray:
    """The cohort of one round as ``config.sampling`` says (fixed-size or Poisson)."""
    if config.sampling == "poisson":
        return poisson_sample_clients(num_clients, poisson_rate(num_clients, config.clients_per_round),
                                      config.seed, round)
    return sample_clients(num_clients, config.clients_per_round, config.seed, round)


def check_training_clients(train) -> None:
    """Training needs clients, each with at least one rating."""
    if train.num_clients == 0:
        raise ValueError("train has no clients")
    empty = int((train.sizes == 0).sum())
    if empty:
        raise ValueError(f"train has {empty} clients without ratings; drop them first with "
                         "data.prepare(min_examples=1)")


def _executor(backend):
    """The object whose ``train_round`` runs a cohort (same signature as kernels.train_round)."""
    if backend == "local":
        return kernels
    if backend == "ray":
        from .distributed import RayExecutor

        return RayExecutor()
    if isinstance(backend, str) or not callable(getattr(backend, "train_round", None)):
        raise ValueError(f"backend must be 'local', 'ray' or an executor with a train_round method; got {backend!r}")
    return backend


class FedRecon:
    """Federated Reconstruction of a matrix-factorization model.

    Parameters
    ----------
    config : FedReconConfig, optional
        Everything about the run (defaults: TFF's ``build_fed_recon`` defaults, K = 50).
    model : GlobalModel, optional
        Start from this model instead of a fresh random one.
    backend : {"local", "ray"} or executor, optional
        Where each round's cohort runs: in this process (default), or as shards of clients on
        Ray workers (:class:`fedrecon_fast.distributed.RayExecutor`; pass one to choose its
        cluster and workers). Every backend gives bit-identical results.

    Examples
    --------
    >>> from fedrecon_fast import FedRecon, preset, synthetic_ratings, split_users
    >>> data = synthetic_ratings(num_users=300, num_items=200, seed=0)
    >>> train, val, test = split_users(data.num_clients, seed=0)
    >>> trainer = FedRecon(preset("fast", rounds=5, clients_per_round=20))
    >>> trainer.fit(data.subset(train), data.subset(val))  # doctest: +ELLIPSIS
    <fedrecon_fast.training.FedRecon object at ...>
    >>> trainer.evaluate(data.subset(test))["rmse"] < 2.0
    True
    """

    def __init__(self, config: FedReconConfig | None = None, *, model: GlobalModel | None = None,
                 backend="local"):
        self.config = config if config is not None else FedReconConfig()
        if not isinstance(self.config, FedReconConfig):
            raise TypeError(f"config must be a FedReconConfig; got {type(self.config).__name__}")
        self._executor = _executor(backend)
        self._owns_executor = isinstance(backend, str) and backend != "local"
        self.model = model
        self.round = 0
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.broadcasted_bits = 0
        self.aggregated_bits = 0
        self._optimizer = make_optimizer(self.config.server_optimizer, lr=self.config.server_lr,
                                         **dict(self.config.server_options))
        self._opt_state = None
        # DP state between rounds (clip norm, accountant), made by fit and kept in checkpoints.
        self._privacy: accounting.RunPrivacy | None = None
        self._privacy_state: dict = {}
        # Server SGD inside the native round (see _in_place_step); False forces the dense
        # delta and the optimizer, e.g. to compare the two.
        self.in_place_step = True

    def close(self) -> None:
        """Release the backend this trainer started (``backend="ray"``); the model stays usable."""
        if self._owns_executor:
            self._executor.close()
            self._owns_executor = False
            self._executor = kernels

    def save_checkpoint(self, directory, *, keep: int = 2):
        """Write the whole training state to a new checkpoint in ``directory`` (atomically)."""
        from . import checkpoint

        return checkpoint.save(directory, self, keep=keep)

    @classmethod
    def from_checkpoint(cls, directory, config: FedReconConfig | None = None, *, backend="local"):
        """A trainer continuing from the newest valid checkpoint in ``directory``.

        ``config`` (default: the checkpoint's) may differ from the checkpoint's only in
        ``rounds`` and ``num_threads``, which do not change results; anything else raises
        :class:`fedrecon_fast.checkpoint.CheckpointError`.
        """
        from .checkpoint import CheckpointError, latest

        meta = latest(directory)
        if meta is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        if meta["trainer"] != cls.__name__:
            raise CheckpointError(f"the checkpoint was written by {meta['trainer']}, not {cls.__name__}")
        saved = FedReconConfig.from_dict(meta["config"])
        if config is None:
            config = saved
        config = accounting.resumed_config(config, saved)
        free = {"rounds", "num_threads"}
        differ = sorted(k for k, v in config.to_dict().items() if k not in free and saved.to_dict()[k] != v)
        if differ:
            raise CheckpointError(f"the checkpoint was trained with a different configuration: {differ}")
        trainer = cls(config, model=meta["model"], backend=backend)
        trainer.model.config = config
        trainer.round = meta["round"]
        trainer.history = meta["history"]
        for key in ("broadcasted_bits", "aggregated_bits", "train_seconds", "eval_seconds"):
            setattr(trainer, key, meta[key])
        expected = trainer._optimizer.init(trainer._params())
        state = meta["optimizer_state"]
        if state.keys() != expected.keys() or any(state[k].shape != expected[k].shape for k in state):
            raise CheckpointError("the checkpoint's optimizer state does not match the model")
        trainer._opt_state = {k: np.array(v, dtype=expected[k].dtype) for k, v in state.items()}
        trainer._restore_extra(meta["extra"])
        return trainer

    def _extra_arrays(self) -> dict:
        """Arrays kept between rounds: the DP state (clients are stateless)."""
        if self._privacy is not None:
            return self._privacy.state()
        return dict(self._privacy_state)

    def _restore_extra(self, arrays: dict) -> None:
        """Take back what :meth:`_extra_arrays` saved (the DP state waits for ``fit``)."""
        self._privacy_state = {k: v for k, v in arrays.items() if k.startswith("dp_")}

    def _start_privacy(self, num_clients: int) -> None:
        """Calibrate the noise to the budget (once) and set up the DP state of the run."""
        if self.config.dp_clip is None or self._privacy is not None:
            return
        self.config = accounting.calibrated_config(self.config, num_clients)
        if self.model is not None:
            self.model.config = self.config
        self._privacy = accounting.RunPrivacy(self.config, num_clients)
        self._privacy.restore(self._privacy_state)

    def _params(self) -> dict:
        params = {"item_factors": self.model.item_factors}
        if self.model.item_bias is not None:
            params["item_bias"] = self.model.item_bias
        if self.model.user_default is not None:
            params["user_default"] = self.model.user_default
            if self.model.item_bias is not None:  # a one-element array the optimizer updates in place
                params["user_bias_default"] = np.array([self.model.user_bias_default], np.float32)
        return params

    @one_fit_at_a_time
    def fit(self, train, val=None, *, rounds: int | None = None, progress: bool = False,
            callback: Callable[[dict], None] | None = None, checkpoint_dir=None,
            checkpoint_every: int = 0, keep: int = 2) -> FedRecon:
        """Run training rounds on the clients of ``train``.

        Parameters
        ----------
        train : ClientData or ClientSplits
            Training clients (sampled each round), or the splits of :func:`~fedrecon_fast.split_ratings`
            (its validation users then validate).
        val : ClientData, optional
            Validation clients for ReconEval every ``config.eval_every`` rounds and at the end.
        rounds : int, optional
            Rounds to run now (default ``config.rounds``); calling ``fit`` again continues.
        progress : bool
            Show a progress bar with the latest metrics (stderr).
        callback : callable, optional
            Called with each round's metrics dict.
        checkpoint_dir : path, optional
            Write a checkpoint (:mod:`fedrecon_fast.checkpoint`) here every ``checkpoint_every``
            rounds (0: only at the end) and when ``fit`` returns, keeping the newest ``keep``.
            :meth:`from_checkpoint` continues from it with bit-identical results. The folder
            is locked while ``fit`` runs: another process (or thread) is refused.

        Raises
        ------
        RuntimeError
            ``fit`` is already running on this trainer (one trainer per thread).
        """
        cfg = self.config
        train, val = splits.unpack(train, val)
        rounds = cfg.rounds if rounds is None else rounds
        check_int(rounds, "rounds", minimum=0)
        check_int(checkpoint_every, "checkpoint_every", minimum=0)
        check_training_clients(train)
        memory.check_training(train.num_items, cfg, client_sizes=train.sizes)
        self._start_privacy(train.num_clients)
        cfg = self.config
        if self.model is None:
            mean = float(train.ratings.mean()) if train.nnz else 0.0
            self.model = GlobalModel.initialize(train.item_ids, cfg, global_mean=mean,
                                                item_labels=getattr(train, "item_labels", None))
        if train.num_items != self.model.num_items or (val is not None and val.num_items != self.model.num_items):
            raise ValueError("train/val must share the model's item indexing (subsets of one ClientData)")
        params = self._params()
        if self._opt_state is None:
            self._opt_state = self._optimizer.init(params)
        # Rounds check only what they change (the touched rows, or V after a dense step).
        for name, p in params.items():
            if not np.isfinite(p).all():
                raise FloatingPointError(f"the global model's {name} is non-finite (NaN or inf) "
                                         f"before round {self.round}")

        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=rounds, desc="FedRecon", unit="round", leave=False)
        native = self._native_rounds(params, callback)
        try:
            k = 0
            while k < rounds:
                if self._privacy is not None and not self._privacy.can_run_round():
                    logger.warning("stopping before round %d: it would exceed the privacy budget epsilon=%g "
                                   "(delta=%g)", self.round, cfg.dp_target_epsilon, cfg.dp_delta)
                    break
                rows = self._run_chunk(train, self._chunk(rounds - k, checkpoint_every)) if native \
                    else [self._run_round(train, params)]
                for row in rows:
                    k += 1
                    self._after_round(row, val, bar, callback)
                    # The last round's checkpoint waits for the final validation below.
                    if checkpoint_dir is not None and checkpoint_every and row["round"] % checkpoint_every == 0 \
                            and k < rounds:
                        self.save_checkpoint(checkpoint_dir, keep=keep)
                if stop_requested():  # SIGTERM/SIGINT/SIGHUP under the CLI: checkpoint and return
                    break  # (at a round, or a native chunk's, boundary: the model is consistent)
            if val is not None and val.num_clients and self.history and "val_rmse" not in self.history[-1] \
                    and not stop_requested():
                self.history[-1].update(self._validate(val))
            if checkpoint_dir is not None:
                self.save_checkpoint(checkpoint_dir, keep=keep)
        finally:
            if bar is not None:
                bar.close()
        return self

    def _after_round(self, row: dict, val, bar, callback) -> None:
        """Validation when due, history, callback and progress bar after a round. (A native chunk
        ends at each round that validates, so the model is then that round's.)"""
        due = self.config.eval_every and (row["round"] % self.config.eval_every == 0)
        if val is not None and val.num_clients and due:
            row.update(self._validate(val))
        self.history.append(row)
        if callback is not None:
            callback(row)
        if bar is not None:
            shown = {"rmse": row["train_rmse"]}
            if "val_rmse" in row:
                shown["val_rmse"] = row["val_rmse"]
            if "dp_epsilon" in row:
                shown["eps"] = row["dp_epsilon"]
            bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
            bar.update(1)

    # Rounds per native call at most: Python sees the run (signals, progress) at least this often.
    _MAX_CHUNK = 64

    def _native_rounds(self, params: dict, callback) -> bool:
        """Whether ``fit`` runs whole chunks of rounds in one native call (kernels.train_rounds):
        when no round needs Python, i.e. the server step runs in the native round
        (:meth:`_in_place_step`), no per-round callback, and no per-client state to keep
        (FedRecon is stateless; the FedAvg baseline stores user embeddings)."""
        return (callback is None and bool(self._in_place_step(params)) and self.config.sampling == "fixed"
                and type(self)._user_state is FedRecon._user_state)

    def _chunk(self, remaining: int, checkpoint_every: int) -> int:
        """Rounds in the next native call: up to the next validation or checkpoint."""
        n = min(remaining, self._MAX_CHUNK)
        for every in (self.config.eval_every, checkpoint_every):
            if every:
                n = min(n, every - self.round % every)
        return n

    def _run_chunk(self, train, num_rounds: int) -> list[dict]:
        """``num_rounds`` rounds in the native training loop; their history rows."""
        cfg = self.config
        start = time.perf_counter()
        rec = kernels.train_rounds(
            self.model.item_factors, train, cfg.client, item_bias=self.model.item_bias,
            global_mean=self.model.global_mean, seed=cfg.seed, first_round=self.round,
            num_rounds=num_rounds, clients_per_round=cfg.clients_per_round, lr=self._optimizer.lr,
            num_threads=cfg.num_threads, bits=cfg.quantize_bits, scaling=cfg.quantize_scaling,
            hadamard=cfg.hadamard, sparse=cfg.sparse_updates, threshold=cfg.quantize_threshold)
        rows = []
        for i in range(len(rec["clients"])):
            self._optimizer.count_step(self._opt_state)
            s = {key: values[i].item() for key, values in rec.items()}
            rows.append(self._finish_round(s, s["clients"], s["seconds"], s["nonfinite_rows"] == 0))
        # train_seconds counts the whole call; round_seconds are the rounds' own times.
        self.train_seconds += time.perf_counter() - start - float(rec["seconds"].sum())
        return rows

    def _in_place_step(self, params: dict) -> dict:
        """``{"apply_lr": lr}`` when the local kernel can take the server step itself: plain
        SGD on V (and the item biases) only, no DP noise to add to the mean first. The model
        ends up the same as through the optimizer, without a dense delta."""
        cfg = self.config
        if (self.in_place_step and self._executor is kernels and cfg.server_optimizer == "sgd"
                and cfg.dp_clip is None and set(params) <= {"item_factors", "item_bias"}):
            return {"apply_lr": self._optimizer.lr}
        return {}

    def _run_round(self, train, params: dict) -> dict:
        cfg = self.config
        r = self.round
        start = time.perf_counter()
        clients = round_clients(cfg, train.num_clients, r)
        dp = self._privacy
        in_place = self._in_place_step(params)
        res = self._executor.train_round(
            self.model.item_factors, train, clients, cfg.client, item_bias=self.model.item_bias,
            global_mean=self.model.global_mean, seed=cfg.seed, round=r,
            num_threads=cfg.num_threads, check_finite=False, bits=cfg.quantize_bits,
            scaling=cfg.quantize_scaling, hadamard=cfg.hadamard, sparse=cfg.sparse_updates,
            threshold=cfg.quantize_threshold, clip=None if dp is None else dp.clip, **self.model.default_kwargs(),
            **self._user_state(train, clients), **in_place)
        self._store_users(clients, res)
        if in_place:
            # The kernel took the SGD step on the rows the round touched; V was finite before
            # (checked when fit started and after every round), so those rows are all it checks.
            self._optimizer.count_step(self._opt_state)
            finite = res.summary["nonfinite_rows"] == 0
        else:
            update = {"item_factors": res.delta}
            if res.delta_bias is not None:
                update["item_bias"] = res.delta_bias
            if "user_default" in params:
                update.update(self._default_update(res))
            if dp is not None:
                privatize_mean(update, res.summary["total_weight"], clip=dp.clip,
                               noise_multiplier=dp.value_noise_multiplier, expected_clients=dp.expected_clients,
                               seed=cfg.seed, round=r, num_threads=cfg.num_threads)
            # The native round aggregates only finite float32 updates of the right shapes, and V
            # itself is checked just below, so the optimizer's own validation pass is skipped.
            self._optimizer.apply(params, update, self._opt_state, validate=False)
            if "user_bias_default" in params:
                self.model.user_bias_default = float(params["user_bias_default"][0])
            finite = bool(np.isfinite(self.model.item_factors).all())
        return self._finish_round(res.summary, len(clients), time.perf_counter() - start, finite)

    def _finish_round(self, s: dict, num_clients: int, seconds: float, finite: bool) -> dict:
        """Counters, divergence checks and the history row of the round just run."""
        cfg = self.config
        r = self.round
        self.train_seconds += seconds
        if not finite:
            raise FloatingPointError(f"the global model became non-finite in round {r}; "
                                     f"{divergence.explain(cfg, self.model.item_factors)}")
        # The server broadcasts the float32 model to every sampled client; clients send their
        # encoded updates (sizes counted by the native codec).
        params = self._params()
        broadcast = 32 * num_clients * sum(p.size for p in params.values())
        aggregated = 8 * s["bytes_sent"]
        if "user_default" in params:  # each reporting client's float32 offset from the default
            aggregated += 32 * s["num_reporting"] * (params["user_default"].size + ("user_bias_default" in params))
        self.broadcasted_bits += broadcast
        self.aggregated_bits += aggregated
        if s["num_reporting"] == 0 and s["num_nonfinite"] > 0:
            raise FloatingPointError(
                f"training diverged in round {r}: all {s['num_nonfinite']} sampled clients produced "
                f"non-finite updates; {divergence.explain(cfg, self.model.item_factors)}")
        n = s["num_examples"]
        privacy = {} if self._privacy is None else self._privacy.end_round(s, r)
        self.round += 1
        return {
            "round": self.round,
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
            "broadcasted_bits_total": self.broadcasted_bits,
            "aggregated_bits_total": self.aggregated_bits,
            **({"dp_clipped": s["num_clipped"],
                "dp_clip_fraction": s["num_clipped"] / s["num_reporting"] if s["num_reporting"] else 0.0,
                "dp_noise_std": cfg.dp_noise * cfg.dp_clip} if cfg.dp_clip is not None else {}),
            **privacy,
            "round_seconds": seconds,
        }

    def _user_state(self, train, clients) -> dict:
        """Starting embeddings to send with the clients: FedRecon is stateless, but with a
        learned default every client starts from it (and its final u comes back)."""
        u0 = self.model.user_default
        if u0 is None:
            return {}
        state = {"users": np.tile(u0, (len(clients), 1))}
        if self.model.item_bias is not None:
            state["user_bias"] = np.full(len(clients), self.model.user_bias_default, np.float32)
        return state

    def _default_update(self, res) -> dict:
        """Weighted mean of the reporting clients' offsets from the learned default u."""
        w = res.client_stats["weight"]
        reporting = w > 0
        total = w[reporting].sum()
        u0 = self.model.user_default
        weights = (w[reporting] / total)[:, None] if total > 0 else np.zeros((0, 1))
        offsets = res.users[reporting].astype(np.float64) - u0
        update = {"user_default": (weights * offsets).sum(0).astype(np.float32)}
        if res.user_bias is not None:
            db = res.user_bias[reporting].astype(np.float64) - self.model.user_bias_default
            update["user_bias_default"] = np.array([(weights[:, 0] * db).sum()], np.float32)
        return update

    def _store_users(self, clients, result) -> None:
        """Keep what the clients return about their users (nothing for FedRecon)."""

    def _validate(self, val) -> dict:
        start = time.perf_counter()
        m = self.evaluate(val, k=None)  # validation tracks RMSE only: ranking scores every item
        self.eval_seconds += time.perf_counter() - start
        return {"val_loss": m["loss"], "val_rmse": m["rmse"], "val_accuracy": m["accuracy"]}

    def evaluate(self, data, clients=None, *, per_user: bool = False, k: int | None = 10,
                 relevance_threshold: float | None = 4.0) -> dict:
        """ReconEval of the current model on clients of ``data`` (default: all of them).

        Reports RMSE and accuracy and, unless ``k`` is None, ``recall_at_{k}`` and
        ``ndcg_at_{k}`` (see :func:`fedrecon_fast.evaluation.recon_eval`).
        """
        if self.model is None:
            raise ValueError("the model is not trained yet: call fit() first")
        return recon_eval(self.model, data, clients, self.config.evaluation, seed=self.config.seed,
                          num_threads=self.config.num_threads, per_user=per_user, k=k,
                          relevance_threshold=relevance_threshold)
