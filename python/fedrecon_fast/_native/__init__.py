"""Where Python meets the C++ core: the native module for this CPU, chosen at import.

The extension is compiled once per SIMD target (``cpp/CMakeLists.txt``): ``baseline`` (x86-64
with SSE2, which every x86-64 CPU runs; on other architectures, the compiler's default),
``avx2`` (x86-64-v3: AVX2 + FMA) and ``avx512`` (x86-64-v4), each a complete module
``_core_<target>``. At import the best target this CPU (and its OS) runs is loaded, the way NumPy
and SimSIMD dispatch, so one wheel runs everywhere and is fast where the hardware allows. A
build with ``FEDRECON_NATIVE=ON`` holds a single ``_core_native`` module (``-march=native``)
instead.

``FEDRECON_TARGET=<target>`` in the environment forces a target (a ``ValueError`` names what
is compiled and runnable when it is not). Results never depend on the thread count; between
targets they may differ in float32 rounding (vector width and fused multiply-adds change the
order of operations in the SGD kernels), never in the float64 reductions.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING

__all__ = ["core", "TARGETS", "compiled_targets", "show_config", "__version__"]

# Preference order: the widest target first.
TARGETS = ("native", "avx512", "avx2", "baseline")


def compiled_targets() -> list[str]:
    """The targets whose modules this installation holds, widest first."""
    return [t for t in TARGETS if importlib.util.find_spec(f"{__name__}._core_{t}") is not None]


def _load():
    compiled = compiled_targets()
    if not compiled:
        raise ImportError("fedrecon_fast has no compiled native module (_core_<target>); reinstall the package")
    # The baseline module runs on every CPU of the architecture: it tells what this CPU supports.
    probe = importlib.import_module(f"{__name__}._core_{compiled[-1]}")
    runnable = [t for t in compiled if t == "native" or probe.cpu_supports(t)]
    forced = os.environ.get("FEDRECON_TARGET")
    if forced:
        if forced not in runnable:
            raise ValueError(
                f"FEDRECON_TARGET={forced!r} is not a compiled target this CPU runs; "
                f"compiled: {compiled}, runnable here: {runnable}"
            )
        chosen = forced
    else:
        chosen = runnable[0]
    return importlib.import_module(f"{__name__}._core_{chosen}"), compiled, runnable


if TYPE_CHECKING:  # every _core_<target> has the interface of the stub _core.pyi
    from . import _core as core

    _compiled: list[str]
    _runnable: list[str]
else:
    core, _compiled, _runnable = _load()
__version__: str = core.__version__


def show_config(file=None) -> None:
    """Print the native build: the baseline, the targets compiled, the CPU features found, and
    the target in use (NumPy's ``show_config`` is the model)."""
    file = sys.stdout if file is None else file
    features = dict(core.cpu_features())
    lines = [
        "fedrecon_fast native core",
        f"  version:            {core.__version__}",
        f"  compiler:           {core.COMPILER}",
        "  baseline:           "
        + ("x86-64 (SSE2)" if features else "the compiler's default for this CPU architecture"),
        f"  targets compiled:   {', '.join(reversed(_compiled))}",
        f"  runnable here:      {', '.join(reversed(_runnable))}",
        f"  in use:             {core.TARGET} ({core.TARGET_FLAGS or 'no extra flags'})"
        + (" (forced by FEDRECON_TARGET)" if os.environ.get("FEDRECON_TARGET") else ""),
        "  CPU features found: " + (", ".join(n for n, ok in features.items() if ok) or "none the targets use"),
        "  CPU features missing: " + (", ".join(n for n, ok in features.items() if not ok) or "none"),
    ]
    print("\n".join(lines), file=file)
