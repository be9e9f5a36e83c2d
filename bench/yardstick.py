"""The plain-loop yardstick (``bench/yardstick.cpp``): compile it, feed it a round, time it.

The yardstick is the round's arithmetic as straightforward single-thread C++ loops, built with
the release flags of the native module in use (``-O3`` and the dispatched target's ``-march``,
see ``fedrecon_fast.show_config()``) plus ``-ffast-math``, and no determinism contract. It runs the same clients with the same splits and initial embeddings as
the engine (the plans of :func:`numpy_round.plan_round`), so its model after a round is checked
against the engine's and the two times compare like for like.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from fedrecon_fast._native import core

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "yardstick.cpp"
FLAGS = ["-O3", "-DNDEBUG", *core.TARGET_FLAGS.split(), "-ffast-math", "-std=c++17", "-shared", "-fPIC"]
# Compiled with FLAGS, linked without -ffast-math: at link time it adds crtfastmath.o, whose
# constructor turns on flush-to-zero and denormals-are-zero in the loading thread, and so for
# everything measured after it in the benchmark's process (the engine, NumPy, PyTorch).
_COMPILE = [f for f in FLAGS if f != "-shared"]

__all__ = ["FLAGS", "available", "build", "Yardstick"]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def available() -> bool:
    """True when a C++ compiler is on PATH (the yardstick is built on first use)."""
    return _compiler() is not None


def build() -> ctypes.CDLL:
    """Compile the yardstick once per source and flags (cached in the temp folder) and load it."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX) to build bench/yardstick.cpp")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, *FLAGS, "no-crtfastmath"]).encode()).hexdigest()[:16]
    lib = Path(tempfile.gettempdir()) / f"fedrecon_yardstick_{key}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        obj = lib.with_suffix(f".{os.getpid()}.o")
        subprocess.run([cxx, *_COMPILE, "-c", str(SOURCE), "-o", str(obj)], check=True)
        subprocess.run([cxx, "-shared", str(obj), "-o", str(tmp)], check=True)
        obj.unlink()
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    f = dll.yardstick_round
    p = ctypes.c_void_p
    i64 = ctypes.c_int64
    f.argtypes = [p, i64, ctypes.c_int, p, p, p, p, i64, p, p, p, p, p, p, p,
                  ctypes.c_int, i64, ctypes.c_float, ctypes.c_int, i64, ctypes.c_float, ctypes.c_float]
    f.restype = None
    return dll


def _flatten(plans, which: str):
    """Positions, batch offsets and each client's first batch, over all clients' plans."""
    pos, off, first = [], [0], [0]
    for plan in plans:
        p, b = getattr(plan, which), getattr(plan, f"{which}_bounds")
        base = off[-1]
        pos.append(p)
        off.extend((base + b[1:]).tolist())
        first.append(first[-1] + len(b) - 1)
    pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    return (np.ascontiguousarray(pos, np.int64), np.asarray(off, np.int64), np.asarray(first, np.int64))


class Yardstick:
    """One round of the paper recipe for a given cohort, ready to run: ``Yardstick(...)(V)``.

    Parameters
    ----------
    data : ClientData
        The training clients (CSR, stored order).
    clients : ndarray of int64
        The cohort.
    plans : list of numpy_round.ClientPlan
        Each client's split and initial embedding (the engine's random streams).
    config : FedReconConfig
        Schedule and learning rates (SGD reconstruction, u frozen, no biases, no L2).
    """

    def __init__(self, data, clients, plans, config):
        cc = config.client
        if cc.recon != "sgd" or cc.joint or cc.recon_l2 or cc.update_l2:
            raise ValueError("the yardstick implements the paper recipe: SGD reconstruction, u frozen, no L2")
        self._fn = build().yardstick_round
        self.clients = np.ascontiguousarray(clients, np.int64)
        self.indptr, self.items, self.ratings = data.indptr, data.items, data.ratings
        self.u0 = np.ascontiguousarray(np.stack([p.u0 for p in plans]), np.float32)
        self.sup = _flatten(plans, "support")
        self.qry = _flatten(plans, "query")
        self.schedule = (int(cc.recon_epochs), int(cc.recon_steps_max or 0), float(cc.recon_lr),
                         int(cc.update_epochs), int(cc.update_steps_max or 0), float(cc.client_lr),
                         float(config.server_lr))

    def __call__(self, V: np.ndarray) -> None:
        """Run the round, updating ``V`` (float32, C-contiguous) in place."""
        if V.dtype != np.float32 or not V.flags.c_contiguous or not V.flags.writeable:
            raise ValueError("V must be a writeable C-contiguous float32 array")
        ptr = lambda a: a.ctypes.data  # noqa: E731
        self._fn(ptr(V), V.shape[0], V.shape[1], ptr(self.indptr), ptr(self.items), ptr(self.ratings),
                 ptr(self.clients), len(self.clients), ptr(self.u0), *map(ptr, self.sup), *map(ptr, self.qry),
                 *self.schedule)
