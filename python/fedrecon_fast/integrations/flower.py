"""Flower integration: FedRecon on Flower's Message API, computed by our native kernels.

Install with ``pip install "fedrecon_fast[flower]"``. Two ways to use Flower:

* **The Flower App** (:mod:`fedrecon_fast.integrations.flower_app`; ``examples/flower`` is its app folder):
  ``flwr run`` it in Flower's simulation runtime or on a SuperLink with SuperNodes, each node
  holding a partition of the users. The ServerApp runs :class:`fedrecon_fast.FedRecon` with the
  nodes as its backend, so the model is the local trainer's bit for bit. :class:`FlowerFedRecon`
  runs it through ``flwr run`` on a SuperLink it starts (``fedrecon-fast train --backend
  flower``), with the public surface of :class:`fedrecon_fast.FedRecon`.
* **One SuperNode per user** (cross-device): :func:`client_app` builds a ClientApp for one
  user's node. On a *train* message (V, item biases, round, seed and the FedReconConfig as
  JSON) it runs one :func:`~fedrecon_fast.functional.client_step`: reconstructs the user's
  embedding locally (it never leaves the node), updates the rows of V its ratings touch, and
  replies with the update (sparse rows + values, a dense delta, or the real b-bit wire buffer
  of :mod:`fedrecon_fast.compression`) and its weight; on *evaluate* with ReconEval sums; on
  *query* with its partition id. :class:`FedReconStrategy` (a
  ``flwr.serverapp.strategy.FedAvg``) samples the users of a round exactly as
  :func:`fedrecon_fast.sample_clients` does, aggregates the replies with our weighted sparse
  kernel and applies our server optimizer (:func:`~fedrecon_fast.functional.server_step`).

Users and nodes of the per-user route
-------------------------------------
The node with ``partition-id = k`` is user ``k`` of the training
:class:`~fedrecon_fast.ClientData`. Flower's node ids are random, so before the first round the
strategy asks every node for its partition id (one small *query* message each) and keeps the
map. A round then samples users with :func:`fedrecon_fast.sample_clients` (seed, round) and
sends to their nodes; a node keys its random streams by ``(seed, round, partition id)`` — the
streams of user ``k`` in :class:`~fedrecon_fast.FedRecon`'s fused round — and the strategy
aggregates the replies in cohort order, in float64, as the fused round does, so the model is
again bit-identical to the local trainer's.

Example
-------
>>> import fedrecon_fast as ff
>>> from fedrecon_fast.integrations.flower import FlowerFedRecon
>>> data = ff.synthetic_ratings(num_users=60, num_items=50, seed=0)
>>> train, val, test = (data.subset(ix) for ix in ff.split_users(data.num_clients, seed=0))
>>> trainer = FlowerFedRecon(ff.preset("paper", dim=8, rounds=3, clients_per_round=5))
>>> trainer.fit(train, val).evaluate(test)["rmse"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fedrecon_fast.integrations.flower needs Flower: pip install 'fedrecon_fast[flower]'") from e

from .. import compression
from .._guards import one_fit_at_a_time
from .._rng import STREAM_SAMPLE, generator
from .._validation import check_float, check_int, check_threads
from ..config import FedReconConfig
from ..data import ClientData
from ..evaluation import recon_eval, summarize
from ..functional import (
    ClientResult,
    ClientUpdate,
    ServerState,
    client_evaluate,
    client_step,
    server_step,
)
from ..model import GlobalModel
from ..training import check_training_clients, sample_clients
from . import _records as records

__all__ = [
    "FedReconStrategy",
    "FlowerFedRecon",
    "client_app",
    "load_client_data",
    "save_client_data",
]

logger = logging.getLogger(__name__)

PARTITION_ID = "partition-id"
_CONFIG_KEY = "fedrecon-config"

# --------------------------------------------------------------------------------------------
# Client data on nodes


def save_client_data(data: ClientData, path: str | os.PathLike) -> Path:
    """Write ``data`` to one ``.npz`` file (no pickle) that :func:`client_app` can load by path.

    A simulation passes the path rather than the data: Flower ships the ClientApp to its
    workers with every message, so the data must not travel inside it.
    """
    if not isinstance(data, ClientData):
        raise TypeError(f"data must be a ClientData; got {type(data).__name__}")
    path = Path(path)
    arrays: dict[str, Any] = {
        "indptr": data.indptr,
        "items": data.items,
        "ratings": data.ratings,
        "user_ids": data.user_ids,
        "item_ids": data.item_ids,
    }
    if data.timestamps is not None:
        arrays["timestamps"] = data.timestamps
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_client_data(path: str | os.PathLike) -> ClientData:
    """Read a file written by :func:`save_client_data`."""
    with np.load(path, allow_pickle=False) as z:
        missing = {"indptr", "items", "ratings", "user_ids", "item_ids"} - set(z.files)
        if missing:
            raise ValueError(f"{path} is not saved client data: it lacks {sorted(missing)}")
        return ClientData(**{k: z[k] for k in z.files})


_cache: dict[str, ClientData] = {}
_cache_lock = threading.Lock()


def _node_data(source, context: Context) -> ClientData:
    """The node's ClientData: given, loaded once per process from a path, or from a callable."""
    if isinstance(source, ClientData):
        return source
    if callable(source):
        data = source(context)
        if not isinstance(data, ClientData):
            raise TypeError(f"the data loader must return a ClientData; got {type(data).__name__}")
        return data
    key = os.fspath(source)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_client_data(key)
        return _cache[key]


