"""End-to-end: late-phase weights and shadow weights through real Flower simulations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedwa.cli import simulate
from fedwa.run.config import resolve_config
from fedwa.callbacks.results import read_rounds

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
    members = torch.load(run_dir / "model_members.pt", weights_only=True)
    first, second = member_copies(members, 2)
    assert set(first) == set(second) and first
    assert any(not torch.equal(first[n], second[n]) for n in first if "weight" in n)
    plain = torch.load(run_dir / "model.pt", weights_only=True)
    assert not any("members" in n for n in plain) and "classifier.weight" in plain


def test_late_phase_members_stay_one_model_before_the_start(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "early", **{"late-phase-k": 3, "late-phase-start": 0.9})
    copies = member_copies(torch.load(run_dir / "model_members.pt", weights_only=True), 3)
    for name in copies[0]:
        assert torch.equal(copies[0][name], copies[1][name]), name
        assert torch.equal(copies[0][name], copies[2][name]), name
    rounds = read_rounds(run_dir)
    # Identical members: the ensemble and the collapsed model predict alike.
    assert rounds[-1]["ensemble_accuracy"] == pytest.approx(rounds[-1]["accuracy"], abs=1e-9)


@pytest.mark.parametrize("strategy", ["fedavg", "swa"])
def test_shadow_weights_train_through_flower(strategy: str, tmp_path: Path) -> None:
    # That the scale a barely moves under BatchNorm is tested on its own (test_shadow.py and
    # the test below); here: the option trains end to end and its scales reach model.pt.
    run_dir = run(tmp_path, strategy, strategy=strategy, **{"was-layers": "all"})
    rounds = read_rounds(run_dir)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    state = torch.load(run_dir / "model.pt", weights_only=True)
    scales = {n: float(v) for n, v in state.items() if n.endswith("shadow_scale")}
    assert set(scales) == {"conv1.shadow_scale", "conv2.shadow_scale"}


def test_local_late_phase_members_change_the_run_only_after_a_late_round(tmp_path: Path) -> None:
    # Rounds of 3 start at progress 0, 1/3, 2/3; the late phase starts at 0.3, so round 2 is
    # the first late round and both modes train it from the same averaged members. From round
    # 3 on, "local" clients start from their own round-2 members, "averaged" ones from the
    # server's average: the runs agree exactly through round 2 and part in round 3.
    settings = {"num-server-rounds": 3, "late-phase-k": 2, "late-phase-start": 0.3}
    runs = {mode: run(tmp_path, mode, **settings, **{"late-phase-members": mode})
            for mode in ("averaged", "local")}
    records = {mode: read_rounds(run_dir) for mode, run_dir in runs.items()}
    assert len(records["local"]) == len(records["averaged"]) == 4  # round 0 (initial) .. 3
    for before in records["averaged"][:3]:
        same = records["local"][before["round"]]
        assert (same["loss"], same["ensemble_accuracy"]) == (
            before["loss"], before["ensemble_accuracy"])
    assert records["local"][3]["loss"] != records["averaged"][3]["loss"]
    members = {mode: torch.load(run_dir / "model_members.pt", weights_only=True)
               for mode, run_dir in runs.items()}
    assert set(members["local"]) == set(members["averaged"])  # replies carry every entry
    assert any(not torch.equal(members["local"][n], members["averaged"][n])
               for n in members["local"] if ".members." in n)
    first, second = member_copies(members["local"], 2)
    assert any(not torch.equal(first[n], second[n]) for n in first if "weight" in n)


def test_shadow_scale_starts_from_the_servers_draw_and_stays_under_batchnorm(
        tmp_path: Path) -> None:
    # The server draws a ~ U(0, 1) per layer from the seed and sends the initial model to
    # every client. Every conv of the cnn is followed by a train-mode BatchNorm, which
    # cancels a (BN(a z) = BN(z) up to eps), so without weight decay the averaged a stays
    # at the server's draw; clients starting from their own a, or a learned a, would move it.
    from fedwa.data.task import federated_data, make_model

    settings = {"was-layers": "all", "was-scale-init": "uniform", "weight-decay": 0.0}
    run_dir = run(tmp_path, "scale", **settings)
    config = resolve_config({**SMALL, **settings})
    initial = {n: float(v) for n, v in make_model(config, federated_data(config))
               .state_dict().items() if n.endswith("shadow_scale")}
    assert set(initial) == {"conv1.shadow_scale", "conv2.shadow_scale"}
    assert all(0.0 < a < 1.0 for a in initial.values())
    assert len(set(initial.values())) == 2  # one draw per layer
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for name, a in initial.items():
        assert float(final[name]) == pytest.approx(a, rel=1e-2), name
    rounds = read_rounds(run_dir)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


def test_desire_oriented_evaluation_depends_only_on_model_seed_and_round(
        tmp_path: Path) -> None:
    # inference "shadow" draws a random kernel transform per evaluation batch. The server
    # reseeds the shadow layers from (seed, round) before every evaluation, so the last
    # round's metrics are reproduced from the saved model alone, whatever was drawn in
    # earlier rounds' evaluations (as after a resume).
    from fedwa.core.metrics import evaluate_model
    from fedwa.core.shadow import evaluation_seed, reseed_shadow
    from fedwa.data.task import federated_data, make_model

    settings = {"was-layers": "all", "was-inference": "shadow", "eval-batch-size": 64}
    run_dir = run(tmp_path, "shadow", **settings)
    config = resolve_config({**SMALL, **settings})
    data = federated_data(config)
    model = make_model(config, data)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    x_test, y_test = data.test_data()

    def evaluate(server_round: int) -> dict:
        reseed_shadow(model, evaluation_seed(int(config["seed"]), server_round))
        return evaluate_model(model, x_test, y_test, num_classes=data.num_classes,
                              train_class_counts=data.train_class_counts,
                              batch_size=int(config["eval-batch-size"]))

    last = read_rounds(run_dir)[-1]
    report = evaluate(last["round"])
    assert report["accuracy"] == last["accuracy"]
    assert report["loss"] == pytest.approx(last["loss"], rel=1e-6)
    # And the draws matter: other rounds' seeds give other transforms, other losses.
    assert any(evaluate(r)["loss"] != report["loss"] for r in range(last["round"]))
