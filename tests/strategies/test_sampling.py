"""Seeded client sampling with a private generator: the user's global `random` is left alone,
the same seed picks the same nodes, and Flower's parents keep what they do before sampling."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedwa.run.config import resolve_config
from strategies import DIMAT, IMWA, SWA, FedAdam, FedAvg, FedAvgM, FedProx, build_strategy
from strategies.base import FedwaStrategy, sample_node_ids


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(3, np.float32))})


def build(cls=FedAvg, seed: int = 0, **kwargs):
    settings = {"fraction_train": 0.3, "fraction_evaluate": 0.2, "min_train_nodes": 1,
                "min_evaluate_nodes": 1, "min_available_nodes": 1, **kwargs}
    return cls(seed=seed, **settings)


def nodes_of(messages) -> list[int]:
    return [m.metadata.dst_node_id for m in messages]


def train_nodes(seed: int, server_round: int = 1, cls=FedAvg, **kwargs) -> list[int]:
    s = build(cls, seed, **kwargs)
    return nodes_of(s.configure_train(server_round, arrays(), ConfigRecord({}),
                                      FakeGrid(range(100, 120))))


@pytest.mark.parametrize("cls", [FedAvg, FedAvgM, FedProx, FedAdam, SWA])
def test_a_round_leaves_the_global_random_state_alone(cls):
    random.seed(12345)
    state = random.getstate()
    s = build(cls)
    grid = FakeGrid(range(1, 11))
    assert len(s.configure_train(1, arrays(), ConfigRecord({}), grid)) == 3
    assert len(s.configure_evaluate(1, arrays(), ConfigRecord({}), grid)) == 2
    assert random.getstate() == state
    # and the user's next draw is the one they would have had without fedwa
    expected = random.Random(12345).random()
    assert random.random() == expected


def test_same_seed_same_nodes_whatever_the_global_state():
    random.seed(1)
    first = train_nodes(seed=7, server_round=2)
    random.seed(999)
    assert train_nodes(seed=7, server_round=2) == first
    assert len(first) == 6  # int(0.3 * 20)


def test_different_seeds_or_rounds_can_sample_differently():
    samples = {tuple(train_nodes(seed=s)) for s in range(6)}
    assert len(samples) > 1
    rounds = {tuple(train_nodes(seed=0, server_round=r)) for r in range(1, 7)}
    assert len(rounds) > 1


def test_sampling_draws_what_fedwas_reseeding_drew_before():
    # Runs stay comparable with earlier results: the private generator is seeded with the
    # string that random.seed got before.
    nodes = list(range(100, 120))
    assert train_nodes(seed=3, server_round=2) == random.Random("fedwa-train-3-2").sample(nodes, 6)


def test_evaluation_has_its_own_seeded_draw():
    s = build(seed=4)
    grid = FakeGrid(range(1, 21))
    first = nodes_of(s.configure_evaluate(2, arrays(), ConfigRecord({}), grid))
    assert first == nodes_of(build(seed=4).configure_evaluate(2, arrays(), ConfigRecord({}), grid))
    assert len(first) == 4
    assert first == random.Random("fedwa-evaluate-4-2").sample(list(range(1, 21)), 4)


def test_min_nodes_and_fraction_zero_are_honoured():
    assert len(train_nodes(seed=0, fraction_train=0.01, min_train_nodes=3)) == 3
    s = build(fraction_train=0.0)
    assert list(s.configure_train(1, arrays(), ConfigRecord({}), FakeGrid([1, 2]))) == []
    assert s.last_sampled == 0


def test_messages_are_built_as_flower_builds_them():
    s = build(fraction_train=1.0)
    config = ConfigRecord({"lr": 0.1})
    messages = s.configure_train(5, arrays(), config, FakeGrid([3, 1, 2]))
    assert sorted(nodes_of(messages)) == [1, 2, 3]
    for m in messages:
        assert m.metadata.message_type == MessageType.TRAIN
        assert m.content["config"]["server-round"] == 5 and m.content["config"]["lr"] == 0.1
        assert list(m.content["arrays"].keys()) == ["w"]


def test_sampling_waits_for_min_available_nodes():
    class Growing(FakeGrid):
        def get_node_ids(self):
            if len(self.nodes) < 4:
                self.nodes.append(len(self.nodes) + 1)
            return list(self.nodes)

    grid = Growing([1])
    chosen, everyone = sample_node_ids(grid, random.Random(0), 0.5, 1, 4, poll_seconds=0)
    assert len(everyone) >= 4
    assert len(chosen) == 1 and set(chosen) <= set(everyone)  # 0.5 of the 2 connected first


def test_flower_parents_keep_what_they_do_before_sampling():
    proximal = build(FedProx, proximal_mu=0.25)
    messages = proximal.configure_train(1, arrays(), ConfigRecord({}), FakeGrid([1, 2, 3]))
    assert all(m.content["config"]["proximal-mu"] == 0.25 for m in messages)
    adam = build(FedAdam)
    adam.configure_train(1, arrays(), ConfigRecord({}), FakeGrid([1, 2, 3]))
    assert set(adam.current_arrays) == {"w"}
    momentum = build(FedAvgM)
    momentum.configure_train(1, arrays(), ConfigRecord({}), FakeGrid([1, 2, 3]))
    assert momentum.current_arrays is not None
    assert proximal.fraction_train == adam.fraction_train == 0.3  # put back after the call


class OwnSampling(FlowerFedAvg):
    """A Flower strategy that samples its own way, from the global `random`."""

    def configure_train(self, server_round, arrays, config, grid):
        chosen = random.sample(sorted(grid.get_node_ids()), 2)
        return [m for m in super().configure_train(server_round, arrays, config, grid)
                if m.metadata.dst_node_id in chosen]


class Wrapped(FedwaStrategy, OwnSampling):
    pass


def test_a_parent_that_samples_its_own_way_is_seeded_and_the_state_restored():
    random.seed(5)
    state = random.getstate()
    grid = FakeGrid(range(1, 11))

    def sample(seed):
        s = Wrapped(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, seed=seed)
        return nodes_of(s.configure_train(1, arrays(), ConfigRecord({}), grid))

    assert sample(3) == sample(3) and len(sample(3)) == 2
    assert len({tuple(sample(s)) for s in range(8)}) > 1
    assert random.getstate() == state


# --- start() in a user's ServerApp: what is checked before any round -------------------------


def test_start_refuses_a_num_rounds_its_run_config_contradicts():
    s = build_strategy(resolve_config({"strategy": "swa", "num-server-rounds": 4}))
    with pytest.raises(ValueError, match=r"num-server-rounds = 4 .* num_rounds = 3"):
        s.start(grid=FakeGrid([1]), initial_arrays=arrays(), num_rounds=3)


def test_a_directly_built_strategy_takes_its_length_from_start():
    s = SWA(seed=0)
    s.run_config["num-server-rounds"] = 9
    s.bind_rounds(9)
    assert s.start_round == 5
    imwa = IMWA(seed=0)
    imwa.bind_rounds(4)
    assert imwa.lengths == [1, 1, 1, 1]


def test_imwa_past_its_episodes_says_how_to_plan_them():
    s = IMWA(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    with pytest.raises(ValueError, match=r"planned for 1 episodes.*start\(num_rounds"):
        s.configure_train(2, arrays(), ConfigRecord({}), FakeGrid([1]))


def test_decentralized_start_says_what_it_needs():
    from strategies.base import ClientProtocolError

    with pytest.raises(ClientProtocolError, match="train.merge"):
        DIMAT(num_nodes=3).start(grid=FakeGrid([1, 2, 3]), initial_arrays=arrays())


def test_hwa_sync_steps_built_directly_needs_a_step_budget():
    from fedwa.common.errors import ConfigError
    from strategies import HWA

    with pytest.raises(ConfigError, match="run_config=\\{'local-steps'"):
        HWA(hwa_sync_steps=5)
    assert HWA(hwa_sync_steps=5, run_config={"local-steps": 10,
                                             "num-server-rounds": 2}).lengths == [5, 5, 5, 5]
