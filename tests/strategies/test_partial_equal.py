"""Partial averaging with ``partial-grouping = "equal"`` (the default): weights are cut by
output rows so each round's traffic is 1/tau of FedAvg's, and a group travels as named pieces
``"<entry>[a:b]"`` that the server averages and the clients write back row by row."""

from __future__ import annotations

import functools

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedwa.flower.arrays import to_record, to_state_dict
from fedwa.flower.grid import array_bytes
from fedwa.models import build_model
from fedwa.core.partial import merge, select
from strategies.fedavg import FedAvg
from strategies.partial import PartialAveraging

#: The models as the evidence runs them: Fashion-MNIST for cnn and mlp, CIFAR for resnet20.
REAL_SHAPES = {"cnn": ((1, 28, 28), 10), "mlp": ((1, 28, 28), 10), "resnet20": ((3, 32, 32), 10)}
NPY_HEADER = 128  # bytes of the .npy header Flower ships before every array


class Grid:
    """Nodes with partition ids, as FedwaGrid lists them."""

    def __init__(self, partition_of: dict[int, int]) -> None:
        self.partition_of = partition_of

    def get_node_ids(self) -> list[int]:
        return list(self.partition_of)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)


@functools.cache
def real_state(name: str) -> dict[str, torch.Tensor]:
    shape, classes = REAL_SHAPES[name]
    return build_model(name, shape, classes).state_dict()


