"""Folders replaced atomically, recovered after a crash, and locked against a second process.

:func:`replace_folder` writes the new version of a folder beside the old one and swaps it in,
so a process killed at any instant leaves the path holding the old or the new version, each
complete. The temporary names say how far a save got (``<pid>`` is the writer's process)::

    .NAME.tmp-<pid>-<tag>   being written (incomplete; removed)
    .NAME.new-<pid>-<tag>   written and fsynced (complete; renamed into place if NAME is missing)
    .NAME.old-<pid>-<tag>   the previous version moved aside (put back if NAME is missing)
    .NAME.del-<pid>-<tag>   a folder being deleted (:func:`remove_folder`; never put back)

A save renames ``tmp`` to ``new``, NAME to ``old``, ``new`` to NAME, then deletes ``old``. The
only instant without NAME is between the last two renames, and :func:`recover` (called by every
save and load) finishes such a swap and removes what dead writers left behind; a live writer's
leftovers are its own to finish. Every rename is followed by an fsync of the parent folder, so
the order survives a power cut as well as a kill.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

__all__ = ["replace_folder", "remove_folder", "recover", "locked", "FolderLockedError"]

logger = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<state>tmp|new|old|del)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be mid-save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def fsync_folder(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where folders cannot be
    opened (Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(Path(folder))


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def recover(path, *, everything: bool = False) -> None:
    """Finish or undo a swap of ``path`` that a killed process left half done, and remove the
    temporaries of dead writers. With ``everything``, ``path`` is a folder whose entries are
    all recovered (a checkpoint folder). Best effort: what cannot be removed stays."""
    path = Path(path)
    parent = path if everything else path.parent
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    found: dict[str, list[tuple[str, Path]]] = {}
    for entry in entries:
        m = _LEFTOVER.match(entry)
        if m and (everything or m["name"] == path.name) and not _alive(int(m["pid"])):
            found.setdefault(m["name"], []).append((m["state"], parent / entry))
    for name, leftovers in found.items():
        target = parent / name
        try:
            if not os.path.lexists(target):
                # Killed between "NAME -> old" and "new -> NAME": the new version is complete.
                done = [p for state, p in leftovers if state == "new"] or [
                    p for state, p in leftovers if state == "old"
                ]
                if done:
                    os.rename(done[0], target)
                    fsync_folder(parent)
                    logger.warning("recovered %s from an interrupted save", target)
            for _, p in leftovers:
                if os.path.lexists(p):
                    _delete(p)
        except OSError as e:
            logger.warning("could not clean up after an interrupted save of %s: %s", target, e)


def _tag() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` what ``old`` holds that ``new`` does not."""
    for entry in sorted(old.iterdir()):
        if os.path.lexists(new / entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with the destination in its message (a full disk or a refused write says which
    output it was writing)."""
    message = f"cannot write {path}: {e.strerror or e}"
    if e.filename is not None and str(e.filename) != str(path):
        message += f" ({e.filename})"
    return type(e)(e.errno, message) if e.errno is not None else OSError(message)


def replace_folder(path, write: Callable[[Path], None], *, keep_other_files: bool = False) -> Path:
    """Replace folder ``path`` by what ``write(folder)`` puts in an empty folder, atomically.

    Parameters
    ----------
    path : path-like
        The destination; its parent folders are created. An existing non-folder is an error.
    write : callable
        Fills the empty folder it is given; an exception leaves ``path`` as it was.
    keep_other_files : bool
        Carry over (hard-link or copy) the old version's entries that ``write`` did not write.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OSError
        Naming ``path`` (disk full, permission denied, ...); ``path`` is left as it was.
    """
    path = Path(path)
    parent = path.parent
    if os.path.lexists(path) and not path.is_dir():
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _named(e, path) from e
    recover(path)
    tag = _tag()
    tmp, new, old = (parent / f".{path.name}.{state}-{tag}" for state in ("tmp", "new", "old"))
    try:
        os.mkdir(tmp)
        try:
            write(tmp)
            if keep_other_files and path.is_dir():
                _carry_over(path, tmp)
            _fsync_tree(tmp)
            os.rename(tmp, new)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_folder(parent)
        moved_aside = False
        try:
            if os.path.lexists(path):
                os.rename(path, old)
                moved_aside = True
            os.rename(new, path)
        except BaseException:
            # Put things back as they were (a KeyboardInterrupt between the renames, or an error).
            if moved_aside and not os.path.lexists(path):
                os.rename(old, path)
            shutil.rmtree(new, ignore_errors=True)
            raise
        fsync_folder(parent)
    except OSError as e:
        raise _named(e, path) from e
    if moved_aside:
        try:
            _delete(old)
        except OSError as e:  # the new version is in place; the next save retries
            logger.warning("could not remove the previous version of %s: %s", path, e)
    return path


def remove_folder(path) -> None:
    """Delete folder ``path``: renamed aside first, so a kill mid-delete never leaves a partial
    folder under its name (:func:`recover` removes the rest later)."""
    path = Path(path)
    aside = path.parent / f".{path.name}.del-{_tag()}"
    os.rename(path, aside)
    fsync_folder(path.parent)
    _delete(aside)


class FolderLockedError(ValueError):
    """Another process (or thread) holds the folder's lock."""


_held: dict[str, int] = {}  # lock file -> thread id, for this process's own locks
_held_lock = threading.Lock()


@contextmanager
def locked(folder, *, what: str = "folder"):
    """Hold an exclusive lock on ``folder`` (created if needed) while the block runs.

    A second process (or another thread of this one) is refused at once with
    :class:`FolderLockedError` naming the holder's process id; the same thread may nest. The
    lock is ``flock`` on ``folder/.lock``, released by the OS when the process dies, so a kill
    never leaves the folder locked. Without ``fcntl`` (Windows) nothing is locked.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".lock"
    key = os.path.realpath(lock_path)
    me = threading.get_ident()
    with _held_lock:
        holder = _held.get(key)
        if holder is not None and holder != me:
            raise FolderLockedError(f"{what} {folder} is in use by another thread of this process")
        nested = holder == me
        if not nested:
            _held[key] = me
    if nested:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        fcntl = None  # type: ignore[assignment]
    fd = None
    try:
        if fcntl is not None:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                raise FolderLockedError(
                    f"{what} {folder} is in use by another process (pid {other}); wait for it to finish or stop it"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock
        with _held_lock:
            _held.pop(key, None)
