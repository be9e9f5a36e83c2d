"""End to end on MovieLens 1M (users 1-2999): the paper recipe and the fast preset.

Skipped when ../shared/data/ml-1m is absent (set FEDRECON_ML1M to point elsewhere).
"""

import json
import os
from pathlib import Path

import pytest

from fedrecon_fast.cli import main

ML1M = Path(os.environ.get("FEDRECON_ML1M", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"))
pytestmark = pytest.mark.skipif(not (ML1M / "ratings.dat").is_file(), reason=f"MovieLens 1M not found at {ML1M}")


def run(preset, capsys):
    assert main(["train", "--data", str(ML1M), "--preset", preset, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_paper_recipe_and_fast_preset_on_unseen_users(capsys):
    paper = run("paper", capsys)
    assert paper["rounds"] == 500 and paper["clients_per_round"] == 100
    assert paper["train_users"] == 2399 and paper["test_users"] == 301
    assert paper["test_rmse"] <= 0.93
    assert paper["test_accuracy"] >= 0.40
    fast = run("fast", capsys)
    assert fast["test_rmse"] < paper["test_rmse"]
