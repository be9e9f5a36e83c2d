"""The FedRecon Flower App: a ServerApp and a ClientApp that read ``context.run_config``.

Run it with ``flwr run`` (``examples/flower`` is a ready app directory whose
``[tool.flwr.app.components]`` name :data:`server_app` and :data:`client_app`), in Flower's
simulation runtime or deployed on a SuperLink with SuperNodes. Every SuperNode holds one
partition of the training users (node config ``partition-id`` of ``num-partitions``; the
simulation runtime sets both): a contiguous block, :func:`fedrecon_fast.integrations.partitions.partition_bounds`.

The ServerApp runs :class:`fedrecon_fast.FedRecon` itself, with a :class:`FlowerExecutor`
as its backend: each round it sends every node that holds sampled users V and their ids, the
node runs the native client updates for them, and the server combines the replies in cohort
order with the native reduction. The model is therefore bit-identical to the local trainer's
for the same configuration, whatever the number of nodes, and every FedRecon feature (server
optimizers, DP with accounting and adaptive clipping, Poisson sampling, checkpoints) works
unchanged. The one codec a node cannot send per client, dense quantized updates, is refused.

Run config (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``)
---------------------------------------------------------------------------------
``preset``
    ``"paper"`` or ``"fast"``; any :class:`~fedrecon_fast.FedReconConfig` or
    :class:`~fedrecon_fast.ClientConfig` field, spelled with dashes (``clients-per-round``,
    ``dp-clip``, ...), overrides it. An empty string leaves a field unset.
``config``
    Instead: the whole configuration as JSON (``FedReconConfig.to_dict()``).
``data``
    A MovieLens folder or ratings file readable on the server and on every node; empty: the
    seeded synthetic data of ``synthetic-users`` x ``synthetic-items``. Prepared and split into
    train/validation users as ``fedrecon-fast train`` does.
``train-file``, ``val-file``
    Instead of ``data``: training (and validation) users saved by
    :func:`fedrecon_fast.integrations.flower.save_client_data`.
``checkpoint-dir``
    Continue from the newest checkpoint there, and leave the final state there.
``output``
    Write ``metrics.json`` (configuration and per-round history) and the model (``model/``).
``node-threads``, ``timeout``
    Native threads of a node's call; seconds to wait for nodes and replies (0: no limit).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from .. import checkpoint, kernels
from ..config import ClientConfig, FedReconConfig, UpdateCodec, preset
from ..kernels import ClientUpdates, DenseNoise, RoundResult
from . import _records as records
from .partitions import combine, partition_bounds, partition_data, route

__all__ = ["FlowerExecutor", "client_app", "server_app", "load_run_data", "run_config_to_config", "run_server"]

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
_APP_KEYS = {
    "preset",
    "config",
    "data",
    "synthetic-users",
    "synthetic-items",
    "train-file",
    "val-file",
    "checkpoint-dir",
    "output",
    "node-threads",
    "timeout",
}


# --------------------------------------------------------------------------------------------
# Run config


def run_config_to_config(run_config) -> FedReconConfig:
    """The :class:`FedReconConfig` a run config describes (see the module docstring)."""
    run_config = dict(run_config)
    if run_config.get("config"):
        return FedReconConfig.from_dict(json.loads(run_config["config"]))
    fields = {f.name for f in dataclasses.fields(FedReconConfig)} | {f.name for f in dataclasses.fields(ClientConfig)}
    overrides = {}
    for key, value in run_config.items():
        if key in _APP_KEYS or value == "":
            continue
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(
                f"run config key {key!r} is neither an app option ({sorted(_APP_KEYS)}) nor a FedReconConfig field"
            )
        overrides[name] = value
    return preset(run_config.get("preset") or "paper", **overrides)


_data_cache: dict = {}
_data_lock = threading.Lock()


def load_run_data(run_config, config: FedReconConfig):
    """``(train, val)``: the run's training and validation users (cached per process)."""
    from .flower import load_client_data

    run_config = dict(run_config)
    key = (
        json.dumps(
            {k: run_config.get(k) for k in ("data", "synthetic-users", "synthetic-items", "train-file", "val-file")},
            sort_keys=True,
        ),
        config.data,
        config.seed,
    )
    with _data_lock:
        if key not in _data_cache:
            if run_config.get("train-file"):
                train = load_client_data(run_config["train-file"])
                val = load_client_data(run_config["val-file"]) if run_config.get("val-file") else None
            else:
                if run_config.get("data"):
                    from ..movielens import load_movielens

                    data = load_movielens(run_config["data"])
                else:
                    from ..synthetic import synthetic_ratings

                    data = synthetic_ratings(
                        num_users=int(run_config.get("synthetic-users", 2000)),
                        num_items=int(run_config.get("synthetic-items", 1000)),
                        seed=config.seed,
                    )
                train, val, _ = config.data.split(config.data.prepare(data, config.seed), config.seed)
            _data_cache[key] = (train, val)
        return _data_cache[key]


# --------------------------------------------------------------------------------------------
# ClientApp: a node holding a partition of the training users

client_app = ClientApp()


