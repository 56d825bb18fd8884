"""IMWA: splitting the budget into episodes, what each episode's round sends, and the EMA."""

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
from fedwa.common.errors import ConfigError
from fedwa.data.task import local_train_spec
from strategies import IMWA, build_strategy
from strategies.imwa import episode_lengths


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


# --- episode_lengths ---------------------------------------------------------------------------


def test_equal_lengths_put_the_longer_episodes_last():
    # divmod(10, 3) = (3, 1): the last episode gets the extra unit
    assert episode_lengths(10, 3, "equal") == [3, 3, 4]
    # divmod(11, 3) = (3, 2): the last two
    assert episode_lengths(11, 3, "equal") == [3, 4, 4]
    assert episode_lengths(6, 3, "equal") == [2, 2, 2]
    assert episode_lengths(5, 1, "equal") == [5]
    assert episode_lengths(4, 4, "equal") == [1, 1, 1, 1]


def test_increasing_lengths_by_hand():
    # budget 10, 4 episodes: 1 unit each first, spare 6 shared in proportion to 1:2:3:4 (/10)
    #   shares 0.6, 1.2, 1.8, 2.4 -> 1 + floor = [1, 2, 2, 3] (sum 8), 2 units left over
    #   fractional parts 0.6, 0.2, 0.8, 0.4 -> largest: episode 2 (0.8), then episode 0 (0.6)
    #   -> [2, 2, 3, 3]
    assert episode_lengths(10, 4, "increasing") == [2, 2, 3, 3]


def test_increasing_ties_go_to_later_episodes():
    # budget 6, 3 episodes: spare 3 in proportion 1:2:3 (/6) -> shares 0.5, 1.0, 1.5
    #   1 + floor = [1, 2, 2] (sum 5), 1 unit left; fractional parts 0.5, 0, 0.5: a tie
    #   between episodes 0 and 2, broken towards the later one -> [1, 2, 3]
    assert episode_lengths(6, 3, "increasing") == [1, 2, 3]


def test_increasing_edge_cases():
    assert episode_lengths(7, 1, "increasing") == [7]  # spare 6, share 6 -> 1 + 6
    assert episode_lengths(3, 3, "increasing") == [1, 1, 1]  # no spare units
    # budget 20, 4 episodes: spare 16 -> shares 1.6, 3.2, 4.8, 6.4 -> [2, 4, 5, 7] (sum 18)
    #   fractional parts 0.6, 0.2, 0.8, 0.4 -> +1 to episodes 2 and 0 -> [3, 4, 6, 7]
    assert episode_lengths(20, 4, "increasing") == [3, 4, 6, 7]


@pytest.mark.parametrize("schedule", ["equal", "increasing"])
def test_lengths_always_fill_the_budget(schedule):
    for budget in range(1, 41):
        for episodes in range(1, budget + 1):
            lengths = episode_lengths(budget, episodes, schedule)
            assert len(lengths) == episodes
            assert sum(lengths) == budget, (budget, episodes)
            assert min(lengths) >= 1, (budget, episodes)
            # both schedules never shorten a later episode
            assert lengths == sorted(lengths), (budget, episodes, lengths)
            if schedule == "equal":
                assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("budget, episodes", [(3, 4), (5, 0), (0, 1)])
def test_impossible_episode_counts(budget, episodes):
    with pytest.raises(ValueError, match="episodes <= budget"):
        episode_lengths(budget, episodes, "equal")


def test_unknown_schedule():
    with pytest.raises(ValueError, match="decreasing"):
        episode_lengths(10, 2, "decreasing")


# --- the strategy ------------------------------------------------------------------------------


def imwa(**overrides) -> IMWA:
    config = resolve_config({"strategy": "imwa", "num-clients": 2, "num-server-rounds": 5,
                             "local-epochs": 2, "imwa-episodes": 3, **overrides})
    strategy = build_strategy(config)
    assert type(strategy) is IMWA
    return strategy


