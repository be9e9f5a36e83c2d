"""Pure-NumPy reference of the native FedRecon kernels (the test oracle).

Federated Reconstruction (Singhal et al., "Federated Reconstruction: Partially Local Federated
Learning", NeurIPS 2021) on matrix factorization: every sampled client splits its ratings into
a support and a query set, reconstructs its local embedding ``u`` on the support set with the
item matrix ``V`` frozen, then trains the rows of ``V`` its query set touches; the server takes
the weighted mean of the clients' updates.

This module restates, step by step, what ``cpp/src/client.cpp`` and ``cpp/src/cohort.cpp`` do,
so that ``tests/test_kernels.py`` can compare the native results against it. It is written for
readability, not speed: plain Python loops over clients and steps. Arithmetic is done in float32
wherever the C++ code uses ``float`` (so results agree up to float32 rounding and summation
order) and in float64 where the C++ code uses ``double`` (metrics, aggregation, ridge solve).
64-bit hashing uses Python ints masked to 64 bits, which never overflows or warns.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

MASK64 = 2**64 - 1
GAMMA = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB

# Random streams (cpp/include/fedrecon/rng.hpp).
STREAM_SPLIT = 0
STREAM_INIT = 1
STREAM_SAMPLE = 3

# Client statuses (cpp/include/fedrecon/types.hpp).
STATUS_OK = 0
STATUS_NONFINITE = 1
STATUS_NO_QUERY = 2

F32 = np.float32


# --------------------------------------------------------------------------------------------
# Random numbers
# --------------------------------------------------------------------------------------------


def splitmix64(state: int) -> tuple[int, int]:
    """One SplitMix64 step: returns ``(new_state, output)``, all modulo 2**64."""
    state = (state + GAMMA) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return state, z ^ (z >> 31)


def mix64(x: int) -> int:
    """SplitMix64 output for state ``x`` (a stateless 64-bit hash)."""
    return splitmix64(x & MASK64)[1]


def derive_seed(seed: int, round: int, client: int, stream: int) -> int:  # noqa: A002
    """Seed of the stream ``(seed, round, client, stream)``; every argument is taken mod 2**64."""
    h = mix64(seed & MASK64)
    h = mix64(h ^ (round & MASK64))
    h = mix64(h ^ (client & MASK64))
    return mix64(h ^ (stream & MASK64))


class Rng:
    """The native counter-based generator: a SplitMix64 stream."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next(self) -> int:
        """Next raw 64-bit output."""
        self.state, out = splitmix64(self.state)
        return out

    def uniform01(self) -> np.float32:
        """Uniform float32 in [0, 1): the top 24 bits times 2**-24 (exact in float32)."""
        return F32(self.next() >> 40) * F32(2.0**-24)

    def below(self, n: int) -> int:
        """Integer in [0, n) for n < 2**32 by multiply-shift: ``((x >> 32) * n) >> 32``."""
        return ((self.next() >> 32) * n) >> 32

    def below64(self, n: int) -> int:
        """Integer in [0, n) for any n >= 1: the high 64 bits of ``x * n``."""
        return (self.next() * n) >> 64


def fisher_yates(n: int, rng: Rng) -> np.ndarray:
    """The permutation of ``range(n)`` the native code draws: for k = n-1 .. 1, swap k with
    ``rng.below(k + 1)``."""
    perm = np.arange(n, dtype=np.int64)
    for k in range(n - 1, 0, -1):
        j = rng.below(k + 1)
        perm[k], perm[j] = perm[j], perm[k]
    return perm


