"""The FedRecon trainer: round orchestration around the fused native round.

Each round samples clients (a pure function of (seed, round)), runs the whole cohort through an
executor (by default one native call in this process: reconstruct u locally → update the
touched rows of V → weighted mean of the updates), and hands the mean to the server step
(:mod:`fedrecon_fast.server`: DP noise, the server optimizer with -Δ as the gradient, checks
and metrics), as in Algorithm 1 of Singhal et al., "Federated Reconstruction: Partially Local
Federated Learning", NeurIPS 2021.

An executor is any object with :func:`fedrecon_fast.kernels.train_round`'s signature (and
optionally ``close()``); :mod:`fedrecon_fast.integrations` provides Ray's and Flower's. The
trainer knows neither.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import numpy as np

from . import accounting, kernels, memory, splits
from ._guards import one_fit_at_a_time
from ._signals import stop_requested
from ._validation import check_int
from .config import FedReconConfig
from .evaluation import recon_eval
from .kernels import sample_clients
from .model import GlobalModel
from .sampling import poisson_rate, poisson_sample_clients
from .server import Server, ServerState, model_params, server_optimizer

logger = logging.getLogger(__name__)


def round_clients(config: FedReconConfig, num_clients: int, round: int) -> np.ndarray:
    """The cohort of one round as ``config.sampling`` says (fixed-size or Poisson)."""
    if config.sampling == "poisson":
        return poisson_sample_clients(
            num_clients, poisson_rate(num_clients, config.clients_per_round), config.seed, round
        )
    return sample_clients(num_clients, config.clients_per_round, config.seed, round)


def check_training_clients(train) -> None:
    """Training needs clients, each with at least one rating."""
    if train.num_clients == 0:
        raise ValueError("train has no clients")
    empty = int((train.sizes == 0).sum())
    if empty:
        raise ValueError(
            f"train has {empty} clients without ratings; drop them first with data.prepare(min_examples=1)"
        )


def _executor(backend):
    """The object whose ``train_round`` runs a cohort (same signature as kernels.train_round)."""
    if backend == "local":
        return kernels
    if isinstance(backend, str):
        from .integrations import executor

        return executor(backend)
    if not callable(getattr(backend, "train_round", None)):
        raise TypeError(
            f"backend must be 'local', the name of an executor ('ray') or an object with a "
            f"train_round method; got {backend!r}"
        )
    return backend


def _on_state(name: str) -> property:
    """A trainer attribute that is its server state's."""
    return property(
        lambda self: getattr(self.state, name),
        lambda self, value: setattr(self.state, name, value),
        doc=f"``state.{name}``",
    )


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
        Ray workers (:class:`fedrecon_fast.integrations.ray.RayExecutor`; pass one to choose its
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

    def __init__(self, config: FedReconConfig | None = None, *, model: GlobalModel | None = None, backend="local"):
        config = config if config is not None else FedReconConfig()
        if not isinstance(config, FedReconConfig):
            raise TypeError(f"config must be a FedReconConfig; got {type(config).__name__}")
        if model is not None and not isinstance(model, GlobalModel):
            raise TypeError(f"model must be a GlobalModel; got {type(model).__name__}")
        server_optimizer(config)  # its options are checked now, not at the first fit
        self._executor = _executor(backend)
        self._owns_executor = isinstance(backend, str) and backend != "local"
        #: The server's side of training (model, optimizer state, round, bits); the model is
        #: None until the first ``fit``.
        self.state = ServerState(model, config, None)  # type: ignore[arg-type]
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        # DP state between rounds (clip norm, accountant), made by fit and kept in checkpoints.
        self._privacy: accounting.RunPrivacy | None = None
        self._privacy_state: dict = {}
        # The server step inside the native round (Server.in_place_step); False forces the dense
        # delta and the optimizer, e.g. to compare the two.
        self.in_place_step = True

    config = _on_state("config")
    model = _on_state("model")
    round = _on_state("round")
    broadcasted_bits = _on_state("broadcasted_bits")
    aggregated_bits = _on_state("aggregated_bits")

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
        expected = server_optimizer(config).init(model_params(trainer.model))
        state = meta["optimizer_state"]
        if state.keys() != expected.keys() or any(state[k].shape != expected[k].shape for k in state):
            raise CheckpointError("the checkpoint's optimizer state does not match the model")
        trainer.state.optimizer_state = {k: np.array(v, dtype=expected[k].dtype) for k, v in state.items()}
        trainer._restore_extra(meta["extra"])
        return trainer

    def extra_state(self) -> dict:
        """Arrays the rounds keep besides the model and the optimizer state (what a checkpoint
        saves): the DP state (FedRecon's clients are stateless)."""
        if self._privacy is not None:
            return self._privacy.state()
        return dict(self._privacy_state)

    def _restore_extra(self, arrays: dict) -> None:
        """Take back what :meth:`extra_state` saved (the DP state waits for ``fit``)."""
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

    @one_fit_at_a_time
    def fit(
        self,
        train,
        val=None,
        *,
        rounds: int | None = None,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        checkpoint_dir=None,
        checkpoint_every: int = 0,
        keep: int = 2,
    ) -> FedRecon:
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
            self.model = GlobalModel.initialize(
                train.item_ids, cfg, global_mean=mean, item_labels=getattr(train, "item_labels", None)
            )
        if train.num_items != self.model.num_items or (val is not None and val.num_items != self.model.num_items):
            raise ValueError("train/val must share the model's item indexing (subsets of one ClientData)")
        server = Server(self.state)
        # Rounds check only what they change (the touched rows, or V after a dense step).
        for name, p in server.params.items():
            if not np.isfinite(p).all():
                raise FloatingPointError(
                    f"the global model's {name} is non-finite (NaN or inf) before round {self.round}"
                )

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=rounds, desc="FedRecon", unit="round", leave=False)
        native = self._native_rounds(server, callback)
        try:
            k = 0
            while k < rounds:
                if self._privacy is not None and not self._privacy.can_run_round():
                    logger.warning(
                        "stopping before round %d: it would exceed the privacy budget epsilon=%g (delta=%g)",
                        self.round,
                        cfg.dp_target_epsilon,
                        cfg.dp_delta,
                    )
                    break
                rows = (
                    self._run_chunk(server, train, self._chunk(rounds - k, checkpoint_every))
                    if native
                    else [self._run_round(server, train)]
                )
                for row in rows:
                    k += 1
                    self._after_round(row, val, bar, callback)
                    # The last round's checkpoint waits for the final validation below.
                    if (
                        checkpoint_dir is not None
                        and checkpoint_every
                        and row["round"] % checkpoint_every == 0
                        and k < rounds
                    ):
                        self.save_checkpoint(checkpoint_dir, keep=keep)
                if stop_requested():  # SIGTERM/SIGINT/SIGHUP under the CLI: checkpoint and return
                    break  # (at a round, or a native chunk's, boundary: the model is consistent)
            if (
                val is not None
                and val.num_clients
                and self.history
                and "val_rmse" not in self.history[-1]
                and not stop_requested()
            ):
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

    def _native_rounds(self, server: Server, callback) -> bool:
        """Whether ``fit`` runs whole chunks of rounds in one native call (kernels.train_rounds):
        when no round needs Python, i.e. the server step runs in the native round
        (:meth:`_native_step`), no per-round callback, and no per-client state to keep
        (FedRecon is stateless; the FedAvg baseline stores user embeddings)."""
        return (
            callback is None
            and self._native_step(server) is not None
            and self.config.sampling == "fixed"
            and type(self)._user_state is FedRecon._user_state
        )

    def _chunk(self, remaining: int, checkpoint_every: int) -> int:
        """Rounds in the next native call: up to the next validation or checkpoint."""
        n = min(remaining, self._MAX_CHUNK)
        for every in (self.config.eval_every, checkpoint_every):
            if every:
                n = min(n, every - self.round % every)
        return n

    def _run_chunk(self, server: Server, train, num_rounds: int) -> list[dict]:
        """``num_rounds`` rounds in the native training loop; their history rows."""
        cfg = self.config
        step = self._native_step(server)
        assert step is not None  # _native_rounds said so
        start = time.perf_counter()
        rec = kernels.train_rounds(
            self.model.item_factors,
            train,
            cfg.client,
            item_bias=self.model.item_bias,
            global_mean=self.model.global_mean,
            seed=cfg.seed,
            first_round=self.round,
            num_rounds=num_rounds,
            clients_per_round=cfg.clients_per_round,
            lr=step["apply_lr"],
            num_threads=cfg.num_threads,
            codec=cfg.codec,
            momentum=step.get("momentum"),
        )
        rows = []
        for i in range(len(rec["clients"])):
            server.stepped_in_place()
            s = {key: values[i].item() for key, values in rec.items()}
            rows.append(self._finish_round(server, s, s["clients"], s["seconds"], s["nonfinite_rows"] == 0))
        # train_seconds counts the whole call; round_seconds are the rounds' own times.
        self.train_seconds += time.perf_counter() - start - float(rec["seconds"].sum())
        return rows

    def _native_step(self, server: Server) -> dict | None:
        """The arguments of a server step that the local kernel takes itself
        (:meth:`Server.in_place_step`: SGD, or SGD with momentum), or None. The model ends up
        the same as through the optimizer, without a dense delta."""
        if self.in_place_step and self._executor is kernels:
            return server.in_place_step()
        return None

    def _run_round(self, server: Server, train) -> dict:
        cfg = self.config
        r = self.round
        start = time.perf_counter()
        clients = round_clients(cfg, train.num_clients, r)
        dp = self._privacy
        step = self._native_step(server)
        codec = cfg.codec if dp is None else dataclasses.replace(cfg.codec, clip=dp.clip)  # adaptive clipping moves it
        res = self._executor.train_round(
            self.model.item_factors,
            train,
            clients,
            cfg.client,
            item_bias=self.model.item_bias,
            global_mean=self.model.global_mean,
            seed=cfg.seed,
            round=r,
            num_threads=cfg.num_threads,
            check_finite=False,
            codec=codec,
            **self.model.default_kwargs(),
            **self._user_state(train, clients),
            **(step or {}),
        )
        self._store_users(clients, res)
        if step is not None:
            # The kernel took the step on the rows it moved (the touched rows; every row with
            # momentum); V was finite before (checked when fit started and after every round),
            # so those rows are all it checks.
            server.stepped_in_place()
            finite = res.summary["nonfinite_rows"] == 0
        else:
            finite = server.apply(res, privacy=dp, num_threads=cfg.num_threads)
        return self._finish_round(server, res.summary, len(clients), time.perf_counter() - start, finite)

    def _finish_round(self, server: Server, summary: dict, num_clients: int, seconds: float, finite: bool) -> dict:
        """The server's checks, counters and metrics of the round just run, as a history row."""
        self.train_seconds += seconds
        row = server.finish_round(summary, num_clients, finite=finite, privacy=self._privacy)
        row["round_seconds"] = seconds
        return row

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

    def _store_users(self, clients, result) -> None:
        """Keep what the clients return about their users (nothing for FedRecon)."""

    def _validate(self, val) -> dict:
        start = time.perf_counter()
        m = self.evaluate(val, k=None)  # validation tracks RMSE only: ranking scores every item
        self.eval_seconds += time.perf_counter() - start
        return {"val_loss": m["loss"], "val_rmse": m["rmse"], "val_accuracy": m["accuracy"]}

    def evaluate(
        self, data, clients=None, *, per_user: bool = False, k: int | None = 10, relevance_threshold: float | None = 4.0
    ) -> dict:
        """ReconEval of the current model on clients of ``data`` (default: all of them).

        Reports RMSE and accuracy and, unless ``k`` is None, ``recall_at_{k}`` and
        ``ndcg_at_{k}`` (see :func:`fedrecon_fast.evaluation.recon_eval`).
        """
        if self.model is None:
            raise ValueError("the model is not trained yet: call fit() first")
        return recon_eval(
            self.model,
            data,
            clients,
            self.config.evaluation,
            seed=self.config.seed,
            num_threads=self.config.num_threads,
            per_user=per_user,
            k=k,
            relevance_threshold=relevance_threshold,
        )
