"""Ratings from any file or table: :func:`load_ratings`.

Files
    CSV, TSV, ``::``, ``;``, ``|`` or whitespace separated text, with a header or without,
    in any column order, plus parquet files when pyarrow (and pandas) are installed. The rules:

    - The separator is ``sep``; or ``::`` when the first line holds it; or, of tab, ``,``,
      ``;``, ``|`` in the first line, the first that every sampled line holds equally often,
      else the first of them; else runs of spaces and tabs.
    - The first non-blank line is a header when none of its fields is a number.
    - Columns are found by common names in the header (``user``, ``userId``, ``user_id``,
      ``item``, ``movieId``, ``item_id``, ``rating``, ``score``, ``timestamp``, ``time``, ...;
      :data:`fedrecon_fast.columns.COMMON_NAMES`) or given by ``columns``; a headerless file
      is read as ``user, item, rating[, timestamp]`` (3 or 4 columns).
    - Every non-blank line has as many fields as the first one.
    - User and item ids are non-negative integers when the first data line's are, and then
      every one must be; otherwise they are strings (string ids). Ratings are finite
      numbers. Timestamps are integers (Unix seconds) or, when the first one is not, ISO 8601
      dates.
    - A headerless file whose columns look swapped (far more "users" than "items", or every
      "item" rated often while some "user" has one rating: MovieLens-like data is the other
      way round) is read as asked, with a warning.

    MovieLens folders and files work too: ``u.data`` (100K), ``ratings.dat`` (1M, 10M),
    ``ratings.csv`` (20M, 25M, latest), found in that order; a file with one of these names is
    read in its documented layout (:func:`fedrecon_fast.load_movielens`) unless ``columns`` or
    ``sep`` say otherwise.

Tables
    pandas DataFrames (columns by the same names), scipy.sparse users x items matrices,
    dicts of arrays (keys by the same names), ``(users, items, ratings[, timestamps])`` tuples
    and :class:`~fedrecon_fast.ClientData`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from .columns import ROLES, resolve_columns
from .data import ClientData
from .movielens import RATINGS_FILES, load_movielens
from .textparse import RATING_RE, UINT_RE, line_error, parse_table, split_fields

__all__ = ["load_ratings", "read_ratings_file", "SwappedColumnsWarning", "SEPARATORS"]

#: Separators the sniffer tries after ``::``, in this order (``--sep`` accepts any string).
SEPARATORS = ("\t", ",", ";", "|")
_SEP_NAMES = {
    "tab": "\t",
    "\\t": "\t",
    "comma": ",",
    "semicolon": ";",
    "pipe": "|",
    "space": None,
    "spaces": None,
    "whitespace": None,
    " ": None,
}
_SAMPLE_BYTES = 1 << 16
_SAMPLE_LINES = 50
_FIELD_NAMES = {"user": "user id", "item": "item id", "rating": "rating", "timestamp": "timestamp"}


class SwappedColumnsWarning(UserWarning):
    """A headerless ratings file whose user and item columns look swapped."""


def load_ratings(source, *, columns=None, sep: Optional[str] = None) -> ClientData:
    """Ratings from a file, a folder or a table, as :class:`~fedrecon_fast.ClientData`.

    Parameters
    ----------
    source : path, pandas.DataFrame, scipy.sparse matrix, dict, tuple or ClientData
        A ratings file (text or ``.parquet``), a MovieLens folder, a DataFrame or dict of
        columns, a users x items sparse matrix (column ``j`` is item ``j``), or
        ``(users, items, ratings[, timestamps])`` arrays.
    columns : str, sequence or mapping, optional
        Which column is which, when the names do not say it (files, DataFrames, dicts):
        ``"item,user,rating"`` (roles in column order, ``-`` skips one) or
        ``{"user": "uid", "item": "iid", "rating": "stars"}`` (see
        :func:`fedrecon_fast.columns.resolve_columns`).
    sep : str, optional
        Field separator of a text file (``","``, ``"\\t"`` or ``"tab"``, ``";"``, ``"::"``,
        ``"whitespace"``, ...); sniffed by default.

    Returns
    -------
    ClientData
        One client per user (string ids become codes, kept as ``user_labels`` /
        ``item_labels``), ratings in timestamp order when there are timestamps.

    Raises
    ------
    FileNotFoundError
        A path that does not exist, or a folder without a known ratings file.
    ValueError
        Malformed content (file and line named), unknown or ambiguous columns.
    TypeError
        A source of another type.
    ImportError
        A parquet file without pyarrow and pandas installed.
    """
    if isinstance(source, ClientData):
        if columns is not None or sep is not None:
            raise TypeError("columns and sep do not apply to a ClientData")
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_ratings_file(source, columns=columns, sep=sep)
    if sep is not None:
        raise TypeError(f"sep applies to text files only, not to a {type(source).__name__}")
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(source, pd.DataFrame):
        return ClientData.from_dataframe(source, columns=columns)
    sparse = sys.modules.get("scipy.sparse")
    if sparse is not None and sparse.issparse(source):
        if columns is not None:
            raise TypeError("columns does not apply to a sparse matrix (rows are users, columns items)")
        return ClientData.from_scipy(source)
    if isinstance(source, Mapping):
        names = [str(k) for k in source]
        found = resolve_columns(names, len(names), columns, where="the dict")
        values = list(source.values())
        return ClientData.from_coo(*(values[found[r]] for r in ROLES if r in found))
    if isinstance(source, tuple) and len(source) in (3, 4):
        if columns is not None:
            raise TypeError("columns does not apply to a (users, items, ratings[, timestamps]) tuple")
        return ClientData.from_coo(*source)
    raise TypeError(
        f"cannot read ratings from a {type(source).__name__}: expected a path, a pandas DataFrame, "
        "a scipy.sparse matrix, a dict of columns, a (users, items, ratings[, timestamps]) tuple "
        "or a ClientData"
    )


def read_ratings_file(path: Union[str, os.PathLike], *, columns=None, sep: Optional[str] = None) -> ClientData:
    """:func:`load_ratings` for a path: a ratings file (text or parquet) or a MovieLens folder."""
    p = Path(path)
    if p.is_dir():
        found = [p / name for name in RATINGS_FILES if (p / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no ratings file in folder {str(p)!r}: expected one of {', '.join(RATINGS_FILES)} "
                "(or pass the file itself)"
            )
        p = found[0]
    elif not p.exists():
        raise FileNotFoundError(f"ratings path {str(p)!r} does not exist")
    elif not p.is_file():
        raise ValueError(f"{str(p)!r} is not a regular file")
    if p.suffix.lower() == ".parquet":
        if sep is not None:
            raise TypeError("sep does not apply to a parquet file")
        return _read_parquet(p, columns)
    if p.name in RATINGS_FILES and columns is None and sep is None:
        return load_movielens(p)  # a MovieLens file by name: its documented layout, strictly
    return _read_text(p, columns, _separator(sep))


def _read_parquet(path: Path, columns) -> ClientData:
    missing = [m for m in ("pandas", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{path}: reading parquet needs pandas and pyarrow (missing: {', '.join(missing)}); "
            "pip install pandas pyarrow"
        )
    import pandas as pd

    return ClientData.from_dataframe(pd.read_parquet(path, engine="pyarrow"), columns=columns)


def _separator(sep: Optional[str]):
    """The ``sep`` argument as bytes (None: whitespace), or the sniffing marker ``...``."""
    if sep is None:
        return ...
    if not isinstance(sep, str):
        raise TypeError(f"sep must be a string such as ',' or 'tab'; got {sep!r}")
    sep = _SEP_NAMES.get(sep if sep.isspace() else sep.lower(), sep)
    if sep is None:
        return None
    if sep == "" or "\n" in sep or "\r" in sep:
        raise ValueError(f"sep must be a non-empty separator without line breaks; got {sep!r}")
    return sep.encode()


def _sample_lines(path: Path) -> list:
    with open(path, "rb") as fh:
        head = fh.read(_SAMPLE_BYTES)
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    lines = head.split(b"\n")
    if len(head) == _SAMPLE_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last one may be cut
    return [(i + 1, line.rstrip(b"\r")) for i, line in enumerate(lines) if line.strip()][:_SAMPLE_LINES]


def _sniff(path: Path, sample: list) -> Optional[bytes]:
    first = sample[0][1]
    if b"::" in first:
        return b"::"
    present = [c.encode() for c in SEPARATORS if c.encode() in first]
    for c in present:  # the one every sampled line holds equally often
        if len({line.count(c) for _, line in sample}) == 1:
            return c
    if present:  # malformed lines then get errors naming them
        return present[0]
    if len(split_fields(first, None)) >= 3:
        return None
    raise ValueError(
        f"{str(path)!r}: cannot tell the field separator from its first lines; pass sep "
        "(--sep), e.g. ',', 'tab', ';', '::' or 'whitespace'"
    )


def _is_number(field: bytes) -> bool:
    return RATING_RE.fullmatch(field) is not None


def _read_text(path: Path, columns, sep) -> ClientData:
    sample = _sample_lines(path)
    if not sample:
        raise ValueError(f"{str(path)!r}: no ratings (the file is empty)")
    if sep is ...:
        sep = _sniff(path, sample)
    first_no, first = sample[0]
    head = [f.strip(b" ") for f in split_fields(first, sep)]
    if b'"' in first or any(b'"' in line for _, line in sample[1:]):
        raise ValueError(
            f"{str(path)!r}: quoted fields are not supported in ratings files; "
            "read it with pandas and pass the DataFrame"
        )
    has_header = not any(_is_number(f) for f in head)
    names = [f.decode("utf-8", "replace") for f in head] if has_header else None
    roles = resolve_columns(names, len(head), columns, where=repr(str(path)))
    data_lines = sample[1:] if has_header else sample
    if not data_lines:
        raise ValueError(f"{str(path)!r}: no ratings after the header")
    line_no, line = data_lines[0]
    fields = split_fields(line, sep)
    if len(fields) != len(head):
        raise line_error(path, line_no, f"expected {len(head)} fields like the first line, found {len(fields)}", line)
    kinds: list = [None] * len(head)
    labels = [""] * len(head)
    for role, f in roles.items():
        labels[f] = _FIELD_NAMES[role]
        if role == "rating":
            kinds[f] = "real"
        elif role == "timestamp":
            kinds[f] = "uint" if UINT_RE.fullmatch(fields[f].strip(b" ")) else "date"
        else:
            kinds[f] = "uint" if UINT_RE.fullmatch(fields[f].strip(b" ")) else "str"
    parsed = parse_table(path, sep, kinds, labels, skip_lines=first_no if has_header else 0, strip_spaces=True)
    values = {role: parsed[f] for role, f in roles.items()}
    ids, id_labels = {}, {}
    for role in ("user", "item"):
        if kinds[roles[role]] == "str":
            ids[role], id_labels[role] = values[role]
        else:
            ids[role], id_labels[role] = values[role], None
    if names is None and columns is None:
        _warn_if_swapped(path, ids["user"], ids["item"], len(head))
    data = ClientData.from_coo(ids["user"], ids["item"], values["rating"], values.get("timestamp"))
    if id_labels["user"] is None and id_labels["item"] is None:
        return data
    return ClientData(
        data.indptr,
        data.items,
        data.ratings,
        data.timestamps,
        data.user_ids,
        data.item_ids,
        user_labels=id_labels["user"],
        item_labels=id_labels["item"],
    )


def _warn_if_swapped(path: Path, users: np.ndarray, items: np.ndarray, num_columns: int) -> None:
    """Warn when a headerless file's user and item columns look swapped.

    In MovieLens-like data every user has rated several items while many items have few
    ratings, and there are not far more users than items. Data read the other way round shows
    far more "users" than "items", or every "item" rated often while some "user" rated once.
    """
    if users.size == 0:
        return
    per_user = np.bincount(np.unique(users, return_inverse=True)[1].reshape(-1))
    per_item = np.bincount(np.unique(items, return_inverse=True)[1].reshape(-1))
    far_more_users = per_user.size > 5 * per_item.size
    inverted_counts = per_item.min() >= 10 and per_user.min() == 1
    if far_more_users or inverted_counts:
        layout = "user,item,rating" + (",timestamp" if num_columns == 4 else "")
        why = (
            f"{per_user.size} users but only {per_item.size} items"
            if far_more_users
            else f"every item has at least {per_item.min()} ratings while some users have only 1"
        )
        swapped = "item,user,rating" + (",timestamp" if num_columns == 4 else "")
        warnings.warn(
            f"{path}: this headerless file was read as {layout}, but its columns look swapped ({why}); "
            f"if they are {swapped}, pass columns='{swapped}' (--columns {swapped})",
            SwappedColumnsWarning,
            stacklevel=5,
        )
