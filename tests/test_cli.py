"""fedrecon-fast train: the synthetic default, its outputs, the JSON line, and clean errors."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast.cli import main

REQUIRED = {
    "test_rmse",
    "test_accuracy",
    "test_users",
    "test_ratings",
    "rounds",
    "clients_per_round",
    "train_seconds",
    "threads",
    "round_ms_median",
    "eval_seconds",
    "load_seconds",
    "test_recall_at_10",
    "test_ndcg_at_10",
}


def test_train_on_synthetic_writes_metrics_plot_and_json(tmp_path, capsys):
    out, saved = tmp_path / "out", tmp_path / "model"
    code = main(
        [
            "train",
            "--rounds",
            "4",
            "--clients-per-round",
            "20",
            "--dim",
            "8",
            "--json",
            "--no-progress",
            "--out",
            str(out),
            "--save",
            str(saved),
            "--threads",
            "2",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert REQUIRED <= set(result)
    assert result["rounds"] == 4 and result["clients_per_round"] == 20 and result["threads"] == 2
    assert result["test_users"] > 0 and 0 < result["test_rmse"] < 5
    assert 0 <= result["test_recall_at_10"] <= 1 and 0 <= result["test_ndcg_at_10"] <= 1
    assert (out / "metrics.csv").read_text().startswith("round,")
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ff.GlobalModel.load(saved).dim == 8


def test_console_entry_point_runs():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedrecon_fast",
            "train",
            "--rounds",
            "2",
            "--clients-per-round",
            "5",
            "--dim",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rounds"] == 2


def test_missing_data_folder_is_a_clean_error(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--rounds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--preset", "slow"],
        ["train", "--rounds", "-3"],
        ["train", "--dim", "0"],
        ["train", "--clients-per-round", "x"],
    ],
)
def test_impossible_options_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_compression_and_privacy_options_report_bits(capsys):
    # The paper preset has no item biases (float32 even when quantized): V alone sets the ratio.
    base = [
        "train",
        "--preset",
        "paper",
        "--rounds",
        "3",
        "--clients-per-round",
        "10",
        "--dim",
        "8",
        "--json",
        "--no-progress",
    ]
    results = {}
    for name, extra in (
        ("dense", []),
        ("q8", ["--quantize-bits", "8", "--quantize-threshold", "0"]),
        ("sparse", ["--sparse-updates"]),
        ("dp", ["--sparse-updates", "--dp-clip", "0.5", "--dp-noise", "0.1"]),
    ):
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


def test_rank_k_sets_the_ranking_cut_off(capsys):
    assert (
        main(
            [
                "train",
                "--rounds",
                "2",
                "--clients-per-round",
                "10",
                "--dim",
                "4",
                "--json",
                "--no-progress",
                "--rank-k",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["rank_k"] == 5 and "test_recall_at_5" in result and "test_ndcg_at_10" not in result
    assert "Recall@5" in out


# ------------------------------------------------------------------------------- recommend


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model"
    assert (
        main(
            [
                "train",
                "--rounds",
                "5",
                "--clients-per-round",
                "20",
                "--dim",
                "6",
                "--preset",
                "fast",
                "--no-progress",
                "--save",
                str(path),
                "--threads",
                "2",
            ]
        )
        == 0
    )
    return path


def _recommend(argv, capsys):
    code = main(["recommend"] + argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_recommend_end_to_end(saved_model, tmp_path, capsys):
    model = ff.GlobalModel.load(saved_model)
    ids = model.item_ids
    ratings_file = tmp_path / "me.csv"
    ratings_file.write_text(f"item,rating\n# my favourites\n{ids[3]},5\n\n {ids[10]} , 4.5\n{ids[7]},1\n")
    code, out, err = _recommend(
        ["--model", str(saved_model), "--ratings", str(ratings_file), "--k", "5", "--json"], capsys
    )
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"items", "scores"}
    expected_items, expected_scores = model.recommend([ids[3], ids[10], ids[7]], [5.0, 4.5, 1.0], k=5)
    assert result["items"] == expected_items.tolist()
    assert np.allclose(result["scores"], expected_scores, rtol=1e-6)
    assert not {int(ids[3]), int(ids[10]), int(ids[7])} & set(result["items"])
    assert result["scores"] == sorted(result["scores"], reverse=True)
    assert sum(line.strip().startswith(("1.", "2.", "3.", "4.", "5.")) for line in out.splitlines()) == 5

    # --include-seen may recommend rated items: the same as exclude_seen=False.
    code, out, _ = _recommend(
        ["--model", str(saved_model), "--ratings", str(ratings_file), "--k", "8", "--json", "--include-seen"], capsys
    )
    seen_items, _ = model.recommend([ids[3], ids[10], ids[7]], [5.0, 4.5, 1.0], k=8, exclude_seen=False)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["items"] == seen_items.tolist()


def test_recommend_reads_stdin_and_trims_padding(saved_model, monkeypatch, capsys):
    model = ff.GlobalModel.load(saved_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{model.item_ids[0]},4\n"))
    k = 10**12  # far beyond the catalogue: capped, not allocated
    code, out, err = _recommend(["--model", str(saved_model), "--ratings", "-", "--k", str(k), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    # Fewer candidates than k: only the real recommendations are printed (no -1 / NaN).
    assert len(result["items"]) == model.num_items - 1 and -1 not in result["items"]


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("1,5\n2,4,3\n", ":2:", "item,rating"),
        ("item,rating\n1,5\nitem,rating\n", ":3:", "integer"),
        ("1,abc\n", ":1:", "finite"),
        ("# c\n\n1,nan\n", ":3:", "finite"),
        ("1,inf\n", ":1:", "finite"),
        ("1,\n", ":1:", "finite"),
        ("1.5,4\n", ":1:", "integer"),  # a number, so not a header
        ("2,4\n1.5,4\n", ":2:", "integer"),
        ("5\n", ":1:", "item,rating"),
        ("", "", "no ratings"),
        ("item,rating\n# only a header\n", "", "no ratings"),
        ("movie, stars\nx,5\n", ":2:", "integer"),
    ],
    ids=[
        "three-fields",
        "late-header",
        "text-rating",
        "nan",
        "inf",
        "empty-rating",
        "float-item-first",
        "float-item",
        "one-field",
        "empty",
        "header-only",
        "text-item",
    ],
)
def test_recommend_malformed_lines_exit_2_naming_file_and_line(saved_model, tmp_path, capsys, text, where, what):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    code, out, err = _recommend(["--model", str(saved_model), "--ratings", str(path)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert f"{path}{where}" in lines[0] and what in lines[0]


def test_recommend_unknown_items_and_missing_files(saved_model, tmp_path, capsys):
    model = ff.GlobalModel.load(saved_model)
    path = tmp_path / "r.csv"
    path.write_text(f"{model.item_ids[1]},5\n987654321,4\n")
    code, _, err = _recommend(["--model", str(saved_model), "--ratings", str(path)], capsys)
    assert code == 2 and "987654321" in err and "--ignore-unknown" in err and str(path) in err
    code, out, err = _recommend(
        ["--model", str(saved_model), "--ratings", str(path), "--ignore-unknown", "--json", "--k", "3"], capsys
    )
    assert code == 0, err
    expected, _ = model.recommend([model.item_ids[1]], [5.0], k=3)
    assert json.loads(out.strip().splitlines()[-1])["items"] == expected.tolist()
    code, _, err = _recommend(["--model", str(saved_model), "--ratings", str(tmp_path / "none.csv")], capsys)
    assert code == 2 and "none.csv" in err and "Traceback" not in err
    code, _, err = _recommend(["--model", str(tmp_path / "nomodel"), "--ratings", str(path)], capsys)
    assert code == 2 and "nomodel" in err
    with pytest.raises(SystemExit) as e:
        main(["recommend", "--model", str(saved_model), "--ratings", str(path), "--k", "0"])
    assert e.value.code == 2


def test_recommend_console_entry_point_reads_stdin(saved_model):
    model = ff.GlobalModel.load(saved_model)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedrecon_fast",
            "recommend",
            "--model",
            str(saved_model),
            "--ratings",
            "-",
            "--k",
            "4",
            "--json",
        ],
        input=f"item,rating\n{model.item_ids[2]},5\n{model.item_ids[4]},2\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["items"]) == len(result["scores"]) == 4
