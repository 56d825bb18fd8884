"""The strategy registry: names users put in ``strategy=...``, mapped to classes.

Besides the names below, ``strategy`` accepts an import path ``module:Class``. Such a class is
built with ``Class.from_config(run_config)`` when it has that classmethod (every
:class:`~strategies.base.FedwaStrategy` does), else with Flower's FedAvg keyword arguments.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from fedwa.errors import ConfigError
from strategies.base import FedwaStrategy
from strategies.decentralized import DIMAT, DecentralizedStrategy, Gossip
from strategies.fedavg import FedAvg
from strategies.flower import FedAdam, FedAvgM, FedProx
from strategies.hwa import HWA
from strategies.imwa import IMWA
from strategies.partial import PartialAveraging
from strategies.swa import EMA, SWA
from strategies.twa import TWAt, TWAv
from strategies.wsa import WSA

REGISTRY: dict[str, type] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
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

__all__ = ["REGISTRY", "DIMAT", "EMA", "HWA", "IMWA", "SWA", "DecentralizedStrategy", "FedAvg",
           "FedAdam", "FedAvgM", "FedProx", "FedwaStrategy", "Gossip", "PartialAveraging", "TWAt", "TWAv", "WSA",
           "build_strategy", "resolve_strategy_class"]


def resolve_strategy_class(name: str) -> type:
    """The class behind a registered name or a ``module:Class`` path."""
    if name in REGISTRY:
        return REGISTRY[name]
    allowed = "one of " + ", ".join(REGISTRY) + ", or an import path module:Class"
    module_name, sep, class_name = name.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError("strategy", name, allowed)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError("strategy", name, f"{allowed} (cannot import {module_name}: {err})")
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError("strategy", name, f"{allowed} ({module_name} has no class "
                          f"{class_name})")
    from flwr.serverapp.strategy import Strategy

    if not issubclass(cls, (Strategy, DecentralizedStrategy)):
        raise ConfigError("strategy", name, "a subclass of flwr.serverapp.strategy.Strategy "
                          "or of strategies.DecentralizedStrategy")
    return cls


def build_strategy(config: Mapping[str, Any]) -> Any:
    """Build the strategy named by ``config['strategy']`` from the resolved config."""
    cls = resolve_strategy_class(str(config["strategy"]))
    if hasattr(cls, "from_config"):
        return cls.from_config(config)
    fraction_evaluate = float(config["fraction-evaluate"])
    return cls(fraction_train=float(config["fraction-train"]),
               fraction_evaluate=fraction_evaluate, min_train_nodes=1,
               min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
               min_available_nodes=int(config["num-clients"]))
