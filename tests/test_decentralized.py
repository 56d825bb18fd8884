"""The decentralized round's pieces: a node's merge step, the relay's rows, the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedwa.core.alignment import permutation_spec, permute_state, random_permutations
from fedwa.run.config import resolve_config
from fedwa.apps.decentralized import (consensus_distance, mean_report, merge_and_train,
                                      probe_examples, stratified_subset)
from fedwa.common.errors import ConfigError
from fedwa.models import build_model
from fedwa.core.training import LocalTrainSpec
from strategies import build_strategy

SHAPE = (1, 8, 8)


def spec(steps: int = 1) -> LocalTrainSpec:
    return LocalTrainSpec(epochs=1, steps=steps, batch_size=8, lr=0.05, momentum=0.9,
                          weight_decay=5e-4)


def trained_cnn(seed: int) -> torch.nn.Module:
    """A cnn with non-trivial weights and BN statistics (not at its init symmetry)."""
    model = build_model("cnn", SHAPE, 10, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def row(neighbours: list[int], self_weight: float, weights: list[float], align: bool,
        merge_bn: bool = True) -> dict:
    return {"self-weight": self_weight, "neighbours": neighbours, "neighbour-weights": weights,
            "align": align, "merge-bn-recompute": merge_bn, "dimat-examples": 48}


def captured_merge(own, neighbours, round_config, x, y):  # noqa: ANN001, ANN201
    """Run a node's round and return the merged model's state (before training)."""
    seen = {}

    def evaluate_merged(model: torch.nn.Module) -> dict:
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"accuracy": 0.5, "balanced_accuracy": 0.25}

    stats = merge_and_train(own, neighbours, round_config, x, y, spec(), seed=1,
                            make_model=lambda: build_model("cnn", SHAPE, 10, seed=99),
                            evaluate_merged=evaluate_merged)
    assert stats["merged-accuracy"] == 0.5 and stats["merged-balanced-accuracy"] == 0.25
    return seen["state"], stats


def test_dimat_merging_a_permuted_copy_returns_the_node_itself() -> None:
    own = trained_cnn(0)
    x, y = data()
    perm_spec = permutation_spec(own)
    perms = random_permutations(perm_spec, torch.Generator().manual_seed(3))
    copy = permute_state(own.state_dict(), perm_spec, perms)
    assert any(not torch.equal(copy[k], v) for k, v in own.state_dict().items())
    # What DIMAT's node does to itself first: BN statistics on its own probe data.
    from fedwa.core.bn import recompute_bn

    reference = trained_cnn(0)
    recompute_bn(reference, probe_examples(x, 48, 1))
    merged, _ = captured_merge(own, {1: copy}, row([1], 0.5, [0.5], align=True), x, y)
    for key, value in reference.state_dict().items():
        assert torch.allclose(merged[key].float(), value.float(), atol=1e-5), key


def test_gossip_merges_the_raw_weights_with_the_mixing_row() -> None:
    own, other = trained_cnn(0), trained_cnn(1)
    x, y = data()
    a, b = own.state_dict(), other.state_dict()
    a = {k: v.clone() for k, v in a.items()}
    merged, stats = captured_merge(own, {4: b}, row([4], 0.25, [0.75], align=False,
                                                    merge_bn=False), x, y)
    assert stats["align-seconds"] < 1.0
    for key in a:
        if a[key].is_floating_point():
            assert torch.allclose(merged[key], 0.25 * a[key] + 0.75 * b[key], atol=1e-6), key
        else:
            assert torch.equal(merged[key], a[key])  # counters are not averaged


def test_without_alignment_a_permuted_copy_is_not_the_node() -> None:
    # The counterpart of the DIMAT test: the same merge without alignment changes the model.
    own = trained_cnn(0)
    x, y = data()
    perm_spec = permutation_spec(own)
    copy = permute_state(own.state_dict(), perm_spec,
                         random_permutations(perm_spec, torch.Generator().manual_seed(3)))
    before = {k: v.clone() for k, v in own.state_dict().items()}
    merged, _ = captured_merge(own, {1: copy}, row([1], 0.5, [0.5], align=False), x, y)
    assert not torch.allclose(merged["conv1.weight"], before["conv1.weight"], atol=1e-3)


def test_stratified_subset_keeps_every_class_share() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_subset(y, 10, seed=0)
    assert torch.bincount(y[idx]).tolist() == [5, 3, 2]
    assert torch.equal(idx, stratified_subset(y, 10, seed=0))
    assert torch.equal(stratified_subset(y, 0, seed=0), torch.arange(100))


def test_consensus_distance_by_hand() -> None:
    # Nodes at 0, 2 and 4 (one scalar parameter): mean 2, squared distances 4, 0, 4 -> 8/3.
    states = [{"w": torch.tensor([v]), "b": torch.zeros(1)} for v in (0.0, 2.0, 4.0)]
    assert math.isclose(consensus_distance(states, ["w", "b"]), 8 / 3)


def test_mean_report_averages_numbers_and_lists() -> None:
    reports = [{"accuracy": 0.2, "per_class_accuracy": [0.0, 1.0], "shot_groups": ["a", "b"]},
               {"accuracy": 0.4, "per_class_accuracy": [1.0, 0.0], "shot_groups": ["a", "b"]}]
    assert mean_report(reports) == {"accuracy": pytest.approx(0.3),
                                    "per_class_accuracy": [0.5, 0.5],
                                    "shot_groups": ["a", "b"]}


def config(**overrides: object) -> dict:
    return resolve_config({"strategy": "dimat", "num-clients": 4, **overrides})


def test_each_node_gets_its_row_of_the_mixing_matrix() -> None:
    strategy = build_strategy(config(topology="ring", mixing="metropolis"))
    first = strategy.round_config(1, 0)
    assert first["neighbours"] == [1, 3]
    # Ring: every degree is 2, so Metropolis weights are 1/3 on each edge and on self.
    assert first["self-weight"] == pytest.approx(1 / 3)
    assert first["neighbour-weights"] == pytest.approx([1 / 3, 1 / 3])
    assert first["align"] is True
    assert build_strategy(config(strategy="gossip")).round_config(1, 0)["align"] is False


def test_node_init_shared_or_independent() -> None:
    shared = build_strategy(config(**{"node-init": "shared", "seed": 5}))
    assert {shared.node_seed(p) for p in range(4)} == {5}
    independent = build_strategy(config(**{"node-init": "independent", "seed": 5}))
    assert len({independent.node_seed(p) for p in range(4)}) == 4


def test_nodes_evaluate_merged_models_on_the_per_round_subset() -> None:
    strategy = build_strategy(config(**{"num-server-rounds": 3, "node-eval-examples": 500}))
    assert [strategy.round_config(r, 0)["eval-examples"] for r in (1, 2, 3)] == [500] * 3


@pytest.mark.parametrize("key, value", [("late-phase-k", 2), ("was-layers", "all"),
                                        ("fraction-train", 0.5)])
def test_settings_the_decentralized_mode_cannot_honour_are_config_errors(key: str,
                                                                         value: object) -> None:
    with pytest.raises(ConfigError) as err:
        build_strategy(config(**{key: value}))
    assert err.value.key == key


def test_unknown_topology_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        config(topology="hypercube")
    assert err.value.key == "topology"


# --- issue 15: DIMAT as its authors ran it -----------------------------------------------------

from fedwa.apps import decentralized as dec  # noqa: E402
from fedwa.apps.decentralized import alignment_examples  # noqa: E402
from fedwa.data.task import federated_data, local_train_spec  # noqa: E402
from fedwa.core.topology import is_complete, neighbours  # noqa: E402
from fedwa.core.training import client_seed, train_local  # noqa: E402


def test_complete_graphs_are_found_by_their_edges_not_their_name() -> None:
    assert is_complete(neighbours("full", 5)) and is_complete(neighbours("ring", 3))
    assert is_complete(neighbours("erdos-renyi", 6, p=1.0)) and is_complete([[]])
    assert not is_complete(neighbours("ring", 4)) and not is_complete(neighbours("star", 4))


@pytest.mark.parametrize("topology, clients, strategy, basis", [
    ("full", 5, "dimat", "single"), ("ring", 3, "dimat", "single"),
    ("ring", 5, "dimat", "own"), ("torus", 6, "dimat", "own"), ("full", 5, "gossip", "own")])
def test_dimat_basis_auto_is_one_merge_on_complete_graphs(topology: str, clients: int,
                                                          strategy: str, basis: str) -> None:
    built = build_strategy(config(strategy=strategy, topology=topology,
                                  **{"num-clients": clients}))
    assert built.basis == basis


def test_one_merge_needs_a_complete_graph() -> None:
    with pytest.raises(ConfigError) as err:
        build_strategy(config(topology="ring", **{"num-clients": 5, "dimat-basis": "single"}))
    assert err.value.key == "dimat-basis"


def test_single_basis_merger_rotates_and_every_node_takes_its_merge() -> None:
    strategy = build_strategy(config(topology="full", **{"num-clients": 4}))
    assert [strategy.merger(r) for r in (1, 2, 3, 4, 5)] == [0, 1, 2, 3, 0]
    first = strategy.merger_config(2)  # round 2: node 1 merges everyone's model, 1/4 each
    assert first["neighbours"] == [0, 2, 3] and first["train"] is False
    assert first["self-weight"] == pytest.approx(0.25)
    assert first["neighbour-weights"] == pytest.approx([0.25] * 3) and first["align"] is True
    for pid in range(4):
        given = strategy.given_config(2, pid)
        assert (given["neighbours"], given["neighbour-weights"], given["self-weight"]) == \
            ([1], [1.0], 0.0)
        assert given["align"] is False and given["merge-bn-recompute"] is False


def test_anchor_basis_sends_the_rotating_anchor_with_weight_zero() -> None:
    strategy = build_strategy(config(topology="ring", **{"num-clients": 5,
                                                         "dimat-basis": "anchor"}))
    # Round 3: anchor node 2. Node 0 (neighbours 1, 4) also gets node 2's model, weight 0.
    far = strategy.round_config(3, 0)
    assert far["neighbours"] == [1, 4, 2] and far["align-to"] == 2
    assert far["neighbour-weights"] == pytest.approx([1 / 3, 1 / 3, 0.0])
    assert strategy.senders(3, 0) == [1, 4, 2]
    near = strategy.round_config(3, 1)  # node 2 is already a neighbour: nothing extra
    assert near["neighbours"] == [0, 2] and near["align-to"] == 2
    assert strategy.round_config(3, 2)["align-to"] == -1  # the anchor keeps its own basis
    assert strategy.senders(3, 2) == [1, 3]


def test_anchor_merge_lands_in_the_anchors_basis() -> None:
    # Own model and neighbour are two permuted copies of the anchor B; aligned to B, their
    # 1/2-1/2 merge is B itself (its BN statistics recomputed on the probe), in B's order.
    from fedwa.core.bn import recompute_bn

    anchor = trained_cnn(0)
    x, y = data()
    perm_spec = permutation_spec(anchor)
    b = anchor.state_dict()
    own = build_model("cnn", SHAPE, 10, seed=5)
    own.load_state_dict(permute_state(b, perm_spec, random_permutations(
        perm_spec, torch.Generator().manual_seed(1))))
    neighbour = permute_state(b, perm_spec, random_permutations(
        perm_spec, torch.Generator().manual_seed(2)))
    round_config = {**row([3, 7], 0.5, [0.5, 0.0], align=True), "align-to": 7}
    merged, _ = captured_merge(own, {3: neighbour, 7: b}, round_config, x, y)
    reference = trained_cnn(0)
    recompute_bn(reference, probe_examples(x, 48, 1))
    for key, value in reference.state_dict().items():
        assert torch.allclose(merged[key].float(), value.float(), atol=1e-5), key


def test_a_given_merge_is_taken_as_it_is() -> None:
    own, given = trained_cnn(0), trained_cnn(1).state_dict()
    x, y = data()
    round_config = {**row([2], 0.0, [1.0], align=False, merge_bn=False)}
    merged, _ = captured_merge(own, {2: given}, round_config, x, y)
    assert all(torch.equal(merged[k], v) for k, v in given.items())


def test_merge_only_replies_untrained() -> None:
    own = trained_cnn(0)
    x, y = data()
    before = {k: v.clone() for k, v in own.state_dict().items()}
    stats = merge_and_train(own, {}, {**row([], 1.0, [], align=False, merge_bn=False),
                                      "train": False}, x, y, spec(), seed=1,
                            make_model=lambda: build_model("cnn", SHAPE, 10, seed=99))
    assert stats["steps"] == 0.0
    assert all(torch.equal(own.state_dict()[k], v) for k, v in before.items())


def test_pretraining_runs_no_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    run_config = config(topology="full", lr=0.1, **{"node-pretrain-epochs": 3,
                                                    "lr-schedule": "cosine",
                                                    "num-server-rounds": 4})
    strategy = build_strategy(run_config)
    round_config = strategy.pretrain_config(2)
    assert round_config["neighbours"] == [] and round_config["align"] is False
    assert round_config["server-round"] == 0 and round_config["self-weight"] == 1.0
    pre_spec = local_train_spec(run_config, round_config)
    # 3 epochs at the base lr (progress 0 of the cosine schedule), not a round's steps.
    assert (pre_spec.epochs, pre_spec.steps, pre_spec.lr) == (3, 0, 0.1)
    assert pre_spec.progress_start == pre_spec.progress_end == 0.0

    def forbidden(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("pre-training merged, aligned or recomputed BatchNorm")

    for name in ("merge_aligned", "align_to", "permute_state", "recompute_bn"):
        monkeypatch.setattr(dec, name, forbidden)
    x, y = data(40)
    own, hand = trained_cnn(0), trained_cnn(0)
    seed = client_seed(0, 0, 2)
    merge_and_train(own, {}, round_config, x, y, pre_spec, seed=seed,
                    make_model=lambda: build_model("cnn", SHAPE, 10, seed=99))
    train_local(hand, x, y, pre_spec, seed=seed)  # the node's own training, nothing else
    assert all(torch.equal(own.state_dict()[k], v) for k, v in hand.state_dict().items())


def test_proxy_alignment_data_is_disjoint_from_every_nodes_training_data() -> None:
    run_config = config(**{"num-clients": 5, "server-val-fraction": 0.1,
                           "dimat-align-data": "proxy", "imbalance-ratio": 1.0})
    data_ = federated_data(run_config)
    strategy = build_strategy(run_config)
    round_configs = [strategy.round_config(2, pid) for pid in range(5)]
    assert {c["align-data"] for c in round_configs} == {"proxy"}
    assert len({c["probe-seed"] for c in round_configs}) == 1  # the same examples for all
    val = set(data_.val_indices.tolist())
    # Each class of the pool (training pool + split), n_c examples, gives round(0.1 n_c).
    pool = np.concatenate([data_.train_indices, data_.val_indices])
    labels = data_.dataset.y_train.numpy()[pool]
    expected = sum(round(0.1 * int((labels == c).sum())) for c in range(10))
    assert len(val) == expected > 0
    for pid in range(5):
        x, _ = data_.client_data(pid)
        assert val.isdisjoint(data_.client_indices[pid].tolist())
        proxy = alignment_examples(round_configs[pid], data_, x)
        assert torch.equal(proxy, data_.dataset.x_train[torch.tensor(data_.val_indices)])
    # Local alignment data stays the default: the node's own examples.
    x0, _ = data_.client_data(0)
    assert alignment_examples(build_strategy(config()).round_config(1, 0), data_, x0) is x0


def test_proxy_alignment_data_needs_a_server_split() -> None:
    with pytest.raises(ConfigError) as err:
        build_strategy(config(**{"dimat-align-data": "proxy"}))
    assert err.value.key == "dimat-align-data"
