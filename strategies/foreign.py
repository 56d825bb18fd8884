"""Any Flower strategy by import path, with fedwa's guarantees around a class nobody here wrote.

``strategy = "flwr.serverapp.strategy:FedMedian"`` (or any ``module:Class`` whose class is a
:class:`flwr.serverapp.strategy.Strategy` without fedwa's ``from_config``) is built by
:func:`build_foreign`:

- **fedwa's mixin in front.** The class is subclassed as ``(..., FedwaStrategy, ..., Class)``, the
  way :mod:`strategies.flower` wraps Flower's optimisers: the reply guard, seeded sampling,
  dtype-preserving aggregates and the evaluation hook come with it, and ``Class`` keeps its
  math (its ``aggregate_train`` is what aggregates the screened replies).
- **Constructor arguments.** fedwa fills the arguments it knows by name (:func:`known_arguments`:
  the sampling fractions and minimums, the client learning rate as ``client_learning_rate`` or
  ``eta_l``, the number of sampled clients, the key of the training loss fedwa's clients
  report); the others come from ``strategy-args``, a TOML inline table written as a string::

      strategy = "flwr.serverapp.strategy:QFedAvg"
      strategy-args = "{q = 0.2}"

  A wrapper that takes an inner strategy (Flower's differential-privacy wrappers) names it in
  ``strategy-args`` as ``strategy`` (a fedwa name or an import path; default ``fedavg``), with
  the inner's own arguments as a nested ``strategy-args`` table::

      strategy = "flwr.serverapp.strategy:DifferentialPrivacyServerSideFixedClipping"
      strategy-args = "{noise_multiplier = 0.1, clipping_norm = 5.0, strategy = 'flwr.serverapp.strategy:FedMedian'}"

  Unknown or missing arguments, and a constructor that raises, are a
  :class:`~fedwa.common.errors.ConfigError` naming the class and the argument, before any
  engine starts.
- **Checkpoints from attributes.** Flower's strategies have no ``state_dict``; their state is
  in plain attributes (FedAdam's moments, FedAvgM's momentum, the current arrays).
  :func:`attribute_state` saves every attribute the class set (not fedwa's) when it is data:
  numbers, strings, numpy arrays, tensors, Flower records, lists and dicts of those, and inner
  strategies, recursively. Callables (metric aggregation functions) are configuration and are
  rebuilt by the constructor. Anything else raises :class:`UnsavableStateError`, and the
  checkpointer then says once that the run cannot be resumed and stops checkpointing instead
  of crashing.
"""

from __future__ import annotations

import inspect
import random
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedwa.common.errors import ConfigError, FedwaError, UnsavableStateError
from strategies.base import FedwaStrategy


# --- strategy-args -----------------------------------------------------------------------------


def parse_strategy_args(text: str, key: str = "strategy-args") -> dict[str, Any]:
    """The table ``text`` holds (``""`` = none), or :class:`ConfigError` naming ``key``."""
    if not text.strip():
        return {}
    try:
        table = tomllib.loads(f"args = {text}")["args"]
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(key, text, f"a TOML inline table such as {{q = 0.2}} ({err})") from None
    if not isinstance(table, dict):
        raise ConfigError(key, text, "a TOML inline table such as {q = 0.2}")
    return table


def takes_inner_strategy(cls: type) -> bool:
    """Whether ``cls`` wraps another strategy (a constructor argument named ``strategy``)."""
    return "strategy" in constructor_parameters(cls)


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword-passable parameters of ``cls.__init__`` (``self`` and ``*args`` left out)."""
    params = inspect.signature(cls.__init__).parameters
    return {name: p for name, p in params.items() if name != "self"
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def sampled_clients(config: Mapping[str, Any]) -> int:
    """Clients a round samples, as Flower's FedAvg counts them: ``int(N * fraction)``, >= 1."""
    return max(int(int(config["num-clients"]) * float(config["fraction-train"])), 1)


def known_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments fedwa can fill from the run config, by Flower's names."""
    fraction_evaluate = float(config["fraction-evaluate"])
    return {
        "fraction_train": float(config["fraction-train"]),
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if fraction_evaluate > 0 else 0,
        # Wait until every client is connected: in simulation they all are at once.
        "min_available_nodes": int(config["num-clients"]),
        # QFedAvg's lr; FedAdam/FedYogi/FedAdagrad's client lr (used in their updates).
        "client_learning_rate": float(config["lr"]),
        "eta_l": float(config["lr"]),
        # fedwa's clients report their mean local loss as "train-loss" (QFedAvg reads it).
        "train_loss_key": "train-loss",
        # The differential-privacy wrappers check the replies they get against this.
        "num_sampled_clients": sampled_clients(config),
    }


