"""The reply guard (fedwa.flower.replies) against crafted faulty replies, built as real Flower
messages.

Each test is one finding of issue #17 section 2: before the guard, the reply either crashed
the run (a traceback from numpy, int() or a sort) or went into the model or the metrics.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedwa.flower.arrays import PayloadError, array_view, checked_view, new_array
from fedwa.callbacks.checkpoint import fetch_client_models
from fedwa.common.errors import AllClientsFailedError, TooFewRepliesError, UntrustedNodesError
from fedwa.flower.grid import FedwaGrid
from fedwa.flower.replies import (count_problem, handshake_problem, held_out_problem,
                                  model_problem, moments_problem, screen)
from fedwa.callbacks.evaluation import recompute_bn_federated, values_per_example
from strategies import FedAvg
from strategies.base import reply_problem


@pytest.fixture(autouse=True)
def task_identity():  # noqa: ANN201
    """Messages made outside a run need the identity run_simulation would set."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id = 1234
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


# --- building replies -------------------------------------------------------------------------


def record(**arrays: object) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def sent() -> ArrayRecord:
    return record(w=np.array([1.0, 2.0], dtype=np.float32))


def answer(node: int, content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    """``content`` as node ``node``'s reply to a message of ``message_type``."""
    return Message(content, reply_to=Message(RecordDict(), node, message_type))


def train_reply(node: int, w: object = (3.0, 4.0), arrays: ArrayRecord | None = None,
                **metrics: object) -> Message:
    arrays = arrays if arrays is not None else record(w=np.asarray(w, dtype=np.float32))
    return answer(node, RecordDict({"arrays": arrays,
                                    "metrics": MetricRecord({"num-examples": 10, **metrics})}))


def npy(values: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, values, allow_pickle=allow_pickle)
    return buffer.getvalue()


def lying(payload: bytes, dtype: str = "float32", shape: tuple[int, ...] = (2,),
          stype: str = "numpy.ndarray") -> ArrayRecord:
    """Record ``w`` whose declared fields are those of the model sent, whatever the bytes."""
    return ArrayRecord({"w": new_array(dtype, shape, stype, payload)})


#: Payloads whose fields claim float32 (2,) like the model sent, but whose bytes say otherwise.
LIES = {
    "shape": (npy(np.zeros(3, np.float32)), "payload has shape (3,)"),
    "dtype": (npy(np.zeros(2, np.float64)), "payload has dtype float64"),
    "truncated": (npy(np.zeros(2, np.float32))[:-3], "holds 5 value bytes, its shape and dtype "
                                                     "need 8"),
    "too-long": (npy(np.zeros(2, np.float32)) + b"\0" * 4, "holds 12 value bytes"),
    "object": (npy(np.array([1.0, "x"], dtype=object), allow_pickle=True),
               "holds Python objects"),
    "garbage": (b"\x00garbage bytes, no array", "not .npy bytes"),
    "bad-header": (b"\x93NUMPY\x01\x00\x08\x00{'descr'", "unreadable .npy header"),
    "strings": (npy(np.array(["ab", "cd"])), "is not numeric"),
}


# --- payloads that are not what they declare --------------------------------------------------


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_payload_that_differs_from_its_declared_fields_is_refused(lie: str) -> None:
    payload, reason = LIES[lie]
    problem = reply_problem(train_reply(5, arrays=lying(payload)), sent())
    assert problem is not None and reason in problem and problem.startswith("array 'w': ")


def test_a_serialisation_type_other_than_numpy_is_refused() -> None:
    arrays = lying(npy(np.zeros(2, np.float32)), stype="torch.Tensor")
    assert reply_problem(train_reply(5, arrays=arrays), sent()) == (
        "array 'w': serialisation type 'torch.Tensor', expected 'numpy.ndarray'")


def test_checked_view_reads_an_honest_payload_as_flower_does() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    for array in (Array(values), Array(np.asfortranarray(values)), Array(values[:, :0])):
        np.testing.assert_array_equal(checked_view(array), array.numpy())


def test_array_view_of_a_truncated_payload_says_so() -> None:
    # Before: numpy's own "buffer is smaller than requested size" from deep in aggregation.
    with pytest.raises(PayloadError, match="holds 5 value bytes, its header declares 8"):
        array_view(lying(npy(np.zeros(2, np.float32))[:-3])["w"])


@pytest.mark.parametrize("lie", ["shape", "dtype", "truncated", "object", "garbage"])
def test_a_lying_payload_is_left_out_of_the_average(lie: str) -> None:
    # Before the guard each of these passed the declared-field checks and crashed
    # aggregate_train (numpy ValueError, Flower's np.load of an object array, a shape clash).
    strategy = FedAvg(min_available_nodes=1)
    strategy.sent_arrays = sent()
    replies = [train_reply(1, (3.0, 4.0), **{"partition-id": 0}),
               train_reply(2, (1.0, 2.0), **{"partition-id": 1}),
               train_reply(3, arrays=lying(LIES[lie][0]), **{"partition-id": 2})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 3.0])  # (3+1)/2, (4+2)/2
    assert metrics["num-clients"] == 2
    assert strategy.last_faults["clients_rejected"] == 1
    assert strategy.last_faults["rejected"][0]["node"] == 3


