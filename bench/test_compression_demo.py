"""The compression demo (FedAvg of an MLP on digits): 8-bit updates keep the accuracy with about
4x fewer aggregated bits. Needs scikit-learn (the ``demo`` extra)."""

import json

import pytest

pytest.importorskip("sklearn", reason="the digits demo needs scikit-learn: pip install '.[demo]'")

import compression_demo  # noqa: E402


def test_eight_bit_fedavg_matches_float32_with_4x_fewer_bits(capsys):
    assert compression_demo.main(["--rounds", "25"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["accuracy_float32"] > 0.9
    assert abs(summary["accuracy_difference_points"]) <= 1.0
    assert 3.8 < summary["bits_ratio"] <= 4.0