def sample_clients(num_clients: int, m: int, seed: int, round: int) -> np.ndarray:  # noqa: A002
    """The clients of a round: the first ``min(m, num_clients)`` positions of a Fisher-Yates
    shuffle of ``range(num_clients)`` drawn from stream STREAM_SAMPLE of ``(seed, round, 0)``,
    position i swapping with ``i + below64(num_clients - i)``."""
    rng = Rng(derive_seed(seed, round, 0, STREAM_SAMPLE))
    moved: dict[int, int] = {}
    out = []
    for i in range(min(m, num_clients)):
        j = i + rng.below64(num_clients - i)
        ai, aj = moved.get(i, i), moved.get(j, j)
        moved[j] = ai
        out.append(aj)
    return np.array(out, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# One client
# --------------------------------------------------------------------------------------------


def _cut(positions: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cut ``positions`` into consecutive batches of ``batch_size`` (the last may be shorter)."""
    return [positions[k : k + batch_size] for k in range(0, len(positions), batch_size)]


def split_client(n: int, client: int, config, seed: int, round: int):  # noqa: A002
    """Support and query batches of a client with ``n`` ratings.

    Returns ``(support_batches, query_batches)``, lists of int64 arrays of positions into the
    client's ratings. The positions are first permuted (Fisher–Yates with the client's
    ``STREAM_SPLIT`` stream) when ``config.reshuffle`` or ``split == "random"``, else kept in
    stored order. Then:

    - ``batches``: the data is cut into batches; even batches are support, odd are query.
    - ``random``: the first ``ns = floor(support_fraction * n + 0.5)`` positions are support,
      the rest query; with ``n >= 2``, ``ns`` is clamped to ``[1, n - 1]`` so both are non-empty.
    - ``reuse``: support and query are both all positions.
    """
    b = config.batch_size
    perm = np.arange(n, dtype=np.int64)
    if config.reshuffle or config.split == "random":
        perm = fisher_yates(n, Rng(derive_seed(seed, round, client, STREAM_SPLIT)))
    if config.split == "batches":
        batches = _cut(perm, b)
        return batches[0::2], batches[1::2]
    if config.split == "random":
        # float support_fraction promoted to double, as in the C++ code.
        ns = int(np.floor(float(F32(config.support_fraction)) * float(n) + 0.5))
        if n >= 2:
            ns = min(max(ns, 1), n - 1)
        ns = min(ns, n)
        return _cut(perm[:ns], b), _cut(perm[ns:], b)
    if config.split == "reuse":
        return _cut(perm, b), _cut(perm, b)
    raise ValueError(f"unknown split {config.split!r}")


def schedule_steps(num_batches: int, epochs: int, steps_max) -> int:
    """Steps of ``epochs`` passes over ``num_batches`` batches, capped by ``steps_max``
    (``None`` or <= 0: no cap). Step ``s`` uses batch ``s % num_batches``."""
    steps = num_batches * max(0, epochs)
    if steps_max is not None and steps_max > 0:
        steps = min(steps, steps_max)
    return steps


@dataclass
class Model:
    """The global model seen by a client: V, optional item biases, global mean (float32), and
    an optional learned default for ``u`` and ``b_u``."""

    item_factors: np.ndarray
    item_bias: np.ndarray | None = None
    global_mean: np.float32 = F32(0.0)
    user_default: np.ndarray | None = None
    user_bias_default: np.float32 = F32(0.0)

    @property
    def has_bias(self) -> bool:
        return self.item_bias is not None


def predict(u: np.ndarray, bu: np.float32, v: np.ndarray, bi: np.float32, model: Model) -> np.float32:
    """``u . v + global_mean`` (+ ``b_u + b_i`` with biases), in float32 and in the native order."""
    p = F32(np.dot(u, v)) + model.global_mean
    if model.has_bias:
        p = p + bu + bi
    return F32(p)


def init_user(dim: int, config, seed: int, round: int, client: int) -> np.ndarray:  # noqa: A002
    """Initial u: ``(2 * uniform01() - 1) * init_scale`` from ``STREAM_INIT``, or zeros."""
    if config.init == "zeros":
        return np.zeros(dim, dtype=F32)
    rng = Rng(derive_seed(seed, round, client, STREAM_INIT))
    scale = F32(config.init_scale)
    u = np.empty(dim, dtype=F32)
    for k in range(dim):
        u[k] = (F32(2.0) * rng.uniform01() - F32(1.0)) * scale
    return u


def reconstruct(
    model: Model,
    items,
    ratings,
    support,
    config,
    seed,
    round,
    client,  # noqa: A002
    init_u=None,
    init_bu=None,
):
    """Reconstruct ``(u, b_u)`` on the support batches with V frozen.

    Exact: ridge solution ``(XᵀX + ridge I) w = Xᵀ y + ridge w0`` with rows ``x = v_i``
    (``[v_i, 1]`` with biases, the last weight being ``b_u``), targets ``y = r - global_mean
    (- b_i)`` and ``w0`` the model's learned default for ``(u, b_u)`` (0 without one); the Gram
    matrix and ``Xᵀy`` in float32, the solve in float64. No support data gives ``w = w0``.
    Stored embeddings are ignored.

    SGD: u starts from the stored ``init_u``/``init_bu`` of a stateful baseline when given,
    else from the model's learned default, else from :func:`init_user` with ``b_u = 0``; each
    step on batch ``s % nbatches`` of m ratings: ``err = prediction - r``,
    ``u -= lr * (2/m Σ err v + 2 l2 u)`` and, with biases, ``b_u -= lr * 2/m Σ err``.
    """
    V = model.item_factors
    K = V.shape[1]
    if config.recon == "exact":
        D = K + (1 if model.has_bias else 0)
        A = np.eye(D) * float(F32(config.ridge))
        rhs = np.zeros(D)
        pos = np.concatenate(support) if support else np.zeros(0, dtype=np.int64)
        if len(pos):
            X = np.ones((len(pos), D), dtype=F32)
            X[:, :K] = V[items[pos]]
            y = ratings[pos] - model.global_mean
            if model.has_bias:
                y = y - model.item_bias[items[pos]]
            A += (X.T @ X).astype(np.float64)
            rhs = (X.T @ y.astype(F32)).astype(np.float64)
        if model.user_default is not None:
            w0 = np.append(model.user_default.astype(np.float64), float(model.user_bias_default))[:D]
            rhs = rhs + float(F32(config.ridge)) * w0
        w = np.linalg.solve(A, rhs)
        u = w[:K].astype(F32)
        bu = F32(w[K]) if model.has_bias else F32(0.0)
        return u, bu

    if init_u is None and model.user_default is not None:
        init_u, init_bu = model.user_default, model.user_bias_default
    if init_u is not None:
        u = np.array(init_u, dtype=F32)  # a copy
        bu = F32(0.0 if init_bu is None else init_bu)
    else:
        u = init_user(K, config, seed, round, client)
        bu = F32(0.0)
    lr, l2 = F32(config.recon_lr), F32(config.recon_l2)
    steps = schedule_steps(len(support), config.recon_epochs, config.recon_steps_max)
    for s in range(steps):
        batch = support[s % len(support)]
        g = np.zeros(K, dtype=F32)
        gb = F32(0.0)
        for p in batch:
            item = items[p]
            bi = model.item_bias[item] if model.has_bias else F32(0.0)
            err = predict(u, bu, V[item], bi, model) - ratings[p]
            g += err * V[item]
            gb += err
        scale = F32(2.0) / F32(len(batch))
        u = u - lr * (scale * g + (F32(2.0) * l2) * u)
        if model.has_bias:
            bu = bu - lr * scale * gb
    return u.astype(F32), F32(bu)


@dataclass
class ClientResult:
    """One client's update: touched rows (global ids, in order of first use), ``W - W0`` for
    them (float32), the item-bias update (or None), the per-client stats, and the client's
    final ``u`` and ``b_u`` (after the update; trained only with ``joint``)."""

    rows: np.ndarray
    delta: np.ndarray
    bias_delta: np.ndarray | None
    stats: dict = field(default_factory=dict)
    user: np.ndarray | None = None
    user_bias: np.float32 | None = None


def client_update(model: Model, items, ratings, query, u, bu, config) -> ClientResult:
    """The client update on the query batches, starting from the reconstructed ``(u, b_u)``.

    Touched rows are the distinct items of the batches the schedule executes (only the first
    ``min(steps, nbatches)`` batches), in order of first appearance. Each step on batch
    ``s % nbatches`` of m ratings:

    1. forward pass at the pre-step values: ``err = prediction - r`` with the local rows W;
       ``loss_sum += err²`` (float64), ``num_correct += |err| <= 0.5``, ``num_examples += m``;
    2. with ``update_l2 > 0``: each distinct row of the batch is scaled once by
       ``1 - lr * 2 * l2`` (its L2 gradient at the pre-step value);
    3. each rating k: ``W[row_k] -= lr * 2/m * err_k * u`` (and ``b_i -= lr * 2/m * err_k``);
    4. with ``joint``: ``u -= lr * (2/m Σ err w + 2 l2 u)``, ``b_u -= lr * 2/m Σ err`` (the
       gradient from the pre-step rows).

    The update is ``W - W0``; the final ``(u, b_u)`` is kept in the result. A non-finite update
    or loss gives status 1, weight 0 and no rows; no query data or no steps gives status 2,
    weight 0; otherwise the weight is the query-set size (``examples``) or 1 (``uniform``).
    """
    V = model.item_factors
    K = V.shape[1]
    bias = model.has_bias
    steps = schedule_steps(len(query), config.update_epochs, config.update_steps_max)
    num_query = sum(len(b) for b in query)

    local_of: dict[int, int] = {}
    for batch in query[: min(steps, len(query))]:
        for p in batch:
            local_of.setdefault(int(items[p]), len(local_of))
    rows = np.array(list(local_of), dtype=np.int32)
    W = V[rows].astype(F32)  # a copy
    W0 = W.copy()
    Wb = model.item_bias[rows].astype(F32) if bias else None
    Wb0 = Wb.copy() if bias else None

    lr, l2 = F32(config.client_lr), F32(config.update_l2)
    loss_sum, num_examples, num_correct = 0.0, 0, 0
    u = u.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(steps):
            batch = query[s % len(query)]
            m = len(batch)
            locs = [local_of[int(items[p])] for p in batch]
            errs = []
            gu = np.zeros(K, dtype=F32)
            gbu = F32(0.0)
            for p, row in zip(batch, locs):
                err = predict(u, bu, W[row], Wb[row] if bias else F32(0.0), model) - ratings[p]
                errs.append(err)
                loss_sum += float(err) * float(err)
                num_correct += int(abs(err) <= F32(0.5))
                gu += err * W[row]
                gbu += err
            num_examples += m
            scale = F32(2.0) / F32(m)
            if l2 > 0:
                decay = F32(1.0) - lr * F32(2.0) * l2
                for row in dict.fromkeys(locs):  # distinct rows, once each
                    W[row] *= decay
            for row, err in zip(locs, errs):
                step = lr * scale * err
                W[row] -= step * u
                if bias:
                    Wb[row] -= step
            if config.joint:
                u = u - lr * (scale * gu + (F32(2.0) * l2) * u)
                if bias:
                    bu = bu - lr * scale * gbu
        delta = W - W0
        bias_delta = Wb - Wb0 if bias else None

    finite = bool(np.isfinite(delta).all()) and np.isfinite(loss_sum)
    if bias:
        finite = finite and bool(np.isfinite(bias_delta).all())
    stats = dict(
        loss_sum=loss_sum,
        num_examples=num_examples,
        num_correct=num_correct,
        rows=len(rows),
        status=STATUS_OK,
        weight=0.0,
    )
    if not finite:
        stats.update(status=STATUS_NONFINITE, rows=0)
        rows = rows[:0]
        delta = delta[:0]
        bias_delta = bias_delta[:0] if bias else None
    elif num_query == 0 or steps == 0:
        stats.update(status=STATUS_NO_QUERY)
    else:
        stats.update(weight=float(num_query) if config.weighting == "examples" else 1.0)
    return ClientResult(rows, delta, bias_delta, stats, u.astype(F32), F32(bu))


def evaluate_client(model: Model, items, ratings, query, u, bu) -> dict:
    """ReconEval of one client: squared error (float64 sum), count and ``|err| <= 0.5`` over
    the whole query set, with V as given (not updated)."""
    sq, absolute, correct, count = 0.0, 0.0, 0, 0
    for batch in query:
        for p in batch:
            item = items[p]
            bi = model.item_bias[item] if model.has_bias else F32(0.0)
            err = predict(u, bu, model.item_factors[item], bi, model) - ratings[p]
            sq += float(err) * float(err)
            absolute += abs(float(err))
            correct += int(abs(err) <= F32(0.5))
            count += 1
    return dict(sq_err_sum=sq, abs_err_sum=absolute, num_examples=count, num_correct=correct)


# --------------------------------------------------------------------------------------------
# Cohort kernels (same signatures as fedrecon_fast.kernels)
# --------------------------------------------------------------------------------------------


def _prepare(item_factors, data, clients, item_bias, global_mean, user_default=None, user_bias_default=0.0):
    """The float32 model and the clients as a list of ints."""
    model = Model(
        np.asarray(item_factors, dtype=F32),
        None if item_bias is None else np.asarray(item_bias, dtype=F32),
        F32(global_mean),
        None if user_default is None else np.asarray(user_default, dtype=F32),
        F32(user_bias_default),
    )
    if clients is None:
        clients = range(data.num_clients)
    clients = [int(c) for c in np.asarray(clients).reshape(-1)]
    return model, clients


def _client_data(data, c):
    """Items (int32) and ratings (float32) of client ``c``."""
    lo, hi = int(data.indptr[c]), int(data.indptr[c + 1])
    return data.items[lo:hi], data.ratings[lo:hi].astype(F32)


def _run_client(model, data, c, config, seed, round, init_u=None, init_bu=None):  # noqa: A002
    """Split, reconstruct (from the stored ``init_u``/``init_bu`` when given) and update one
    client. With a stored ``init_u``, a client whose update is not finite gets its stored
    values back as its final ``u``/``b_u``."""
    items, ratings = _client_data(data, c)
    support, query = split_client(len(items), c, config, seed, round)
    u, bu = reconstruct(model, items, ratings, support, config, seed, round, c, init_u, init_bu)
    result = client_update(model, items, ratings, query, u, bu, config)
    if init_u is not None and result.stats["status"] == STATUS_NONFINITE:
        result.user = np.array(init_u, dtype=F32)
        result.user_bias = F32(0.0 if init_bu is None else init_bu)
    if config.recon == "exact":
        recon_examples = sum(len(b) for b in support)
    else:
        steps = schedule_steps(len(support), config.recon_epochs, config.recon_steps_max)
        recon_examples = sum(len(support[s % len(support)]) for s in range(steps))
    result.stats["recon_examples"] = recon_examples
    # Bytes sent with the default codec (touched rows as float32 with a 4-byte id each, plus
    # their float32 item-bias deltas); clients that do not report send nothing.
    K = model.item_factors.shape[1]
    n = result.stats["rows"]
    reporting = result.stats["weight"] > 0
    result.stats["bytes"] = n * (4 + 4 * K) + (4 * n if model.has_bias else 0) if reporting else 0
    result.stats["clipped"] = 0
    return result


def _stats_columns(per_client: list[dict]) -> dict:
    """Per-client stats as arrays with the native dtypes."""
    dtypes = dict(
        weight=np.float64,
        loss_sum=np.float64,
        num_examples=np.int64,
        num_correct=np.int64,
        rows=np.int64,
        recon_examples=np.int64,
        bytes=np.int64,
        clipped=np.int8,
        status=np.int8,
    )
    return {k: np.array([s[k] for s in per_client], dtype=t) for k, t in dtypes.items()}


def _run_cohort(model, data, clients, config, seed, round, users, user_bias):  # noqa: A002
    """:func:`_run_client` for each sampled client; row ``i`` of ``users`` (and entry ``i`` of
    ``user_bias``) is the stored state of the i-th sampled client, not of client id ``i``."""
    if users is None:
        if user_bias is not None:
            raise ValueError("user_bias needs users")
        return [_run_client(model, data, c, config, seed, round) for c in clients]
    users = np.asarray(users, dtype=F32)
    assert users.shape == (len(clients), model.item_factors.shape[1]), users.shape
    if user_bias is not None:
        user_bias = np.asarray(user_bias, dtype=F32)
    return [
        _run_client(model, data, c, config, seed, round, users[i], None if user_bias is None else user_bias[i])
        for i, c in enumerate(clients)
    ]


def final_users(results: list[ClientResult], dim: int, has_bias: bool):
    """The clients' final ``(users (m, dim), user_bias (m,) or None)``, float32."""
    users = np.array([r.user for r in results], dtype=F32).reshape(len(results), dim)
    user_bias = np.array([r.user_bias for r in results], dtype=F32) if has_bias else None
    return users, user_bias


def client_updates(
    item_factors,
    data,
    clients=None,
    config=None,
    *,
    item_bias=None,
    global_mean=0.0,
    seed=0,
    round=0,
    users=None,
    user_bias=None,  # noqa: A002
    user_default=None,
    user_bias_default=0.0,
):
    """Per-client sparse updates: list of :class:`ClientResult` in the order of ``clients``.

    A client that does not report (weight 0) contributes no rows, as in the native output.
    With stored ``users`` (and ``user_bias``; one row per sampled client) reconstruction
    starts from them; each result's ``user``/``user_bias`` is the client's final state (see
    :func:`final_users`).
    """
    model, clients = _prepare(item_factors, data, clients, item_bias, global_mean, user_default, user_bias_default)
    out = []
    for r in _run_cohort(model, data, clients, config, seed, round, users, user_bias):
        if r.stats["weight"] <= 0:
            r = ClientResult(
                r.rows[:0],
                r.delta[:0],
                None if r.bias_delta is None else r.bias_delta[:0],
                r.stats,
                r.user,
                r.user_bias,
            )
        out.append(r)
    return out


def aggregate(results: list[ClientResult], num_items: int, dim: int, has_bias: bool):
    """Weighted mean ``Σ w_i Δ_i / Σ w_i`` of the reporting clients, summed in float64 in
    cohort order, then cast to float32; all zeros when no client reports."""
    acc = np.zeros((num_items, dim))
    acc_bias = np.zeros(num_items)
    total = sum(r.stats["weight"] for r in results if r.stats["weight"] > 0)
    if total <= 0:
        return acc.astype(F32), (acc_bias.astype(F32) if has_bias else None)
    for r in results:
        w = r.stats["weight"]
        if w <= 0:
            continue
        acc[r.rows] += w * r.delta.astype(np.float64)
        if has_bias:
            acc_bias[r.rows] += w * r.bias_delta.astype(np.float64)
    inv = 1.0 / total
    return (acc * inv).astype(F32), ((acc_bias * inv).astype(F32) if has_bias else None)


def train_round(
    item_factors,
    data,
    clients=None,
    config=None,
    *,
    item_bias=None,
    global_mean=0.0,
    seed=0,
    round=0,
    users=None,
    user_bias=None,  # noqa: A002
    user_default=None,
    user_bias_default=0.0,
):
    """The fused round: ``(delta, delta_bias, client_stats, summary)`` like the native kernel;
    with stored ``users`` given (stateful baselines), ``(delta, delta_bias, client_stats,
    summary, users, user_bias)`` with the clients' final embeddings (``user_bias`` None
    without biases), like ``fedrecon_fast._core.train_round``.

    ``summary`` sums loss, examples and correct counts over the clients whose update is finite
    (reporting or not), counts reporting (weight > 0) and non-finite clients, ``rows_sent`` (touched rows of
    reporting clients) and ``rows_aggregated`` (distinct rows touched by reporting clients).
    """
    model, clients = _prepare(item_factors, data, clients, item_bias, global_mean, user_default, user_bias_default)
    results = _run_cohort(model, data, clients, config, seed, round, users, user_bias)
    num_items, dim = model.item_factors.shape
    delta, delta_bias = aggregate(results, num_items, dim, model.has_bias)
    reporting = [r for r in results if r.stats["weight"] > 0]
    finite = [r for r in results if r.stats["status"] != STATUS_NONFINITE]
    touched = set()
    for r in reporting:
        touched.update(int(x) for x in r.rows)
    summary = dict(
        total_weight=float(sum(r.stats["weight"] for r in reporting)),
        loss_sum=float(sum(r.stats["loss_sum"] for r in finite)),
        num_examples=sum(r.stats["num_examples"] for r in finite),
        num_correct=sum(r.stats["num_correct"] for r in finite),
        num_reporting=len(reporting),
        num_nonfinite=sum(r.stats["status"] == STATUS_NONFINITE for r in results),
        rows_sent=sum(len(r.rows) for r in reporting),
        rows_aggregated=len(touched),
        bytes_sent=sum(r.stats["bytes"] for r in reporting),
        num_clipped=0,
    )
    out = (delta, delta_bias, _stats_columns([r.stats for r in results]), summary)
    if users is None:
        return out
    return out + final_users(results, dim, model.has_bias)


def reconstruct_users(
    item_factors,
    data,
    clients=None,
    config=None,
    *,
    item_bias=None,
    global_mean=0.0,
    seed=0,
    round=0,
    user_default=None,  # noqa: A002
    user_bias_default=0.0,
):
    """``(users (m, dim) float32, user_bias (m,) float32 or None)`` reconstructed on each
    client's support set."""
    model, clients = _prepare(item_factors, data, clients, item_bias, global_mean, user_default, user_bias_default)
    dim = model.item_factors.shape[1]
    users = np.zeros((len(clients), dim), dtype=F32)
    user_bias = np.zeros(len(clients), dtype=F32)
    for i, c in enumerate(clients):
        items, ratings = _client_data(data, c)
        support, _ = split_client(len(items), c, config, seed, round)
        users[i], user_bias[i] = reconstruct(model, items, ratings, support, config, seed, round, c)
    return users, (user_bias if model.has_bias else None)


def evaluate_users(
    item_factors,
    data,
    clients=None,
    config=None,
    *,
    item_bias=None,
    global_mean=0.0,
    seed=0,
    round=0,
    user_default=None,  # noqa: A002
    user_bias_default=0.0,
    k=None,
    relevance_threshold=4.0,
):
    """ReconEval per client: dict of arrays ``sq_err_sum``, ``abs_err_sum``, ``num_examples``,
    ``num_correct``; with ``k`` also ``num_relevant``, ``hits``, ``ndcg``, ``ap``, ``rr`` and
    ``top_items`` (:func:`rank_client`)."""
    model, clients = _prepare(item_factors, data, clients, item_bias, global_mean, user_default, user_bias_default)
    per_client = []
    for c in clients:
        items, ratings = _client_data(data, c)
        support, query = split_client(len(items), c, config, seed, round)
        u, bu = reconstruct(model, items, ratings, support, config, seed, round, c)
        stats = evaluate_client(model, items, ratings, query, u, bu)
        if k is not None:
            stats.update(rank_client(model, items, ratings, support, query, u, bu, k, relevance_threshold))
        per_client.append(stats)
    out = dict(
        sq_err_sum=np.array([s["sq_err_sum"] for s in per_client], dtype=np.float64),
        abs_err_sum=np.array([s["abs_err_sum"] for s in per_client], dtype=np.float64),
        num_examples=np.array([s["num_examples"] for s in per_client], dtype=np.int64),
        num_correct=np.array([s["num_correct"] for s in per_client], dtype=np.int64),
    )
    if k is not None:
        out.update(
            num_relevant=np.array([s["num_relevant"] for s in per_client], dtype=np.int64),
            hits=np.array([s["hits"] for s in per_client], dtype=np.int64),
            ndcg=np.array([s["ndcg"] for s in per_client], dtype=np.float64),
            ap=np.array([s["ap"] for s in per_client], dtype=np.float64),
            rr=np.array([s["rr"] for s in per_client], dtype=np.float64),
            top_items=np.array([s["top_items"] for s in per_client], dtype=np.int64).reshape(
                len(per_client), min(k, max(model.item_factors.shape[0], 1))
            ),
        )
    return out


# --------------------------------------------------------------------------------------------
# Ranking and inference for new users
# --------------------------------------------------------------------------------------------


def score_items(model: Model, u, bu) -> np.ndarray:
    """Predicted rating of every item, float32, in the order of :func:`predict`:
    ``(u . v_i + global_mean) + b_u + b_i``."""
    p = (model.item_factors @ np.asarray(u, dtype=F32)).astype(F32) + model.global_mean
    if model.has_bias:
        p = p + bu + model.item_bias
    return p.astype(F32)


def top_k(scores: np.ndarray, k: int, excluded=()):
    """The k best items of ``scores`` (highest first, ties to the lower index), skipping the
    ``excluded`` items and NaN scores; ``(items int64 (k,), scores float32 (k,))`` padded with
    -1 / NaN when fewer items qualify."""
    scores = np.asarray(scores, dtype=F32)
    ok = ~np.isnan(scores)
    ok[np.asarray(list(excluded), dtype=np.int64)] = False
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((idx, -scores[idx].astype(np.float64)))][:k]
    items = np.full(k, -1, dtype=np.int64)
    out = np.full(k, np.nan, dtype=F32)
    items[: len(order)] = order
    out[: len(order)] = scores[order]
    return items, out


