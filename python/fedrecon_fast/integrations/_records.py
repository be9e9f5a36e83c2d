"""Typed reads of Flower's records: a message's values are unions of every type a record can
hold; each read here says what it expects and names the key when the message disagrees."""

from __future__ import annotations

from typing import Any

import numpy as np


def text(record: Any, key: str) -> str:
    """``record[key]`` as a string."""
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(f"message field {key!r} must be a string; got {type(value).__name__}")
    return value


def integer(record: Any, key: str) -> int:
    """``record[key]`` as an integer (Flower may carry it as a float)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise TypeError(f"message field {key!r} must be an integer; got {value!r}")
    return int(value)


def number(record: Any, key: str) -> float:
    """``record[key]`` as a float."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"message field {key!r} must be a number; got {value!r}")
    return float(value)


def array(record: Any, key: str) -> np.ndarray:
    """The array ``record[key]`` of an ArrayRecord."""
    return record[key].numpy()


def optional_array(record: Any, key: str) -> np.ndarray | None:
    """The array ``record[key]``, or None when the record has no such key."""
    return record[key].numpy() if key in record else None
