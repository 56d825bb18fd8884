"""End-to-end: the decentralized mode through real Flower runs on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedwa.cli import simulate
from fedwa.run.config import resolve_config
from fedwa.common.errors import FedwaError
from fedwa.flower.arrays import to_state_dict
from fedwa.callbacks.results import read_rounds
from fedwa.core.averaging import weighted_average
from fedwa.data.task import federated_data, make_model
from strategies import FedAvg, Gossip

pytestmark = pytest.mark.e2e

SMALL = {"dataset": "digits", "model": "cnn", "num-clients": 4, "num-server-rounds": 2,
         "local-steps": 3, "batch-size": 16}


def run(tmp_path: Path, name: str, **overrides: object) -> Path:
    decentralized = "fedavg" not in str(overrides.get("strategy", "")).lower()
    config = resolve_config({**SMALL, "output-dir": str(tmp_path),
                             **({"node-eval-examples": 100} if decentralized else {}),
                             **overrides})
    run_dir = tmp_path / name
    run_dir.mkdir()
    simulate(config, run_dir, show_progress=False)
    return run_dir


def float_sum(state: dict) -> float:
    return float(sum(t.double().sum() for t in state.values() if t.is_floating_point()))


class RecordingGossip(Gossip):
    """Gossip that keeps what every node said it received, and the relay's copies."""

    received: dict[int, list[tuple[int, list[int], list[float]]]] = {}
    relayed: dict[int, dict[int, float]] = {}

    def round_config(self, server_round, partition_id):  # noqa: ANN001, ANN201
        # The relay's copies as they are when the round's messages are made.
        RecordingGossip.relayed[server_round] = {p: float_sum(m) for p, m in self.models.items()}
        return super().round_config(server_round, partition_id)

    def after_round(self, server_round, replies):  # noqa: ANN001, ANN201
        RecordingGossip.received[server_round] = [
            (int(r.content["metrics"]["partition-id"]),
             list(r.content["metrics"]["received-from"]),
             list(r.content["metrics"]["received-sums"])) for r in replies]


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_each_node_receives_exactly_its_neighbours_models(tmp_path: Path, backend: str) -> None:
    RecordingGossip.received, RecordingGossip.relayed = {}, {}
    run(tmp_path, "ring", strategy=f"{__name__}:RecordingGossip", topology="ring",
        backend=backend, **{"num-clients": 3, "node-init": "independent"})
    ring = {0: [1, 2], 1: [0, 2], 2: [0, 1]}
    for server_round in (1, 2):
        got = RecordingGossip.received[server_round]
        assert [pid for pid, _, _ in got] == [0, 1, 2]
        for pid, senders, sums in got:
            assert senders == ring[pid]
            expected = [RecordingGossip.relayed[server_round][j] for j in senders]
            assert sums == pytest.approx(expected, rel=1e-9)
    # Independent inits differ, so the checksums really tell the models apart.
    assert len(set(RecordingGossip.relayed[1].values())) == 3
    # Round 2 relays what the nodes sent back in round 1, not the inits.
    assert RecordingGossip.relayed[2] != RecordingGossip.relayed[1]


class EqualWeightFedAvg(FedAvg):
    def client_weights(self, replies):  # noqa: ANN001, ANN201
        return [1.0] * len(replies)


def test_gossip_on_a_full_graph_from_a_shared_init_is_fedavg(tmp_path: Path) -> None:
    common = {"num-server-rounds": 2, "num-clients": 3}
    fedavg = run(tmp_path, "fedavg", strategy=f"{__name__}:EqualWeightFedAvg", **common)
    gossip = run(tmp_path, "gossip", strategy="gossip", topology="full", mixing="uniform",
                 **{"node-init": "shared", "merge-bn-recompute": False, **common})
    # Round 2: every node merges all round-1 models with weight 1/3 (FedAvg's average) and
    # trains from it as FedAvg's clients do; their plain average is FedAvg's global model.
    global_model = torch.load(fedavg / "model.pt", weights_only=True)
    consensus = torch.load(gossip / "model.pt", weights_only=True)
    for key, value in global_model.items():
        if value.is_floating_point():
            assert torch.allclose(consensus[key], value, atol=1e-5), key
    nodes = torch.load(gossip / "node_models.pt", weights_only=True)
    assert torch.allclose(weighted_average([nodes[p] for p in range(3)])["conv1.weight"],
                          global_model["conv1.weight"], atol=1e-5)


