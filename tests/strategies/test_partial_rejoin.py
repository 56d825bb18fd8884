"""Partial averaging's ``partial-rejoin = "server"``: a client that missed rounds gets the
server's full model, one that trained last round only the group going down. Rounds are
remembered by partition id, so a resumed deployment (new node ids) keeps them."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord

from strategies.partial import PartialAveraging


class Grid:
    """Nodes with partition ids, as FedwaGrid lists them."""

    def __init__(self, partition_of: dict[int, int]) -> None:
        self.partition_of = partition_of

    def get_node_ids(self) -> list[int]:
        return list(self.partition_of)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)


STATE = {"a.weight": torch.ones(2, 2), "b.weight": torch.zeros(3)}


def sent_names(strategy: PartialAveraging, server_round: int, grid: Grid) -> dict[int, list]:
    messages = strategy.configure_train(server_round, ArrayRecord(STATE), ConfigRecord(), grid)
    return {grid.partition_of[m.metadata.dst_node_id]: sorted(m.content["arrays"].keys())
            for m in messages}


def test_a_client_that_missed_a_round_rejoins_with_the_full_model() -> None:
    strategy = PartialAveraging(partial_groups=2, partial_rejoin="server",
                                min_train_nodes=1, min_available_nodes=1)
    grid = Grid({101: 0, 202: 1})
    sent_names(strategy, 1, grid)  # both train in round 1
    # Round 2: partition 1's node is gone; round 3: it is back with a new node id.
    sent_names(strategy, 2, Grid({101: 0}))
    sent = sent_names(strategy, 3, Grid({101: 0, 303: 1}))
    down = sent[0]
    assert down and down != sorted(STATE)  # trained in round 2: only the group going down
    assert sent[1] == sorted(STATE)  # missed round 2: the full model
    assert strategy.last_round_of == {0: 3, 1: 3}
