"""Server optimizers for federated training (Reddi et al., 2021).

In FedOpt-style training ("Adaptive Federated Optimization", Reddi et al.,
ICLR 2021) the server receives the weighted mean client update ``delta``
(for Federated Reconstruction: the mean of ``V_final - V_initial`` over the
sampled clients) and treats ``g = -delta`` as a *pseudo-gradient* that is fed
to an ordinary first-order optimizer. With plain SGD and ``lr=1`` this is
exactly FedAvg (``p += delta``).

All optimizers follow the same small functional protocol:

* ``state = opt.init(params)`` allocates the optimizer state once: a flat
  ``dict`` of ``float32`` arrays keyed ``"<param name>/<slot>"`` plus
  ``"step"``, a 0-d ``int64`` array holding the number of applied updates.
  The state contains only plain arrays, so it can be saved with
  :func:`numpy.savez` and restored with ``np.load(..., allow_pickle=False)``.
* ``opt.apply(params, update, state)`` updates ``params`` and ``state``
  **in place** (the arrays are mutated, never replaced).
* ``opt.config()`` returns a JSON-serialisable dict; :func:`optimizer_from_config`
  rebuilds an equal optimizer from it.

Update rules (``g = -delta``, ``t`` = step number starting at 1) follow the
Keras / TensorFlow Federated conventions:

=========  ================================================================
sgd        ``p -= lr * g``
momentum   ``v = momentum * v - lr * g; p += v``
           (nesterov: ``p += momentum * v - lr * g``)
adam       ``m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g**2;``
           ``p -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)``
adagrad    ``a += g**2; p -= lr * g / (sqrt(a) + eps)``
yogi       ``m = b1 m + (1 - b1) g; v = v - (1 - b2) sign(v - g**2) g**2;``
           ``p -= lr * c_t * m / (sqrt(v) + eps)`` with
           ``c_t = sqrt(1 - b2**t) / (1 - b1**t)`` (``c_t = 1`` when
           ``bias_correction=False``)
=========  ================================================================

Notes on conventions
--------------------
*Adam epsilon.* Keras 2 (``tf.raw_ops.ResourceApplyAdam``), Keras 3
(``keras.optimizers.Adam.update_step``) and TFF (``build_adam``) all fold the
bias correction into the step size and add ``eps`` to ``sqrt(v)`` of the
*uncorrected* second moment ("epsilon hat" of Kingma & Ba, the formula just
before their Section 2.1). This equals ``m_hat / (sqrt(v_hat) + eps')`` with
``eps' = eps / sqrt(1 - b2**t)``; we reproduce the Keras form exactly so that
hyperparameters (default ``eps=1e-7``) transfer from Keras/TFF experiments.

*Adagrad epsilon.* We follow Keras 2 (``ResourceApplyAdagradV2``):
``g / (sqrt(a) + eps)``. (Keras 3 and TFF's ``build_adagrad`` use
``g / sqrt(a + eps)``; the difference is negligible for the default
``initial_accumulator=0.1``.)

*Yogi bias correction.* ``tfa.optimizers.Yogi`` (and the copy in
google-research/federated used for the Reddi et al. and FedRecon
experiments, and TFF's ``build_yogi``) always scales the learning rate by
``sqrt(1 - b2**t) / (1 - b1**t)``; it has no switch to disable it. Algorithm 2
of Reddi et al. (2021) writes FedYogi without bias correction. We default to
``bias_correction=True`` to match the implementations the published numbers
were produced with, and offer ``bias_correction=False`` for the paper's
textbook form. The second-moment rule
``v - (1 - b2) sign(v - g**2) g**2`` is the paper's and is algebraically
identical to TFA's ``v + (1 - b2) sign(g**2 - v) g**2``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, ClassVar, Dict, Mapping, Protocol, Tuple, runtime_checkable

import numpy as np

from ._validation import check_bool, check_float

__all__ = [
    "OPTIMIZER_NAMES",
    "SGD",
    "Adagrad",
    "Adam",
    "MomentumSGD",
    "ServerOptimizer",
    "Yogi",
    "make_optimizer",
    "optimizer_from_config",
]

_DTYPE = np.float32
_STEP_KEY = "step"

Params = Dict[str, np.ndarray]
State = Dict[str, np.ndarray]


@runtime_checkable
class ServerOptimizer(Protocol):
    """Protocol implemented by every server optimizer.

    Attributes
    ----------
    name : str
        Registry name of the optimizer (e.g. ``"adam"``).
    """

    name: str
    lr: float

    def init(self, params: Mapping[str, np.ndarray]) -> State:
        """Allocate the optimizer state for ``params``."""
        ...

    def count_step(self, state: Mapping[str, np.ndarray]) -> int:
        """Count one applied update in ``state`` (``state["step"] += 1``); returns the new step."""
        ...

    def apply(
        self,
        params: Mapping[str, np.ndarray],
        update: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        *,
        validate: bool = True,
    ) -> None:
        """Apply the client update ``update`` to ``params`` in place."""
        ...

    def config(self) -> Dict[str, Any]:
        """Return a JSON-serialisable description of the optimizer."""
        ...


# --------------------------------------------------------------------------
# Hyperparameter validation
# --------------------------------------------------------------------------


def _positive(arg: str, value: Any) -> float:
    return check_float(value, arg, minimum=0.0, strict=True)


def _non_negative(arg: str, value: Any) -> float:
    return check_float(value, arg, minimum=0.0)


def _unit_interval(arg: str, value: Any) -> float:
    out = check_float(value, arg, minimum=0.0)
    if out >= 1.0:
        raise ValueError(f"{arg} must be in [0, 1); got {value!r}")
    return out


def _boolean(arg: str, value: Any) -> bool:
    return check_bool(value, arg)


# --------------------------------------------------------------------------
# Array validation
# --------------------------------------------------------------------------


def _check_params(params: Mapping[str, np.ndarray]) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    for key, p in params.items():
        if not isinstance(key, str):
            raise TypeError(f"parameter names must be str, got {key!r}")
        if not isinstance(p, np.ndarray) or p.dtype != _DTYPE:
            dtype = getattr(p, "dtype", type(p).__name__)
            raise TypeError(f"parameter {key!r} must be a float32 numpy array, got {dtype}")
        if not p.flags.writeable:
            raise ValueError(f"parameter {key!r} is read-only; it must be updated in place")


def _check_update(params: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Validate ``update`` against ``params``; return it as float32 arrays."""
    if not isinstance(update, Mapping):
        raise TypeError(f"update must be a dict of arrays, got {type(update).__name__}")
    missing = [k for k in params if k not in update]
    extra = [k for k in update if k not in params]
    if missing or extra:
        raise ValueError(f"update keys must equal params keys; missing: {missing}, unexpected: {extra}")
    out = {}
    for key, p in params.items():
        u = np.asarray(update[key])
        if not np.issubdtype(u.dtype, np.floating):
            raise TypeError(f"update {key!r} must be a floating-point array, got {u.dtype}")
        if u.shape != p.shape:
            raise ValueError(f"update {key!r} has shape {u.shape}, expected {p.shape}")
        with np.errstate(over="ignore"):  # overflow -> inf, rejected just below
            u = u.astype(_DTYPE, copy=False)
        if not np.isfinite(u).all():
            raise ValueError(f"update {key!r} contains non-finite values (NaN or Inf)")
        out[key] = u
    return out