def constructor_kwargs(cls: type, config: Mapping[str, Any], args: Mapping[str, Any]
                       ) -> dict[str, Any]:
    """The arguments ``cls`` is built with: fedwa's known ones it accepts, then ``args``.

    Raises :class:`ConfigError` for an argument ``cls`` does not take, or one it needs that
    neither fedwa nor ``args`` gives.
    """
    params = constructor_parameters(cls)
    name = cls.__name__
    unknown = sorted(set(args) - set(params))
    if unknown:
        accepted = ", ".join(p for p in params if p != "strategy") or "none"
        raise ConfigError("strategy-args", f"{unknown[0]} = {args[unknown[0]]!r}",
                          f"a keyword argument of {name} ({accepted})")
    kwargs = {k: v for k, v in known_arguments(config).items() if k in params}
    kwargs.update(args)
    given = {k: v for k, v in args.items() if k != "strategy"}
    for param_name, param in params.items():
        if param.default is inspect.Parameter.empty and param_name not in kwargs:
            raise ConfigError("strategy-args", str(given),
                              f"a table that gives {name} its required argument "
                              f"{param_name!r}, e.g. strategy-args = \"{{{param_name} = ...}}\"")
    return kwargs


# --- the adapted class -------------------------------------------------------------------------


class ForeignMark:
    """Sits between fedwa's mixin and the foreign class in the MRO and records which
    attributes the foreign constructor set, so that fedwa's own ones stay out of its state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._foreign_names = frozenset(vars(self))


class AttributeState:
    """``state_dict`` / ``load_state_dict`` from the attributes a Flower class set.

    Bases: ``(AttributeState, FedwaStrategy, ForeignMark, FlowerClass)``. First, because
    :class:`FedwaStrategy`'s empty ``state_dict`` would win otherwise; the attributes that
    fedwa's mixin set in its constructor (reply bookkeeping, the sampling seed, the run config)
    are left out, and everything else (what the Flower class set, then or later) is state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Everything set after the foreign constructor returned is fedwa's.
        self._fedwa_names = frozenset(vars(self)) - self._foreign_names

    def _state_names(self) -> list[str]:
        fedwa_names = set(getattr(self, "_fedwa_names", ()))
        return [n for n in vars(self) if n not in fedwa_names
                and n not in ("_foreign_names", "_fedwa_names")]

    def state_dict(self) -> dict[str, Any]:
        return attribute_state(self, self._state_names())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restore_attributes(self, state)


