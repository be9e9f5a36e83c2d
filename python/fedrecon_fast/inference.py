"""Inference for new users: reconstruct ``u`` from a user's ratings, predict, recommend top k.

A user the model never saw is served exactly as FedRecon serves its clients: its embedding is
reconstructed on the device from its own ratings with ``V`` frozen. For inference there is no
support/query split: every rating the user gave is used. Everything here is batched: one
native call per batch of users, parallel across users with the GIL released.

The ratings of the users to serve may be given as

- a :class:`~fedrecon_fast.data.ClientData` (one user per client, in its order);
- a pandas DataFrame with ``user_id``, ``item_id`` and ``rating`` columns (optional
  ``timestamp``), read by :meth:`ClientData.from_dataframe`: one user per distinct
  ``user_id``, in increasing order;
- a scipy.sparse users x items matrix whose **column j is the item with original id j** (as
  :meth:`ClientData.from_scipy` reads it): one user per row, in order, rows without ratings
  included; stored zeros are not ratings;
- for one user: ``(items, ratings)``, two array-likes of original item ids and ratings, or a
  dict ``{item id: rating}``. Single-user forms give results without the user axis.

Item ids are the original ids (``model.item_ids``). Ids the model does not know raise a
``ValueError`` naming them, or with ``ignore_unknown=True`` their ratings are dropped (and their
predictions are NaN). A user left without known ratings is served from the initial ``u`` of
the reconstruction schedule (zeros or a small random vector): with biases that ranks items by
their biases, without biases the ranking carries no information.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from . import kernels
from ._validation import as_float32_matrix, check_int
from .config import ClientConfig
from .data import ClientData, _integer_1d, _ratings_1d

__all__ = ["INFERENCE_ROUND", "reconstruct", "predict", "recommend", "item_rows"]

# Inference draws its random streams (initial u, reshuffled batch order) from a round number
# that training (0, 1, ...) and ReconEval (2**64 - 1) never use, and from client 0 for every
# user, so a user's result depends only on its ratings, the model, the config and the seed.
INFERENCE_ROUND = 2**64 - 2

_SHOWN_UNKNOWN = 10


@dataclass(frozen=True)
class _Batch:
    """CSR ratings over the model's rows: what the native kernels read."""

    indptr: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    num_items: int
    single: bool

    @property
    def num_clients(self) -> int:
        return len(self.indptr) - 1


def _unknown_error(name: str, ids: np.ndarray) -> ValueError:
    ids = np.unique(ids)
    shown = ", ".join(str(int(i)) for i in ids[:_SHOWN_UNKNOWN])
    more = f", ... ({len(ids)} in all)" if len(ids) > _SHOWN_UNKNOWN else ""
    return ValueError(
        f"{name} has item ids unknown to the model: {shown}{more} (pass ignore_unknown=True to drop them)"
    )