def _partition(context: Context) -> int:
    if PARTITION_ID not in context.node_config:
        raise ValueError(f"the node has no {PARTITION_ID!r} in its node config: it names the user")
    return int(context.node_config[PARTITION_ID])


def _row(data: ClientData, user: int) -> int:
    """The node's row in its data: the user's own row of the training data, or its only row."""
    if data.num_clients == 1:
        return 0
    if not 0 <= user < data.num_clients:
        raise ValueError(f"partition id {user} is not a user of the node's data ({data.num_clients} users)")
    return user


# --------------------------------------------------------------------------------------------
# Messages


def _model_record(model: GlobalModel) -> ArrayRecord:
    arrays = {"item_factors": Array(model.item_factors)}
    if model.item_bias is not None:
        arrays["item_bias"] = Array(model.item_bias)
    return ArrayRecord(arrays)


def _model_from(message: Message) -> dict:
    """The broadcast model as the dict client_step takes."""
    arrays = message.content.array_records["arrays"]
    cfg = message.content.config_records["config"]
    model = {"item_factors": arrays["item_factors"].numpy(), "global_mean": records.number(cfg, "global-mean")}
    if "item_bias" in arrays:
        model["item_bias"] = arrays["item_bias"].numpy()
    return model


_config_cache: dict[str, FedReconConfig] = {}


def _config_from(message: Message) -> FedReconConfig:
    text = records.text(message.content.config_records["config"], _CONFIG_KEY)
    if text not in _config_cache:
        _config_cache[text] = FedReconConfig.from_dict(json.loads(text))
    return _config_cache[text]


def _update_record(result: ClientResult, config: FedReconConfig) -> ArrayRecord:
    """What a client sends: the wire buffer when quantized, else float32 rows or a dense delta.

    The keys depend only on the config, so every reply of a round has the same keys (Flower
    checks this); a client that does not report sends empty arrays.
    """
    u = result.update
    quantized = config.quantize_bits is not None and u.num_rows * u.values.shape[1] >= config.quantize_threshold
    arrays = {}
    if quantized:
        arrays["encoded"] = Array(np.frombuffer(u.encoded or b"", dtype=np.uint8))
        bias = u.bias_values
    elif config.sparse_updates:
        arrays["rows"] = Array(np.ascontiguousarray(u.rows, dtype=np.int32))
        arrays["values"] = Array(u.values)
        bias = u.bias_values
    elif result.weight > 0:
        delta, bias = u.to_dense()
        arrays["values"] = Array(delta)
    else:  # a dense non-report: no rows at all
        arrays["values"] = Array(u.values[:0])
        bias = None if u.bias_values is None else u.bias_values[:0]
    if bias is not None:
        arrays["item-bias"] = Array(np.ascontiguousarray(bias, dtype=np.float32))
    return ArrayRecord(arrays)


