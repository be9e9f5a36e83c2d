"""The global FedRecon model (item factors, optional biases), its pickle-free storage, and
inference for new users (reconstruct, predict, recommend; see :mod:`fedrecon_fast.inference`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _bundle, _folders, inference
from ._rng import STREAM_MODEL_INIT, generator
from ._validation import FLOAT32_MAX, as_float32_matrix, as_float32_vector, check_float
from .config import ClientConfig, FedReconConfig

FORMAT = "fedrecon_fast.model"
_INT32_MAX = 2**31 - 1  # rows of V are int32 in the kernels


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
        if np.unique(self.item_ids).size != n:  # an id must name one row
            raise ValueError("item_ids must be unique")
        if self.user_default is not None:
            self.user_default = as_float32_vector(self.user_default, "user_default", size=self.dim, check_finite=True)
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
        if (
            self.item_labels is not None
            and n
            and (self.item_ids.min() < 0 or self.item_ids.max() >= self.item_labels.size)
        ):
            raise ValueError("item_labels must have a label for every item id (item_ids index it)")

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

    def reconstruct(
        self,
        data,
        ratings=None,
        *,
        ignore_unknown: bool = False,
        config: ClientConfig | None = None,
        seed: int | None = None,
        num_threads: int = 0,
    ):
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
        return inference.reconstruct(
            self, data, ratings, ignore_unknown=ignore_unknown, config=config, seed=seed, num_threads=num_threads
        )

    def predict(self, users, items, user_bias=None, *, ignore_unknown: bool = False) -> np.ndarray:
        """Predicted ratings of reconstructed users for original item ids (vectorised).

        ``users`` (dim,) or (m, dim) and ``user_bias`` (required exactly when the model has
        biases) come from :meth:`reconstruct`; ``items`` is (n,) for the same items for every
        user or (m, n) per user. Returns float32 of shape (n,) for one user, else (m, n);
        unknown ids raise ``ValueError`` or, with ``ignore_unknown``, predict NaN.
        """
        return inference.predict(self, users, items, user_bias, ignore_unknown=ignore_unknown)

    def recommend(
        self,
        data,
        ratings=None,
        *,
        k: int = 10,
        exclude_seen: bool = True,
        ignore_unknown: bool = False,
        config: ClientConfig | None = None,
        seed: int | None = None,
        num_threads: int = 0,
    ):
        """Top-k items for new users: ``(items, scores)`` with original item ids.

        ``data``/``ratings`` as for :meth:`reconstruct`. Items are ranked by predicted rating,
        best first, ties to the lower model row; with ``exclude_seen`` a user's rated items are
        skipped. Returns int64 ``items`` and float32 ``scores`` of shape (m, k) ((k,) for one
        user), ``k`` capped at ``num_items``; slots beyond a user's candidates hold item -1 and
        score NaN. One native call, parallel over users.
        """
        return inference.recommend(
            self,
            data,
            ratings,
            k=k,
            exclude_seen=exclude_seen,
            ignore_unknown=ignore_unknown,
            config=config,
            seed=seed,
            num_threads=num_threads,
        )

    @classmethod
    def initialize(cls, item_ids, config: FedReconConfig, global_mean: float = 0.0, *, item_labels=None) -> GlobalModel:
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
        """Write the model to folder ``path``, replacing it atomically (no pickle).

        The folder holds one ``.npy`` file per array and a ``manifest`` with every file's
        SHA-256 and its own (:mod:`fedrecon_fast._bundle`). It is written beside ``path`` and
        swapped in (:mod:`fedrecon_fast._folders`): at every instant ``path`` holds the old or
        the new model, each complete, even if the process is killed. A model that would not
        load back (non-finite values, a configuration that disagrees with the arrays) is
        refused with ``ValueError`` before anything is written; OS errors name ``path``.
        """
        meta, arrays = self.to_parts()
        self.from_parts(_bundle.Schema(f"model to save as {path}", meta, arrays))
        return _folders.replace_folder(path, lambda folder: _bundle.write(folder, FORMAT, meta, arrays))

    def to_parts(self) -> tuple[dict, dict]:
        """The format's ``meta`` and arrays of this model (shared with checkpoints)."""
        arrays = {"item_factors": self.item_factors, "item_ids": self.item_ids}
        if self.item_bias is not None:
            arrays["item_bias"] = self.item_bias
        if self.user_default is not None:
            arrays["user_default"] = self.user_default
        meta = {
            "num_items": self.num_items,
            "dim": self.dim,
            "biases": self.item_bias is not None,
            "global_mean": self.global_mean,
            "user_bias_default": self.user_bias_default,
            "config": None if self.config is None else self.config.to_dict(),
        }
        for name in ("item_labels", "item_titles"):
            if getattr(self, name) is not None:
                arrays[f"{name}_chars"], arrays[f"{name}_offsets"] = _strings_to_arrays(getattr(self, name))
        return meta, arrays

    @classmethod
    def from_parts(cls, schema: _bundle.Schema) -> GlobalModel:
        """The model of verified ``meta`` and arrays, checked against the strict schema."""
        schema.keys({"num_items", "dim", "biases", "global_mean", "user_bias_default", "config"})
        n = schema.integer("num_items", 0, _INT32_MAX)
        dim = schema.integer("dim", 1, _INT32_MAX)
        biases = schema.boolean("biases")
        global_mean = schema.number("global_mean", -FLOAT32_MAX, FLOAT32_MAX)
        user_bias_default = schema.number("user_bias_default", -FLOAT32_MAX, FLOAT32_MAX)
        config = schema.of_type("config", dict, allow_none=True)
        V = schema.array("item_factors", "<f4", (n, dim), finite=True)
        ids = schema.array("item_ids", "<i8", (n,))
        if np.unique(ids).size != n:
            schema.fail("array 'item_ids' has duplicate ids")
        bias = schema.array("item_bias", "<f4", (n,), finite=True, optional=not biases)
        if bias is not None and not biases:
            schema.fail("array 'item_bias' is present but 'biases' is false")
        u0 = schema.array("user_default", "<f4", (dim,), finite=True, optional=True)
        strings = {name: _strings_of(schema, name) for name in ("item_labels", "item_titles")}
        schema.no_other_arrays(
            ("item_factors", "item_ids", "item_bias", "user_default")
            + tuple(f"{name}_{part}" for name in strings for part in ("chars", "offsets"))
        )
        if config is not None:
            try:
                config = FedReconConfig.from_dict(config)
            except Exception as e:  # any malformed field: a TypeError, KeyError, ValueError, ...
                schema.fail(f"'config' is invalid: {type(e).__name__}: {e}")
            if (config.dim, config.biases, config.learn_user_default) != (dim, biases, u0 is not None):
                schema.fail(
                    f"'config' (dim {config.dim}, biases {config.biases}, learn_user_default "
                    f"{config.learn_user_default}) disagrees with the arrays (dim {dim}, biases "
                    f"{biases}, user_default {'present' if u0 is not None else 'absent'})"
                )
        try:
            return cls(V, bias, global_mean, ids, config, u0, user_bias_default, **strings)
        except (TypeError, ValueError) as e:
            schema.fail(str(e))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GlobalModel:
        """Read a model written by :meth:`save`, verifying every byte.

        Anything wrong with the files (corrupted, edited, truncated, not regular files, a
        schema violation) raises ``ValueError`` naming the file; a folder that holds no model
        raises ``FileNotFoundError``. An interrupted :meth:`save` is finished first. Models
        saved by fedrecon_fast 0.1 (``model.json`` + ``model.npz``, which carry no checksums)
        still load, checked against the same schema; save them again to protect them.
        """
        path = Path(path)
        _folders.recover(path)
        if _bundle.is_bundle(path):
            meta, arrays = _bundle.read(path, FORMAT)
            return cls.from_parts(_bundle.Schema(path / _bundle.MANIFEST, meta, arrays))
        if os.path.lexists(path / "model.json"):
            return cls._load_version_1(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        raise FileNotFoundError(f"{path} is not a saved model (no {_bundle.MANIFEST} file)")

    @classmethod
    def _load_version_1(cls, path: Path) -> GlobalModel:
        """A model saved by fedrecon_fast 0.1: strict schema, bounded reads, no checksums."""
        meta, arrays = _bundle.read_version_1(path, "model.json", "model.npz")
        schema = _bundle.Schema(path / "model.json", meta, arrays)
        if meta.get("format") != FORMAT or meta.get("version") != 1:
            schema.fail(f"not a {FORMAT} file of version 1")
        meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
        return cls.from_parts(_bundle.Schema(path / "model.json", meta, arrays))


def _strings_to_arrays(strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strings as the format stores them: their code points (int32) one after another, and
    where each string starts (int64, n + 1 offsets)."""
    strings = np.ascontiguousarray(strings, dtype=str)
    lengths = np.char.str_len(strings).astype(np.int64)
    width = max(strings.dtype.itemsize // 4, 1)
    grid = np.ascontiguousarray(strings.astype(f"<U{width}")).view("<i4").reshape(strings.size, width)
    chars = grid[np.arange(width) < lengths[:, None]].astype("<i4")
    return chars, np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")


def _strings_of(schema, name: str) -> np.ndarray | None:
    """The strings ``name`` stored by :func:`_strings_to_arrays`, validated, or None."""
    chars = schema.array(f"{name}_chars", "<i4", (None,), optional=True)
    offsets = schema.array(f"{name}_offsets", "<i8", (None,), optional=chars is None)
    if chars is None:
        if offsets is not None:
            schema.fail(f"array '{name}_offsets' is present without '{name}_chars'")
        return None
    lengths = np.diff(offsets)
    if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != chars.size or (lengths < 0).any():
        schema.fail(f"array '{name}_offsets' must rise from 0 to the number of characters")
    if chars.size and (chars.min() < 1 or chars.max() > 0x10FFFF):
        schema.fail(f"array '{name}_chars' holds values that are not characters")
    width = max(int(lengths.max()) if lengths.size else 1, 1)
    grid = np.zeros((lengths.size, width), dtype="<i4")
    inside = np.arange(width) < lengths[:, None]
    grid[inside] = chars[(offsets[:-1, None] + np.arange(width))[inside]]
    return grid.view(f"<U{width}").reshape(lengths.size)
