"""Counter-based seeding: bit-exact SplitMix64 as in the C++ core."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedrecon_fast import _rng

M64 = (1 << 64) - 1


def reference_derive_seed(seed, rnd, client, stream):
    """The C++ steps, written out plainly with Python ints."""
    out = None
    state = seed & M64
    for extra in (None, rnd, client, stream):
        if extra is not None:
            state = out ^ (extra & M64)
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out = z ^ (z >> 31)
    return out


def test_mix64_of_zero_is_the_splitmix64_reference_output():
    # First output of the reference splitmix64.c with state 0.
    assert _rng.mix64(0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("args", [(0, 0, 0, 0), (1, 2, 3, 4), (2**64 - 1, 500, 6040, 4), (123456789, 0, 2**63, 1)])
def test_derive_seed_matches_hand_coded_steps(args):
    assert _rng.derive_seed(*args) == reference_derive_seed(*args)


def test_derive_seed_zero_value():
    value = _rng.derive_seed(0, 0, 0, 0)
    assert value == reference_derive_seed(0, 0, 0, 0)
    assert 0 <= value < 2**64


def test_negative_inputs_wrap_modulo_2_64():
    assert _rng.derive_seed(-1, -2, -3, -4) == _rng.derive_seed(2**64 - 1, 2**64 - 2, 2**64 - 3, 2**64 - 4)
    assert _rng.derive_seed(2**64 + 5, 0, 0, 0) == _rng.derive_seed(5, 0, 0, 0)


def test_streams_and_coordinates_give_distinct_seeds():
    seeds = {_rng.derive_seed(0, r, c, s) for r in range(3) for c in range(3) for s in range(5)}
    assert len(seeds) == 45


RNG_HEADER = Path(__file__).resolve().parents[1] / "cpp" / "include" / "fedrecon" / "rng.hpp"


def _cpp_streams() -> dict:
    """``{"STREAM_SPLIT": 0, ...}`` from the C++ ``enum Stream`` (kStreamSplit = 0, ...)."""
    enum = re.search(r"enum Stream\b[^{]*\{(.*?)\};", RNG_HEADER.read_text(), re.S).group(1)
    found = {}
    for name, value in re.findall(r"kStream(\w+)\s*=\s*(\d+)", enum):
        found["STREAM_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()] = int(value)
    return found


def test_stream_numbers_are_the_cpp_enum_number_by_number():
    """One table of streams: every stream of the C++ core has the Python constant of the same
    name and number, and Python has no stream the core does not know."""
    cpp = _cpp_streams()
    python = {name: getattr(_rng, name) for name in _rng.__all__ if name.startswith("STREAM_")}
    assert len(cpp) >= 12  # the parse found the enum
    assert python == cpp
    assert len(set(cpp.values())) == len(cpp)  # no two streams share a number


def test_mix64_array_matches_scalar_elementwise():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.integers(0, 2**64 - 1, size=200, dtype=np.uint64, endpoint=True),
            np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64),
        ]
    )
    before = x.copy()
    out = _rng.mix64_array(x)
    assert out.dtype == np.uint64 and out.shape == x.shape
    assert [int(v) for v in out] == [_rng.mix64(int(v)) for v in x]
    np.testing.assert_array_equal(x, before)  # input untouched


def test_mix64_array_keeps_shape_and_accepts_signed_and_0d():
    x = np.arange(-3, 3, dtype=np.int64).reshape(2, 3)
    out = _rng.mix64_array(x)
    assert out.shape == (2, 3)
    assert [int(v) for v in out.ravel()] == [_rng.mix64(int(v)) for v in x.ravel()]
    zero_d = _rng.mix64_array(np.uint64(7))
    assert zero_d.shape == () and int(zero_d) == _rng.mix64(7)
    with pytest.raises(TypeError):
        _rng.mix64_array(np.array([1.0]))


def test_derive_seed_array_broadcasts_and_matches_scalar():
    clients = np.array([0, 1, 6040, 2**40], dtype=np.int64)
    out = _rng.derive_seed_array(7, 3, clients, _rng.STREAM_DATA)
    assert out.dtype == np.uint64
    assert [int(v) for v in out] == [_rng.derive_seed(7, 3, int(c), _rng.STREAM_DATA) for c in clients]
    grid = _rng.derive_seed_array(np.arange(2)[:, None], 0, np.arange(3)[None, :], 1)
    assert grid.shape == (2, 3)
    assert int(grid[1, 2]) == _rng.derive_seed(1, 0, 2, 1)
    assert int(_rng.derive_seed_array(-1, 0, 0, 0)) == _rng.derive_seed(-1, 0, 0, 0)


def test_generator_is_pcg64_seeded_with_derived_seed():
    g = _rng.generator(5, 1, 2, _rng.STREAM_SAMPLE)
    ref = np.random.Generator(np.random.PCG64(_rng.derive_seed(5, 1, 2, _rng.STREAM_SAMPLE)))
    assert isinstance(g.bit_generator, np.random.PCG64)
    np.testing.assert_array_equal(g.integers(0, 1000, 50), ref.integers(0, 1000, 50))


def test_non_integer_arguments_rejected():
    with pytest.raises(TypeError, match="seed"):
        _rng.derive_seed(1.5, 0, 0, 0)
    with pytest.raises(TypeError, match="client"):
        _rng.derive_seed(1, 0, "3", 0)
    with pytest.raises(TypeError, match="round"):
        _rng.derive_seed(1, True, 0, 0)


def test_matches_the_cpp_core():
    from fedrecon_fast._native import core

    rng = np.random.default_rng(1)
    cases = [(0, 0, 0, 0), (2**64 - 1, 2**64 - 1, 2**64 - 1, 4)]
    cases += [tuple(int(v) for v in rng.integers(0, 2**64 - 1, 4, dtype=np.uint64, endpoint=True)) for _ in range(20)]
    for args in cases:
        assert core.derive_seed(*args) == _rng.derive_seed(*args), args
