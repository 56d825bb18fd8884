"""SWA and EMA: when averaging starts, what is averaged, what is evaluated, and checkpoints."""

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
from strategies import EMA, SWA, build_strategy


def record(w, n) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32)),
                        "n": Array(np.asarray(n, dtype=np.int64))})


SENT = ([0.0, 0.0], 0)  # a 0-d counter, like BatchNorm's num_batches_tracked


def reply(node_id: int, server_round: int, w, n, examples: int, pid: int) -> Message:
    instruction = Message(RecordDict({"arrays": record(*SENT),
                                      "config": ConfigRecord({"server-round": server_round})}),
                          node_id, MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": examples, "train-loss": 0.5, "partition-id": pid})
    return Message(RecordDict({"arrays": record(w, n), "metrics": metrics}),
                   reply_to=instruction)


# Two clients per round, weights 1 (A) and 3 (B); the aggregate is (A + 3 B) / 4.
#   round 1: A [0, 0], B [4, 8] -> (0 + [12, 24]) / 4 = [3, 6]
#   round 2: A [4, 4], B [0, 0] -> [4, 4] / 4         = [1, 1]
#   round 3: A [2, 6], B [2, 2] -> ([2, 6] + [6, 6]) / 4 = [2, 3]
#   round 4: A [8, 0], B [4, 4] -> ([8, 0] + [12, 12]) / 4 = [5, 3]
# Integer counter: A 10 r, B 10 r + 1 -> the aggregate takes the max, 10 r + 1.
CLIENTS = {1: ([0.0, 0.0], [4.0, 8.0]), 2: ([4.0, 4.0], [0.0, 0.0]),
           3: ([2.0, 6.0], [2.0, 2.0]), 4: ([8.0, 0.0], [4.0, 4.0])}
AGGREGATES = {1: [3.0, 6.0], 2: [1.0, 1.0], 3: [2.0, 3.0], 4: [5.0, 3.0]}


def round_replies(server_round: int) -> list[Message]:
    a, b = CLIENTS[server_round]
    return [reply(11, server_round, a, 10 * server_round, examples=1, pid=0),
            reply(12, server_round, b, 10 * server_round + 1, examples=3, pid=1)]


def run_round(strategy, server_round: int) -> ArrayRecord:
    strategy.sent_arrays = record(*SENT)  # what configure_train records
    arrays, metrics = strategy.aggregate_train(server_round, round_replies(server_round))
    assert metrics["num-examples"] == 4
    return arrays


def values(arrays: ArrayRecord) -> tuple[list[float], int]:
    return arrays["w"].numpy().tolist(), int(arrays["n"].numpy())


def swa_strategy() -> SWA:
    strategy = build_strategy(resolve_config({"strategy": "swa", "num-server-rounds": 4}))
    assert type(strategy) is SWA
    return strategy


# --- SWA ---------------------------------------------------------------------------------------


def test_swa_starts_in_the_second_half():
    assert swa_strategy().start_round == 3  # 4 // 2 + 1
    config = resolve_config({"strategy": "swa", "num-server-rounds": 9})
    assert SWA.from_config(config).start_round == 5  # 9 // 2 + 1
    config = resolve_config({"strategy": "swa", "num-server-rounds": 9, "swa-start-round": 2})
    assert SWA.from_config(config).start_round == 2


def test_swa_recomputes_bn_of_the_average_only():
    assert SWA.recompute_bn == {"swa"}


def test_swa_evaluates_global_until_averaging_then_the_mean():
    s = swa_strategy()
    for r in (1, 2):
        arrays = run_round(s, r)
        assert values(arrays) == (AGGREGATES[r], 10 * r + 1)  # the training model is FedAvg's
        models = s.models_to_evaluate(r, arrays)
        assert list(models) == ["global"]
        assert models["global"] is arrays

    arrays = run_round(s, 3)
    models = s.models_to_evaluate(3, arrays)
    assert list(models) == ["swa", "global"]  # the average is the main model
    assert values(models["swa"]) == ([2.0, 3.0], 31)  # only round 3 so far
    assert values(models["global"]) == ([2.0, 3.0], 31)
    after_round_3 = models["swa"]

    arrays = run_round(s, 4)
    assert values(arrays) == ([5.0, 3.0], 41)  # training goes on from the plain aggregate
    models = s.models_to_evaluate(4, arrays)
    assert list(models) == ["swa", "global"]
    # ([2, 3] + [5, 3]) / 2 = [3.5, 3]; the counter keeps the latest (41)
    assert values(models["swa"]) == ([3.5, 3.0], 41)
    assert models["swa"]["w"].numpy().dtype == np.float32
    assert models["swa"]["n"].numpy().dtype == np.int64
    assert values(models["global"]) == ([5.0, 3.0], 41)
    # What was handed out after round 3 is a copy, not a view of the running average.
    assert values(after_round_3) == ([2.0, 3.0], 31)


def test_swa_state_dict_round_trip():
    s = swa_strategy()
    for r in (1, 2, 3):
        run_round(s, r)
    restored = swa_strategy()
    restored.load_state_dict(s.state_dict())
    assert restored.average.count == 1
    for strategy in (s, restored):
        arrays = run_round(strategy, 4)
        assert values(strategy.models_to_evaluate(4, arrays)["swa"]) == ([3.5, 3.0], 41)


def test_swa_fresh_state_round_trip_evaluates_global():
    restored = swa_strategy()
    restored.load_state_dict(swa_strategy().state_dict())
    arrays = record([1.0, 1.0], [1])
    assert list(restored.models_to_evaluate(1, arrays)) == ["global"]


# --- EMA ---------------------------------------------------------------------------------------


def ema_strategy() -> EMA:
    config = resolve_config({"strategy": "ema", "ema-decay": 0.5, "num-server-rounds": 3})
    strategy = build_strategy(config)
    assert type(strategy) is EMA
    return strategy


def test_ema_recomputes_bn_of_the_average_only():
    assert EMA.recompute_bn == {"ema"}


def test_ema_of_three_rounds_by_hand():
    s = ema_strategy()
    # Round 1 starts the EMA: v1 = [3, 6]
    arrays = run_round(s, 1)
    models = s.models_to_evaluate(1, arrays)
    assert list(models) == ["ema", "global"]
    assert values(models["ema"]) == ([3.0, 6.0], 11)
    # v2 = 0.5 [3, 6] + 0.5 [1, 1] = [2, 3.5]
    arrays = run_round(s, 2)
    assert values(s.models_to_evaluate(2, arrays)["ema"]) == ([2.0, 3.5], 21)
    # v3 = 0.5 [2, 3.5] + 0.5 [2, 3] = [2, 3.25]
    arrays = run_round(s, 3)
    models = s.models_to_evaluate(3, arrays)
    assert values(models["ema"]) == ([2.0, 3.25], 31)
    assert values(models["global"]) == ([2.0, 3.0], 31)


def test_ema_evaluates_global_before_any_round():
    arrays = record([1.0, 1.0], [1])
    assert list(ema_strategy().models_to_evaluate(0, arrays)) == ["global"]


def test_ema_state_dict_round_trip():
    s = ema_strategy()
    for r in (1, 2):
        run_round(s, r)
    saved = s.state_dict()
    restored = build_strategy(resolve_config({"strategy": "ema", "num-server-rounds": 3}))
    restored.load_state_dict(saved)
    assert restored.average.decay == 0.5  # from the state, not the default 0.9
    for strategy in (s, restored):
        arrays = run_round(strategy, 3)
        assert values(strategy.models_to_evaluate(3, arrays)["ema"]) == ([2.0, 3.25], 31)
