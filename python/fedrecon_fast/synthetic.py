"""Seeded synthetic ratings with MovieLens-like statistics.

Used by the tests and by the default demo when no MovieLens data is at hand.
"""

from __future__ import annotations

import math

import numpy as np

from .data import ClientData

__all__ = ["synthetic_ratings"]

_GLOBAL_MEAN = 3.6
_USER_BIAS_STD = 0.35
_ITEM_BIAS_STD = 0.45
_POPULARITY_BIAS = 0.15  # popular items are rated a little higher, as on MovieLens
_INTERACTION_STD = 0.55  # std of u . v
_ZIPF_EXPONENT = 0.9
_COUNT_SIGMA = 1.0  # lognormal shape of the ratings-per-user tail (ML-1M: mean/median ~ 1.7)
_T0 = 956_700_000  # 2000-04-26, the first day of the MovieLens 1M data
_KEY_BUDGET = 1 << 22  # random sort keys materialised at once (users x items per chunk)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(value, name: str, minimum: float) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be finite and >= {minimum}, got {value}")
    return value


def synthetic_ratings(num_users: int = 2000, num_items: int = 1500, *, rank: int = 10,
                      mean_ratings: float = 80, min_ratings: int = 20, noise: float = 0.5,
                      seed: int = 0) -> ClientData:
    """Generate a seeded synthetic ratings data set that looks like MovieLens.

    Model: every user rates ``n_u`` distinct items, ``n_u - min_ratings``
    lognormal (heavy right tail, like MovieLens), so ``n_u`` lies in
    ``[min_ratings, num_items]`` with mean close to ``mean_ratings`` (less
    when the cap ``num_items`` bites).  Items are chosen without replacement
    with Zipf-like popularity weights ``1 / rank**0.9`` (popularity ranks
    randomly assigned to item ids).  A rating is
    ``round(3.6 + b_u + b_i + u . v + noise * N(0, 1))`` clipped to 1..5, with
    user/item biases, ``rank``-dimensional Gaussian user/item factors, and
    popular items rated slightly higher.  Each user's timestamps are
    strictly increasing Unix seconds starting in 2000, in a random order of
    the user's items.

    Parameters
    ----------
    num_users : int, default 2000
        Number of users (clients), ids ``0..num_users-1``.
    num_items : int, default 1500
        Number of items, ids ``0..num_items-1`` (all in the mapping, even if
        never rated).
    rank : int, default 10
        Dimension of the true low-rank model.
    mean_ratings : float, default 80
        Target mean number of ratings per user, ``>= min_ratings``.
    min_ratings : int, default 20
        Minimum ratings per user, ``1 <= min_ratings <= num_items``.
    noise : float, default 0.5
        Standard deviation of the Gaussian noise added before rounding.
    seed : int, default 0
        Non-negative seed of ``numpy.random.Generator(PCG64(seed))``.

    Returns
    -------
    ClientData
        ``num_users`` clients with integer ratings 1..5 (float32) and
        timestamps; deterministic given the arguments.

    Raises
    ------
    TypeError
        If an argument has the wrong type (message names the argument).
    ValueError
        If an argument is out of range (message names the argument).
    """
    num_users = _check_int(num_users, "num_users", 1)
    num_items = _check_int(num_items, "num_items", 1)
    rank = _check_int(rank, "rank", 1)
    min_ratings = _check_int(min_ratings, "min_ratings", 1)
    if min_ratings > num_items:
        raise ValueError(f"min_ratings ({min_ratings}) must be <= num_items ({num_items})")
    mean_ratings = _check_real(mean_ratings, "mean_ratings", float(min_ratings))
    noise = _check_real(noise, "noise", 0.0)
    seed = _check_int(seed, "seed", 0)
    rng = np.random.Generator(np.random.PCG64(seed))

    # ratings per user: min_ratings + lognormal excess with the requested mean
    excess_mean = mean_ratings - min_ratings
    if excess_mean > 0:
        mu = math.log(excess_mean) - 0.5 * _COUNT_SIGMA ** 2
        excess = np.floor(rng.lognormal(mu, _COUNT_SIGMA, size=num_users) + rng.random(num_users))
    else:
        excess = np.zeros(num_users)
    sizes = np.minimum(min_ratings + excess, num_items).astype(np.int64)

    # Zipf-like item popularity, ranks assigned to item ids at random
    popularity_rank = rng.permutation(num_items)
    log_weight = -_ZIPF_EXPONENT * np.log1p(popularity_rank.astype(np.float64))

    # weighted sampling without replacement: top-k of log(w) + Gumbel noise per user
    # (Efraimidis-Spirakis), processed in chunks of users to bound memory
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    items = np.empty(int(indptr[-1]), dtype=np.int64)
    chunk = max(1, _KEY_BUDGET // num_items)
    cols = np.arange(num_items)
    for lo in range(0, num_users, chunk):
        hi = min(num_users, lo + chunk)
        keys = rng.gumbel(size=(hi - lo, num_items)) + log_weight
        order = np.argsort(-keys, axis=1)
        take = cols < sizes[lo:hi, None]
        items[indptr[lo]:indptr[hi]] = order[take]  # row-major: grouped by user

    # the low-rank model
    user = np.repeat(np.arange(num_users), sizes)
    user_bias = rng.normal(0.0, _USER_BIAS_STD, size=num_users)
    pop_z = (log_weight - log_weight.mean()) / (log_weight.std() or 1.0)
    item_bias = rng.normal(0.0, _ITEM_BIAS_STD, size=num_items) + _POPULARITY_BIAS * pop_z
    scale = math.sqrt(_INTERACTION_STD / math.sqrt(rank))
    U = rng.normal(0.0, scale, size=(num_users, rank))
    V = rng.normal(0.0, scale, size=(num_items, rank))
    interaction = np.einsum("ij,ij->i", U[user], V[items])
    raw = (_GLOBAL_MEAN + user_bias[user] + item_bias[items] + interaction
           + noise * rng.standard_normal(items.size))
    ratings = np.clip(np.rint(raw), 1, 5).astype(np.float32)

    # timestamps: per user a start time and positive gaps, assigned in a random order
    start = _T0 + rng.integers(0, 3 * 365 * 86400, size=num_users)
    gaps = 1 + np.floor(rng.exponential(3600.0, size=items.size)).astype(np.int64)
    csum = np.cumsum(gaps)
    first = indptr[:-1][sizes > 0]
    offset = np.zeros(num_users, dtype=np.int64)
    offset[sizes > 0] = csum[first] - gaps[first]
    times = start[user] + csum - offset[user]  # strictly increasing within a user
    order = np.lexsort((rng.random(items.size), user))  # random rating order per user
    return ClientData(indptr=indptr, items=items[order], ratings=ratings[order],
                      timestamps=times, user_ids=np.arange(num_users, dtype=np.int64),
                      item_ids=np.arange(num_items, dtype=np.int64))
