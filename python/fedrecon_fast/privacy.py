"""Differentially private aggregation of client updates: DP-FedAvg's Gaussian mechanism.

Following McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018), a round of DP-FedAvg

1. clips each client update to L2 norm ``C``: ``Δ_i · min(1, C / ||Δ_i||)``. A dense update is
   clipped over the whole array; a sparse-row update over the values it sends (FedRecon's
   sparse updates, Singhal et al. 2021, send only the rows of V a client touched);
2. sums the clipped updates with weights ``w_i ∈ [0, 1]`` (1 for uniform weighting, or
   McMahan's capped weights ``min(n_i / n_cap, 1)``, see :func:`capped_weights`), in float64;
3. adds independent Gaussian noise ``N(0, (z·C)²)`` to **every coordinate of the sum** (the
   whole output table, also rows nobody sent, so the set of touched rows is not revealed).
   With ``w_i <= 1`` one client moves the sum by at most ``C``, so ``z`` is the noise
   multiplier of the Gaussian mechanism with sensitivity ``C``;
4. divides by a **fixed denominator** (``expected_weight``): McMahan et al.'s
   fixed-denominator estimator ``f̃_f = Σ_i w_i clip(Δ_i) / (q W)``, where ``q`` is the
   client sampling probability and ``W = Σ_k w_k`` over *all* clients, so ``q W`` is the
   expected total weight of a round (the expected number of clients with uniform weights,
   as TFF's ``DifferentiallyPrivateFactory.gaussian_fixed`` uses). The denominator is a public
   constant, so dividing by it costs no privacy; dividing by the round's actual ``Σ w_i``
   would be data-dependent and is deliberately not offered. Without ``expected_weight`` the
   noised sum itself is returned.

The noise standard deviation is ``z·C`` on the sum (``z·C / expected_weight`` on the mean).
:mod:`fedrecon_fast.accounting` turns ``z``, the sampling and the number of rounds into
``(ε, δ)`` with Google's ``dp_accounting``.

**Adaptive clipping** (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021; the semantics of TensorFlow Privacy's
``QuantileEstimatorQuery`` with geometric updates, as TFF's ``gaussian_adaptive`` uses):
:func:`adaptive_clip_update` moves ``C`` after each round toward the ``γ`` quantile of the
update norms, from a noised count of the updates that were not clipped, and
:func:`value_noise_multiplier` splits a total noise multiplier between the update and that
count so that both together cost what one Gaussian mechanism with the total multiplier costs.

Noise is reproducible: coordinate ``g`` of round ``round`` is a pure function of
``(seed, round, g)`` — SplitMix64 stream ``derive_seed(seed, round, 0, STREAM_PRIVACY)``, pairs of
outputs turned into two normals by a hand-written Box–Muller transform (see
:func:`gaussian_noise`) — so it never depends on ``num_threads``. Use a new ``round`` (or
seed) for every release: two releases with the same noise reveal their difference.

:class:`DPGaussianSum` has the ``add`` / ``add_sparse`` / ``result`` interface of
:class:`fedrecon_fast.aggregation.WeightedMean`, so a training loop can swap one for the other.
"""

from __future__ import annotations

import math

import numpy as np

from ._native.aggregation import (
    DPGaussianSum,
    DPResult,
    clip_by_norm,
    dp_sum,
    dp_sum_sparse,
    gaussian_noise,
)
from ._rng import STREAM_CLIP_COUNT, STREAM_PRIVACY, generator
from ._validation import check_float, check_int, real_array

__all__ = [
    "STREAM_PRIVACY",
    "DPGaussianSum",
    "adaptive_clip_update",
    "value_noise_multiplier",
    "DPResult",
    "capped_weights",
    "clip_by_norm",
    "dp_sum",
    "dp_sum_sparse",
    "gaussian_noise",
    "privatize_mean",
]


def capped_weights(num_examples, cap: float) -> np.ndarray:
    """McMahan et al.'s per-client DP weights ``min(n_i / cap, 1)`` (float64, in [0, 1]).

    Parameters
    ----------
    num_examples : array_like, shape (n_clients,)
        Examples per client (>= 0).
    cap : float
        ``ŵ``: clients with at least ``cap`` examples get weight 1.
    """
    n = real_array(num_examples, "num_examples")
    if n.ndim != 1:
        raise ValueError(f"num_examples must be 1-D; got shape {n.shape}")
    n = n.astype(np.float64)
    if not np.isfinite(n).all() or (n < 0).any():
        raise ValueError("num_examples must be finite and >= 0")
    check_float(cap, "cap", minimum=0.0, strict=True)
    with np.errstate(over="ignore"):  # n / a tiny cap is inf: weight 1 all the same
        return np.minimum(n / float(cap), 1.0)


