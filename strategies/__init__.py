"""The strategy registry: names users put in ``strategy=...``, mapped to classes.

Besides the names below, ``strategy`` accepts an import path ``module:Class``. Such a class is
built with ``Class.from_config(run_config)`` when it has that classmethod (every
:class:`~strategies.base.FedwaStrategy` does). Any other Flower strategy class, Flower's own
included, is adapted by :mod:`strategies.foreign`: fedwa's reply guard and sampling in front,
its constructor arguments from the run config and ``strategy-args``, its checkpoints from its
attributes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from fedwa.common.errors import ConfigError
from fedwa.common.plugins import import_module
from strategies.base import FedwaStrategy
from strategies.decentralized import DIMAT, DecentralizedStrategy, Gossip
from strategies.fedavg import FedAvg
from strategies.flower import FedAdam, FedAvgM, FedProx
from strategies.hwa import HWA
from strategies.imwa import IMWA
from strategies.partial import PartialAveraging
from strategies.robust import Bulyan, FedMedian, FedTrimmedAvg, Krum
from strategies.swa import EMA, SWA
from strategies.twa import TWAt, TWAv
from strategies.wsa import WSA

REGISTRY: dict[str, type] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "bulyan": Bulyan,
    "imwa": IMWA,
    "hwa": HWA,
    "swa": SWA,
    "ema": EMA,
    "twa-v": TWAv,
    "twa-t": TWAt,
    "partial": PartialAveraging,
    "wsa": WSA,
    "dimat": DIMAT,
    "gossip": Gossip,
}

__all__ = ["REGISTRY", "DIMAT", "EMA", "HWA", "IMWA", "SWA", "Bulyan", "DecentralizedStrategy",
           "FedAdam", "FedAvg", "FedAvgM", "FedMedian", "FedProx", "FedTrimmedAvg", "FedwaStrategy",
           "Gossip", "Krum", "PartialAveraging", "TWAt", "TWAv", "WSA", "build_strategy",
           "resolve_strategy_class"]


def resolve_strategy_class(name: str) -> type:
    """The class behind a registered name or a ``module:Class`` path."""
    if name in REGISTRY:
        return REGISTRY[name]
    allowed = "one of " + ", ".join(REGISTRY) + ", or an import path module:Class"
    module_name, sep, class_name = name.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError("strategy", name, allowed)
    module = import_module("strategy", name, allowed, module_name)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError("strategy", name, f"{allowed} ({module_name} has no class "
                          f"{class_name})")
    from flwr.serverapp.strategy import Strategy

    if not issubclass(cls, (Strategy, DecentralizedStrategy)):
        raise ConfigError("strategy", name, "a subclass of flwr.serverapp.strategy.Strategy "
                          "or of strategies.DecentralizedStrategy")
    if inspect.isabstract(cls):
        # Caught here, not when the class is built, so the message blames this key rather than
        # strategy-args, and comes while the config is resolved.
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise ConfigError("strategy", name, f"a concrete strategy class: {class_name} is "
                          f"abstract (it leaves {missing} unimplemented)")
    return cls


def build_strategy(config: Mapping[str, Any]) -> Any:
    """Build the strategy named by ``config['strategy']`` from the resolved config.

    Raises :class:`~fedwa.common.errors.ConfigError` when ``strategy-args`` does not fit the class.
    """
    from strategies.foreign import build_foreign

    name = str(config["strategy"])
    cls = resolve_strategy_class(name)
    if hasattr(cls, "from_config"):
        if str(config.get("strategy-args", "")).strip():
            raise ConfigError("strategy-args", config["strategy-args"],
                              f"'' with strategy {name!r}: strategy-args gives constructor "
                              "arguments to a Flower class named by module:Class; fedwa's own "
                              "strategies take their own config keys")
        return cls.from_config(config)
    return build_foreign(cls, config, resolve=resolve_strategy_class, build=build_strategy)
