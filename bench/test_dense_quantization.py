"""Correctness mode of bench/dense_quantization.py: every case runs and stays within the
quantization error of the float32 round."""

import dense_quantization


def test_dense_quantization_cases_run_and_check(capsys):
    assert dense_quantization.main(["--rounds", "2", "--threads", "1", "--synthetic"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(dense_quantization.CASES)
