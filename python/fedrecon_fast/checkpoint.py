"""Checkpoints of a training run: everything needed to continue it bit for bit, no pickle.

A checkpoint is a directory ``ckpt-<round, 8 digits>`` inside the checkpoint folder:

- ``model/``: the global model (:meth:`GlobalModel.save` format);
- ``trainer.npz``: the server optimizer's state and, for stateful baselines, the stored users;
- ``trainer.json``: round, configuration, history, counters, and the SHA-256 of every other
  file, written last.

It is written in a temporary directory beside the others and renamed into place, so a process
killed at any moment leaves either the complete checkpoint or none; older checkpoints are
deleted only after the new one is in place. Random choices are keyed by (seed, round, client),
so the round number is the whole random state. Loading checks the format, the checksums and the
shapes, and :func:`latest` falls back to the newest checkpoint that passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ._files import make_temp_dir
from .model import GlobalModel

__all__ = ["CheckpointError", "save", "load", "latest", "list_checkpoints"]

FORMAT = "fedrecon_fast.checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8,})$")
logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted or does not belong to this run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint directories in ``directory``, newest (highest round) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def save(directory, trainer, *, keep: int = 2) -> Path:
    """Write ``trainer``'s state as a new checkpoint in ``directory``; keep the newest ``keep``.

    Refuses a non-finite model: the last good checkpoint stays the newest.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    model = trainer.model
    if model is None:
        raise ValueError("nothing to checkpoint: the model is not trained yet")
    if not np.isfinite(model.item_factors).all():
        raise FloatingPointError("refusing to checkpoint a non-finite model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{trainer.round:08d}"
    tmp = make_temp_dir(directory, prefix=".ckpt-tmp-")
    try:
        model.save(tmp / "model")
        arrays = {f"opt:{k}": v for k, v in (trainer._opt_state or {}).items()}
        arrays.update({f"extra:{k}": v for k, v in trainer._extra_arrays().items()})
        np.savez(tmp / "trainer.npz", **arrays)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "trainer": type(trainer).__name__,
            "round": trainer.round,
            "config": trainer.config.to_dict(),
            "history": trainer.history,
            "broadcasted_bits": trainer.broadcasted_bits,
            "aggregated_bits": trainer.aggregated_bits,
            "train_seconds": trainer.train_seconds,
            "eval_seconds": trainer.eval_seconds,
            "sha256": {name: _sha256(tmp / name) for name in files},
        }
        (tmp / "trainer.json").write_text(json.dumps(meta))
        _fsync_tree(tmp)
        if final.exists():  # the same round again (e.g. fit(rounds=0)): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path) -> dict:
    """Read one checkpoint directory; anything wrong raises :class:`CheckpointError`."""
    path = Path(path)
    meta_path = path / "trainer.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint (trainer.json missing)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} is not a {FORMAT} v{FORMAT_VERSION} file")
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or "trainer.npz" not in sums or "model/model.npz" not in sums:
        raise CheckpointError(f"{meta_path} lists no checksums")
    for name, digest in sums.items():
        file = path / name
        if not file.is_file() or _sha256(file) != digest:
            raise CheckpointError(f"{file} is missing or corrupted (checksum mismatch)")
    try:
        model = GlobalModel.load(path / "model")
        with np.load(path / "trainer.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    meta["model"] = model
    meta["optimizer_state"] = {k[4:]: v for k, v in arrays.items() if k.startswith("opt:")}
    meta["extra"] = {k[6:]: v for k, v in arrays.items() if k.startswith("extra:")}
    return meta


def latest(directory) -> dict | None:
    """The newest checkpoint in ``directory`` that loads (None when there is none).

    A corrupted checkpoint is skipped with a warning and left in place for inspection; if every
    checkpoint is corrupted, :class:`CheckpointError` names the newest.
    """
    errors = []
    for path in list_checkpoints(directory):
        try:
            return load(path)
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
            errors.append(str(e))
    if errors:
        raise CheckpointError(f"no valid checkpoint in {directory}: {errors[0]}")
    return None
