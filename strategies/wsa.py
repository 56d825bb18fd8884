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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedwa.flower.arrays import to_state_dict
from fedwa.common.keys import Key, at_least
from fedwa.core.wsa import fuse_scopes, scope_layers, scopes
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
                 wsa_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if wsa_layers not in ("weights", "all"):
            raise ValueError(f"wsa_layers must be 'weights' or 'all', got {wsa_layers!r}")
        self.strength, self.include = wsa_lambda, wsa_layers
        #: The aligned entries; None: from the model (fedwa config) or the arrays' names.
        self.names: list[str] | None = list(wsa_names) if wsa_names is not None else None
        self.targets: dict | None = None

    def scope_names(self, arrays: ArrayRecord) -> list[str]:
        """The entries whose scopes WSA aligns.

        From the model when the strategy is built from a fedwa run config
        (:func:`fedwa.core.wsa.scope_layers`); built directly, from the names and shapes of the
        first model sent: ``weights`` takes every ``*.weight`` with two or more dimensions
        (conv and linear weights); ``all`` adds the one-dimensional ``*.weight`` and ``*.bias``
        entries (biases, BatchNorm's affine parameters). Pass ``wsa_names`` to choose.
        """
        if "dataset" in self.run_config:
            from fedwa.data.task import federated_data, make_model

            model = make_model(self.run_config, federated_data(self.run_config))
            return scope_layers(model, self.include)
        names = []
        for name, array in arrays.items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and len(array.shape) >= 2:
                names.append(name)
            elif self.include == "all" and leaf in ("weight", "bias") and len(array.shape) == 1:
                names.append(name)
        if not names:
            raise ValueError("WSA found no '*.weight' entries of two or more dimensions in the "
                             "model: pass wsa_names=[...] (the entries to align)")
        return names

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"wsa_lambda": float(config["wsa-lambda"]), "wsa_layers": str(config["wsa-layers"])}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        if self.targets is None:
            if self.names is None:
                self.names = self.scope_names(arrays)
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

    def protocol_hint(self, server_round: int) -> str | None:
        return ("WSA's clients add wsa-lambda * sum over layers of KL(N(mu, sigma^2) || "
                "N(mu*, sigma*^2)) to their training loss, reading config 'wsa-lambda', "
                "'wsa-names' (entries), 'wsa-mu' and 'wsa-sigma' (the targets, one per entry; "
                "fedwa.core.wsa.scope_regulariser computes the term), and report the KL at the end "
                "of training as metric 'wsa-kl'")

    def protocol_problem(self, server_round: int, reply: Message) -> str | None:
        if "wsa-kl" not in reply.content["metrics"]:
            return "its reply has no 'wsa-kl' metric: the client ignored WSA's scope targets"
        return None

    def round_metrics(self) -> dict[str, Any]:
        """The clients' mean KL to the round's targets, at the end of their training."""
        return {"wsa_kl": (self.last_train_metrics or {}).get("wsa-kl")}

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "targets": self.targets}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.names, self.targets = state["names"], state["targets"]
