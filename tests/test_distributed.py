"""Partitioned rounds: users held by partitions, each running its sampled clients anywhere,
combined in cohort order, give bit for bit the local round — in process here, and on Ray
workers when Ray is installed."""

import os
import signal

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import distributed as D
from fedrecon_fast import kernels, partitions
from fedrecon_fast.baselines import FedAvg, fedavg_config

# Ray's shutdown (at the end of this module) leaves subprocess handles for the garbage collector.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(scope="module")
def data():
    return ff.synthetic_ratings(num_users=500, num_items=160, seed=11).prepare(
        max_examples=300, min_examples=1, shuffle_seed=11
    )


def _bits(a):
    return None if a is None else np.asarray(a).view(np.uint8)


def assert_same_round(got, want):
    assert np.array_equal(_bits(got.delta), _bits(want.delta))
    if want.delta_bias is None:
        assert got.delta_bias is None
    else:
        assert np.array_equal(_bits(got.delta_bias), _bits(want.delta_bias))
    assert got.summary == want.summary
    assert got.client_stats.keys() == want.client_stats.keys()
    for key in want.client_stats:  # NaN losses of diverged clients compare equal here
        np.testing.assert_array_equal(got.client_stats[key], want.client_stats[key], err_msg=key)
    for name in ("users", "user_bias"):
        w, g = getattr(want, name), getattr(got, name)
        assert (g is None) == (w is None)
        if w is not None:
            assert np.array_equal(_bits(g), _bits(w))


CASES = {
    "paper": dict(),
    "biases": dict(biases=True),
    "dense-quantized": dict(codec=ff.UpdateCodec(bits=8, sparse=False)),
    "row-quantized-hadamard": dict(codec=ff.UpdateCodec(bits=4, row_scaling=True, hadamard=True)),
    "clipped-biases": dict(biases=True, codec=ff.UpdateCodec(clip=0.05)),
}


def partitioned(V, data, clients, cfg, num_partitions, **kw):
    """Each partition's holder runs client_updates on its own users; combined in cohort order."""
    bounds = partitions.partition_bounds(data.num_clients, num_partitions)
    users, user_bias = kw.pop("users", None), kw.pop("user_bias", None)
    routes = partitions.route(clients, bounds)
    ups = []
    for r in routes:
        held = partitions.partition_data(data, int(bounds[r.partition]), int(bounds[r.partition + 1]))
        state = {} if users is None else {"users": users[r.positions]}
        if user_bias is not None:
            state["user_bias"] = user_bias[r.positions]
        ups.append(kernels.client_updates(V, held, r.local, cfg, **state, **kw))
    return partitions.combine(routes, ups, len(clients), *V.shape)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_clients", [1, 129, 300])
@pytest.mark.parametrize("num_partitions", [1, 3, 64])
def test_partitioned_round_is_bit_identical_to_the_local_round(data, case, num_clients, num_partitions):
    spec = CASES[case]
    cfg = ff.preset("paper", dim=24, biases=spec.get("biases", False))
    model = ff.GlobalModel.initialize(data.item_ids, cfg, global_mean=3.5)
    rng = np.random.default_rng(num_clients + 7)
    clients = rng.choice(data.num_clients, num_clients, replace=False)
    bias = None if model.item_bias is None else rng.normal(0, 0.1, data.num_items).astype(np.float32)
    kw = dict(item_bias=bias, global_mean=model.global_mean, seed=4, round=9, codec=spec.get("codec"))
    want = kernels.train_round(model.item_factors, data, clients, cfg.client, num_threads=2, **kw)
    got = partitioned(model.item_factors, data, clients, cfg.client, num_partitions, num_threads=1, **kw)
    assert_same_round(got, want)


def test_partitioned_stateful_round_and_diverged_clients(data):
    cfg = fedavg_config(dim=16)
    V = ff.GlobalModel.initialize(data.item_ids, cfg).item_factors
    clients = np.arange(499, 0, -3)
    users = np.random.default_rng(1).uniform(-0.05, 0.05, (len(clients), 16)).astype(np.float32)
    want = kernels.train_round(V, data, clients, cfg.client, users=users, seed=2, round=1)
    assert_same_round(partitioned(V, data, clients, cfg.client, 5, users=users, seed=2, round=1), want)
    nan = np.full_like(V, np.nan)
    want = kernels.train_round(nan, data, clients, cfg.client, check_finite=False)
    assert want.summary["num_nonfinite"] == len(clients)
    assert_same_round(partitioned(nan, data, clients, cfg.client, 4, check_finite=False), want)