class FloatArraysOnly:
    """For Flower classes that update every array of the model in place with float arithmetic
    (QFedAvg's scaled updates, the DP wrappers' clipping and noise), which numpy refuses on an
    integer array: a model with an integer buffer (BatchNorm's ``num_batches_tracked``) would
    crash their first aggregation, so it is refused before the run."""

    def check_model(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`ConfigError` before the run when ``state`` holds integer arrays."""
        integer = [k for k, v in state.items() if not v.is_floating_point()]
        if integer:
            raise ConfigError("model", str(self.run_config.get("model", "?")),
                              f"a model without integer buffers with {type(self).__name__}, "
                              f"whose math scales every array in place and cannot scale "
                              f"{integer[0]!r} ({state[integer[0]].dtype}); the mlp has none "
                              "(BatchNorm models do)")


def scales_every_array(cls: type) -> bool:
    """Flower's QFedAvg and differential-privacy wrappers (fixed or adaptive clipping)."""
    return any(base.__module__.startswith("flwr.") and (
        base.__name__.startswith("DifferentialPrivacy") or base.__name__ == "QFedAvg")
        for base in cls.__mro__)


_ADAPTED: dict[type, type] = {}


def adapt(cls: type) -> type:
    """``cls`` with fedwa's mixin and attribute checkpoints (one subclass per class)."""
    if cls not in _ADAPTED:
        extra = (FloatArraysOnly,) if scales_every_array(cls) else ()
        _ADAPTED[cls] = type(cls.__name__,
                             (*extra, AttributeState, FedwaStrategy, ForeignMark, cls),
                             {"__module__": cls.__module__,
                              "__qualname__": cls.__qualname__,
                              "__doc__": cls.__doc__, "foreign_class": cls})
    return _ADAPTED[cls]


def build_foreign(cls: type, config: Mapping[str, Any], args: Mapping[str, Any] | None = None,
                  *, resolve: Callable[[str], type], build: Callable[[Mapping[str, Any]], Any]
                  ) -> Any:
    """``cls`` adapted and built from the run config and its ``strategy-args``.

    ``args`` defaults to the parsed ``strategy-args`` of ``config``; a wrapper's inner strategy
    is built first, from ``args["strategy"]`` and ``args["strategy-args"]``: ``resolve`` turns
    its name into a class and ``build`` builds a fedwa one (the registry's
    :func:`strategies.resolve_strategy_class` and :func:`strategies.build_strategy`, handed in
    so that this module, which the registry imports, does not import the registry).
    """
    resolve_strategy_class, build_strategy = resolve, build
    args = dict(parse_strategy_args(str(config.get("strategy-args", ""))) if args is None
                else args)
    if takes_inner_strategy(cls):
        inner_name = args.pop("strategy", "fedavg")
        inner_args = args.pop("strategy-args", {})
        if not isinstance(inner_name, str) or not isinstance(inner_args, dict):
            raise ConfigError("strategy-args", f"strategy = {inner_name!r}",
                              "a strategy name or module:Class, with its own arguments as a "
                              "nested table strategy-args = {...}")
        inner_cls = resolve_strategy_class(inner_name)
        inner_config = {**config, "strategy": inner_name, "strategy-args": ""}
        if hasattr(inner_cls, "from_config"):
            if inner_args:
                raise ConfigError("strategy-args", str(inner_args), f"no nested arguments for "
                                  f"fedwa's {inner_name!r}: it takes its own config keys")
            # The run config holds the wrapper's keys, not the inner's: fedwa's inner strategy
            # gets its own keys' defaults (name a Flower class to set its arguments). The core
            # keys in `config` are resolved already; a key's default is valid by declaration.
            args["strategy"] = build_strategy({
                **inner_config, **{key.name: key.default for key in inner_cls.config_keys}})
        else:
            args["strategy"] = build_foreign(inner_cls, inner_config, inner_args,
                                             resolve=resolve, build=build)
    kwargs = constructor_kwargs(cls, config, args)
    try:
        return adapt(cls)(seed=int(config["seed"]), run_config=config, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        shown = {k: v for k, v in kwargs.items() if k != "strategy"}
        raise ConfigError("strategy-args", str(shown), f"arguments {cls.__name__} accepts "
                          f"({type(err).__name__}: {err})") from None


# --- attribute state ---------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """``value`` as checkpointable data, or :class:`UnsavableStateError` naming ``where``."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise UnsavableStateError(f"{where} is an object array")
        return value.copy()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, ArrayRecord):
        return {"__array_record__": {k: a.numpy() for k, a in value.items()}}
    if isinstance(value, (MetricRecord, ConfigRecord)):
        return {"__record__": type(value).__name__, "items": _plain(dict(value), where)}
    if isinstance(value, random.Random):
        return {"__random__": value.getstate()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in value):
            raise UnsavableStateError(f"{where} has keys that are not plain values")
        return {"__dict__": [(k, _plain(v, f"{where}[{k!r}]")) for k, v in value.items()]}
    if _is_strategy(value):
        return {"__strategy__": value.state_dict() if hasattr(value, "state_dict")
                else attribute_state(value)}
    raise UnsavableStateError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}")


def _is_strategy(value: Any) -> bool:
    from flwr.serverapp.strategy import Strategy

    return isinstance(value, Strategy)


def attribute_state(obj: Any, names: list[str] | None = None) -> dict[str, Any]:
    """The data attributes of ``obj`` (all of ``vars(obj)``, or ``names``) as plain data.

    Callables are left out: they are configuration, rebuilt by the constructor.
    """
    state = {}
    for name in names if names is not None else list(vars(obj)):
        value = getattr(obj, name)
        if callable(value) and not _is_strategy(value):
            continue
        state[name] = _plain(value, f"{type(obj).__name__}.{name}")
    return state


def _unplain(data: Any, current: Any = None) -> Any:
    if isinstance(data, list):
        return [_unplain(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "__array_record__" in data:
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in data["__array_record__"].items()})
    if "__record__" in data:
        kind = MetricRecord if data["__record__"] == "MetricRecord" else ConfigRecord
        return kind(_unplain(data["items"]))
    if "__random__" in data:
        rng = random.Random()
        rng.setstate(data["__random__"])
        return rng
    if "__tuple__" in data:
        return tuple(_unplain(v) for v in data["__tuple__"])
    if "__dict__" in data:
        return {k: _unplain(v) for k, v in data["__dict__"]}
    if "__strategy__" in data:
        if current is None:
            raise FedwaError("a checkpointed inner strategy has no strategy to restore into")
        if hasattr(current, "load_state_dict"):
            current.load_state_dict(data["__strategy__"])
        else:
            restore_attributes(current, data["__strategy__"])
        return current
    raise FedwaError(f"unknown checkpointed value {sorted(data)[:3]}")


def restore_attributes(obj: Any, state: Mapping[str, Any]) -> None:
    """Set the attributes :func:`attribute_state` saved back on ``obj``."""
    for name, data in state.items():
        setattr(obj, name, _unplain(data, getattr(obj, name, None)))
