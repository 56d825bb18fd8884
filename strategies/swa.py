"""SWA and EMA over the server's global models.

SWA: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018 (arXiv 1803.05407); here a uniform average of the global models of the rounds from
``swa-start-round`` on. EMA: an exponential moving average of the global models (Polyak &
Juditsky 1992). Training always continues from the plain global model; the average is what the
server evaluates, with BatchNorm statistics recomputed (``bn-recompute``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from fedwa.averaging import ExponentialAverage, RunningAverage
from fedwa.config import Key, at_least
from strategies.fedavg import FedAvg


def half_run(config: Mapping[str, Any]) -> int:
    """Default start of averaging: the first round of the second half of the run."""
    return int(config["num-server-rounds"]) // 2 + 1


class SWA(FedAvg):
    """FedAvg whose evaluated model is the uniform average of the late global models."""

    config_keys = (Key("swa-start-round", 0, "swa: first round whose global model enters the "
                       "average (0 = the second half of the run).", check=at_least(0)),)
    recompute_bn = frozenset({"swa"})

    def __init__(self, *args: Any, swa_start_round: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_round = swa_start_round or half_run(self.run_config or
                                                       {"num-server-rounds": 2})
        self.average = RunningAverage()

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"swa_start_round": int(config["swa-start-round"])}

    def aggregate_train(self, server_round: int, replies: list[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and server_round >= self.start_round:
            self.average.update(arrays.to_torch_state_dict())
        return arrays, metrics

    def models_to_evaluate(self, server_round: int, arrays: ArrayRecord
                           ) -> dict[str, ArrayRecord]:
        if self.average.average is None:
            return {"global": arrays}
        return {"swa": ArrayRecord(self.average.average), "global": arrays}

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.average.load_state_dict(state["average"])


class EMA(FedAvg):
    """FedAvg whose evaluated model is an EMA of the global models, started at round 1."""

    config_keys = (Key("ema-decay", 0.9, "ema: decay of the EMA of global models.",
                       check=lambda v: None if 0 <= v < 1 else "in [0, 1)"),)
    recompute_bn = frozenset({"ema"})

    def __init__(self, *args: Any, ema_decay: float = 0.9, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.average = ExponentialAverage(ema_decay)

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"ema_decay": float(config["ema-decay"])}

    def aggregate_train(self, server_round: int, replies: list[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.average.update(arrays.to_torch_state_dict())
        return arrays, metrics

    def models_to_evaluate(self, server_round: int, arrays: ArrayRecord
                           ) -> dict[str, ArrayRecord]:
        if self.average.average is None:
            return {"global": arrays}
        return {"ema": ArrayRecord(self.average.average), "global": arrays}

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.average.load_state_dict(state["average"])