def rank_client(model: Model, items, ratings, support, query, u, bu, k: int, relevance_threshold):
    """Recall/NDCG ingredients of one ReconEval client at cut-off k.

    Candidates: every item not in the support set. Relevant: the distinct query items rated
    >= ``relevance_threshold`` (None: all query items) that are candidates. ``hits`` = relevant
    items in the top k; ``ndcg`` = Σ_hits 1/log2(rank + 1) over Σ_{r=1..min(k, |relevant|)}
    1/log2(r + 1) (ranks from 1); ``ap`` = Σ_hits precision@rank / min(k, |relevant|); ``rr`` =
    1 / rank of the first hit (0 without one); all three NaN without relevant items.
    ``top_items``: the ranked items, min(k, num_items) of them, padded with -1.
    """
    sup = {int(items[p]) for b in support for p in b}
    width = min(k, max(model.item_factors.shape[0], 1))
    top, _ = top_k(score_items(model, u, bu), width, sup)
    threshold = -np.inf if relevance_threshold is None else float(F32(relevance_threshold))
    relevant = {int(items[p]) for b in query for p in b if float(ratings[p]) >= threshold} - sup
    if not relevant:
        nan = float("nan")
        return dict(num_relevant=0, hits=0, ndcg=nan, ap=nan, rr=nan, top_items=top)
    gains = np.array([1.0 if int(i) in relevant else 0.0 for i in top if i >= 0])
    ranks = np.arange(1, len(gains) + 1, dtype=np.float64)
    dcg = float((gains / np.log2(ranks + 1)).sum())
    ideal = min(k, len(relevant))
    idcg = float((1.0 / np.log2(np.arange(2, ideal + 2, dtype=np.float64))).sum())
    ap = float((np.cumsum(gains) / ranks * gains).sum()) / ideal
    first = np.flatnonzero(gains)
    rr = 1.0 / (first[0] + 1) if first.size else 0.0
    return dict(num_relevant=len(relevant), hits=int(gains.sum()), ndcg=dcg / idcg, ap=ap, rr=rr, top_items=top)