# --- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "reason"), [
    (math.inf, "num-examples is inf, expected a number > 0"),
    (-math.inf, "num-examples is -inf, expected a number > 0"),
    ([10], "num-examples is [10], expected a number > 0"),
    (0.0, "num-examples is 0.0, expected a number > 0"),
])
def test_an_impossible_example_count_is_refused(count: object, reason: str) -> None:
    # inf passed "> 0" and then int(sum(...)) raised OverflowError in train_metrics.
    assert reply_problem(train_reply(5, **{"num-examples": count}), sent()) == reason


def test_an_infinite_example_count_is_left_out_instead_of_ending_the_round() -> None:
    strategy = FedAvg(min_available_nodes=1)
    strategy.sent_arrays = sent()
    arrays, metrics = strategy.aggregate_train(
        1, [train_reply(1, (3.0, 4.0)), train_reply(2, (5.0, 6.0), **{"num-examples": math.inf})])
    np.testing.assert_array_equal(arrays["w"].numpy(), [3.0, 4.0])
    assert metrics["num-examples"] == 10


@pytest.mark.parametrize(("pid", "reason"), [
    ([1], "partition-id is [1], expected a number"),
    (1.5, "partition-id is 1.5, expected a whole number"),
    (-1, "partition-id is -1, expected >= 0"),
])
def test_a_partition_id_that_is_not_a_whole_number_is_refused(pid: object, reason: str) -> None:
    assert reply_problem(train_reply(5, **{"partition-id": pid}), sent()) == reason


def test_a_list_valued_partition_id_no_longer_breaks_the_sort() -> None:
    # Before: sorting (list, node) against (int, node) raised TypeError and ended the run.
    strategy = FedAvg(min_available_nodes=1)
    strategy.sent_arrays = sent()
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, (3.0, 4.0), **{"partition-id": 0}),
                                             train_reply(2, (9.0, 9.0), **{"partition-id": [1]})])
    np.testing.assert_array_equal(arrays["w"].numpy(), [3.0, 4.0])


def test_a_nan_metric_is_refused() -> None:
    assert reply_problem(train_reply(5, **{"train-loss": math.nan}), sent()) == \
        "metric 'train-loss' holds NaN or inf"


def test_a_list_valued_scalar_metric_is_refused_where_it_is_read_as_a_number() -> None:
    reply = train_reply(5, **{"merged-accuracy": [0.5, 0.7]})
    assert model_problem(reply, sent()) is None  # an unread list is harmless
    assert model_problem(reply, sent(), scalars=("merged-accuracy",)) == \
        "merged-accuracy is [0.5, 0.7], expected a number"
    assert model_problem(train_reply(5), sent(), required=("align-seconds",)) == \
        "metrics lack 'align-seconds'"


# --- example counts against what the node holds ------------------------------------------------


