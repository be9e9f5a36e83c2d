"""The Ray overhead benchmark runs and its sharded rounds equal the local ones (the ray extra)."""

import json

import pytest

pytest.importorskip("ray", reason="the Ray backend needs Ray: pip install '.[ray]'")

import ray_overhead  # noqa: E402


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_ray_rounds_are_bit_identical_to_local(capsys):
    ray_overhead.main(["--clients", "40", "150", "--rounds", "1", "--workers", "2", "--users", "400"])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["clients_per_round"] for x in lines] == [40, 150]
    assert all(x["bit_identical"] and x["ray_seconds_per_round"] > 0 for x in lines)
