"""Partial averaging's ``partial-rejoin = "server"``: a client that missed rounds gets the
server's full model, one that trained last round only the group going down. Rounds are
remembered by partition id, so a resumed deployment (new node ids) keeps them."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedwa.flower.arrays import to_state_dict
from fedwa.core.partial import merge
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


def test_rejoin_with_split_weights_sends_whole_entries_and_restores_every_row() -> None:
    # "equal" groups of a 4 x 2 weight and a bias: rows 0-1 | rows 2-3 and the bias.
    state = {"fc.weight": torch.arange(8.0).reshape(4, 2), "fc.bias": torch.tensor([1.0, 2.0])}
    strategy = PartialAveraging(partial_groups=2, partial_rejoin="server",
                                min_train_nodes=1, min_available_nodes=1)
    assert strategy.rule == "equal"

    def sent(server_round: int, grid: Grid) -> dict[int, dict]:
        messages = strategy.configure_train(server_round, ArrayRecord(state), ConfigRecord(),
                                            grid)
        return {grid.partition_of[m.metadata.dst_node_id]: to_state_dict(m.content["arrays"])
                for m in messages}

    sent(1, Grid({101: 0, 202: 1}))
    # The server's average of rows 0-1 differs from the init (as after round 1's replies).
    strategy.full = merge(strategy.full, {"fc.weight[0:2]": torch.full((2, 2), 9.0)})
    sent(2, Grid({101: 0}))  # partition 1 misses round 2
    third = sent(3, Grid({101: 0, 303: 1}))
    assert list(third[0]) == ["fc.weight[2:4]", "fc.bias"]  # trained in round 2: the pieces
    assert list(third[1]) == ["fc.weight", "fc.bias"]  # missed round 2: whole entries
    # The rejoining client's stale model, merged with what it got, is the server's model.
    stale = {"fc.weight": torch.zeros(4, 2), "fc.bias": torch.zeros(2)}
    rejoined = merge(stale, third[1])
    assert all(torch.equal(rejoined[n], strategy.full[n]) for n in state)
    assert torch.equal(rejoined["fc.weight"][:2], torch.full((2, 2), 9.0))