def test_budget_in_epochs_split_into_three_episodes():
    s = imwa()
    # budget = 5 rounds x 2 epochs = 10 units -> equal [3, 3, 4]
    assert s.unit == "local-epochs" and s.budget == 10
    assert s.lengths == [3, 3, 4]
    assert s.total_rounds() == 3
    # progress boundaries: 0/10, 3/10, 6/10, 10/10
    assert s.episode(1) == (3, 0.0, 0.3)
    assert s.episode(2) == (3, 0.3, 0.6)
    assert s.episode(3) == (4, 0.6, 1.0)


def test_configure_train_sends_the_episode():
    s = imwa()
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    messages = list(s.configure_train(2, arrays, ConfigRecord({}), FakeGrid([1, 2])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    for m in messages:
        config = m.content["config"]
        assert config["local-epochs"] == 3
        assert config["progress-start"] == 0.3 and config["progress-end"] == 0.6
        assert config["server-round"] == 2
        assert "local-steps" not in config
    # The client turns that into 3 epochs with the lr window (0.3, 0.6) of the whole run,
    # not the default (1/5, 2/5) of round 2 of 5.
    spec = local_train_spec(s.run_config, dict(messages[0].content["config"]))
    assert (spec.epochs, spec.steps) == (3, 0)
    assert (spec.progress_start, spec.progress_end) == (0.3, 0.6)


def test_budget_in_steps_when_local_steps_is_set():
    s = imwa(**{"local-steps": 4})
    # budget = 5 x 4 = 20 steps; divmod(20, 3) = (6, 2) -> [6, 7, 7]
    assert s.unit == "local-steps" and s.budget == 20
    assert s.lengths == [6, 7, 7]
    assert s.episode(2) == (7, 0.3, 0.65)  # 6/20, 13/20
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    messages = list(s.configure_train(1, arrays, ConfigRecord({}), FakeGrid([1, 2])))
    for m in messages:
        config = m.content["config"]
        assert config["local-steps"] == 6
        assert "local-epochs" not in config
        assert (config["progress-start"], config["progress-end"]) == (0.0, 0.3)


def test_zero_episodes_means_one_per_round():
    s = imwa(**{"imwa-episodes": 0})
    assert s.lengths == [2, 2, 2, 2, 2]  # 5 episodes of 10 / 5 epochs
    assert s.total_rounds() == 5


def test_one_episode_is_vanilla_mwa():
    s = imwa(**{"imwa-episodes": 1})
    assert s.lengths == [10] and s.episode(1) == (10, 0.0, 1.0)


def test_increasing_schedule_in_the_strategy():
    s = imwa(**{"imwa-episodes": 4, "imwa-schedule": "increasing"})
    assert s.lengths == [2, 2, 3, 3]  # see test_increasing_lengths_by_hand
    # boundaries 0, 2, 4, 7, 10 of 10
    assert [s.episode(r) for r in (1, 2, 3, 4)] == [
        (2, 0.0, 0.2), (2, 0.2, 0.4), (3, 0.4, 0.7), (3, 0.7, 1.0)]


def test_more_episodes_than_units_is_a_config_error():
    with pytest.raises(ConfigError, match="imwa-episodes") as info:
        imwa(**{"imwa-episodes": 11})  # the budget is 10 epochs
    assert info.value.key == "imwa-episodes"
    assert info.value.value == 11
    assert "10" in info.value.allowed


# --- the EMA of the episode averages ----------------------------------------------------------


def record(w) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32))})


