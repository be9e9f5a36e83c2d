"""Counter-based seeding shared by the Python layer and the C++ core.

Every random stream in ``fedrecon_fast`` is identified by four integers
``(seed, round, client, stream)``.  :func:`derive_seed` hashes them into one
64-bit seed with SplitMix64, bit for bit like the C++ core::

    splitmix64_next(state&):
        state += 0x9E3779B97F4A7C15
        z = state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    mix64(x)  = splitmix64_next applied to a copy of x
    derive_seed(seed, round, client, stream):
        h = mix64(seed); h = mix64(h ^ round); h = mix64(h ^ client)
        return mix64(h ^ stream)

All arithmetic is modulo 2**64.  Because a stream depends only on its four
coordinates, results never depend on thread count, scheduling, or on which
other clients take part in a round.

The ``STREAM_*`` constants name the streams.  ``STREAM_DATA`` is reserved for
data handling done in Python (per-user shuffles, user-level splits).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "STREAM_SPLIT",
    "STREAM_INIT",
    "STREAM_QUANT",
    "STREAM_SAMPLE",
    "STREAM_DATA",
    "STREAM_MODEL_INIT",
    "STREAM_USER_TABLE",
    "STREAM_ITEM_TABLE",
    "STREAM_EPOCH_ORDER",
    "STREAM_PRIVACY",
    "STREAM_POISSON",
    "STREAM_CLIP_COUNT",
    "MASK64",
    "mix64",
    "mix64_array",
    "derive_seed",
    "derive_seed_array",
    "generator",
]

#: Stream of the support/query split of a client's ratings.
STREAM_SPLIT = 0
#: Stream of the initialisation of the local user embedding.
STREAM_INIT = 1
#: Stream of the stochastic rounding in quantization.
STREAM_QUANT = 2
#: Stream of client sampling (and drop-out) on the server.
STREAM_SAMPLE = 3
#: Stream of data preparation done in Python (per-user shuffles, user splits).
STREAM_DATA = 4
#: Stream of the initial global model.
STREAM_MODEL_INIT = 5
#: Streams of the baselines: stored user embeddings, item table, epoch order.
STREAM_USER_TABLE = 6
STREAM_ITEM_TABLE = 7
STREAM_EPOCH_ORDER = 8
#: Stream of DP-FedAvg's Gaussian noise.
STREAM_PRIVACY = 10
#: Stream of Poisson client sampling (each client's coin of a round).
STREAM_POISSON = 11
#: Stream of the Gaussian noise on adaptive clipping's count of unclipped updates.
STREAM_CLIP_COUNT = 12

#: 2**64 - 1, the mask that reduces a Python int modulo 2**64.
MASK64 = 0xFFFFFFFFFFFFFFFF

_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

_GAMMA_U = np.uint64(_GAMMA)
_M1_U = np.uint64(_M1)
_M2_U = np.uint64(_M2)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


def _as_u64(value: int, name: str) -> int:
    """Reduce a Python (or NumPy) integer modulo 2**64, rejecting non-integers."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value) & MASK64


def mix64(x: int) -> int:
    """Hash one 64-bit integer with one SplitMix64 step.

    Parameters
    ----------
    x : int
        Any integer; it is taken modulo 2**64 (so ``-1`` means ``2**64 - 1``).

    Returns
    -------
    int
        The SplitMix64 output for state ``x``, in ``[0, 2**64)``.
    """
    z = (_as_u64(x, "x") + _GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def mix64_array(x: np.ndarray) -> np.ndarray:
    """Vectorised :func:`mix64`.

    Parameters
    ----------
    x : numpy.ndarray of uint64, any shape
        States to hash.  Other integer dtypes are converted with wrap-around
        (a negative ``int64`` value ``v`` becomes ``v + 2**64``).

    Returns
    -------
    numpy.ndarray of uint64, same shape as ``x``
        ``mix64`` applied elementwise.  The input is not modified.

    Notes
    -----
    NumPy wraps uint64 array arithmetic silently but warns on overflow of
    scalar arithmetic, so the computation is done on a 1-D array even for a
    0-d input.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"x must be an integer array, got dtype {arr.dtype}")
    shape = arr.shape
    z = arr.astype(np.uint64, copy=True).reshape(-1)
    z += _GAMMA_U
    z ^= z >> _S30
    z *= _M1_U
    z ^= z >> _S27
    z *= _M2_U
    z ^= z >> _S31
    return z.reshape(shape)


def derive_seed(seed: int, round: int, client: int, stream: int) -> int:  # noqa: A002
    """Derive the 64-bit seed of one random stream, exactly like the C++ core.

    Parameters
    ----------
    seed : int
        The experiment's base seed.  Every argument is taken modulo 2**64
        (negative values wrap around).
    round : int
        Round number (0 for streams that do not depend on a round).
    client : int
        Client identifier (e.g. the original user id).
    stream : int
        One of the ``STREAM_*`` constants.

    Returns
    -------
    int
        The derived seed, in ``[0, 2**64)``.
    """
    h = mix64(_as_u64(seed, "seed"))
    h = mix64(h ^ _as_u64(round, "round"))
    h = mix64(h ^ _as_u64(client, "client"))
    return mix64(h ^ _as_u64(stream, "stream"))


def derive_seed_array(seed, round, client, stream) -> np.ndarray:  # noqa: A002
    """Vectorised :func:`derive_seed` with NumPy broadcasting.

    Parameters
    ----------
    seed, round, client, stream : int or array_like of integers
        Broadcast against each other.  Python ints are taken modulo 2**64;
        signed arrays wrap around (``-1`` becomes ``2**64 - 1``).

    Returns
    -------
    numpy.ndarray of uint64, broadcast shape of the inputs
        ``derive_seed`` applied elementwise.
    """
    parts = [
        _u64_array(v, name) for v, name in ((seed, "seed"), (round, "round"), (client, "client"), (stream, "stream"))
    ]
    s, r, c, t = np.broadcast_arrays(*parts)
    h = mix64_array(s)
    h = mix64_array(h ^ r)
    h = mix64_array(h ^ c)
    return mix64_array(h ^ t)


def _u64_array(value, name: str) -> np.ndarray:
    """Convert an int or integer array to uint64 with wrap-around."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return np.asarray(int(value) & MASK64, dtype=np.uint64)
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer or an integer array, got dtype {arr.dtype}")
    return arr.astype(np.uint64)


def generator(seed: int, round: int, client: int, stream: int) -> np.random.Generator:  # noqa: A002
    """NumPy generator of the stream ``(seed, round, client, stream)``.

    Parameters
    ----------
    seed, round, client, stream : int
        See :func:`derive_seed`.

    Returns
    -------
    numpy.random.Generator
        ``Generator(PCG64(derive_seed(seed, round, client, stream)))``.
    """
    return np.random.Generator(np.random.PCG64(derive_seed(seed, round, client, stream)))
