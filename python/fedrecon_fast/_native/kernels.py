"""Typed wrappers over the native cohort kernels (``bindings/module.cpp``).

Each call processes a whole cohort of clients in one native call, in parallel across clients
with the GIL released; results are identical for any ``num_threads``. Inputs are validated
here (clear ``ValueError``/``TypeError`` naming the argument) and converted once; the client
settings and the update codec cross as the native structs (:mod:`.structs`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .._validation import (
    FLOAT32_MAX,
    as_float32_matrix,
    as_float32_vector,
    as_index_array,
    check_float,
    check_int,
    check_threads,
    writable_float32,
)
from ..config import ClientConfig, UpdateCodec
from . import core as _core
from .structs import client_config, update_codec

__all__ = [
    "RoundResult",
    "ClientUpdates",
    "DenseNoise",
    "ServerMomentum",
    "train_round",
    "train_rounds",
    "client_updates",
    "reduce_updates",
    "reconstruct_users",
    "evaluate_users",
    "infer_users",
    "recommend_users",
    "derive_seed",
    "sample_clients",
    "mf_sgd_epoch",
]

_UINT64 = 2**64
_INT64_MAX = 2**63 - 1


def _result_budget() -> int:
    """Bytes a result array may take: a quarter of the machine's memory (a padded top-k result for a
    huge k would otherwise take the process down with it)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return 2**62


def derive_seed(seed: int, round: int, client: int, stream: int) -> int:
    """The seed of one counter-based random stream (the native SplitMix64 hash).

    Each argument is an integer, taken modulo 2**64 (so -1 is 2**64 - 1).
    """
    for value, name in ((seed, "seed"), (round, "round"), (client, "client"), (stream, "stream")):
        check_int(value, name)
    return _core.derive_seed(int(seed) % _UINT64, int(round) % _UINT64, int(client) % _UINT64, int(stream) % _UINT64)


@dataclass(frozen=True)
class RoundResult:
    """Output of :func:`train_round`.

    Attributes
    ----------
    delta : ndarray, shape (num_items, dim), float32, or None
        Weighted mean of the clients' updates ``Σ w_i Δ_i / Σ w_i`` (0 on untouched rows);
        None when the round applied it in place (``apply_lr``).
    delta_bias : ndarray, shape (num_items,), float32, or None
        The same for item biases (None without biases).
    client_stats : dict of ndarray
        Per sampled client: ``weight``, ``loss_sum``, ``num_examples``, ``num_correct``,
        ``rows`` (touched rows of V) and ``status`` (0 ok, 1 non-finite, 2 no query data).
    summary : dict
        Totals: ``total_weight``, ``loss_sum``, ``num_examples``, ``num_correct``,
        ``num_reporting``, ``num_nonfinite``, ``rows_sent``, ``rows_aggregated``.
    users, user_bias : ndarray or None
        With stored embeddings passed in (``users=``), each client's final ``u`` (and ``b_u``);
        a client whose update was not finite gets its stored values back.
    """

    delta: np.ndarray
    delta_bias: np.ndarray | None
    client_stats: dict
    summary: dict
    users: np.ndarray | None = None
    user_bias: np.ndarray | None = None


@dataclass(frozen=True)
class ServerMomentum:
    """Server SGD with momentum taken in place by a native round (``train_round(...,
    apply_lr=lr, momentum=...)``, :func:`train_rounds`), with the float32 roundings of
    ``optimizers.MomentumSGD(lr, momentum, nesterov)`` on the round's mean delta: every row
    moves (untouched rows by their velocity), bit for bit as that optimizer's step.

    ``velocity`` (and ``velocity_bias`` for a model with item biases) are the optimizer's state
    arrays (``"item_factors/velocity"``, ``"item_bias/velocity"``): writeable C-contiguous
    float32 arrays shaped like the model's, updated in place.
    """

    momentum: float
    nesterov: bool
    velocity: np.ndarray
    velocity_bias: Optional[np.ndarray] = None


