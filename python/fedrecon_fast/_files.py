"""Temporary folders for atomic writes that end up with normal permissions."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def make_temp_dir(parent, prefix: str = ".tmp-", suffix: str = "") -> Path:
    """A new, empty folder in ``parent`` with a random name, for writing next to a destination
    and renaming into place.

    Unlike ``tempfile.mkdtemp`` (always mode 0700), it is created like any folder, mode 0777
    minus the umask, so the folder renamed into place reads like one the user made.
    """
    parent = Path(parent)
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a temporary folder in {parent}")  # pragma: no cover