class LimitGrid:
    """What a strategy reads from FedwaGrid: partitions and the handshake's example counts."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.sizes = sizes
        self.partition_of = {node: i for i, node in enumerate(sorted(sizes))}

    def example_limit(self, node: int) -> int | None:
        return self.sizes.get(node)


def test_count_problem_caps_by_the_handshake() -> None:
    assert count_problem(10, 10) is None
    assert count_problem(11, 10) == ("num-examples is 11, more than the 10 examples the node "
                                     "reported at the handshake")
    assert count_problem(1e12, None) is None  # nothing known: only finiteness


def test_a_client_claiming_more_examples_than_it_holds_cannot_dictate_the_average() -> None:
    strategy = FedAvg(min_available_nodes=1)
    strategy.sent_arrays = sent()
    strategy.grid = LimitGrid({1: 10, 2: 10, 3: 10})
    replies = [train_reply(1, (3.0, 4.0)), train_reply(2, (1.0, 2.0)),
               train_reply(3, (100.0, 100.0), **{"num-examples": 10 ** 12})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Without the cap: (3*10 + 1*10 + 100*1e12) / (1e12 + 20) = 100.0 to 9 digits.
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 3.0])
    assert metrics["num-examples"] == 20
    (rejected,) = strategy.last_faults["rejected"]
    assert rejected["node"] == 3 and "more than the 10 examples" in rejected["reason"]


def evaluate_reply(node: int, accuracy: float, examples: object) -> Message:
    return answer(node, RecordDict({"metrics": MetricRecord(
        {"num-examples": examples, "local-accuracy": accuracy})}), MessageType.EVALUATE)


def test_inflated_evaluation_counts_cannot_raise_the_reported_client_accuracy() -> None:
    strategy = FedAvg(min_available_nodes=1)
    strategy.grid = LimitGrid({1: 10, 2: 10, 3: 10})
    metrics = strategy.aggregate_evaluate(1, [evaluate_reply(1, 0.2, 10),
                                              evaluate_reply(2, 0.4, 10),
                                              evaluate_reply(3, 0.9, 10 ** 6)])
    # Without the cap: (0.2*10 + 0.4*10 + 0.9*1e6) / (1e6 + 20) = 0.89999.
    assert metrics["local-accuracy"] == pytest.approx(0.3)
    assert [n for n, _ in strategy.last_evaluate_rejected] == [3]


def test_a_nan_client_evaluation_is_left_out() -> None:
    strategy = FedAvg(min_available_nodes=1)
    metrics = strategy.aggregate_evaluate(1, [evaluate_reply(1, 0.2, 10),
                                              evaluate_reply(2, math.nan, 10)])
    assert metrics["local-accuracy"] == pytest.approx(0.2)


# --- the handshake ------------------------------------------------------------------------------


def info(pid: object = 0, examples: object = 3, counts: object = (1, 2), **extra: object
         ) -> RecordDict:
    entries = {"num-examples": examples, "class-counts": list(counts), **extra}
    if pid is not None:
        entries["partition-id"] = pid
    return RecordDict({"info": MetricRecord(entries)})


class InnerGrid:
    """Flower's Grid as FedwaGrid sees it: nodes that answer through ``respond``."""

    def __init__(self, handshakes: dict[int, RecordDict], respond=None) -> None:  # noqa: ANN001
        self.handshakes, self.respond = handshakes, respond

    def get_node_ids(self) -> list[int]:
        return list(self.handshakes)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            if m.metadata.message_type == MessageType.QUERY:
                out.append(Message(self.handshakes[node], reply_to=m))
            else:
                out.append(Message(self.respond(node, m), reply_to=m))
        return out


@pytest.mark.parametrize(("bad", "reason"), [
    (info(pid=None), "handshake lacks 'partition-id'"),
    (info(pid=[1]), "partition-id is [1], expected a number"),
    (info(pid=7), "partition-id is 7, expected at most 2"),
    (info(pid=1, examples=math.inf), "num-examples is inf, expected a number > 0"),
    (info(pid=1, examples=4), "class-counts add up to 3, num-examples is 4"),
    (info(pid=1, examples=10 ** 12, counts=(10 ** 12, 0)),
     "num-examples 1e+12 + test-examples 0 is more than partition 1's 5 examples"),
    (RecordDict({"metrics": MetricRecord({"partition-id": 1})}), "handshake lacks 'info'"),
    (info(pid=1, examples=3, counts=(1, 1, 1)), "class-counts has 3 entries, expected 2"),
], ids=["no-partition-id", "list-partition-id", "out-of-range", "inf-count", "counts-differ",
        "more-than-partition", "no-info", "class-count-length"])
