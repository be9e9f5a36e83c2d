"""Vectorised parsing of delimited text tables (ratings files) with NumPy, block by block.

A file is read in blocks of bounded size; each block of whole lines is parsed with array
operations over its bytes (no Python per line, no pandas). Every non-blank line must have the
same number of fields, separated by one separator (a byte string such as ``b","`` or
``b"::"``, or ``None`` for runs of spaces and tabs). Each wanted field is parsed as one of:

``"uint"``  a plain non-negative decimal integer of at most 18 digits (int64);
``"real"``  a finite decimal number such as ``4``, ``3.5`` or ``1e0`` (float64);
``"str"``   any non-empty text without NUL bytes (a string id), returned as int64 codes into
            its sorted distinct values;
``"date"``  an ISO 8601 date or date-time (``2000-12-31``, ``2000-12-31T22:00:19``, ...),
            returned as int64 seconds since the epoch (UTC).

Malformed content raises ValueError naming the file, the 1-based line and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["parse_table", "line_error", "RATING_RE", "UINT_RE"]

BLOCK_BYTES = 1 << 26  # 64 MiB of text per parsing block bounds the temporaries
_MAX_INT_DIGITS = 18  # every 18-digit decimal fits int64
_MAX_TOKEN_CHARS = 256
RATING_RE = re.compile(rb"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
UINT_RE = re.compile(rb"\d{1,%d}" % _MAX_INT_DIGITS)
_WHITESPACE = re.compile(rb"[ \t]+")
_EDGE_SPACE = re.compile(rb"(?m)^ | $")
_EDGE_SPACES = re.compile(rb"(?m)^ +| +$")


def line_error(file: Path, line_no: int, reason: str, line: bytes) -> ValueError:
    """ValueError naming the file, the 1-based line number and the line's text."""
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    if len(text) > 120:
        text = text[:117] + "..."
    return ValueError(f"{str(file)!r}, line {line_no}: {reason}: {text!r}")


def _field_problem(name: str, kind: str) -> str:
    what = {
        "uint": "a non-negative integer",
        "real": "a finite number",
        "str": "a non-empty text",
        "date": "a date (ISO 8601)",
    }[kind]
    return f"{name} is not {what}"


def split_fields(line: bytes, sep: Optional[bytes]) -> List[bytes]:
    """The fields of one line (the reference of the vectorised structure check)."""
    line = line.rstrip(b"\r\n")
    return _WHITESPACE.split(line.strip(b" \t")) if sep is None else line.split(sep)


def parse_table(
    file: Path,
    sep: Optional[bytes],
    kinds: Sequence[Optional[str]],
    names: Sequence[str],
    skip_lines: int = 0,
    strip_spaces: bool = False,
) -> list:
    """Parse the fields of every non-blank line of ``file``.

    Parameters
    ----------
    file : Path
    sep : bytes or None
        The separator; None splits on runs of spaces and tabs (leading and trailing ones are
        ignored).
    kinds : sequence of {"uint", "real", "str", "date", None}
        One per field of a line; None skips the field.
    names : sequence of str
        What to call each field in error messages.
    skip_lines : int
        Lines at the top that are not data (a header).
    strip_spaces : bool
        Ignore spaces around fields (``1, 2, 4.5``); otherwise a space is part of its field.

    Returns
    -------
    list
        One entry per field: None for skipped fields, an array for "uint"/"real"/"date", and
        ``(codes, labels)`` (int64 codes, sorted ``str`` labels) for "str".
    """
    parts = []
    line_no = 1  # 1-based number of the first line of the next block
    carry = b""
    first = True
    with open(file, "rb") as fh:
        while True:
            block = fh.read(BLOCK_BYTES)
            if first:
                first = False
                if block.startswith(b"\xef\xbb\xbf"):
                    block = block[3:]
                for _ in range(skip_lines):
                    end = block.find(b"\n")
                    block = b"" if end < 0 else block[end + 1 :]
                    line_no += 1
            data = carry + block if carry else block
            if not block:
                if data:
                    parts.append(_parse_block(data, sep, kinds, names, line_no, file, strip_spaces)[0])
                break
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            columns, n_lines = _parse_block(data[: cut + 1], sep, kinds, names, line_no, file, strip_spaces)
            parts.append(columns)
            line_no += n_lines
            carry = data[cut + 1 :]
    return [_concatenate(kind, [p[f] for p in parts]) for f, kind in enumerate(kinds)]


