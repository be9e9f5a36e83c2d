"""The global FedRecon model (item factors, optional biases), its pickle-free storage, and
inference for new users (reconstruct, predict, recommend; see :mod:`fedrecon_fast.inference`)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import inference
from ._files import make_temp_dir
from ._rng import STREAM_MODEL_INIT, generator
from ._validation import FLOAT32_MAX, as_float32_matrix, as_float32_vector, check_float
from .config import ClientConfig, FedReconConfig

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
    item_labels : ndarray of str, or None
        For data with string item ids: ``item_labels[j]`` is the original id of item id ``j``
        (``item_ids`` are then codes; see :class:`~fedrecon_fast.ClientData`).
    item_titles : ndarray of str, shape (num_items,), or None
        A display name per row ("" when unknown), e.g. MovieLens movie titles.
    """

    item_factors: np.ndarray
    item_bias: np.ndarray | None
    global_mean: float
    item_ids: np.ndarray
    config: FedReconConfig | None = None
    user_default: np.ndarray | None = None
    user_bias_default: float = 0.0
    item_labels: np.ndarray | None = None
    item_titles: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.item_factors = as_float32_matrix(self.item_factors, "item_factors")
        if self.item_factors.shape[1] < 1:
            raise ValueError("item_factors must have at least one column (dim >= 1)")
        n = self.item_factors.shape[0]
        if self.item_bias is not None:
            self.item_bias = as_float32_vector(self.item_bias, "item_bias", size=n)
        check_float(self.global_mean, "global_mean", minimum=-FLOAT32_MAX, maximum=FLOAT32_MAX)
        self.global_mean = float(self.global_mean)
        ids = np.asarray(self.item_ids)
        if ids.shape != (n,) or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"item_ids must be {n} integer ids, one per row of item_factors")
        self.item_ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.user_default is not None:
            self.user_default = as_float32_vector(self.user_default, "user_default", size=self.dim,
                                                  check_finite=True)
        check_float(self.user_bias_default, "user_bias_default", minimum=-FLOAT32_MAX, maximum=FLOAT32_MAX)
        self.user_bias_default = float(self.user_bias_default)
        for name in ("item_labels", "item_titles"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value)
                if value.ndim != 1 or (value.size and value.dtype.kind != "U"):
                    raise ValueError(f"{name} must be a 1-D array of strings")
                setattr(self, name, value.astype(str))
        if self.item_titles is not None and self.item_titles.shape != (n,):
            raise ValueError(f"item_titles must have one title per row of item_factors ({n})")
        if self.item_labels is not None and n and (self.item_ids.min() < 0 or self.item_ids.max() >= self.item_labels.size):
            raise ValueError("item_labels must have a label for every item id (item_ids index it)")

    def item_names(self, rows) -> list:
        """Display names of model rows: the title if known, else the original id (a label or
        the integer id)."""
        rows = np.asarray(rows, dtype=np.int64)
        ids = self.item_ids[rows]
        names = self.item_labels[ids] if self.item_labels is not None else ids.astype(str)
        if self.item_titles is not None:
            titles = self.item_titles[rows]
            names = np.where(titles != "", titles, names)
        return names.tolist()

    def set_titles(self, ids, titles) -> int:
        """Attach display titles by original item id (e.g. from
        :func:`fedrecon_fast.movielens.load_titles`); returns how many rows got one."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        titles = np.asarray(titles, dtype=str).reshape(-1)
        if ids.size != titles.size:
            raise ValueError(f"ids and titles must have the same length; got {ids.size} and {titles.size}")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        pos = np.searchsorted(sorted_ids, self.item_ids)
        found = pos < ids.size
        found[found] = sorted_ids[pos[found]] == self.item_ids[found]
        names = np.full(self.num_items, "", dtype=titles.dtype if titles.size else "U1")
        names[found] = titles[order][pos[found]]
        self.item_titles = names
        return int(np.count_nonzero(found))

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

    # ---------------------------------------------------------------- inference for new users

    def reconstruct(self, data, ratings=None, *, ignore_unknown: bool = False,
                    config: ClientConfig | None = None, seed: int | None = None,
                    num_threads: int = 0):
        """Embeddings of new users, reconstructed from all of their ratings (V frozen).

        Parameters
        ----------
        data : ClientData, pandas.DataFrame, scipy.sparse matrix, dict, or array_like of int
            The users' ratings with original item ids: many users (a ClientData; a DataFrame
            with ``user_id``/``item_id``/``rating`` columns, users in increasing id order; a
            users x items sparse matrix whose column j is item id j), or one user (a dict
            ``{item: rating}``, or the item ids with ``ratings`` as the second argument).
        ratings : array_like of float, optional
            The ratings of the single-user form ``reconstruct(items, ratings)``.
        ignore_unknown : bool
            Drop ratings of item ids the model does not know instead of raising ``ValueError``.
        config : ClientConfig, optional
            Reconstruction schedule (default: the model's evaluation config; the split is
            ignored, every rating is used).
        seed : int, optional
            Seed of the reconstruction's random streams (default: the model's training seed).
            A user's result depends only on its ratings, never on the other users in the call.
        num_threads : int
            0: all cores.

        Returns
        -------
        users : ndarray, float32, shape (m, dim) (one user: (dim,))
        user_bias : ndarray, float32, shape (m,) (one user: a scalar), or None without biases
        """
        return inference.reconstruct(self, data, ratings, ignore_unknown=ignore_unknown,
                                     config=config, seed=seed, num_threads=num_threads)

    def predict(self, users, items, user_bias=None, *, ignore_unknown: bool = False) -> np.ndarray:
        """Predicted ratings of reconstructed users for original item ids (vectorised).

        ``users`` (dim,) or (m, dim) and ``user_bias`` (required exactly when the model has
        biases) come from :meth:`reconstruct`; ``items`` is (n,) for the same items for every
        user or (m, n) per user. Returns float32 of shape (n,) for one user, else (m, n);
        unknown ids raise ``ValueError`` or, with ``ignore_unknown``, predict NaN.
        """
        return inference.predict(self, users, items, user_bias, ignore_unknown=ignore_unknown)

    def recommend(self, data, ratings=None, *, k: int = 10, exclude_seen: bool = True,
                  ignore_unknown: bool = False, config: ClientConfig | None = None,
                  seed: int | None = None, num_threads: int = 0):
        """Top-k items for new users: ``(items, scores)`` with original item ids.

        ``data``/``ratings`` as for :meth:`reconstruct`. Items are ranked by predicted rating,
        best first, ties to the lower model row; with ``exclude_seen`` a user's rated items are
        skipped. Returns int64 ``items`` and float32 ``scores`` of shape (m, k) ((k,) for one
        user); slots beyond a user's candidates hold item -1 and score NaN. One native call,
        parallel over users.
        """
        return inference.recommend(self, data, ratings, k=k, exclude_seen=exclude_seen,
                                   ignore_unknown=ignore_unknown, config=config, seed=seed,
                                   num_threads=num_threads)

    @classmethod
    def initialize(cls, item_ids, config: FedReconConfig, global_mean: float = 0.0, *,
                   item_labels=None) -> GlobalModel:
        """V ~ U(-a, a) (Keras 'uniform', a = config.item_init_scale), biases 0; ``item_labels``
        as the data's (string item ids)."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        rng = generator(config.seed, 0, 0, STREAM_MODEL_INIT)
        a = config.item_init_scale
        V = rng.uniform(-a, a, size=(len(item_ids), config.dim)).astype(np.float32)
        bias = np.zeros(len(item_ids), dtype=np.float32) if config.biases else None
        u0 = None
        if config.learn_user_default:  # like a fresh u: U(-a, a), a = the clients' init_scale
            a = config.client.init_scale
            u0 = generator(config.seed, 0, 1, STREAM_MODEL_INIT).uniform(-a, a, config.dim).astype(np.float32)
        return cls(V, bias, global_mean if config.biases else 0.0, item_ids, config, u0, item_labels=item_labels)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to directory ``path`` (``model.npz`` + ``model.json``, no pickle).

        The directory is written next to its destination and renamed into place, so a crash
        never leaves a half-written model behind.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(path.parent, prefix=f".{path.name}.")
        try:
            arrays = {"item_factors": self.item_factors, "item_ids": self.item_ids}
            if self.item_bias is not None:
                arrays["item_bias"] = self.item_bias
            if self.user_default is not None:
                arrays["user_default"] = self.user_default
            for name in ("item_labels", "item_titles"):
                if getattr(self, name) is not None:
                    arrays[name] = getattr(self, name)
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
                    meta.get("user_bias_default", 0.0), arrays.get("item_labels"), arrays.get("item_titles"))
        if model.num_items != meta["num_items"] or model.dim != meta["dim"]:
            raise ValueError(f"{path} is inconsistent: model.json and model.npz disagree on shape")
        return model
