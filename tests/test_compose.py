"""The composition root (fedwa/run/compose.py): one place builds a run's parts from its config,
and the CLI, the ServerApp and the evaluators receive them instead of building them again."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch

import fedwa.run.compose as compose_module
from fedwa.callbacks.evaluation import CentralEvaluator, FederatedEvaluator
from fedwa.cli import main as cli_main
from fedwa.common.errors import RunFolderBusyError
from fedwa.run.compose import RunParts, compose, open_run_folder
from fedwa.run.config import resolve_config

SMALL = {"dataset": "digits", "model": "mlp", "num-clients": 3, "num-server-rounds": 2,
         "local-steps": 2, "imbalance-ratio": 1.0}


def small(tmp_path: Path, **extra: object) -> dict:
    return resolve_config({**SMALL, "output-dir": str(tmp_path), **extra})


def test_the_docstring_example_runs() -> None:
    result = doctest.testmod(compose_module)
    assert result.attempted >= 1 and result.failed == 0


def test_parts_hold_the_shared_initialisation_and_a_model_factory(tmp_path: Path) -> None:
    parts = compose(small(tmp_path, strategy="swa", **{"swa-start-round": 1}))
    assert parts.total_rounds == 2 and type(parts.strategy).__name__ == "SWA"
    assert parts.data.num_classes == 10 and parts.device == torch.device("cpu")
    fresh, other = parts.make_model(), parts.make_model(seed=5)
    initial = parts.model.state_dict()
    assert all(torch.equal(initial[k], v) for k, v in fresh.state_dict().items())
    assert not torch.equal(initial["fc1.weight"], other.state_dict()["fc1.weight"])


def test_the_strategy_s_own_round_count_is_the_run_s(tmp_path: Path) -> None:
    # IMWA runs episodes x epochs-per-episode rounds, whatever num-server-rounds says.
    parts = compose(small(tmp_path, strategy="imwa", partition="replicas",
                          **{"imwa-episodes": 3, "num-server-rounds": 2}))
    assert parts.total_rounds == parts.strategy.total_rounds() != 2


def test_the_evaluator_is_the_one_evaluation_names(tmp_path: Path) -> None:
    central = compose(small(tmp_path))
    assert type(central.evaluator(None, None)) is CentralEvaluator  # type: ignore[arg-type]
    federated = compose(small(tmp_path, evaluation="federated"))
    assert type(federated.evaluator(None, None)) is FederatedEvaluator  # type: ignore[arg-type]


def test_a_cli_run_composes_its_parts_once(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the composition root, `fedwa run` built the strategy three times (the checks,
    the progress bar's round count, the ServerApp) and the data and model twice."""
    calls: list[str] = []
    real = compose_module.build_strategy

    def counting(config: dict) -> object:
        calls.append(str(config["strategy"]))
        return real(config)

    monkeypatch.setattr(compose_module, "build_strategy", counting)
    argv = ["run", "--quiet", "--set", f"output-dir={tmp_path}"]
    for key, value in SMALL.items():
        argv += ["--set", f"{key}={value}"]
    assert cli_main(argv) == 0
    assert calls == ["fedavg"]
    assert len(list(tmp_path.glob("*/summary.json"))) == 1


def test_a_failure_inside_a_new_run_folder_removes_it_and_frees_its_lock(
        tmp_path: Path) -> None:
    parts = compose(small(tmp_path, **{"run-name": "failing"}))
    with pytest.raises(RuntimeError, match="in the run"):
        with open_run_folder(parts, plot=False) as folder:
            assert folder.checkpoint is None
            assert (folder.path / "config.json").is_file()
            with pytest.raises(RunFolderBusyError):
                with open_run_folder(parts, folder.path, plot=False):
                    pass
            (folder.path / "config.json").unlink()
            (folder.path / "partition.json").unlink()
            raise RuntimeError("in the run")
    assert not (tmp_path / "failing").exists()


def test_a_folder_the_caller_made_is_kept_after_a_failure(tmp_path: Path) -> None:
    parts = compose(small(tmp_path))
    run_dir = tmp_path / "given"
    run_dir.mkdir()
    with pytest.raises(RuntimeError):
        with open_run_folder(parts, run_dir, plot=False):
            raise RuntimeError("in the run")
    assert run_dir.is_dir() and (run_dir / "config.json").is_file()
    with open_run_folder(parts, run_dir, plot=False) as folder:  # the lock was released
        assert isinstance(parts, RunParts) and folder.path == run_dir
