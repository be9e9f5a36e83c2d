"""MovieLens loaders (100K, 1M, 10M, 20M, 25M, latest) and a verified downloader.

Supported rating files, recognised by name (or, for another name, by the
first line's separator):

============  ==========================  =====================================
file          releases                    format
============  ==========================  =====================================
u.data        ml-100k                     ``user<TAB>item<TAB>rating<TAB>timestamp``
ratings.dat   ml-1m, ml-10m               ``UserID::MovieID::Rating::Timestamp``
ratings.csv   ml-20m, ml-25m, ml-latest   header ``userId,movieId,rating,timestamp``
============  ==========================  =====================================

Ratings may be integers (100K, 1M) or half stars such as ``3.5`` (10M and
later).  Parsing is vectorised NumPy over the raw bytes (no per-line Python,
no pandas needed), reads the file in blocks of bounded size, is strict (ids
and timestamps must be plain non-negative decimal integers, ratings finite
decimal numbers) and reports malformed content with the file name and the
1-based line number.  On MovieLens 1M it is as fast as pandas' C parser.

The data sets are distributed by GroupLens (https://grouplens.org/datasets/movielens/)
under their own terms of use; :func:`download_movielens` fetches them from the
official site and verifies a checksum before extracting anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, Optional, Tuple, Union

import numpy as np

from .data import ClientData

__all__ = ["load_movielens", "download_movielens", "MOVIELENS_URLS", "MOVIELENS_CHECKSUMS",
           "RATINGS_FILES"]

PathLike = Union[str, os.PathLike]

#: Rating file names, in order of preference when a folder holds several.
RATINGS_FILES = ("u.data", "ratings.dat", "ratings.csv")

_FILE_FORMATS = {"u.data": b"\t", "ratings.dat": b"::", "ratings.csv": b","}
_CSV_HEADER = ["userid", "movieid", "rating", "timestamp"]
_FIELDS = ("user id", "item id", "rating", "timestamp")

#: Official GroupLens download URLs.
MOVIELENS_URLS: Dict[str, str] = {
    name: f"https://files.grouplens.org/datasets/movielens/{name}.zip"
    for name in ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest-small")
}

#: Known checksums of the official zips (lower-case hex).  Sources:
#: - md5: the ``<name>.zip.md5`` files GroupLens publishes next to each zip
#:   (https://files.grouplens.org/datasets/movielens/), as recorded in
#:   github.com/eli-osherovich/papers_with_code, ``datasets/movielens/dl_config.py``.
#: - sha256 (and sizes): TensorFlow Datasets,
#:   github.com/tensorflow/datasets, ``tensorflow_datasets/url_checksums/movielens.txt``.
#: The strongest known digest is checked (sha256 when known, else md5).
#: ml-latest-small is updated by GroupLens from time to time; if its digest
#: stops matching, pass ``sha256=`` explicitly.
MOVIELENS_CHECKSUMS: Dict[str, Dict[str, str]] = {
    "ml-100k": {
        "md5": "0e33842e24a9c977be4e0107933c0723",
        "sha256": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
    },
    "ml-1m": {
        "md5": "c4d9eecfca2ab87c1945afe126590906",
        "sha256": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
    },
    "ml-10m": {
        "md5": "ce571fd55effeba0271552578f2648bd",
    },
    "ml-20m": {
        "md5": "cd245b17a1ae2cc31bb14903e1204af3",
        "sha256": "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
    },
    "ml-25m": {
        "md5": "6b51fb2759a8657d3bfcbfc42b592ada",
        "sha256": "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
    },
    "ml-latest-small": {
        "sha256": "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
    },
}

_BLOCK_BYTES = 1 << 26  # 64 MiB of text per parsing block bounds the temporaries
_MAX_INT_DIGITS = 18  # every 18-digit decimal fits int64
_MAX_RATING_CHARS = 32
_RATING_RE = re.compile(rb"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


# --------------------------------------------------------------------------- loading


def load_movielens(path: PathLike) -> ClientData:
    """Load MovieLens ratings from a folder or a ratings file.

    Parameters
    ----------
    path : str or os.PathLike
        A folder holding ``u.data`` (100K), ``ratings.dat`` (1M, 10M) or
        ``ratings.csv`` (20M, 25M, latest) -- preferred in that order when
        several exist -- or the path of such a file.  A file with another
        name is accepted if its first line is in one of these formats.

    Returns
    -------
    ClientData
        One client per user in increasing user id, ratings of a client in
        timestamp order (ties in file order), with timestamps; ``user_ids``
        and ``item_ids`` are the original MovieLens ids.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or a folder holds no known ratings file
        (the message names the path and the expected file names).
    ValueError
        If the content is malformed (wrong number of fields, a non-numeric
        or empty field, a NaN/inf rating, a wrong csv header): the message
        names the file and the 1-based line number.
    """
    file, delim = _resolve_ratings_file(path)
    users, items, ratings, timestamps = _parse_numpy(file, delim)
    return ClientData.from_coo(users, items, ratings, timestamps)


def _resolve_ratings_file(path: PathLike) -> Tuple[Path, bytes]:
    """The ratings file to read and its field separator."""
    p = Path(path)
    expected = ("u.data (MovieLens 100K), ratings.dat (1M, 10M) or "
                "ratings.csv (20M, 25M, latest)")
    if p.is_dir():
        for name in RATINGS_FILES:
            if (p / name).is_file():
                return p / name, _FILE_FORMATS[name]
        raise FileNotFoundError(f"no MovieLens ratings file in folder {str(p)!r}: expected {expected}")
    if not p.is_file():
        raise FileNotFoundError(f"MovieLens path {str(p)!r} does not exist: expected a folder "
                                f"holding {expected}, or such a file")
    if p.name in _FILE_FORMATS:
        return p, _FILE_FORMATS[p.name]
    with open(p, "rb") as fh:
        first = fh.readline()
    for delim in (b"::", b"\t", b","):
        if delim in first:
            return p, delim
    raise ValueError(f"{str(p)!r}: unrecognised ratings format; expected {expected}")


def _line_error(file: Path, line_no: int, reason: str, line: bytes) -> ValueError:
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    if len(text) > 120:
        text = text[:117] + "..."
    return ValueError(f"{str(file)!r}, line {line_no}: {reason}: {text!r}")


def _csv_header_lines(file: Path, first_line: bytes, delim: bytes) -> int:
    """Number of header lines (0 or 1) at the top of a csv ratings file."""
    if delim != b",":
        return 0
    stripped = first_line.lstrip()
    if not stripped or stripped[:1].isdigit():
        return 0
    names = [f.strip().lower() for f in first_line.strip().decode("utf-8", "replace").split(",")]
    if names != _CSV_HEADER:
        raise _line_error(file, 1, "unexpected csv header (expected userId,movieId,rating,timestamp)",
                          first_line)
    return 1


def _parse_numpy(file: Path, delim: bytes):
    """Parse a ratings file with the vectorised NumPy parser, block by block."""
    parts = []
    line_no = 1  # 1-based number of the first line of the next block
    carry = b""
    first = True
    with open(file, "rb") as fh:
        while True:
            block = fh.read(_BLOCK_BYTES)
            if first:
                first = False
                if block.startswith(b"\xef\xbb\xbf"):
                    block = block[3:]
                end = block.find(b"\n")
                first_line = block if end < 0 else block[:end + 1]
                if _csv_header_lines(file, first_line, delim):
                    block = block[len(first_line):]
                    line_no += 1
            data = carry + block if carry else block
            if not block:
                if data:
                    parts.append(_parse_block(data, delim, line_no, file)[0])
                break
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            columns, n_lines = _parse_block(data[:cut + 1], delim, line_no, file)
            parts.append(columns)
            line_no += n_lines
            carry = data[cut + 1:]
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), np.zeros(0, np.float64), empty.copy()
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))


def _parse_block(raw: bytes, delim: bytes, first_line_no: int, file: Path):
    """Parse whole lines of text.

    Returns ``((users, items, ratings, timestamps), number of lines)``.

    Structure is checked vectorised: every non-blank line must hold exactly
    three separators.  When it does not, :func:`_diagnose_block` finds the
    first offending line (a slow pass, only on the error path).
    """
    buf = raw.replace(b"\r\n", b"\n") if b"\r" in raw else raw  # keeps the line count
    if buf.endswith(b"\r"):  # a CRLF file cut after its last CR: the line ends there
        buf = buf[:-1]
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

    # Separator characters: 3 * len(delim) per line.  If the total matches and
    # each line's group of separators lies inside the line, every line has
    # exactly its share; for "::" the colons must also pair up.
    width = len(delim)
    per_line = 3 * width
    pos = np.flatnonzero(a == delim[0])
    ok = pos.size == per_line * n_lines
    if ok and n_lines:
        c = pos.reshape(n_lines, per_line)
        ok = bool((c[:, 0] >= starts).all() and (c[:, -1] < ends).all())
        if ok and width == 2:
            ok = bool((c[:, 1::2] == c[:, 0::2] + 1).all())
    if not ok:
        raise _diagnose_block(raw, delim, first_line_no, file)
    if n_lines == 0:
        empty = np.zeros(0, np.int64)
        return (empty, empty.copy(), np.zeros(0, np.float64), empty.copy()), total_lines
    sep_first = c[:, 0::width]  # (n_lines, 3): end of fields 0..2
    sep_last = c[:, width - 1::width] + 1  # (n_lines, 3): start of fields 1..3

    users, bad_u = _parse_uints(a, starts, sep_first[:, 0])
    items, bad_i = _parse_uints(a, sep_last[:, 0], sep_first[:, 1])
    ratings, bad_r = _parse_ratings(a, sep_last[:, 1], sep_first[:, 2])
    timestamps, bad_t = _parse_uints(a, sep_last[:, 2], ends)
    any_bad = bad_u | bad_i | bad_r | bad_t
    if any_bad.any():
        k = int(np.argmax(any_bad))
        field = next(f for f, b in zip(_FIELDS, (bad_u, bad_i, bad_r, bad_t)) if b[k])
        line_index = int(lines[k])
        raise _line_error(file, first_line_no + line_index, _field_problem(field),
                          raw.split(b"\n", line_index + 1)[line_index])
    return (users, items, ratings, timestamps), total_lines


def _field_problem(field: str) -> str:
    what = "a finite number" if field == "rating" else "a non-negative integer"
    return f"{field} is not {what}"


_UINT_RE = re.compile(rb"\d{1,%d}" % _MAX_INT_DIGITS)


def _diagnose_block(raw: bytes, delim: bytes, first_line_no: int, file: Path) -> ValueError:
    """Error for the first malformed line of a block (slow path, errors only)."""
    for j, line in enumerate(raw.split(b"\n")):
        text = line.rstrip(b"\r")
        if not text:
            continue
        fields = text.split(delim)
        if len(fields) != 4:
            return _line_error(file, first_line_no + j,
                               f"expected 4 fields separated by {delim.decode()!r}, found {len(fields)}",
                               line)
        for field, value in zip(_FIELDS, fields):
            if field == "rating":
                good = (_RATING_RE.fullmatch(value) is not None
                        and np.isfinite(float(value)))
            else:
                good = _UINT_RE.fullmatch(value) is not None
            if not good:
                return _line_error(file, first_line_no + j, _field_problem(field), line)
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


def _parse_ratings(a: np.ndarray, s: np.ndarray, e: np.ndarray):
    """Decimal numbers in byte ranges; returns (float64 values, bad mask).

    Ratings take few distinct spellings ("4", "3.5", ...), so each distinct
    token is parsed once: tokens are packed into fixed-width keys, the
    distinct keys found (from a sample, then from any key the sample
    missed), validated with a strict regular expression and converted with
    ``float``.
    """
    w = e - s
    bad = (w < 1) | (w > _MAX_RATING_CHARS)
    if s.size == 0:
        return np.zeros(0, np.float64), bad
    width = int(min(max(int(w.max()), 1), _MAX_RATING_CHARS))
    key_width = 8 if width <= 8 else width
    tokens = np.zeros((s.size, key_width), dtype=np.uint8)
    for k in range(width):
        column = a.take(s + k, mode="clip")
        column[w <= k] = 0
        tokens[:, k] = column
    bad |= ((tokens[:, :width] == 0) & (np.arange(width) < w[:, None])).any(axis=1)  # NUL bytes
    if key_width == 8:
        keys = tokens.view("<u8").reshape(-1)
    else:
        keys = tokens.view(f"S{key_width}").reshape(-1)
    uniq = np.unique(keys[:4096])
    index = np.minimum(np.searchsorted(uniq, keys), uniq.size - 1)
    missed = uniq[index] != keys
    if missed.any():
        uniq = np.union1d(uniq, keys[missed])
        index = np.searchsorted(uniq, keys)
    values = np.empty(uniq.size, dtype=np.float64)
    valid = np.ones(uniq.size, dtype=bool)
    for j, key in enumerate(uniq):  # a handful of distinct spellings
        text = (np.array(key, dtype="<u8").tobytes() if key_width == 8 else bytes(key)).rstrip(b"\0")
        ok = _RATING_RE.fullmatch(text) is not None
        value = float(text) if ok else np.nan
        valid[j] = ok and bool(np.isfinite(value))
        values[j] = value if valid[j] else 0.0
    bad |= ~valid[index]
    return values[index], bad


# --------------------------------------------------------------------------- download


def download_movielens(name: str, dest: PathLike, *, url: Optional[str] = None,
                       sha256: Optional[str] = None, md5: Optional[str] = None) -> Path:
    """Download, verify and extract an official MovieLens release.

    Parameters
    ----------
    name : {"ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest-small"}
        The release.
    dest : str or os.PathLike
        Folder to download into (created if needed).  The zip is kept as
        ``dest/<name>.zip`` and extracted in ``dest``.
    url : str, optional
        Override of the official URL
        ``https://files.grouplens.org/datasets/movielens/<name>.zip`` (e.g. a
        mirror or a ``file://`` URL).
    sha256, md5 : str, optional
        Expected hex digests of the zip.  When either is given, only the
        given ones are checked; otherwise the built-in table
        :data:`MOVIELENS_CHECKSUMS` is used (sha256 when known, else md5).

    Returns
    -------
    pathlib.Path
        The extracted folder containing the ratings file (pass it to
        :func:`load_movielens`).

    Raises
    ------
    ValueError
        If ``name`` is unknown, no checksum is known or given, the digest
        does not match (message shows expected and actual; the download is
        deleted), or the archive has unsafe members (absolute paths, ``..``)
        or no ratings file.
    OSError
        If the download fails (``urllib.error.URLError`` is an OSError).

    Notes
    -----
    The download goes to a temporary file in ``dest`` and is renamed
    atomically after verification; extraction goes to a temporary folder
    that is then moved into place, so an interrupted call never leaves a
    half-written release behind.  If ``dest/<name>.zip`` already exists and
    verifies, it is not downloaded again, and an existing extraction is reused.
    """
    if name not in MOVIELENS_URLS:
        raise ValueError(f"unknown MovieLens release {name!r}; expected one of {sorted(MOVIELENS_URLS)}")
    expected: Dict[str, str] = {}
    for algo, digest, length in (("sha256", sha256, 64), ("md5", md5, 32)):
        if digest is not None:
            digest = str(digest).strip().lower()
            if not re.fullmatch(f"[0-9a-f]{{{length}}}", digest):
                raise ValueError(f"{algo} must be {length} hexadecimal digits, got {digest!r}")
            expected[algo] = digest
    if not expected:
        known = MOVIELENS_CHECKSUMS.get(name, {})
        for algo in ("sha256", "md5"):
            if algo in known:
                expected[algo] = known[algo]
                break
    if not expected:
        raise ValueError(f"no known checksum for {name!r}: pass sha256= (or md5=) to verify the download")
    url = url or MOVIELENS_URLS[name]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    zip_path = dest / f"{name}.zip"

    if not (zip_path.is_file() and _file_digests(zip_path, expected) == expected):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
        tmp = Path(tmp_name)
        try:
            hashers = {algo: _hasher(algo) for algo in expected}
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
            actual = {algo: h.hexdigest() for algo, h in hashers.items()}
            if actual != expected:
                diff = ", ".join(f"{algo}: expected {expected[algo]}, got {actual[algo]}"
                                 for algo in expected if actual[algo] != expected[algo])
                raise ValueError(f"checksum mismatch for {url} ({diff}); the download was deleted")
            os.replace(tmp, zip_path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return _extract_release(zip_path, dest)


def _hasher(algo: str):
    if algo == "md5":
        try:
            return hashlib.md5(usedforsecurity=False)
        except TypeError:  # pragma: no cover - Python builds without the keyword
            return hashlib.md5()
    return hashlib.new(algo)


def _file_digests(path: Path, expected: Dict[str, str]) -> Dict[str, str]:
    hashers = {algo: _hasher(algo) for algo in expected}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            for h in hashers.values():
                h.update(chunk)
    return {algo: h.hexdigest() for algo, h in hashers.items()}


def _safe_member_parts(member: str) -> Tuple[str, ...]:
    """Path components of a zip member, rejecting absolute paths and ``..``."""
    if (member.startswith(("/", "\\")) or PurePosixPath(member).is_absolute()
            or PureWindowsPath(member).is_absolute() or PureWindowsPath(member).drive):
        raise ValueError(f"unsafe member {member!r} in archive: absolute path")
    parts = tuple(p for p in re.split(r"[/\\]", member) if p not in ("", "."))
    if ".." in parts:
        raise ValueError(f"unsafe member {member!r} in archive: '..' component")
    return parts


def _extract_release(zip_path: Path, dest: Path) -> Path:
    """Safely extract ``zip_path`` into ``dest``; return the folder of its ratings file."""
    with zipfile.ZipFile(zip_path) as zf:
        members = zf.infolist()
        parts = [_safe_member_parts(m.filename) for m in members]  # validate everything first
        ratings_member = None
        for wanted in RATINGS_FILES:
            for p, m in zip(parts, members):
                if p and p[-1] == wanted and not m.is_dir():
                    ratings_member = p
                    break
            if ratings_member is not None:
                break
        if ratings_member is None:
            raise ValueError(f"{str(zip_path)!r} contains no MovieLens ratings file "
                             f"({', '.join(RATINGS_FILES)})")
        target = dest.joinpath(*ratings_member)
        if target.is_file():
            return target.parent
        tops = sorted({p[0] for p in parts if p})
        staging = Path(tempfile.mkdtemp(prefix=f".{zip_path.stem}.", suffix=".extract", dir=dest))
        try:
            for p, m in zip(parts, members):
                if not p:
                    continue
                out = staging.joinpath(*p)
                if m.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            for top in tops:
                final = dest / top
                if final.is_dir() and not final.is_symlink():
                    shutil.rmtree(final)
                elif final.exists() or final.is_symlink():
                    final.unlink()
                os.replace(staging / top, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target.parent
