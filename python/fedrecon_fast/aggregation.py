# The public face of the weighted aggregation kernels; they are implemented (validated and
# bound) in fedrecon_fast._native.aggregation, whose weighted-mean docstring is this module's.
from ._native import aggregation as _impl
from ._native.aggregation import WeightedMean, weighted_mean, weighted_mean_sparse

__doc__ = _impl.__doc__
__all__ = ["WeightedMean", "weighted_mean", "weighted_mean_sparse"]
