"""FedAvg with fedwa's reply guard and fused averaging.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017 (arXiv 1602.05629).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedwa.arrays import to_state_dict
from fedwa.averaging import weighted_average
from strategies.base import FedwaStrategy


class FedAvg(FedwaStrategy, FlowerFedAvg):
    """Example-weighted average of the clients' models.

    Float arrays are averaged with :func:`fedwa.averaging.weighted_average`; integer buffers
    (BatchNorm's ``num_batches_tracked``) take the maximum instead of a float mean.
    Override :meth:`client_weights` to weight clients differently.
    """

    def client_weights(self, replies: list[Message]) -> list[float]:
        """Each client's weight in the average: its number of training examples."""
        return [float(r.content["metrics"]["num-examples"]) for r in replies]

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord:
        states = [to_state_dict(r.content["arrays"]) for r in replies]
        return ArrayRecord(weighted_average(states, self.client_weights(replies)))