def reply(node_id: int, w, examples: int, pid: int) -> Message:
    instruction = Message(RecordDict({"arrays": record([0.0, 0.0]),
                                      "config": ConfigRecord({"server-round": 1})}),
                          node_id, MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": examples, "train-loss": 0.5, "partition-id": pid})
    return Message(RecordDict({"arrays": record(w), "metrics": metrics}), reply_to=instruction)


def run_round(strategy, server_round: int, a, b) -> ArrayRecord:
    strategy.sent_arrays = record([0.0, 0.0])
    arrays, _ = strategy.aggregate_train(
        server_round, [reply(31, a, examples=1, pid=0), reply(32, b, examples=1, pid=1)])
    return arrays


def w(arrays: ArrayRecord) -> list[float]:
    return arrays["w"].numpy().tolist()


def test_without_ema_only_the_global_model_is_evaluated():
    s = imwa()
    assert s.ema is None
    arrays = run_round(s, 1, [2.0, 0.0], [4.0, 2.0])
    assert list(s.models_to_evaluate(1, arrays)) == ["global"]
    assert s.state_dict() == {"ema": None}


def test_ema_of_the_episode_averages():
    s = imwa(**{"imwa-ema-decay": 0.5})
    assert list(s.models_to_evaluate(0, record([0.0, 0.0]))) == ["global"]
    # episode averages (equal weights): ([2, 0] + [4, 2]) / 2 = [3, 1]
    #                                   ([0, 0] + [2, 2]) / 2 = [1, 1]
    #                                   ([6, 4] + [2, 0]) / 2 = [4, 2]
    # EMA: v1 = [3, 1]; v2 = 0.5 [3, 1] + 0.5 [1, 1] = [2, 1]; v3 = 0.5 [2, 1] + 0.5 [4, 2]
    #      = [3, 1.5]
    rounds = [([2.0, 0.0], [4.0, 2.0]), ([0.0, 0.0], [2.0, 2.0]), ([6.0, 4.0], [2.0, 0.0])]
    averages = [[3.0, 1.0], [1.0, 1.0], [4.0, 2.0]]
    emas = [[3.0, 1.0], [2.0, 1.0], [3.0, 1.5]]
    for r, ((a, b), average, ema) in enumerate(zip(rounds, averages, emas), start=1):
        arrays = run_round(s, r, a, b)
        assert w(arrays) == average  # training continues from the plain average
        models = s.models_to_evaluate(r, arrays)
        assert set(models) == {"global", "ema"}
        assert w(models["global"]) == average
        assert w(models["ema"]) == ema


def test_ema_state_dict_round_trip():
    s = imwa(**{"imwa-ema-decay": 0.5})
    run_round(s, 1, [2.0, 0.0], [4.0, 2.0])
    run_round(s, 2, [0.0, 0.0], [2.0, 2.0])
    restored = imwa(**{"imwa-ema-decay": 0.5})
    restored.load_state_dict(s.state_dict())
    for strategy in (s, restored):
        arrays = run_round(strategy, 3, [6.0, 4.0], [2.0, 0.0])
        assert w(strategy.models_to_evaluate(3, arrays)["ema"]) == [3.0, 1.5]


# --- the weights of the average and BatchNorm --------------------------------------------------


def test_uniform_average_is_the_default_as_in_the_paper():
    # Clients with 1 and 3 examples, models [2, 0] and [6, 4]:
    #   uniform (the paper's mean of the K models): ([2, 0] + [6, 4]) / 2 = [4, 2]
    #   by examples (FedAvg's):       (1 [2, 0] + 3 [6, 4]) / 4 = [20, 12] / 4 = [5, 3]
    s = imwa()
    assert s.weighting == "uniform"
    s.sent_arrays = record([0.0, 0.0])
    replies = [reply(31, [2.0, 0.0], examples=1, pid=0), reply(32, [6.0, 4.0], examples=3, pid=1)]
    arrays, _ = s.aggregate_train(1, replies)
    assert w(arrays) == [4.0, 2.0]
    s = imwa(**{"imwa-weighting": "examples"})
    s.sent_arrays = record([0.0, 0.0])
    arrays, _ = s.aggregate_train(1, replies)
    assert w(arrays) == [5.0, 3.0]


def test_bn_statistics_of_the_averages_are_recomputed_by_default():
    # The evaluator recomputes BatchNorm statistics of the models named in recompute_bn: the
    # episode average ("global") and its EMA, unless imwa-bn = average.
    assert imwa().recompute_bn == {"global", "ema"}
    assert imwa(**{"imwa-bn": "average"}).recompute_bn == frozenset()


def test_bad_weighting_is_a_config_error():
    with pytest.raises(ConfigError, match="imwa-weighting"):
        imwa(**{"imwa-weighting": "median"})