@dataclass(frozen=True)
class DenseNoise:
    """The noise of dense updates quantized with one scale per client (``sparse=False``,
    ``scaling="tensor"``): every row a client did not touch decodes to the quantization of zeros.

    Client ``i``'s noise is a pure function of its scale ``(lo[i], step[i])`` and stream key
    ``key[i]`` under ``bits`` and ``hadamard`` (``step[i] == 0``: none), so a server adds it in
    :func:`reduce_updates` from these few numbers instead of receiving ``num_items`` rows.
    """

    lo: np.ndarray
    step: np.ndarray
    key: np.ndarray
    bits: int
    hadamard: bool

    def take(self, index) -> DenseNoise:
        """The noise of the clients ``index`` (an integer array), in that order."""
        return DenseNoise(self.lo[index], self.step[index], self.key[index], self.bits, self.hadamard)

    @staticmethod
    def concat(parts) -> DenseNoise:
        """The noise of several groups of clients, one after the other."""
        parts = list(parts)
        return DenseNoise(
            np.concatenate([p.lo for p in parts]),
            np.concatenate([p.step for p in parts]),
            np.concatenate([p.key for p in parts]),
            parts[0].bits,
            parts[0].hadamard,
        )


@dataclass(frozen=True)
class ClientUpdates:
    """Sparse per-client updates from :func:`client_updates` (unfused path).

    Client ``k`` touched ``rows[offsets[k]:offsets[k+1]]`` (int32 item indices) and its update
    for them is ``values[offsets[k]:offsets[k+1]]`` (float32, one row of V each); with biases,
    ``bias_values`` holds the item-bias updates the same way. ``weights`` is 0 for a client that
    did not report (non-finite update or no query data). With a dense update quantized with one
    scale, ``noise`` (:class:`DenseNoise`) describes what each client's untouched rows decode to.
    """

    offsets: np.ndarray
    rows: np.ndarray
    values: np.ndarray
    bias_values: np.ndarray | None
    client_stats: dict
    users: np.ndarray | None = None
    user_bias: np.ndarray | None = None
    noise: DenseNoise | None = None

    @property
    def weights(self) -> np.ndarray:
        return self.client_stats["weight"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def client(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(rows, values, bias_values)`` of the k-th client."""
        lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
        bias = None if self.bias_values is None else self.bias_values[lo:hi]
        return self.rows[lo:hi], self.values[lo:hi], bias


def sample_clients(num_clients: int, clients_per_round: int, seed: int, round: int) -> np.ndarray:
    """The clients of one round: ``min(clients_per_round, num_clients)`` distinct indices in
    ``[0, num_clients)``, in random order.

    A pure function of ``(seed, round)`` (the first draws of a Fisher–Yates shuffle from the
    native ``STREAM_SAMPLE`` stream), shared by every route that trains: the native training
    loop, the per-round trainer, the functional API, Ray and Flower.
    """
    check_int(num_clients, "num_clients", minimum=0, maximum=_INT64_MAX)
    check_int(clients_per_round, "clients_per_round", minimum=1, maximum=_INT64_MAX)
    check_int(seed, "seed", minimum=0)
    check_int(round, "round", minimum=0)
    return _core.sample_clients(int(num_clients), int(clients_per_round), int(seed) % _UINT64, int(round) % _UINT64)


# The native cohort kernels' leading arguments: item_factors, item_bias, global_mean, indptr,
# items, ratings, clients, config, seed, round, num_threads.
_CohortArgs = tuple[
    np.ndarray,
    Optional[np.ndarray],
    float,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    "_core.ClientConfig",
    int,
    int,
    int,
]


def _cohort_args(
    item_factors,
    data,
    clients,
    config,
    item_bias,
    global_mean,
    seed,
    round,
    num_threads,
    check_finite,
    user_default=None,
    user_bias_default=0.0,
) -> _CohortArgs:
    V = as_float32_matrix(item_factors, "item_factors", check_finite=check_finite)
    bias = (
        None
        if item_bias is None
        else as_float32_vector(item_bias, "item_bias", size=V.shape[0], check_finite=check_finite)
    )
    for name, dtype in (("indptr", np.int64), ("items", np.int32), ("ratings", np.float32)):
        arr = getattr(data, name, None)
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"data must be a ClientData (CSR ratings); got {type(data).__name__}")
        if arr.dtype != dtype or arr.ndim != 1 or not arr.flags.c_contiguous:
            raise TypeError(
                f"data.{name} must be a C-contiguous 1-D {np.dtype(dtype)} array; "
                f"got {arr.dtype} with shape {arr.shape}"
            )
    if (
        len(data.indptr) < 1
        or data.indptr[0] != 0
        or data.indptr[-1] != len(data.items)
        or len(data.items) != len(data.ratings)
    ):
        raise ValueError("data.indptr must run from 0 to len(data.items) == len(data.ratings)")
    if data.num_items > V.shape[0]:
        raise ValueError(f"item_factors has {V.shape[0]} rows but data has {data.num_items} items")
    if clients is None:
        clients = np.arange(data.num_clients, dtype=np.int64)
    clients = as_index_array(clients, "clients", upper=data.num_clients)
    if not isinstance(config, ClientConfig):
        raise TypeError(f"config must be a ClientConfig; got {type(config).__name__}")
    check_float(global_mean, "global_mean", minimum=-FLOAT32_MAX, maximum=FLOAT32_MAX)
    check_int(seed, "seed", minimum=0)
    check_int(round, "round", minimum=0)
    check_threads(num_threads)
    if user_default is not None:
        user_default = as_float32_vector(user_default, "user_default", size=V.shape[1], check_finite=True)
        check_float(user_bias_default, "user_bias_default", minimum=-FLOAT32_MAX, maximum=FLOAT32_MAX)
    native = client_config(config, user_default, user_bias_default)
    return (
        V,
        bias,
        float(global_mean),
        data.indptr,
        data.items,
        data.ratings,
        clients,
        native,
        int(seed) % _UINT64,
        int(round) % _UINT64,
        num_threads,
    )


def _stream_ids(data) -> dict:
    """``{"stream_ids": ...}`` when ``data`` carries the ids that key its clients' random streams
    (an int64 array, one non-negative id per client; without it a client is keyed by its row)."""
    ids = getattr(data, "stream_ids", None)
    if ids is None:
        return {}
    ids = np.asarray(ids)
    if ids.shape != (len(data.indptr) - 1,) or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(
            f"data.stream_ids must hold one integer per client ({len(data.indptr) - 1}); "
            f"got dtype {ids.dtype}, shape {ids.shape}"
        )
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(np.int64).max):
        raise ValueError("data.stream_ids must lie in [0, 2**63)")
    return {"stream_ids": np.ascontiguousarray(ids, dtype=np.int64)}


def _user_state(users, user_bias, num_clients: int, dim: int, biased: bool):
    if users is None:
        if user_bias is not None:
            raise ValueError("user_bias needs users")
        return None, None
    users = as_float32_matrix(users, "users", cols=dim)
    if users.shape[0] != num_clients:
        raise ValueError(f"users must have one row per client ({num_clients}); got {users.shape[0]}")
    if biased != (user_bias is not None):
        raise ValueError("user_bias must be given exactly when item_bias is")
    if user_bias is not None:
        user_bias = as_float32_vector(user_bias, "user_bias", size=num_clients)
    return users, user_bias


def _codec(codec) -> dict:
    """``{"codec": ...}``: the native update codec (the default sends float32 rows)."""
    if codec is None:
        codec = UpdateCodec()
    if not isinstance(codec, UpdateCodec):
        raise TypeError(f"codec must be an UpdateCodec; got {type(codec).__name__}")
    return {"codec": update_codec(codec)}


def _update_call(
    native,
    item_factors,
    data,
    clients,
    config,
    item_bias,
    global_mean,
    seed,
    round,
    num_threads,
    check_finite,
    users,
    user_bias,
    user_default,
    user_bias_default,
    codec,
    **extra,
):
    """Validate the arguments shared by the update kernels and call ``native`` with them."""
    args = _cohort_args(
        item_factors,
        data,
        clients,
        config or ClientConfig(),
        item_bias,
        global_mean,
        seed,
        round,
        num_threads,
        check_finite,
        user_default,
        user_bias_default,
    )
    users, user_bias = _user_state(users, user_bias, len(args[6]), args[0].shape[1], args[1] is not None)
    return native(*args, users=users, user_bias=user_bias, **_codec(codec), **_stream_ids(data), **extra)


def _in_place_args(apply_lr, item_factors, item_bias, momentum=None, name: str = "apply_lr") -> dict:
    """The native step arguments for a round that updates the model's own arrays, after
    checking that they are exactly what the kernel reads (a converted copy would lose the
    update): ``apply_lr`` and, with ``momentum``, its coefficient and velocity arrays."""
    if apply_lr is None:
        if momentum is not None:
            raise ValueError("momentum needs apply_lr (the server step taken in place)")
        return {}
    check_float(apply_lr, name, minimum=0.0, maximum=FLOAT32_MAX, strict=True)
    if np.float32(apply_lr) == 0:  # the step is taken in float32
        raise ValueError(f"{name} must be at least the smallest float32 (1.4e-45); got {apply_lr!r}")
    writable_float32(item_factors, "item_factors", 2, error=TypeError)
    if item_bias is not None:
        writable_float32(item_bias, "item_bias", 1, error=TypeError)
    out: dict = {"apply_lr": float(apply_lr)}
    if momentum is None:
        return out
    if not isinstance(momentum, ServerMomentum):
        raise TypeError(f"momentum must be a ServerMomentum; got {type(momentum).__name__}")
    m = check_float(momentum.momentum, "momentum.momentum", minimum=0.0)
    if m >= 1.0:
        raise ValueError(f"momentum.momentum must be in [0, 1); got {momentum.momentum!r}")
    writable_float32(momentum.velocity, "momentum.velocity", 2, error=TypeError)
    if momentum.velocity.shape != item_factors.shape:
        raise ValueError(
            f"momentum.velocity must have item_factors' shape {item_factors.shape}; got {momentum.velocity.shape}"
        )
    if (item_bias is None) != (momentum.velocity_bias is None):
        raise ValueError("momentum.velocity_bias must be given exactly when item_bias is")
    if item_bias is not None:
        velocity_bias = writable_float32(momentum.velocity_bias, "momentum.velocity_bias", 1, error=TypeError)
        if velocity_bias.shape != item_bias.shape:
            raise ValueError(
                f"momentum.velocity_bias must have item_bias' shape {item_bias.shape}; got {velocity_bias.shape}"
            )
    model = [a for a in (item_factors, item_bias) if a is not None]
    arrays = model + [a for a in (momentum.velocity, momentum.velocity_bias) if a is not None]
    if any(np.may_share_memory(arrays[i], arrays[j]) for j in range(len(model), len(arrays)) for i in range(j)):
        raise ValueError("momentum's velocity arrays must not overlap the model or each other")
    out.update(
        momentum=m, nesterov=bool(momentum.nesterov), velocity=momentum.velocity, velocity_bias=momentum.velocity_bias
    )
    return out


def train_round(
    item_factors,
    data,
    clients=None,
    config: ClientConfig | None = None,
    *,
    item_bias=None,
    global_mean: float = 0.0,
    seed: int = 0,
    round: int = 0,
    num_threads: int = 0,
    check_finite: bool = True,
    users=None,
    user_bias=None,
    user_default=None,
    user_bias_default: float = 0.0,
    codec: UpdateCodec | None = None,
    apply_lr: float | None = None,
    momentum: ServerMomentum | None = None,
) -> RoundResult:
    """One fused FedRecon round: reconstruct → client update → weighted mean of updates.

    Parameters
    ----------
    item_factors : array_like, shape (num_items, dim)
        Global item matrix V (converted once to C-contiguous float32).
    data : ClientData
        Ratings of all clients (CSR): any object with ``indptr`` (int64), ``items`` (int32),
        ``ratings`` (float32), ``num_clients`` and ``num_items``. An optional ``stream_ids``
        (int64, one per client) keys each client's random streams by that id instead of its
        row (the functional API runs one client with the streams of its id this way).
    clients : array_like of int, shape (m,), optional
        Indices into ``data`` of the sampled clients (default: all). Their order fixes the
        order of the float64 reduction, not the result's dependence on threads.
    config : ClientConfig, optional
        Client behaviour (TFF defaults when omitted).
    item_bias : array_like, shape (num_items,), optional
        Item biases; when given, the model also reconstructs a user bias.
    global_mean : float
        Added to every prediction.
    seed, round : int
        Key the per-client random streams (seed, round, client id).
    num_threads : int
        0 uses all cores.
    user_default, user_bias_default : array_like, shape (dim,), and float, optional
        A learned global default for u (and b_u): reconstruction starts from it (SGD) or
        shrinks toward it (exact ridge), and a client without support data keeps it.
    users, user_bias : array_like, shape (m, dim) and (m,), optional
        Stored embeddings of the sampled clients (stateful baselines such as FedAvg): each
        client starts from its row instead of a fresh initialisation, and the trained values
        come back in ``RoundResult.users``. ``user_bias`` goes with ``item_bias``.
    codec : UpdateCodec, optional
        What each client sends (DESIGN §1.4–§1.6), simulated exactly: its update is clipped to
        L2 norm ``codec.clip`` (DP-FedAvg), then the item factors are quantized to
        ``codec.bits`` bits with stochastic rounding (one scale per update or per row, optional
        Hadamard rotation) when the variable has at least ``codec.threshold`` elements;
        ``codec.sparse`` sends the touched rows, else a dense delta whose untouched rows then
        also carry quantization noise. The aggregate is of the values
        :mod:`fedrecon_fast.compression` would decode (stream key ``(seed, round, client id)``),
        and ``client_stats["bytes"]`` is each encoded size. Default: float32 touched rows.
    apply_lr : float, optional
        Take the server SGD step in place instead of returning the mean: ``item_factors[r] +=
        apply_lr * delta[r]`` (and ``item_bias``) for every row the round touched, with the
        float32 roundings of ``optimizers.SGD(lr=apply_lr)`` on the delta, so the model ends
        up the same. Untouched rows are not written and no dense delta is built: ``delta`` and
        ``delta_bias`` are None, and ``summary["nonfinite_rows"]`` counts rows the step left
        non-finite. Both arrays must be writeable C-contiguous float32 ndarrays.
    momentum : ServerMomentum, optional
        With ``apply_lr``: server SGD with momentum instead of plain SGD, bit for bit as
        ``optimizers.MomentumSGD(lr=apply_lr, ...)`` on the delta. Every row moves (untouched
        rows by their velocity), and ``nonfinite_rows`` counts any row left non-finite.

    Returns
    -------
    RoundResult
    """
    in_place = _in_place_args(apply_lr, item_factors, item_bias, momentum)
    return RoundResult(
        *_update_call(
            _core.train_round,
            item_factors,
            data,
            clients,
            config,
            item_bias,
            global_mean,
            seed,
            round,
            num_threads,
            check_finite,
            users,
            user_bias,
            user_default,
            user_bias_default,
            codec,
            **in_place,
        )
    )


def train_rounds(
    item_factors,
    data,
    config: ClientConfig | None = None,
    *,
    item_bias=None,
    global_mean: float = 0.0,
    seed: int = 0,
    first_round: int = 0,
    num_rounds: int = 1,
    clients_per_round: int = 100,
    lr: float = 1.0,
    num_threads: int = 0,
    codec: UpdateCodec | None = None,
    momentum: ServerMomentum | None = None,
) -> dict:
    """Several training rounds in one native call: sample, train, server SGD step, repeat.

    Round ``r`` (``first_round <= r < first_round + num_rounds``) samples
    :func:`sample_clients` ``(data.num_clients, clients_per_round, seed, r)``, runs
    :func:`train_round` on them and applies the weighted mean in place with server SGD,
    ``item_factors += lr * delta`` (and ``item_bias``), on the touched rows. The model ends up
    bit for bit as after those calls made one by one from Python, with no Python in between.
    The loop stops early after a round that diverged: every sampled client's update was
    non-finite (``num_nonfinite == clients``), or the step left rows non-finite
    (``nonfinite_rows > 0``).

    Parameters
    ----------
    item_factors, item_bias : ndarray
        The model, updated in place: writeable C-contiguous float32 arrays. When the rank is
        not a multiple of 8 (and V is at most 64 MiB), the rounds run on a copy of V (and of
        the momentum's velocity) with rows padded to whole SIMD vectors, written back when the
        call returns or raises: other threads see the new values only then.
    data, config, global_mean, seed, num_threads, codec
        As for :func:`train_round`.
    first_round, num_rounds, clients_per_round : int
        Which rounds to run, and the cohort size.
    lr : float
        Server learning rate (> 0).
    momentum : ServerMomentum, optional
        Server SGD with momentum instead (as for :func:`train_round`); its velocity arrays are
        updated in place.

    Returns
    -------
    dict of ndarray
        One entry per round run (fewer than ``num_rounds`` after a divergence): ``clients``,
        ``seconds`` (wall time of the round), and the fields of ``RoundResult.summary``
        including ``nonfinite_rows``.
    """
    check_int(first_round, "first_round", minimum=0)
    check_int(num_rounds, "num_rounds", minimum=0, maximum=_INT64_MAX)
    check_int(clients_per_round, "clients_per_round", minimum=1, maximum=_INT64_MAX)
    in_place = _in_place_args(lr, item_factors, item_bias, momentum, name="lr")
    args = _cohort_args(
        item_factors,
        data,
        np.zeros(0, np.int64),
        config or ClientConfig(),
        item_bias,
        global_mean,
        seed,
        first_round,
        num_threads,
        True,
    )
    V, bias, mean, indptr, items, ratings, _, native, seed, first, threads = args
    return _core.train_rounds(
        V,
        bias,
        mean,
        indptr,
        items,
        ratings,
        native,
        _codec(codec)["codec"],
        seed,
        first,
        int(num_rounds),
        int(clients_per_round),
        in_place.pop("apply_lr"),
        threads,
        **in_place,
    )


def client_updates(
    item_factors,
    data,
    clients=None,
    config: ClientConfig | None = None,
    *,
    item_bias=None,
    global_mean: float = 0.0,
    seed: int = 0,
    round: int = 0,
    num_threads: int = 0,
    check_finite: bool = True,
    users=None,
    user_bias=None,
    user_default=None,
    user_bias_default: float = 0.0,
    codec: UpdateCodec | None = None,
) -> ClientUpdates:
    """Each client's sparse update (row ids + values) and weight, without aggregating.

    Same parameters as :func:`train_round`; a framework that runs one client at a time passes
    ``clients=[k]``. The values are what the client sends after clipping and quantization
    (decoded); a dense update quantized with one scale also carries the noise of its untouched
    rows (``ClientUpdates.noise``), which :func:`reduce_updates` adds.
    """
    codec = UpdateCodec() if codec is None else codec
    out = _update_call(
        _core.client_updates,
        item_factors,
        data,
        clients,
        config,
        item_bias,
        global_mean,
        seed,
        round,
        num_threads,
        check_finite,
        users,
        user_bias,
        user_default,
        user_bias_default,
        codec,
    )
    noise = None
    if out["noise"] is not None:
        noise = DenseNoise(out["noise"]["lo"], out["noise"]["step"], out["noise"]["key"], codec.bits, codec.hadamard)
    return ClientUpdates(
        out["offsets"],
        out["rows"],
        out["values"],
        out["bias_values"],
        out["stats"],
        out["users"],
        out["user_bias"],
        noise,
    )


def reduce_updates(
    rows,
    values,
    offsets,
    weights,
    *,
    num_items: int,
    bias_values=None,
    num_threads: int = 0,
    noise: DenseNoise | None = None,
):
    """The fused round's weighted mean of updates that clients computed one at a time.

    Client ``i`` (position ``i`` of the cohort, in the order :func:`train_round` would take
    them) sent ``rows[offsets[i]:offsets[i+1]]`` with ``values`` (and ``bias_values``) for
    them, and has weight ``weights[i]`` (0 for a client that did not report); ``noise`` (from
    :func:`client_updates`) adds the noise of dense quantized updates on untouched rows. Each
    row sums its clients in cohort order, as :func:`train_round` does, so the result equals its
    ``delta`` (and ``delta_bias``) bit for bit, e.g. for the output of :func:`client_updates`.

    Returns
    -------
    delta : ndarray, shape (num_items, dim), float32
    delta_bias : ndarray, shape (num_items,), float32, or None
    total_weight : float
    """
    check_int(num_items, "num_items", minimum=0, maximum=2**31 - 1)  # rows are int32
    check_threads(num_threads)
    values = as_float32_matrix(values, "values", check_finite=True)
    rows = np.ascontiguousarray(as_index_array(rows, "rows", upper=num_items), dtype=np.int32)
    if len(rows) != len(values):
        raise ValueError(f"rows must have one entry per row of values ({len(values)}); got {len(rows)}")
    if bias_values is not None:
        bias_values = as_float32_vector(bias_values, "bias_values", size=len(values), check_finite=True)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if (
        offsets.ndim != 1
        or len(offsets) < 1
        or offsets[0] != 0
        or offsets[-1] != len(rows)
        or (np.diff(offsets) < 0).any()
    ):
        raise ValueError("offsets must be non-decreasing from 0 to len(rows), one more than the clients")
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.shape != (len(offsets) - 1,) or not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"weights must be {len(offsets) - 1} finite values >= 0, one per client")
    with np.errstate(over="ignore", divide="ignore"):
        total = weights.sum()
        if not np.isfinite(total):  # the mean would silently be 0 everywhere
            raise ValueError("weights must have a finite sum")
        if total > 0 and not np.isfinite(1.0 / total):  # a subnormal total: the mean would be inf
            raise ValueError(f"weights must have a normal sum (1 / sum is finite); got sum {total!r}")
    extra = {}
    if noise is not None:
        if not isinstance(noise, DenseNoise):
            raise TypeError(f"noise must be a DenseNoise (ClientUpdates.noise); got {type(noise).__name__}")
        if not all(np.shape(a) == weights.shape for a in (noise.lo, noise.step, noise.key)):
            raise ValueError(f"noise must describe {len(weights)} clients, one per weight")
        extra = {
            "noise_lo": np.ascontiguousarray(noise.lo, np.float32),
            "noise_step": np.ascontiguousarray(noise.step, np.float32),
            "noise_key": np.ascontiguousarray(noise.key, np.uint64),
            **_codec(UpdateCodec(bits=noise.bits, hadamard=noise.hadamard, sparse=False)),
        }
    return _core.reduce_updates(rows, values, bias_values, offsets, weights, num_items, num_threads, **extra)


def reconstruct_users(
    item_factors,
    data,
    clients=None,
    config: ClientConfig | None = None,
    *,
    item_bias=None,
    global_mean: float = 0.0,
    seed: int = 0,
    round: int = 0,
    num_threads: int = 0,
    check_finite: bool = True,
    user_default=None,
    user_bias_default: float = 0.0,
):
    """Reconstruct the local embeddings of clients from their support sets, V frozen.

    Returns
    -------
    users : ndarray, shape (m, dim), float32
    user_bias : ndarray, shape (m,), float32, or None
        Reconstructed user biases (only when ``item_bias`` is given).
    """
    args = _cohort_args(
        item_factors,
        data,
        clients,
        config or ClientConfig(),
        item_bias,
        global_mean,
        seed,
        round,
        num_threads,
        check_finite,
        user_default,
        user_bias_default,
    )
    return _core.reconstruct_users(*args, **_stream_ids(data))


def _relevance(relevance_threshold) -> float:
    """The native threshold: None (every query item is relevant) becomes -inf."""
    if relevance_threshold is None:
        return -math.inf
    check_float(relevance_threshold, "relevance_threshold", minimum=-FLOAT32_MAX, maximum=FLOAT32_MAX)
    return float(relevance_threshold)


def evaluate_users(
    item_factors,
    data,
    clients=None,
    config: ClientConfig | None = None,
    *,
    item_bias=None,
    global_mean: float = 0.0,
    seed: int = 0,
    round: int = 0,
    num_threads: int = 0,
    check_finite: bool = True,
    user_default=None,
    user_bias_default: float = 0.0,
    k: int | None = None,
    relevance_threshold: float | None = 4.0,
) -> dict:
    """ReconEval per client: reconstruct on support, score each query rating once.

    With ``k``, each client is also ranked: every item except its support items is a candidate,
    scored by its predicted rating, and the top ``k`` (ties to the lower item index) are checked
    against the client's relevant items, the distinct query items rated at least
    ``relevance_threshold`` (4.0: "liked" on a 1-5 scale; None: every query item) that are
    candidates. Without ``k`` nothing is ranked and the call costs what it always did.

    Returns
    -------
    dict of ndarray, shape (m,)
        ``sq_err_sum`` and ``abs_err_sum`` (float64), ``num_examples`` and ``num_correct``
        (int64; a rating is correct when ``|r - r_hat| <= 0.5``). With ``k`` also
        ``num_relevant`` and ``hits`` (relevant items in the top k; int64), ``ndcg`` (float64,
        binary gains ``1 / log2(rank + 1)``, ideal DCG over ``min(k, num_relevant)`` ranks),
        ``ap`` (average precision: the sum of Precision@rank at each hit's rank, divided by
        ``min(k, num_relevant)``) and ``rr`` (1 / rank of the first hit, 0 without one), all
        NaN for a client without relevant items, and ``top_items`` (int64, shape
        ``(m, min(k, num_items))``: each client's ranked items, best first, padded with -1).
        Recall@k is ``hits / min(k, num_relevant)``.
    """
    args = _cohort_args(
        item_factors,
        data,
        clients,
        config or ClientConfig(),
        item_bias,
        global_mean,
        seed,
        round,
        num_threads,
        check_finite,
        user_default,
        user_bias_default,
    )
    check_int(k, "k", minimum=1, maximum=2**63 - 1, allow_none=True)
    threshold = _relevance(relevance_threshold)
    if k is None:
        return _core.evaluate_users(*args, **_stream_ids(data))
    return _core.evaluate_users(*args, k=k, relevance_threshold=threshold, **_stream_ids(data))


def infer_users(
    item_factors,
    data,
    clients=None,
    config: ClientConfig | None = None,
    *,
    item_bias=None,
    global_mean: float = 0.0,
    seed: int = 0,
    round: int = 0,
    num_threads: int = 0,
    check_finite: bool = True,
    user_default=None,
    user_bias_default: float = 0.0,
):
    """Reconstruct users for inference from ALL of their ratings, V frozen.

    Unlike :func:`reconstruct_users` there is no support/query split (``config.split`` and
    ``support_fraction`` are ignored; the rest of the schedule applies: batches in stored
    order or reshuffled, epochs, step caps, SGD or exact). Every user draws from the random
    streams of client 0 of ``(seed, round)``, so a user's result depends only on its own
    ratings, not on which other users share the call or where it sits among them.

    Returns
    -------
    users : ndarray, shape (m, dim), float32
    user_bias : ndarray, shape (m,), float32, or None
        Only when ``item_bias`` is given.
    """
    args = _cohort_args(
        item_factors,
        data,
        clients,
        config or ClientConfig(),
        item_bias,
        global_mean,
        seed,
        round,
        num_threads,
        check_finite,
        user_default,
        user_bias_default,
    )
    return _core.infer_users(*args)


def recommend_users(
    item_factors,
    data,
    clients=None,
    config: ClientConfig | None = None,
    *,
    k: int = 10,
    exclude_seen: bool = True,
    item_bias=None,
    global_mean: float = 0.0,
    seed: int = 0,
    round: int = 0,
    num_threads: int = 0,
    check_finite: bool = True,
    user_default=None,
    user_bias_default: float = 0.0,
):
    """Top-k items for each user, in one native call (parallel over users, GIL released).

    Each user's ``u`` (and ``b_u``) is reconstructed as by :func:`infer_users`, every item is
    scored by its predicted rating ``u . v_i + global_mean (+ b_u + b_i)``, and the ``k`` best
    are returned, best first, ties broken by the lower item index. With ``exclude_seen`` the
    items the user rated are not candidates.

    Returns
    -------
    items : ndarray, shape (m, k), int64
        Item indices (rows of ``item_factors``). When a user has fewer than ``k`` candidates
        the remaining slots hold ``-1``.
    scores : ndarray, shape (m, k), float32
        Their predicted ratings; ``NaN`` in padded slots. A user whose reconstruction is not
        finite gets no recommendations (all slots padded).
    """
    args = _cohort_args(
        item_factors,
        data,
        clients,
        config or ClientConfig(),
        item_bias,
        global_mean,
        seed,
        round,
        num_threads,
        check_finite,
        user_default,
        user_bias_default,
    )
    check_int(k, "k", minimum=1, maximum=2**63 - 1)
    needed = len(args[6]) * k * 12  # int64 items + float32 scores
    if needed > _result_budget():
        raise ValueError(
            f"k is too large: the ({len(args[6])}, {k}) result needs {needed / 2**30:.1f} GiB, "
            "more than a quarter of this machine's memory"
        )
    if not isinstance(exclude_seen, (bool, np.bool_)):
        raise TypeError(f"exclude_seen must be a bool; got {exclude_seen!r}")
    return _core.recommend_users(*args, k=k, exclude_seen=bool(exclude_seen))


def mf_sgd_epoch(
    users,
    items,
    user_ids,
    item_ids,
    ratings,
    *,
    user_bias=None,
    item_bias=None,
    global_mean: float = 0.0,
    batch_size: int = 32,
    lr: float = 0.1,
    l2: float = 0.0,
) -> float:
    """One pass of minibatch SGD over ratings in the given order, updating the tables in place.

    Parameters
    ----------
    users : ndarray, shape (num_users, dim), float32, writeable
    items : ndarray, shape (num_items, dim), float32, writeable
    user_ids, item_ids : array_like of int, shape (n,)
        The rating's user row and item row, in the order the batches are cut.
    ratings : array_like, shape (n,)
    user_bias, item_bias : ndarray, float32, writeable, optional
        Given together: the model adds ``global_mean + b_u + b_i``.
    batch_size, lr, l2
        Loss per batch = mean squared error + ``l2`` (|u|² + |v|²) over the batch's rows.

    Returns
    -------
    float
        Sum of squared errors of the pre-step predictions.
    """
    users = writable_float32(users, "users", 2)
    items = writable_float32(items, "items", 2)
    if users.shape[1] != items.shape[1] or users.shape[1] < 1:
        raise ValueError(f"users and items must have the same dim >= 1; got {users.shape} and {items.shape}")
    if (user_bias is None) != (item_bias is None):
        raise ValueError("user_bias and item_bias must be given together")
    if user_bias is not None:
        user_bias = writable_float32(user_bias, "user_bias", 1)
        item_bias = writable_float32(item_bias, "item_bias", 1)
    user_ids = as_index_array(user_ids, "user_ids", upper=users.shape[0])
    item_ids = as_index_array(item_ids, "item_ids", upper=items.shape[0]).astype(np.int32)
    ratings = as_float32_vector(ratings, "ratings", size=len(user_ids))
    if len(item_ids) != len(user_ids):
        raise ValueError("user_ids, item_ids and ratings must have the same length")
    check_int(batch_size, "batch_size", minimum=1)
    batch_size = min(batch_size, max(len(ratings), 1))  # a batch never exceeds the data
    check_float(lr, "lr", minimum=0.0)
    check_float(l2, "l2", minimum=0.0)
    check_float(global_mean, "global_mean")
    return _core.mf_sgd_epoch(
        users, user_bias, items, item_bias, float(global_mean), user_ids, item_ids, ratings, batch_size, lr, l2
    )
