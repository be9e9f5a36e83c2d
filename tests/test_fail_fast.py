"""Fail fast: the memory estimate refuses impossible sizes before training, and a divergence
names its likely cause (K and the reconstruction step, the rows' growth, or the client update)."""

from __future__ import annotations

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast.divergence import explain
from fedrecon_fast.memory import MemoryEstimateError, check_training, estimate_training, format_bytes


def test_estimate_adds_up_the_big_arrays():
    paper = ff.preset("paper", num_threads=2)
    e = estimate_training(1000, paper, client_sizes=[100, 300])
    assert e["model"] == 1000 * 50 * 4
    assert e["server"] == 0  # plain server SGD steps in place: no dense delta
    assert e["round updates"] == 100 * 0.5 * 200 * 50 * 4  # half of the mean client's ratings, K floats each
    assert e["total"] == sum(v for k, v in e.items() if k != "total")
    adam = estimate_training(1000, paper.replace(server_optimizer="adam"), client_sizes=[100, 300])
    assert adam["server"] == 3 * 1000 * 50 * 4  # the dense mean update and two moments
    exact = estimate_training(1000, ff.preset("default", num_threads=2), client_sizes=[100, 300])
    assert exact["workers"] - e["workers"] == 2 * 32 * 51 * 51  # a K x K system per thread (K + 1 with biases)


def test_check_refuses_with_the_estimate_and_the_machine_memory():
    config = ff.preset("default", dim=4000)
    with pytest.raises(
        MemoryEstimateError,
        match=r"needs about .* GB .*workers .*but this machine has 1\.0 GB "
        r"available: lower dim \(--dim\), use SGD reconstruction",
    ):
        check_training(100, config, available=10**9)
    assert check_training(100, config.replace(dim=8), available=10**9)["total"] < 10**9
    assert format_bytes(1234) == "1.2 kB" and format_bytes(5) == "5 B"


def test_fit_refuses_before_allocating():
    data = ff.synthetic_ratings(num_users=50, num_items=30, mean_ratings=20, seed=0)
    trainer = ff.FedRecon(ff.preset("fast", dim=2_000_000, rounds=1))  # 32 x K^2 bytes per thread: petabytes
    with pytest.raises(MemoryEstimateError, match="needs about"):
        trainer.fit(data)
    assert trainer.model is None


def test_explain_blames_k_when_sgd_reconstruction_cannot_start_stable():
    msg = explain(ff.preset("paper", dim=30000), np.zeros((3, 30000), np.float32))
    assert "from the start" in msg and "K = 30000" in msg and "|v|^2 = K a^2 / 3 = 25" in msg
    assert "recon_lr below 0.04" in msg


def test_explain_blames_grown_rows_then_the_client_update():
    V = np.full((10, 50), 0.8, np.float32)  # |v|^2 = 32: recon_lr 0.1 x 32 = 3.2
    V[0] = np.nan  # non-finite rows are ignored
    assert "item rows grew" in explain(ff.preset("paper"), V)
    small = np.full((10, 50), 0.01, np.float32)
    msg = explain(ff.preset("paper"), small)
    assert "client_lr 0.5" in msg and "biases" in msg and "default preset" in msg
    msg = explain(ff.preset("default"), small)
    assert "client_lr 0.5" in msg and "biases=True" not in msg and "recon_lr" not in msg