def test_a_bad_handshake_leaves_its_node_out(bad: RecordDict, reason: str) -> None:
    # Before: info["partition-id"] raised KeyError (or int() a TypeError) and ended the run.
    grid = FedwaGrid(InnerGrid({11: info(0), 12: bad, 13: info(2)}), {"num-clients": 3},
                     partition_sizes=[5, 5, 5], num_classes=2)
    assert grid.get_node_ids() == [11, 13]
    assert grid.rejected_nodes == {12: reason}
    assert grid.example_limit(11) == 3 and grid.example_limit(12) is None
    assert grid.take_traffic().rejected == [{"what": "handshake", "node": 12, "reason": reason}]
    assert grid.get_node_ids() == [11, 13]  # a refused node is not asked again


def test_a_node_with_its_own_data_is_not_held_to_the_servers_partition() -> None:
    own = info(pid=1, examples=50, counts=(20, 30), **{"own-data": 1})
    assert handshake_problem(Message(own, reply_to=Message(RecordDict(), 12, MessageType.QUERY)),
                             3, partition_size=lambda pid: 5) is None


def test_too_few_usable_handshakes_stop_with_a_clear_error() -> None:
    grid = FedwaGrid(InnerGrid({11: info(0), 12: info(pid=None)}),
                     {"num-clients": 2, "min-available-clients": 2})
    with pytest.raises(TooFewRepliesError, match=r"handshake: only 1 of 2 nodes sent a usable "
                       r"handshake; min-available-clients is 2 \(node 12: handshake lacks"):
        grid.get_node_ids()


def test_two_nodes_claiming_one_partition_stop_the_run_naming_both() -> None:
    # Before: the node with the larger id was left out and the run went on; a rogue node
    # with a smaller random id would have kept the partition and been averaged in instead.
    grid = FedwaGrid(InnerGrid({11: info(0), 12: info(1), 13: info(0)}), {"num-clients": 3},
                     partition_sizes=[5, 5, 5], num_classes=2)
    with pytest.raises(UntrustedNodesError, match=r"^nodes 11, 13 all claim partition-id 0: "
                       r"two SuperNodes cannot hold one partition"):
        grid.get_node_ids()


def test_a_node_joining_later_on_a_held_partition_stops_the_run() -> None:
    nodes = {11: info(0), 12: info(1)}
    grid = FedwaGrid(InnerGrid(nodes), {"num-clients": 3}, partition_sizes=[5, 5, 5],
                     num_classes=2)
    assert grid.get_node_ids() == [11, 12]
    nodes[13] = info(1)  # a third node, within num-clients, claims node 12's partition
    with pytest.raises(UntrustedNodesError, match=r"^nodes 12, 13 all claim partition-id 1"):
        grid.get_node_ids()


def test_more_nodes_than_num_clients_stop_the_run_naming_them() -> None:
    # The rogue-SuperNode finding: 3 nodes sampled in a num-clients = 2 run.
    grid = FedwaGrid(InnerGrid({11: info(0), 12: info(1), 13: info(1)}), {"num-clients": 2})
    with pytest.raises(UntrustedNodesError, match=r"^3 nodes are connected and num-clients is "
                       r"2: a node this run does not expect joined \(node ids 11, 12, 13\)"):
        grid.get_node_ids()
    assert grid.partition_of == {}  # refused before anything was asked or sampled


def test_round_one_does_not_wait_for_a_refused_node() -> None:
    # Round 1 waits for num-clients nodes; a refused one never comes, so it must not count.
    grid = FedwaGrid(InnerGrid({11: info(0), 12: info(pid=None), 13: info(2)}),
                     {"num-clients": 3})
    strategy = FedAvg(min_available_nodes=3, run_config={"num-clients": 3,
                                                         "min-available-clients": 1})
    messages = strategy.configure_train(1, sent(), ConfigRecord({}), grid)
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 13]


