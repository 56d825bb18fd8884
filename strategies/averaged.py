"""FedAvg plus a server-side average of the global models: the shared part of SWA, EMA, HWA."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from flwr.app import ArrayRecord, Message, MetricRecord

from fedwa.flower.arrays import to_state_dict
from fedwa.core.averaging import ExponentialAverage, RunningAverage, WindowAverage
from strategies.fedavg import FedAvg


class AveragedModelStrategy(FedAvg):
    """Trains like FedAvg; evaluates an average of the global models as its main model.

    Subclasses set ``averaged_name``, create ``self.average`` (any object with ``update``,
    ``average``, ``state_dict`` and ``load_state_dict``) and may narrow :meth:`tracks`.
    Training always continues from the plain global model.
    """

    averaged_name: ClassVar[str] = "average"
    average: RunningAverage | ExponentialAverage | WindowAverage

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.recompute_bn = frozenset({cls.averaged_name})

    def tracks(self, server_round: int) -> bool:
        """Whether this round's global model enters the average."""
        return True

    def aggregate_train(self, server_round: int, replies: list[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.tracks(server_round):
            self.average.update(to_state_dict(arrays))
        return arrays, metrics

    def models_to_evaluate(self, server_round: int, arrays: ArrayRecord
                           ) -> dict[str, ArrayRecord]:
        average = self.average.average
        if average is None:
            return {"global": arrays}
        return {self.averaged_name: ArrayRecord(average), "global": arrays}

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.average.load_state_dict(state["average"])
