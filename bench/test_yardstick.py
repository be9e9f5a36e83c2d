"""The yardstick library (``bench/yardstick.py``) must not change the benchmark process's
floating point: linked with -ffast-math it would turn on flush-to-zero and denormals-are-zero in
the thread that loads it, and so for every engine, NumPy and PyTorch timing after it."""

import numpy as np
import pytest

import yardstick


@pytest.mark.skipif(not yardstick.available(), reason="no C++ compiler on PATH (set CXX)")
def test_loading_the_yardstick_keeps_denormals():
    tiny = np.array([1e-39], np.float32)  # a float32 denormal
    assert (tiny * np.float32(1.0))[0] != 0.0
    yardstick.build()
    assert (tiny * np.float32(1.0))[0] != 0.0  # FTZ would flush the result
    assert (tiny + np.float32(0.0))[0] == tiny[0]  # DAZ would read the operand as zero
