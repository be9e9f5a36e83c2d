"""Resident memory does not grow with rounds: the native round reuses its scratch, and the
trainer grows only by its history rows (about a kilobyte per round)."""

import memory_growth


def test_rounds_do_not_grow_resident_memory(capsys):
    kernel, trainer = memory_growth.main(["--rounds", "400", "--every", "50", "--synthetic"])
    assert kernel["growth_mb_per_1000_rounds"] < 2.0, kernel["samples"]
    assert trainer["growth_mb_per_1000_rounds"] < 4.0, trainer["samples"]