def _concatenate(kind: Optional[str], pieces: list):
    if kind is None:
        return None
    if kind == "str":
        if not pieces:
            return np.zeros(0, np.int64), np.zeros(0, dtype="U1")
        labels, inverse = np.unique(np.concatenate([lab for _, lab in pieces]), return_inverse=True)
        offsets = np.cumsum([0] + [lab.size for _, lab in pieces])
        inverse = inverse.reshape(-1)
        codes = [inverse[offsets[i] : offsets[i + 1]][c] for i, (c, _) in enumerate(pieces)]
        return np.concatenate(codes).astype(np.int64), labels
    dtype = np.float64 if kind == "real" else np.int64
    return np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.zeros(0, dtype)


def _parse_block(
    raw: bytes, sep: Optional[bytes], kinds, names, first_line_no: int, file: Path, strip_spaces: bool = False
):
    """Parse whole lines of text: ``(fields, number of lines)``.

    Structure is checked vectorised: every non-blank line must hold exactly
    ``len(kinds) - 1`` separators. When it does not, :func:`_diagnose_block` finds the first
    offending line (a slow pass, only on the error path).
    """
    buf = raw.replace(b"\r\n", b"\n") if b"\r" in raw else raw  # keeps the line count
    if buf.endswith(b"\r"):  # a CRLF file cut after its last CR: the line ends there
        buf = buf[:-1]
    delim: bytes
    if sep is None:  # runs of blanks become one space, none at either end of a line
        buf = _EDGE_SPACE.sub(b"", _WHITESPACE.sub(b" ", buf))
        delim = b" "
    else:
        delim = sep
        if strip_spaces and b" " in buf:  # line numbers stay: only spaces go
            buf = _EDGE_SPACES.sub(b"", re.sub(rb" *" + re.escape(sep) + rb" *", sep.replace(b"\\", b"\\\\"), buf))
    a = np.frombuffer(buf, dtype=np.uint8)
    n = a.size
    ends = np.flatnonzero(a == 10)
    if n and a[-1] != 10:
        ends = np.append(ends, n)
    starts = np.empty_like(ends)
    if ends.size:
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
    total_lines = ends.size
    lines = np.flatnonzero(ends > starts)  # non-blank lines
    n_lines = lines.size
    starts, ends = starts[lines], ends[lines]

    # Separator characters: (fields - 1) * len(delim) per line. If the total matches and each
    # line's group of separators lies inside the line, every line has exactly its share; for
    # a two-byte separator such as "::" the pairs must also be adjacent.
    num_fields = len(kinds)
    width = len(delim)
    per_line = (num_fields - 1) * width
    pos = np.flatnonzero(a == delim[0]) if per_line else np.zeros(0, np.int64)
    ok = pos.size == per_line * n_lines
    c = pos.reshape(n_lines, per_line) if ok else np.zeros((0, 0), np.int64)
    if ok and n_lines and per_line:
        ok = bool((c[:, 0] >= starts).all() and (c[:, -1] < ends).all())
        for j in range(1, width):
            ok = (
                ok
                and bool((c[:, j::width] == c[:, 0::width] + j).all())
                and bool((a[c[:, j::width]] == delim[j]).all())
            )
    if not ok:
        raise _diagnose_block(raw, sep, kinds, names, first_line_no, file, strip_spaces)
    if n_lines == 0:
        return [None if k is None else _empty(k) for k in kinds], total_lines
    field_start = np.column_stack([starts] + [c[:, width * f + width - 1] + 1 for f in range(num_fields - 1)])
    field_end = np.column_stack([c[:, width * f] for f in range(num_fields - 1)] + [ends])

    out: list = []
    bad = np.zeros(n_lines, dtype=bool)
    bad_field = np.full(n_lines, -1)
    for f, kind in enumerate(kinds):
        if kind is None:
            out.append(None)
            continue
        value, bad_f = _PARSERS[kind](a, field_start[:, f], field_end[:, f])
        bad_field[bad_f & ~bad] = f
        bad |= bad_f
        out.append(value)
    if bad.any():
        k = int(np.argmax(bad))
        f = int(bad_field[k])
        line_index = int(lines[k])
        raise line_error(
            file,
            first_line_no + line_index,
            _field_problem(names[f], kinds[f]),
            raw.split(b"\n", line_index + 1)[line_index],
        )
    return out, total_lines