# --- BatchNorm moments --------------------------------------------------------------------------


def bn_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def moments(count: float, total: object, squares: object, examples: object = None
            ) -> RecordDict:
    arrays = ArrayRecord({"count": Array(np.array([count], np.float64)),
                          "sum": Array(np.asarray(total, np.float64)),
                          "sumsq": Array(np.asarray(squares, np.float64))})
    return RecordDict({"moments": arrays, "metrics": MetricRecord(
        {"num-examples": count if examples is None else examples})})


# Node 11's layer inputs: channel 0 = (1, 3), channel 1 = (0, 2); node 12's: (5, 7), (2, 2).
HONEST = {11: moments(2, [4, 2], [10, 4]), 12: moments(2, [12, 4], [74, 8])}


def run_bn(bad: RecordDict | None) -> tuple[torch.nn.Module, FedwaGrid]:
    """Federated BN recomputation over nodes 11 and 12 (honest, 2 examples each) and 13."""
    answers = {**HONEST, **({13: bad} if bad is not None else {})}
    handshakes = {node: info(i, examples=2, counts=(2,)) for i, node in enumerate(answers)}
    grid = FedwaGrid(InnerGrid(handshakes, lambda node, m: answers[node]),
                     {"num-clients": len(answers)})
    model = bn_model()
    recompute_bn_federated(grid, model, input_shape=(3,))
    return model, grid


@pytest.mark.parametrize(("bad", "reason"), [
    (moments(2, [np.nan, 0], [1, 1]), "moment 'sum' holds NaN or inf"),
    (moments(2, [0, 0], [np.inf, 1]), "moment 'sumsq' holds NaN or inf"),
    (moments(1e12, [0, 0], [1, 1], examples=2), "moment count is 1e+12, expected "
     "num-examples x 1 values per channel = 2"),
    (moments(1e12, [0, 0], [1, 1]), "num-examples is 1000000000000.0, more than the 2"),
    (moments(2, [0, 0, 0], [1, 1, 1]), "moment 'sum' has shape (3,), expected (2,)"),
    (moments(2, [4, 0], [1, 1]), "a negative variance"),
    (RecordDict({"moments": ArrayRecord({"count": Array(np.ones(1))})}),
     "reply lacks 'moments' or 'metrics'"),
], ids=["nan-sum", "inf-sumsq", "count-vs-examples", "count-above-partition", "channels",
        "negative-variance", "no-metrics"])
def test_bad_batchnorm_moments_are_left_out_of_the_pooled_statistics(
        bad: RecordDict, reason: str) -> None:
    # Before: a NaN sum went straight into the running statistics (a "completed" run with NaN
    # in model.pt); an inflated count dragged every channel's mean towards the liar's.
    model, grid = run_bn(bad)
    bn = model[1]
    # Pooled by hand: channel 0 = (1, 3, 5, 7): mean 4, variance (9+1+1+9)/4 = 5;
    # channel 1 = (0, 2, 2, 2): mean 1.5, variance (2.25 + 3 * 0.25)/4 = 0.75.
    torch.testing.assert_close(bn.running_mean, torch.tensor([4.0, 1.5]))
    torch.testing.assert_close(bn.running_var, torch.tensor([5.0, 0.75]))
    (rejected,) = grid.take_traffic().rejected
    assert rejected["node"] == 13 and reason in rejected["reason"]
    assert rejected["what"] == "BN statistics of 1"


def test_no_usable_moments_at_all_stop_with_the_reasons() -> None:
    nan = moments(2, [np.nan, 0], [1, 1])
    grid = FedwaGrid(InnerGrid({11: info(0, 2, (2,))}, lambda node, m: nan), {"num-clients": 1})
    with pytest.raises(AllClientsFailedError, match="no node returned usable BatchNorm "
                       "statistics for 1 .node 11: moment 'sum' holds NaN"):
        recompute_bn_federated(grid, bn_model(), input_shape=(3,))


def test_values_per_example_after_a_convolution_is_its_height_times_width() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    assert values_per_example(model, "1", (1, 8, 6)) == 6 * 4  # (8-2) x (6-2)
    assert model.training  # the pass leaves the mode as it was


