"""Flower's own server optimisers, wired into fedwa's config, reply guard and sampling.

The math is Flower's (``flwr.serverapp.strategy``); fedwa adds its keys and guarantees. Their
state (FedAvgM's momentum, FedAdam's moments, the current arrays) lives in Flower's attributes
and is checkpointed from them (:class:`strategies.foreign.AttributeState`), so a resumed run
continues with the momentum it had.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM
from flwr.serverapp.strategy import FedProx as FlowerFedProx

from fedwa.common.keys import Key, at_least, positive
from strategies.base import FedwaStrategy
from strategies.foreign import AttributeState, ForeignMark


class FedAvgM(AttributeState, FedwaStrategy, ForeignMark, FlowerFedAvgM):
    """FedAvg with server momentum (Hsu et al. 2019, arXiv 1909.06335)."""

    config_keys = (
        Key("fedavgm-server-lr", 1.0, "fedavgm: server learning rate.", check=positive),
        Key("fedavgm-momentum", 0.9, "fedavgm: server momentum.",
            check=lambda v: None if 0 <= v < 1 else "in [0, 1)"),
    )

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"server_learning_rate": float(config["fedavgm-server-lr"]),
                "server_momentum": float(config["fedavgm-momentum"])}


class FedProx(AttributeState, FedwaStrategy, ForeignMark, FlowerFedProx):
    """FedAvg plus a proximal term mu/2 ||w - w_global||^2 in the clients' loss
    (Li et al., MLSys 2020, arXiv 1812.06127). fedwa's ClientApp applies ``proximal-mu``."""

    config_keys = (Key("fedprox-mu", 0.01, "fedprox: proximal weight mu.", check=at_least(0)),)

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"proximal_mu": float(config["fedprox-mu"])}


class FedAdam(AttributeState, FedwaStrategy, ForeignMark, FlowerFedAdam):
    """Adam on the server over the averaged client update (Reddi et al., ICLR 2021,
    arXiv 2003.00295)."""

    config_keys = (
        Key("fedadam-eta", 0.01, "fedadam: server learning rate.", check=positive),
        Key("fedadam-beta1", 0.9, "fedadam: first-moment decay.",
            check=lambda v: None if 0 <= v < 1 else "in [0, 1)"),
        Key("fedadam-beta2", 0.99, "fedadam: second-moment decay.",
            check=lambda v: None if 0 <= v < 1 else "in [0, 1)"),
        Key("fedadam-tau", 1e-3, "fedadam: adaptivity (epsilon).", check=positive),
    )

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"eta": float(config["fedadam-eta"]), "eta_l": float(config["lr"]),
                "beta_1": float(config["fedadam-beta1"]), "beta_2": float(config["fedadam-beta2"]),
                "tau": float(config["fedadam-tau"])}