def _empty(kind: str):
    if kind == "str":
        return np.zeros(0, np.int64), np.zeros(0, dtype="U1")
    return np.zeros(0, np.float64 if kind == "real" else np.int64)


def _good(value: bytes, kind: str) -> bool:
    """One field by the rules of the module docstring (the slow path's reference)."""
    if kind == "uint":
        return UINT_RE.fullmatch(value) is not None
    if kind == "real":
        return len(value) <= 32 and RATING_RE.fullmatch(value) is not None and np.isfinite(float(value))
    if kind == "str":
        return 0 < len(value) <= _MAX_TOKEN_CHARS and b"\0" not in value
    return _date_or_none(value) is not None


def _date_or_none(value: bytes):
    try:
        return np.datetime64(value.decode("ascii"), "s")
    except (UnicodeDecodeError, ValueError):
        return None


def _diagnose_block(
    raw: bytes, sep: Optional[bytes], kinds, names, first_line_no: int, file: Path, strip_spaces: bool = False
) -> ValueError:
    """Error for the first malformed line of a block (slow path, errors only)."""
    shown = "spaces or tabs" if sep is None else repr(sep.decode())
    blanks = b" \t" if sep is None else (b" " if strip_spaces else b"")
    for j, line in enumerate(raw.split(b"\n")):
        text = line.rstrip(b"\r")
        if not text.strip(blanks):
            continue
        fields = split_fields(text, sep)
        if strip_spaces:
            fields = [f.strip(b" ") for f in fields]
        if len(fields) != len(kinds):
            return line_error(
                file, first_line_no + j, f"expected {len(kinds)} fields separated by {shown}, found {len(fields)}", line
            )
        for name, kind, value in zip(names, kinds, fields):
            if kind is not None and not _good(value, kind):
                return line_error(file, first_line_no + j, _field_problem(name, kind), line)
    return ValueError(f"{str(file)!r}: malformed ratings in the block starting at line {first_line_no}")


def _parse_uints(a: np.ndarray, s: np.ndarray, e: np.ndarray):
    """Decimal integers in byte ranges ``a[s:e]``; returns (int64 values, bad mask)."""
    w = e - s
    bad = (w < 1) | (w > _MAX_INT_DIGITS)
    if s.size == 0:
        return np.zeros(0, np.int64), bad
    width = int(min(w.max(), _MAX_INT_DIGITS))
    full = int(max(w.min(), 0))  # digits present in every field
    dtype = np.int32 if width <= 9 else np.int64
    val = np.zeros(s.size, dtype=dtype)
    idx = s.copy()
    digit = np.empty(s.size, dtype=np.uint8)
    for k in range(width):
        a.take(idx, mode="clip", out=digit)
        digit -= np.uint8(48)  # wraps for non-digits
        if k < full:
            bad |= digit > 9
            val *= 10
            val += digit
        else:
            active = w > k
            bad |= active & (digit > 9)
            np.multiply(val, 10, out=val, where=active)
            np.add(val, digit, out=val, where=active, casting="unsafe")
        idx += 1
    return val.astype(np.int64, copy=False), bad


