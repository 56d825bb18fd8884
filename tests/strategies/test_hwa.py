"""HWA: the synchronisation period sent to clients and the offline window average."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedwa.run.config import resolve_config
from strategies import HWA, build_strategy


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def record(w, n) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32)),
                        "n": Array(np.asarray(n, dtype=np.int64))})


SENT = ([0.0, 0.0], 0)


def reply(node_id: int, w, n, examples: int, pid: int) -> Message:
    instruction = Message(RecordDict({"arrays": record(*SENT),
                                      "config": ConfigRecord({"server-round": 1})}),
                          node_id, MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": examples, "train-loss": 0.5, "partition-id": pid})
    return Message(RecordDict({"arrays": record(w, n), "metrics": metrics}),
                   reply_to=instruction)


# Clients A (1 example) and B (3 examples); aggregate (A + 3 B) / 4:
#   round 1: A [0, 0], B [4, 8] -> [12, 24] / 4          = [3, 6]
#   round 2: A [4, 4], B [0, 0] -> [4, 4] / 4            = [1, 1]
#   round 3: A [2, 6], B [2, 2] -> ([2, 6] + [6, 6]) / 4 = [2, 3]
# counters: A 10 r, B 10 r + 1 -> max 10 r + 1
CLIENTS = {1: ([0.0, 0.0], [4.0, 8.0]), 2: ([4.0, 4.0], [0.0, 0.0]), 3: ([2.0, 6.0], [2.0, 2.0])}


def run_round(strategy, server_round: int) -> ArrayRecord:
    strategy.sent_arrays = record(*SENT)
    a, b = CLIENTS[server_round]
    replies = [reply(21, a, 10 * server_round, examples=1, pid=0),
               reply(22, b, 10 * server_round + 1, examples=3, pid=1)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays


def values(arrays: ArrayRecord) -> tuple[list[float], int]:
    return arrays["w"].numpy().tolist(), int(arrays["n"].numpy())


def hwa(**overrides) -> HWA:
    config = resolve_config({"strategy": "hwa", "num-clients": 2, "hwa-window": 2,
                             "num-server-rounds": 3, "local-steps": 21, "hwa-sync-steps": 7,
                             **overrides})
    strategy = build_strategy(config)
    assert type(strategy) is HWA
    return strategy


def test_sync_steps_go_into_every_train_message():
    s = hwa()
    messages = list(s.configure_train(1, record(*SENT), ConfigRecord({}), FakeGrid([1, 2])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    for m in messages:
        assert m.metadata.message_type == MessageType.TRAIN
        config = m.content["config"]
        assert config["local-steps"] == 7
        assert config["server-round"] == 1
    assert values(s.sent_arrays) == ([0.0, 0.0], 0)


def test_sync_period_at_a_fixed_total_of_local_steps():
    # 3 rounds x 21 local steps = 63 steps per client; H = 7 -> 63 / 7 = 9 syncs of 7 steps:
    # three times as many averages for the same local compute.
    s = hwa()
    assert s.total_rounds() == 9
    assert sum(s.lengths) == 3 * 21
    for r in (1, 5, 9):
        (m, *_) = s.configure_train(r, record(*SENT), ConfigRecord({}), FakeGrid([1, 2]))
        config = m.content["config"]
        assert config["local-steps"] == 7
        # the lr schedule follows the budget: sync r covers steps 7 (r - 1) .. 7 r of 63
        assert config["progress-start"] == pytest.approx(7 * (r - 1) / 63)
        assert config["progress-end"] == pytest.approx(7 * r / 63)


def test_last_sync_takes_the_remainder():
    # 5 rounds x 5 steps = 25 steps; H = 10 -> syncs of 10, 10 and 5 steps
    s = hwa(**{"num-server-rounds": 5, "local-steps": 5, "hwa-sync-steps": 10})
    assert s.lengths == [10, 10, 5] and s.total_rounds() == 3
    (m, *_) = s.configure_train(3, record(*SENT), ConfigRecord({}), FakeGrid([1, 2]))
    config = m.content["config"]
    assert config["local-steps"] == 5
    assert (config["progress-start"], config["progress-end"]) == (0.8, 1.0)


def test_sync_steps_need_a_step_budget():
    from fedwa.common.errors import ConfigError

    with pytest.raises(ConfigError, match="hwa-sync-steps") as info:
        hwa(**{"local-steps": 0})
    assert "local-steps" in info.value.allowed


def test_sync_lengths_by_hand():
    from strategies.hwa import sync_lengths

    assert sync_lengths(30, 10) == [10, 10, 10]
    assert sync_lengths(25, 10) == [10, 10, 5]
    assert sync_lengths(3, 10) == [3]
    with pytest.raises(ValueError):
        sync_lengths(0, 10)


def test_sync_steps_zero_leaves_the_local_budget_alone():
    s = hwa(**{"hwa-sync-steps": 0})
    assert s.total_rounds() == 3
    messages = list(s.configure_train(1, record(*SENT), ConfigRecord({}), FakeGrid([1, 2])))
    assert len(messages) == 2
    assert all("local-steps" not in m.content["config"] for m in messages)
    assert all("progress-start" not in m.content["config"] for m in messages)


def test_window_average_of_the_last_two_aggregates():
    s = hwa()
    assert list(s.models_to_evaluate(0, record(*SENT))) == ["global"]
    expected = {
        1: ([3.0, 6.0], 11),   # window [r1]: [3, 6]
        2: ([2.0, 3.5], 21),   # window [r1, r2]: ([3, 6] + [1, 1]) / 2 = [2, 3.5]
        3: ([1.5, 2.0], 31),   # window [r2, r3]: ([1, 1] + [2, 3]) / 2 = [1.5, 2]
    }
    aggregates = {1: [3.0, 6.0], 2: [1.0, 1.0], 3: [2.0, 3.0]}
    for r in (1, 2, 3):
        arrays = run_round(s, r)
        assert values(arrays) == (aggregates[r], 10 * r + 1)  # training continues from FedAvg
        models = s.models_to_evaluate(r, arrays)
        assert list(models) == ["hwa", "global"]
        assert values(models["hwa"]) == expected[r]  # counter: the newest aggregate's
        assert values(models["global"]) == (aggregates[r], 10 * r + 1)


def test_recomputes_bn_of_the_offline_average_only():
    assert HWA.recompute_bn == {"hwa"}


def test_state_dict_round_trip():
    s = hwa()
    for r in (1, 2):
        run_round(s, r)
    restored = hwa(**{"hwa-window": 5})  # the window size comes from the state
    restored.load_state_dict(s.state_dict())
    assert restored.average.size == 2
    for strategy in (s, restored):
        arrays = run_round(strategy, 3)
        assert values(strategy.models_to_evaluate(3, arrays)["hwa"]) == ([1.5, 2.0], 31)


def test_clients_keep_their_optimiser_by_default():
    # Local SGD learners: the round tells every client to continue its own optimiser, and
    # the checkpoint fetches that state with the nodes' other state.
    s = hwa()
    assert s.keeps_client_models
    (m, *_) = s.configure_train(1, record(*SENT), ConfigRecord({}), FakeGrid([1, 2]))
    assert m.content["config"]["keep-optimizer-state"] is True
    fresh = hwa(**{"hwa-optimizer-state": "fresh"})
    assert not fresh.keeps_client_models
    (m, *_) = fresh.configure_train(1, record(*SENT), ConfigRecord({}), FakeGrid([1, 2]))
    assert "keep-optimizer-state" not in m.content["config"]