def _check_state(
    params: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
    slots: Tuple[str, ...],
) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of arrays, got {type(state).__name__}")
    expected = {_STEP_KEY} | {f"{k}/{s}" for k in params for s in slots}
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"state does not match params/optimizer; missing: {missing}, unexpected: {extra}")
    step = state[_STEP_KEY]
    if not isinstance(step, np.ndarray) or step.shape != () or step.dtype != np.int64 or not step.flags.writeable:
        raise ValueError(f"state {_STEP_KEY!r} must be a writeable 0-d int64 array")
    for key, p in params.items():
        for s in slots:
            name = f"{key}/{s}"
            a = state[name]
            if not isinstance(a, np.ndarray) or a.dtype != _DTYPE or a.shape != p.shape:
                raise ValueError(f"state {name!r} must be a float32 array of shape {p.shape}")
            if not a.flags.writeable:
                raise ValueError(f"state {name!r} is read-only")


# --------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _squares_fit(name: str):
    """Squared updates (second moments) that overflow float32 are an error, not a silent
    infinity that would freeze those parameters for good (and a RuntimeWarning)."""
    try:
        with np.errstate(over="raise"):
            yield
    except FloatingPointError:
        raise FloatingPointError(
            f"{name}: the squared update overflows float32 (an aggregated update "
            "beyond ~1.8e19); training diverged: lower the learning rates"
        ) from None