def _token_keys(a: np.ndarray, s: np.ndarray, e: np.ndarray, max_chars: int):
    """The byte strings ``a[s:e]`` as fixed-width keys, with a mask of fields that are empty,
    longer than ``max_chars`` or hold a NUL byte."""
    w = e - s
    bad = (w < 1) | (w > max_chars)
    width = int(min(max(int(w.max()), 1), max_chars))
    key_width = 8 if width <= 8 else width
    tokens = np.zeros((s.size, key_width), dtype=np.uint8)
    for k in range(width):
        column = a.take(s + k, mode="clip")
        column[w <= k] = 0
        tokens[:, k] = column
    bad |= ((tokens[:, :width] == 0) & (np.arange(width) < w[:, None])).any(axis=1)
    keys = tokens.view("<u8").reshape(-1) if key_width == 8 else tokens.view(f"S{key_width}").reshape(-1)
    return keys, key_width, bad


def _distinct(keys: np.ndarray):
    """Sorted distinct keys and the index of each key among them (sampled first: ratings and
    dates take few distinct spellings)."""
    uniq = np.unique(keys[:4096])
    index = np.minimum(np.searchsorted(uniq, keys), uniq.size - 1)
    missed = uniq[index] != keys
    if missed.any():
        uniq = np.union1d(uniq, keys[missed])
        index = np.searchsorted(uniq, keys)
    return uniq, index


def _key_bytes(key, key_width: int) -> bytes:
    return (np.array(key, dtype="<u8").tobytes() if key_width == 8 else bytes(key)).rstrip(b"\0")


def _parse_by_distinct(a, s, e, convert, max_chars, dtype):
    """Fields converted once per distinct spelling: ``convert(list of bytes) -> (values,
    valid)``."""
    if s.size == 0:
        return np.zeros(0, dtype), np.zeros(0, bool)
    keys, key_width, bad = _token_keys(a, s, e, max_chars)
    uniq, index = _distinct(keys)
    values, valid = convert([_key_bytes(k, key_width) for k in uniq])
    bad |= ~valid[index]
    return values[index].astype(dtype, copy=False), bad


def _vectorised(texts, fast, one):
    """``fast(texts)`` on all of them; when that raises, ``one(text)`` (None: invalid) on each
    to find the bad ones."""
    try:
        values = fast(texts)
        return values, np.ones(len(texts), dtype=bool)
    except (ValueError, TypeError, OverflowError):
        parsed = [one(t) for t in texts]
        valid = np.array([v is not None for v in parsed], dtype=bool)
        return np.array([v if v is not None else 0 for v in parsed]), valid


def _ratings_of(texts):
    def fast(ts):
        if not all(RATING_RE.fullmatch(t) for t in ts):
            raise ValueError
        values = np.array(ts, dtype="S").astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError
        return values

    def one(t):
        if RATING_RE.fullmatch(t) is None or not np.isfinite(float(t)):
            return None
        return float(t)

    return _vectorised(texts, fast, one)


def _dates_of(texts):
    def fast(ts):
        return np.array([t.decode("ascii") for t in ts], dtype="datetime64[s]").astype(np.int64)

    def one(t):
        value = _date_or_none(t)
        return None if value is None else int(value.astype(np.int64))

    return _vectorised(texts, fast, one)


def _parse_ratings(a, s, e):
    """Decimal numbers in byte ranges; returns (float64 values, bad mask)."""
    return _parse_by_distinct(a, s, e, _ratings_of, 32, np.float64)


def _parse_dates(a, s, e):
    """ISO 8601 dates; returns (int64 seconds since the epoch, bad mask)."""
    return _parse_by_distinct(a, s, e, _dates_of, 64, np.int64)


def _parse_strings(a, s, e):
    """Text ids: ``((codes, labels), bad mask)``, labels sorted and decoded from UTF-8."""
    if s.size == 0:
        return (np.zeros(0, np.int64), np.zeros(0, dtype="U1")), np.zeros(0, bool)
    keys, key_width, bad = _token_keys(a, s, e, _MAX_TOKEN_CHARS)
    uniq, inverse = np.unique(keys, return_inverse=True)
    if key_width == 8:
        uniq = uniq.view(np.uint8).reshape(-1, 8).view("S8").reshape(-1)
    labels = np.char.decode(uniq, "utf-8", "replace")
    return (inverse.reshape(-1).astype(np.int64), labels), bad


_PARSERS = {"uint": _parse_uints, "real": _parse_ratings, "str": _parse_strings, "date": _parse_dates}
