"""Ratings grouped by client (user) in CSR form, and the data splits of FedRecon.

The central type is :class:`ClientData`: one CSR row per client (user), with
item ids remapped to ``0..num_items-1`` and the original ids kept.  Every
operation here is vectorised over all ratings and clients (no Python loop over
users or ratings), and every random choice is derived from a seed with the
counter-based streams of :mod:`fedrecon_fast._rng`, so results never depend on
anything but the seed and the data.

Functions
---------
split_users
    Seeded user-level train/validation/test split (ReconEval: test users are
    never seen in training).
split_by_time
    Per-user split of ratings by timestamp (StandardEval baselines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from ._rng import STREAM_DATA, derive_seed_array, generator, mix64_array
from ._validation import check_fractions, check_int

__all__ = ["ClientData", "split_users", "split_by_time"]

_INT64_MAX = np.iinfo(np.int64).max
_INT32_MAX = np.iinfo(np.int32).max
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- helpers


def _as_1d(values, name: str) -> np.ndarray:
    """``np.asarray`` that insists on one dimension."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _integer_1d(values, name: str, dtype=np.int64) -> np.ndarray:
    """Convert ``values`` to a 1-D integer array of ``dtype`` without silent wrap-around.

    Raises TypeError for non-integer data (floats, bools, strings, objects) and
    ValueError when a value does not fit ``dtype``.
    """
    arr = _as_1d(values, name)
    if arr.size == 0 and arr.dtype.kind in "fO":
        # np.asarray([]) is float64: an empty list is an acceptable empty index array.
        return np.zeros(0, dtype=dtype)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must contain integers, got dtype {arr.dtype}")
    info = np.iinfo(dtype)
    if arr.size and arr.dtype != dtype:
        lo, hi = arr.min(), arr.max()
        if int(lo) < info.min or int(hi) > info.max:
            raise ValueError(f"{name} has values outside the range of {np.dtype(dtype)}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _ids_1d(values, name: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Integer ids as int64 (labels None), or string ids as codes into their sorted labels.

    Strings (``str``/``bytes`` arrays, or objects that are all strings) become codes
    ``0..n-1`` in sorted order of the distinct labels, returned with the labels.
    """
    arr = _as_1d(values, name)
    if arr.dtype.kind == "O" and arr.size:
        kinds = {type(v) for v in arr.tolist()}
        if kinds <= {str}:
            arr = arr.astype(str)
        elif kinds <= {int} or all(
            issubclass(k, (int, np.integer)) and not issubclass(k, (bool, np.bool_)) for k in kinds
        ):
            arr = np.array(arr.tolist())
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8", "replace")
    if arr.dtype.kind == "U":
        labels, codes = np.unique(arr, return_inverse=True)
        return codes.reshape(-1).astype(np.int64), labels
    return _integer_1d(arr, name, np.int64), None


def _labels_1d(values, name: str, ids: np.ndarray) -> Optional[np.ndarray]:
    """A table of unique string labels that every id in ``ids`` indexes (None passes)."""
    if values is None:
        return None
    arr = _as_1d(values, name)
    if arr.dtype.kind != "U":
        raise TypeError(f"{name} must hold strings (the original ids), got dtype {arr.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= arr.size):
        raise ValueError(f"{name} has {arr.size} labels; the ids must index it (0..{arr.size - 1})")
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{name} must be unique")
    return arr


def _timestamps_1d(values, name: str) -> np.ndarray:
    """Timestamps as int64: integers as given, ``datetime64`` as seconds since the epoch."""
    arr = _as_1d(values, name)
    if arr.dtype.kind == "M":
        if np.isnat(arr).any():
            raise ValueError(f"{name} contains NaT")
        return np.ascontiguousarray(arr.astype("datetime64[s]").astype(np.int64))
    return _integer_1d(arr, name, np.int64)


def _ratings_1d(values, name: str) -> np.ndarray:
    """Ratings as finite float32 values (ValueError naming ``name`` otherwise)."""
    arr = _as_1d(values, name)
    if arr.size == 0 and arr.dtype.kind == "O":
        return np.zeros(0, dtype=np.float32)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must contain real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"{name} must be finite; entry {bad} is {arr[bad]}")
        if arr.size and arr.dtype.itemsize > 4 and float(np.abs(arr).max()) > _FLOAT32_MAX:
            raise ValueError(f"{name} has values too large for float32")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _readonly(arr: np.ndarray) -> np.ndarray:
    """A read-only view of ``arr`` (the caller's array keeps its own flags)."""
    view = arr.view()
    view.flags.writeable = False
    return view


def _factorize(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids (int64) and the inverse index of each entry.

    Uses an O(n) presence table when the ids are small non-negative integers
    (the common case for recommendation data), ``np.unique`` otherwise.
    """
    if ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi <= 4 * ids.size + (1 << 20):
        present = np.zeros(hi + 1, dtype=bool)
        present[ids] = True
        uniq = np.flatnonzero(present).astype(np.int64)
        lookup = np.cumsum(present, dtype=np.int64) - 1
        return uniq, lookup[ids]
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def _sort_by_group_then_key(group: np.ndarray, key: np.ndarray, n_groups: int) -> np.ndarray:
    """Stable permutation sorting by ``group`` (0..n_groups-1) and then by ``key``.

    Entries with equal ``(group, key)`` keep their input order.
    """
    if key.size == 0:
        return np.zeros(0, dtype=np.int64)
    kmin, kmax = int(key.min()), int(key.max())
    span = kmax - kmin + 1
    if span * max(n_groups, 1) < _INT64_MAX // 2:
        combined = group.astype(np.int64) * span + (key - kmin)
        return np.argsort(combined, kind="stable")
    return np.lexsort((key, group))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each ``(s, n)``, vectorised."""
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - offsets, lengths)


def _indptr_from_sizes(sizes: np.ndarray) -> np.ndarray:
    indptr = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    return indptr


def _floor_count(fraction: float, n):
    """``floor(fraction * n)`` robust to rounding error (0.1 * 6040 -> 604)."""
    return np.floor(fraction * np.asarray(n, dtype=np.float64) + 1e-9).astype(np.int64)


# --------------------------------------------------------------------------- ClientData


@dataclass(frozen=True, eq=False)
class ClientData:
    """Ratings of many clients (users) in CSR form, one row per client.

    Client ``c`` owns the ratings ``indptr[c]:indptr[c + 1]`` of ``items``,
    ``ratings`` and ``timestamps``.  Items are internal indices
    ``0..num_items-1``; ``item_ids`` maps them back to the original ids and
    ``user_ids`` gives the original id of each client.

    Inputs are converted to the exact dtypes below (integers only if every
    value fits) and validated; the stored arrays are read-only views, so a
    ``ClientData`` is immutable.  Operations return new objects.

    Parameters
    ----------
    indptr : array_like of int, shape (num_clients + 1,)
        Row pointers: start at 0, non-decreasing, end at ``nnz``.  Stored as int64.
    items : array_like of int, shape (nnz,)
        Internal item index of each rating, in ``[0, num_items)``.  Stored as int32.
    ratings : array_like of float, shape (nnz,)
        Rating values; must be finite.  Stored as float32.
    timestamps : array_like of int or datetime64, shape (nnz,), optional
        Time of each rating (int64, e.g. Unix seconds; ``datetime64`` is
        converted to seconds).  ``None`` when unknown.
    user_ids : array_like of int, shape (num_clients,), optional
        Original id of each client, unique.  Defaults to ``arange(num_clients)``.
    item_ids : array_like of int, shape (num_items,), optional
        Original id of each internal item index, unique.  Defaults to
        ``arange(max(items) + 1)``.
    user_labels, item_labels : array_like of str, optional
        For data with string ids: the original id of user (item) id ``j`` is
        ``user_labels[j]`` (``item_labels[j]``); the integer ids are then
        codes in sorted order of the labels.  ``None`` for integer ids.

    Raises
    ------
    TypeError
        If an array has the wrong kind of data (e.g. float indices); the
        message names the field.
    ValueError
        If shapes, ranges, ``indptr`` monotonicity, uniqueness of ids or
        finiteness of ratings are violated; the message names the field.

    See Also
    --------
    ClientData.from_coo, ClientData.from_dataframe, ClientData.from_scipy
    """

    indptr: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: Optional[np.ndarray] = None
    # Optional when made; __post_init__ always fills them in.
    user_ids: np.ndarray = None  # type: ignore[assignment]
    item_ids: np.ndarray = None  # type: ignore[assignment]
    user_labels: Optional[np.ndarray] = None
    item_labels: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        indptr = _integer_1d(self.indptr, "indptr", np.int64)
        if indptr.size == 0:
            raise ValueError("indptr must have at least one entry (num_clients + 1)")
        if indptr[0] != 0:
            raise ValueError(f"indptr must start at 0, got {indptr[0]}")
        if indptr.size > 1 and (np.diff(indptr) < 0).any():
            raise ValueError("indptr must be non-decreasing")
        num_clients = indptr.size - 1

        items_raw = _as_1d(self.items, "items")
        nnz = items_raw.size
        if int(indptr[-1]) != nnz:
            raise ValueError(f"indptr[-1] ({indptr[-1]}) must equal the number of ratings ({nnz})")
        items = _integer_1d(items_raw, "items", np.int32)

        if self.item_ids is None:
            n_items = int(items.max()) + 1 if nnz else 0
            if n_items > 4 * nnz + (1 << 20):
                # One stray index must not allocate a catalogue of billions of items.
                raise ValueError(
                    f"items: the largest index {n_items - 1} implies {n_items} items for {nnz} ratings; "
                    "items are indices 0..num_items-1: pass item_ids (one id per index), or build "
                    "with ClientData.from_coo, which remaps any ids"
                )
            item_ids = np.arange(n_items, dtype=np.int64)
        else:
            item_ids = _integer_1d(self.item_ids, "item_ids", np.int64)
            if np.unique(item_ids).size != item_ids.size:
                raise ValueError("item_ids must be unique")
        num_items = item_ids.size
        if num_items > _INT32_MAX:
            raise ValueError(f"item_ids: at most {_INT32_MAX} items are supported")
        if nnz and (int(items.min()) < 0 or int(items.max()) >= num_items):
            raise ValueError(f"items must lie in [0, num_items={num_items})")

        ratings = _ratings_1d(self.ratings, "ratings")
        if ratings.size != nnz:
            raise ValueError(f"ratings has {ratings.size} entries, items has {nnz}")

        timestamps = None
        if self.timestamps is not None:
            timestamps = _timestamps_1d(self.timestamps, "timestamps")
            if timestamps.size != nnz:
                raise ValueError(f"timestamps has {timestamps.size} entries, items has {nnz}")

        if self.user_ids is None:
            user_ids = np.arange(num_clients, dtype=np.int64)
        else:
            user_ids = _integer_1d(self.user_ids, "user_ids", np.int64)
            if user_ids.size != num_clients:
                raise ValueError(f"user_ids has {user_ids.size} entries, indptr describes {num_clients} clients")
            if np.unique(user_ids).size != user_ids.size:
                raise ValueError("user_ids must be unique")

        object.__setattr__(self, "indptr", _readonly(indptr))
        object.__setattr__(self, "items", _readonly(items))
        object.__setattr__(self, "ratings", _readonly(ratings))
        object.__setattr__(self, "timestamps", None if timestamps is None else _readonly(timestamps))
        user_labels = _labels_1d(self.user_labels, "user_labels", user_ids)
        item_labels = _labels_1d(self.item_labels, "item_labels", item_ids)

        object.__setattr__(self, "user_ids", _readonly(user_ids))
        object.__setattr__(self, "item_ids", _readonly(item_ids))
        object.__setattr__(self, "user_labels", None if user_labels is None else _readonly(user_labels))
        object.__setattr__(self, "item_labels", None if item_labels is None else _readonly(item_labels))

    # ------------------------------------------------------------------ properties

    @property
    def num_clients(self) -> int:
        """int: Number of clients (CSR rows)."""
        return int(self.indptr.size - 1)

    @property
    def num_items(self) -> int:
        """int: Number of items in the mapping (``len(item_ids)``), rated or not."""
        return int(self.item_ids.size)

    @property
    def nnz(self) -> int:
        """int: Total number of ratings."""
        return int(self.items.size)

    @property
    def sizes(self) -> np.ndarray:
        """numpy.ndarray of int64, shape (num_clients,): ratings per client."""
        return np.diff(self.indptr)

    def __repr__(self) -> str:
        return (
            f"ClientData(num_clients={self.num_clients}, num_items={self.num_items}, "
            f"nnz={self.nnz}, timestamps={'yes' if self.timestamps is not None else 'no'})"
        )

    def _row_index(self) -> np.ndarray:
        """Client index of every rating, int64 of shape (nnz,)."""
        return np.repeat(np.arange(self.num_clients, dtype=np.int64), self.sizes)

    def _take(self, positions: np.ndarray, indptr: np.ndarray, user_ids: np.ndarray) -> "ClientData":
        """New ClientData from rating positions (already grouped by client) and row pointers."""
        return ClientData(
            indptr=indptr,
            items=self.items[positions],
            ratings=self.ratings[positions],
            timestamps=None if self.timestamps is None else self.timestamps[positions],
            user_ids=user_ids,
            item_ids=self.item_ids,
            user_labels=self.user_labels,
            item_labels=self.item_labels,
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_coo(cls, users, items, ratings, timestamps=None) -> "ClientData":
        """Build from parallel arrays of (user, item, rating[, timestamp]).

        Parameters
        ----------
        users : array_like of int or str, shape (n,)
            Original user id of each rating (any integers, or strings).
        items : array_like of int or str, shape (n,)
            Original item id of each rating (any integers, or strings).
        ratings : array_like of float, shape (n,)
            Rating values, finite.
        timestamps : array_like of int or datetime64, shape (n,), optional
            Time of each rating.

        Returns
        -------
        ClientData
            One client per distinct user, in increasing order of user id;
            items remapped to ``0..I-1`` in increasing order of item id.
            Within a client, ratings are ordered by timestamp (ties keep input
            order) when timestamps are given, else in input order.  Duplicate
            (user, item) pairs are kept as separate ratings.  Empty input
            gives a ClientData with 0 clients and 0 items.  String ids become
            codes in sorted order of the strings, kept as ``user_labels`` /
            ``item_labels``.

        Raises
        ------
        TypeError
            If ids are not integers (e.g. float ids) or ratings are not numbers.
        ValueError
            If lengths differ or a rating is NaN/inf (message names ``ratings``).
        """
        users, user_labels = _ids_1d(users, "users")
        items, item_labels = _ids_1d(items, "items")
        ratings = _ratings_1d(ratings, "ratings")
        n = users.size
        if items.size != n or ratings.size != n:
            raise ValueError(
                f"users, items and ratings must have the same length, got {n}, {items.size} and {ratings.size}"
            )
        if timestamps is not None:
            timestamps = _timestamps_1d(timestamps, "timestamps")
            if timestamps.size != n:
                raise ValueError(f"timestamps has {timestamps.size} entries, expected {n}")

        user_ids, user_index = _factorize(users)
        item_ids, item_index = _factorize(items)
        if timestamps is None:
            order = np.argsort(user_index, kind="stable")
        else:
            order = _sort_by_group_then_key(user_index, timestamps, user_ids.size)
        counts = np.bincount(user_index, minlength=user_ids.size)
        return cls(
            indptr=_indptr_from_sizes(counts),
            items=item_index[order],
            ratings=ratings[order],
            timestamps=None if timestamps is None else timestamps[order],
            user_ids=user_ids,
            item_ids=item_ids,
            user_labels=user_labels,
            item_labels=item_labels,
        )

    @classmethod
    def from_dataframe(
        cls,
        df,
        user_col: Optional[str] = None,
        item_col: Optional[str] = None,
        rating_col: Optional[str] = None,
        timestamp_col: Optional[str] = "auto",
        *,
        columns=None,
    ) -> "ClientData":
        """Build from a pandas DataFrame with one row per rating.

        Parameters
        ----------
        df : pandas.DataFrame
            The ratings.
        user_col, item_col, rating_col : str, optional
            The user id, item id and rating columns. By default they are found by
            common names in any order (``user``, ``userId``, ``user_id``, ``item``,
            ``movieId``, ``item_id``, ``rating``, ``score``, ...; see
            :data:`fedrecon_fast.columns.COMMON_NAMES`). Ids may be integers or strings.
        timestamp_col : str or None, default "auto"
            The integer or datetime timestamp column: ``"auto"`` finds one by common name
            (``timestamp``, ``time``, ``date``, ...) if there is one; ``None`` ignores
            timestamps.
        columns : str, sequence or mapping, optional
            Instead of the ``*_col`` arguments: the roles as
            :func:`fedrecon_fast.columns.resolve_columns` takes them.

        Returns
        -------
        ClientData
            As :meth:`from_coo`.

        Raises
        ------
        ValueError
            If a required column is missing or holds missing values (the
            message names the column), or as :meth:`from_coo`.
        TypeError
            If ``df`` is not a DataFrame, or as :meth:`from_coo`.
        """
        import pandas as pd  # lazy: pandas is optional

        from .columns import EXAMPLES, find_by_name, resolve_columns

        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
        names = [str(c) for c in df.columns]
        explicit = {"user": user_col, "item": item_col, "rating": rating_col}
        if timestamp_col not in (None, "auto"):
            explicit["timestamp"] = timestamp_col
        if columns is None and any(v is not None for v in explicit.values()):
            found = find_by_name(names)
            for role, col in explicit.items():
                if col is None:
                    if role not in found:
                        raise ValueError(
                            f"no {role} column in the DataFrame (columns: {names}; names "
                            f"recognised: {EXAMPLES[role]}, ...): pass {role}_col"
                        )
                    continue
                if str(col) not in names:
                    raise ValueError(f"column {col!r} not found in the DataFrame (columns: {names})")
                found[role] = names.index(str(col))
        else:
            found = resolve_columns(names, len(names), columns, where="the DataFrame")
        if timestamp_col is None:
            found.pop("timestamp", None)
        roles = [r for r in ("user", "item", "rating", "timestamp") if r in found]
        cols = [df.columns[found[r]] for r in roles]
        arrays = []
        for col in cols:
            series = df[col]
            if series.isna().any():
                raise ValueError(f"column {col!r} has missing values")
            if isinstance(series.dtype, pd.DatetimeTZDtype):
                series = series.dt.tz_convert("UTC").dt.tz_localize(None)
            arr = series.to_numpy()
            if arr.dtype.kind == "O" and not isinstance(series.dtype, pd.StringDtype):
                try:
                    arr = series.to_numpy(dtype=series.dtype.numpy_dtype)  # nullable dtypes
                except (AttributeError, TypeError, ValueError):
                    pass  # e.g. string ids: from_coo decides
            elif isinstance(series.dtype, pd.StringDtype):
                arr = series.to_numpy(dtype=str)
            arrays.append(arr)
        plural = {"user": "users", "item": "items", "rating": "ratings", "timestamp": "timestamps"}
        try:
            return cls.from_coo(*arrays)
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            for role, col in zip(roles, cols):
                if msg.startswith(plural[role] + " "):
                    raise type(exc)(f"column {col!r}: {msg}") from None
            raise

    @classmethod
    def from_scipy(cls, matrix) -> "ClientData":
        """Build from a ``scipy.sparse`` users x items matrix or array.

        Parameters
        ----------
        matrix : scipy.sparse matrix or array, shape (num_users, num_items)
            Stored entries are ratings.  Duplicate entries are summed (scipy's
            semantics) and **explicit zeros are dropped**: a stored 0 is not a
            rating.

        Returns
        -------
        ClientData
            One client per row (``user_ids = arange(num_users)``, rows without
            ratings are kept as empty clients) and ``item_ids =
            arange(num_items)`` (every column kept).  Within a client,
            ratings are in increasing column order; no timestamps.

        Raises
        ------
        TypeError
            If ``matrix`` is not a scipy sparse matrix/array or its values are
            not real numbers.
        ValueError
            If a stored value is NaN/inf (message names ``ratings``).
        """
        import scipy.sparse as sp  # lazy: scipy is optional

        if not sp.issparse(matrix):
            raise TypeError(f"matrix must be a scipy.sparse matrix or array, got {type(matrix).__name__}")
        if matrix.ndim != 2:
            raise ValueError(f"matrix must be two-dimensional, got {matrix.ndim} dimensions")
        if matrix.dtype.kind not in "biuf":
            raise TypeError(f"matrix values must be real numbers, got dtype {matrix.dtype}")
        csr = sp.csr_matrix(matrix, copy=True)
        csr.sum_duplicates()  # also sorts the column indices of each row
        csr.eliminate_zeros()
        ratings = csr.data.astype(np.float64) if csr.dtype.kind == "b" else csr.data
        n_rows, n_cols = csr.shape
        return cls(
            indptr=csr.indptr,
            items=csr.indices,
            ratings=ratings,
            timestamps=None,
            user_ids=np.arange(n_rows, dtype=np.int64),
            item_ids=np.arange(n_cols, dtype=np.int64),
        )

    # ------------------------------------------------------------------ operations

    def to_coo(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ratings as COO arrays (internal indices, stored order).

        Returns
        -------
        user_index : numpy.ndarray of int64, shape (nnz,)
            Client index (row) of each rating; ``user_ids[user_index]`` gives
            the original user id.
        items : numpy.ndarray of int32, shape (nnz,)
            Internal item index; ``item_ids[items]`` gives the original id.
        ratings : numpy.ndarray of float32, shape (nnz,)
            Rating values (read-only).
        """
        return self._row_index(), self.items, self.ratings

    def subset(self, clients) -> "ClientData":
        """Keep only the given clients, in the given order.

        Parameters
        ----------
        clients : array_like of int, shape (m,), or array_like of bool, shape (num_clients,)
            Client indices (rows, not user ids), without duplicates; or a
            boolean mask over the clients.

        Returns
        -------
        ClientData
            ``m`` clients with their ratings in stored order and the same item
            mapping (``item_ids`` unchanged).

        Raises
        ------
        ValueError
            If an index is out of range or repeated, or a mask has the wrong length.
        """
        arr = np.asarray(clients)
        if arr.dtype == bool:
            if arr.shape != (self.num_clients,):
                raise ValueError(f"a boolean clients mask must have shape ({self.num_clients},), got {arr.shape}")
            idx = np.flatnonzero(arr).astype(np.int64)
        else:
            idx = _integer_1d(arr, "clients", np.int64)
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.num_clients):
                raise ValueError(f"clients must lie in [0, num_clients={self.num_clients})")
            if idx.size > 1:
                seen = np.zeros(self.num_clients, dtype=bool)
                seen[idx] = True
                if int(seen.sum()) != idx.size:
                    raise ValueError("clients must not contain duplicates")
        sizes = self.indptr[idx + 1] - self.indptr[idx]
        positions = _ranges(self.indptr[idx], sizes)
        return self._take(positions, _indptr_from_sizes(sizes), self.user_ids[idx])

    def prepare(
        self, *, max_examples: Optional[int] = None, min_examples: int = 0, shuffle_seed: Optional[int] = None
    ) -> "ClientData":
        """Cap, filter and shuffle each client's ratings (the paper's preprocessing).

        Parameters
        ----------
        max_examples : int, optional
            Keep at most this many ratings per client: the most recent ones by
            timestamp (ties: later in stored order counts as more recent), or
            the last ones in stored order without timestamps.  Kept ratings
            keep their relative stored order.  ``None``: no cap.
        min_examples : int, default 0
            Drop clients with fewer ratings than this.
        shuffle_seed : int, optional
            If given, put each client's ratings in a seeded random order that
            depends only on ``(shuffle_seed, the client's user id, its stored
            ratings)``, never on other clients, so it is stable under
            :meth:`subset`.  The random key of the rating at position ``p``
            of user ``u`` is ``mix64(derive_seed(shuffle_seed, 0, u,
            STREAM_DATA) ^ p)``.

        Returns
        -------
        ClientData
            The prepared data, same item mapping, surviving clients in their
            original order (``self`` itself when nothing changes: a
            ClientData is immutable).

        Raises
        ------
        ValueError
            If ``max_examples < 1``, ``min_examples < 0`` or ``max_examples <
            min_examples`` (which would drop every client).
        """
        if max_examples is not None:
            max_examples = check_int(max_examples, "max_examples", minimum=1)
        min_examples = check_int(min_examples, "min_examples", minimum=0)
        if max_examples is not None and max_examples < min_examples:
            raise ValueError(f"max_examples ({max_examples}) < min_examples ({min_examples}) would drop every client")
        if shuffle_seed is not None:
            shuffle_seed = check_int(shuffle_seed, "shuffle_seed")

        data = self
        sizes = data.sizes
        # (1) cap: keep the max_examples most recent ratings of each client
        if max_examples is not None and (sizes > max_examples).any():
            row = data._row_index()
            if data.timestamps is None:
                order = np.arange(data.nnz, dtype=np.int64)
            else:
                order = _sort_by_group_then_key(row, data.timestamps, data.num_clients)
            rank = np.empty(data.nnz, dtype=np.int64)  # rank by time within the client
            rank[order] = np.arange(data.nnz, dtype=np.int64) - np.repeat(data.indptr[:-1], sizes)
            keep = rank >= np.repeat(sizes - max_examples, sizes)
            new_sizes = np.minimum(sizes, max_examples)
            data = data._take(np.flatnonzero(keep), _indptr_from_sizes(new_sizes), data.user_ids)
            sizes = new_sizes
        # (2) drop small clients
        if min_examples > 0 and (sizes < min_examples).any():
            data = data.subset(np.flatnonzero(sizes >= min_examples))
            sizes = data.sizes
        # (3) per-user seeded shuffle
        if shuffle_seed is not None and data.nnz:
            row = data._row_index()
            position = np.arange(data.nnz, dtype=np.int64) - np.repeat(data.indptr[:-1], sizes)
            user_seed = derive_seed_array(shuffle_seed, 0, data.user_ids, STREAM_DATA)
            keys = mix64_array(user_seed[row] ^ position.astype(np.uint64))
            order = np.lexsort((keys, row))
            data = data._take(order, data.indptr, data.user_ids)
        return data


# --------------------------------------------------------------------------- splits


def split_users(
    num_clients: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded user-level split of client indices into train / validation / test.

    Parameters
    ----------
    num_clients : int
        Number of clients to split (indices ``0..num_clients-1``).
    fractions : sequence of 3 floats, default (0.8, 0.1, 0.1)
        Non-negative, summing to 1 (within 1e-6).  ``n_train =
        floor(f0 * n)``, ``n_val = floor(f1 * n)``, test gets the rest (6040
        users -> 4832 / 604 / 604).
    seed : int, default 0
        The permutation comes from ``generator(seed, 0, 0, STREAM_DATA)``.

    Returns
    -------
    train, val, test : numpy.ndarray of int64
        Sorted, disjoint client indices covering ``0..num_clients-1``.

    Raises
    ------
    ValueError
        If ``num_clients < 0`` or the fractions are invalid.
    """
    n = check_int(num_clients, "num_clients", minimum=0)
    f_train, f_val, _ = check_fractions(fractions, "fractions")
    seed = check_int(seed, "seed")
    n_train = int(_floor_count(f_train, n))
    n_val = min(int(_floor_count(f_val, n)), n - n_train)
    perm = generator(seed, 0, 0, STREAM_DATA).permutation(n).astype(np.int64)
    train = np.sort(perm[:n_train])
    val = np.sort(perm[n_train : n_train + n_val])
    test = np.sort(perm[n_train + n_val :])
    return train, val, test


def split_by_time(
    data: ClientData, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> Tuple[ClientData, ClientData, ClientData]:
    """Per-client split of ratings by time (StandardEval).

    Parameters
    ----------
    data : ClientData
        Must have timestamps.
    fractions : sequence of 3 floats, default (0.8, 0.1, 0.1)
        For a client with ``n`` ratings sorted by timestamp (stable), the
        first ``floor(f0 * n)`` go to train, the next ``floor(f1 * n)`` to
        validation and the rest to test.

    Returns
    -------
    train, val, test : ClientData
        Same clients (possibly with 0 ratings), same ``user_ids`` and item
        mapping; within each, ratings are in timestamp order.

    Raises
    ------
    ValueError
        If ``data`` has no timestamps or the fractions are invalid.
    """
    if not isinstance(data, ClientData):
        raise TypeError(f"data must be a ClientData, got {type(data).__name__}")
    if data.timestamps is None:
        raise ValueError("split_by_time needs timestamps; data.timestamps is None")
    f_train, f_val, _ = check_fractions(fractions, "fractions")
    sizes = data.sizes
    row = data._row_index()
    order = _sort_by_group_then_key(row, data.timestamps, data.num_clients)
    rank = np.arange(data.nnz, dtype=np.int64) - np.repeat(data.indptr[:-1], sizes)
    n_train = _floor_count(f_train, sizes)
    n_val = np.minimum(_floor_count(f_val, sizes), sizes - n_train)
    part = (rank >= np.repeat(n_train, sizes)).astype(np.int8) + (rank >= np.repeat(n_train + n_val, sizes)).astype(
        np.int8
    )  # 0/1/2 in time order
    out = []
    for k, part_sizes in enumerate((n_train, n_val, sizes - n_train - n_val)):
        positions = order[part == k]  # grouped by client, in time order
        out.append(data._take(positions, _indptr_from_sizes(part_sizes), data.user_ids))
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------- preparation settings


@dataclass(frozen=True)
class DataConfig:
    """How a ratings table becomes FedRecon's clients (the preparation of
    :meth:`ClientData.prepare` and the user split of :func:`split_users`).

    :func:`fedrecon_fast.split_ratings` applies it; a :class:`~fedrecon_fast.FedReconConfig`
    carries one (``config.data``, from its ``max_examples``, ``min_examples`` and
    ``user_split``) so that a preset names its data recipe too.

    Parameters
    ----------
    max_examples : int, optional
        Keep at most this many ratings per user (the most recent); None: no cap.
    min_examples : int
        Drop users with fewer ratings (the default 1 drops users without ratings).
    user_split : sequence of 3 floats
        Train/validation/test fractions of users.
    """

    max_examples: Optional[int] = None
    min_examples: int = 1
    user_split: Tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "max_examples",
            check_int(self.max_examples, "max_examples", minimum=1, maximum=_INT64_MAX, allow_none=True),
        )
        object.__setattr__(
            self, "min_examples", check_int(self.min_examples, "min_examples", minimum=0, maximum=_INT64_MAX)
        )
        if self.max_examples is not None and self.max_examples < self.min_examples:
            raise ValueError(
                f"max_examples ({self.max_examples}) < min_examples ({self.min_examples}) would drop every client"
            )
        object.__setattr__(self, "user_split", check_fractions(self.user_split, "user_split"))

    def prepare(self, data: ClientData, seed: int) -> ClientData:
        """``data`` capped, filtered and shuffled per user with ``seed`` (:meth:`ClientData.prepare`)."""
        return data.prepare(max_examples=self.max_examples, min_examples=self.min_examples, shuffle_seed=seed)

    def split(self, data: ClientData, seed: int) -> Tuple[ClientData, ClientData, ClientData]:
        """The train, validation and test users of prepared ``data`` (:func:`split_users`)."""
        train, val, test = split_users(data.num_clients, self.user_split, seed=seed)
        return data.subset(train), data.subset(val), data.subset(test)
