"""Shared test helpers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest


def random_client_data(rng: np.random.Generator, num_items: int, sizes,
                       rating_range=(1.0, 5.0)) -> SimpleNamespace:
    """Random CSR ratings with one client per entry of ``sizes`` (its number of ratings).

    The kernels accept any object with ``indptr`` (int64), ``items`` (int32), ``ratings``
    (float32), ``num_clients`` and ``num_items``. Items are drawn with replacement, so a client
    may rate an item twice (always so when ``num_items == 1``); ratings are uniform in
    ``rating_range`` (continuous, so that no error sits on the ``|err| <= 0.5`` accuracy
    threshold by accident).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    indptr = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    nnz = int(indptr[-1])
    return SimpleNamespace(
        indptr=indptr,
        items=rng.integers(0, num_items, size=nnz).astype(np.int32),
        ratings=rng.uniform(*rating_range, size=nnz).astype(np.float32),
        num_clients=len(sizes),
        num_items=num_items,
    )


# Clients with 0, 1, 2 ratings, a few typical ones, and two larger than any batch x step cap
# the tests use.
DEFAULT_SIZES = (0, 1, 2, 3, 5, 8, 13, 40, 0, 21, 1, 57)


@pytest.fixture
def make_client_data():
    """Factory fixture: ``make_client_data(seed, num_items, sizes=DEFAULT_SIZES)``."""

    def make(seed: int, num_items: int, sizes=DEFAULT_SIZES, rating_range=(1.0, 5.0)) -> SimpleNamespace:
        return random_client_data(np.random.default_rng(seed), num_items, sizes, rating_range)

    return make