class _Base:
    """Shared init/apply/config plumbing; subclasses define the maths.

    Subclasses are frozen dataclasses whose fields are exactly the
    hyperparameters; they define ``name``, ``_slots`` (state slot names and
    initial values) and ``_step(p, d, slots, t)`` which updates one parameter
    array ``p`` in place given ``d = delta`` (float32, validated).
    """

    name: ClassVar[str]
    _slots: ClassVar[Tuple[Tuple[str, str], ...]] = ()  # (slot, init-value attribute or "0")

    def _slot_init(self, source: str) -> float:
        return 0.0 if source == "0" else float(getattr(self, source))

    def init(self, params: Mapping[str, np.ndarray]) -> State:
        """Allocate optimizer state for ``params``.

        Parameters
        ----------
        params : dict of str to numpy.ndarray
            Server parameters (float32 arrays). Only their names and shapes
            are used; they are not modified.

        Returns
        -------
        dict of str to numpy.ndarray
            Flat state: ``"step"`` (0-d int64, initially 0) and one float32
            array per parameter and slot, keyed ``"<param>/<slot>"``.

        Raises
        ------
        ValueError
            If a parameter is not a writeable float32 array or its name is
            not a string.
        """
        _check_params(params)
        state: State = {_STEP_KEY: np.zeros((), dtype=np.int64)}
        for key, p in params.items():
            for slot, source in self._slots:
                state[f"{key}/{slot}"] = np.full(p.shape, self._slot_init(source), dtype=_DTYPE)
        return state

    def apply(
        self,
        params: Mapping[str, np.ndarray],
        update: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        *,
        validate: bool = True,
    ) -> None:
        """Apply one server step in place.

        The pseudo-gradient is ``g = -update``. All inputs are validated
        before anything is modified, so a rejected call leaves ``params``
        and ``state`` untouched.

        Parameters
        ----------
        params : dict of str to numpy.ndarray
            Server parameters (float32), modified in place.
        update : dict of str to numpy.ndarray
            Mean client update ``delta`` with the same keys and shapes as
            ``params``. Any floating dtype is accepted and rounded to float32.
        state : dict of str to numpy.ndarray
            State returned by :meth:`init` (or loaded back from
            :func:`numpy.savez`), modified in place.
        validate : bool, default True
            Check keys, shapes, dtypes and finiteness first. A caller that built
            ``update`` itself as float32 arrays of the right shapes (the trainer)
            may skip it.

        Raises
        ------
        ValueError
            If the keys of ``update`` differ from those of ``params``, a
            shape differs, an update contains NaN/Inf (the message names the
            key), or ``state`` does not belong to ``params``/this optimizer.
        """
        slot_names = tuple(s for s, _ in self._slots)
        if validate:
            _check_params(params)
            deltas = _check_update(params, update)
            _check_state(params, state, slot_names)
        else:
            deltas = dict(update)
        t = self.count_step(state)
        for key, p in params.items():
            slots = {s: state[f"{key}/{s}"] for s in slot_names}
            self._step(p, deltas[key], slots, t)

    def count_step(self, state: Mapping[str, np.ndarray]) -> int:
        """Advance the step counter of ``state`` and return the new step number.

        :meth:`apply` does this; a caller that applied a plain SGD step itself (the native
        round with ``apply_lr``) calls it so that the state matches.
        """
        step = state[_STEP_KEY]
        np.add(step, 1, out=step)
        return int(step)

    def _step(self, p: np.ndarray, d: np.ndarray, slots: Dict[str, np.ndarray], t: int) -> None:
        raise NotImplementedError  # pragma: no cover

    def config(self) -> Dict[str, Any]:
        """Return ``{"name": ..., <hyperparameters>...}`` (JSON-serialisable)."""
        cfg: Dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            cfg[f.name] = getattr(self, f.name)
        return cfg

    def _set(self, **values: Any) -> None:
        for k, v in values.items():
            object.__setattr__(self, k, v)


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, init=False)
class SGD(_Base):
    """Plain server SGD: ``p -= lr * g`` with ``g = -delta``.

    With ``lr=1.0`` this is FedAvg: ``p += delta`` (bit-exact).

    Parameters
    ----------
    lr : float, default 1.0
        Server learning rate, > 0.
    """

    name: ClassVar[str] = "sgd"
    lr: float

    def __init__(self, *, lr: float = 1.0) -> None:
        self._set(lr=_positive("lr", lr))

    def _step(self, p, d, slots, t):
        if self.lr == 1.0:
            np.add(p, d, out=p)
        else:
            p += np.multiply(d, _DTYPE(self.lr))


