"""Evaluation without server data: nodes evaluate on their own held-out splits (or their own
``data-dir`` files) and the server adds up per-class counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fedwa.apps.client_app as client
from fedwa.run.config import resolve_config
from fedwa.common.errors import ConfigError, FedwaError
from fedwa.flower.local_backend import run_in_process
from fedwa.core.metrics import classification_report, evaluate_model, report_from_counts
from fedwa.data.node import held_out, node_data
from fedwa.callbacks.results import read_rounds
from fedwa.apps.server_app import build_server_app
from fedwa.data.task import federated_data, make_model

SMALL = {"dataset": "digits", "model": "mlp", "num-clients": 3, "num-server-rounds": 2,
         "local-steps": 20, "imbalance-ratio": 1.0, "evaluation": "federated"}


def test_held_out_is_stratified_and_keeps_a_singleton_class_for_training() -> None:
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    mask = held_out(y, 0.2, seed=0)
    # 20% of 10 is 2, of 5 is 1; the class with one example is not held out.
    assert [int(mask[y == c].sum()) for c in range(3)] == [2, 1, 0]
    assert torch.equal(mask, held_out(y, 0.2, seed=0))
    assert not torch.equal(mask, held_out(y, 0.2, seed=1))


def test_report_from_counts_by_hand() -> None:
    report = report_from_counts([3, 1, 0], [4, 2, 1], loss_sum=7.0,
                                train_class_counts=[30, 20, 10])
    assert report["accuracy"] == pytest.approx(4 / 7)
    assert report["per_class_accuracy"] == [0.75, 0.5, 0.0]
    assert report["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert report["loss"] == pytest.approx(1.0)
    # thirds by training count: class 0 many, 1 medium, 2 few.
    assert (report["many_shot_accuracy"], report["few_shot_accuracy"]) == (0.75, 0.0)
    with pytest.raises(ValueError, match="do not add up"):
        report_from_counts([3, 3], [4, 2], 1.0, [1, 1])


def test_summed_counts_equal_one_report_over_the_union() -> None:
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 4, n), rng.integers(0, 4, n)) for n in (7, 13, 29)]
    correct, total = np.zeros(4, int), np.zeros(4, int)
    for preds, targets in parts:
        total += np.bincount(targets, minlength=4)
        correct += np.bincount(targets[preds == targets], minlength=4)
    union = classification_report(np.concatenate([p for p, _ in parts]),
                                  np.concatenate([t for _, t in parts]), 4, [9, 5, 3, 1])
    summed = report_from_counts(correct, total, 0.0, [9, 5, 3, 1])
    assert {k: summed[k] for k in union} == union


def run(tmp_path: Path, node_configs: dict | None = None, **overrides: object) -> Path:
    config = resolve_config({**SMALL, "output-dir": str(tmp_path), **overrides})
    run_dir = tmp_path / "run"
    run_in_process(build_server_app(config, run_dir, plot=False), client.app,
                   int(config["num-clients"]), seed=0, node_configs=node_configs)
    return run_dir


def test_federated_evaluation_equals_evaluating_the_union_of_held_out_splits(
        tmp_path: Path) -> None:
    run_dir = run(tmp_path)
    rounds = read_rounds(run_dir)
    assert {r["evaluation"] for r in rounds} == {"federated"}
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    config = resolve_config({**SMALL, "output-dir": str(tmp_path)})
    data = federated_data(config)
    splits = [node_data(config, {}, data, pid) for pid in range(3)]
    x = torch.cat([s.x_test for s in splits])
    y = torch.cat([s.y_test for s in splits])
    assert rounds[-1]["eval_examples"] == len(y) and rounds[-1]["evaluated_by"] == 3
    model = make_model(config, data)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    central = evaluate_model(model, x, y, num_classes=data.num_classes,
                             train_class_counts=[1] * data.num_classes)
    assert rounds[-1]["accuracy"] == pytest.approx(central["accuracy"], abs=1e-12)
    assert rounds[-1]["loss"] == pytest.approx(central["loss"], rel=1e-9)
    # Held-out examples are not trained on: training sizes shrink by the test splits.
    assert sum(len(s.y) for s in splits) + len(y) == sum(
        len(data.client_data(p)[1]) for p in range(3))


def test_nodes_with_their_own_data_folders(tmp_path: Path) -> None:
    config = resolve_config({**SMALL, "output-dir": str(tmp_path)})
    data = federated_data(config)
    folders = {}
    for pid in range(3):
        x, y = data.client_data(pid)
        folder = tmp_path / f"site-{pid}"
        folder.mkdir()
        cut = len(y) * 3 // 4
        np.savez(folder / "train.npz", x=x[:cut].numpy(), y=y[:cut].numpy())
        np.savez(folder / "test.npz", x=x[cut:].numpy(), y=y[cut:].numpy())
        folders[pid] = {"data-dir": str(folder)}
    rounds = read_rounds(run(tmp_path, folders))
    expected = sum(len(data.client_data(p)[1]) - len(data.client_data(p)[1]) * 3 // 4
                   for p in range(3))
    assert rounds[-1]["eval_examples"] == expected
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


def test_a_bad_data_folder_stops_the_run_naming_the_node_and_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedwaError, match="data-dir = .*empty.*there is no train.npz"):
        run(tmp_path, {1: {"data-dir": str(empty)}})
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.savez(wrong / "train.npz", x=np.zeros((4, 1, 5, 5), np.float32), y=np.zeros(4, int))
    with pytest.raises(FedwaError, match=r"x has shape \(4, 1, 5, 5\).*expected x of "
                       r"\[n, 1, 8, 8\]"):
        run(tmp_path / "w", {0: {"data-dir": str(wrong)}})


def test_federated_evaluation_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(ConfigError, match="'evaluation' = 'federated' .* late-phase-k > 1"):
        resolve_config({**SMALL, "late-phase-k": 2})
    from strategies import build_strategy

    with pytest.raises(ConfigError, match="central with the decentralized strategy 'gossip'"):
        build_strategy(resolve_config({**SMALL, "strategy": "gossip"}))
