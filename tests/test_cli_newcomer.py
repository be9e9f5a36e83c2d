"""The command line as a newcomer meets it, on real processes: --version, help with defaults,
presets, any ratings file, titles in recommend, the paths written and their modes, quiet broken
pipes, warnings and fail-fast errors as one line."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast.cli import build_parser

SMALL = ["--rounds", "3", "--clients-per-round", "10", "--dim", "4", "--threads", "1", "--no-progress"]


def cli(*args, stdin=None, umask=None):
    def preexec():
        if umask is not None:
            os.umask(umask)

    return subprocess.run(
        [sys.executable, "-m", "fedrecon_fast", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
    )


def test_version():
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fedrecon-fast {ff.__version__}"


@pytest.mark.slow
def test_every_option_has_help_with_its_default_and_no_markup():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            assert "(default:" in action.help or "(required)" in action.help, (name, action.option_strings)
    for args in ([], *([c] for c in commands)):
        proc = cli(*args, "--help")
        assert proc.returncode == 0
        assert "``" not in proc.stdout and ":func:" not in proc.stdout, args


def test_train_help_lists_the_presets_and_what_they_set():
    out = cli("train", "--help").stdout
    for name in ff.PRESETS:
        assert re.search(rf"^  {name} +\S", out, re.M), name
    flat = " ".join(out.split())
    assert "published MovieLens 1M recipe" in flat and "exact ridge reconstruction (ridge 2)" in flat
    assert "(default: default)" in flat


@pytest.mark.slow
def test_paper_help_promises_only_what_it_writes():
    assert "PNG" not in cli("paper", "--help").stdout and "png" not in cli("paper", "--help").stdout
    assert "ablation.png" in cli("ablation", "--help").stdout


@pytest.mark.slow
def test_train_prints_the_paths_it_wrote_with_normal_modes(tmp_path):
    out, model = tmp_path / "results", tmp_path / "a" / "model"
    proc = cli("train", *SMALL, "--out", out, "--save", model, "--json", umask=0o022)
    assert proc.returncode == 0, proc.stderr
    for path in (out / "metrics.csv", out / "metrics.json", out / "learning_curve.png", model):
        assert f"wrote {path}" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["written"] == [str(model)] + [
        str(out / n) for n in ("metrics.csv", "metrics.json", "learning_curve.png")
    ]
    for folder in (out, model, model.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    for file in model.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_new_json_metrics_and_leave_one_out():
    proc = cli("train", *SMALL, "--json", "--leave-one-out")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "test_mae",
        "test_precision_at_10",
        "test_hit_rate_at_10",
        "test_map_at_10",
        "test_mrr_at_10",
        "test_coverage_at_10",
        "test_recall_at_10",
        "test_ndcg_at_10",
        "test_loo_hit_rate_at_10",
        "test_loo_ndcg_at_10",
    ):
        assert 0 <= result[key] <= (5 if key == "test_mae" else 1), key
    assert result["preset"] == "default" and result["test_loo_users"] > 0
    assert "leave-one-out" in proc.stdout and "MAP@10" in proc.stdout


@pytest.mark.slow
def test_broken_pipe_ends_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedrecon_fast", "train", *SMALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    with proc.stderr:
        stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and stderr == "", stderr


def _movielens_folder(tmp_path):
    """A small MovieLens 1M-style folder: ratings.dat and a Latin-1 movies.dat."""
    data = ff.synthetic_ratings(num_users=150, num_items=80, mean_ratings=30, seed=4)
    u, i, r = data.to_coo()
    folder = tmp_path / "ml"
    folder.mkdir()
    lines = [
        f"{data.user_ids[a] + 1}::{data.item_ids[b] + 1}::{int(c)}::{t}" for a, b, c, t in zip(u, i, r, data.timestamps)
    ]
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    titles = [f"{j + 1}::Film n\xb0{j + 1} (19{j % 90 + 10})::Drama" for j in range(80)]
    (folder / "movies.dat").write_bytes(("\n".join(titles) + "\n").encode("latin-1"))
    return folder


@pytest.mark.slow
def test_three_commands_give_titles_in_recommend(tmp_path):
    folder = _movielens_folder(tmp_path)
    model = tmp_path / "model"
    train = cli("train", "--data", folder, "--save", model, *SMALL)
    assert train.returncode == 0, train.stderr
    assert f"item titles from {folder / 'movies.dat'}" in train.stdout
    text = cli("recommend", "--model", model, "--ratings", "-", stdin="item,rating\n1,5\n2,4\n")
    assert text.returncode == 0, text.stderr
    assert re.search(r"^   1\. Film n\xb0\d+ \(19\d\d\) \(item \d+\)  predicted rating", text.stdout, re.M), text.stdout
    js = cli("recommend", "--model", model, "--ratings", "-", "--json", stdin="item,rating\n1,5\n2,4\n")
    result = json.loads(js.stdout.strip().splitlines()[-1])
    assert len(result["titles"]) == len(result["items"]) == 10
    assert all(t == f"Film n\xb0{i} (19{(i - 1) % 90 + 10})" for t, i in zip(result["titles"], result["items"]))


@pytest.mark.slow
def test_recommend_titles_from_items_option_and_csv(tmp_path):
    folder = _movielens_folder(tmp_path)
    (folder / "movies.dat").rename(tmp_path / "elsewhere.dat")
    model = tmp_path / "model"
    assert cli("train", "--data", folder, "--save", model, *SMALL).returncode == 0
    plain = cli("recommend", "--model", model, "--ratings", "-", "--json", stdin="1,5\n")
    assert "titles" not in json.loads(plain.stdout.strip().splitlines()[-1])
    csv = tmp_path / "movies.csv"
    csv.write_text("movieId,title,genres\n" + "".join(f'{j},"Title, {j}",Drama\n' for j in range(1, 81)))
    given = cli("recommend", "--model", model, "--ratings", "-", "--json", "--items", csv, stdin="1,5\n")
    result = json.loads(given.stdout.strip().splitlines()[-1])
    assert result["titles"] == [f"Title, {i}" for i in result["items"]]


@pytest.mark.slow
def test_any_file_with_columns_and_sep(tmp_path):
    rng = np.random.default_rng(0)
    lines = [f"i{rng.integers(50)};u{u};{rng.integers(1, 11) / 2}" for u in range(120) for _ in range(15)]
    path = tmp_path / "stars.txt"
    path.write_text("\n".join(lines) + "\n")
    proc = cli(
        "train",
        "--data",
        path,
        "--columns",
        "item,user,rating",
        "--sep",
        ";",
        "--save",
        tmp_path / "model",
        *SMALL,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["train_users"] == 96
    rec = cli("recommend", "--model", tmp_path / "model", "--ratings", "-", "--json", stdin="i3,5\ni4,1\n")
    items = json.loads(rec.stdout.strip().splitlines()[-1])["items"]
    assert len(items) == 10 and all(re.fullmatch(r"i\d+", i) for i in items) and "i3" not in items


def test_swapped_columns_warning_is_one_line(tmp_path):
    data = ff.synthetic_ratings(num_users=60, num_items=1200, mean_ratings=30, seed=1)
    u, i, r = data.to_coo()
    path = tmp_path / "swapped.csv"
    np.savetxt(path, np.column_stack([data.item_ids[i], data.user_ids[u], r]), fmt="%d,%d,%g")
    proc = cli("train", "--data", path, *SMALL)
    assert proc.returncode == 0
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("fedrecon-fast: warning:") and "--columns item,user,rating" in lines[0]
    )


def test_impossible_sizes_fail_fast_with_the_estimate(tmp_path):
    proc = cli("train", "--dim", "200000", "--rounds", "1", "--no-progress")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs about" in lines[0] and "available" in lines[0] and "--dim" in lines[0]


@pytest.mark.slow
def test_divergence_names_the_likely_cause():
    # recon_lr 0.1 x K a^2 / 3 = 2.5 at K = 30000: SGD reconstruction cannot be stable.
    proc = cli(
        "train",
        "--preset",
        "paper",
        "--dim",
        "30000",
        "--rounds",
        "5",
        "--clients-per-round",
        "20",
        "--no-progress",
        "--threads",
        "1",
    )
    assert proc.returncode == 2
    assert "diverged" in proc.stderr or "non-finite" in proc.stderr
    assert "SGD reconstruction is unstable from the start" in proc.stderr and "K = 30000" in proc.stderr, proc.stderr


def test_gitignore_keeps_outputs_out_of_the_repository():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, ".gitignore")) as f:
        ignored = f.read().split()
    assert "results/" in ignored and "model/" in ignored
