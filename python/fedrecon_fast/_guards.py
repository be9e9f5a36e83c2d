"""What keeps a trainer's ``fit`` safe to call: one at a time per trainer, and the lock of its
checkpoint folder for the whole call (:func:`fedrecon_fast.checkpoint.locked`)."""

from __future__ import annotations

import functools
import threading


def one_fit_at_a_time(fit):
    """Decorate a trainer's ``fit``: a second call while one runs (from another thread, or from
    the first call's callback) raises ``RuntimeError`` instead of interleaving rounds on one
    model; with ``checkpoint_dir``, the folder stays locked until ``fit`` returns."""

    @functools.wraps(fit)
    def guarded(self, *args, **kwargs):
        lock = self.__dict__.setdefault("_fit_lock", threading.Lock())  # setdefault is atomic
        if not lock.acquire(blocking=False):
            raise RuntimeError(
                f"this {type(self).__name__} is already running fit (in another thread, "
                "or fit was called from its own callback); use one trainer per thread"
            )
        try:
            directory = kwargs.get("checkpoint_dir")
            if directory is None:
                return fit(self, *args, **kwargs)
            from .checkpoint import locked

            with locked(directory):
                return fit(self, *args, **kwargs)
        finally:
            lock.release()

    return guarded
