"""Flower's robust aggregators by name: built from the run config, behind fedwa's guard, with
hand-worked aggregates of replies one of which is finite but wrong."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedwa.run.config import resolve_config
from fedwa.common.errors import ConfigError, TooFewRepliesError
from strategies import REGISTRY, Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, build_strategy


def reply(node: int, *w: float, examples: int = 10) -> Message:
    arrays = ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32))})
    metrics = MetricRecord({"num-examples": examples, "partition-id": node})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}),
                   reply_to=Message(RecordDict(), node + 100, MessageType.TRAIN))


def aggregate(name: str, replies: list[Message], **keys: object) -> np.ndarray:
    strategy = build_strategy(resolve_config({"strategy": name, "num-clients": len(replies),
                                              **keys}))
    shape = tuple(replies[0].content["arrays"]["w"].shape)
    strategy.sent_arrays = ArrayRecord({"w": Array(np.zeros(shape, np.float32))})
    arrays, _ = strategy.aggregate_train(1, replies)
    values = arrays["w"].numpy()
    assert values.dtype == np.float32  # the model's dtype, whatever numpy computed in
    return values


def test_the_robust_rules_are_registered_by_name() -> None:
    assert {n: REGISTRY[n] for n in ("fedmedian", "fedtrimmedavg", "krum", "bulyan")} == {
        "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "bulyan": Bulyan}


def test_their_parameters_come_from_config_keys() -> None:
    assert build_strategy(resolve_config({"strategy": "fedtrimmedavg",
                                          "trimmed-beta": 0.3})).beta == 0.3
    assert build_strategy(resolve_config({"strategy": "krum", "num-clients": 5,
                                          "krum-malicious": 1})).num_malicious_nodes == 1
    assert build_strategy(resolve_config({"strategy": "bulyan", "num-clients": 7,
                                          "bulyan-malicious": 1})).num_malicious_nodes == 1


@pytest.mark.parametrize(("keys", "match"), [
    ({"strategy": "fedtrimmedavg", "trimmed-beta": 0.5}, "'trimmed-beta' = 0.5 .* in \\[0, 0.5\\)"),
    ({"strategy": "krum", "num-clients": 4, "krum-malicious": 1},
     "'krum-malicious' = 1 .* 2f \\+ 3 <= the 4 clients"),
    ({"strategy": "bulyan", "num-clients": 6, "bulyan-malicious": 1},
     "'bulyan-malicious' = 1 .* 4f \\+ 3 <= the 6 clients"),
    ({"strategy": "krum", "krum-malicious": 0.5}, "a whole number"),
])
def test_settings_the_rule_cannot_honour_are_config_errors(keys: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_strategy(resolve_config(keys))


def test_fedmedian_is_the_coordinate_wise_median() -> None:
    replies = [reply(0, 1, 10), reply(1, 2, 20), reply(2, 100, -50)]
    np.testing.assert_array_equal(aggregate("fedmedian", replies), [2, 10])
    # FedAvg of the same replies (still whole: Flower's median pops the arrays it reads):
    # the third drags both coordinates ((1+2+100)/3, -20/3).
    fedavg = FedAvg(min_available_nodes=1)
    fedavg.sent_arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    np.testing.assert_allclose(fedavg.aggregate_train(1, replies)[0]["w"].numpy(),
                               [103 / 3, -20 / 3], rtol=1e-6)


def test_fedtrimmedavg_cuts_beta_at_each_end() -> None:
    # 5 replies, beta 0.2: one value cut at each end -> mean of (2, 3, 4) = 3.
    replies = [reply(i, v) for i, v in enumerate([4.0, 100.0, 2.0, 3.0, -70.0])]
    np.testing.assert_allclose(aggregate("fedtrimmedavg", replies, **{"trimmed-beta": 0.2}),
                               [3.0])


def test_krum_picks_the_reply_closest_to_its_nearest_others() -> None:
    # f = 0, n = 4: each reply's score is its squared distance to its 2 nearest others:
    # (0,0): 1 + 4 = 5; (1,0): 1 + 5 = 6; (0,2): 4 + 5 = 9; (10,10): 164 + 181.
    replies = [reply(0, 1, 0), reply(1, 0, 0), reply(2, 10, 10), reply(3, 0, 2)]
    np.testing.assert_array_equal(aggregate("krum", replies), [0, 0])


def test_bulyan_trims_around_the_median_of_the_krum_selection() -> None:
    # f = 1, n = 7: Multi-Krum keeps the 5 replies 0..4 (100 and 200 are far from all), their
    # median is 2, and the mean of the 3 values nearest it (1, 2, 3) is 2. FedAvg: 310 / 7.
    replies = [reply(i, v) for i, v in enumerate([3.0, 200.0, 0.0, 4.0, 1.0, 100.0, 2.0])]
    np.testing.assert_allclose(aggregate("bulyan", replies, **{"bulyan-malicious": 1}), [2.0])


def test_example_counts_do_not_weight_the_median() -> None:
    replies = [reply(0, 1.0, examples=1), reply(1, 2.0, examples=1),
               reply(2, 50.0, examples=1000)]
    np.testing.assert_array_equal(aggregate("fedmedian", replies), [2.0])


def test_a_malformed_reply_is_left_out_before_the_rule_sees_it() -> None:
    bad = reply(3, float("nan"), 0.0)
    replies = [reply(0, 1, 10), reply(1, 2, 20), reply(2, 3, 30), bad]
    strategy = build_strategy(resolve_config({"strategy": "fedmedian", "num-clients": 4}))
    strategy.sent_arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["w"].numpy(), [2, 20])
    assert [r["node"] for r in strategy.last_faults["rejected"]] == [103]


def test_too_few_usable_replies_for_the_rule_stop_the_round() -> None:
    # Flower's Bulyan would return None and keep the old model without a word.
    strategy = build_strategy(resolve_config({"strategy": "bulyan", "num-clients": 3}))
    strategy.sent_arrays = ArrayRecord({"w": Array(np.zeros(1, np.float32))})
    with pytest.raises(TooFewRepliesError, match="Bulyan needs 3 usable replies .4f \\+ 3, "
                       "f = 0., got 2 .node 102: array 'w' holds NaN"):
        strategy.aggregate_train(1, [reply(0, 1.0), reply(1, 2.0), reply(2, float("nan"))])
