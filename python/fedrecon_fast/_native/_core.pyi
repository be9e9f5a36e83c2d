"""Type stub of the native core: the interface every compiled module ``_core_<target>`` shares.

The extension is built once per SIMD target (``_core_baseline``, ``_core_avx2``,
``_core_avx512``, or ``_core_native`` with ``FEDRECON_NATIVE=ON``); ``fedrecon_fast._native``
loads one of them as ``core``, typed by this stub. Written from the bindings
(``bindings/*.cpp``; first generated with pybind11-stubgen) and checked against every module
this machine runs by ``tests/test_native_stubs.py``. Private: use the ``fedrecon_fast`` API.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__version__: str
#: The SIMD target this module was compiled for, its compiler flags and the compiler.
TARGET: str
TARGET_FLAGS: str
COMPILER: str
WIRE_FORMAT_VERSION: int

class ClientConfig:
    joint: bool
    reshuffle: bool
    def __init__(self) -> None: ...
    @property
    def batch_size(self) -> int: ...
    @batch_size.setter
    def batch_size(self, arg0: int) -> None: ...
    @property
    def client_lr(self) -> float: ...
    @client_lr.setter
    def client_lr(self, arg0: float) -> None: ...
    @property
    def init(self) -> int: ...
    @init.setter
    def init(self, arg1: int) -> None: ...
    @property
    def init_scale(self) -> float: ...
    @init_scale.setter
    def init_scale(self, arg0: float) -> None: ...
    @property
    def recon(self) -> int: ...
    @recon.setter
    def recon(self, arg1: int) -> None: ...
    @property
    def recon_epochs(self) -> int: ...
    @recon_epochs.setter
    def recon_epochs(self, arg0: int) -> None: ...
    @property
    def recon_l2(self) -> float: ...
    @recon_l2.setter
    def recon_l2(self, arg0: float) -> None: ...
    @property
    def recon_lr(self) -> float: ...
    @recon_lr.setter
    def recon_lr(self, arg0: float) -> None: ...
    @property
    def recon_steps_max(self) -> int: ...
    @recon_steps_max.setter
    def recon_steps_max(self, arg0: int) -> None: ...
    @property
    def ridge(self) -> float: ...
    @ridge.setter
    def ridge(self, arg0: float) -> None: ...
    @property
    def split(self) -> int: ...
    @split.setter
    def split(self, arg1: int) -> None: ...
    @property
    def support_fraction(self) -> float: ...
    @support_fraction.setter
    def support_fraction(self, arg0: float) -> None: ...
    @property
    def update_epochs(self) -> int: ...
    @update_epochs.setter
    def update_epochs(self, arg0: int) -> None: ...
    @property
    def update_l2(self) -> float: ...
    @update_l2.setter
    def update_l2(self, arg0: float) -> None: ...
    @property
    def update_steps_max(self) -> int: ...
    @update_steps_max.setter
    def update_steps_max(self, arg0: int) -> None: ...
    @property
    def user_bias_default(self) -> float: ...
    @user_bias_default.setter
    def user_bias_default(self, arg0: float) -> None: ...
    @property
    def user_default(self) -> list[float]: ...
    @user_default.setter
    def user_default(self, arg0: Sequence[float]) -> None: ...
    @property
    def weighting(self) -> int: ...
    @weighting.setter
    def weighting(self, arg1: int) -> None: ...

class UpdateCodec:
    hadamard: bool
    row_scaling: bool
    sparse: bool
    def __init__(self) -> None: ...
    @property
    def bits(self) -> int: ...
    @bits.setter
    def bits(self, arg0: int) -> None: ...
    @property
    def clip(self) -> float: ...
    @clip.setter
    def clip(self, arg0: float) -> None: ...
    @property
    def threshold(self) -> int: ...
    @threshold.setter
    def threshold(self, arg0: int) -> None: ...

class WeightedSum:
    def __init__(self, num_rows: int, dim: int) -> None: ...
    def add_dense(self, x: NDArray[np.float32], coef: float, weight: float, num_threads: int) -> None: ...
    def add_sparse(self, rows: NDArray[np.int32], values: NDArray[np.float32], coef: float, weight: float) -> None: ...
    def mean(self, float64: bool, num_threads: int, out: Any = None) -> np.ndarray: ...
    def reset(self) -> None: ...
    def sum(self, float64: bool, num_threads: int, out: Any = None) -> np.ndarray: ...
    @property
    def dim(self) -> int: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def num_updates(self) -> int: ...
    @property
    def rows_held(self) -> int: ...
    @property
    def total_weight(self) -> float: ...

class GaussianSum:
    def __init__(
        self, num_rows: int, dim: int, clip: float, noise_multiplier: float, seed: int, round: int
    ) -> None: ...
    def add_dense(self, x: NDArray[np.float32], weight: float, num_threads: int) -> float: ...
    def add_sparse(
        self, rows: NDArray[np.int32], values: NDArray[np.float32], weight: float, num_threads: int
    ) -> float: ...
    def finalize(self, denominator: float, float64: bool, num_threads: int, out: Any = None) -> np.ndarray: ...
    def reset(self) -> None: ...
    def summary(self) -> dict[str, Any]: ...

def buffer_info(buf: NDArray[np.uint8], num_threads: int) -> dict[str, Any]: ...
def client_updates(
    item_factors: NDArray[np.float32],
    item_bias: NDArray[np.float32] | None,
    global_mean: float,
    indptr: NDArray[np.int64],
    items: NDArray[np.int32],
    ratings: NDArray[np.float32],
    clients: NDArray[np.int64],
    config: ClientConfig,
    seed: int,
    round: int,
    num_threads: int,
    users: NDArray[np.float32] | None = None,
    user_bias: NDArray[np.float32] | None = None,
    codec: UpdateCodec = ...,
    stream_ids: NDArray[np.int64] | None = None,
) -> dict[str, Any]: ...
def clip_by_norm(x: NDArray[np.float32], clip: float, num_threads: int) -> tuple[NDArray[np.float32], float]: ...
def cpu_features() -> list[tuple[str, bool]]: ...
def cpu_supports(target: str) -> bool: ...
def decode(buf: NDArray[np.uint8], num_threads: int) -> NDArray[np.float32]: ...
def decode_accumulate(
    buffers: list[NDArray[np.uint8]], weights: NDArray[np.float64], out: NDArray[np.float64], num_threads: int
) -> None: ...
def decode_sparse(buf: NDArray[np.uint8], num_threads: int) -> tuple[NDArray[np.int32], NDArray[np.float32], int]: ...
def derive_seed(seed: int, round: int, client: int, stream: int) -> int: ...
def dp_sum_dense(
    updates: list[NDArray[np.float32]],
    size: int,
    weights: NDArray[np.float64],
    clip: float,
    noise_multiplier: float,
    seed: int,
    round: int,
    denominator: float,
    float64: bool,
    num_threads: int,
    out: Any = None,
) -> tuple[np.ndarray, NDArray[np.float64], dict]: ...
def dp_sum_sparse(
    offsets: NDArray[np.int64],
    rows: NDArray[np.int32],
    values: NDArray[np.float32],
    weights: NDArray[np.float64],
    num_rows: int,
    clip: float,
    noise_multiplier: float,
    seed: int,
    round: int,
    denominator: float,
    float64: bool,
    num_threads: int,
    out: Any = None,
) -> tuple[np.ndarray, NDArray[np.float64], dict]: ...
def encode(
    x: NDArray[np.float32], bits: int, row_scaling: bool, hadamard: bool, key: int, num_threads: int
) -> bytes: ...
def encode_sparse(
    rows: NDArray[np.int32],
    values: NDArray[np.float32],
    num_rows: int,
    bits: int,
    row_scaling: bool,
    hadamard: bool,
    key: int,
    num_threads: int,
) -> bytes: ...
def encoded_size(shape: Sequence[int], bits: int, row_scaling: bool, hadamard: bool, sparse_rows: int) -> int: ...
def evaluate_users(
    item_factors: NDArray[np.float32],
    item_bias: NDArray[np.float32] | None,
    global_mean: float,
    indptr: NDArray[np.int64],
    items: NDArray[np.int32],
    ratings: NDArray[np.float32],
    clients: NDArray[np.int64],
    config: ClientConfig,
    seed: int,
    round: int,
    num_threads: int,
    k: int = 0,
    relevance_threshold: float = 4.0,
    stream_ids: NDArray[np.int64] | None = None,
) -> dict[str, Any]: ...
def gaussian_noise(size: int, std: float, seed: int, round: int, num_threads: int) -> NDArray[np.float64]: ...
def infer_users(
    item_factors: NDArray[np.float32],
    item_bias: NDArray[np.float32] | None,
    global_mean: float,
    indptr: NDArray[np.int64],
    items: NDArray[np.int32],
    ratings: NDArray[np.float32],
    clients: NDArray[np.int64],
    config: ClientConfig,
    seed: int,
    round: int,
    num_threads: int,
    stream_ids: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]: ...
def max_threads() -> int:
    """
    Most threads one call uses (4 x the hardware threads).
    """

def mf_sgd_epoch(
    users: NDArray[np.float32],
    user_bias: NDArray[np.float32] | None,
    items: NDArray[np.float32],
    item_bias: NDArray[np.float32] | None,
    global_mean: float,
    user_ids: NDArray[np.int64],
    item_ids: NDArray[np.int32],
    ratings: NDArray[np.float32],
    batch_size: int,
    lr: float,
    l2: float,
) -> float: ...
def noise_key(seed: int, round: int) -> int: ...
def quantize(
    x: NDArray[np.float32], bits: int, row_scaling: bool, hadamard: bool, key: int, num_threads: int
) -> NDArray[np.float32]: ...
def quantize_accumulate(
    x: NDArray[np.float32],
    bits: int,
    row_scaling: bool,
    hadamard: bool,
    key: int,
    weight: float,
    out: NDArray[np.float64],
    num_threads: int,
) -> None: ...
def recommend_users(
    item_factors: NDArray[np.float32],
    item_bias: NDArray[np.float32] | None,
    global_mean: float,
    indptr: NDArray[np.int64],
    items: NDArray[np.int32],
    ratings: NDArray[np.float32],
    clients: NDArray[np.int64],
    config: ClientConfig,
    seed: int,
    round: int,
    num_threads: int,
    k: int,
    exclude_seen: bool = True,
) -> tuple[NDArray[np.int64], NDArray[np.float32]]: ...
def reconstruct_users(
    item_factors: NDArray[np.float32],
    item_bias: NDArray[np.float32] | None,
    global_mean: float,
    indptr: NDArray[np.int64],
    items: NDArray[np.int32],
    ratings: NDArray[np.float32],
    clients: NDArray[np.int64],
    config: ClientConfig,
    seed: int,
    round: int,
    num_threads: int,
    stream_ids: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]: ...
def reduce_updates(
    rows: NDArray[np.int32],
    values: NDArray[np.float32],
    bias_values: NDArray[np.float32] | None,
    offsets: NDArray[np.int64],
    weights: NDArray[np.float64],
    num_items: int,
    num_threads: int,
    noise_lo: NDArray[np.float32] | None = None,
    noise_step: NDArray[np.float32] | None = None,
    noise_key: NDArray[np.uint64] | None = None,
    codec: UpdateCodec = ...,
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None, float]: ...
def sample_clients(num_clients: int, clients_per_round: int, seed: int, round: int) -> NDArray[np.int64]: ...
def squared_norm(x: NDArray[np.float32], num_threads: int) -> float: ...
def train_round(
    item_factors: NDArray[np.float32],
    item_bias: NDArray[np.float32] | None,
    global_mean: float,
    indptr: NDArray[np.int64],
    items: NDArray[np.int32],
    ratings: NDArray[np.float32],
    clients: NDArray[np.int64],
    config: ClientConfig,
    seed: int,
    round: int,
    num_threads: int,
    users: NDArray[np.float32] | None = None,
    user_bias: NDArray[np.float32] | None = None,
    codec: UpdateCodec = ...,
    stream_ids: NDArray[np.int64] | None = None,
    apply_lr: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    velocity: NDArray[np.float32] | None = None,
    velocity_bias: NDArray[np.float32] | None = None,
) -> tuple[
    NDArray[np.float32] | None,
    NDArray[np.float32] | None,
    dict[str, Any],
    dict[str, Any],
    NDArray[np.float32] | None,
    NDArray[np.float32] | None,
]: ...
def train_rounds(
    item_factors: NDArray[np.float32],
    item_bias: NDArray[np.float32] | None,
    global_mean: float,
    indptr: NDArray[np.int64],
    items: NDArray[np.int32],
    ratings: NDArray[np.float32],
    config: ClientConfig,
    codec: UpdateCodec,
    seed: int,
    first_round: int,
    num_rounds: int,
    clients_per_round: int,
    lr: float,
    num_threads: int,
    momentum: float = 0.0,
    nesterov: bool = False,
    velocity: NDArray[np.float32] | None = None,
    velocity_bias: NDArray[np.float32] | None = None,
) -> dict[str, Any]: ...
def weighted_mean_dense(
    updates: list[NDArray[np.float32]],
    size: int,
    weights: NDArray[np.float64],
    float64: bool,
    num_threads: int,
    out: Any = None,
) -> tuple[np.ndarray, float]: ...
def weighted_mean_sparse(
    offsets: NDArray[np.int64],
    rows: NDArray[np.int32],
    values: NDArray[np.float32],
    weights: NDArray[np.float64],
    num_rows: int,
    float64: bool,
    num_threads: int,
    out: Any = None,
) -> tuple[np.ndarray, float]: ...