def _node_partition(context: Context):
    """``(partition id, number of partitions, training users, the partition's CSR)``."""
    node = context.node_config
    if PARTITION_ID not in node or NUM_PARTITIONS not in node:
        raise ValueError(
            f"the node config needs {PARTITION_ID!r} and {NUM_PARTITIONS!r} (e.g. --node-config "
            f"'{PARTITION_ID}=0 {NUM_PARTITIONS}=2')"
        )
    p, parts = int(node[PARTITION_ID]), int(node[NUM_PARTITIONS])
    if not 0 <= p < parts:
        raise ValueError(f"{PARTITION_ID} {p} is not in [0, {NUM_PARTITIONS} = {parts})")
    train, _ = load_run_data(context.run_config, run_config_to_config(context.run_config))
    bounds = partition_bounds(train.num_clients, parts)
    return p, parts, train.num_clients, partition_data(train, int(bounds[p]), int(bounds[p + 1]))


_partitions: dict = {}


def _cached_partition(context: Context):
    key = (
        json.dumps(dict(context.run_config), sort_keys=True, default=str),
        json.dumps(dict(context.node_config), sort_keys=True, default=str),
    )
    if key not in _partitions:
        _partitions[key] = _node_partition(context)
    return _partitions[key]


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    p, parts, num_users, held = _cached_partition(context)
    metrics = MetricRecord(
        {PARTITION_ID: p, NUM_PARTITIONS: parts, "num-users": num_users, "num-held": held.num_clients}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    p, parts, num_users, held = _cached_partition(context)
    arrays = message.content.array_records["arrays"]
    cfg = message.content.config_records["config"]
    to, of = records.integer(cfg, PARTITION_ID), records.integer(cfg, "num-users")
    if to != p or of != num_users:
        raise ValueError(f"a message for partition {to} of {of} users reached partition {p} of {num_users} users")
    get = lambda name: arrays[name].numpy() if name in arrays else None  # noqa: E731
    kwargs = json.loads(records.text(cfg, "kwargs"))
    kwargs["codec"] = UpdateCodec(**json.loads(records.text(cfg, "codec")))
    if "user-default" in arrays:
        kwargs["user_default"] = get("user-default")
    u = kernels.client_updates(
        get("item-factors"),
        held,
        get("clients"),
        ClientConfig(**json.loads(records.text(cfg, "client-config"))),
        item_bias=get("item-bias"),
        users=get("users"),
        user_bias=get("user-bias"),
        num_threads=int(context.run_config.get("node-threads", 1)),
        **kwargs,
    )
    out = {
        "offsets": u.offsets,
        "rows": u.rows,
        "values": u.values,
        "bias-values": u.bias_values,
        "users": u.users,
        "user-bias": u.user_bias,
    }
    if u.noise is not None:  # a dense quantized update: what its untouched rows decode to
        out.update({"noise-lo": u.noise.lo, "noise-step": u.noise.step, "noise-key": u.noise.key})
    out.update({f"stat-{k}": v for k, v in u.client_stats.items()})
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items() if v is not None})
    return Message(RecordDict({"update": record}), reply_to=message)


def _updates_from(record: ArrayRecord, codec: UpdateCodec) -> ClientUpdates:
    def get(name):
        return records.optional_array(record, name)

    stats = {k[len("stat-") :]: records.array(record, k) for k in record if k.startswith("stat-")}
    noise = None
    if "noise-key" in record:
        noise = DenseNoise(
            records.array(record, "noise-lo"),
            records.array(record, "noise-step"),
            records.array(record, "noise-key"),
            codec.bits,
            codec.hadamard,
        )
    return ClientUpdates(
        records.array(record, "offsets"),
        records.array(record, "rows"),
        records.array(record, "values"),
        get("bias-values"),
        stats,
        get("users"),
        get("user-bias"),
        noise,
    )


# --------------------------------------------------------------------------------------------
# The executor: FedRecon's rounds through a Flower Grid


