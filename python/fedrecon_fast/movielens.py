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
from .textparse import line_error, parse_table

__all__ = [
    "load_movielens",
    "download_movielens",
    "load_titles",
    "find_titles",
    "MOVIELENS_URLS",
    "MOVIELENS_CHECKSUMS",
    "RATINGS_FILES",
    "TITLE_FILES",
]

PathLike = Union[str, os.PathLike]

#: Rating file names, in order of preference when a folder holds several.
RATINGS_FILES = ("u.data", "ratings.dat", "ratings.csv")

#: Item title files (100K ``u.item``, 1M/10M ``movies.dat``, 20M and later ``movies.csv``).
TITLE_FILES = ("u.item", "movies.dat", "movies.csv")

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
    expected = "u.data (MovieLens 100K), ratings.dat (1M, 10M) or ratings.csv (20M, 25M, latest)"
    if p.is_dir():
        for name in RATINGS_FILES:
            if (p / name).is_file():
                return p / name, _FILE_FORMATS[name]
        raise FileNotFoundError(f"no MovieLens ratings file in folder {str(p)!r}: expected {expected}")
    if not p.is_file():
        raise FileNotFoundError(
            f"MovieLens path {str(p)!r} does not exist: expected a folder holding {expected}, or such a file"
        )
    if p.name in _FILE_FORMATS:
        return p, _FILE_FORMATS[p.name]
    with open(p, "rb") as fh:
        first = fh.readline()
    for delim in (b"::", b"\t", b","):
        if delim in first:
            return p, delim
    raise ValueError(f"{str(p)!r}: unrecognised ratings format; expected {expected}")


def _csv_header_lines(file: Path, first_line: bytes, delim: bytes) -> int:
    """Number of header lines (0 or 1) at the top of a csv ratings file."""
    if delim != b",":
        return 0
    stripped = first_line.lstrip()
    if not stripped or stripped[:1].isdigit():
        return 0
    names = [f.strip().lower() for f in first_line.strip().decode("utf-8", "replace").split(",")]
    if names != _CSV_HEADER:
        raise line_error(file, 1, "unexpected csv header (expected userId,movieId,rating,timestamp)", first_line)
    return 1


def _parse_numpy(file: Path, delim: bytes):
    """Parse a ratings file with the vectorised NumPy parser (:mod:`fedrecon_fast.textparse`)."""
    with open(file, "rb") as fh:
        first_line = fh.readline()
    if first_line.startswith(b"\xef\xbb\xbf"):
        first_line = first_line[3:]
    header = _csv_header_lines(file, first_line, delim)
    return tuple(parse_table(file, delim, ("uint", "uint", "real", "uint"), _FIELDS, skip_lines=header))


# --------------------------------------------------------------------------- titles


def find_titles(path: PathLike) -> Optional[Path]:
    """The MovieLens title file in folder ``path`` (or beside file ``path``), or None."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    for name in TITLE_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_titles(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Item ids and titles from a MovieLens ``u.item``, ``movies.dat`` or ``movies.csv``.

    Parameters
    ----------
    path : str or os.PathLike
        The file (its name says the format; another name is read by its first line:
        ``::`` as movies.dat, ``|`` as u.item, else CSV with a header).

    Returns
    -------
    ids : ndarray of int64
    titles : ndarray of str
        Same length; the ids in file order.

    Raises
    ------
    ValueError
        A line without an integer id and a title (file and line named).
    """
    import csv
    import io

    p = Path(path)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # ML-100K and ML-1M are Latin-1
        text = raw.decode("latin-1")
    first = text.split("\n", 1)[0]
    if p.name == "movies.dat" or (p.name not in TITLE_FILES and "::" in first):
        rows = (line.split("::") for line in text.splitlines())
        start = 1
    elif p.name == "u.item" or (p.name not in TITLE_FILES and "|" in first):
        rows = (line.split("|") for line in text.splitlines())
        start = 1
    else:
        rows = csv.reader(io.StringIO(text))  # type: ignore[assignment]  # an iterator of lists too
        next(rows, None)  # movieId,title,genres
        start = 2
    ids, titles = [], []
    for number, fields in enumerate(rows, start=start):
        if not fields or not "".join(fields).strip():
            continue
        if len(fields) < 2 or not fields[0].strip().isdigit():
            raise ValueError(f"{str(p)!r}, line {number}: expected an item id and a title, got {fields[:2]!r}")
        ids.append(int(fields[0]))
        titles.append(fields[1].strip())
    return np.array(ids, dtype=np.int64), np.array(titles, dtype=str)


# --------------------------------------------------------------------------- download


def download_movielens(
    name: str, dest: PathLike, *, url: Optional[str] = None, sha256: Optional[str] = None, md5: Optional[str] = None
) -> Path:
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
                diff = ", ".join(
                    f"{algo}: expected {expected[algo]}, got {actual[algo]}"
                    for algo in expected
                    if actual[algo] != expected[algo]
                )
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
    if (
        member.startswith(("/", "\\"))
        or PurePosixPath(member).is_absolute()
        or PureWindowsPath(member).is_absolute()
        or PureWindowsPath(member).drive
    ):
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
            raise ValueError(f"{str(zip_path)!r} contains no MovieLens ratings file ({', '.join(RATINGS_FILES)})")
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