def _result_from(content: RecordDict, model: GlobalModel, num_threads: int) -> ClientResult:
    """Rebuild a client's ClientResult from its reply (decoding a wire buffer)."""
    arrays = content.array_records["update"]
    metrics = dict(content.metric_records["metrics"])
    N, K = model.item_factors.shape
    bias = arrays["item-bias"].numpy() if "item-bias" in arrays else None
    encoded = None
    if "encoded" in arrays:
        buf = arrays["encoded"].numpy()
        if buf.size == 0:
            rows, values = np.zeros(0, np.int32), np.zeros((0, K), np.float32)
        elif compression.buffer_info(buf).get("sparse"):
            rows, values = compression.decode_sparse(buf, num_threads=num_threads)
        else:
            values = compression.decode(buf, num_threads=num_threads)
            rows = np.arange(N, dtype=np.int32)
        encoded = buf.tobytes()
    elif "rows" in arrays:
        rows, values = arrays["rows"].numpy(), arrays["values"].numpy()
    else:  # a dense delta (or none)
        values = arrays["values"].numpy()
        rows = np.arange(values.shape[0], dtype=np.int32)
        if values.shape[0] not in (0, N):
            raise ValueError(f"a reply's dense update has {values.shape[0]} rows; V has {N}")
    if values.ndim != 2 or values.shape[1] != K or rows.shape[0] != values.shape[0]:
        raise ValueError(
            f"a reply's update has {rows.shape[0]} rows and values of shape {values.shape}; V is {N} x {K}"
        )
    # One bad reply must not sink the round's aggregation: check it here, per client.
    if rows.size and (rows.min() < 0 or rows.max() >= N):
        raise ValueError(f"a reply's rows lie outside [0, {N})")
    if (bias is not None and bias.shape != rows.shape) or (bias is None) != (model.item_bias is None):
        raise ValueError("a reply's item-bias values do not match its rows or the model")
    if not (np.isfinite(values).all() and (bias is None or np.isfinite(bias).all())):
        raise ValueError("a reply's update is not finite")
    weight = records.number(metrics, "weight")
    del metrics["weight"]
    metrics = {k.replace("-", "_"): v for k, v in metrics.items()}
    update = ClientUpdate(rows, values, bias, N, dense="rows" not in arrays, encoded=encoded)
    return ClientResult(update, weight, metrics)


# --------------------------------------------------------------------------------------------
# ClientApp


