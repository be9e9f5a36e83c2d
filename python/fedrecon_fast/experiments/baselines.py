"""The baselines of Singhal et al. (2021), Table 1, and StandardEval.

- :class:`CentralizedMF`: all training ratings on one server; user and item embeddings trained
  together by minibatch SGD (native, serial, deterministic) or by ALS (alternating exact ridge
  solves, which are the native exact reconstruction run on user-major and item-major data).
- :class:`FedAvg`: the stateful federated baseline. The server stores every user's embedding
  between rounds ("stale" state); a sampled client receives V and its own u, trains both, and
  the server aggregates V and stores u.
- :func:`standard_eval`: metrics on held-out ratings of *seen* users with their stored
  embeddings (the per-user timestamp split of :func:`fedrecon_fast.split_by_time`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import kernels
from .._guards import one_fit_at_a_time
from .._rng import STREAM_EPOCH_ORDER, STREAM_ITEM_TABLE, STREAM_USER_TABLE, generator
from .._validation import (
    as_float32_matrix,
    check_choice,
    check_float,
    check_int,
    check_threads,
)
from ..config import ClientConfig, FedReconConfig, preset
from ..data import ClientData
from ..evaluation import summarize
from ..kernels import mf_sgd_epoch
from ..model import GlobalModel
from ..training import FedRecon


def _uniform(shape, scale: float, seed: int, stream: int) -> np.ndarray:
    rng = generator(seed, 0, 0, stream)
    return rng.uniform(-scale, scale, size=shape).astype(np.float32)


def transpose(data: ClientData) -> ClientData:
    """The same ratings item-major: client k of the result is item k of ``data``."""
    user_index, items, ratings = data.to_coo()
    order = np.argsort(items, kind="stable")
    indptr = np.zeros(data.num_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(items, minlength=data.num_items), out=indptr[1:])
    return ClientData(
        indptr, user_index[order].astype(np.int32), ratings[order], user_ids=data.item_ids, item_ids=data.user_ids
    )


def standard_eval(users, model: GlobalModel, data: ClientData, *, user_bias=None, per_user: bool = False) -> dict:
    """StandardEval: score every rating of ``data`` with the stored user embeddings.

    Parameters
    ----------
    users : ndarray, shape (data.num_clients, dim)
        Stored embedding of each client of ``data`` (same order).
    model : GlobalModel
    data : ClientData
        Held-out ratings of the same users (e.g. the last 10% by time).
    user_bias : ndarray, shape (data.num_clients,), optional
        Stored user biases (for models with biases).
    """
    users = as_float32_matrix(users, "users", cols=model.dim)
    if users.shape[0] != data.num_clients:
        raise ValueError(f"users must have one row per client of data ({data.num_clients}); got {users.shape[0]}")
    user_index, items, ratings = data.to_coo()
    pred = np.einsum("ij,ij->i", users[user_index], model.item_factors[items]) + model.global_mean
    if model.item_bias is not None:
        if user_bias is None:
            raise ValueError("user_bias is required for a model with biases")
        pred += np.asarray(user_bias, dtype=np.float32)[user_index] + model.item_bias[items]
    err = pred.astype(np.float64) - ratings
    n = data.num_clients
    sq = np.bincount(user_index, weights=err * err, minlength=n)
    count = np.bincount(user_index, minlength=n)
    correct = np.bincount(user_index, weights=(np.abs(err) <= 0.5), minlength=n)
    return summarize(sq, count, correct.astype(np.int64), per_user=per_user)


@dataclass(frozen=True)
class CentralizedConfig:
    """Centralized matrix factorization.

    Parameters
    ----------
    dim : int
    method : {"sgd", "als"}
    epochs : int
        SGD passes over all ratings, or ALS sweeps (users then items).
    batch_size, lr, l2 : SGD minibatch size, learning rate, and L2 (batch loss + l2 |rows|²).
    als_ridge : float
        Ridge of each ALS solve.
    biases : bool
        Global mean, user and item biases.
    init_scale : float
        Embeddings start from U(-init_scale, init_scale).
    seed, num_threads : int
    """

    dim: int = 50
    method: str = "sgd"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    l2: float = 0.0
    als_ridge: float = 5.0
    biases: bool = False
    init_scale: float = 0.05
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        check_int(self.dim, "dim", minimum=1)
        check_choice(self.method, "method", {"sgd", "als"})
        check_int(self.epochs, "epochs", minimum=0)
        check_int(self.batch_size, "batch_size", minimum=1)
        check_float(self.lr, "lr", minimum=0.0)
        check_float(self.l2, "l2", minimum=0.0)
        check_float(self.als_ridge, "als_ridge", minimum=0.0, strict=True)
        check_float(self.init_scale, "init_scale", minimum=0.0)
        check_int(self.seed, "seed", minimum=0)
        check_threads(self.num_threads)


class CentralizedMF:
    """Matrix factorization with all training ratings on one server.

    After :meth:`fit`, ``users`` (and ``user_bias``) hold one embedding per client of the
    training data, and ``model`` is the item side as a :class:`GlobalModel` (for ReconEval).
    """

    def __init__(self, config: CentralizedConfig | None = None):
        self.config = config or CentralizedConfig()
        # Filled in by fit: the stored users (and biases) and the item side as a model.
        self.users: np.ndarray = None  # type: ignore[assignment]
        self.user_bias: np.ndarray | None = None
        self.model: GlobalModel = None  # type: ignore[assignment]
        self.history: list[dict] = []
        self.train_seconds = 0.0

    @one_fit_at_a_time
    def fit(self, data: ClientData, val: ClientData | None = None, *, progress: bool = False) -> CentralizedMF:
        """Train on every rating of ``data``; ``val`` (held-out ratings of the same users) is
        scored by StandardEval after each epoch."""
        cfg = self.config
        if data.nnz == 0:
            raise ValueError("data has no ratings")
        mean = float(data.ratings.mean()) if cfg.biases else 0.0
        self.users = _uniform((data.num_clients, cfg.dim), cfg.init_scale, cfg.seed, STREAM_USER_TABLE)
        items = _uniform((data.num_items, cfg.dim), cfg.init_scale, cfg.seed, STREAM_ITEM_TABLE)
        self.user_bias = np.zeros(data.num_clients, np.float32) if cfg.biases else None
        item_bias = np.zeros(data.num_items, np.float32) if cfg.biases else None
        # GlobalModel keeps these float32 arrays without copying: training updates the model.
        self.model = GlobalModel(items, item_bias, mean, data.item_ids)
        user_index, item_index, ratings = data.to_coo()
        by_item = transpose(data) if cfg.method == "als" else data
        rng = generator(cfg.seed, 0, 0, STREAM_EPOCH_ORDER)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.epochs, desc=f"centralized {cfg.method}", unit="epoch", leave=False)
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            if cfg.method == "sgd":
                order = rng.permutation(len(ratings))
                sse = mf_sgd_epoch(
                    self.users,
                    items,
                    user_index[order],
                    item_index[order],
                    ratings[order],
                    user_bias=self.user_bias,
                    item_bias=item_bias,
                    global_mean=mean,
                    batch_size=cfg.batch_size,
                    lr=cfg.lr,
                    l2=cfg.l2,
                )
                row = {"epoch": epoch + 1, "train_rmse": float(np.sqrt(sse / len(ratings)))}
            else:
                self._als_sweep(data, by_item)
                row = {"epoch": epoch + 1}
            self.train_seconds += time.perf_counter() - start
            if val is not None:
                m = standard_eval(self.users, self.model, val, user_bias=self.user_bias)
                row.update(val_rmse=m["rmse"], val_accuracy=m["accuracy"])
            self.history.append(row)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k != "epoch"}, refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        return self

    def _als_sweep(self, data: ClientData, by_item: ClientData) -> None:
        # Each half-step is the exact ridge reconstruction of one side with the other frozen.
        cfg = self.config
        solve = ClientConfig(recon="exact", ridge=cfg.als_ridge, split="reuse")
        m = self.model
        users, user_bias = kernels.reconstruct_users(
            m.item_factors,
            data,
            None,
            solve,
            item_bias=m.item_bias,
            global_mean=m.global_mean,
            num_threads=cfg.num_threads,
        )
        self.users[...] = users
        if user_bias is not None and self.user_bias is not None:
            self.user_bias[...] = user_bias
        items, item_bias = kernels.reconstruct_users(
            self.users,
            by_item,
            None,
            solve,
            item_bias=self.user_bias,
            global_mean=m.global_mean,
            num_threads=cfg.num_threads,
        )
        m.item_factors[...] = items
        if item_bias is not None and m.item_bias is not None:
            m.item_bias[...] = item_bias

    def standard_eval(self, data: ClientData, **kw) -> dict:
        """StandardEval on held-out ratings of the training users (same client order)."""
        return standard_eval(self.users, self.model, data, user_bias=self.user_bias, **kw)


def fedavg_config(**overrides) -> FedReconConfig:
    """Stateful FedAvg in the paper recipe's setting: no reconstruction; each client trains its
    stored u jointly with V on all of its ratings (one epoch, batch 5, ≤ 50 steps). ReconEval of
    its V uses the paper's reconstruction schedule."""
    paper = preset("paper")
    base = paper.replace(split="reuse", recon_epochs=0, recon_steps_max=None, joint=True, eval_client=paper.client)
    return base.replace(**overrides) if overrides else base


