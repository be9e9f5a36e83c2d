"""The global FedRecon model (item factors, optional biases) and its pickle-free storage."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._rng import STREAM_MODEL_INIT, generator
from ._validation import as_float32_matrix, as_float32_vector, check_float
from .config import FedReconConfig

FORMAT = "fedrecon_fast.model"
FORMAT_VERSION = 1


@dataclass
class GlobalModel:
    """Server-side state of a FedRecon model.

    Attributes
    ----------
    item_factors : ndarray, shape (num_items, dim), float32
        The global item matrix V.
    item_bias : ndarray, shape (num_items,), float32, or None
        Item biases (None for a model without biases).
    global_mean : float
        Added to every prediction (0 without biases).
    item_ids : ndarray, shape (num_items,), int64
        Original item id of each row of V.
    config : FedReconConfig or None
        The configuration that trained it (also used to reconstruct users).
    user_default : ndarray, shape (dim,), float32, or None
        The learned global default for u (``config.learn_user_default``): reconstruction
        starts from it, and a user without ratings (cold start) gets it.
    user_bias_default : float
        The same for the user bias.
    """

    item_factors: np.ndarray
    item_bias: np.ndarray | None
    global_mean: float
    item_ids: np.ndarray
    config: FedReconConfig | None = None
    user_default: np.ndarray | None = None
    user_bias_default: float = 0.0

    def __post_init__(self) -> None:
        self.item_factors = as_float32_matrix(self.item_factors, "item_factors")
        if self.item_factors.shape[1] < 1:
            raise ValueError("item_factors must have at least one column (dim >= 1)")
        n = self.item_factors.shape[0]
        if self.item_bias is not None:
            self.item_bias = as_float32_vector(self.item_bias, "item_bias", size=n)
        check_float(self.global_mean, "global_mean")
        self.global_mean = float(self.global_mean)
        ids = np.asarray(self.item_ids)
        if ids.shape != (n,) or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"item_ids must be {n} integer ids, one per row of item_factors")
        self.item_ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.user_default is not None:
            self.user_default = as_float32_vector(self.user_default, "user_default", size=self.dim,
                                                  check_finite=True)
        check_float(self.user_bias_default, "user_bias_default")
        self.user_bias_default = float(self.user_bias_default)

    def default_kwargs(self) -> dict:
        """The kernels' ``user_default``/``user_bias_default`` arguments for this model."""
        if self.user_default is None:
            return {}
        return {"user_default": self.user_default, "user_bias_default": self.user_bias_default}

    @property
    def num_items(self) -> int:
        return self.item_factors.shape[0]

    @property
    def dim(self) -> int:
        return self.item_factors.shape[1]

    @classmethod
    def initialize(cls, item_ids, config: FedReconConfig, global_mean: float = 0.0) -> GlobalModel:
        """V ~ U(-a, a) (Keras 'uniform', a = config.item_init_scale), biases 0."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        rng = generator(config.seed, 0, 0, STREAM_MODEL_INIT)
        a = config.item_init_scale
        V = rng.uniform(-a, a, size=(len(item_ids), config.dim)).astype(np.float32)
        bias = np.zeros(len(item_ids), dtype=np.float32) if config.biases else None
        u0 = None
        if config.learn_user_default:  # like a fresh u: U(-a, a), a = the clients' init_scale
            a = config.client.init_scale
            u0 = generator(config.seed, 0, 1, STREAM_MODEL_INIT).uniform(-a, a, config.dim).astype(np.float32)
        return cls(V, bias, global_mean if config.biases else 0.0, item_ids, config, u0)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to directory ``path`` (``model.npz`` + ``model.json``, no pickle).

        The directory is written next to its destination and renamed into place, so a crash
        never leaves a half-written model behind.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            arrays = {"item_factors": self.item_factors, "item_ids": self.item_ids}
            if self.item_bias is not None:
                arrays["item_bias"] = self.item_bias
            if self.user_default is not None:
                arrays["user_default"] = self.user_default
            np.savez(tmp / "model.npz", **arrays)
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "num_items": self.num_items,
                "dim": self.dim,
                "biases": self.item_bias is not None,
                "global_mean": self.global_mean,
                "user_bias_default": self.user_bias_default,
                "config": None if self.config is None else self.config.to_dict(),
            }
            (tmp / "model.json").write_text(json.dumps(meta, indent=2))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GlobalModel:
        """Read a model written by :meth:`save`; malformed files raise ``ValueError``."""
        path = Path(path)
        if not (path / "model.json").is_file() or not (path / "model.npz").is_file():
            raise FileNotFoundError(f"{path} is not a saved model (model.json and model.npz expected)")
        try:
            meta = json.loads((path / "model.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path / 'model.json'} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path / 'model.json'} is not a {FORMAT} v{FORMAT_VERSION} file")
        try:
            with np.load(path / "model.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path / 'model.npz'} is unreadable: {e}") from None
        missing = {"item_factors", "item_ids"} - set(arrays)
        if missing or bool(meta["biases"]) != ("item_bias" in arrays):
            raise ValueError(f"{path / 'model.npz'} lacks arrays {sorted(missing) or ['item_bias']}")
        config = None if meta.get("config") is None else FedReconConfig.from_dict(meta["config"])
        model = cls(arrays["item_factors"], arrays.get("item_bias"), meta["global_mean"],
                    arrays["item_ids"], config, arrays.get("user_default"),
                    meta.get("user_bias_default", 0.0))
        if model.num_items != meta["num_items"] or model.dim != meta["dim"]:
            raise ValueError(f"{path} is inconsistent: model.json and model.npz disagree on shape")
        return model
