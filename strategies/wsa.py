"""WSA: Weight Scope Alignment.

Xu, Li, Gan, Zhan, "Weight Scope Alignment: A Frustratingly Easy Method for Model Merging",
2024 (arXiv 2408.12237). Every selected layer's weights are treated as a Gaussian (their
"scope", mean mu_l and standard deviation sigma_l). Clients add
``wsa-lambda * sum_l KL(N(mu_l, sigma_l^2) || N(mu*_l, sigma*_l^2))`` to their loss, pulling
each layer's scope towards a shared target; the server averages the weights as FedAvg does and
fuses the clients' scopes into the next target by moment matching
(``mu* = sum_k p_k mu_k``, ``sigma*^2 = sum_k p_k (sigma_k^2 + mu_k^2) - mu*^2``, p_k by
examples; the paper leaves the exact fusion open). The first round's target is the initial
model's own scope. The clients' scopes are computed on the server from the weights they return,
so nothing beyond the model travels up; the targets travel down as a few floats per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedwa.arrays import to_state_dict
from fedwa.config import Key, at_least
from fedwa.wsa import fuse_scopes, scope_layers, scopes
from strategies.fedavg import FedAvg


class WSA(FedAvg):
    """FedAvg with clients regularised towards fused per-layer weight scopes."""

    config_keys = (
        Key("wsa-lambda", 0.1, "wsa: weight of the scope KL term in the clients' loss.",
            check=at_least(0)),
        Key("wsa-layers", "weights", "wsa: conv and linear weights, or also biases and BN "
            "affine parameters.", choices=("weights", "all")),
    )

    def __init__(self, *args: Any, wsa_lambda: float = 0.1, wsa_layers: str = "weights",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strength, self.include = wsa_lambda, wsa_layers
        self.names: list[str] | None = None
        self.targets: dict | None = None

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"wsa_lambda": float(config["wsa-lambda"]), "wsa_layers": str(config["wsa-layers"])}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        if self.targets is None:
            from fedwa.task import federated_data, make_model

            model = make_model(self.run_config, federated_data(self.run_config))
            self.names = scope_layers(model, self.include)
            self.targets = scopes(to_state_dict(arrays), self.names)
        assert self.names is not None
        config["wsa-lambda"] = self.strength
        config["wsa-names"] = list(self.names)
        config["wsa-mu"] = [float(self.targets[n][0]) for n in self.names]
        config["wsa-sigma"] = [float(self.targets[n][1]) for n in self.names]
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: list[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        usable = self.last_usable
        if usable:
            client_scopes = [scopes(to_state_dict(r.content["arrays"]), self.names)
                             for r in usable]
            self.targets = fuse_scopes(client_scopes, self.client_weights(usable))
        return arrays, metrics

    def round_metrics(self) -> dict[str, Any]:
        """The clients' mean KL to the round's targets, at the end of their training."""
        return {"wsa_kl": (self.last_train_metrics or {}).get("wsa-kl")}

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "targets": self.targets}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.names, self.targets = state["names"], state["targets"]
