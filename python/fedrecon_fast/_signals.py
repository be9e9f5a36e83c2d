"""Stopping a training run cleanly on SIGTERM, SIGINT and SIGHUP.

While :func:`stop_on_signals` is active (the CLI wraps ``fit`` in it), these signals only set a
flag: the training loop checks :func:`stop_requested` between rounds, finishes the round it is
in, writes its final checkpoint when it has a checkpoint folder, and returns; the CLI then exits
with status 128 + the signal number, as a process killed by it would report. The first signal
restores the previous handler, so a second one of the same kind acts at once (a second Ctrl-C
interrupts; checkpoint writes are atomic, so nothing is torn).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

__all__ = ["SIGNALS", "Stopped", "stop_on_signals", "stop_requested"]

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
_requested: int | None = None
_previous: dict = {}  # signal -> the handler to restore


class Stopped(Exception):
    """Training stopped early on a signal (``signum``)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def stop_requested() -> int | None:
    """The number of the signal that asked training to stop, or None."""
    return _requested


def _handle(signum, frame) -> None:
    global _requested
    _requested = signum
    signal.signal(signum, _previous.get(signum) or signal.SIG_DFL)


class _Outcome:
    signum: int | None = None  # the signal that stopped the block, set when it ends


@contextmanager
def stop_on_signals():
    """Turn SIGTERM, SIGINT and SIGHUP into a stop request while the block runs; the object
    it yields has ``signum`` (None, or the signal) once the block ends. Main thread only:
    elsewhere Python cannot set handlers, and nothing changes."""
    global _requested
    outcome = _Outcome()
    if threading.current_thread() is not threading.main_thread():
        yield outcome
        return
    _requested = None
    _previous.clear()
    for s in SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # e.g. SIGHUP under nohup stays ignored
            _previous[s] = signal.signal(s, _handle)
    try:
        yield outcome
    finally:
        for s, handler in _previous.items():
            signal.signal(s, handler or signal.SIG_DFL)
        _previous.clear()
        outcome.signum, _requested = _requested, None
