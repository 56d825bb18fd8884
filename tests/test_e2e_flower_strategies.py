"""Every strategy class of ``flwr.serverapp.strategy`` through ``fedwa run`` for 2 rounds on
digits, by import path: fedwa's evaluation, results folder and checkpoints around Flower's math
(tests/test_checkpoint.py SIGKILLs and resumes Flower's FedAdam by import path);
the DP wrappers wrap a named inner strategy; a strategy whose state is not data runs without
checkpoints and says so once."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from fedwa.callbacks.checkpoint import load_checkpoint
from fedwa.cli import main as cli_main
from fedwa.callbacks.results import read_rounds

FLWR = "flwr.serverapp.strategy:"
TINY = ["--set", "dataset=digits", "--set", "model=mlp", "--set", "num-clients=4",
        "--set", "num-server-rounds=2", "--set", "local-steps=3", "--set", "imbalance-ratio=1.0"]
DP_ARGS = "{noise_multiplier = 0.1, clipping_norm = 5.0}"
STRATEGIES = {
    **{name: "" for name in ("FedAvg", "FedAvgM", "FedProx", "FedMedian", "FedTrimmedAvg",
                             "Krum", "MultiKrum", "Bulyan", "FedAdam", "FedYogi", "FedAdagrad",
                             "QFedAvg")},
    "DifferentialPrivacyServerSideFixedClipping": DP_ARGS,
    "DifferentialPrivacyClientSideFixedClipping":
        DP_ARGS[:-1] + ', strategy = "flwr.serverapp.strategy:FedMedian"}',
}


def run(tmp_path: Path, name: str, *extra: str) -> int:
    return cli_main(["run", "--quiet", *TINY, "--set", f"output-dir={tmp_path}",
                     "--set", f"run-name={name}", *extra])


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_flower_strategy_runs_through_fedwa_with_results_and_checkpoints(
        tmp_path: Path, name: str) -> None:
    args = ["--set", f"strategy-args='{STRATEGIES[name]}'"] if STRATEGIES[name] else []
    assert run(tmp_path, name, "--set", f"strategy={FLWR}{name}", *args) == 0
    run_dir = tmp_path / name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["checkpoint_round"] == 2
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients_ok"] == 4 for r in rounds[1:])
    assert 0.0 <= rounds[-1]["accuracy"] <= 1.0
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["round"] == 2 and isinstance(checkpoint["strategy"], dict)
    if name == "DifferentialPrivacyClientSideFixedClipping":
        # fedwa's ClientApp clipped its updates to the wrapper's norm.
        assert rounds[-1]["client_train"]["clipping-norm"] == 5.0


def test_state_a_checkpoint_cannot_hold_turns_checkpoints_off_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module = "fedwa_test_locked_strategy"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        import threading

        from flwr.serverapp.strategy import FedAvg


        class Locked(FedAvg):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.lock = threading.Lock()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with caplog.at_level("WARNING", logger="fedwa"):
            assert run(tmp_path, "locked", "--set", f"strategy={module}:Locked") == 0
    finally:
        sys.modules.pop(module, None)
    lines = [r.getMessage() for r in caplog.records if "checkpoints are off" in r.getMessage()]
    assert len(lines) == 1 and "Locked.lock is a _thread.lock" in lines[0]
    assert "cannot be resumed" in lines[0]
    run_dir = tmp_path / "locked"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert not (run_dir / "checkpoint.pt").exists()


@pytest.mark.parametrize("extra, says", [
    (["--set", f"strategy={FLWR}QFedAvg", "--set", "strategy-args='{bogus = 1}'"],
     "'strategy-args' = 'bogus = 1' is not allowed: a keyword argument of QFedAvg"),
    (["--set", f"strategy={FLWR}DifferentialPrivacyServerSideFixedClipping"],
     "required argument 'noise_multiplier'"),
    (["--set", f"strategy={FLWR}DifferentialPrivacyServerSideFixedClipping",
      "--set", f"strategy-args='{DP_ARGS}'", "--set", "model=cnn"],
     "a model without integer buffers"),
])
def test_a_bad_flower_strategy_setup_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], says: str) -> None:
    assert run(tmp_path, "bad", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (tmp_path / "bad").exists()
