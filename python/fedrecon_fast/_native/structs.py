"""The configuration objects of :mod:`fedrecon_fast.config` as the native structs they become.

Each Python dataclass is validated when it is made; here it is only copied, field by field,
into the bound C++ struct (``tests/test_native_stubs.py`` checks that the fields correspond).
"""

from __future__ import annotations

import dataclasses

from ..config import INITS, RECON_METHODS, SPLITS, WEIGHTINGS, ClientConfig, UpdateCodec
from . import core

# Python's names of the native enums' values.
_ENUMS = {"split": SPLITS, "recon": RECON_METHODS, "init": INITS, "weighting": WEIGHTINGS}
# Optional step caps: None in Python, 0 ("no cap") in C++.
_OPTIONAL_CAPS = ("recon_steps_max", "update_steps_max")


def client_config(config: ClientConfig, user_default=None, user_bias_default: float = 0.0) -> core.ClientConfig:
    """``fedrecon::ClientConfig``: ``config`` plus a learned default for ``u`` (a validated
    float32 vector, or None) and ``b_u``."""
    native = core.ClientConfig()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _ENUMS:
            value = _ENUMS[f.name][value]
        elif f.name in _OPTIONAL_CAPS:
            value = value or 0
        setattr(native, f.name, value)
    if user_default is not None:
        native.user_default = user_default
        native.user_bias_default = float(user_bias_default)
    return native


def update_codec(codec: UpdateCodec) -> core.UpdateCodec:
    """``fedrecon::UpdateCodec``: the same fields, copied."""
    native = core.UpdateCodec()
    for f in dataclasses.fields(codec):
        setattr(native, f.name, getattr(codec, f.name))
    return native
