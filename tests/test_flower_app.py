"""The Flower App (examples/flower, fedrecon_fast.flower_app): its rounds equal the local trainer
bit for bit, in process over a Grid that hands each message to a node, and deployed for real on
a flower-superlink with two flower-supernode processes on the loopback interface.

Needs the ``[flower]`` extra; skipped cleanly without it.
"""

import json
import os
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
with warnings.catch_warnings():
    # flwr imports typer, which uses click APIs deprecated in Click 8.2 (not ours to fix).
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("flwr", reason="the [flower] extra is not installed")
    from flwr.app import Context, Error, Message, RecordDict

    from fedrecon_fast import flower as FL
    from fedrecon_fast import flower_app as APP
    from flower_grid import StubGrid, task_identity  # noqa: F401  (an autouse fixture)

import fedrecon_fast as ff  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower"


class NodesGrid(StubGrid):
    """Nodes with random ids, each holding a partition; replies come back in reverse order."""

    def __init__(self, run_config, num_nodes, *, node_configs=None):
        rng = np.random.default_rng(num_nodes)
        ids = [int(n) for n in rng.choice(2**40, num_nodes, replace=False) + 1]
        node_configs = node_configs or [{"partition-id": p, "num-partitions": num_nodes} for p in range(num_nodes)]
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config=dict(run_config))
            for n, c in zip(ids, node_configs)
        }
        self.sent = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent.append((m.metadata.message_type, m.metadata.dst_node_id))
            try:
                replies.append(APP.client_app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as e:  # as Flower's runtimes do: the error goes back in the reply
                replies.append(Message(Error(0, f"{type(e).__name__}: {e}"), reply_to=m))
        return replies[::-1]


BASE = {
    "preset": "paper",
    "dim": 8,
    "rounds": 3,
    "clients-per-round": 12,
    "eval-every": 2,
    "seed": 4,
    "synthetic-users": 160,
    "synthetic-items": 60,
}

CONFIGS = {
    "paper": {},
    "fast-biases-exact": {"preset": "fast"},
    "sparse-6bit-row": {"quantize-bits": 6, "quantize-threshold": 0, "sparse-updates": True, "quantize-scaling": "row"},
    # Dense, one scale: each node sends its clients' untouched-row noise as three numbers each.
    "dense-8bit": {"quantize-bits": 8, "quantize-threshold": 0, "sparse-updates": False},
    "learned-default": {"preset": "fast", "learn-user-default": True},
    "adam": {"server-optimizer": "adam", "server-lr": 0.01},
    "dp-adaptive-poisson": {
        "dp-clip": 0.5,
        "dp-noise": 0.4,
        "weighting": "uniform",
        "dp-target-quantile": 0.5,
        "sampling": "poisson",
    },
}


def local_run(run_config):
    config = APP.run_config_to_config(run_config)
    train, val = APP.load_run_data(run_config, config)
    return ff.FedRecon(config).fit(train, val)


def assert_same_training(got, want):
    assert np.array_equal(got.model.item_factors.view(np.uint32), want.model.item_factors.view(np.uint32))
    strip = lambda hs: [{k: v for k, v in h.items() if k != "round_seconds"} for h in hs]  # noqa: E731
    assert strip(got.history) == strip(want.history)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("num_nodes", [1, 3])
def test_app_trains_the_local_model_bit_for_bit(name, num_nodes):
    run_config = {**BASE, **CONFIGS[name]}
    grid = NodesGrid(run_config, num_nodes)
    got = APP.run_server(grid, run_config)
    assert_same_training(got, local_run(run_config))
    trains = [dst for kind, dst in grid.sent if kind == "train"]
    assert len(set(trains)) == num_nodes and len(trains) <= num_nodes * 3  # one message per node and round


def test_app_resumes_from_its_checkpoint_and_writes_its_outputs(tmp_path):
    run_config = {**BASE, "checkpoint-dir": str(tmp_path / "ckpt"), "output": str(tmp_path / "out")}
    APP.run_server(NodesGrid(run_config, 2), {**run_config, "rounds": 2})
    resumed = APP.run_server(NodesGrid(run_config, 2), run_config)
    assert resumed.round == 3
    assert_same_training(resumed, local_run(BASE))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [h["round"] for h in saved["history"]] == [1, 2, 3]
    assert np.array_equal(ff.GlobalModel.load(tmp_path / "out" / "model").item_factors, resumed.model.item_factors)


def test_app_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="neither an app option"):
        APP.run_config_to_config({**BASE, "clients-per-epoch": 3})
    # A node without a partition, nodes that disagree on the data, a duplicated partition.
    with pytest.raises(RuntimeError, match="partition-id"):
        APP.run_server(NodesGrid(BASE, 1, node_configs=[{}]), BASE)
    other = {**BASE, "synthetic-users": 100}
    grid = NodesGrid(BASE, 2)
    list(grid.contexts.values())[1].run_config.update(other)
    with pytest.raises(RuntimeError, match="training set of"):
        APP.run_server(grid, BASE)
    twins = [{"partition-id": 0, "num-partitions": 2}] * 2 + [{"partition-id": 1, "num-partitions": 2}]
    with pytest.raises(RuntimeError, match="two nodes hold partition 0"):
        APP.run_server(NodesGrid(BASE, 3, node_configs=twins), BASE)


def test_example_app_is_a_valid_flower_app():
    from flwr.cli.config_utils import load_and_validate

    config, _ = load_and_validate(EXAMPLE / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedrecon_fast.integrations.flower_app:server_app",
        "clientapp": "fedrecon_fast.integrations.flower_app:client_app",
    }
    # Its options make a configuration.
    assert APP.run_config_to_config(config["tool"]["flwr"]["app"]["config"]).dim == 16


# --------------------------------------------------------------------------------------------
# Deployment: a real SuperLink and two SuperNodes on 127.0.0.1 (insecure, bounded in time)


def test_example_app_deployed_on_a_superlink_with_two_supernodes_equals_the_local_run(tmp_path):
    home = tmp_path / "flwr-home"
    out = tmp_path / "out"
    overrides = {
        "rounds": 3,
        "clients-per-round": 10,
        "dim": 8,
        "synthetic-users": 120,
        "synthetic-items": 50,
        "eval-every": 0,
        "seed": 3,
    }
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in {**overrides, "output": str(out)}.items())
    with FL.local_superlink(home, simulation=False) as address, FL.local_supernodes(home, address, 2):
        start = time.monotonic()
        FL.flwr_run(EXAMPLE, home, run_config=run_config, timeout=300)
        seconds = time.monotonic() - start
    example = {k: v for k, v in _example_config().items() if k not in ("output", "checkpoint-dir")}
    want = local_run({**example, **overrides})
    got = ff.GlobalModel.load(out / "model")
    assert np.array_equal(got.item_factors.view(np.uint32), want.model.item_factors.view(np.uint32))
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["train_rmse"] for h in history] == [h["train_rmse"] for h in want.history]
    assert seconds < 300


def _example_config() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the backport flwr depends on
        import tomli as tomllib

    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
