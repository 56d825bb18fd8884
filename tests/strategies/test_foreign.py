"""Flower's strategy classes by import path (strategies.foreign): hand-computed aggregates behind
fedwa's reply guard, constructor arguments from strategy-args, and checkpoints from attributes."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedwa.apps.client_app import clip_update
from fedwa.run.config import load_toml, resolve_config
from fedwa.common.errors import ConfigError, UnsavableStateError
from strategies import build_strategy
from strategies.foreign import attribute_state, parse_strategy_args, restore_attributes

FLWR = "flwr.serverapp.strategy:"


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def config(strategy: str, args: str = "", **extra):
    return resolve_config({"strategy": strategy, "strategy-args": args, "num-clients": 3,
                           **extra})


def w(values) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32))})


def round_one(strategy, payloads):
    """Configure round 1 from w = [0, 0] on nodes 1-3 and answer with ``payloads``."""
    messages = sorted(strategy.configure_train(1, w([0.0, 0.0]), ConfigRecord({}),
                                               FakeGrid([1, 2, 3])),
                      key=lambda m: m.metadata.dst_node_id)
    replies = [Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": 1, "train-loss": 0.5, "partition-id": pid})}), reply_to=message)
        for pid, (message, arrays) in enumerate(zip(messages, payloads, strict=True))]
    return strategy.aggregate_train(1, replies)


def test_fedmedian_by_import_path_is_flowers_median_of_the_replies():
    s = build_strategy(config(FLWR + "FedMedian"))
    arrays, _ = round_one(s, [w([1.0, 10.0]), w([2.0, -4.0]), w([7.0, 0.5])])
    assert np.array_equal(arrays["w"].numpy(), np.array([2.0, 0.5], dtype=np.float32))


def test_a_nan_reply_is_left_out_before_flowers_math_sees_it():
    s = build_strategy(config(FLWR + "FedMedian", **{"min-available-clients": 1}))
    arrays, _ = round_one(s, [w([1.0, 10.0]), w([np.nan, 0.0]), w([3.0, 2.0])])
    # The median of the two usable replies is their mean: [2, 6]; the NaN never entered it.
    assert np.array_equal(arrays["w"].numpy(), np.array([2.0, 6.0], dtype=np.float32))
    assert s.last_faults["clients_rejected"] == 1
    assert "NaN" in s.last_faults["rejected"][0]["reason"]


def test_krum_picks_the_reply_closest_to_the_others():
    # Krum with f = 0 scores each reply by its squared distance to its n - f - 2 = 1 nearest
    # neighbour: [0, 0] and [1, 0] are 1 apart, [10, 10] is 181 from [1, 0]; the first of
    # the tied pair wins.
    s = build_strategy(config(FLWR + "Krum"))
    arrays, _ = round_one(s, [w([0.0, 0.0]), w([1.0, 0.0]), w([10.0, 10.0])])
    assert np.array_equal(arrays["w"].numpy(), np.array([0.0, 0.0], dtype=np.float32))


def test_strategy_args_reach_the_constructor_and_fedwa_fills_what_it_knows():
    s = build_strategy(config(FLWR + "QFedAvg", "{q = 0.25}", lr=0.02))
    assert s.q == 0.25
    assert s.client_learning_rate == 0.02  # fedwa's lr
    assert s.train_loss_key == "train-loss"  # what fedwa's clients report
    s = build_strategy(config(FLWR + "FedTrimmedAvg", "{beta = 0.1}"))
    assert s.beta == 0.1 and s.min_available_nodes == 3


@pytest.mark.parametrize("strategy, args, says", [
    (FLWR + "Krum", "{bogus = 1}", "a keyword argument of Krum"),
    (FLWR + "DifferentialPrivacyServerSideFixedClipping", "{clipping_norm = 1.0}",
     "required argument 'noise_multiplier'"),
    (FLWR + "DifferentialPrivacyServerSideFixedClipping",
     "{noise_multiplier = -1.0, clipping_norm = 1.0}", "The noise multiplier should be"),
    ("fedavg", "{q = 0.2}", "fedwa's own strategies take their own config keys"),
    (FLWR + "FedAvg", "{fraction_train = ", "a TOML inline table"),
])
def test_bad_strategy_args_name_the_key_the_class_and_the_argument(strategy, args, says):
    with pytest.raises(ConfigError, match="'strategy-args'") as err:
        build_strategy(config(strategy, args))
    assert says in str(err.value)


def test_a_dp_wrapper_builds_its_named_inner_strategy_with_its_own_arguments():
    s = build_strategy(config(FLWR + "DifferentialPrivacyClientSideFixedClipping",
                              "{noise_multiplier = 0.5, clipping_norm = 2.0, strategy = "
                              "'flwr.serverapp.strategy:FedTrimmedAvg', "
                              "strategy-args = {beta = 0.3}}"))
    assert (s.noise_multiplier, s.clipping_norm, s.num_sampled_clients) == (0.5, 2.0, 3)
    assert type(s.strategy).__name__ == "FedTrimmedAvg" and s.strategy.beta == 0.3
    messages = list(s.configure_train(1, w([0.0, 0.0]), ConfigRecord({}), FakeGrid([1, 2, 3])))
    assert [m.content["config"]["clipping_norm"] for m in messages] == [2.0] * 3


def test_a_dp_wrapper_refuses_a_model_with_integer_buffers():
    s = build_strategy(config(FLWR + "DifferentialPrivacyServerSideFixedClipping",
                              "{noise_multiplier = 0.5, clipping_norm = 2.0}", model="cnn"))
    with pytest.raises(ConfigError, match="num_batches_tracked"):
        s.check_model({"w": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0)})
    s.check_model({"w": torch.zeros(2)})


def test_a_toml_file_may_write_strategy_args_as_a_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('strategy = "flwr.serverapp.strategy:QFedAvg"\n'
                    'strategy-args = { q = 0.5, train_loss_key = "train-loss" }\n')
    loaded = load_toml(path)
    assert parse_strategy_args(loaded["strategy-args"]) == {"q": 0.5,
                                                             "train_loss_key": "train-loss"}
    assert build_strategy(resolve_config(loaded)).q == 0.5


# --- checkpoints from attributes --------------------------------------------------------------


def test_fedadam_moments_survive_a_state_round_trip():
    s = build_strategy(config(FLWR + "FedAdam"))
    round_one(s, [w([1.0, 2.0]), w([1.0, 2.0]), w([1.0, 2.0])])
    state = s.state_dict()
    assert "m_t" in state and "seed" not in state and "last_usable" not in state
    fresh = build_strategy(config(FLWR + "FedAdam"))
    fresh.load_state_dict(state)
    # Delta = 1, 2: m_t = (1 - beta1) * delta = 0.1 * [1, 2], restored exactly.
    assert np.allclose(fresh.m_t["w"], [0.1, 0.2])
    assert np.array_equal(fresh.m_t["w"], s.m_t["w"])
    assert np.array_equal(fresh.current_arrays["w"], s.current_arrays["w"])


def test_a_dp_wrappers_inner_strategy_is_restored_in_place():
    args = "{noise_multiplier = 0.0, clipping_norm = 9.0, strategy = 'fedavgm'}"
    s = build_strategy(config(FLWR + "DifferentialPrivacyServerSideFixedClipping", args))
    round_one(s, [w([1.0, 2.0]), w([3.0, 2.0]), w([2.0, 2.0])])
    fresh = build_strategy(config(FLWR + "DifferentialPrivacyServerSideFixedClipping", args))
    inner = fresh.strategy
    fresh.load_state_dict(s.state_dict())
    assert fresh.strategy is inner
    assert np.array_equal(fresh.current_arrays["w"].numpy(), s.current_arrays["w"].numpy())


def test_state_that_is_not_data_is_named():
    class Holder:
        pass

    holder = Holder()
    holder.count, holder.lock = 3, __import__("threading").Lock()
    with pytest.raises(UnsavableStateError, match="Holder.lock is a _thread.lock"):
        attribute_state(holder)
    del holder.lock
    holder.rows = {"a": np.arange(3), "b": (1, "x")}
    copy = Holder()
    restore_attributes(copy, attribute_state(holder))
    assert copy.count == 3 and copy.rows["b"] == (1, "x")
    assert np.array_equal(copy.rows["a"], np.arange(3))


# --- client-side clipping ---------------------------------------------------------------------


def test_client_side_clipping_scales_the_whole_update_to_the_norm():
    sent = ArrayRecord({"a": Array(np.zeros(1, dtype=np.float32)),
                        "b": Array(np.ones(1, dtype=np.float32))})
    new = {"a": torch.tensor([3.0]), "b": torch.tensor([5.0])}  # update (3, 4): norm 5
    clipped = clip_update(new, sent, 1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6]))
    assert torch.allclose(clipped["b"], torch.tensor([1.8]))  # 1 + 4 / 5
    unchanged = clip_update(new, sent, 10.0)
    assert torch.equal(unchanged["a"], new["a"]) and torch.equal(unchanged["b"], new["b"])