def test_moments_without_input_shape_still_need_a_whole_multiple() -> None:
    reply = Message(moments(3, [0, 0], [1, 1], examples=2),
                    reply_to=Message(RecordDict(), 5, MessageType.QUERY))
    assert moments_problem(reply, 2) == "moment count 3 is not a whole multiple of " \
                                        "num-examples 2"
    assert moments_problem(reply, 2, positions=None) is not None


# --- federated evaluation and kept models -------------------------------------------------------


def held_out(total: object, correct: object, examples: object = None, loss: float = 1.0
             ) -> Message:
    total = list(total)
    return answer(5, RecordDict({"metrics": MetricRecord({
        "num-examples": sum(total) if examples is None else examples, "class-total": total,
        "class-correct": list(correct), "loss-sum": loss})}), MessageType.EVALUATE)


@pytest.mark.parametrize(("reply", "reason"), [
    (lambda: held_out([5, 5], [5, 6]), "class-correct exceeds class-total"),
    (lambda: held_out([5, 5], [5, 5], examples=9),
     "class-total adds up to 10, num-examples is 9"),
    (lambda: held_out([5, 5], [5]), "class-correct has 1 entries, expected 2"),
    (lambda: held_out([5, -5], [0, 0], examples=5), "class-total[1] is -5, expected >= 0"),
    (lambda: held_out([5, 5], [5, 5], loss=math.nan), "metric 'loss-sum' holds NaN or inf"),
    (lambda: held_out([500, 500], [500, 500]), "num-examples is 1000, more than the 10"),
], ids=["correct-above-total", "total-vs-examples", "length", "negative", "nan-loss",
        "inflated"])
def test_federated_evaluation_counts_that_cannot_be_true_are_refused(
        reply, reason: str) -> None:  # noqa: ANN001 - builds the Message inside the test
    problem = held_out_problem(reply(), 2, limit=10)
    assert problem is not None and reason in problem
    assert held_out_problem(held_out([5, 5], [4, 5]), 2, limit=10) is None


def test_a_kept_model_with_a_bad_payload_is_not_checkpointed() -> None:
    good = RecordDict({"arrays": record(w=np.ones(2, np.float32))})
    bad = RecordDict({"arrays": lying(LIES["truncated"][0])})
    nan = RecordDict({"arrays": record(w=np.array([np.nan], np.float32))})
    grid = FedwaGrid(InnerGrid({11: info(0), 12: info(1), 13: info(2)},
                               lambda node, m: {11: good, 12: bad, 13: nan}[node]),
                     {"num-clients": 3})
    grid.get_node_ids()
    models = fetch_client_models(grid, timeout=5)
    assert list(models) == [0]
    torch.testing.assert_close(models[0]["w"], torch.ones(2))
    assert [r["node"] for r in grid.take_traffic().rejected] == [12, 13]


def test_a_check_that_raises_leaves_the_reply_out_instead_of_ending_the_run() -> None:
    def broken(reply: Message) -> str | None:
        raise KeyError("x")

    usable, rejected = screen([train_reply(3)], broken, "test")
    assert usable == [] and rejected == [(3, "reply could not be checked (KeyError: 'x')")]


def test_partial_averaging_clients_may_count_the_whole_test_set() -> None:
    # Their kept models are evaluated on the balanced test set, larger than a partition: the
    # cap is the test set's size, not the handshake's training count.
    from fedwa.run.config import resolve_config
    from fedwa.data.task import federated_data
    from strategies import build_strategy

    config = resolve_config({"strategy": "partial", "num-clients": 10})
    strategy = build_strategy(config)
    strategy.grid = LimitGrid({1: 5, 2: 5})
    test_size = len(federated_data(config).test_data()[1])
    assert test_size > 5
    metrics = strategy.aggregate_evaluate(3, [evaluate_reply(1, 0.5, test_size),
                                              evaluate_reply(2, 0.9, test_size + 1)])
    assert metrics["local-accuracy"] == 0.5
    assert [n for n, _ in strategy.last_evaluate_rejected] == [2]
