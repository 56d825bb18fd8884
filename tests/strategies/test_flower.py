"""build_strategy and Flower's own server optimisers behind fedwa's guard."""

import sys
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedwa.run.config import resolve_config
from strategies import FedAdam, FedAvg, FedAvgM, FedProx, build_strategy


class FakeGrid:
    """Just enough Grid for configure_train: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


# --- build_strategy --------------------------------------------------------------------------


def test_build_fedavg():
    s = build_strategy(resolve_config({"strategy": "fedavg", "fraction-train": 0.5,
                                       "num-clients": 6, "seed": 3}))
    assert type(s) is FedAvg
    assert s.fraction_train == 0.5
    assert s.fraction_evaluate == 0.0 and s.min_evaluate_nodes == 0
    assert s.min_train_nodes == 1
    assert s.min_available_nodes == 6
    assert s.seed == 3
    assert s.run_config["num-clients"] == 6


def test_build_fedavg_with_evaluation():
    s = build_strategy(resolve_config({"fraction-evaluate": 0.25}))
    assert s.fraction_evaluate == 0.25 and s.min_evaluate_nodes == 1


def test_build_fedprox_maps_mu():
    s = build_strategy(resolve_config({"strategy": "fedprox", "fedprox-mu": 0.3}))
    assert type(s) is FedProx
    assert s.proximal_mu == 0.3


def test_build_fedavgm_maps_server_lr_and_momentum():
    s = build_strategy(resolve_config({"strategy": "fedavgm", "fedavgm-server-lr": 0.7,
                                       "fedavgm-momentum": 0.25}))
    assert type(s) is FedAvgM
    assert (s.server_learning_rate, s.server_momentum) == (0.7, 0.25)


def test_build_fedadam_maps_its_keys():
    s = build_strategy(resolve_config({"strategy": "fedadam", "fedadam-eta": 0.02, "lr": 0.3,
                                       "fedadam-beta1": 0.8, "fedadam-beta2": 0.95,
                                       "fedadam-tau": 1e-4}))
    assert type(s) is FedAdam
    assert (s.eta, s.eta_l, s.beta_1, s.beta_2, s.tau) == (0.02, 0.3, 0.8, 0.95, 1e-4)


def test_fedprox_sends_mu_to_clients():
    s = build_strategy(resolve_config({"strategy": "fedprox", "fedprox-mu": 0.3,
                                       "num-clients": 2}))
    messages = list(s.configure_train(1, ArrayRecord({"w": Array(np.zeros(1, np.float32))}),
                                      ConfigRecord({}), FakeGrid([1, 2])))
    assert len(messages) == 2
    assert all(m.content["config"]["proximal-mu"] == 0.3 for m in messages)


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    name = "fedwa_test_custom_strategy"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        from flwr.serverapp.strategy import FedAvg


        class Plain(FedAvg):
            '''A Flower strategy that knows nothing about fedwa.'''
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_build_custom_flower_strategy(custom_module):
    config = resolve_config({"strategy": f"{custom_module}:Plain", "fraction-train": 0.4,
                             "fraction-evaluate": 0.5, "num-clients": 5})
    s = build_strategy(config)
    # Adapted (strategies.foreign): the user's class behind fedwa's guard, its math intact.
    assert type(s).__name__ == "Plain" and type(s).__module__ == custom_module
    assert isinstance(s, sys.modules[custom_module].Plain) and isinstance(s, FlowerFedAvg)
    assert type(s).aggregate_train is not sys.modules[custom_module].Plain.aggregate_train
    assert s.fraction_train == 0.4
    assert s.fraction_evaluate == 0.5 and s.min_evaluate_nodes == 1
    assert s.min_train_nodes == 1
    assert s.min_available_nodes == 5


# --- FedAvgM: Flower's server momentum on hand values ----------------------------------------


def w_record(values, dtype=np.float32) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, dtype=dtype))})


def answer(messages, payloads) -> list[Message]:
    """Reply to each instruction with (arrays, num-examples)."""
    out = []
    for pid, (message, (arrays, examples)) in enumerate(zip(messages, payloads, strict=True)):
        metrics = MetricRecord({"num-examples": examples, "train-loss": 1.0, "partition-id": pid})
        out.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}),
                           reply_to=message))
    return out


def fedavgm(momentum: float):
    return build_strategy(resolve_config({"strategy": "fedavgm", "fedavgm-server-lr": 1.0,
                                          "fedavgm-momentum": momentum, "num-clients": 2}))


def two_rounds(s):
    grid = FakeGrid([101, 102])
    # Round 1, w0 = [1, 2]. Replies [0, 0] (1 example) and [1, 2] (3 examples).
    w0 = w_record([1.0, 2.0])
    messages = sorted(s.configure_train(1, w0, ConfigRecord({}), grid),
                      key=lambda m: m.metadata.dst_node_id)
    w1, _ = s.aggregate_train(1, answer(messages, [(w_record([0.0, 0.0]), 1),
                                                   (w_record([1.0, 2.0]), 3)]))
    # Round 2, from w1. Replies [0.25, 0.5] and [0.75, 1.0], 1 example each.
    messages = sorted(s.configure_train(2, w1, ConfigRecord({}), grid),
                      key=lambda m: m.metadata.dst_node_id)
    w2, _ = s.aggregate_train(2, answer(messages, [(w_record([0.25, 0.5]), 1),
                                                   (w_record([0.75, 1.0]), 1)]))
    return w1, w2


def test_fedavgm_two_rounds_hand_values():
    w1, w2 = two_rounds(fedavgm(0.5))
    # Flower's FedAvgM: pg = old - avg; m = pg in round 1, m = 0.5 m + pg after; new = old - 1 * m
    # Round 1: avg = (1*[0, 0] + 3*[1, 2]) / 4 = [0.75, 1.5]; pg = [1, 2] - avg = [0.25, 0.5]
    #          m = [0.25, 0.5]; w1 = [1, 2] - m = [0.75, 1.5]
    assert w1["w"].numpy().dtype == np.float32
    np.testing.assert_allclose(w1["w"].numpy(), [0.75, 1.5], rtol=1e-6)
    # Round 2: avg = ([0.25, 0.5] + [0.75, 1.0]) / 2 = [0.5, 0.75]
    #          pg = w1 - avg = [0.25, 0.75]; m = 0.5 * [0.25, 0.5] + [0.25, 0.75] = [0.375, 1.0]
    #          w2 = w1 - m = [0.75 - 0.375, 1.5 - 1.0] = [0.375, 0.5]
    assert w2["w"].numpy().dtype == np.float32
    np.testing.assert_allclose(w2["w"].numpy(), [0.375, 0.5], rtol=1e-6)


def test_fedavgm_without_momentum_is_fedavg():
    _, w2 = two_rounds(fedavgm(0.0))
    # momentum 0 and server lr 1: w2 is the plain round-2 mean [0.5, 0.75]
    np.testing.assert_allclose(w2["w"].numpy(), [0.5, 0.75], rtol=1e-6)


def test_fedavgm_integer_buffer_is_averaged_then_rounded():
    s = fedavgm(0.5)
    sent = ArrayRecord({"n": Array(np.array([10], dtype=np.int64))})
    messages = list(s.configure_train(1, sent, ConfigRecord({}), FakeGrid([1, 2])))
    payloads = [(ArrayRecord({"n": Array(np.array([12], dtype=np.int64))}), 1),
                (ArrayRecord({"n": Array(np.array([14], dtype=np.int64))}), 3)]
    arrays, _ = s.aggregate_train(1, answer(messages, payloads))
    # Flower averages: (1*12 + 3*14) / 4 = 13.5; pg = 10 - 13.5 = -3.5; new = 10 + 3.5 = 13.5
    # match_dtypes rounds half to even: 14, int64 like the model sent.
    # (fedwa's own FedAvg would take the max, 14, by a different route.)
    assert arrays["n"].numpy().dtype == np.int64
    assert arrays["n"].numpy().tolist() == [14]


@pytest.mark.parametrize("name", ["fedavgm", "fedprox", "fedadam"])
def test_flower_strategies_aggregate_a_batchnorm_model(name):
    s = build_strategy(resolve_config({"strategy": name, "num-clients": 2}))
    bn = torch.nn.BatchNorm1d(2)
    sent = ArrayRecord(bn.state_dict())
    messages = list(s.configure_train(1, sent, ConfigRecord({}), FakeGrid([1, 2])))
    payloads = []
    for i in range(2):
        state = {k: v.clone() for k, v in bn.state_dict().items()}
        state["num_batches_tracked"] += 3
        payloads.append((ArrayRecord(state), 1))
    arrays, _ = s.aggregate_train(1, answer(messages, payloads))
    count = arrays["num_batches_tracked"].numpy()
    assert count.shape == () and count.dtype == np.int64
    if name != "fedadam":
        # both clients counted 0 + 3 batches; mean 3, and FedAvgM's first round lands on it.
        # (FedAdam moves the counter by an Adam step instead, so its value is not checked.)
        assert count == 3
