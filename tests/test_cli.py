"""fedrecon-fast train: the synthetic default, its outputs, the JSON line, and clean errors."""

import json
import subprocess
import sys

import pytest

import fedrecon_fast as ff
from fedrecon_fast.cli import main

REQUIRED = {"test_rmse", "test_accuracy", "test_users", "test_ratings", "rounds",
            "clients_per_round", "train_seconds", "threads", "round_ms_median", "eval_seconds",
            "load_seconds"}


def test_train_on_synthetic_writes_metrics_plot_and_json(tmp_path, capsys):
    out, saved = tmp_path / "out", tmp_path / "model"
    code = main(["train", "--rounds", "4", "--clients-per-round", "20", "--dim", "8", "--json",
                 "--no-progress", "--out", str(out), "--save", str(saved), "--threads", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert REQUIRED <= set(result)
    assert result["rounds"] == 4 and result["clients_per_round"] == 20 and result["threads"] == 2
    assert result["test_users"] > 0 and 0 < result["test_rmse"] < 5
    assert (out / "metrics.csv").read_text().startswith("round,")
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ff.GlobalModel.load(saved).dim == 8


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "fedrecon_fast", "train", "--rounds", "2",
                           "--clients-per-round", "5", "--dim", "4", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rounds"] == 2


def test_missing_data_folder_is_a_clean_error(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--rounds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["train", "--preset", "slow"], ["train", "--rounds", "-3"],
                                  ["train", "--dim", "0"], ["train", "--clients-per-round", "x"]])
def test_impossible_options_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_compression_and_privacy_options_report_bits(capsys):
    base = ["train", "--rounds", "3", "--clients-per-round", "10", "--dim", "8", "--json", "--no-progress"]
    results = {}
    for name, extra in (("dense", []), ("q8", ["--quantize-bits", "8", "--quantize-threshold", "0"]),
                        ("sparse", ["--sparse-updates"]),
                        ("dp", ["--sparse-updates", "--dp-clip", "0.5", "--dp-noise", "0.1"])):
        assert main(base + extra) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dense, q8, sparse, dp = (results[k] for k in ("dense", "q8", "sparse", "dp"))
    assert dense["broadcasted_bits"] == q8["broadcasted_bits"] > 0
    assert 3.9 < dense["aggregated_bits"] / q8["aggregated_bits"] <= 4.0
    assert sparse["aggregated_bits"] < dense["aggregated_bits"] / 5
    assert dp["dp_clip"] == 0.5 and dp["test_rmse"] > 0
    with pytest.raises(SystemExit):
        main(base + ["--quantize-scaling", "diagonal"])
    assert main(base + ["--quantize-bits", "17"]) == 2
    assert "quantize_bits" in capsys.readouterr().err
