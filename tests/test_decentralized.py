"""The decentralized round's pieces: a node's merge step, the relay's rows, the metrics."""

from __future__ import annotations

import math

import pytest
import torch

from fedwa.alignment import permutation_spec, permute_state, random_permutations
from fedwa.config import resolve_config
from fedwa.decentralized import (consensus_distance, mean_report, merge_and_train,
                                 probe_examples, stratified_subset)
from fedwa.errors import ConfigError
from fedwa.models import build_model
from fedwa.training import LocalTrainSpec
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
    from fedwa.bn import recompute_bn

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