def privatize_mean(
    update: dict,
    total_weight: float,
    *,
    clip: float,
    noise_multiplier: float,
    expected_clients: float,
    seed: int,
    round: int = 0,
    num_threads: int = 0,
) -> None:
    """DP-FedAvg's server step on a round's weighted mean of clipped updates, in place.

    Each array of ``update`` (a dict of float32 means) becomes ``(mean · total_weight + noise) /
    expected_clients`` with Gaussian noise of std ``noise_multiplier · clip``
    (:func:`gaussian_noise` over all arrays in order): the noisy sum over a fixed denominator
    (McMahan et al. 2018).
    """
    sizes = [a.size for a in update.values()]
    noise = gaussian_noise(sum(sizes), noise_multiplier * clip, seed=seed, round=round, num_threads=num_threads)
    offset = 0
    for name, mean in update.items():
        noised = mean.astype(np.float64) * total_weight + noise[offset : offset + mean.size].reshape(mean.shape)
        update[name] = (noised / expected_clients).astype(np.float32)
        offset += mean.size


def value_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's own noise multiplier when adaptive clipping spends part of the budget.

    Adaptive clipping releases two Gaussian sums per round: the clipped updates (noise
    multiplier ``z_v`` relative to ``C``) and the count of unclipped updates, each contributing
    ``±1/2`` (noise std ``σ_b``, so multiplier ``2 σ_b``). Together they are one Gaussian
    mechanism with ``z = (z_v⁻² + (2 σ_b)⁻²)^(-1/2)`` (Andrew et al. 2021, Theorem 1), so for a
    total ``z`` the update gets ``z_v = (z⁻² - (2 σ_b)⁻²)^(-1/2)``, as TFF's
    ``DifferentiallyPrivateFactory.gaussian_adaptive`` computes.

    Parameters
    ----------
    noise_multiplier : float
        The total ``z >= 0`` (0: no noise on either).
    count_stddev : float
        ``σ_b``; must exceed ``z / 2`` when ``z > 0``.
    """
    check_float(noise_multiplier, "noise_multiplier", minimum=0.0)
    check_float(count_stddev, "count_stddev", minimum=0.0)
    if noise_multiplier == 0:
        return 0.0
    if 2.0 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"the clipped-count noise std ({count_stddev:g}) is too small for a total noise "
            f"multiplier of {noise_multiplier:g}: it must exceed {noise_multiplier / 2:g} (raise "
            "dp_clip_count_stddev or clients_per_round, or lower the noise multiplier)"
        )
    return (noise_multiplier**-2 - (2.0 * count_stddev) ** -2) ** -0.5


def adaptive_clip_update(
    clip: float,
    num_unclipped: int,
    num_records: int,
    *,
    target_quantile: float,
    learning_rate: float,
    count_stddev: float,
    expected_records: float,
    seed: int,
    round: int,
) -> tuple[float, float]:
    """One step of the private quantile estimator that adapts the clip norm (geometric update).

    ``b = clip01((Σ_i (1[||Δ_i|| <= C] - 1/2) + N(0, σ_b²)) / expected_records + 1/2)`` estimates
    the fraction of unclipped updates, and ``C ← C · exp(-learning_rate · (b - target_quantile))``:
    the clip norm shrinks while more than ``target_quantile`` of the updates fit under it and
    grows otherwise, converging to the ``target_quantile`` quantile of the update norms.

    Parameters
    ----------
    clip : float
        The round's clip norm ``C > 0``.
    num_unclipped, num_records : int
        Updates of the round with norm ``<= C``, and all updates counted (the reporting clients).
    target_quantile : float
        ``γ`` in [0, 1].
    learning_rate : float
        ``η >= 0``: the clip moves by a factor of at most ``exp(η)`` per round.
    count_stddev : float
        ``σ_b >= 0``, the noise std of the count (0: the exact count).
    expected_records : float
        The fixed denominator (the expected cohort size).
    seed, round : int
        Key the count's noise: ``derive_seed(seed, round, 0, STREAM_CLIP_COUNT)``.

    Returns
    -------
    new_clip : float
    unclipped_fraction : float
        The noised estimate ``b``.
    """
    check_float(clip, "clip", minimum=0.0, strict=True)
    check_int(num_records, "num_records", minimum=0)
    check_int(num_unclipped, "num_unclipped", minimum=0, maximum=num_records)
    check_float(target_quantile, "target_quantile", minimum=0.0, maximum=1.0)
    check_float(learning_rate, "learning_rate", minimum=0.0)
    check_float(count_stddev, "count_stddev", minimum=0.0)
    check_float(expected_records, "expected_records", minimum=0.0, strict=True)
    check_int(seed, "seed", minimum=0)
    check_int(round, "round", minimum=0)
    # Each record adds ±1/2 (sensitivity 1/2 under add/remove), centred so the noise has
    # nothing to bias.
    shifted = num_unclipped - 0.5 * num_records
    if count_stddev > 0:
        shifted += count_stddev * float(generator(seed, round, 0, STREAM_CLIP_COUNT).standard_normal())
    fraction = min(1.0, max(0.0, shifted / expected_records + 0.5))
    return float(clip) * math.exp(-learning_rate * (fraction - target_quantile)), fraction