def largest_unit(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the largest piece that is never cut, computed here from the model: one row of
    a weight (2 or more dims), one 1-D or 0-D tensor (a bias), or one BatchNorm layer's five
    entries (weight, bias, running mean and variance, counter) together."""
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    bn = {n.rpartition(".")[0] for n in state if n.endswith("running_mean")}
    units = [sum(nbytes(t) for m, t in state.items() if m.rpartition(".")[0] == p) for p in bn]
    for name, t in state.items():
        if name.rpartition(".")[0] not in bn:
            units.append(nbytes(t) // t.shape[0] if t.dim() >= 2 else nbytes(t))
    return max(units)


def rounds_bytes(strategy, state, grid, server_round):  # noqa: ANN001, ANN201
    """(bytes down, bytes up) per client in a round; up as the client builds its reply."""
    messages = list(strategy.configure_train(server_round, ArrayRecord(state), ConfigRecord(),
                                             grid))
    down = {array_bytes(m.content) for m in messages}
    assert len(down) == 1  # every client gets the same group
    names = list(messages[0].content["config"]["return-names"])
    up = array_bytes(RecordDict({"arrays": to_record(select(state, names))}))
    return down.pop(), up, messages


@pytest.mark.parametrize("model", ["cnn", "resnet20", "mlp"])
@pytest.mark.parametrize("tau", [2, 4, 8])
def test_each_round_sends_fedavgs_bytes_over_tau(model: str, tau: int) -> None:
    # Bound: |bytes_down - FedAvg's / tau| <= 5% of FedAvg's / tau + the fixed overhead, per
    # client and round. The fixed overhead: (1) the groups are cut between indivisible units,
    # so a group's raw bytes miss total / tau by less than one unit (largest_unit: one fc1
    # row of 6272 bytes in the cnn, 3136 in the mlp, one 64-channel conv row of 2304 in
    # resnet20); (2) each array carries a 128-byte .npy header, and a group holds its own
    # number of arrays, not 1/tau of the model's.
    state = real_state(model)
    grid = Grid({11: 0, 22: 1, 33: 2})
    fedavg = FedAvg(min_train_nodes=1, min_available_nodes=1)
    fedavg_down = {array_bytes(m.content) for m in
                   fedavg.configure_train(2, ArrayRecord(state), ConfigRecord(), grid)}.pop()
    strategy = PartialAveraging(partial_groups=tau, min_train_nodes=1, min_available_nodes=1)
    unit = largest_unit(state)
    down1, up, _ = rounds_bytes(strategy, state, grid, 1)
    assert down1 == 0  # round 1: the shared initialisation, nothing down
    ups, downs, ratios = [up], [], []
    for server_round in range(2, tau + 2):  # group (r - 2) mod tau goes down in round r
        down, up, messages = rounds_bytes(strategy, state, grid, server_round)
        ups.append(up)
        pieces = len(messages[0].content["arrays"])
        overhead = unit + NPY_HEADER * pieces
        assert abs(down - fedavg_down / tau) <= 0.05 * fedavg_down / tau + overhead, (
            server_round, down / (fedavg_down / tau))
        downs.append(down)
        ratios.append(down / fedavg_down)
    # Over tau rounds every byte goes down once: the groups add up to FedAvg's one model
    # plus the extra headers of the arrays split between two groups.
    assert sum(ratios) == pytest.approx(1.0, abs=NPY_HEADER * (tau - 1) / fedavg_down + 1e-12)
    # Up: the group trained this round, the same sizes one round earlier.
    assert ups[:tau] == downs


def reply(instruction: Message, state: dict[str, torch.Tensor], examples: int,
          pid: int) -> Message:
    """What the ClientApp replies: the pieces in return-names of its model."""
    names = list(instruction.content["config"]["return-names"])
    metrics = MetricRecord({"num-examples": examples, "partition-id": pid})
    return Message(RecordDict({"arrays": to_record(select(state, names)), "metrics": metrics}),
                   reply_to=instruction)


def test_two_clients_by_hand() -> None:
    # fc.weight 4 x 2 (rows of 8 bytes) and fc.bias (8 bytes): group 0 = rows 0-1,
    # group 1 = rows 2-3 and the bias (tests/test_partial.py::test_equal_groups_by_hand).
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    init = {"fc.weight": w, "fc.bias": torch.tensor([10.0, 20.0])}
    a = {n: t.clone() for n, t in init.items()}  # client a (1 example) keeps the init
    b = {n: t + 4 for n, t in init.items()}  # client b (3 examples) drifted by 4
    grid = Grid({11: 0, 22: 1})
    strategy = PartialAveraging(partial_groups=2, min_train_nodes=1, min_available_nodes=1)

    first = list(strategy.configure_train(1, to_record(init), ConfigRecord(), grid))
    assert [len(m.content["arrays"]) for m in first] == [0, 0]
    assert list(first[0].content["config"]["return-names"]) == ["fc.weight[0:2]"]
    arrays, _ = strategy.aggregate_train(1, [reply(first[0], a, 1, 0), reply(first[1], b, 3, 1)])
    # (1 * a + 3 * b) / 4 = a + 3 on rows 0-1; the rest is still the init.
    assert torch.equal(strategy.full["fc.weight"],
                       torch.tensor([[4.0, 5.0], [6.0, 7.0], [5.0, 6.0], [7.0, 8.0]]))
    assert torch.equal(strategy.full["fc.bias"], init["fc.bias"])
    assert torch.equal(to_state_dict(arrays)["fc.weight"], strategy.full["fc.weight"])

    second = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    down = to_state_dict(second[1].content["arrays"])
    assert list(down) == ["fc.weight[0:2]"]
    assert torch.equal(down["fc.weight[0:2]"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert list(second[1].content["config"]["return-names"]) == ["fc.weight[2:4]", "fc.bias"]
    # Client b writes the rows into its kept model (the ClientApp's fedwa.core.partial.merge):
    b = merge(b, down)
    assert torch.equal(b["fc.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0], [9.0, 10.0],
                                                     [11.0, 12.0]]))
    assert torch.equal(b["fc.bias"], torch.tensor([14.0, 24.0]))
    a = merge(a, down)
    strategy.aggregate_train(2, [reply(second[0], a, 1, 0), reply(second[1], b, 3, 1)])
    # Rows 2-3 and the bias: a + 3 again; after tau = 2 rounds the server holds every piece's
    # average.
    assert torch.equal(strategy.full["fc.weight"],
                       torch.tensor([[4.0, 5.0], [6.0, 7.0], [8.0, 9.0], [10.0, 11.0]]))
    assert torch.equal(strategy.full["fc.bias"], torch.tensor([13.0, 23.0]))


def test_a_reply_with_the_whole_tensor_instead_of_its_rows_is_left_out() -> None:
    init = {"fc.weight": torch.zeros(4, 2), "fc.bias": torch.zeros(2)}
    grid = Grid({11: 0, 22: 1})
    strategy = PartialAveraging(partial_groups=2, min_train_nodes=1, min_available_nodes=1)
    first = list(strategy.configure_train(1, to_record(init), ConfigRecord(), grid))
    whole = Message(RecordDict({"arrays": to_record({"fc.weight": torch.ones(4, 2)}),
                                "metrics": MetricRecord({"num-examples": 5, "partition-id": 1})}),
                    reply_to=first[1])
    strategy.aggregate_train(1, [reply(first[0], init, 1, 0), whole])
    assert strategy.last_faults["clients_rejected"] == 1
    assert torch.equal(strategy.full["fc.weight"], torch.zeros(4, 2))

