"""HWA: Hierarchical Weight Averaging.

Gu, Zhang et al., "Hierarchical Weight Averaging for Deep Neural Networks", IEEE TNNLS 2023
(arXiv 2304.11519). Online averaging: the clients' models are averaged every ``hwa-sync-steps``
local SGD steps and every client continues from that synchronised model (FedAvg with H local
steps). Offline averaging: the uniform average of the last ``hwa-window`` synchronised models,
which is the model that is evaluated and returned (BatchNorm statistics recomputed).

Training continues from the synchronised model, not from the offline average (METHODS.md
marks this unconfirmed; it is the reading under which the offline average is a pure
evaluation-time device, as in the paper's algorithm box).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message

from fedwa.averaging import WindowAverage
from fedwa.config import Key, at_least
from strategies.averaged import AveragedModelStrategy


class HWA(AveragedModelStrategy):
    """FedAvg every H local steps, evaluated through a sliding-window average."""

    config_keys = (
        Key("hwa-sync-steps", 0, "hwa: local SGD steps between online averages "
            "(0 = use local-steps / local-epochs).", check=at_least(0)),
        Key("hwa-window", 5, "hwa: synchronised models in the offline average.",
            check=at_least(1)),
    )
    averaged_name = "hwa"

    def __init__(self, *args: Any, hwa_sync_steps: int = 0, hwa_window: int = 5,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sync_steps = hwa_sync_steps
        self.average = WindowAverage(hwa_window)

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"hwa_sync_steps": int(config["hwa-sync-steps"]),
                "hwa_window": int(config["hwa-window"])}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        if self.sync_steps:
            config["local-steps"] = self.sync_steps
        return super().configure_train(server_round, arrays, config, grid)
