"""FedAvg with fedwa's reply guard and fused averaging.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017 (arXiv 1602.05629).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedwa.flower.arrays import average_records
from strategies.base import FedwaStrategy


class FedAvg(FedwaStrategy, FlowerFedAvg):
    """Example-weighted average of the clients' models.

    Float arrays are averaged with :func:`fedwa.flower.arrays.average_records` (the numbers of
    :func:`fedwa.core.averaging.weighted_average`, from flat buffers); integer buffers
    (BatchNorm's ``num_batches_tracked``) take the maximum instead of a float mean.
    Override :meth:`client_weights` to weight clients differently.
    """

    def client_weights(self, replies: list[Message]) -> list[float]:
        """Each client's weight in the average: its number of training examples."""
        return [float(r.content["metrics"]["num-examples"]) for r in replies]

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord:
        # Decoded straight into one flat buffer per model: the same numbers as averaging
        # their state dicts, in K kernel calls instead of K per entry.
        return ArrayRecord(average_records([r.content["arrays"] for r in replies],
                                           self.client_weights(replies)))