def test_partitions_cover_the_users_once():
    bounds = partitions.partition_bounds(10, 4)
    assert bounds.tolist() == [0, 3, 6, 8, 10]
    routes = partitions.route([9, 0, 5, 4, 1], bounds)
    assert [(r.partition, r.positions.tolist(), r.local.tolist()) for r in routes] == [
        (0, [1, 4], [0, 1]),
        (1, [2, 3], [2, 1]),
        (3, [0], [1]),
    ]


def test_round_where_nobody_reports_gives_zero_delta(data):
    cfg = ff.preset("paper", dim=8)
    V = np.full((data.num_items, 8), np.nan, np.float32)  # every client diverges
    clients = np.arange(200)
    want = kernels.train_round(V, data, clients, cfg.client, check_finite=False)
    got = partitioned(V, data, clients, cfg.client, 3, check_finite=False)
    assert want.summary["num_nonfinite"] == 200
    assert_same_round(got, want)


def test_combine_rejects_pieces_that_do_not_fit(data):
    cfg = ff.preset("paper", dim=8)
    V = ff.GlobalModel.initialize(data.item_ids, cfg).item_factors
    clients = np.arange(0, 300, 2)
    bounds = partitions.partition_bounds(data.num_clients, 2)
    routes = partitions.route(clients, bounds)
    ups = [
        kernels.client_updates(
            V,
            partitions.partition_data(data, int(bounds[r.partition]), int(bounds[r.partition + 1])),
            r.local,
            cfg.client,
        )
        for r in routes
    ]
    with pytest.raises(ValueError, match="pair one partition"):
        partitions.combine(routes, ups[:1], len(clients), *V.shape)
    with pytest.raises(ValueError, match="returned"):
        partitions.combine(routes[::-1], ups, len(clients), *V.shape)


class _InProcessPartitions:
    """An executor that runs partitions one after another here: the Ray path without Ray."""

    def __init__(self, num_partitions):
        self.num_partitions = num_partitions

    def train_round(self, item_factors, data, clients=None, config=None, **kw):
        return partitioned(np.asarray(item_factors), data, np.asarray(clients), config, self.num_partitions, **kw)


TRAINERS = {
    "fedrecon": (ff.FedRecon, lambda: ff.preset("paper", dim=16)),
    "fedrecon-learned-default": (ff.FedRecon, lambda: ff.preset("fast", dim=16, learn_user_default=True)),
    "fedavg": (FedAvg, lambda: fedavg_config(dim=16, client_lr=0.1)),
}


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_with_a_partitioned_executor_matches_local_training(data, name):
    trainer, make_config = TRAINERS[name]
    cfg = make_config().replace(rounds=4, clients_per_round=150, eval_every=2)
    train, val = data.subset(np.arange(400)), data.subset(np.arange(400, 500))
    local = trainer(cfg).fit(train, val)
    parts = trainer(cfg, backend=_InProcessPartitions(3)).fit(train, val)
    assert np.array_equal(_bits(local.model.item_factors), _bits(parts.model.item_factors))
    if local.model.user_default is not None:
        assert np.array_equal(_bits(local.model.user_default), _bits(parts.model.user_default))
    strip = lambda h: {k: v for k, v in h.items() if k != "round_seconds"}  # noqa: E731
    assert [strip(h) for h in local.history] == [strip(h) for h in parts.history]


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        ff.FedRecon(backend="spark")
    with pytest.raises(TypeError, match="backend"):
        ff.FedRecon(backend=object())


@pytest.fixture(scope="module")
def ray_executor():
    pytest.importorskip("ray")
    executor = D.RayExecutor(num_workers=2)
    yield executor
    executor.close()


@pytest.mark.parametrize("trainer", [ff.FedRecon, FedAvg])
def test_ray_backend_matches_local_training_bit_for_bit(ray_executor, data, trainer):
    cfg = (
        ff.preset("paper", dim=16, biases=True) if trainer is ff.FedRecon else fedavg_config(dim=16, client_lr=0.1)
    ).replace(rounds=3, clients_per_round=200, eval_every=3)
    train, val = data.subset(np.arange(400)), data.subset(np.arange(400, 500))
    local = trainer(cfg).fit(train, val)
    remote = trainer(cfg, backend=ray_executor).fit(train, val)
    assert np.array_equal(_bits(local.model.item_factors), _bits(remote.model.item_factors))
    assert [h["train_rmse"] for h in local.history] == [h["train_rmse"] for h in remote.history]
    assert local.history[-1]["val_rmse"] == remote.history[-1]["val_rmse"]


