# The public face of the cohort kernels; they are implemented (validated and bound) in
# fedrecon_fast._native.kernels, whose docstring is this module's.
from ._native import kernels as _impl
from ._native.kernels import (
    ClientUpdates,
    DenseNoise,
    RoundResult,
    ServerMomentum,
    client_updates,
    derive_seed,
    evaluate_users,
    infer_users,
    mf_sgd_epoch,
    recommend_users,
    reconstruct_users,
    reduce_updates,
    sample_clients,
    train_round,
    train_rounds,
)

__doc__ = _impl.__doc__
__all__ = list(_impl.__all__)