def client_app(data, *, num_threads: int = 1) -> ClientApp:
    """A Flower ClientApp whose node is one FedRecon user.

    Parameters
    ----------
    data : ClientData, path, or callable
        The node's ratings: a :class:`~fedrecon_fast.ClientData` holding only this user, or
        the whole training data (the node takes row ``partition-id``); a path written by
        :func:`save_client_data` (loaded once per process; what simulations should pass); or
        ``data(context) -> ClientData``.
    num_threads : int
        Threads of the node's native calls.

    Message protocol
    ----------------
    train
        In: ``arrays`` (``item_factors`` [, ``item_bias``]), ``config`` (``round``, ``user``,
        ``global-mean``, ``fedrecon-config`` = ``FedReconConfig.to_dict()`` as JSON). Out:
        ``update`` (``rows`` + ``values``, or dense ``values``, or ``encoded`` wire buffer; plus
        ``item-bias``) and ``metrics`` (``weight``, ``num-examples``, ``loss-sum``,
        ``num-correct``, ``bytes``, ``status``, ...). The user's streams are keyed by its
        partition id.
    evaluate
        In: as train. Out: ``metrics`` with ReconEval sums ``sq-err-sum``, ``num-examples``,
        ``num-correct``.
    query
        Out: ``metrics`` with ``partition-id`` and ``num-ratings``.
    """
    if not (isinstance(data, (ClientData, str, os.PathLike)) or callable(data)):
        raise TypeError(f"data must be a ClientData, a path or a callable; got {type(data).__name__}")
    check_threads(num_threads)
    app = ClientApp()

    def user_data(message: Message, context: Context) -> tuple[ClientData, int, int]:
        user = _partition(context)
        expected = message.content.config_records["config"].get("user") if "config" in message.content else None
        if expected is not None and records.integer({"user": expected}, "user") != user:
            raise ValueError(f"a message for user {expected!r} reached the node of user {user}")
        node_data = _node_data(data, context)
        return node_data, _row(node_data, user), user

    @app.query()
    def query(message: Message, context: Context) -> Message:
        node_data, row, user = user_data(message, context)
        metrics = MetricRecord({PARTITION_ID: user, "num-ratings": int(node_data.sizes[row])})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node_data, row, user = user_data(message, context)
        config = _config_from(message)
        result = client_step(
            _model_from(message),
            node_data,
            config,
            client=row,
            client_id=user,
            seed=config.seed,
            round=records.integer(message.content.config_records["config"], "round"),
            num_threads=num_threads,
        )
        m = result.metrics
        metrics = MetricRecord(
            {
                "weight": float(result.weight),
                "num-examples": int(m["num_examples"]),
                "loss-sum": float(m["loss_sum"]),
                "num-correct": int(m["num_correct"]),
                "recon-examples": int(m["recon_examples"]),
                "rows": int(m["rows"]),
                "bytes": int(m["bytes"]),
                "clipped": int(m["clipped"]),
                "status": int(m["status"]),
                "user": user,
            }
        )
        return Message(RecordDict({"update": _update_record(result, config), "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        node_data, row, user = user_data(message, context)
        config = _config_from(message)
        m = client_evaluate(
            _model_from(message), node_data, config, client=row, client_id=user, num_threads=num_threads
        )
        metrics = MetricRecord(
            {
                "num-examples": m["num_examples"],
                "sq-err-sum": m["sq_err_sum"],
                "num-correct": m["num_correct"],
                "user": user,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


# --------------------------------------------------------------------------------------------
# Strategy


class FedReconStrategy(FedAvg):
    """FedRecon's server in Flower: seeded user sampling, native aggregation, server optimizer.

    Parameters
    ----------
    state : ServerState
        The server's state (:func:`fedrecon_fast.functional.server_init`); the strategy
        advances it in place each round (``strategy.state``).
    num_users : int
        Training users; nodes must carry partition ids ``0 .. num_users - 1``.
    fraction_evaluate : float
        Fraction of users that run federated ReconEval on their own ratings every
        ``config.eval_every`` rounds (every round when 0); 0 disables it.
    on_failure : {"drop", "raise"}
        A failed or unusable reply is a dropped client (logged), or stops training with its
        reason. A round without any usable reply always stops it.
    node_timeout : float
        Seconds to wait for all nodes to connect.
    timeout : float, optional
        Seconds to wait for the replies of discovery messages (None: no limit).

    Attributes
    ----------
    history : list of dict
        One row per round: the :attr:`ServerState.metrics` keys plus ``round_seconds`` (wall
        time from sampling to the aggregated model, messaging included), ``failures``,
        ``flower_bytes_down``/``flower_bytes_up`` (array payloads of the messages) and, with
        federated evaluation, ``fed_loss``, ``fed_rmse``, ``fed_accuracy``.
    node_of_user : dict
        The discovered node id of every user.
    discovery_seconds : float
        Time spent waiting for nodes and mapping partition ids to nodes.
    eval_seconds : float
        Time spent in centralized evaluation (:meth:`evaluate_fn`).
    """

    def __init__(
        self,
        state: ServerState,
        num_users: int,
        *,
        fraction_evaluate: float = 0.0,
        on_failure: str = "drop",
        node_timeout: float = 600.0,
        timeout: float | None = None,
    ):
        if not isinstance(state, ServerState):
            raise TypeError(f"state must be a ServerState; got {type(state).__name__}")
        check_int(num_users, "num_users", minimum=1)
        check_float(fraction_evaluate, "fraction_evaluate", minimum=0.0, maximum=1.0)
        if on_failure not in ("drop", "raise"):
            raise ValueError(f"on_failure must be 'drop' or 'raise'; got {on_failure!r}")
        check_float(node_timeout, "node_timeout", minimum=0.0)
        cfg = state.config
        super().__init__(
            fraction_train=min(1.0, cfg.clients_per_round / num_users),
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=0,
            min_evaluate_nodes=0,
            min_available_nodes=num_users,
            weighted_by_key="num-examples",
        )
        self.state = state
        self.num_users = int(num_users)
        self.on_failure = on_failure
        self.node_timeout = float(node_timeout)
        self.timeout = timeout
        self.node_of_user: dict[int, int] = {}
        self.history: list[dict] = []
        self.discovery_seconds = 0.0
        self._user_of_node: dict[int, int] = {}
        self._cohort: dict[int, int] = {}
        self.eval_seconds = 0.0
        self._round_start = 0.0
        self._bytes_down = 0

    @property
    def config(self) -> FedReconConfig:
        return self.state.config

    def arrays(self) -> ArrayRecord:
        """The current global model as an ArrayRecord (``initial_arrays`` of ``start``)."""
        return _model_record(self.state.model)

    def summary(self) -> None:
        cfg = self.config
        logger.info(
            "FedReconStrategy: %d users, %d per round, server %s lr %g, seed %d",
            self.num_users,
            cfg.clients_per_round,
            cfg.server_optimizer,
            cfg.server_lr,
            cfg.seed,
        )

    # -- users and nodes

    def discover(self, grid: Grid) -> dict[int, int]:
        """Map every user to its node: wait for the nodes, ask each its partition id."""
        start = time.perf_counter()
        while len(nodes := list(grid.get_node_ids())) < self.num_users:
            if time.perf_counter() - start > self.node_timeout:
                raise RuntimeError(
                    f"only {len(nodes)} of {self.num_users} nodes connected within {self.node_timeout:g} s"
                )
            time.sleep(0.05)
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({"fedrecon": "partition-id"})}),
                message_type=MessageType.QUERY,
                dst_node_id=node,
            )
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        failed = [m for m in replies if m.has_error()]
        if failed or len(replies) != len(nodes):
            reason = failed[0].error.reason if failed else "no reply"
            raise RuntimeError(
                f"{len(nodes) - len(replies) + len(failed)} of {len(nodes)} nodes did "
                f"not say their partition id ({reason})"
            )
        users = {
            m.metadata.src_node_id: records.integer(m.content.metric_records["metrics"], PARTITION_ID) for m in replies
        }
        self.node_of_user = {u: n for n, u in users.items() if u < self.num_users}
        missing = sorted(set(range(self.num_users)) - set(self.node_of_user))
        if missing or len(self.node_of_user) != sum(u < self.num_users for u in users.values()):
            raise RuntimeError(
                f"nodes must hold partition ids 0..{self.num_users - 1} once each; "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} or duplicated"
            )
        self._user_of_node = {n: u for u, n in self.node_of_user.items()}
        self.discovery_seconds += time.perf_counter() - start
        return self.node_of_user

    def _messages(self, users, message_type: str, server_round: int) -> list[Message]:
        cfg = self.config
        model = self.state.model
        arrays = _model_record(model)
        self._bytes_down = len(users) * arrays.count_bytes()
        text = json.dumps(cfg.to_dict())
        return [
            Message(
                RecordDict(
                    {
                        "arrays": arrays,
                        "config": ConfigRecord(
                            {
                                "server-round": server_round,
                                "round": self.state.round,
                                "user": int(u),
                                "global-mean": float(model.global_mean),
                                _CONFIG_KEY: text,
                            }
                        ),
                    }
                ),
                message_type=message_type,
                dst_node_id=self.node_of_user[int(u)],
            )
            for u in users
        ]

    # -- training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Sample this round's users as FedRecon does and send them the model.

        The model sent is ``self.state``'s (equal to ``arrays``, which the previous
        ``aggregate_train`` returned).
        """
        if not self.node_of_user:
            self.discover(grid)
        self._round_start = time.perf_counter()
        cfg = self.config
        users = sample_clients(self.num_users, cfg.clients_per_round, cfg.seed, self.state.round)
        self._cohort = {int(u): k for k, u in enumerate(users)}
        return self._messages(users, MessageType.TRAIN, server_round)

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate in cohort order with the native kernel; apply the server optimizer."""
        valid, failed = self._check_and_log_replies(list(replies), is_train=True)
        reasons = [str(m.error.reason) for m in failed]
        results, bytes_up = [], 0
        for m in valid:
            user = self._user_of_node.get(m.metadata.src_node_id)
            try:
                if user not in self._cohort:
                    raise ValueError(f"node {m.metadata.src_node_id} was not sampled this round")
                result = _result_from(m.content, self.state.model, self.config.num_threads)
            except (ValueError, TypeError, KeyError) as e:
                reasons.append(f"unusable reply: {e}")
                continue
            results.append((self._cohort[user], result))
            bytes_up += m.content.array_records["update"].count_bytes()
        self._failures(reasons, "training")
        if not results:
            raise RuntimeError(f"no client replied usefully in round {server_round}")
        results.sort(key=lambda pair: pair[0])
        self.state = server_step(self.state, [r for _, r in results], inplace=True)
        row = dict(self.state.metrics)
        row.update(
            round_seconds=time.perf_counter() - self._round_start,
            failures=len(reasons),
            flower_bytes_down=self._bytes_down,
            flower_bytes_up=bytes_up,
        )
        self.history.append(row)
        numeric: dict[str, Any] = {
            k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        return self.arrays(), MetricRecord(numeric)

    def _failures(self, reasons: list[str], what: str) -> None:
        if not reasons:
            return
        if self.on_failure == "raise":
            raise RuntimeError(f"{len(reasons)} client(s) failed in {what}; the first said: {reasons[0]}")
        logger.warning("%d client(s) failed in %s and were dropped; the first said: %s", len(reasons), what, reasons[0])

    # -- evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Federated ReconEval on a seeded sample of users' own ratings (if enabled and due)."""
        done, every = self.state.round, self.config.eval_every
        if self.fraction_evaluate == 0.0 or (every and done % every):
            return []
        if not self.node_of_user:
            self.discover(grid)
        n = max(1, int(round(self.fraction_evaluate * self.num_users)))
        # Client coordinate 1 of the sampling stream: never the training sample's.
        rng = generator(self.config.seed, done, 1, STREAM_SAMPLE)
        users = np.sort(rng.choice(self.num_users, size=n, replace=False))
        return self._messages(users, MessageType.EVALUATE, server_round)

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        """Pool the users' ReconEval sums (example-weighted, as recon_eval)."""
        valid, failed = self._check_and_log_replies(list(replies), is_train=False)
        self._failures([str(m.error.reason) for m in failed], "evaluation")
        if not valid:
            return None
        sums = [
            (
                m.content.metric_records["metrics"]["sq-err-sum"],
                m.content.metric_records["metrics"]["num-examples"],
                m.content.metric_records["metrics"]["num-correct"],
            )
            for m in valid
        ]
        pooled = summarize(*zip(*sums))
        if self.history:
            self.history[-1].update(fed_loss=pooled["loss"], fed_rmse=pooled["rmse"], fed_accuracy=pooled["accuracy"])
        return MetricRecord({k: pooled[k] for k in ("loss", "rmse", "accuracy", "users", "ratings")})

    def evaluate_fn(
        self, data: ClientData | None, last_round: int | None = None, *, on_round: Callable[[dict], None] | None = None
    ) -> Callable:
        """Centralized ReconEval on ``data`` (e.g. validation users) for ``start(evaluate_fn=...)``.

        After each round, runs :func:`fedrecon_fast.recon_eval` when ``config.eval_every``
        divides the number of rounds done (``state.round``) or it reaches ``last_round`` (as
        :meth:`FedRecon.fit <fedrecon_fast.FedRecon.fit>` does), adds ``val_loss``,
        ``val_rmse``, ``val_accuracy`` to the round's history row, then calls
        ``on_round(row)``. The time spent is added to ``self.eval_seconds``.
        """

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 or not self.history:
                return None  # Flower also calls it before the first round
            row = self.history[-1]
            done, every = self.state.round, self.config.eval_every
            out = None
            if data is not None and data.num_clients and ((every and done % every == 0) or done == last_round):
                start = time.perf_counter()
                m = recon_eval(
                    self.state.model,
                    data,
                    None,
                    self.config.evaluation,
                    seed=self.config.seed,
                    num_threads=self.config.num_threads,
                )
                self.eval_seconds += time.perf_counter() - start
                row.update(val_loss=m["loss"], val_rmse=m["rmse"], val_accuracy=m["accuracy"])
                out = MetricRecord({"val_loss": m["loss"], "val_rmse": m["rmse"], "val_accuracy": m["accuracy"]})
            if on_round is not None:
                on_round(row)
            return out

        return evaluate


# --------------------------------------------------------------------------------------------
# Simulation runner: the Flower App through `flwr run`


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _executable(name: str) -> str:
    """A Flower command of this Python environment (its bin folder first, then PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: pip install 'fedrecon_fast[flower]'")
    return found


def flower_env(home: str | os.PathLike) -> dict:
    """Environment of the Flower processes: their own ``FLWR_HOME``, no telemetry, this
    environment's commands first on PATH."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=os.fspath(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


@contextlib.contextmanager
def local_superlink(home: str | os.PathLike, *, simulation: bool, startup_timeout: float = 60.0):
    """Run a ``flower-superlink`` on the loopback interface (insecure, its own port, in-memory
    state) and register it as the default SuperLink connection in ``home``'s Flower
    configuration. Yields its ``host:port``; stops it on exit."""
    import urllib.request

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedrecon"\n\n[superlink.fedrecon]\naddress = "{address}"\ninsecure = true\n'
    )
    command = [
        _executable("flower-superlink"),
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ] + (["--simulation"] if simulation else [])
    log = open(home / "superlink.log", "wb")
    proc = subprocess.Popen(command, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {proc.returncode}: "
                    f"{(home / 'superlink.log').read_text(errors='replace')[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://{address}/health", timeout=1.0) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not start within {startup_timeout:g} s")
            time.sleep(0.2)
        yield address
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a process we started; kill it if it does not exit within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def local_supernodes(home: str | os.PathLike, address: str, num_nodes: int):
    """Run ``num_nodes`` ``flower-supernode`` processes (insecure, loopback) connected to the
    SuperLink at ``address``, node ``p`` holding ``partition-id=p num-partitions=num_nodes``;
    stops them on exit. Their logs go to ``home/supernode-<p>.log``."""
    home = Path(home)
    nodes = []
    try:
        for p in range(num_nodes):
            log = open(home / f"supernode-{p}.log", "wb")
            nodes.append(
                (
                    subprocess.Popen(
                        [
                            _executable("flower-supernode"),
                            "--insecure",
                            "--superlink",
                            address,
                            "--node-config",
                            f"partition-id={p} num-partitions={num_nodes}",
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(_free_port()),
                        ],
                        env=flower_env(home),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
        yield [proc for proc, _ in nodes]
    finally:
        for proc, log in nodes:
            _stop(proc)
            log.close()


def flwr_run(
    app: str | os.PathLike,
    home: str | os.PathLike,
    *,
    run_config: str | None = None,
    federation_config: str | None = None,
    timeout: float | None = None,
) -> str:
    """``flwr run <app> --stream`` against ``home``'s default SuperLink; returns its output.

    ``run_config`` and ``federation_config`` are passed as ``--run-config`` and
    ``--federation-config``. Raises RuntimeError (with the output's end) if it fails or the
    run does not finish in time.
    """
    command = [_executable("flwr"), "run", os.fspath(app), "--stream"]
    if run_config:
        command += ["--run-config", run_config]
    if federation_config:
        command += ["--federation-config", federation_config]
    try:
        proc = subprocess.run(command, env=flower_env(home), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise RuntimeError(f"flwr run did not finish within {timeout:g} s: ...{out[-2000:]}") from None
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"flwr run failed (exit {proc.returncode}): ...{out[-2000:]}")
    return out


def write_app(folder: str | os.PathLike, run_config: dict) -> Path:
    """A Flower App folder whose components are this package's :mod:`fedrecon_fast.integrations.flower_app`,
    with ``run_config`` as its ``[tool.flwr.app.config]``."""
    import tomli_w

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedrecon-run",
            "version": "1.0.0",
            "license": "Apache-2.0",
            "description": "A FedRecon run of fedrecon_fast.FlowerFedRecon",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedrecon-fast",
                    "components": {
                        "serverapp": "fedrecon_fast.integrations.flower_app:server_app",
                        "clientapp": "fedrecon_fast.integrations.flower_app:client_app",
                    },
                    "config": run_config,
                }
            }
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


class FlowerFedRecon:
    """FedRecon trained by the Flower App (:mod:`fedrecon_fast.integrations.flower_app`) through ``flwr run``
    in Flower's simulation runtime, on a SuperLink started here for the run.

    Each ``fit`` writes the data and the current state (a checkpoint) to a temporary folder,
    starts a local ``flower-superlink --simulation``, runs ``flwr run`` with ``num_nodes``
    simulated SuperNodes (each holding a partition of the users), and takes the state back from
    the run's final checkpoint. The model equals :class:`fedrecon_fast.FedRecon`'s bit for bit.
    The same public surface: ``fit``, ``evaluate``, ``history``, ``train_seconds``,
    ``eval_seconds``, ``broadcasted_bits``, ``aggregated_bits``, ``model``, ``config``, ``round``.

    Parameters
    ----------
    config : FedReconConfig, optional
    model : GlobalModel, optional
        Start from this model.
    num_nodes : int, optional
        Simulated SuperNodes (default: the CPUs, at most the training users).
    num_cpus : int, optional
        CPUs the simulation may use (default: all cores); each node's call takes ``client_cpus``.
    client_cpus : int
        CPUs per ClientApp call.
    verbose : bool
        Print ``flwr run``'s log stream when the run ends.
    timeout : float
        Seconds the whole run may take.

    Attributes
    ----------
    startup_seconds : float
        Per ``fit``: wall time not spent in rounds or validation (SuperLink and Ray start-up,
        node discovery, shut-down).
    """

    def __init__(
        self,
        config: FedReconConfig | None = None,
        *,
        model: GlobalModel | None = None,
        num_nodes: int | None = None,
        num_cpus: int | None = None,
        client_cpus: int = 1,
        verbose: bool = False,
        timeout: float = 3600.0,
    ):
        from ..training import FedRecon

        config = config if config is not None else FedReconConfig()
        if not isinstance(config, FedReconConfig):
            raise TypeError(f"config must be a FedReconConfig; got {type(config).__name__}")
        if model is not None and not isinstance(model, GlobalModel):
            raise TypeError(f"model must be a GlobalModel; got {type(model).__name__}")
        check_int(num_nodes, "num_nodes", minimum=1, allow_none=True)
        check_int(num_cpus, "num_cpus", minimum=1, allow_none=True)
        check_int(client_cpus, "client_cpus", minimum=1)
        check_float(timeout, "timeout", minimum=0.0, strict=True)
        self.num_nodes = num_nodes
        self.num_cpus = num_cpus
        self.client_cpus = int(client_cpus)
        self.verbose = verbose
        self.timeout = float(timeout)
        self._trainer = FedRecon(config, model=model)
        self.startup_seconds = 0.0
        self.output = ""

    config = property(lambda self: self._trainer.config)
    model = property(lambda self: self._trainer.model)
    round = property(lambda self: self._trainer.round)
    history = property(lambda self: self._trainer.history)
    train_seconds = property(lambda self: self._trainer.train_seconds)
    eval_seconds = property(lambda self: self._trainer.eval_seconds)
    broadcasted_bits = property(lambda self: self._trainer.broadcasted_bits)
    aggregated_bits = property(lambda self: self._trainer.aggregated_bits)

    @one_fit_at_a_time
    def fit(
        self,
        train: ClientData,
        val: ClientData | None = None,
        *,
        rounds: int | None = None,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
    ) -> FlowerFedRecon:
        """Run rounds in a Flower simulation; calling ``fit`` again continues.

        Arguments as in :meth:`FedRecon.fit <fedrecon_fast.FedRecon.fit>`; the rounds run in
        Flower's processes, so ``callback`` and the progress bar see each round's row when the
        run ends.
        """
        from ..training import FedRecon

        rounds = self.config.rounds if rounds is None else rounds
        check_int(rounds, "rounds", minimum=0)
        if not isinstance(train, ClientData):
            raise TypeError(f"train must be a ClientData; got {type(train).__name__}")
        check_training_clients(train)
        before = self._trainer
        before.fit(train, rounds=0)  # the model, the optimizer state and a calibrated noise
        if rounds == 0:
            return self
        start = time.perf_counter()
        seconds = before.train_seconds + before.eval_seconds
        first = len(before.history)
        with tempfile.TemporaryDirectory(prefix="fedrecon-flower-") as folder:
            tmp = Path(folder)
            ckpt = tmp / "checkpoints"
            before.save_checkpoint(ckpt)
            run_config = {
                "config": json.dumps(before.config.replace(rounds=before.round + rounds).to_dict()),
                "train-file": str(save_client_data(train, tmp / "train.npz")),
                "checkpoint-dir": str(ckpt),
                "timeout": self.timeout,
            }
            if val is not None:
                run_config["val-file"] = str(save_client_data(val, tmp / "val.npz"))
            app = write_app(tmp / "app", run_config)
            nodes = self.num_nodes or min(train.num_clients, os.cpu_count() or 1)
            cpus = self.num_cpus or os.cpu_count() or 1
            federation = (
                f"num-supernodes={nodes} client-resources-num-cpus={self.client_cpus} init-args-num-cpus={cpus}"
            )
            with local_superlink(tmp / "flwr-home", simulation=True) as _:
                self.output = flwr_run(app, tmp / "flwr-home", federation_config=federation, timeout=self.timeout)
            if self.verbose:
                print(self.output)
            after = FedRecon.from_checkpoint(ckpt, before.config.replace(rounds=before.round + rounds))
        if after.round != before.round + rounds:
            raise RuntimeError(
                f"the Flower run ended at round {after.round}, not {before.round + rounds}: ...{self.output[-2000:]}"
            )
        after.config = before.config
        after.model.config = before.config
        self._trainer = after
        new = after.history[first:]
        self.startup_seconds = time.perf_counter() - start - (after.train_seconds + after.eval_seconds - seconds)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=rounds, desc="FedRecon (Flower)", unit="round", leave=False)
        for row in new:
            if callback is not None:
                callback(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return self

    def evaluate(
        self,
        data: ClientData,
        clients=None,
        *,
        per_user: bool = False,
        k: int | None = 10,
        relevance_threshold: float | None = 4.0,
    ) -> dict:
        """ReconEval of the current model on clients of ``data`` (as :meth:`FedRecon.evaluate`)."""
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
