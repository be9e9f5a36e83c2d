"""Poisson client sampling: every client takes part in a round independently with one rate.

The default cohort of :class:`~fedrecon_fast.FedRecon` is a fixed number of clients drawn
without replacement (:func:`fedrecon_fast.sample_clients`). Poisson sampling is the scheme
most differential-privacy analyses assume (the accountant's ``PoissonSampledDpEvent``): the
cohort's size varies from round to round, but whether a client takes part says nothing about
any other client. ``FedReconConfig(sampling="poisson")`` selects it.
"""

from __future__ import annotations

import numpy as np

from ._rng import STREAM_POISSON, generator
from ._validation import check_float, check_int

__all__ = ["poisson_sample_clients", "poisson_rate"]


def poisson_rate(num_clients: int, clients_per_round: int) -> float:
    """The sampling rate ``q = min(1, clients_per_round / num_clients)``: the expected cohort
    size is ``clients_per_round`` (all clients when there are fewer)."""
    check_int(num_clients, "num_clients", minimum=1)
    check_int(clients_per_round, "clients_per_round", minimum=1)
    return min(1.0, clients_per_round / num_clients)


def poisson_sample_clients(num_clients: int, rate: float, seed: int, round: int) -> np.ndarray:
    """Clients of one round, each present with probability ``rate``; depends only on (seed, round).

    Drawn as a Binomial(num_clients, rate) cohort size and then that many distinct clients
    uniformly at random, which is the same distribution as one independent coin per client at
    O(cohort) cost instead of O(num_clients). The stream is
    ``derive_seed(seed, round, 0, STREAM_POISSON)``, never that of the fixed-size sampler.

    Returns
    -------
    ndarray of int64
        Client indices in the order drawn (the order of the round's reduction); possibly empty.
    """
    check_int(num_clients, "num_clients", minimum=0)
    check_float(rate, "rate", minimum=0.0, maximum=1.0)
    check_int(seed, "seed", minimum=0)
    check_int(round, "round", minimum=0)
    rng = generator(seed, round, 0, STREAM_POISSON)
    size = int(rng.binomial(num_clients, rate)) if num_clients else 0
    return rng.choice(num_clients, size=size, replace=False).astype(np.int64)
