"""Flower integration: the Flower App through `flwr run` in Flower's simulation runtime (via the
CLI) equals the local trainer, and the per-user strategy and ClientApp (driven in-process by a
fake Grid) reproduce FedRecon's rounds exactly.

Needs the ``[flower]`` extra; skipped cleanly without it.
"""

import json
import os
import uuid
import warnings

import numpy as np
import pytest

# No telemetry threads or network calls from the tests (read when flwr is imported).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
with warnings.catch_warnings():
    # flwr imports typer, which uses click APIs deprecated in Click 8.2.
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("flwr")
    from flwr.app import Array, Context, Error, Message, RecordDict

    from fedrecon_fast import flower as FL
    from flower_grid import StubGrid, task_identity  # noqa: F401  (an autouse fixture)

import fedrecon_fast as ff  # noqa: E402
from fedrecon_fast.cli import main  # noqa: E402

# Ray leaves files and helper processes to the garbage collector.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

# The Flower backend must land within RMSE_TOLERANCE of the local one (the issue asks for 0.01);
# by construction (same samples, same random streams, same float64 reduction order) the models
# are bit-identical, which the tests check too.
RMSE_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def data():
    return ff.synthetic_ratings(num_users=60, num_items=50, seed=3).prepare(max_examples=300, shuffle_seed=3)


@pytest.fixture(scope="module")
def splits(data):
    return tuple(data.subset(ix) for ix in ff.split_users(data.num_clients, seed=3))


# --------------------------------------------------------------------------------------------
# One real simulation (`flwr run` on a local SuperLink, Ray, 2 CPUs, 2 SuperNodes), through the CLI


@pytest.fixture(scope="module")
def cli_runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("flower-cli")
    users, items, ratings = data.to_coo()
    lines = (
        f"{data.user_ids[u]}\t{data.item_ids[i]}\t{int(r)}\t{t}\n"
        for u, i, r, t in zip(users, items, ratings, data.timestamps)
    )
    (root / "u.data").write_text("".join(lines))
    args = [
        "train",
        "--data",
        str(root),
        "--rounds",
        "5",
        "--clients-per-round",
        "6",
        "--dim",
        "8",
        "--eval-every",
        "2",
        "--quantize-bits",
        "8",
        "--quantize-threshold",
        "0",
        "--sparse-updates",
        "--threads",
        "2",
        "--json",
        "--no-progress",
    ]
    runs = {}
    for backend in ("local", "flower"):
        out = root / backend
        code = main(args + ["--backend", backend, "--out", str(out), "--save", str(out / "model")])
        assert code == 0
        runs[backend] = out
    return runs


@pytest.mark.slow
def test_cli_flower_backend_matches_local(cli_runs, capsys):
    results = {b: json.loads((out / "metrics.json").read_text()) for b, out in cli_runs.items()}
    local, flower = results["local"]["result"], results["flower"]["result"]
    assert set(local) == set(flower) and (local["backend"], flower["backend"]) == ("local", "flower")
    assert flower["train_users"] == 48 and flower["rounds"] == 5
    assert abs(flower["test_rmse"] - local["test_rmse"]) <= RMSE_TOLERANCE
    assert abs(flower["val_rmse"] - local["val_rmse"]) <= RMSE_TOLERANCE
    for key in (
        "test_accuracy",
        "test_ratings",
        "test_user_rmse",
        "broadcasted_bits",
        "aggregated_bits",
        "nonfinite_clients",
    ):
        assert flower[key] == local[key], key
    V = {b: ff.GlobalModel.load(out / "model").item_factors for b, out in cli_runs.items()}
    assert np.array_equal(V["flower"], V["local"])


def test_cli_flower_history_has_the_local_rows(cli_runs):
    local, flower = (json.loads((cli_runs[b] / "metrics.json").read_text())["history"] for b in ("local", "flower"))
    assert [h["round"] for h in flower] == [1, 2, 3, 4, 5]
    assert [h["round"] for h in flower if "val_rmse" in h] == [2, 4, 5]
    for a, b in zip(local, flower):
        assert b["round_seconds"] > 0 and set(a) == set(b)
        for key, value in a.items():
            if key != "round_seconds":
                assert b[key] == value, key


def test_cli_flower_backend_without_flower_is_a_clean_error(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "fedrecon_fast.integrations.flower", None)  # as if flwr were missing
    code = main(["train", "--backend", "flower", "--rounds", "1", "--dim", "4", "--no-progress"])
    assert code == 2 and "flower" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Strategy + ClientApp in-process: a Grid that hands each message to the node's ClientApp