def test_ray_executor_runs_a_dense_quantized_round_like_the_local_kernel(ray_executor, data):
    cfg = ff.preset("paper", dim=16)
    V = ff.GlobalModel.initialize(data.item_ids, cfg).item_factors
    clients = np.arange(1, 500, 2)
    codec = ff.UpdateCodec(bits=6, sparse=False)
    want = kernels.train_round(V, data, clients, cfg.client, seed=1, round=3, codec=codec)
    got = ray_executor.train_round(V, data, clients, cfg.client, seed=1, round=3, codec=codec)
    assert_same_round(got, want)


def test_ray_run_survives_a_killed_worker_bit_for_bit(ray_executor, data):
    """SIGKILL one worker process after round 2: its actor restarts with its partition, the
    calls sent to it are retried, and the run ends exactly as an undisturbed one."""
    ray = pytest.importorskip("ray")
    cfg = ff.preset("paper", dim=16, rounds=5, clients_per_round=150, eval_every=0)
    train = data.subset(np.arange(450))
    local = ff.FedRecon(cfg).fit(train)
    killed = []

    def kill(row):
        if row["round"] == 2:
            pid = ray.get(ray_executor.workers[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    remote = ff.FedRecon(cfg, backend=ray_executor).fit(train, callback=kill)
    assert killed and ray.get(ray_executor.workers[0].pid.remote()) != killed[0]  # it restarted
    assert np.array_equal(_bits(local.model.item_factors), _bits(remote.model.item_factors))
    strip = lambda h: {k: v for k, v in h.items() if k != "round_seconds"}  # noqa: E731
    assert [strip(h) for h in local.history] == [strip(h) for h in remote.history]


def test_closed_ray_executor_refuses_work(data):
    pytest.importorskip("ray")
    executor = D.RayExecutor(num_workers=1)
    executor.close()
    executor.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        executor.train_round(np.zeros((data.num_items, 4), np.float32), data, [0], ff.ClientConfig())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_clients", [3, 200])
def test_reduce_updates_of_client_updates_is_the_fused_round(data, case, num_clients):
    spec = CASES[case]
    codec = spec.get("codec", ff.UpdateCodec())
    cfg = ff.preset("paper", dim=12, biases=spec.get("biases", False))
    model = ff.GlobalModel.initialize(data.item_ids, cfg, global_mean=3.5)
    clients = np.random.default_rng(num_clients).choice(data.num_clients, num_clients, replace=False)
    kw = dict(item_bias=model.item_bias, global_mean=model.global_mean, seed=6, round=2, codec=codec)
    want = kernels.train_round(model.item_factors, data, clients, cfg.client, **kw)
    ups = kernels.client_updates(model.item_factors, data, clients, cfg.client, **kw)
    # A dense update quantized with one scale carries its untouched rows' noise (ups.noise).
    assert (ups.noise is not None) == (codec.bits > 0 and not codec.sparse and not codec.row_scaling)
    delta, delta_bias, total = kernels.reduce_updates(
        ups.rows,
        ups.values,
        ups.offsets,
        ups.weights,
        num_items=data.num_items,
        bias_values=ups.bias_values,
        noise=ups.noise,
    )
    assert np.array_equal(_bits(delta), _bits(want.delta))
    assert (delta_bias is None) == (want.delta_bias is None)
    if delta_bias is not None:
        assert np.array_equal(_bits(delta_bias), _bits(want.delta_bias))
    assert total == want.summary["total_weight"]


def test_reduce_updates_rejects_bad_input():
    rows, values, offsets = np.array([0, 2]), np.ones((2, 3), np.float32), np.array([0, 1, 2])
    kernels.reduce_updates(rows, values, offsets, [1.0, 2.0], num_items=3)
    with pytest.raises(ValueError, match="rows"):
        kernels.reduce_updates(np.array([0, 3]), values, offsets, [1.0, 2.0], num_items=3)
    with pytest.raises(ValueError, match="offsets"):
        kernels.reduce_updates(rows, values, np.array([0, 2, 1]), [1.0, 2.0], num_items=3)
    with pytest.raises(ValueError, match="weights"):
        kernels.reduce_updates(rows, values, offsets, [1.0, -2.0], num_items=3)
    with pytest.raises(ValueError, match="values"):
        kernels.reduce_updates(rows, np.full((2, 3), np.nan, np.float32), offsets, [1.0, 1.0], num_items=3)
    with pytest.raises(ValueError, match="bias_values"):
        kernels.reduce_updates(rows, values, offsets, [1.0, 1.0], num_items=3, bias_values=np.ones(3))
