# The public face of the compression kernels; they are implemented (validated and bound) in
# fedrecon_fast._native.compression, whose docstring is this module's.
from ._native import compression as _impl
from ._native.compression import (
    FORMAT_VERSION,
    buffer_info,
    decode,
    decode_accumulate,
    decode_accumulate_batch,
    decode_sparse,
    encode,
    encode_sparse,
    encoded_size,
    quantize,
    quantize_accumulate,
)

__doc__ = _impl.__doc__
__all__ = list(_impl.__all__)