def _inference_config(config):
    """Inference uses every rating: the split of ``config`` becomes "reuse"."""
    return replace(config, split="reuse")


def infer_users(
    item_factors,
    data,
    clients=None,
    config=None,
    *,
    item_bias=None,
    global_mean=0.0,
    seed=0,
    round=0,
    user_default=None,
    user_bias_default=0.0,
):  # noqa: A002
    """``(users, user_bias or None)`` reconstructed from all of each user's ratings, with the
    random streams of client 0 for every user (position-independent)."""
    model, clients = _prepare(item_factors, data, clients, item_bias, global_mean, user_default, user_bias_default)
    config = _inference_config(config)
    dim = model.item_factors.shape[1]
    users = np.zeros((len(clients), dim), dtype=F32)
    user_bias = np.zeros(len(clients), dtype=F32)
    for i, c in enumerate(clients):
        items, ratings = _client_data(data, c)
        support, _ = split_client(len(items), 0, config, seed, round)
        users[i], user_bias[i] = reconstruct(model, items, ratings, support, config, seed, round, 0)
    return users, (user_bias if model.has_bias else None)


def recommend_users(
    item_factors,
    data,
    clients=None,
    config=None,
    *,
    k=10,
    exclude_seen=True,
    item_bias=None,
    global_mean=0.0,
    seed=0,
    round=0,
    user_default=None,  # noqa: A002
    user_bias_default=0.0,
):
    """``(items (m, k) int64, scores (m, k) float32)``: each user's top k by predicted rating
    after :func:`infer_users`, its rated items skipped when ``exclude_seen``."""
    model, clients = _prepare(item_factors, data, clients, item_bias, global_mean)
    users, user_bias = infer_users(
        item_factors,
        data,
        clients,
        config,
        item_bias=item_bias,
        global_mean=global_mean,
        seed=seed,
        round=round,
        user_default=user_default,
        user_bias_default=user_bias_default,
    )
    items = np.zeros((len(clients), k), dtype=np.int64)
    scores = np.zeros((len(clients), k), dtype=F32)
    for i, c in enumerate(clients):
        seen = set(_client_data(data, c)[0].tolist()) if exclude_seen else set()
        bu = user_bias[i] if user_bias is not None else F32(0.0)
        items[i], scores[i] = top_k(score_items(model, users[i], bu), k, seen)
    return items, scores


