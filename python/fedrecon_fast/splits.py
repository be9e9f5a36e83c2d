"""One call from a ratings table to the train/validation/test clients of FedRecon.

:func:`split_ratings` reads ratings in any accepted form (:func:`fedrecon_fast.load_ratings`),
prepares them as a configuration says (the paper's per-user cap, the minimum per user, the
seeded per-user shuffle) and splits the users 80/10/10 with the configuration's seed, as
``fedrecon-fast train`` does. :meth:`fedrecon_fast.FedRecon.fit` takes the result directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import FedReconConfig, preset
from .data import ClientData

__all__ = ["ClientSplits", "split_ratings"]


@dataclass(frozen=True)
class ClientSplits:
    """Train, validation and test clients of one data set, and how they were made.

    Unpacks as ``train, val, test = splits``; :meth:`fedrecon_fast.FedRecon.fit` accepts it
    in place of ``train`` (and then uses ``val`` for validation).

    Attributes
    ----------
    train, val, test : ClientData
        Disjoint users, one shared item indexing.
    max_examples, min_examples : int or None, int
        The per-user cap (most recent ratings kept) and minimum applied before the split.
    shuffle_seed : int
        Seed of the per-user shuffle of the ratings.
    fractions : tuple of float
        Train/validation/test fractions of users.
    seed : int
        Seed of the user split.
    """

    train: ClientData
    val: ClientData
    test: ClientData
    max_examples: int | None
    min_examples: int
    shuffle_seed: int
    fractions: tuple
    seed: int

    def __iter__(self):
        return iter((self.train, self.val, self.test))

    def __repr__(self) -> str:
        return (
            f"ClientSplits(train={self.train.num_clients} users, val={self.val.num_clients}, "
            f"test={self.test.num_clients}, items={self.train.num_items}, "
            f"ratings={self.train.nnz}/{self.val.nnz}/{self.test.nnz})"
        )


def split_ratings(ratings, config: FedReconConfig | None = None, **read_options) -> ClientSplits:
    """Ratings in any form to train/validation/test clients, the project's way.

    Parameters
    ----------
    ratings : path, pandas.DataFrame, scipy.sparse matrix, ClientData, dict or tuple of arrays
        Anything :func:`fedrecon_fast.load_ratings` reads.
    config : FedReconConfig, optional
        Its data recipe (``config.data``: ``max_examples``, ``min_examples``, ``user_split``)
        and ``seed`` decide the preparation and the split (default: ``preset("default")``).
    **read_options
        Passed to :func:`fedrecon_fast.load_ratings` (``columns``, ``sep``).

    Returns
    -------
    ClientSplits

    Raises
    ------
    ValueError
        If no user is left for training, or as :func:`fedrecon_fast.load_ratings`.

    Examples
    --------
    >>> import fedrecon_fast as ff
    >>> splits = ff.split_ratings(ff.synthetic_ratings(num_users=300, num_items=200, seed=0))
    >>> splits
    ClientSplits(train=240 users, val=30, test=30, items=200, ratings=...)
    >>> trainer = ff.FedRecon(ff.preset("default", rounds=5)).fit(splits)
    """
    config = preset("default") if config is None else config
    if not isinstance(config, FedReconConfig):
        raise TypeError(f"config must be a FedReconConfig; got {type(config).__name__}")
    if isinstance(ratings, ClientData) and not read_options:
        data = ratings
    else:
        from .loaders import load_ratings

        data = load_ratings(ratings, **read_options)
    recipe = config.data
    data = recipe.prepare(data, config.seed)
    train, val, test = recipe.split(data, config.seed)
    if train.num_clients == 0:
        raise ValueError(
            f"{data.num_clients} users with at least {recipe.min_examples} rating(s) leave no "
            f"training users after the {recipe.user_split} user split"
        )
    return ClientSplits(
        train, val, test, recipe.max_examples, recipe.min_examples, config.seed, recipe.user_split, config.seed
    )


def unpack(train, val):
    """``fit``'s ``(train, val)``: a ClientSplits in place of ``train`` brings its own ``val``."""
    if not isinstance(train, ClientSplits):
        return train, val
    if val is not None:
        raise TypeError("val must be None when train is a ClientSplits (it brings its own validation users)")
    return train.train, train.val
