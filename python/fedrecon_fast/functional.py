"""Framework-neutral FedRecon steps: one client's step, one server step.

A FedRecon round (Algorithm 1 of Singhal et al., "Federated Reconstruction: Partially Local
Federated Learning", NeurIPS 2021) split at the network boundary, for frameworks that run one
client at a time (Flower, a custom RPC layer, a notebook):

* :func:`client_step` runs on a client: reconstruct the local user embedding ``u`` on the
  support set with V frozen (``u`` is never returned), train the rows of V the query set
  touches, and return the sparse update (row ids + values [+ item-bias values]), optionally
  clipped and quantized exactly as the wire format sends it, with its weight and metrics.
* :func:`server_step` runs on the server: the weighted mean of the clients' updates in one
  native call (float64, in the order of ``results``), then the server optimizer with ``-Δ`` as
  the gradient.

Running :func:`client_step` over the clients of :func:`~fedrecon_fast.sample_clients` and then
:func:`server_step` on their results, in cohort order, gives the model of
:class:`~fedrecon_fast.FedRecon`'s fused native round for the same seed and round: every random
choice of a client comes from its own streams ``(seed, round, client id)``.

Example
-------
>>> import fedrecon_fast as ff
>>> from fedrecon_fast.functional import client_step, server_init, server_step
>>> data = ff.synthetic_ratings(num_users=100, num_items=80, seed=0)
>>> config = ff.preset("paper", dim=8, clients_per_round=10)
>>> state = server_init(config, data=data)
>>> for _ in range(3):
...     cohort = ff.sample_clients(data.num_clients, config.clients_per_round, config.seed, state.round)
...     results = [client_step(state.model, data, config, client=int(c), round=state.round) for c in cohort]
...     state = server_step(state, results)
>>> state.round, state.metrics["clients"]
(3, 10)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import compression, kernels
from ._validation import as_float32_matrix, as_float32_vector, check_float, check_int, check_threads
from .config import ClientConfig, FedReconConfig, UpdateCodec
from .evaluation import EVAL_ROUND, summarize
from .kernels import RoundResult
from .model import GlobalModel
from .server import STATUS_NONFINITE, FixedPrivacy, Server, ServerState, round_summary

__all__ = [
    "ClientResult",
    "ClientUpdate",
    "ServerState",
    "client_evaluate",
    "client_step",
    "server_init",
    "server_step",
]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends: ``values[k]`` is its update of row ``rows[k]`` of V.

    Attributes
    ----------
    rows : ndarray of int32, shape (n,)
        Row ids of V (item indices); all ``num_rows`` rows for a dense quantized update.
    values : ndarray of float32, shape (n, dim)
        The update of those rows as the server decodes it (after clipping and quantization).
    bias_values : ndarray of float32, shape (n,), or None
        Item-bias updates of the same rows (None for a model without biases).
    num_rows : int
        Rows of V.
    dense : bool
        The configured scheme sends a dense ``num_rows x dim`` delta (``sparse_updates=False``);
        ``rows``/``values`` then still hold only its non-zero rows unless it is quantized.
    encoded : bytes or None
        With quantization, the real wire buffer of the item-factor update
        (:func:`fedrecon_fast.compression.encode_sparse` when sparse, else
        :func:`~fedrecon_fast.compression.encode`); ``values`` is its decoding. Item biases
        always travel as float32.
    """

    rows: np.ndarray
    values: np.ndarray
    bias_values: np.ndarray | None
    num_rows: int
    dense: bool = False
    encoded: bytes | None = None

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def to_dense(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(delta, delta_bias)`` as dense float32 arrays of V's shape (0 on other rows)."""
        delta = np.zeros((self.num_rows, self.values.shape[1]), dtype=np.float32)
        delta[self.rows] = self.values
        bias = None
        if self.bias_values is not None:
            bias = np.zeros(self.num_rows, dtype=np.float32)
            bias[self.rows] = self.bias_values
        return delta, bias


@dataclass(frozen=True)
class ClientResult:
    """Output of :func:`client_step`.

    Attributes
    ----------
    update : ClientUpdate
        The client's update (empty when it did not report).
    weight : float
        Its aggregation weight: query examples (or 1 with uniform weighting); 0 when it did not
        report (a non-finite update, or no query data).
    metrics : dict
        Training metrics on its query batches: ``loss_sum``, ``num_examples``, ``num_correct``,
        ``loss``, ``rmse``, ``accuracy``; and ``recon_examples``, ``rows`` (touched rows of V),
        ``bytes`` (encoded size of the update), ``clipped``, ``status`` (0 ok, 1 non-finite,
        2 no query data), ``client_id``.
    """

    update: ClientUpdate
    weight: float
    metrics: dict


# --------------------------------------------------------------------------------------------
# Client side


def _model_arrays(model) -> tuple[np.ndarray, np.ndarray | None, float, FedReconConfig | None]:
    """(V, item_bias, global_mean, config) of a GlobalModel or a mapping of arrays."""
    if isinstance(model, GlobalModel):
        return model.item_factors, model.item_bias, model.global_mean, model.config
    if isinstance(model, Mapping):
        if "item_factors" not in model:
            raise ValueError("model must hold 'item_factors' (and optionally 'item_bias', 'global_mean')")
        unknown = set(model) - {"item_factors", "item_bias", "global_mean"}
        if unknown:
            raise ValueError(f"model has unknown keys {sorted(unknown)}; expected item_factors, item_bias, global_mean")
        V = as_float32_matrix(model["item_factors"], "item_factors")
        bias = model.get("item_bias")
        if bias is not None:
            bias = as_float32_vector(bias, "item_bias", size=V.shape[0])
        mean = model.get("global_mean", 0.0)
        check_float(mean, "global_mean")
        return V, bias, float(mean), None
    raise TypeError(f"model must be a GlobalModel or a dict of arrays; got {type(model).__name__}")


def _configs(config, model_config) -> tuple[ClientConfig, FedReconConfig | None]:
    """(client behaviour, full config or None) from a FedReconConfig, a ClientConfig or None."""
    if config is None:
        config = model_config if model_config is not None else FedReconConfig()
    if isinstance(config, FedReconConfig):
        return config.client, config
    if isinstance(config, ClientConfig):
        return config, None
    raise TypeError(f"config must be a FedReconConfig or a ClientConfig; got {type(config).__name__}")


def _one_client(data, client, client_id, num_items: int):
    """``(csr, row, key)``: CSR data holding the client at ``row``, keyed for the random streams
    by ``key`` (``client_id``, default the client's row of ``data``).

    A client of a ClientData keyed by its own row is used in place; otherwise its ratings go
    into a one-row CSR whose ``stream_ids`` give the kernels the key, so any ``client_id`` costs
    O(ratings) and nothing more.
    """
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ValueError("data must be a ClientData or a tuple (items, ratings) of one client")
        if client is not None:
            raise ValueError("client selects a row of a ClientData; with (items, ratings) give client_id")
        items = np.asarray(data[0])
        if items.ndim != 1 or (items.size and items.dtype.kind not in "iu"):
            raise TypeError(f"items must be a 1-D integer array; got dtype {items.dtype}, shape {items.shape}")
        if items.size and (items.min() < 0 or items.max() >= num_items):
            raise ValueError(f"items must lie in [0, {num_items}); got values in [{items.min()}, {items.max()}]")
        ratings = as_float32_vector(data[1], "ratings", size=items.shape[0])
        items = np.ascontiguousarray(items, dtype=np.int32)
    else:
        for name in ("indptr", "items", "ratings"):
            if not isinstance(getattr(data, name, None), np.ndarray):
                raise TypeError(f"data must be a ClientData or a tuple (items, ratings); got {type(data).__name__}")
        if client is None:
            if data.num_clients != 1:
                raise ValueError(f"client is required: data holds {data.num_clients} clients")
            client = 0
        check_int(client, "client", minimum=0)
        if client >= data.num_clients:
            raise ValueError(f"client must lie in [0, {data.num_clients}); got {client}")
        client = int(client)
        if client_id is None or client_id == client:
            return data, client, client
        lo, hi = int(data.indptr[client]), int(data.indptr[client + 1])
        items, ratings = data.items[lo:hi], data.ratings[lo:hi]
    if client_id is None:
        raise ValueError("client_id is required with (items, ratings): it keys the client's random streams")
    check_int(client_id, "client_id", minimum=0, maximum=2**63 - 1)
    csr = SimpleNamespace(
        indptr=np.array([0, items.shape[0]], dtype=np.int64),
        items=np.ascontiguousarray(items, dtype=np.int32),
        ratings=np.ascontiguousarray(ratings, dtype=np.float32),
        stream_ids=np.array([client_id], dtype=np.int64),
        num_clients=1,
        num_items=num_items,
    )
    return csr, 0, int(client_id)


def _client_metrics(stats: dict, k: int) -> dict:
    m = {name: (float(v[k]) if v.dtype.kind == "f" else int(v[k])) for name, v in stats.items()}
    n = m["num_examples"]
    m["loss"] = m["loss_sum"] / n if n else float("nan")
    m["rmse"] = float(np.sqrt(m["loss"])) if n else float("nan")
    m["accuracy"] = m["num_correct"] / n if n else float("nan")
    return m


def client_step(
    model,
    data,
    config=None,
    *,
    client: int | None = None,
    client_id: int | None = None,
    seed: int | None = None,
    round: int = 0,
    num_threads: int = 1,
) -> ClientResult:
    """One client's FedRecon step with the native kernel; ``u`` stays on the client.

    Parameters
    ----------
    model : GlobalModel or dict
        The global model as broadcast: a :class:`GlobalModel`, or a dict with
        ``item_factors`` (V, ``(num_items, dim)``) and optionally ``item_bias`` and
        ``global_mean``.
    data : ClientData or tuple (items, ratings)
        The client's ratings: row ``client`` of a ClientData (item indices into V's rows), or
        one client's ``items`` (int, into V's rows) and ``ratings`` arrays.
    config : FedReconConfig or ClientConfig, optional
        A FedReconConfig also sets the update's clipping (``dp_clip``), quantization
        (``quantize_*``, ``hadamard``) and ``sparse_updates``, and the default ``seed``; a
        ClientConfig sends float32 rows. Default: the model's config, else TFF's defaults.
    client : int, optional
        Row of ``data`` (optional when it holds one client).
    client_id : int, optional
        Key of the client's random streams ``(seed, round, client_id)``; default ``client``.
        :class:`~fedrecon_fast.FedRecon` keys a client by its index in the training data, so
        pass that index to reproduce its rounds; a client holding only its own ratings must
        pass it (every client needs its own id).
    seed : int, optional
        Default: ``config.seed`` (0 with a ClientConfig).
    round : int
        Round number (0-based; :attr:`ServerState.round`).
    num_threads : int
        Threads of the native calls (0: all cores).

    Returns
    -------
    ClientResult

    Raises
    ------
    ValueError, TypeError
        Bad inputs, named.
    """
    V, bias, mean, model_config = _model_arrays(model)
    client_cfg, full = _configs(config, model_config)
    if seed is None:
        seed = full.seed if full is not None else 0
    check_int(seed, "seed", minimum=0)
    check_int(round, "round", minimum=0)
    check_threads(num_threads)
    num_items, K = V.shape
    csr, row, key = _one_client(data, client, client_id, num_items)
    codec = full.codec if full is not None else UpdateCodec()
    sparse = codec.sparse
    quantize = codec.quantizes(num_items, K)

    # The kernel clips; quantization goes through the real wire format, whose decoding is
    # bit-identical to the fused round's in-kernel codec (same (seed, round, client) key).
    out = kernels.client_updates(
        V,
        csr,
        [row],
        client_cfg,
        item_bias=bias,
        global_mean=mean,
        seed=seed,
        round=round,
        num_threads=num_threads,
        codec=dataclasses.replace(codec, bits=0),
    )
    rows, values, bias_values = out.client(0)
    metrics = _client_metrics(out.client_stats, 0)
    metrics["client_id"] = key
    weight = metrics.pop("weight")
    encoded = None
    if quantize and weight > 0:
        bits = codec.bits
        common = dict(
            scaling="row" if codec.row_scaling else "tensor",
            hadamard=codec.hadamard,
            seed=seed,
            round=round,
            client=key,
            num_threads=num_threads,
        )
        if sparse:
            encoded = compression.encode_sparse(rows, values, bits, num_rows=num_items, **common)
            rows, values = compression.decode_sparse(encoded, num_threads=num_threads)
        else:
            dense = np.zeros((num_items, K), dtype=np.float32)
            dense[rows] = values
            encoded = compression.encode(dense, bits, **common)
            values = compression.decode(encoded, num_threads=num_threads)
            if bias_values is not None:
                dense_bias = np.zeros(num_items, dtype=np.float32)
                dense_bias[rows] = bias_values
                bias_values = dense_bias
            rows = np.arange(num_items, dtype=np.int32)
        bias_bytes = 4 * len(rows) if bias_values is not None else 0
        metrics["bytes"] = len(encoded) + bias_bytes
    update = ClientUpdate(rows, values, bias_values, num_items, dense=not sparse, encoded=encoded)
    return ClientResult(update, weight, metrics)


def client_evaluate(
    model,
    data,
    config=None,
    *,
    client: int | None = None,
    client_id: int | None = None,
    seed: int | None = None,
    num_threads: int = 1,
) -> dict:
    """ReconEval of one client: reconstruct ``u`` on its support set, score its query set.

    Arguments as in :func:`client_step` (``config.evaluation`` is used with a FedReconConfig).
    The random streams are those of :func:`~fedrecon_fast.recon_eval` for a client at index
    ``client_id``. Returns the pooled metrics of :func:`~fedrecon_fast.recon_eval` plus the
    sums ``sq_err_sum``, ``num_examples``, ``num_correct``, ``abs_err_sum`` (for pooling across
    clients).
    """
    V, bias, mean, model_config = _model_arrays(model)
    if config is None:
        config = model_config if model_config is not None else FedReconConfig()
    if isinstance(config, FedReconConfig):
        seed = config.seed if seed is None else seed
        config = config.evaluation
    client_cfg, _ = _configs(config, None)
    seed = 0 if seed is None else seed
    csr, row, _ = _one_client(data, client, client_id, V.shape[0])
    stats = kernels.evaluate_users(
        V,
        csr,
        [row],
        client_cfg,
        item_bias=bias,
        global_mean=mean,
        seed=seed,
        round=EVAL_ROUND,
        num_threads=num_threads,
    )
    sums: dict[str, Any] = {
        "sq_err_sum": float(stats["sq_err_sum"][0]),
        "num_examples": int(stats["num_examples"][0]),
        "num_correct": int(stats["num_correct"][0]),
        "abs_err_sum": float(stats["abs_err_sum"][0]),
    }
    return {**summarize(**sums), **sums}


# --------------------------------------------------------------------------------------------
# Server side


def server_init(config: FedReconConfig | None = None, *, model: GlobalModel | None = None, data=None) -> ServerState:
    """The server's state before round 0.

    Parameters
    ----------
    config : FedReconConfig, optional
        Default: ``model.config``, else TFF's defaults.
    model : GlobalModel, optional
        Start from this model; otherwise one is initialised exactly as
        :meth:`FedRecon.fit <fedrecon_fast.FedRecon.fit>` does from ``data``.
    data : ClientData, optional
        Training data (its item ids and mean rating); needed without ``model``.
    """
    if config is None:
        config = model.config if model is not None and model.config is not None else FedReconConfig()
    if not isinstance(config, FedReconConfig):
        raise TypeError(f"config must be a FedReconConfig; got {type(config).__name__}")
    if config.learn_user_default:
        raise ValueError("learn_user_default is not supported one client at a time yet: use FedRecon")
    if config.dp_target_quantile is not None or config.dp_target_epsilon is not None or config.sampling != "fixed":
        raise ValueError(
            "adaptive clipping, privacy budgets and Poisson sampling keep state between rounds that "
            "server_step does not: use FedRecon (or its Flower and Ray backends)"
        )
    if model is None:
        if data is None:
            raise ValueError("give model or data (the training ClientData) to initialise the model")
        mean = float(data.ratings.mean()) if data.nnz else 0.0
        model = GlobalModel.initialize(data.item_ids, config, global_mean=mean)
    elif not isinstance(model, GlobalModel):
        raise TypeError(f"model must be a GlobalModel; got {type(model).__name__}")
    return Server(ServerState(model, config, None)).state


def _copy_model(model: GlobalModel) -> GlobalModel:
    return dataclasses.replace(
        model,
        item_factors=model.item_factors.copy(),
        item_bias=None if model.item_bias is None else model.item_bias.copy(),
    )


def _check_results(results, model: GlobalModel) -> list[ClientResult]:
    if isinstance(results, ClientResult) or not isinstance(results, Sequence):
        raise TypeError(f"results must be a sequence of ClientResult; got {type(results).__name__}")
    if len(results) == 0:
        raise ValueError("results must hold at least one ClientResult")
    biased = model.item_bias is not None
    for k, r in enumerate(results):
        if not isinstance(r, ClientResult):
            raise TypeError(f"results[{k}] must be a ClientResult; got {type(r).__name__}")
        u = r.update
        if u.num_rows != model.num_items or u.values.ndim != 2 or u.values.shape[1] != model.dim:
            raise ValueError(
                f"results[{k}] does not fit the model: an update of {u.num_rows} rows x "
                f"{u.values.shape[1:]} for V of shape {model.item_factors.shape}"
            )
        if (u.bias_values is not None) != biased:
            raise ValueError(
                f"results[{k}] {'lacks' if biased else 'has'} item-bias values but the "
                f"model {'has' if biased else 'has no'} item biases"
            )
        check_float(r.weight, f"results[{k}].weight", minimum=0.0)
    return list(results)


def server_step(
    state: ServerState, results: Sequence[ClientResult], *, inplace: bool = False, num_threads: int | None = None
) -> ServerState:
    """Aggregate one round's client results and apply the server optimizer.

    The weighted mean ``Δ = Σ w_i Δ_i / Σ w_i`` of the reporting clients (weight > 0) is one
    native call over their concatenated sparse rows, summed in float64 in the order of
    ``results`` (the cohort order of the fused round); with ``config.dp_clip`` Gaussian noise
    is added as in :class:`~fedrecon_fast.FedRecon`. The server optimizer then takes ``-Δ`` as
    the gradient.

    Parameters
    ----------
    state : ServerState
    results : sequence of ClientResult
        One per client of the cohort, in cohort order (clients that did not report included,
        so they are counted).
    inplace : bool
        Update ``state``'s model and optimizer arrays in place (saves copying V) instead of
        leaving ``state`` untouched.
    num_threads : int, optional
        Threads of the aggregation (default ``config.num_threads``; 0: all cores).

    Returns
    -------
    ServerState
        With ``round`` advanced and ``metrics`` of this round.

    Raises
    ------
    FloatingPointError
        The model became non-finite, or every client's update was non-finite.
    """
    start = time.perf_counter()
    if not isinstance(state, ServerState):
        raise TypeError(f"state must be a ServerState; got {type(state).__name__}")
    cfg = state.config
    threads = cfg.num_threads if num_threads is None else num_threads
    check_threads(threads)
    results = _check_results(results, state.model)
    # A new state; its model and optimizer arrays are the old ones (updated) with ``inplace``.
    model, opt_state = state.model, state.optimizer_state or {}
    if not inplace:
        model, opt_state = _copy_model(model), {k: v.copy() for k, v in opt_state.items()}
    state = dataclasses.replace(state, model=model, optimizer_state=opt_state, metrics={})
    server = Server(state)
    result = _reduce(results, state.model, threads)
    privacy = None if cfg.dp is None else FixedPrivacy(cfg.dp, cfg.clients_per_round)
    # As in FedRecon, DP noise uses the configuration's thread count (results do not depend on it).
    finite = server.apply(result, privacy=privacy, num_threads=cfg.num_threads)
    metrics = server.finish_round(result.summary, len(results), finite=finite, privacy=privacy)
    metrics["server_seconds"] = time.perf_counter() - start
    state.metrics = metrics
    return state


def _reduce(results: list[ClientResult], model: GlobalModel, num_threads: int) -> RoundResult:
    """The round's weighted mean and totals from the clients' results, as the fused round makes them.

    Every result keeps its cohort position (weight 0 when it did not report), so the native
    reduction sums each row's clients in the fused round's order: one call, the same bits.
    """
    status = np.array([int(r.metrics.get("status", 0)) for r in results], np.int64)
    # A client reports when it has weight and its update is finite (the native round's rule).
    reports = [r.weight > 0 and s != STATUS_NONFINITE for r, s in zip(results, status)]
    sent = [r.update if ok else None for r, ok in zip(results, reports)]
    stats = {
        "weight": np.array([float(r.weight) if ok else 0.0 for r, ok in zip(results, reports)]),
        "loss_sum": np.array([float(r.metrics.get("loss_sum", 0.0)) for r in results]),
        "num_examples": np.array([int(r.metrics.get("num_examples", 0)) for r in results], np.int64),
        "num_correct": np.array([int(r.metrics.get("num_correct", 0)) for r in results], np.int64),
        "rows": np.array([int(r.metrics.get("rows", len(r.update))) for r in results], np.int64),
        "bytes": np.array([int(r.metrics.get("bytes", 0)) for r in results], np.int64),
        "clipped": np.array([int(r.metrics.get("clipped", 0)) for r in results], np.int64),
        "status": status,
    }
    if not any(u is not None for u in sent):
        delta = np.zeros_like(model.item_factors)
        delta_bias = None if model.item_bias is None else np.zeros_like(model.item_bias)
        return RoundResult(delta, delta_bias, stats, round_summary(stats, 0))
    rows = np.concatenate([u.rows for u in sent if u is not None])
    values = np.concatenate([u.values for u in sent if u is not None]).reshape(len(rows), model.dim)
    bias = np.concatenate([u.bias_values for u in sent if u is not None]) if model.item_bias is not None else None
    offsets = np.zeros(len(results) + 1, dtype=np.int64)
    np.cumsum([0 if u is None else len(u) for u in sent], out=offsets[1:])
    delta, delta_bias, _ = kernels.reduce_updates(
        rows, values, offsets, stats["weight"], num_items=model.num_items, bias_values=bias, num_threads=num_threads
    )
    return RoundResult(delta, delta_bias, stats, round_summary(stats, int(np.unique(rows).size)))
