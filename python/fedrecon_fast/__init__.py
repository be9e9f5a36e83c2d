"""fedrecon_fast: fast, faithful Federated Reconstruction for matrix factorization.

Federated Reconstruction (Singhal et al., "Federated Reconstruction: Partially Local Federated
Learning", NeurIPS 2021) trains a global item matrix V across clients while each user's
embedding stays local and is reconstructed from the user's own ratings whenever it is needed.

The package in layers, each depending only on those above it:

- ``_native/``: the one place where Python meets the C++ core (the module for this CPU, the
  typed wrappers of its kernels, the configuration as native structs);
- the domain: ``config``, ``data`` (with ``loaders``, ``movielens``, ``synthetic``,
  ``splits``), ``model``, ``optimizers``, ``privacy`` and ``accounting``, ``evaluation``,
  ``inference``, and the kernels' public faces ``kernels``, ``compression``, ``aggregation``;
- orchestration: ``server`` (the server half of every round), ``training`` (:class:`FedRecon`),
  ``functional`` (one client's and the server's step), ``checkpoint``;
- ``integrations/`` (Flower, Ray) and ``experiments/`` (baselines, the paper, plots), and the
  command line, ``cli``.
"""

from . import _moved, accounting, aggregation, compression, functional, inference, privacy, sampling
from ._native import __version__, show_config
from .config import PRESETS, ClientConfig, DpParams, FedReconConfig, UpdateCodec, preset
from .data import ClientData, DataConfig, split_by_time, split_users
from .evaluation import leave_one_out, recon_eval
from .experiments import baselines
from .functional import ClientResult, ClientUpdate, ServerState, client_step, server_init, server_step
from .kernels import (
    ClientUpdates,
    RoundResult,
    client_updates,
    derive_seed,
    evaluate_users,
    infer_users,
    recommend_users,
    reconstruct_users,
    train_round,
)
from .model import GlobalModel
from .movielens import download_movielens, load_movielens
from .optimizers import make_optimizer
from .splits import ClientSplits, split_ratings
from .synthetic import synthetic_ratings
from .training import FedRecon, sample_clients

_moved.install()  # fedrecon_fast.flower, .distributed, .baselines, ... keep importing

__all__ = [
    "__version__",
    "accounting",
    "aggregation",
    "baselines",
    "compression",
    "functional",
    "inference",
    "privacy",
    "sampling",
    "PRESETS",
    "ClientConfig",
    "ClientData",
    "DataConfig",
    "DpParams",
    "ClientResult",
    "ClientSplits",
    "ClientUpdate",
    "ClientUpdates",
    "FedRecon",
    "FedReconConfig",
    "GlobalModel",
    "RoundResult",
    "UpdateCodec",
    "ServerState",
    "client_step",
    "client_updates",
    "derive_seed",
    "download_movielens",
    "evaluate_users",
    "infer_users",
    "leave_one_out",
    "load_movielens",
    "make_optimizer",
    "preset",
    "recon_eval",
    "reconstruct_users",
    "recommend_users",
    "sample_clients",
    "server_init",
    "show_config",
    "server_step",
    "split_by_time",
    "split_ratings",
    "split_users",
    "synthetic_ratings",
    "train_round",
]
