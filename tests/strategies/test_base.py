"""The reply guard, dtype matching and screening of FedwaStrategy, with real Flower messages."""

import random

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID

from fedwa.common.errors import AllClientsFailedError
from strategies import FedAvg
from strategies.base import match_dtypes, reply_problem


def record(**arrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def sent() -> ArrayRecord:
    return record(w=np.array([1.0, 2.0], dtype=np.float32), n=np.array(4, dtype=np.int64))


def instruction(node_id: int) -> Message:
    return Message(RecordDict({"arrays": sent(), "config": ConfigRecord({"server-round": 1})}),
                   node_id, MessageType.TRAIN)


def reply(node_id: int, arrays: ArrayRecord | None = None, **metrics) -> Message:
    content = {"metrics": MetricRecord({"num-examples": 10, **metrics})}
    if arrays is not None:
        content["arrays"] = arrays
    return Message(RecordDict(content), reply_to=instruction(node_id))


def good(node_id: int, pid: int | None = None, **metrics) -> Message:
    if pid is not None:
        metrics["partition-id"] = pid
    arrays = record(w=np.array([3.0, 4.0], dtype=np.float32), n=np.array(5, dtype=np.int64))
    return reply(node_id, arrays, **metrics)


def error_reply(node_id: int, reason: str = "boom") -> Message:
    return Message(Error(code=0, reason=reason), reply_to=instruction(node_id))


# --- reply_problem ---------------------------------------------------------------------------


def test_reply_metadata_points_back_to_the_node():
    msg = good(17)
    assert msg.metadata.src_node_id == 17
    assert msg.metadata.dst_node_id == SUPERLINK_NODE_ID


def test_good_reply_is_fine():
    assert reply_problem(good(1), sent()) is None
    assert reply_problem(good(1), None) is None


def test_error_reply():
    assert reply_problem(error_reply(1), sent()) == "client error: boom"


def test_error_reply_keeps_last_traceback_line():
    reason = "Traceback (most recent call last):\n  File x\nValueError: bad data\n"
    assert reply_problem(error_reply(1, reason), sent()) == "client error: ValueError: bad data"


def test_error_reply_without_reason():
    assert reply_problem(error_reply(1, "  "), sent()) == "client error: no reason given"


def test_missing_arrays():
    assert reply_problem(reply(1, None), sent()) == "reply lacks 'arrays' or 'metrics'"


def test_missing_metrics():
    msg = Message(RecordDict({"arrays": sent()}), reply_to=instruction(1))
    assert reply_problem(msg, sent()) == "reply lacks 'arrays' or 'metrics'"


def test_zero_examples():
    problem = reply_problem(reply(1, sent(), **{"num-examples": 0}), sent())
    assert problem == "num-examples is 0, expected a number > 0"


def test_no_example_count():
    msg = Message(RecordDict({"arrays": sent(), "metrics": MetricRecord({"train-loss": 1.0})}),
                  reply_to=instruction(1))
    assert reply_problem(msg, sent()) == "num-examples is None, expected a number > 0"


def test_wrong_names():
    arrays = record(v=np.array([3.0, 4.0], dtype=np.float32), n=np.array(5))
    assert reply_problem(reply(1, arrays), sent()) == \
        "its array names differ from the model sent (missing ['w'], extra ['v'])"


def test_missing_array():
    arrays = record(w=np.array([3.0, 4.0], dtype=np.float32))
    assert reply_problem(reply(1, arrays), sent()) == \
        "its array names differ from the model sent (missing ['n'], extra [])"


def test_wrong_shape():
    arrays = record(w=np.array([3.0, 4.0, 5.0], dtype=np.float32), n=np.array(5))
    assert reply_problem(reply(1, arrays), sent()) == \
        "array 'w' has shape (3,), expected (2,)"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_array(bad):
    arrays = record(w=np.array([3.0, bad], dtype=np.float32), n=np.array(5))
    assert reply_problem(reply(1, arrays), sent()) == "array 'w' holds NaN or inf"
    # Also caught when there is no model to compare with.
    assert reply_problem(reply(1, arrays), None) == "array 'w' holds NaN or inf"


# --- match_dtypes ----------------------------------------------------------------------------


def test_float64_back_to_float32():
    out = match_dtypes(record(w=np.array([0.1, 2.5], dtype=np.float64)),
                       record(w=np.zeros(2, dtype=np.float32)))
    values = out["w"].numpy()
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, np.array([0.1, 2.5], dtype=np.float32))


def test_float_back_to_int64_rounded():
    out = match_dtypes(record(n=np.array([1.6, 2.4, 7.0, -0.7])),
                       record(n=np.zeros(4, dtype=np.int64)))
    values = out["n"].numpy()
    assert values.dtype == np.int64
    assert values.tolist() == [2, 2, 7, -1]


