"""Shared benchmark problems: the paper recipe on MovieLens 1M when present, else synthetic."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import fedrecon_fast as ff

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the NumPy reference implementation lives with the tests

import reference  # noqa: E402


def ml1m_path() -> Path | None:
    path = Path(os.environ.get("FEDRECON_ML1M", ROOT.parent / "shared" / "data" / "ml-1m"))
    return path if (path / "ratings.dat").is_file() else None


def paper_problem(seed: int = 0, *, synthetic: bool = False):
    """(config, training clients, initial model) for the paper recipe."""
    config = ff.preset("paper", seed=seed)
    path = None if synthetic else ml1m_path()
    data = ff.load_movielens(path) if path else ff.synthetic_ratings(num_users=3000, num_items=3600, seed=seed)
    data = data.prepare(max_examples=config.max_examples, shuffle_seed=seed)
    train_idx, _, _ = ff.split_users(data.num_clients, config.user_split, seed=seed)
    train = data.subset(train_idx)
    model = ff.GlobalModel.initialize(train.item_ids, config)
    return config, train, model, ("MovieLens 1M, users 1-2999" if path else "synthetic")


def rating_steps(stats: dict) -> int:
    """Rating-gradient evaluations in a round: reconstruction + update examples processed."""
    return int(stats["recon_examples"].sum() + stats["num_examples"].sum())


def reference_round(model, data, clients, config, seed, round):
    """The NumPy reference of the fused round, as a :class:`fedrecon_fast.RoundResult`."""
    return ff.RoundResult(*reference.train_round(model.item_factors, data, clients, config.client,
                                 item_bias=model.item_bias, global_mean=model.global_mean,
                                 seed=seed, round=round))


__all__ = ["np", "ff", "paper_problem", "rating_steps", "reference_round", "ml1m_path"]
