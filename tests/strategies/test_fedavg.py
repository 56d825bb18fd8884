"""fedwa's FedAvg: aggregate_train on hand-made replies."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedwa.run.config import resolve_config
from strategies import FedAvg, build_strategy


def record(w, n) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32)),
                        "n": Array(np.asarray(n, dtype=np.int64))})


GLOBAL_W, GLOBAL_N = [0.0, 0.0], [10]


def reply(node_id: int, w, n, examples: int, loss: float, pid: int) -> Message:
    instruction = Message(RecordDict({"arrays": record(GLOBAL_W, GLOBAL_N),
                                      "config": ConfigRecord({"server-round": 1})}),
                          node_id, MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": examples, "train-loss": loss, "partition-id": pid})
    return Message(RecordDict({"arrays": record(w, n), "metrics": metrics}),
                   reply_to=instruction)


def replies() -> list[Message]:
    return [
        reply(7, [5.0, 6.0], [12], examples=2, loss=0.2, pid=2),
        reply(5, [1.0, 2.0], [11], examples=1, loss=0.4, pid=0),
        reply(9, [np.nan, 1.0], [99], examples=100, loss=0.0, pid=3),  # must be ignored
        reply(6, [3.0, 4.0], [14], examples=1, loss=0.8, pid=1),
    ]


def new_strategy(cls=FedAvg) -> FedAvg:
    s = cls(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
            min_evaluate_nodes=0, min_available_nodes=1)
    s.sent_arrays = record(GLOBAL_W, GLOBAL_N)  # what configure_train records
    return s


def test_example_weighted_mean_ignores_nan_reply():
    s = new_strategy()
    arrays, metrics = s.aggregate_train(1, replies())
    # weights 1, 1, 2 (total 4):
    #   w = (1*[1, 2] + 1*[3, 4] + 2*[5, 6]) / 4 = [1 + 3 + 10, 2 + 4 + 12] / 4 = [3.5, 4.5]
    w = arrays["w"].numpy()
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, np.array([3.5, 4.5], dtype=np.float32))
    assert s.last_failures == [(9, "array 'w' holds NaN or inf")]
    # train-loss = (1*0.4 + 1*0.8 + 2*0.2) / 4 = 1.6 / 4 = 0.4
    assert metrics["train-loss"] == pytest.approx(0.4)
    assert metrics["num-examples"] == 4
    assert metrics["num-clients"] == 3


def test_integer_buffer_takes_max():
    arrays, _ = new_strategy().aggregate_train(1, replies())
    n = arrays["n"].numpy()
    # max(11, 14, 12) = 14 (the NaN reply's 99 is left out); the weighted mean would be 12.25
    assert n.dtype == np.int64
    assert n.tolist() == [14]


def test_array_names_in_model_order():
    arrays, _ = new_strategy().aggregate_train(1, replies())
    assert list(arrays.keys()) == ["w", "n"]


class UniformFedAvg(FedAvg):
    def client_weights(self, replies):
        return [1.0] * len(replies)


def test_client_weights_override_gives_uniform_mean():
    arrays, metrics = new_strategy(UniformFedAvg).aggregate_train(1, replies())
    # ([1, 2] + [3, 4] + [5, 6]) / 3 = [9, 12] / 3 = [3, 4]
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 4.0], rtol=1e-6)
    # The reported train loss stays example-weighted: 0.4
    assert metrics["train-loss"] == pytest.approx(0.4)


def test_client_weights_are_example_counts():
    s = new_strategy()
    usable = s.screen_replies(1, replies())
    assert s.client_weights(usable) == [1.0, 1.0, 2.0]  # partition order 0, 1, 2


def test_built_from_config_aggregates_the_same():
    s = build_strategy(resolve_config({"strategy": "fedavg", "num-clients": 3}))
    assert type(s) is FedAvg
    s.sent_arrays = record(GLOBAL_W, GLOBAL_N)
    arrays, _ = s.aggregate_train(1, replies())
    np.testing.assert_array_equal(arrays["w"].numpy(), np.array([3.5, 4.5], dtype=np.float32))