class FedAvg(FedRecon):
    """Stateful FedAvg: the server stores every user's embedding between rounds.

    Same interface as :class:`FedRecon`; ``users`` (and ``user_bias``) hold the stored
    embedding of each training client (initialised U(-a, a), a = ``client.init_scale``), which
    StandardEval uses. ReconEval ignores them and reconstructs, as for FedRecon.
    """

    def __init__(self, config: FedReconConfig | None = None, *, model: GlobalModel | None = None, backend="local"):
        super().__init__(config if config is not None else fedavg_config(), model=model, backend=backend)
        if self.config.learn_user_default:
            raise ValueError("FedAvg stores every user's embedding; learn_user_default is for FedRecon")
        # Filled in by the first round: one stored embedding (and bias) per training client.
        self.users: np.ndarray = None  # type: ignore[assignment]
        self.user_bias: np.ndarray | None = None

    def _user_state(self, train, clients) -> dict:
        if self.users is None:
            cfg = self.config
            self.users = _uniform((train.num_clients, cfg.dim), cfg.client.init_scale, cfg.seed, STREAM_USER_TABLE)
            self.user_bias = np.zeros(train.num_clients, np.float32) if cfg.biases else None
        if len(self.users) != train.num_clients:
            raise ValueError("FedAvg keeps one embedding per training client: fit on the same clients")
        state = {"users": self.users[clients]}
        if self.user_bias is not None:
            state["user_bias"] = self.user_bias[clients]
        return state

    def extra_state(self) -> dict:
        out = super().extra_state()
        if self.users is not None:
            out["users"] = self.users
        if self.user_bias is not None:
            out["user_bias"] = self.user_bias
        return out

    def _restore_extra(self, arrays: dict) -> None:
        super()._restore_extra(arrays)
        self.users = arrays.get("users")  # type: ignore[assignment]  # None until the first round
        self.user_bias = arrays.get("user_bias")

    def _store_users(self, clients, result) -> None:
        self.users[clients] = result.users
        if result.user_bias is not None and self.user_bias is not None:
            self.user_bias[clients] = result.user_bias

    def standard_eval(self, data: ClientData, **kw) -> dict:
        """StandardEval on held-out ratings of the training clients (same client order)."""
        if self.users is None:
            raise ValueError("the model is not trained yet: call fit() first")
        return standard_eval(self.users, self.model, data, user_bias=self.user_bias, **kw)