class FlowerExecutor:
    """A :class:`~fedrecon_fast.FedRecon` backend whose rounds run on Flower SuperNodes.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    timeout : float, optional
        Seconds to wait for the nodes to connect and for each round's replies (None: no limit).
    """

    def __init__(self, grid: Grid, *, timeout: float | None = 600.0):
        self.grid = grid
        self.timeout = timeout
        self.node_of_partition: dict[int, int] = {}
        self.num_users: int | None = None
        self._bounds: np.ndarray = np.zeros(1, np.int64)

    def discover(self, num_users: int) -> dict[int, int]:
        """Wait until every partition has a node; check they all hold the same training users."""
        start = time.monotonic()
        seen: dict[int, dict] = {}
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in seen]
            if new:
                query = [
                    Message(
                        RecordDict({"config": ConfigRecord({"fedrecon": "partition"})}),
                        message_type=MessageType.QUERY,
                        dst_node_id=n,
                    )
                    for n in new
                ]
                for reply in self.grid.send_and_receive(query, timeout=self.timeout):
                    if reply.has_error():
                        raise RuntimeError(
                            f"node {reply.metadata.src_node_id} failed to say its partition: {reply.error.reason}"
                        )
                    seen[reply.metadata.src_node_id] = dict(reply.content.metric_records["metrics"])
            parts = {int(m[NUM_PARTITIONS]) for m in seen.values()}
            if len(parts) > 1:
                raise RuntimeError(f"the nodes disagree on {NUM_PARTITIONS}: {sorted(parts)}")
            if parts and len({int(m[PARTITION_ID]) for m in seen.values()}) == next(iter(parts)):
                break
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                raise RuntimeError(f"only {len(seen)} node(s) connected within {self.timeout:g} s")
            time.sleep(0.2)
        for node, m in seen.items():
            held, partition = records.integer(m, "num-users"), records.integer(m, PARTITION_ID)
            if held != num_users:
                raise RuntimeError(
                    f"node {node} holds a training set of {held} users; the server "
                    f"has {num_users} (the run config must name the same data everywhere)"
                )
            if partition in self.node_of_partition:
                raise RuntimeError(f"two nodes hold partition {partition}")
            self.node_of_partition[partition] = node
        self.num_users = num_users
        self._bounds = partition_bounds(num_users, len(self.node_of_partition))
        log(INFO, "FedRecon on %d SuperNodes, %d training users", len(self.node_of_partition), num_users)
        return self.node_of_partition

    def train_round(
        self,
        item_factors,
        data,
        clients=None,
        config=None,
        *,
        item_bias=None,
        users=None,
        user_bias=None,
        num_threads: int = 0,
        **kwargs,
    ) -> RoundResult:
        """:func:`kernels.train_round`, with each node running the sampled users it holds."""
        if self.num_users != data.num_clients:
            self.discover(data.num_clients)
        clients = np.arange(data.num_clients) if clients is None else np.asarray(clients, dtype=np.int64)
        V = np.ascontiguousarray(item_factors, dtype=np.float32)
        if len(clients) == 0:
            return kernels.train_round(
                V,
                data,
                clients,
                config,
                item_bias=item_bias,
                users=users,
                user_bias=user_bias,
                num_threads=num_threads,
                **kwargs,
            )
        codec = kwargs.pop("codec", None) or UpdateCodec()
        scalars = {k: v for k, v in kwargs.items() if not isinstance(v, np.ndarray)}
        text = json.dumps(scalars)
        client_config = json.dumps(dataclasses.asdict(config or ClientConfig()))
        routes = route(clients, self._bounds)
        assert self.num_users is not None  # discovered above
        messages = []
        for r in routes:
            arrays = {
                "item-factors": V,
                "clients": r.local,
                "item-bias": item_bias,
                "user-default": kwargs.get("user_default"),
                "users": None if users is None else users[r.positions],
                "user-bias": None if user_bias is None else user_bias[r.positions],
            }
            record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items() if v is not None})
            cfg = ConfigRecord(
                {
                    PARTITION_ID: r.partition,
                    "num-users": self.num_users,
                    "kwargs": text,
                    "client-config": client_config,
                    "codec": json.dumps(dataclasses.asdict(codec)),
                }
            )
            messages.append(
                Message(
                    RecordDict({"arrays": record, "config": cfg}),
                    message_type=MessageType.TRAIN,
                    dst_node_id=self.node_of_partition[r.partition],
                )
            )
        replies = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
            replies[reply.metadata.src_node_id] = reply
        missing = [r.partition for r in routes if self.node_of_partition[r.partition] not in replies]
        if missing:
            raise RuntimeError(f"no reply from the node(s) of partition(s) {missing} within {self.timeout} s")
        updates = [
            _updates_from(replies[self.node_of_partition[r.partition]].content.array_records["update"], codec)
            for r in routes
        ]
        return combine(routes, updates, len(clients), *V.shape, num_threads=num_threads)


# --------------------------------------------------------------------------------------------
# ServerApp


def run_server(grid: Grid, run_config):
    """Train as the run config says, on the grid's nodes; returns the trainer."""
    from ..training import FedRecon

    run_config = dict(run_config)
    config = run_config_to_config(run_config)
    train, val = load_run_data(run_config, config)
    timeout = float(run_config.get("timeout", 600)) or None
    executor = FlowerExecutor(grid, timeout=timeout)
    executor.discover(train.num_clients)  # before the first round, so its time is not the round's
    ckpt = run_config.get("checkpoint-dir") or None
    if ckpt and checkpoint.list_checkpoints(ckpt):
        trainer = FedRecon.from_checkpoint(ckpt, config, backend=executor)
    else:
        trainer = FedRecon(config, backend=executor)

    def report(row: dict) -> None:
        shown = {k: row[k] for k in ("train_rmse", "val_rmse", "dp_epsilon") if k in row}
        log(INFO, "FedRecon round %d: %s", row["round"], ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))

    trainer.fit(train, val, rounds=max(0, config.rounds - trainer.round), callback=report, checkpoint_dir=ckpt)
    output = run_config.get("output")
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(
            json.dumps({"config": trainer.config.to_dict(), "history": trainer.history}, indent=1)
        )
        trainer.model.save(out / "model")
    return trainer


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)
