"""End-to-end: late-phase weights and shadow weights through real Flower simulations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedwa.cli import simulate
from fedwa.config import resolve_config
from fedwa.results import read_rounds

pytestmark = pytest.mark.e2e

SMALL = {"dataset": "digits", "model": "cnn", "num-clients": 3, "num-server-rounds": 2}


def run(tmp_path: Path, name: str, **overrides: object) -> Path:
    config = resolve_config({**SMALL, "output-dir": str(tmp_path), **overrides})
    run_dir = tmp_path / name
    run_dir.mkdir()
    simulate(config, run_dir, show_progress=False)
    return run_dir


def member_copies(state: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    return [{n.replace(f".members.{m}.", "."): v for n, v in state.items()
             if f".members.{m}." in n} for m in range(k)]


@pytest.mark.parametrize("strategy", ["fedavg", "swa"])
def test_late_phase_weights_train_apart_after_the_start(strategy: str, tmp_path: Path) -> None:
    # Round 2 starts at progress 0.5 >= 0.4: the members train apart in round 2 only.
    run_dir = run(tmp_path, strategy, strategy=strategy, **{
        "late-phase-k": 2, "late-phase-start": 0.4, "swa-start-round": 1} if strategy == "swa"
        else {"late-phase-k": 2, "late-phase-start": 0.4})
    rounds = read_rounds(run_dir)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert rounds[-1]["ensemble_accuracy"] is not None
    members = torch.load(run_dir / "model_members.pt")
    first, second = member_copies(members, 2)
    assert set(first) == set(second) and first
    assert any(not torch.equal(first[n], second[n]) for n in first if "weight" in n)
    plain = torch.load(run_dir / "model.pt")
    assert not any("members" in n for n in plain) and "classifier.weight" in plain


def test_late_phase_members_stay_one_model_before_the_start(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "early", **{"late-phase-k": 3, "late-phase-start": 0.9})
    copies = member_copies(torch.load(run_dir / "model_members.pt"), 3)
    for name in copies[0]:
        assert torch.equal(copies[0][name], copies[1][name]), name
        assert torch.equal(copies[0][name], copies[2][name]), name
    rounds = read_rounds(run_dir)
    # Identical members: the ensemble and the collapsed model predict alike.
    assert rounds[-1]["ensemble_accuracy"] == pytest.approx(rounds[-1]["accuracy"], abs=1e-9)


@pytest.mark.parametrize("strategy", ["fedavg", "swa"])
def test_shadow_weights_learn_their_scale(strategy: str, tmp_path: Path) -> None:
    run_dir = run(tmp_path, strategy, strategy=strategy, **{"was-layers": "all"})
    rounds = read_rounds(run_dir)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    state = torch.load(run_dir / "model.pt")
    scales = {n: float(v) for n, v in state.items() if n.endswith("shadow_scale")}
    assert set(scales) == {"conv1.shadow_scale", "conv2.shadow_scale"}
    assert all(s != 1.0 for s in scales.values())  # a is learned, averaged like any weight