def item_rows(model, ids, *, ignore_unknown: bool = False, name: str = "items") -> np.ndarray:
    """Rows of ``model.item_factors`` of original item ids (int64, any shape).

    Unknown ids raise a ``ValueError`` naming them, or map to -1 with ``ignore_unknown``.
    """
    ids = np.asarray(ids)
    if ids.size and ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer item ids; got dtype {ids.dtype}")
    flat = ids.reshape(-1)
    known = model.item_ids
    if known.size > 1 and np.all(known[1:] > known[:-1]):
        order, sorted_ids = None, known  # sorted ids (the usual case): no argsort per call
    else:
        order = np.argsort(known, kind="stable")
        sorted_ids = known[order]
    if flat.dtype.kind == "u" and flat.size and int(flat.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has item ids beyond the int64 range")
    flat = flat.astype(np.int64, copy=False)
    if sorted_ids.size == 0:
        found, rows = np.zeros(flat.shape, dtype=bool), np.full(flat.shape, -1, dtype=np.int64)
    else:
        pos = np.minimum(np.searchsorted(sorted_ids, flat), sorted_ids.size - 1)
        found = sorted_ids[pos] == flat
        rows = np.where(found, pos if order is None else order[pos], -1).astype(np.int64)
    if not ignore_unknown and not found.all():
        raise _unknown_error(name, flat[~found])
    return rows.reshape(ids.shape)


def _from_client_data(model, data: ClientData, ignore_unknown: bool, name: str) -> _Batch:
    if data.item_ids.shape == model.item_ids.shape and np.array_equal(data.item_ids, model.item_ids):
        return _Batch(data.indptr, data.items, data.ratings, model.num_items, False)
    # Map the data's item indexing onto the model's; only ids that are rated matter.
    mapping = item_rows(model, data.item_ids, ignore_unknown=True)
    rows = mapping[data.items]
    unknown = rows < 0
    if not unknown.any():
        return _Batch(data.indptr, rows.astype(np.int32), data.ratings, model.num_items, False)
    if not ignore_unknown:
        raise _unknown_error(name, data.item_ids[data.items[unknown]])
    keep = ~unknown
    user = np.repeat(np.arange(data.num_clients, dtype=np.int64), data.sizes)
    indptr = np.zeros(data.num_clients + 1, dtype=np.int64)
    np.cumsum(np.bincount(user[keep], minlength=data.num_clients), out=indptr[1:])
    return _Batch(
        indptr,
        np.ascontiguousarray(rows[keep], dtype=np.int32),
        np.ascontiguousarray(data.ratings[keep]),
        model.num_items,
        False,
    )


def _one_user(model, items, ratings, ignore_unknown: bool) -> _Batch:
    items = _integer_1d(items, "items", np.int64)
    ratings = _ratings_1d(ratings, "ratings")
    if items.size != ratings.size:
        raise ValueError(f"items and ratings must have the same length; got {items.size} and {ratings.size}")
    rows = item_rows(model, items, ignore_unknown=ignore_unknown)
    keep = rows >= 0
    rows, ratings = rows[keep], ratings[keep]
    return _Batch(
        np.array([0, rows.size], dtype=np.int64),
        rows.astype(np.int32),
        np.ascontiguousarray(ratings),
        model.num_items,
        True,
    )


def user_ratings(model, data, ratings=None, *, ignore_unknown: bool = False) -> _Batch:
    """The ratings of the users to serve, in any accepted form (module docstring), as CSR over
    the model's rows."""
    if not isinstance(ignore_unknown, (bool, np.bool_)):
        raise TypeError(f"ignore_unknown must be a bool; got {ignore_unknown!r}")
    pd = sys.modules.get("pandas")
    sparse = sys.modules.get("scipy.sparse")
    many = (
        isinstance(data, ClientData)
        or (pd is not None and isinstance(data, pd.DataFrame))
        or (sparse is not None and sparse.issparse(data))
    )
    if many or isinstance(data, dict):
        if ratings is not None:
            raise TypeError(
                "ratings is only for the single-user form (items, ratings); "
                f"it must be None when data is a {type(data).__name__}"
            )
    if isinstance(data, ClientData):
        return _from_client_data(model, data, ignore_unknown, "data")
    if pd is not None and isinstance(data, pd.DataFrame):
        return _from_client_data(model, ClientData.from_dataframe(data), ignore_unknown, "column 'item_id'")
    if sparse is not None and sparse.issparse(data):
        return _from_client_data(model, ClientData.from_scipy(data), ignore_unknown, "data (columns)")
    if isinstance(data, dict):
        return _one_user(model, list(data.keys()), list(data.values()), ignore_unknown)
    if ratings is None:
        raise TypeError(
            "ratings is required when data is an array of item ids (one user); "
            "for many users pass a ClientData, a DataFrame or a scipy.sparse matrix"
        )
    return _one_user(model, data, ratings, ignore_unknown)


def _settings(model, config, seed) -> tuple[ClientConfig, int]:
    if config is None:
        config = model.config.evaluation if model.config is not None else ClientConfig()
    if not isinstance(config, ClientConfig):
        raise TypeError(f"config must be a ClientConfig; got {type(config).__name__}")
    if seed is None:
        seed = model.config.seed if model.config is not None else 0
    check_int(seed, "seed", minimum=0)
    return config, seed


def reconstruct(
    model,
    data,
    ratings=None,
    *,
    ignore_unknown: bool = False,
    config: ClientConfig | None = None,
    seed: int | None = None,
    num_threads: int = 0,
):
    """Reconstruct the embedding ``u`` (and ``b_u``) of each user from all of its ratings.

    Returns ``(users, user_bias)``: float32 arrays of shape (m, dim) and (m,) (``user_bias`` is
    None for a model without biases); for a single-user form, shapes (dim,) and a float32
    scalar. ``config`` defaults to the model's evaluation config (its reconstruction schedule;
    its split is ignored) and ``seed`` to the model's training seed.
    """
    batch = user_ratings(model, data, ratings, ignore_unknown=ignore_unknown)
    config, seed = _settings(model, config, seed)
    users, user_bias = kernels.infer_users(
        model.item_factors,
        batch,
        None,
        config,
        item_bias=model.item_bias,
        global_mean=model.global_mean,
        seed=seed,
        round=INFERENCE_ROUND,
        num_threads=num_threads,
        check_finite=False,
        **model.default_kwargs(),
    )
    if batch.single:
        return users[0], None if user_bias is None else user_bias[0]
    return users, user_bias


def predict(model, users, items, user_bias=None, *, ignore_unknown: bool = False) -> np.ndarray:
    """Predicted ratings ``u . v_i + global_mean (+ b_u + b_i)``, float32, vectorised.

    Parameters
    ----------
    users : array_like, shape (dim,) or (m, dim)
        Embeddings from :func:`reconstruct`.
    items : array_like of int, shape (n,) or (m, n)
        Original item ids: one list for every user, or one row per user.
    user_bias : float or array_like, shape (m,)
        The users' biases from :func:`reconstruct`; required exactly when the model has biases.
    ignore_unknown : bool
        Unknown item ids give NaN instead of a ``ValueError``.

    Returns
    -------
    ndarray, float32
        Shape (n,) for one user and a 1-D ``items``, else (m, n).
    """
    u = np.asarray(users)
    single = u.ndim == 1
    U = as_float32_matrix(u.reshape(1, -1) if single else u, "users", cols=model.dim)
    ids = np.asarray(items)
    if ids.ndim not in (1, 2) or (ids.ndim == 2 and (single or ids.shape[0] != U.shape[0])):
        raise ValueError(f"items must have shape (n,) or (number of users, n) = ({U.shape[0]}, n); got {ids.shape}")
    biased = model.item_bias is not None
    if biased != (user_bias is not None):
        raise ValueError(
            "user_bias is required for a model with biases (from reconstruct) and must be None for a model without"
        )
    if biased:
        bu = np.asarray(user_bias)
        bu = as_float32_matrix(bu.reshape(-1, 1), "user_bias")[:, 0]
        if bu.size != U.shape[0]:
            raise ValueError(f"user_bias must have one value per user ({U.shape[0]}); got {bu.size}")
    rows = item_rows(model, ids, ignore_unknown=ignore_unknown)
    known = rows >= 0
    safe = np.where(known, rows, 0)
    V = model.item_factors
    if ids.ndim == 1:
        out = U @ V[safe].T
    else:
        out = np.einsum("mk,mnk->mn", U, V[safe])
    out += np.float32(model.global_mean)
    if biased:
        out += bu[:, None] + model.item_bias[safe]
    out = np.where(known, out, np.float32(np.nan)).astype(np.float32, copy=False)
    return out[0] if single else out


def recommend(
    model,
    data,
    ratings=None,
    *,
    k: int = 10,
    exclude_seen: bool = True,
    ignore_unknown: bool = False,
    config: ClientConfig | None = None,
    seed: int | None = None,
    num_threads: int = 0,
):
    """Top-k items for each user: ``(items, scores)`` with original item ids.

    Each user's ``u`` is reconstructed from all of its ratings (:func:`reconstruct`), every
    item is scored by its predicted rating, and the ``k`` best are returned, best first, ties
    broken by the lower row of ``model.item_factors``. With ``exclude_seen`` the items the user
    rated are not recommended. Arrays have shape (m, k) (or (k,) for a single-user form):
    ``items`` int64, ``scores`` float32. When a user has fewer than ``k`` candidates the
    remaining slots hold item ``-1`` and score ``NaN`` (test the score: -1 may be a real id).
    ``k`` is capped at the catalogue size: no user has more candidates than the model has items.
    """
    check_int(k, "k", minimum=1, maximum=2**63 - 1)
    k = min(k, max(model.num_items, 1))
    batch = user_ratings(model, data, ratings, ignore_unknown=ignore_unknown)
    config, seed = _settings(model, config, seed)
    rows, scores = kernels.recommend_users(
        model.item_factors,
        batch,
        None,
        config,
        k=k,
        exclude_seen=exclude_seen,
        item_bias=model.item_bias,
        global_mean=model.global_mean,
        seed=seed,
        round=INFERENCE_ROUND,
        num_threads=num_threads,
        check_finite=False,
        **model.default_kwargs(),
    )
    items = np.where(rows >= 0, model.item_ids[np.maximum(rows, 0)], -1) if model.num_items else rows
    if batch.single:
        return items[0], scores[0]
    return items, scores
