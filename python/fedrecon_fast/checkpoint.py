"""Checkpoints of a training run: everything needed to continue it bit for bit, no pickle.

A checkpoint is a folder ``ckpt-<round, 8 digits>`` inside the checkpoint folder, in the same
verified format as saved models (:mod:`fedrecon_fast._bundle`): one ``.npy`` file per array
(the model's, ``model/...``; the server optimizer's state, ``opt/...``; a stateful baseline's
stored users, ``extra/...``) and a ``manifest`` with the round, configuration, history and
counters and the SHA-256 of every file and of itself.

A checkpoint is written beside the others and swapped into place
(:func:`fedrecon_fast._folders.replace_folder`), so a process killed at any moment leaves
complete checkpoints only; older ones are renamed aside before they are deleted. Random choices
are keyed by (seed, round, client), so the round number is the whole random state. Loading
verifies every byte and the schema, and :func:`latest` falls back to the newest checkpoint that
verifies, whatever is wrong with the newer ones. While a process trains into a checkpoint folder
it holds the folder's lock (:func:`fedrecon_fast._folders.locked`): a second one is refused.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from . import _bundle, _folders
from .model import GlobalModel

__all__ = ["CheckpointError", "save", "load", "latest", "list_checkpoints", "locked"]

FORMAT = "fedrecon_fast.checkpoint"
_NAME = re.compile(r"^ckpt-(\d{8,})$")
_INT64_MAX = 2**63 - 1
logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted or does not belong to this run."""


def locked(directory):
    """Context manager: hold the lock of checkpoint folder ``directory`` (created if needed);
    another process (or thread) gets :class:`fedrecon_fast._folders.FolderLockedError`."""
    return _folders.locked(directory, what="checkpoint folder")


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint directories in ``directory``, newest (highest round) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def save(directory, trainer, *, keep: int = 2) -> Path:
    """Write ``trainer``'s state as a new checkpoint in ``directory``; keep the newest ``keep``.

    ``trainer`` is a :class:`fedrecon_fast.FedRecon` (or subclass): its server ``state``
    (model, optimizer state, round, bits), ``config``, ``history``, time counters and
    ``extra_state()`` (what else its rounds keep) are written.

    Refuses a non-finite model: the last good checkpoint stays the newest.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    model = trainer.model
    if model is None:
        raise ValueError("nothing to checkpoint: the model is not trained yet")
    if not np.isfinite(model.item_factors).all():
        raise FloatingPointError("refusing to checkpoint a non-finite model")
    model_meta, model_arrays = model.to_parts()
    arrays = {f"model/{k}": v for k, v in model_arrays.items()}
    arrays.update({f"opt/{k}": v for k, v in (trainer.state.optimizer_state or {}).items()})
    arrays.update({f"extra/{k}": v for k, v in trainer.extra_state().items()})
    meta = {
        "trainer": type(trainer).__name__,
        "round": trainer.round,
        "config": trainer.config.to_dict(),
        "history": trainer.history,
        "broadcasted_bits": trainer.broadcasted_bits,
        "aggregated_bits": trainer.aggregated_bits,
        "train_seconds": trainer.train_seconds,
        "eval_seconds": trainer.eval_seconds,
        "model": model_meta,
    }
    directory = Path(directory)
    final = directory / f"ckpt-{trainer.round:08d}"
    _from_parts(f"checkpoint to save as {final}", meta, arrays)  # write only what loads back
    with locked(directory):
        _folders.replace_folder(final, lambda folder: _bundle.write(folder, FORMAT, meta, arrays))
        for old in list_checkpoints(directory)[keep:]:
            try:
                _folders.remove_folder(old)
            except OSError as e:
                logger.warning("could not remove old checkpoint %s: %s", old, e)
    return final


def _from_parts(where, meta: dict, arrays: dict) -> dict:
    """The :func:`load` result of a verified manifest's ``meta`` and arrays (strict schema)."""
    schema = _bundle.Schema(where, meta, arrays)
    schema.keys(
        {
            "trainer",
            "round",
            "config",
            "history",
            "broadcasted_bits",
            "aggregated_bits",
            "train_seconds",
            "eval_seconds",
            "model",
        }
    )
    trainer = schema.of_type("trainer", str)
    if not trainer.isidentifier():
        schema.fail(f"'trainer' must be a class name; got {trainer!r}")
    schema.integer("round", 0, _INT64_MAX)
    schema.of_type("config", dict)
    history = schema.of_type("history", list)
    if not all(isinstance(row, dict) and all(isinstance(k, str) for k in row) for row in history):
        schema.fail("'history' must be a list of objects")
    for key in ("broadcasted_bits", "aggregated_bits"):
        schema.integer(key, 0, 2**127)
    for key in ("train_seconds", "eval_seconds"):
        schema.number(key, 0.0)
    model_arrays = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
    model = GlobalModel.from_parts(_bundle.Schema(where, schema.of_type("model", dict), model_arrays, prefix="model."))
    groups = ("model/", "opt/", "extra/")
    schema.no_other_arrays([k for k in arrays if k.startswith(groups)])
    out = dict(meta)
    out["model"] = model
    out["optimizer_state"] = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
    out["extra"] = {k[6:]: v for k, v in arrays.items() if k.startswith("extra/")}
    return out


def load(path) -> dict:
    """Read and verify one checkpoint folder; anything wrong raises :class:`CheckpointError`
    naming the file."""
    path = Path(path)
    try:
        if not _bundle.is_bundle(path) and (path / "trainer.json").exists():
            raise CheckpointError(
                f"{path} is a checkpoint of fedrecon_fast 0.1 (trainer.json), whose "
                "files cannot be verified; this release does not resume from it: "
                "start a new checkpoint folder"
            )
        meta, arrays = _bundle.read(path, FORMAT)
        return _from_parts(path / _bundle.MANIFEST, meta, arrays)
    except CheckpointError:
        raise
    except (ValueError, OSError) as e:
        raise CheckpointError(str(e)) from None


def latest(directory) -> dict | None:
    """The newest checkpoint in ``directory`` that loads (None when there is none).

    A corrupted checkpoint is skipped with a warning and left in place for inspection; if every
    checkpoint is corrupted, :class:`CheckpointError` names the newest.
    """
    _folders.recover(directory, everything=True)
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