@dataclasses.dataclass(frozen=True, init=False)
class MomentumSGD(_Base):
    """SGD with (optionally Nesterov) momentum, Keras convention.

    ``v = momentum * v - lr * g; p += v``; with ``nesterov=True``:
    ``p += momentum * v - lr * g`` (using the updated ``v``). State slot:
    ``"<param>/velocity"`` (zeros).

    Parameters
    ----------
    lr : float, default 1.0
        Server learning rate, > 0.
    momentum : float, default 0.9
        Momentum coefficient in [0, 1).
    nesterov : bool, default False
        Use Nesterov momentum.
    """

    name: ClassVar[str] = "momentum"
    _slots: ClassVar[Tuple[Tuple[str, str], ...]] = (("velocity", "0"),)
    lr: float
    momentum: float
    nesterov: bool

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False) -> None:
        self._set(
            lr=_positive("lr", lr),
            momentum=_unit_interval("momentum", momentum),
            nesterov=_boolean("nesterov", nesterov),
        )

    def _step(self, p, d, slots, t):
        v = slots["velocity"]
        lr_d = np.multiply(d, _DTYPE(self.lr))  # = -lr * g
        v *= _DTYPE(self.momentum)
        v += lr_d
        if self.nesterov:
            p += lr_d
            p += np.multiply(v, _DTYPE(self.momentum), out=lr_d)
        else:
            p += v


class _Moments(_Base):
    """Shared by Adam and Yogi: ``m = b1 m + (1 - b1) g``, a second-moment rule for ``v``, and
    ``p -= step_size(t) * m / (sqrt(v) + eps)``."""

    lr: float
    beta1: float
    beta2: float

    def _second_moment(self, v, g2) -> None:
        raise NotImplementedError

    def _step_size(self, t) -> float:
        return self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)

    def _step(self, p, d, slots, t):
        m, v = slots["m"], slots["v"]
        tmp = np.multiply(d, _DTYPE(1.0 - self.beta1))
        m *= _DTYPE(self.beta1)
        m -= tmp  # m = b1 m + (1 - b1) g, g = -d
        with _squares_fit(self.name):
            self._second_moment(v, np.square(d, out=tmp))
        np.sqrt(v, out=tmp)
        tmp += _DTYPE(self.eps)
        np.divide(m, tmp, out=tmp)
        tmp *= _DTYPE(self._step_size(t))
        p -= tmp


@dataclasses.dataclass(frozen=True, init=False)
class Adam(_Moments):
    """Adam with Keras-style bias correction ("epsilon hat").

    ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g**2``;
    ``p -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)``.
    State slots ``"<param>/m"`` and ``"<param>/v"`` (zeros).

    Parameters
    ----------
    lr : float, default 0.01
        Server learning rate, > 0.
    beta1, beta2 : float, default 0.9, 0.999
        Moment decay rates in [0, 1).
    eps : float, default 1e-7
        Keras default; added to ``sqrt(v)`` of the uncorrected second moment.
    """

    name: ClassVar[str] = "adam"
    _slots: ClassVar[Tuple[Tuple[str, str], ...]] = (("m", "0"), ("v", "0"))
    lr: float
    beta1: float
    beta2: float
    eps: float

    def __init__(self, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-7) -> None:
        self._set(
            lr=_positive("lr", lr),
            beta1=_unit_interval("beta1", beta1),
            beta2=_unit_interval("beta2", beta2),
            eps=_positive("eps", eps),
        )

    def _second_moment(self, v, g2) -> None:
        g2 *= _DTYPE(1.0 - self.beta2)
        v *= _DTYPE(self.beta2)
        v += g2  # v = b2 v + (1 - b2) g^2


@dataclasses.dataclass(frozen=True, init=False)
class Adagrad(_Base):
    """Adagrad, Keras 2 convention: ``a += g**2; p -= lr * g / (sqrt(a) + eps)``.

    State slot ``"<param>/accumulator"`` initialised to
    ``initial_accumulator``.

    Parameters
    ----------
    lr : float, default 0.1
        Server learning rate, > 0.
    initial_accumulator : float, default 0.1
        Initial value of the accumulator, >= 0.
    eps : float, default 1e-7
        Added to ``sqrt(a)``, > 0.
    """

    name: ClassVar[str] = "adagrad"
    _slots: ClassVar[Tuple[Tuple[str, str], ...]] = (("accumulator", "initial_accumulator"),)
    lr: float
    initial_accumulator: float
    eps: float

    def __init__(self, *, lr: float = 0.1, initial_accumulator: float = 0.1, eps: float = 1e-7) -> None:
        self._set(
            lr=_positive("lr", lr),
            initial_accumulator=_non_negative("initial_accumulator", initial_accumulator),
            eps=_positive("eps", eps),
        )

    def _step(self, p, d, slots, t):
        a = slots["accumulator"]
        with _squares_fit(self.name):
            tmp = np.square(d)
            a += tmp
        np.sqrt(a, out=tmp)
        tmp += _DTYPE(self.eps)
        np.divide(d, tmp, out=tmp)
        tmp *= _DTYPE(self.lr)
        p += tmp  # p -= lr * g / (sqrt(a) + eps), g = -d