def test_dimat_records_node_and_consensus_metrics(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "dimat", strategy="dimat", topology="ring",
                  **{"node-init": "independent"})
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    last = rounds[-1]
    assert len(last["node_accuracy"]) == 4
    assert last["node_accuracy_min"] <= last["accuracy"] <= last["node_accuracy_max"]
    assert last["eval_examples"] == 300 and rounds[1]["eval_examples"] == 100
    assert last["merged_accuracy"] is not None and last["consensus_distance"] > 0
    # Ring of 4: each node gets 2 models and sends 1 back each round.
    config = resolve_config({**SMALL, "strategy": "dimat"})
    model_bytes = sum(t.numel() * t.element_size()
                      for t in make_model(config, federated_data(config)).state_dict().values())
    assert 3 * model_bytes <= last["bytes_per_node"] < 3 * model_bytes * 1.05
    assert last["client_train"]["align-seconds"] > 0
    nodes = torch.load(run_dir / "node_models.pt", weights_only=True)
    assert sorted(nodes) == [0, 1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"


class BrokenNode(Gossip):
    """Partition 1's messages go to an action that does not exist: its replies are errors."""

    def round_config(self, server_round, partition_id):  # noqa: ANN001, ANN201
        config = super().round_config(server_round, partition_id)
        if partition_id == 1:
            config["neighbours"] = [99]  # the node looks for a neighbour that was never sent
        return config


def test_a_failing_node_is_left_out_and_keeps_its_model(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "broken", strategy=f"{__name__}:BrokenNode")
    rounds = read_rounds(run_dir)
    assert [(r["clients_ok"], r["clients_failed"]) for r in rounds[1:]] == [(3, 1), (3, 1)]
    # The relay still holds its initial (shared) model; the others moved on.
    config = resolve_config({**SMALL, "strategy": "gossip"})
    init = make_model(config, federated_data(config)).state_dict()
    nodes = torch.load(run_dir / "node_models.pt", weights_only=True)
    assert all(torch.equal(nodes[1][k], v) for k, v in init.items())
    assert not torch.equal(nodes[0]["conv1.weight"], init["conv1.weight"])


def test_every_node_failing_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(FedwaError, match="none of the 4 nodes"):
        run(tmp_path, "all", strategy=f"{__name__}:AllBrokenGossip")


class AllBrokenGossip(Gossip):
    def round_config(self, server_round, partition_id):  # noqa: ANN001, ANN201
        return {**super().round_config(server_round, partition_id), "neighbours": [99]}


# --- issue 15: DIMAT as its authors ran it -----------------------------------------------------

from strategies import DIMAT  # noqa: E402
from fedwa.core.training import client_seed, train_local  # noqa: E402
from fedwa.data.task import local_train_spec  # noqa: E402


def model_bytes_of(config: dict) -> int:
    return sum(t.numel() * t.element_size()
               for t in make_model(config, federated_data(config)).state_dict().values())


class FrozenDIMAT(DIMAT):
    """DIMAT whose local training has lr 0: the parameters each node ends a round with are
    exactly the ones it started training from (only BN running statistics move)."""

    replies: dict[int, dict[int, dict]] = {}

    def round_config(self, server_round, partition_id):  # noqa: ANN001, ANN201
        return {**super().round_config(server_round, partition_id), "lr": 0.0}

    def given_config(self, server_round, partition_id, merger=None):  # noqa: ANN001, ANN201
        return {**super().given_config(server_round, partition_id, merger), "lr": 0.0}

    def after_round(self, server_round, replies):  # noqa: ANN001, ANN201
        FrozenDIMAT.replies[server_round] = {
            int(r.content["metrics"]["partition-id"]): to_state_dict(r.content["arrays"])
            for r in replies}


@pytest.mark.parametrize("init", ["independent", "shared"])
def test_dimat_on_a_complete_graph_gives_every_node_one_merge(tmp_path: Path,
                                                              init: str) -> None:
    FrozenDIMAT.replies = {}
    run_dir = run(tmp_path, init, strategy=f"{__name__}:FrozenDIMAT", topology="full",
                  **{"num-clients": 3, "node-init": init})
    rounds = read_rounds(run_dir)
    config = resolve_config({**SMALL, "strategy": "dimat", "num-clients": 3})
    seeds = DIMAT.from_config({**config, "node-init": init}).node_seed
    inits = [make_model(config, federated_data(config), seeds(p)).state_dict() for p in range(3)]
    params = [n for n, _ in make_model(config, federated_data(config)).named_parameters()]
    for server_round in (1, 2):
        nodes = FrozenDIMAT.replies[server_round]
        assert sorted(nodes) == [0, 1, 2]
        for pid in (1, 2):  # every node holds the same merged weights
            assert all(torch.equal(nodes[pid][n], nodes[0][n]) for n in params), pid
        record = rounds[server_round]
        assert record["consensus_distance"] == 0.0
        assert (record["dimat_basis"], record["merger"]) == ("single", server_round - 1)
        assert record["merged_accuracy"] is not None
        # N - 1 models to the merger, 1 back, then N down and N up: 3 models per node.
        mb = model_bytes_of(config)
        assert 3 * mb <= record["bytes_per_node"] < 3 * mb * 1.05
    if init == "independent":  # a real merge: no node's own initial weights
        merged = FrozenDIMAT.replies[1][0]
        assert all(not torch.equal(merged["conv1.weight"], s["conv1.weight"]) for s in inits)


class PretrainProbe(DIMAT):
    """DIMAT that keeps the relay's models as round 1 starts (the pre-trained nodes) and what
    each node says it received."""

    entering: dict[int, dict] = {}
    received: dict[int, dict[int, list[int]]] = {}

    def round_config(self, server_round, partition_id):  # noqa: ANN001, ANN201
        if server_round == 1 and partition_id == 0:
            PretrainProbe.entering = {p: {k: v.clone() for k, v in m.items()}
                                      for p, m in self.models.items()}
        return super().round_config(server_round, partition_id)

    def after_round(self, server_round, replies):  # noqa: ANN001, ANN201
        PretrainProbe.received[server_round] = {
            int(r.content["metrics"]["partition-id"]): list(r.content["metrics"]["received-from"])
            for r in replies}


def test_pretraining_proxy_data_anchor_and_adam_end_to_end(tmp_path: Path) -> None:
    settings = {"num-clients": 4, "node-init": "independent", "node-pretrain-epochs": 1,
                "optimizer": "adam", "lr": 1e-3, "weight-decay": 0.0,
                "server-val-fraction": 0.1, "dimat-align-data": "proxy",
                "dimat-basis": "anchor", "dimat-examples": 64}
    run_dir = run(tmp_path, "pre", strategy=f"{__name__}:PretrainProbe", topology="ring",
                  **settings)
    rounds = read_rounds(run_dir)
    config = resolve_config({**SMALL, "strategy": "dimat", "topology": "ring", **settings,
                             "node-eval-examples": 100})
    data = federated_data(config)
    strategy = DIMAT.from_config(config)
    # Pre-training by hand: each node's own init, one Adam epoch on its own partition, seeded
    # as round 0. No neighbour was sent (bytes_down 0), so nothing can have been merged.
    for pid in range(4):
        model = make_model(config, data, strategy.node_seed(pid))
        x, y = data.client_data(pid)
        spec = local_train_spec(config, strategy.pretrain_config(pid))
        assert (spec.optimizer, spec.epochs, spec.steps) == ("adam", 1, 0)
        train_local(model, x, y, spec, seed=client_seed(0, 0, pid))
        got = PretrainProbe.entering[pid]
        assert all(torch.equal(got[k], v) for k, v in model.state_dict().items()), pid
    pre = rounds[0]
    assert pre["pretrain_epochs"] == 1 and pre["bytes_down"] == 0
    assert 4 * model_bytes_of(config) <= pre["bytes_up"] < 4 * model_bytes_of(config) * 1.05
    assert pre["clients_ok"] == 4
    # Round 1 reports accuracy before the first merge (the pre-trained nodes) and after it.
    assert rounds[1]["premerge_accuracy"] == pre["accuracy"]
    assert rounds[1]["merged_accuracy"] is not None
    assert [r["merger"] for r in rounds[1:]] == [0, 1]
    assert rounds[1]["dimat_basis"] == "anchor"
    # Ring of 4, anchor 0 in round 1: node 2 (neighbours 1, 3) also receives node 0's model.
    assert PretrainProbe.received[1][2] == [1, 3, 0]
    assert PretrainProbe.received[2][3] == [0, 2, 1]
