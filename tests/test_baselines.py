"""Baselines of Table 1 on small synthetic data: they learn, FedAvg keeps its users, and
StandardEval scores held-out ratings of seen users; plus the paper/ablation commands."""

import json

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import baselines as B
from fedrecon_fast import paper
from fedrecon_fast.cli import main


@pytest.fixture(scope="module")
def data():
    return ff.synthetic_ratings(num_users=300, num_items=200, seed=3).prepare(max_examples=300, shuffle_seed=3)


@pytest.fixture(scope="module")
def by_time(data):
    return ff.split_by_time(data)


def test_standard_eval_splits_by_time(by_time):
    train, val, test = by_time
    for c in range(0, train.num_clients, 37):
        t_train = train.timestamps[train.indptr[c] : train.indptr[c + 1]]
        t_test = test.timestamps[test.indptr[c] : test.indptr[c + 1]]
        assert t_test.size and t_train.max() <= t_test.min()  # the future is held out
    assert train.num_clients == test.num_clients


@pytest.mark.parametrize(
    "config",
    [
        B.CentralizedConfig(dim=8, epochs=15, lr=0.05, batch_size=16),
        B.CentralizedConfig(dim=8, epochs=6, method="als", als_ridge=5.0, biases=True),
    ],
    ids=["sgd", "als+biases"],
)
def test_centralized_learns(by_time, config):
    train, val, test = by_time
    before = B.CentralizedMF(config.__class__(**{**config.__dict__, "epochs": 0})).fit(train).standard_eval(test)
    model = B.CentralizedMF(config).fit(train, val)
    after = model.standard_eval(test)
    assert after["rmse"] < before["rmse"] - 0.1
    assert after["rmse"] < 1.2 and after["ratings"] == test.nnz
    assert len(model.history) == config.epochs and "val_rmse" in model.history[-1]


def test_fedavg_stores_and_trains_user_embeddings(by_time):
    train, _, test = by_time
    cfg = B.fedavg_config(dim=8, rounds=30, clients_per_round=50, client_lr=0.1)
    fedavg = B.FedAvg(cfg).fit(train, rounds=1)
    first = fedavg.users.copy()
    assert first.shape == (train.num_clients, 8)
    sampled = ff.sample_clients(train.num_clients, 50, cfg.seed, 0)
    untouched = np.setdiff1d(np.arange(train.num_clients), sampled)
    fedavg.fit(train, rounds=1)
    second = ff.sample_clients(train.num_clients, 50, cfg.seed, 1)
    stale = np.setdiff1d(untouched, second)
    # Clients not sampled keep their stored embedding; sampled ones get a trained one.
    assert np.array_equal(fedavg.users[stale], first[stale])
    assert not np.array_equal(fedavg.users[second], first[second])
    before = fedavg.standard_eval(test)["rmse"]
    fedavg.fit(train)
    assert fedavg.standard_eval(test)["rmse"] < before - 0.3
    # ReconEval of FedAvg's V reconstructs with the paper schedule (eval_client).
    assert fedavg.config.evaluation.recon_epochs == 5
    assert np.isfinite(fedavg.evaluate(test)["rmse"])


def test_transpose_keeps_every_item(data):
    sub = data.subset(np.arange(10))
    t = B.transpose(sub)
    assert t.num_clients == sub.num_items and t.num_items == sub.num_clients and t.nnz == sub.nnz
    u, i, r = sub.to_coo()
    tu, ti, tr = t.to_coo()
    assert sorted(zip(u, i, r)) == sorted(zip(ti, tu, tr))


@pytest.mark.slow
def test_table1_and_ablation_commands_on_synthetic(tmp_path, data, capsys, monkeypatch):
    rows = paper.table1(data, rounds=20)
    assert set(rows) == set(paper.ROWS)
    for r in rows.values():
        assert np.isfinite(r["rmse"]) and 0 <= r["accuracy"] <= 1 and r["seconds"] > 0
    assert "| FedRecon (ReconEval) |" in paper.table1_markdown(rows)

    abl = paper.ablation(data, rounds=20, kr=(0, 2), ku=(1, 2))
    assert abl["kr_sweep"]["0"]["relative_accuracy"] < 0.2  # no reconstruction: near chance
    assert set(abl["grid"]) == {"kr=0,ku=1", "kr=0,ku=2", "kr=2,ku=1", "kr=2,ku=2"}
    paper.plot_ablation(abl, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"

    # The CLI wires the same functions to files and a JSON line.
    monkeypatch.setattr(ff.movielens, "load_movielens", lambda path: data)
    out = tmp_path / "out"
    assert main(["paper", "--data", "x", "--rounds", "5", "--out", str(out), "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["rows"]) == set(paper.ROWS)
    assert {"rmse", "accuracy", "seconds"} <= set(result["rows"]["fedrecon"])
    assert (out / "table1.md").exists() and (out / "table1.json").exists()


def test_centralized_config_validation():
    with pytest.raises(ValueError, match="method"):
        B.CentralizedConfig(method="svd")
    with pytest.raises(ValueError, match="als_ridge"):
        B.CentralizedConfig(als_ridge=0.0)
