"""Shared test helpers (import them with ``from conftest import ...``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

# Clients with 0, 1, 2 ratings, a few typical ones, and two (40, 57) with more ratings than
# batch_size x step caps the tests use.
CLIENT_SIZES = (0, 1, 2, 3, 5, 8, 13, 40, 0, 21, 1, 57)


def random_client_data(
    rng: np.random.Generator, num_items: int, sizes=CLIENT_SIZES, rating_range=(1.0, 5.0)
) -> SimpleNamespace:
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


def csr(indptr, items, ratings, num_items: int) -> SimpleNamespace:
    """Client data from explicit CSR lists (for hand-made cases)."""
    return SimpleNamespace(
        indptr=np.asarray(indptr, dtype=np.int64),
        items=np.asarray(items, dtype=np.int32),
        ratings=np.asarray(ratings, dtype=np.float32),
        num_clients=len(indptr) - 1,
        num_items=num_items,
    )
