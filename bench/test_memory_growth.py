"""Resident memory does not grow with rounds: the native round reuses its scratch, and the
trainer grows only by its history rows (about a kilobyte per round).

The script runs in a fresh interpreter: inside the pytest process the heap already holds the
other benchmarks' leftovers, and the allocator's occasional one-off step (about 0.8 MiB, seen
once in CI) over a 400-round window reads as 2 MiB per 1,000 rounds. The bounds still catch
any leak of one round-sized buffer: the smallest, the cohort's 100 ClientStats, is 6 KiB."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "memory_growth.py"


def test_rounds_do_not_grow_resident_memory():
    run = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "400", "--every", "50", "--synthetic"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    kernel, trainer = (json.loads(line) for line in run.stdout.splitlines() if line.startswith("{"))
    assert kernel["phase"] == "kernel" and trainer["phase"] == "trainer"
    assert kernel["growth_mb_per_1000_rounds"] < 4.0, kernel["samples"]
    assert trainer["growth_mb_per_1000_rounds"] < 5.0, trainer["samples"]
