"""Which column of a ratings table holds users, items, ratings and timestamps.

Tables name their columns in many ways (``user_id``, ``userId``, ``movieId``, ``score``, ...);
:func:`resolve_columns` finds them by common names, in any order, or takes them from an
explicit ``columns`` argument. Shared by the file reader, DataFrames and dicts of arrays.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

__all__ = ["ROLES", "COMMON_NAMES", "resolve_columns", "parse_columns"]

ROLES = ("user", "item", "rating", "timestamp")
REQUIRED = ("user", "item", "rating")

#: Column names recognised for each role, compared without case, spaces, '_' or '-'.
COMMON_NAMES = {
    "user": (
        "user",
        "userid",
        "uid",
        "users",
        "customer",
        "customerid",
        "reviewer",
        "reviewerid",
        "member",
        "memberid",
        "visitor",
        "visitorid",
        "client",
        "clientid",
    ),
    "item": (
        "item",
        "itemid",
        "iid",
        "items",
        "movie",
        "movieid",
        "product",
        "productid",
        "asin",
        "book",
        "bookid",
        "isbn",
        "track",
        "trackid",
        "song",
        "songid",
        "artist",
        "artistid",
        "business",
        "businessid",
        "recipe",
        "recipeid",
        "anime",
        "animeid",
    ),
    "rating": ("rating", "ratings", "score", "stars", "star", "rate", "value", "preference", "overall", "grade"),
    "timestamp": (
        "timestamp",
        "time",
        "ts",
        "date",
        "datetime",
        "unixtime",
        "unixreviewtime",
        "created",
        "createdat",
        "when",
    ),
}
#: How the recognised names are shown in error messages.
EXAMPLES = {
    "user": "user, user_id, userId, uid",
    "item": "item, item_id, itemId, movieId, product_id",
    "rating": "rating, score, stars",
    "timestamp": "timestamp, time, date",
}
_SKIP = {"-", "_", "skip", "none", ""}


def _normalise(name) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


def _role_of(name) -> Optional[str]:
    key = _normalise(name)
    for role, names in COMMON_NAMES.items():
        if key in names or key == role:
            return role
    return None


def find_by_name(names: Sequence) -> dict:
    """Position of the first column of each role that has a common name (roles without one
    are absent)."""
    found: dict = {}
    for i, name in enumerate(names):
        role = _role_of(name)
        if role is not None and role not in found:
            found[role] = i
    return found


def parse_columns(text: str):
    """The ``--columns`` option: ``"item,user,rating"`` (the role of each column in order,
    ``-`` to skip one) or ``"user=uid,item=iid,rating=stars"`` (header names, or 0-based
    positions, for roles)."""
    parts = [p.strip() for p in str(text).split(",")]
    if any("=" in p for p in parts):
        mapping = {}
        for p in parts:
            role, sep, column = p.partition("=")
            if not sep:
                raise ValueError(f"columns: mix of 'role=column' and plain entries in {text!r}")
            column = column.strip()
            mapping[role.strip()] = int(column) if column.isdigit() else column
        return mapping
    return parts


def resolve_columns(names: Optional[Sequence], num_columns: int, columns=None, *, where: str = "the table") -> dict:
    """Column position of each role.

    Parameters
    ----------
    names : sequence of str, or None
        The table's column names (a header), or None for a headerless table.
    num_columns : int
        Number of columns.
    columns : None, str, sequence or mapping
        None: find the roles by common names in ``names`` (a headerless table is read as
        ``user, item, rating[, timestamp]``). A sequence (or comma-separated string) gives the
        role of each column in order (``"-"`` skips a column; common names such as ``userId``
        are understood). A mapping (or ``"role=column,..."``) names the column of each role,
        by header name or 0-based position.
    where : str
        What to call the table in error messages (e.g. its file name).

    Returns
    -------
    dict
        ``{"user": i, "item": j, "rating": k}`` and ``"timestamp"`` when present.

    Raises
    ------
    ValueError
        A required role is missing or given twice, a named column does not exist, or a
        headerless table has more than 4 columns and no ``columns``; the message lists the
        columns and how to say which is which.
    """
    if isinstance(columns, str):
        columns = parse_columns(columns)
    shown = f"columns {list(names)}" if names is not None else f"{num_columns} columns without a header"
    hint = "say which is which with columns (--columns), e.g. 'item,user,rating' or 'user=uid,item=iid,rating=stars'"
    found: dict = {}
    if columns is None:
        if names is None:
            if num_columns > 4:
                raise ValueError(f"{where}: {shown}: which columns hold users, items and ratings? {hint}")
            found = {role: i for i, role in enumerate(ROLES[:num_columns])}
        else:
            found = find_by_name(names)
    elif isinstance(columns, Mapping):
        by_name = {str(n): i for i, n in enumerate(names)} if names is not None else {}
        for role, column in columns.items():
            role = _role_of(role) or role
            if role not in ROLES:
                raise ValueError(f"{where}: unknown role {role!r} in columns; expected {', '.join(ROLES)}")
            if isinstance(column, int) and not isinstance(column, bool):
                if not 0 <= column < num_columns:
                    raise ValueError(f"{where}: column {column} of {role} is out of range ({shown})")
                found[role] = column
            elif str(column) in by_name:
                found[role] = by_name[str(column)]
            else:
                raise ValueError(f"{where}: no column {column!r} for {role} ({shown})")
    else:
        roles = list(columns)
        if len(roles) > num_columns:
            raise ValueError(f"{where}: columns names {len(roles)} columns, the table has {shown}")
        for i, name in enumerate(roles):
            if name is None or str(name).strip().lower() in _SKIP:
                continue
            role = _role_of(name)
            if role is None:
                raise ValueError(
                    f"{where}: unknown role {name!r} in columns; expected {', '.join(ROLES)} "
                    "(or a common name such as userId or movieId), or '-' to skip a column"
                )
            if role in found:
                raise ValueError(f"{where}: columns gives {role} twice")
            found[role] = i
    missing = [r for r in REQUIRED if r not in found]
    if missing:
        known = "; ".join(f"{r}: {EXAMPLES[r]}, ..." for r in missing)
        raise ValueError(f"{where}: no {' or '.join(missing)} column in {shown} (names recognised: {known}); {hint}")
    positions = list(found.values())
    if len(set(positions)) != len(positions):
        raise ValueError(f"{where}: one column is given two roles in columns")
    return found
