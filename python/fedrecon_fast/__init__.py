"""fedrecon_fast: fast, faithful Federated Reconstruction for matrix factorization.

Federated Reconstruction (Singhal et al., "Federated Reconstruction: Partially Local Federated
Learning", NeurIPS 2021) trains a global item matrix V across clients while each user's
embedding stays local and is reconstructed from the user's own ratings whenever it is needed.
The hot paths run in C++ (``fedrecon_fast._native``, private); this package is the API.
"""

from . import accounting, aggregation, baselines, compression, functional, inference, privacy, sampling
from ._native import core as _core
from ._native import show_config

__version__ = _core.__version__
from .config import PRESETS, ClientConfig, FedReconConfig, preset
from .data import ClientData, split_by_time, split_users
from .evaluation import leave_one_out, recon_eval
from .functional import ClientResult, ClientUpdate, ServerState, client_step, server_init, server_step
from .kernels import (
    ClientUpdates,
    RoundResult,
    client_updates,
    derive_seed,
    evaluate_users,
    infer_users,
    reconstruct_users,
    recommend_users,
    train_round,
)
from .model import GlobalModel
from .movielens import download_movielens, load_movielens
from .optimizers import make_optimizer
from .splits import ClientSplits, split_ratings
from .synthetic import synthetic_ratings
from .training import FedRecon, sample_clients

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
    "ClientResult",
    "ClientSplits",
    "ClientUpdate",
    "ClientUpdates",
    "FedRecon",
    "FedReconConfig",
    "GlobalModel",
    "RoundResult",
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
