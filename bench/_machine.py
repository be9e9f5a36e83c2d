"""The machine a benchmark ran on: hardware line, FP32 FMA peak (with its derivation), memory use."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# FMA pipes per core. Every x86 core with AVX2+FMA since Intel Haswell and AMD Zen 2 has two
# 256-bit FMA pipes (Zen 1 has two 128-bit ones); /proc/cpuinfo cannot tell, so it is assumed.
FMA_UNITS = 2


def cpuinfo() -> dict:
    """Model name, family/model, flags, clock (MHz) of the first CPU, and the logical CPU count."""
    info = {"model_name": platform.processor() or "unknown", "flags": set(), "mhz": None,
            "family": None, "model": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            info["model_name"] = value
        elif key == "flags":
            info["flags"] = set(value.split())
        elif key == "cpu MHz":
            info["mhz"] = float(value)
        elif key == "cpu family":
            info["family"] = int(value)
        elif key == "model":
            info["model"] = int(value)
    info["cpus"] = os.cpu_count()
    info["hypervisor"] = "hypervisor" in info["flags"]
    return info


def _lscpu(field: str) -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return None


def fp32_peak() -> dict:
    """FP32 FMA peak per core and its derivation (SIMD width from the flags, clock from cpu MHz)."""
    info = cpuinfo()
    flags = info["flags"]
    if "avx512f" in flags:
        lanes, isa = 16, "512-bit AVX-512"
    elif "avx" in flags or "avx2" in flags:
        lanes, isa = 8, "256-bit AVX2"
    else:
        lanes, isa = 4, "128-bit SSE"
    flops_per_lane = 2 if "fma" in flags or "avx512f" in flags else 1
    mhz = info["mhz"] or 2000.0
    per_core = lanes * flops_per_lane * FMA_UNITS * mhz / 1e3
    note = "; avx512f not exposed" if "avx512f" not in flags and "avx2" in flags else ""
    derivation = (f"{lanes} fp32 lanes ({isa}{note}) x {flops_per_lane} flops per "
                  f"{'FMA' if flops_per_lane == 2 else 'op'} x {FMA_UNITS} FMA pipes per core (assumed) "
                  f"x {mhz / 1e3:.3f} GHz ('cpu MHz' of /proc/cpuinfo"
                  f"{'; a VM reports its nominal clock, a turbo clock would raise the peak' if info['hypervisor'] else ''})"
                  f" = {per_core:.1f} GFLOP/s per core")
    return {"gflops_per_core": per_core, "lanes": lanes, "fma_units": FMA_UNITS, "ghz": mhz / 1e3,
            "derivation": derivation}


def hardware_line() -> str:
    info = cpuinfo()
    l2 = _lscpu("L2 cache")
    l3 = _lscpu("L3 cache")
    simd = [f for f in ("avx512f", "avx2", "fma") if f in info["flags"]]
    fam = f", family {info['family']} model {info['model']}" if info["family"] is not None else ""
    vm = ", KVM guest" if info["hypervisor"] else ""
    caches = ", ".join(x for x in (f"L2 {l2}" if l2 else "", f"L3 {l3}" if l3 else "") if x)
    return (f"{info['model_name']}{fam}, {info['cpus']} logical CPUs{vm}, {(info['mhz'] or 0) / 1e3:.2f} GHz, "
            f"{'+'.join(simd) or 'no AVX'}{', ' + caches if caches else ''}")


def software() -> dict:
    import numpy as np

    import fedrecon_fast

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import datetime

    from fedrecon_fast._native import core as _core

    built = datetime.datetime.fromtimestamp(Path(_core.__file__).stat().st_mtime, datetime.timezone.utc)
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cI"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        head = None
    return {"python": platform.python_version(), "numpy": np.__version__,
            "fedrecon_fast": fedrecon_fast.__version__, "git": commit, "git_head": head,
            "native_built": built.strftime("%Y-%m-%dT%H:%M:%SZ")}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Start a new peak (VmHWM) from the current RSS, where Linux allows it; False elsewhere
    (peaks then include everything before)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_mib() -> dict:
    """Current and peak resident set size of this process, MiB (VmRSS / VmHWM)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1]) / 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = {"VmRSS": None, "VmHWM": peak}
    return {"rss_mib": out.get("VmRSS"), "peak_rss_mib": out.get("VmHWM")}
