"""The one on-disk format of models and checkpoints: a folder of ``.npy`` arrays and a manifest
that covers every byte, itself included.

A bundle folder holds exactly:

- ``manifest``: two lines. The first is the canonical JSON (sorted keys, no spaces, ASCII) of
  ``{"format", "version", "files", "arrays", "meta"}``; the second is ``sha256 <hex>``, the
  digest of the first line. ``files`` gives every other file's size and SHA-256, ``arrays``
  the file, dtype and shape of each array, ``meta`` what the format puts there (scalars,
  configuration, history).
- one NumPy ``.npy`` file per array (no pickle).

Reading checks, in this order and before reading more than it allows: the folder holds only
the listed regular files (no symlinks, FIFOs or devices), the manifest is at most
:data:`MAX_MANIFEST_BYTES` and its digest matches, every file has its listed size and digest,
and every ``.npy`` header agrees with the manifest (dtype from a short list, shape, and the data
filling the file exactly, so no header can make the reader allocate more than the file holds).
Whatever is wrong raises ``ValueError`` naming the file. The schema of ``meta`` and the arrays'
shapes belong to the caller (:mod:`fedrecon_fast.model`, :mod:`fedrecon_fast.checkpoint`),
which uses the checks below.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any, Literal, NoReturn, overload

import numpy as np

__all__ = ["VERSION", "MANIFEST", "write", "read", "is_bundle"]

VERSION = 2  # version 1: model.json + model.npz (models), trainer.json (checkpoints)
MANIFEST = "manifest"
MAX_MANIFEST_BYTES = 64 << 20
#: dtypes an array may have (little-endian, as NumPy writes them on every platform we build for).
DTYPES = ("<f4", "<f8", "<i8", "<i4", "|b1")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.npy$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _file_name(key: str, taken: set) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", ".", key).lstrip(".") or "array"
    name, i = f"{stem}.npy", 1
    while name in taken or not _FILE_NAME.match(name):
        name, i = f"array-{i}.npy", i + 1
    return name


def write(folder, kind: str, meta: dict, arrays: dict) -> None:
    """Write a bundle of format ``kind`` into the empty folder ``folder``.

    ``arrays`` maps names to ndarrays (stored C-contiguous, little-endian); ``meta`` must be
    JSON (NaN allowed). Files are flushed but not fsynced (the caller's atomic replacement
    does that for the whole folder).
    """
    folder = Path(folder)
    files: dict[str, dict] = {}
    layout: dict[str, Any] = {}
    for key, value in arrays.items():
        arr = np.asarray(value, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if arr.dtype.str not in DTYPES:
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype.str not in DTYPES:
            raise TypeError(f"array {key!r} has dtype {arr.dtype}; the format stores {DTYPES}")
        name = _file_name(key, set(files))
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, arr, version=(1, 0), allow_pickle=False)
        blob = buffer.getvalue()
        (folder / name).write_bytes(blob)
        files[name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        layout[key] = {"file": name, "dtype": arr.dtype.str, "shape": list(arr.shape)}
    body = _canonical({"format": kind, "version": VERSION, "files": files, "arrays": layout, "meta": meta})
    (folder / MANIFEST).write_bytes(body + b"\nsha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n")


def is_bundle(folder) -> bool:
    """Whether ``folder`` has a manifest (it may still fail to verify)."""
    return os.path.lexists(Path(folder) / MANIFEST)


class _Folder:
    """Reads regular files of one folder through a descriptor, so every file comes from the
    same folder even if its path is swapped meanwhile."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist") from None
        except OSError as e:
            raise ValueError(f"{path} cannot be opened as a folder: {e.strerror}") from None

    def close(self) -> None:
        os.close(self.fd)

    def names(self) -> list:
        return os.listdir(self.fd)

    def read(self, name: str, *, size: int | None = None, limit: int | None = None) -> bytearray:
        """The whole of regular file ``name``: exactly ``size`` bytes, or at most ``limit``."""
        where = self.path / name
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(name, flags, dir_fd=self.fd)
        except FileNotFoundError:
            raise ValueError(f"{where} is missing") from None
        except OSError as e:
            if e.errno == getattr(os, "ELOOP", None) or os.path.islink(where):
                raise ValueError(f"{where} is a symbolic link, not a regular file") from None
            raise ValueError(f"{where} cannot be read: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{where} is not a regular file")
            if size is not None and info.st_size != size:
                raise ValueError(f"{where} has {info.st_size} bytes; the manifest says {size}")
            if limit is not None and info.st_size > limit:
                raise ValueError(f"{where} has {info.st_size} bytes, more than the {limit} allowed")
            data = bytearray(info.st_size)
            view, done = memoryview(data), 0
            with io.FileIO(fd, closefd=False) as f:
                while done < len(data):
                    n = f.readinto(view[done:])
                    if not n:
                        raise ValueError(f"{where} is shorter than {len(data)} bytes (changed while read)")
                    done += n
            return data
        except OSError as e:
            raise ValueError(f"{where} cannot be read: {e.strerror}") from None
        finally:
            os.close(fd)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _manifest(folder: _Folder, kind: str) -> dict:
    where = folder.path / MANIFEST
    raw = bytes(folder.read(MANIFEST, limit=MAX_MANIFEST_BYTES))
    body, sep, tail = raw.rstrip(b"\n").rpartition(b"\n")
    digest = tail[len(b"sha256 ") :].decode("ascii", "replace")
    if not sep or not raw.endswith(b"\n") or not tail.startswith(b"sha256 ") or not _HEX64.match(digest):
        raise ValueError(f"{where} is not a fedrecon_fast manifest (its last line must be 'sha256 <hex>')")
    if hashlib.sha256(body).hexdigest() != digest:
        raise ValueError(f"{where} is corrupted: its content does not match its SHA-256 line")
    try:
        manifest = json.loads(body.decode("ascii"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or _canonical(manifest) != body:
        raise ValueError(f"{where} is not in canonical form")
    if set(manifest) != {"format", "version", "files", "arrays", "meta"}:
        raise ValueError(f"{where} must have exactly the keys format, version, files, arrays, meta")
    if manifest["format"] != kind:
        raise ValueError(f"{where} holds a {manifest['format']!r}, not a {kind!r}")
    version = manifest["version"]
    if version != VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
        raise ValueError(
            f"{where} has format version {version!r}; this fedrecon_fast reads version "
            f"{VERSION}" + (" (written by a newer release: upgrade fedrecon_fast)" if newer else "")
        )
    return manifest


def _check_files(where: Path, files) -> None:
    if not isinstance(files, dict):
        raise ValueError(f"{where}: 'files' must be an object")
    for name, entry in files.items():
        if (
            not _FILE_NAME.match(name)
            or not isinstance(entry, dict)
            or set(entry) != {"bytes", "sha256"}
            or not _is_int(entry["bytes"])
            or entry["bytes"] < 0
            or not isinstance(entry["sha256"], str)
            or not _HEX64.match(entry["sha256"])
        ):
            raise ValueError(f"{where}: bad entry for file {name!r}")


def _array(where: Path, blob: bytearray, dtype: str | None, shape: tuple | None) -> np.ndarray:
    """The array of one .npy file, its header checked against ``dtype`` and ``shape`` (None:
    any of :data:`DTYPES`, any shape) and against the file's size, so that a header can never
    make the reader allocate more than the file holds."""
    stream = io.BytesIO(blob)
    try:
        major, minor = np.lib.format.read_magic(stream)
        if (major, minor) != (1, 0):
            raise ValueError(f"npy version {major}.{minor}")
        header_shape, fortran, header_dtype = np.lib.format.read_array_header_1_0(stream)
    except ValueError as e:
        raise ValueError(f"{where} is not a .npy file: {e}") from None
    header_shape = tuple(header_shape)
    if (
        fortran
        or header_dtype.str not in DTYPES
        or (dtype is not None and header_dtype.str != dtype)
        or (shape is not None and header_shape != shape)
    ):
        expected = f"{dtype or 'one of ' + str(DTYPES)}, {shape or 'any shape'}"
        raise ValueError(
            f"{where}: its header ({header_dtype.str}, {header_shape}, fortran order "
            f"{fortran}) disagrees with {expected}"
        )
    offset = stream.tell()
    count = math.prod(header_shape)
    nbytes = count * header_dtype.itemsize
    if offset + nbytes != len(blob):
        raise ValueError(
            f"{where}: the header's shape {header_shape} needs {nbytes} bytes of data; the "
            f"file has {len(blob) - offset}"
        )
    arr = np.frombuffer(blob, dtype=header_dtype, count=count, offset=offset).reshape(header_shape)
    return np.require(arr, requirements=["C", "A", "W"])  # the bytearray is ours: no copy


def read(path, kind: str) -> tuple[dict, dict]:
    """Verify and read the bundle of format ``kind`` in folder ``path``.

    Returns
    -------
    meta : dict
    arrays : dict of str to ndarray
        Writeable, C-contiguous, with the manifest's dtypes and shapes.

    Raises
    ------
    ValueError
        Naming the file and what is wrong with it.
    FileNotFoundError
        ``path`` does not exist.
    """
    path = Path(path)
    folder = _Folder(path)
    try:
        manifest = _manifest(folder, kind)
        where = path / MANIFEST
        files, layout, meta = manifest["files"], manifest["arrays"], manifest["meta"]
        _check_files(where, files)
        if not isinstance(meta, dict) or not isinstance(layout, dict):
            raise ValueError(f"{where}: 'meta' and 'arrays' must be objects")
        extra = sorted(set(folder.names()) - set(files) - {MANIFEST})
        if extra:
            raise ValueError(f"{path} holds files its manifest does not list: {extra[:5]}")
        used = [entry.get("file") if isinstance(entry, dict) else None for entry in layout.values()]
        if sorted(map(str, used)) != sorted(files) or len(set(used)) != len(used):
            raise ValueError(f"{where}: 'arrays' must use each listed file exactly once")
        arrays = {}
        for key, entry in layout.items():
            if (
                set(entry) != {"file", "dtype", "shape"}
                or entry["dtype"] not in DTYPES
                or not isinstance(entry["shape"], list)
                or len(entry["shape"]) > 8
                or not all(_is_int(n) and n >= 0 for n in entry["shape"])
            ):
                raise ValueError(f"{where}: bad layout for array {key!r}")
            name = entry["file"]
            blob = folder.read(name, size=files[name]["bytes"])
            if hashlib.sha256(blob).hexdigest() != files[name]["sha256"]:
                raise ValueError(f"{path / name} is corrupted (SHA-256 mismatch)")
            arrays[key] = _array(path / name, blob, entry["dtype"], tuple(entry["shape"]))
        return meta, arrays
    finally:
        folder.close()


# ------------------------------------------------------------------ schema checks for callers


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Schema:
    """Typed access to a verified manifest's ``meta`` (and arrays): each getter raises
    ``ValueError`` naming the file, the field and what was expected."""

    def __init__(self, where, meta: dict, arrays: dict | None = None, prefix: str = ""):
        self.where, self.meta, self.arrays, self.prefix = where, meta, arrays or {}, prefix

    def fail(self, message: str) -> NoReturn:
        raise ValueError(f"{self.where}: {message}")

    def _get(self, key: str):
        if key not in self.meta:
            self.fail(f"'{self.prefix}{key}' is missing")
        return self.meta[key]

    def keys(self, required: set, optional: frozenset | set = frozenset()) -> None:
        """The meta has these keys and no others."""
        present = set(self.meta)
        if not required <= present or not present <= required | optional:
            unknown, missing = sorted(present - required - optional), sorted(required - present)
            self.fail(f"'{self.prefix}' fields: missing {missing}, unknown {unknown}")

    def integer(self, key: str, minimum: int, maximum: int) -> int:
        value = self._get(key)
        if not _is_int(value) or not minimum <= value <= maximum:
            self.fail(f"'{self.prefix}{key}' must be an integer in [{minimum}, {maximum}]; got {value!r}")
        return value

    def number(self, key: str, minimum: float = -math.inf, maximum: float = math.inf) -> float:
        value = self._get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not minimum <= value <= maximum
        ):
            self.fail(f"'{self.prefix}{key}' must be a finite number in [{minimum}, {maximum}]; got {value!r}")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            self.fail(f"'{self.prefix}{key}' must be true or false; got {value!r}")
        return value

    def of_type(self, key: str, kind, allow_none: bool = False):
        value = self._get(key)
        if not (isinstance(value, kind) or (allow_none and value is None)):
            self.fail(f"'{self.prefix}{key}' must be a {getattr(kind, '__name__', kind)}; got {type(value).__name__}")
        return value

    @overload
    def array(
        self, key: str, dtype: str, shape: tuple, *, finite: bool = ..., optional: Literal[False] = ...
    ) -> np.ndarray: ...

    @overload
    def array(self, key: str, dtype: str, shape: tuple, *, finite: bool = ..., optional: bool) -> np.ndarray | None: ...

    def array(
        self, key: str, dtype: str, shape: tuple, *, finite: bool = False, optional: bool = False
    ) -> np.ndarray | None:
        """An array of exactly this dtype and shape (None in shape: any length)."""
        if key not in self.arrays:
            if optional:
                return None
            self.fail(f"array '{key}' is missing")
        arr = self.arrays[key]
        if (
            arr.dtype.str != dtype
            or arr.ndim != len(shape)
            or any(n is not None and n != m for n, m in zip(shape, arr.shape))
        ):
            self.fail(f"array '{key}' must be {dtype} of shape {shape}; got {arr.dtype.str} {arr.shape}")
        if finite and not np.isfinite(arr).all():
            self.fail(f"array '{key}' has NaN or infinite values")
        return arr

    def no_other_arrays(self, expected) -> None:
        unknown = sorted(set(self.arrays) - set(expected))
        if unknown:
            self.fail(f"unexpected arrays {unknown[:5]}")


# ------------------------------------------------------------------ version 1 (read only)

#: Largest JSON file of the version-1 format read (its configuration and a few scalars).
MAX_JSON_BYTES = 16 << 20


def read_version_1(path, json_name: str, npz_name: str) -> tuple[dict, dict]:
    """The JSON object and the arrays of a version-1 model folder (``model.json`` +
    ``model.npz``, written by fedrecon_fast 0.1 with ``np.savez``). That format has no
    checksums, so only its structure is checked: regular files, a bounded JSON file, and an
    npz whose members are stored uncompressed (a compressed member, such as a decompression
    bomb, is refused unread) with .npy headers that fit the member."""
    path = Path(path)
    folder = _Folder(path)
    try:
        raw = folder.read(json_name, limit=MAX_JSON_BYTES)
        try:
            meta = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path / json_name} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path / json_name} must hold a JSON object")
        blob = folder.read(npz_name)
    finally:
        folder.close()
    where = path / npz_name
    arrays = {}
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(blob))) as z:
            members = z.infolist()
            if len(members) > 16:
                raise ValueError(f"{where} has {len(members)} members; a model has at most 4")
            for info in members:
                key = info.filename[:-4]
                if not info.filename.endswith(".npy") or key in arrays:
                    raise ValueError(f"{where}: unexpected member {info.filename!r}")
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(blob):
                    raise ValueError(
                        f"{where}: member {info.filename!r} is compressed (it claims "
                        f"{info.file_size} bytes); fedrecon_fast writes stored members only"
                    )
                arrays[key] = _array(where, bytearray(z.read(info)), None, None)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError) as e:
        raise ValueError(f"{where} is not a valid npz file: {e}") from None
    return meta, arrays