class FakeGrid(StubGrid):
    """Nodes with random ids and partition ids 0..n-1; replies come back in reverse order."""

    def __init__(self, app, num_nodes, *, partitions=None, fail=(), corrupt=()):
        rng = np.random.default_rng(num_nodes)
        ids = [int(n) for n in rng.choice(2**40, num_nodes, replace=False) + 1]
        partitions = range(num_nodes) if partitions is None else partitions
        self.app, self.fail, self.corrupt = app, set(fail), set(corrupt)
        self.contexts = {
            n: Context(
                run_id=1,
                node_id=n,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for n, p in zip(ids, partitions)
        }
        self.sent = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            context = self.contexts[m.metadata.dst_node_id]
            self.sent.append((m.metadata.message_type, context.node_config["partition-id"]))
            if context.node_config["partition-id"] in self.fail and m.metadata.message_type == "train":
                replies.append(Message(Error(2, "node crashed"), reply_to=m))
            else:
                replies.append(self.app(m, context))
                if context.node_config["partition-id"] in self.corrupt and m.metadata.message_type == "train":
                    rows = replies[-1].content["update"]["rows"].numpy()
                    replies[-1].content["update"]["rows"] = Array(np.full_like(rows, 10**6))
        return replies[::-1]


def run_strategy(config, train, val=None, *, app=None, rounds=3, fail=(), corrupt=(), **strategy_args):
    strategy = FL.FedReconStrategy(ff.server_init(config, data=train), train.num_clients, **strategy_args)
    grid = FakeGrid(app or FL.client_app(train), train.num_clients, fail=fail, corrupt=corrupt)
    strategy.start(grid, strategy.arrays(), num_rounds=rounds, evaluate_fn=strategy.evaluate_fn(val, rounds))
    return strategy, grid


CONFIGS = {
    "paper": ("paper", {}),
    "fast-biases-exact": ("fast", {}),
    "dense-float32": ("fast", dict(sparse_updates=False)),
    "dense-4bit-tensor-biases": ("fast", dict(quantize_bits=4, quantize_threshold=0)),
    "sparse-6bit-row-hadamard": (
        "paper",
        dict(quantize_bits=6, quantize_threshold=0, sparse_updates=True, quantize_scaling="row", hadamard=True),
    ),
    "dp": ("paper", dict(dp_clip=0.5, dp_noise=0.3, weighting="uniform", sparse_updates=True)),
    "yogi": ("fast", dict(server_optimizer="yogi", server_lr=0.01)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_strategy_rounds_equal_fedrecon(splits, name):
    train, val, _ = splits
    preset, overrides = CONFIGS[name]
    config = ff.preset(preset, dim=8, rounds=3, clients_per_round=6, eval_every=2, seed=5, **overrides)
    local = ff.FedRecon(config).fit(train, val)
    strategy, grid = run_strategy(config, train, val)
    model = strategy.state.model
    assert np.array_equal(model.item_factors, local.model.item_factors)
    if model.item_bias is not None:
        assert np.array_equal(model.item_bias, local.model.item_bias)
    for a, b in zip(local.history, strategy.history):
        for key, value in a.items():
            if key != "round_seconds":
                assert b[key] == value, key
    # Discovery asked every node once; each round went to the users FedRecon samples.
    assert sorted(p for t, p in grid.sent if t == "query") == list(range(train.num_clients))
    trained = [p for t, p in grid.sent if t == "train"]
    assert trained == [int(u) for r in range(3) for u in ff.sample_clients(train.num_clients, 6, config.seed, r)]


def test_nodes_holding_only_their_own_ratings_train_the_same_model(splits):
    train, _, _ = splits
    config = ff.preset("fast", dim=8, clients_per_round=6, quantize_bits=8, quantize_threshold=0)
    own = FL.client_app(lambda context: train.subset([context.node_config["partition-id"]]))
    strategy, _ = run_strategy(config, train, app=own)
    local = ff.FedRecon(config.replace(rounds=3)).fit(train)
    assert np.array_equal(strategy.state.model.item_factors, local.model.item_factors)


def test_federated_evaluation_pools_reconeval_of_the_nodes(splits):
    train, _, _ = splits
    config = ff.preset("fast", dim=8, clients_per_round=6)
    strategy, grid = run_strategy(config, train, fraction_evaluate=1.0, rounds=2)
    expected = ff.recon_eval(strategy.state.model, train, config=config.evaluation, seed=config.seed)
    last = strategy.history[-1]
    assert last["fed_rmse"] == pytest.approx(expected["rmse"], rel=1e-12)
    assert last["fed_accuracy"] == pytest.approx(expected["accuracy"], rel=1e-12)
    assert sum(t == "evaluate" for t, _ in grid.sent) == 2 * train.num_clients
    half, grid = run_strategy(config, train, fraction_evaluate=0.5, rounds=1)
    assert sum(t == "evaluate" for t, _ in grid.sent) == train.num_clients // 2


def test_failed_clients_are_dropped_or_raised(splits):
    train, _, _ = splits
    config = ff.preset("paper", dim=8, clients_per_round=10)
    victim = int(ff.sample_clients(train.num_clients, 10, config.seed, 0)[0])
    strategy, _ = run_strategy(config, train, rounds=1, fail=[victim])
    assert strategy.history[0]["failures"] == 1 and strategy.history[0]["clients"] == 9
    with pytest.raises(RuntimeError, match="1 client.s. failed in training; the first said: node crashed"):
        run_strategy(config, train, rounds=1, fail=[victim], on_failure="raise")
    # A reply that cannot be aggregated (rows outside V) is dropped alone, not the round.
    sparse = config.replace(sparse_updates=True)
    strategy, _ = run_strategy(sparse, train, rounds=1, corrupt=[victim])
    assert strategy.history[0]["failures"] == 1 and strategy.history[0]["reporting"] == 9
    with pytest.raises(RuntimeError, match="unusable reply: a reply's rows lie outside"):
        run_strategy(sparse, train, rounds=1, corrupt=[victim], on_failure="raise")
    everyone = ff.sample_clients(train.num_clients, 10, config.seed, 0)
    with pytest.raises(RuntimeError, match="no client replied usefully in round 1"):
        run_strategy(config, train, rounds=1, fail=everyone)


def test_discovery_checks_the_partition_ids(splits):
    train, _, _ = splits
    config = ff.preset("paper", dim=8, clients_per_round=4)
    strategy = FL.FedReconStrategy(ff.server_init(config, data=train), train.num_clients)
    app = FL.client_app(train)
    duplicated = FakeGrid(app, train.num_clients, partitions=[0] + list(range(train.num_clients - 1)))
    with pytest.raises(RuntimeError, match="partition ids 0..47 once each"):
        strategy.discover(duplicated)
    impatient = FL.FedReconStrategy(ff.server_init(config, data=train), train.num_clients + 1, node_timeout=0.05)
    with pytest.raises(RuntimeError, match="only 48 of 49 nodes connected"):
        impatient.discover(FakeGrid(app, train.num_clients))
    assert len(strategy.discover(FakeGrid(app, train.num_clients))) == train.num_clients


def test_client_app_refuses_a_message_for_another_user(splits):
    train, _, _ = splits
    config = ff.preset("paper", dim=8, clients_per_round=4)
    strategy = FL.FedReconStrategy(ff.server_init(config, data=train), train.num_clients)
    grid = FakeGrid(FL.client_app(train), train.num_clients)
    strategy.discover(grid)
    message = strategy._messages([3], "train", 1)[0]
    message.metadata.__dict__["_message_id"] = "m"
    other = grid.contexts[strategy.node_of_user[4]]
    with pytest.raises(Exception, match="a message for user 3 reached the node of user 4"):
        grid.app(message, other)


def test_client_data_files_and_argument_checks(splits, tmp_path):
    train, val, _ = splits
    path = FL.save_client_data(train, tmp_path / "train.npz")
    back = FL.load_client_data(path)
    for name in ("indptr", "items", "ratings", "timestamps", "user_ids", "item_ids"):
        assert np.array_equal(getattr(back, name), getattr(train, name))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="lacks"):
        FL.load_client_data(tmp_path / "other.npz")
    with pytest.raises(TypeError, match="data must be a ClientData"):
        FL.save_client_data([1, 2], tmp_path / "x.npz")
    with pytest.raises(TypeError, match="data must be a ClientData, a path or a callable"):
        FL.client_app(3)
    state = ff.server_init(ff.preset("paper", dim=4), data=train)
    with pytest.raises(TypeError, match="state must be a ServerState"):
        FL.FedReconStrategy(state.model, 10)
    with pytest.raises(ValueError, match="on_failure"):
        FL.FedReconStrategy(state, 10, on_failure="ignore")
    with pytest.raises(ValueError, match="fraction_evaluate"):
        FL.FedReconStrategy(state, 10, fraction_evaluate=2.0)


def test_runner_surface_without_a_simulation(splits):
    train, val, test = splits
    with pytest.raises(TypeError, match="config must be a FedReconConfig"):
        FL.FlowerFedRecon({"dim": 8})
    with pytest.raises(ValueError, match="client_cpus"):
        FL.FlowerFedRecon(client_cpus=0)
    trainer = FL.FlowerFedRecon(ff.preset("paper", dim=8, rounds=0))
    with pytest.raises(ValueError, match="not trained yet"):
        trainer.evaluate(test)
    with pytest.raises(ValueError, match="clients without ratings"):
        trainer.fit(ff.ClientData(indptr=[0, 0, 2], items=[0, 1], ratings=[3.0, 4.0]))
    assert trainer.fit(train, val) is trainer and trainer.round == 0 and trainer.history == []
    assert trainer.broadcasted_bits == trainer.aggregated_bits == 0 and trainer.train_seconds == 0
    local = ff.FedRecon(ff.preset("paper", dim=8, rounds=0)).fit(train)
    assert trainer.evaluate(test, per_user=True) == local.evaluate(test, per_user=True)


def test_the_package_does_not_turn_flowers_logger_down():
    import logging

    assert logging.getLogger("flwr").level in (logging.NOTSET, logging.INFO, logging.DEBUG)