def test_zero_d_float_stays_zero_d():
    out = match_dtypes(record(s=np.array(2.5, dtype=np.float64)),
                       record(s=np.array(0.0, dtype=np.float32)))
    values = out["s"].numpy()
    assert values.shape == () and values.dtype == np.float32 and values == 2.5


def test_zero_d_same_dtype_stays_zero_d():
    out = match_dtypes(record(n=np.array(7, dtype=np.int64)),
                       record(n=np.array(0, dtype=np.int64)))
    assert out["n"].numpy().shape == () and out["n"].numpy() == 7


def test_zero_d_float_back_to_int_stays_zero_d():
    # 13.5 -> rint -> 14 (round half to even)
    out = match_dtypes(record(n=np.array(13.5)), record(n=np.array(0, dtype=np.int64)))
    values = out["n"].numpy()
    assert values.shape == () and values.dtype == np.int64 and values == 14


def test_match_dtypes_keeps_names_and_unknown_arrays():
    out = match_dtypes(record(b=np.array([1.0]), a=np.array([2.0])),
                       record(a=np.zeros(1, dtype=np.float32)))
    assert list(out.keys()) == ["b", "a"]
    assert out["b"].numpy().dtype == np.float64  # nothing to match: unchanged
    assert out["a"].numpy().dtype == np.float32


# --- screen_replies --------------------------------------------------------------------------


def strategy() -> FedAvg:
    s = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
               min_evaluate_nodes=0, min_available_nodes=1)
    s.sent_arrays = sent()
    return s


def test_screen_drops_bad_replies_and_sorts_by_partition():
    s = strategy()
    nan = record(w=np.array([np.nan, 0.0], dtype=np.float32), n=np.array(5))
    replies = [good(11, pid=2), error_reply(12), reply(13, nan, **{"partition-id": 3}),
               good(14, pid=0), good(15, pid=1)]
    usable = s.screen_replies(4, replies)
    assert [r.metadata.src_node_id for r in usable] == [14, 15, 11]
    assert s.last_failures == [(12, "client error: boom"), (13, "array 'w' holds NaN or inf")]


def test_screen_ties_broken_by_node_id():
    usable = strategy().screen_replies(1, [good(30, pid=1), good(20, pid=1), good(25)])
    # no partition-id counts as 0
    assert [r.metadata.src_node_id for r in usable] == [25, 20, 30]


def test_screen_resets_failures_each_round():
    s = strategy()
    s.screen_replies(1, [good(1), error_reply(2)])
    assert [n for n, _ in s.last_failures] == [2]
    s.screen_replies(2, [good(1), good(2)])
    assert s.last_failures == []


def test_all_bad_raises_with_round():
    s = strategy()
    with pytest.raises(AllClientsFailedError) as info:
        s.screen_replies(7, [error_reply(12), reply(13, None)])
    message = str(info.value)
    assert "round 7" in message
    assert "none of the 2 sampled clients" in message
    assert "node 12: client error: boom" in message
    assert "node 13: reply lacks 'arrays' or 'metrics'" in message
    assert [n for n, _ in s.last_failures] == [12, 13]


def test_no_replies_raises():
    with pytest.raises(AllClientsFailedError, match=r"round 3: .*\(no replies\)"):
        strategy().screen_replies(3, [])


def test_aggregate_train_raises_when_all_fail():
    with pytest.raises(AllClientsFailedError, match="round 2"):
        strategy().aggregate_train(2, [error_reply(1)])


# --- configure_train -------------------------------------------------------------------------


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def sampled(seed: int, server_round: int, noise: int) -> list[int]:
    s = FedAvg(fraction_train=0.3, fraction_evaluate=0.0, min_train_nodes=1,
               min_evaluate_nodes=0, min_available_nodes=1, seed=seed)
    random.seed(noise)  # whatever state the global generator is in, the sample is the same
    messages = s.configure_train(server_round, sent(), ConfigRecord({}), FakeGrid(range(1, 11)))
    assert s.sent_arrays is not None and list(s.sent_arrays.keys()) == ["w", "n"]
    return [m.metadata.dst_node_id for m in messages]


def test_configure_train_sampling_is_seeded_and_records_sent_arrays():
    state = random.getstate()
    try:
        first = sampled(seed=3, server_round=2, noise=1)
        assert len(first) == 3  # int(0.3 * 10) nodes
        assert set(first) <= set(range(1, 11))
        assert sampled(seed=3, server_round=2, noise=999) == first
    finally:
        random.setstate(state)
