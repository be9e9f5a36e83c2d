"""Seeded synthetic ratings with MovieLens-like statistics.

Used by the tests and by the default demo when no MovieLens data is at hand.
"""

from __future__ import annotations

import math

import numpy as np

from ._validation import check_bool, check_float, check_int
from .data import ClientData

__all__ = ["synthetic_ratings"]

_GLOBAL_MEAN = 3.6
_USER_BIAS_STD = 0.45
_ITEM_BIAS_STD = 0.5
_POPULARITY_BIAS = 0.15  # popular items are rated a little higher, as on MovieLens
_INTERACTION_STD = 0.6  # std of u . v
_ZIPF_EXPONENT = (
    0.4  # top item rated by ~40% of users (ML-1M: 50%); steeper makes the paper recipe (client lr 0.5) diverge
)
_COUNT_SIGMA = 1.0  # lognormal shape of the ratings-per-user tail (ML-1M: mean/median ~ 1.7)
_T0 = 956_700_000  # 2000-04-26, the first day of the MovieLens 1M data
_KEY_BUDGET = 1 << 22  # random sort keys materialised at once (users x items per chunk)


def synthetic_ratings(
    num_users: int = 2000,
    num_items: int = 1500,
    *,
    rank: int = 10,
    mean_ratings: float = 80,
    min_ratings: int = 20,
    noise: float = 0.5,
    half_stars: bool = False,
    popularity: float = _ZIPF_EXPONENT,
    seed: int = 0,
) -> ClientData:
    """Generate a seeded synthetic ratings data set that looks like MovieLens.

    Model: every user rates ``n_u`` distinct items, ``n_u - min_ratings``
    lognormal (heavy right tail, like MovieLens), so ``n_u`` lies in
    ``[min_ratings, num_items]`` with mean close to ``mean_ratings`` (less
    when the cap ``num_items`` bites).  Items are chosen without replacement
    with Zipf-like popularity weights ``(1 + r)**-popularity`` for popularity
    rank ``r = 0, 1, ...`` (ranks randomly assigned to item ids).  A rating is
    ``round(3.6 + b_u + b_i + u . v + noise * N(0, 1))`` clipped to 1..5 (or
    rounded to half stars and clipped to 0.5..5 with ``half_stars``), with
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
    half_stars : bool, default False
        Ratings 0.5, 1, ..., 5 (MovieLens 10M and later) instead of 1..5.
    popularity : float, default 0.4
        Zipf exponent of item popularity: 0 is uniform; 1 or more makes a
        long tail of rarely rated items (a sparse catalogue).
    seed : int, default 0
        Non-negative seed of ``numpy.random.Generator(PCG64(seed))``.

    Returns
    -------
    ClientData
        ``num_users`` clients with ratings 1..5 (or half stars; float32) and
        timestamps; deterministic given the arguments.

    Raises
    ------
    TypeError
        If an argument has the wrong type (message names the argument).
    ValueError
        If an argument is out of range (message names the argument).

    Notes
    -----
    Sampling costs O(num_users x num_items) random numbers (vectorised in
    chunks of users; about 0.2 s for the defaults, a few seconds for
    20 000 users x 5 000 items).
    """
    num_users = check_int(num_users, "num_users", minimum=1)
    num_items = check_int(num_items, "num_items", minimum=1)
    rank = check_int(rank, "rank", minimum=1)
    min_ratings = check_int(min_ratings, "min_ratings", minimum=1)
    if min_ratings > num_items:
        raise ValueError(f"min_ratings ({min_ratings}) must be <= num_items ({num_items})")
    mean_ratings = check_float(mean_ratings, "mean_ratings", minimum=float(min_ratings))
    noise = check_float(noise, "noise", minimum=0.0)
    popularity = check_float(popularity, "popularity", minimum=0.0)
    check_bool(half_stars, "half_stars")
    seed = check_int(seed, "seed", minimum=0)
    rng = np.random.Generator(np.random.PCG64(seed))

    # ratings per user: min_ratings + lognormal excess with the requested mean
    excess_mean = mean_ratings - min_ratings
    if excess_mean > 0:
        mu = math.log(excess_mean) - 0.5 * _COUNT_SIGMA**2
        excess = np.floor(rng.lognormal(mu, _COUNT_SIGMA, size=num_users) + rng.random(num_users))
    else:
        excess = np.zeros(num_users)
    sizes = np.minimum(min_ratings + excess, num_items).astype(np.int64)

    # Zipf-like item popularity, ranks assigned to item ids at random
    popularity_rank = rng.permutation(num_items)
    log_weight = -popularity * np.log1p(popularity_rank.astype(np.float64))
    inv_weight = np.exp(-log_weight).astype(np.float32)

    # the low-rank model: biases and factors (u . v has std _INTERACTION_STD)
    user_bias = rng.normal(0.0, _USER_BIAS_STD, size=num_users)
    item_bias = rng.normal(0.0, _ITEM_BIAS_STD, size=num_items)
    scale = math.sqrt(_INTERACTION_STD / math.sqrt(rank))
    U = rng.normal(0.0, scale, size=(num_users, rank))
    V = rng.normal(0.0, scale, size=(num_items, rank))

    # Weighted sampling without replacement (Efraimidis-Spirakis): each user
    # takes the n_u items with the smallest E / w, E ~ Exp(1).  Users are
    # processed in chunks of similar n_u (sorted by n_u) so that a partial
    # partition suffices and memory stays bounded; no loop over users.  The
    # interaction u . v of the chosen pairs comes from the chunk's dense
    # score matrix U_chunk V^T (one BLAS call, no per-rating gathers).
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    nnz = int(indptr[-1])
    items = np.empty(nnz, dtype=np.int64)
    interaction = np.empty(nnz, dtype=np.float64)
    by_size = np.argsort(sizes, kind="stable")
    chunk = max(1, _KEY_BUDGET // num_items)
    for lo in range(0, num_users, chunk):
        users = by_size[lo : lo + chunk]
        k_user = sizes[users]
        k_max = int(k_user.max())
        keys = rng.standard_exponential(size=(users.size, num_items), dtype=np.float32)
        keys *= inv_weight
        if k_max < num_items:
            cand = np.argpartition(keys, k_max - 1, axis=1)[:, :k_max]
        else:
            cand = np.broadcast_to(np.arange(num_items), keys.shape)
        best = np.take_along_axis(cand, np.argsort(np.take_along_axis(keys, cand, axis=1), axis=1), axis=1)
        take = np.arange(k_max) < k_user[:, None]
        positions = np.arange(int(k_user.sum())) + np.repeat(indptr[users] - (np.cumsum(k_user) - k_user), k_user)
        items[positions] = best[take]  # row-major: each user's items, in chunk order
        scores = U[users] @ V.T
        interaction[positions] = np.take_along_axis(scores, best, axis=1)[take]

    # popular items are rated a little higher: standardised log-popularity,
    # centred on its mean over the sampled ratings so the mean rating stays put
    user = np.repeat(np.arange(num_users), sizes)
    pop_z = log_weight / (log_weight.std() or 1.0)
    if nnz:
        pop_z -= np.dot(np.bincount(items, minlength=num_items), pop_z) / nnz
    item_bias += _POPULARITY_BIAS * pop_z
    raw = _GLOBAL_MEAN + user_bias[user] + item_bias[items] + interaction + noise * rng.standard_normal(nnz)
    if half_stars:
        ratings = np.clip(np.rint(2 * raw) / 2, 0.5, 5).astype(np.float32)
    else:
        ratings = np.clip(np.rint(raw), 1, 5).astype(np.float32)

    # timestamps: per user a start time and positive gaps (strictly increasing)
    start = _T0 + rng.integers(0, 3 * 365 * 86400, size=num_users)
    gaps = 1 + np.floor(rng.exponential(3600.0, size=nnz)).astype(np.int64)
    csum = np.cumsum(gaps)
    first = indptr[:-1][sizes > 0]
    offset = np.zeros(num_users, dtype=np.int64)
    offset[sizes > 0] = csum[first] - gaps[first]
    times = start[user] + csum - offset[user]
    # items get the timestamps in a random order per user (sort by user, then random key)
    bits = 62 - int(num_users).bit_length()
    order = np.argsort(user * (1 << bits) + rng.integers(0, 1 << bits, size=nnz), kind="stable")
    return ClientData(
        indptr=indptr,
        items=items[order],
        ratings=ratings[order],
        timestamps=times,
        user_ids=np.arange(num_users, dtype=np.int64),
        item_ids=np.arange(num_items, dtype=np.int64),
    )
