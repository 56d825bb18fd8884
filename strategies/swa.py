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

from fedwa.core.averaging import ExponentialAverage, RunningAverage
from fedwa.common.keys import Key, at_least
from fedwa.common.errors import ConfigError
from strategies.averaged import AveragedModelStrategy


def half_run(config: Mapping[str, Any]) -> int:
    """Default start of averaging: the first round of the second half of the run."""
    return int(config["num-server-rounds"]) // 2 + 1


class SWA(AveragedModelStrategy):
    """FedAvg whose evaluated model is the uniform average of the late global models."""

    config_keys = (Key("swa-start-round", 0, "swa: first round whose global model enters the "
                       "average (0 = the second half of the run).", check=at_least(0)),)
    averaged_name = "swa"

    def __init__(self, *args: Any, swa_start_round: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.swa_start_round = swa_start_round
        # A strategy built directly learns the run's length in start() (bind_rounds).
        self.bind_rounds(int(self.run_config.get("num-server-rounds", 2)),
                         check="num-server-rounds" in self.run_config)
        self.average = RunningAverage()

    def bind_rounds(self, num_rounds: int, check: bool = True) -> None:
        """Window start for a run of ``num_rounds``: ``swa_start_round``, or the first round of
        the second half."""
        self.start_round = self.swa_start_round or half_run({"num-server-rounds": num_rounds})
        if check and self.start_round > num_rounds:
            raise ConfigError("swa-start-round", self.swa_start_round,
                              f"at most num-server-rounds ({num_rounds})")

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"swa_start_round": int(config["swa-start-round"])}

    def tracks(self, server_round: int) -> bool:
        return server_round >= self.start_round


class EMA(AveragedModelStrategy):
    """FedAvg whose evaluated model is an EMA of the global models, started at round 1."""

    config_keys = (Key("ema-decay", 0.9, "ema: decay of the EMA of global models.",
                       check=lambda v: None if 0 <= v < 1 else "in [0, 1)"),)
    averaged_name = "ema"

    def __init__(self, *args: Any, ema_decay: float = 0.9, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.average = ExponentialAverage(ema_decay)

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"ema_decay": float(config["ema-decay"])}
