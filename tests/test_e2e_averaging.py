"""End-to-end: every averaging strategy through a real Flower simulation on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedwa.core.bn import batchnorm_layers, recompute_bn
from fedwa.cli import simulate
from fedwa.run.config import resolve_config
from fedwa.callbacks.results import read_rounds
from fedwa.data.task import federated_data, local_train_spec, make_model
from fedwa.core.training import client_seed, train_local
from strategies import REGISTRY

pytestmark = pytest.mark.e2e

SMALL = {"dataset": "digits", "model": "cnn", "num-clients": 3, "num-server-rounds": 2}
EXTRA = {  # what each strategy needs to show its own behaviour within two rounds
    "swa": {"swa-start-round": 1},
    # 2 rounds x 4 local steps = 8 steps, synchronised every 2: four rounds of 2 steps
    "hwa": {"local-steps": 4, "hwa-sync-steps": 2, "hwa-window": 2},
    "imwa": {"imwa-ema-decay": 0.5},
    "twa-v": {"server-val-fraction": 0.1, "twa-start-round": 1},
    "twa-t": {"twa-start-round": 1, "twa-rounds": 2},
}
MAIN_MODEL = {"swa": "swa", "ema": "ema", "hwa": "hwa", "twa-v": "twa", "twa-t": "twa"}


def run(tmp_path: Path, name: str, **overrides: object) -> tuple[dict, Path]:
    config = resolve_config({**SMALL, "output-dir": str(tmp_path), **overrides})
    run_dir = tmp_path / name
    run_dir.mkdir()
    simulate(config, run_dir, show_progress=False)
    return config, run_dir


@pytest.mark.parametrize("strategy", sorted(set(REGISTRY) - {"fedavg", "dimat", "gossip"}))  # decentralized: own e2e file
def test_every_strategy_runs_through_flower(strategy: str, tmp_path: Path) -> None:
    config, run_dir = run(tmp_path, strategy, strategy=strategy, **EXTRA.get(strategy, {}))
    rounds = read_rounds(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    expected_rounds = {"twa-t": 4, "hwa": 4}.get(strategy, 2)
    assert [r["round"] for r in rounds] == list(range(expected_rounds + 1))
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert rounds[-1]["model"] == MAIN_MODEL.get(strategy, "global")
    if strategy in MAIN_MODEL:  # averaged models get BN statistics recomputed, and say how
        assert rounds[-1]["bn_route"][MAIN_MODEL[strategy]] == (
            "central" if float(config["server-val-fraction"]) > 0 else "federated")
    if strategy.startswith("twa"):
        assert rounds[-1]["twa_basis_bytes"] > 0 and "swa_accuracy" in rounds[-1]
    if strategy == "imwa":
        assert "ema_accuracy" in rounds[-1]
        # the episode average and its EMA get BN statistics recomputed (no server data here)
        assert rounds[-1]["bn_route"] == {"global": "federated", "ema": "federated"}
    assert (run_dir / "model.pt").is_file()


def test_imwa_with_one_client_and_one_episode_is_plain_local_training(tmp_path: Path) -> None:
    config, run_dir = run(tmp_path, "mwa", strategy="imwa", model="mlp", **{
        "num-clients": 1, "num-server-rounds": 3, "imwa-episodes": 1, "partition": "iid"})
    data = federated_data(config)
    model = make_model(config, data)
    x, y = data.client_data(0)
    # One episode holds the whole budget: 3 rounds x 1 local epoch = 3 epochs, seeded as round 1.
    spec = local_train_spec(config, {"server-round": 1, "local-epochs": 3,
                                     "progress-start": 0.0, "progress-end": 1.0})
    train_local(model, x, y, spec, seed=client_seed(int(config["seed"]), 1, 0))
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.allclose(saved[name], value, atol=1e-6), name
    assert len(read_rounds(run_dir)) == 2  # round 0 and the single episode


def test_federated_bn_statistics_equal_those_of_the_pooled_data(tmp_path: Path) -> None:
    config, run_dir = run(tmp_path, "swa", strategy="swa", **{
        "swa-start-round": 1, "bn-recompute": "federated"})
    assert read_rounds(run_dir)[-1]["bn_route"] == {"swa": "federated"}
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    data = federated_data(config)
    pooled = torch.cat([data.client_data(pid)[0] for pid in range(3)])
    model = make_model(config, data)
    model.load_state_dict(saved)
    recompute_bn(model, pooled)  # central, exact, over the union of the clients' data
    for name, _ in batchnorm_layers(model):
        for buffer in ("running_mean", "running_var"):
            key = f"{name}.{buffer}"
            assert torch.allclose(model.state_dict()[key], saved[key], atol=1e-5), key


@pytest.mark.parametrize("strategy, overrides", [
    # fedwa's earlier TWA-v: centred basis, constant 0.05, 3 epochs of 64, BN in eval mode.
    ("twa-v", {"twa-basis": "centred", "twa-lr": 0.05, "twa-epochs": 3, "twa-batch-size": 64,
               "twa-schedule": "constant", "twa-weight-decay": 0.0, "twa-bn-mode": "eval"}),
    # The journal's optimiser with layer-wise coefficients, for both variants.
    ("twa-v", {"twa-optimizer": "adamw", "twa-layerwise": True, "twa-basis": "centred"}),
    ("twa-t", {"twa-optimizer": "adamw", "twa-layerwise": True}),
])
def test_twa_options_run_through_flower(strategy: str, overrides: dict, tmp_path: Path) -> None:
    config, run_dir = run(tmp_path, strategy, strategy=strategy, **EXTRA[strategy], **overrides)
    rounds = read_rounds(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert rounds[-1]["model"] == "twa" and "swa_accuracy" in rounds[-1]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    # Whatever the fit did to them, the server recomputes the TWA point's BN statistics.
    assert rounds[-1]["bn_route"]["twa"] == (
        "central" if float(config["server-val-fraction"]) > 0 else "federated")


def test_hwa_clients_continue_their_optimiser_across_synchronisations(tmp_path: Path) -> None:
    # Same seed and data; only what happens to the clients' momentum at a sync differs. With
    # the optimiser kept, the runs part from round 2 on (round 1 starts fresh either way).
    settings = {"strategy": "hwa", "local-steps": 4, "hwa-sync-steps": 2, "hwa-window": 2}
    _, kept = run(tmp_path, "kept", **settings)
    _, fresh = run(tmp_path, "fresh", **settings, **{"hwa-optimizer-state": "fresh"})
    a, b = read_rounds(kept), read_rounds(fresh)
    assert len(a) == len(b) == 5
    assert a[1]["global_loss"] == b[1]["global_loss"]
    assert a[2]["global_loss"] != b[2]["global_loss"]
