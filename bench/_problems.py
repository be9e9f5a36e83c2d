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


# --------------------------------------------------------------------------------------------
# The scale problem: 10 M users generated on the fly from their ids (never stored)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_RATING_CDF = np.cumsum([0.056, 0.110, 0.261, 0.349])  # P(rating <= 1..4), MovieLens 1M-like
_ITEM_STRIDE = 982_451_653  # a prime: rank -> item id is a bijection for any num_items it does not divide


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, vectorised over uint64 arrays (wraps modulo 2**64)."""
    z = x + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def _unit(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def generated_clients(user_ids, num_items: int, *, seed: int = 0, mean_ratings: int = 100,
                      skew: float = 3.0):
    """CSR ratings of the given users, each a pure function of (seed, user id): no user is stored.

    User ``c`` has ``n_c`` uniform in ``[20, 2 * mean_ratings - 20]`` draws; draw ``j`` picks the
    popularity rank ``floor(num_items * x**skew)`` (x uniform; skew 3 gives the top 1% of items
    about 22% of the ratings), mapped to an item id by a fixed bijection; repeated items of a user
    are dropped. Ratings 1..5 follow MovieLens 1M's marginal distribution. Everything is counter-
    based hashing (SplitMix64 of seed, id, draw index), vectorised over the whole cohort.

    Returns an object with ``indptr``/``items``/``ratings``/``num_clients``/``num_items`` (what
    :func:`fedrecon_fast.train_round` accepts); client ``k`` is ``user_ids[k]``.
    """
    from types import SimpleNamespace

    ids = np.asarray(user_ids, dtype=np.int64)
    if num_items % _ITEM_STRIDE == 0:
        raise ValueError("num_items must not be a multiple of the item stride")
    key = _mix64(np.uint64(seed) ^ _mix64(ids.astype(np.uint64)))
    span = np.uint64(2 * mean_ratings - 40 + 1)
    n = 20 + (_mix64(key) % span).astype(np.int64)
    owner = np.repeat(np.arange(len(ids)), n)
    draw = np.arange(owner.size) - np.repeat(np.cumsum(n) - n, n)
    h = _mix64(key[owner] + np.uint64(2) * draw.astype(np.uint64) + np.uint64(1))
    rank = np.minimum((num_items * _unit(h) ** skew).astype(np.int64), num_items - 1)
    item = (rank * _ITEM_STRIDE) % num_items
    pair, first = np.unique(owner * num_items + item, return_index=True)  # sorted by (owner, item)
    owner, item = pair // num_items, pair % num_items
    rating = (np.searchsorted(_RATING_CDF, _unit(_mix64(h[first]))) + 1).astype(np.float32)
    indptr = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=len(ids)), out=indptr[1:])
    return SimpleNamespace(indptr=indptr, items=item.astype(np.int32), ratings=rating,
                           num_clients=len(ids), num_items=num_items)


__all__ = ["np", "ff", "paper_problem", "rating_steps", "reference_round", "ml1m_path",
           "generated_clients"]