@dataclasses.dataclass(frozen=True, init=False)
class Yogi(_Moments):
    """Yogi (Zaheer et al., 2018; FedYogi in Reddi et al., 2021).

    ``m = b1 m + (1 - b1) g``; ``v = v - (1 - b2) sign(v - g**2) g**2``;
    ``p -= lr * c_t * m / (sqrt(v) + eps)`` where
    ``c_t = sqrt(1 - b2**t) / (1 - b1**t)`` if ``bias_correction`` else 1.
    State slots ``"<param>/m"`` (zeros) and ``"<param>/v"``
    (``initial_accumulator``).

    Parameters
    ----------
    lr : float, default 0.01
        Server learning rate, > 0.
    beta1, beta2 : float, default 0.9, 0.999
        Moment decay rates in [0, 1).
    eps : float, default 1e-3
        Adaptivity ``tau`` of Reddi et al., > 0.
    initial_accumulator : float, default 1e-6
        Initial second moment ``v`` (TF Addons default), >= 0.
    bias_correction : bool, default True
        Scale the step by ``sqrt(1 - b2**t) / (1 - b1**t)`` as
        ``tfa.optimizers.Yogi`` and TFF ``build_yogi`` always do; ``False``
        gives Algorithm 2 of Reddi et al. (2021) verbatim.
    """

    name: ClassVar[str] = "yogi"
    _slots: ClassVar[Tuple[Tuple[str, str], ...]] = (("m", "0"), ("v", "initial_accumulator"))
    lr: float
    beta1: float
    beta2: float
    eps: float
    initial_accumulator: float
    bias_correction: bool

    def __init__(
        self,
        *,
        lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-3,
        initial_accumulator: float = 1e-6,
        bias_correction: bool = True,
    ) -> None:
        self._set(
            lr=_positive("lr", lr),
            beta1=_unit_interval("beta1", beta1),
            beta2=_unit_interval("beta2", beta2),
            eps=_positive("eps", eps),
            initial_accumulator=_non_negative("initial_accumulator", initial_accumulator),
            bias_correction=_boolean("bias_correction", bias_correction),
        )

    def _second_moment(self, v, g2) -> None:
        change = np.subtract(v, g2)
        np.sign(change, out=change)
        change *= g2
        change *= _DTYPE(1.0 - self.beta2)
        v -= change  # v = v - (1 - b2) sign(v - g^2) g^2

    def _step_size(self, t) -> float:
        return super()._step_size(t) if self.bias_correction else self.lr


# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------

_REGISTRY: Dict[str, type] = {cls.name: cls for cls in (SGD, MomentumSGD, Adam, Adagrad, Yogi)}
OPTIMIZER_NAMES: Tuple[str, ...] = tuple(sorted(_REGISTRY))


def make_optimizer(name: str, **kwargs: Any) -> ServerOptimizer:
    """Build a server optimizer by name.

    Parameters
    ----------
    name : str
        One of ``"adagrad"``, ``"adam"``, ``"momentum"``, ``"sgd"``, ``"yogi"``.
    **kwargs
        Hyperparameters of that optimizer (see its class); omitted ones take
        their defaults.

    Returns
    -------
    ServerOptimizer

    Raises
    ------
    ValueError
        If ``name`` is unknown (the message lists the valid names), a keyword
        is not a hyperparameter of that optimizer, or a hyperparameter value
        is invalid (the message names the argument).
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; valid names are: {', '.join(OPTIMIZER_NAMES)}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for optimizer {name!r}; valid: {', '.join(allowed)}")
    return cls(**kwargs)


def optimizer_from_config(cfg: Mapping[str, Any]) -> ServerOptimizer:
    """Rebuild an optimizer from :meth:`ServerOptimizer.config` output.

    Parameters
    ----------
    cfg : dict
        ``{"name": ..., <hyperparameters>...}``; not modified.

    Returns
    -------
    ServerOptimizer

    Raises
    ------
    ValueError
        If ``cfg`` has no ``"name"`` or :func:`make_optimizer` rejects it.
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"optimizer config must be a dict with a 'name' entry; got {type(cfg).__name__}")
    if "name" not in cfg:
        raise ValueError("optimizer config must be a dict with a 'name' entry")
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    return make_optimizer(cfg["name"], **kwargs)