# --------------------------------------------------------------------------------------------
# Centralized matrix factorization (cpp/src/centralized.cpp)
# --------------------------------------------------------------------------------------------


def mf_sgd_epoch_reference(
    users, user_bias, items, item_bias, global_mean, user_ids, item_ids, ratings, batch_size, lr, l2
) -> float:
    """One epoch of minibatch SGD on ``users``/``items`` (float32, updated in place), like
    ``fedrecon_fast._core.mf_sgd_epoch``; returns the float64 sum of squared errors.

    The ratings are cut into consecutive batches of ``batch_size`` in the given order. For a
    batch of m ratings (loss = mean squared error + ``l2 (|u|² + |v|²)`` over its distinct rows):

    1. every error ``err = u·v + global_mean (+ b_u + b_i) - r`` is taken at the pre-step
       values, and the pre-step rows u0, v0 of each rating are kept;
    2. with ``l2 > 0`` each distinct user row and item row of the batch is scaled once by
       ``1 - lr * 2 * l2`` (its L2 gradient at the pre-step value; biases are not decayed);
    3. each rating j, in order: ``g = lr * 2/m * err_j``; ``u[a] -= g v0_j``, ``v[b] -= g u0_j``
       and, with biases, ``b_u[a] -= g``, ``b_i[b] -= g`` — so the gradients of repeated rows
       in a batch add up, all computed from the pre-step copies.

    Arithmetic in float32 in the native order, the SSE in float64. ``user_bias`` and
    ``item_bias`` are both given or both None.
    """
    assert (user_bias is None) == (item_bias is None)
    assert users.dtype == F32 and items.dtype == F32
    bias = user_bias is not None
    gm, lr, l2 = F32(global_mean), F32(lr), F32(l2)
    user_ids = np.asarray(user_ids, dtype=np.int64)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    ratings = np.asarray(ratings, dtype=F32)
    n = len(ratings)
    sse = 0.0
    for lo in range(0, n, batch_size):
        a_ids = [int(a) for a in user_ids[lo : lo + batch_size]]
        b_ids = [int(b) for b in item_ids[lo : lo + batch_size]]
        m = len(a_ids)
        u0 = [users[a].copy() for a in a_ids]
        v0 = [items[b].copy() for b in b_ids]
        errs = []
        for j, (a, b) in enumerate(zip(a_ids, b_ids)):
            p = F32(np.dot(u0[j], v0[j])) + gm
            if bias:
                p = p + (user_bias[a] + item_bias[b])
            err = F32(p - ratings[lo + j])
            errs.append(err)
            sse += float(err) * float(err)
        if l2 > 0:
            decay = F32(1.0) - lr * F32(2.0) * l2
            for a in dict.fromkeys(a_ids):
                users[a] *= decay
            for b in dict.fromkeys(b_ids):
                items[b] *= decay
        scale = lr * F32(2.0) / F32(m)
        for j, (a, b) in enumerate(zip(a_ids, b_ids)):
            g = scale * errs[j]
            users[a] -= g * v0[j]
            items[b] -= g * u0[j]
            if bias:
                user_bias[a] -= g
                item_bias[b] -= g
    return sse
