"""Checkpoints and resume: a run killed with SIGKILL mid-round resumes from its last
checkpoint, loses at most the round in flight, and ends with exactly the metrics of a run that
was never interrupted (CPU, same seed)."""

from __future__ import annotations

import json
import shutil
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedwa.callbacks.checkpoint import (CHECKPOINT_NAME, load_checkpoint, resume_config, rng_state,
                                        save_checkpoint, set_rng_state)
from fedwa.cli import main as cli_main
from fedwa.cli import simulate
from fedwa.run.config import resolve_config
from fedwa.common.errors import CheckpointError, ConfigError
from fedwa.callbacks.results import read_rounds

REPO = Path(__file__).resolve().parents[1]
# Rounds of ~0.3 s: long enough to be killed in the middle of one.
SMALL = {"dataset": "digits", "model": "mlp", "num-clients": 3, "num-server-rounds": 5,
         "local-steps": 60, "imbalance-ratio": 1.0,
         "checkpoint-min-seconds": 0.0}  # these rounds are short: checkpoint every one
TIMING = {"seconds", "train-seconds", "align-seconds", "merge-seconds"}


def comparable(rounds: list[dict]) -> list[dict]:
    """Round records without wall-clock times."""
    out = []
    for record in rounds:
        record = {k: v for k, v in record.items() if k not in TIMING}
        if record.get("client_train"):
            record["client_train"] = {k: v for k, v in record["client_train"].items()
                                      if k not in TIMING}
        out.append(record)
    return out


# --- the file ---------------------------------------------------------------------------------


def test_a_checkpoint_is_written_whole_and_read_back(tmp_path: Path) -> None:
    state = {"round": 3, "arrays": {"w": torch.arange(6.0).reshape(2, 3)}, "rng": rng_state()}
    save_checkpoint(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary left
    loaded = load_checkpoint(tmp_path)
    assert loaded["round"] == 3 and torch.equal(loaded["arrays"]["w"], state["arrays"]["w"])


def test_a_missing_or_torn_checkpoint_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="has no checkpoint.pt"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 half a file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)


def test_rng_states_round_trip() -> None:
    saved = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


# --- what a resumed run may change ------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    run_dir = out / "run"
    run_dir.mkdir()
    simulate(resolve_config({**SMALL, "num-server-rounds": 2, "output-dir": str(out)}), run_dir,
             show_progress=False, plot=False)
    return run_dir


@pytest.fixture()
def unfinished(finished: Path, tmp_path: Path) -> Path:
    """``finished`` as if killed after its last checkpoint, before summary.json."""
    run_dir = tmp_path / "unfinished"
    shutil.copytree(finished, run_dir)
    (run_dir / "summary.json").unlink()
    return run_dir


def test_resume_keeps_the_saved_config_and_takes_only_runtime_keys(unfinished: Path) -> None:
    finished = unfinished
    overrides = resume_config(finished, {"round-timeout": 60.0})
    assert overrides["resume"] == str(finished.resolve())
    assert overrides["round-timeout"] == 60.0 and overrides["model"] == "mlp"
    with pytest.raises(ConfigError, match="'lr' = 0.5 is not allowed: not changeable on resume"):
        resume_config(finished, {"lr": 0.5})


def test_the_cli_refuses_a_folder_without_checkpoint_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"strategy": "fedavg"}))
    assert cli_main(["run", "--resume", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no checkpoint.pt to resume from" in err[0]
    assert cli_main(["run", "--resume", str(tmp_path / "nowhere")]) == 1
    assert "not a fedwa run folder" in capsys.readouterr().err


def test_a_checkpoint_of_another_config_is_refused(unfinished: Path, tmp_path: Path) -> None:
    from fedwa.run.compose import check_resumable

    finished = unfinished
    checkpoint = load_checkpoint(finished)
    config = resolve_config({**resume_config(finished), "lr": 0.01})
    with pytest.raises(CheckpointError, match="written with lr = 0.05, this run has 0.01"):
        check_resumable(checkpoint, config)


def test_a_truncated_metrics_file_is_refused_before_resuming(unfinished: Path,
                                                             tmp_path: Path) -> None:
    # The checkpoint counts the records; metrics.jsonl holds them (rounds 0, 1, 2).
    damaged = tmp_path / "damaged"
    shutil.copytree(unfinished, damaged)
    lines = (damaged / "metrics.jsonl").read_text().splitlines(keepends=True)
    (damaged / "metrics.jsonl").write_text("".join(lines[:2]))
    with pytest.raises(CheckpointError, match="holds 2 round records up to round 2, the "
                                              "checkpoint counted 3"):
        resume_config(damaged)


def folder_bytes(run_dir: Path) -> dict[str, bytes]:
    """Every file of a folder, by name, with its contents."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def test_resuming_a_finished_run_is_refused_and_changes_nothing(
        finished: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 17: it rewrote summary.json (total_seconds 8.51 -> 0.07) and model.pt."""
    before = folder_bytes(finished)
    assert cli_main(["run", "--quiet", "--resume", str(finished)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a finished run (summary.json: status completed)" in err[0]
    assert folder_bytes(finished) == before


def test_checkpoint_every_zero_writes_none(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    simulate(resolve_config({**SMALL, "num-server-rounds": 1, "checkpoint-every": 0,
                             "output-dir": str(tmp_path)}), run_dir, show_progress=False,
             plot=False)
    assert not (run_dir / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("min_seconds, saved", [(0.0, [0, 1, 2, 3]), (3600.0, [0, 3])])
def test_checkpoints_younger_than_min_seconds_are_skipped_but_never_the_last(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_seconds: float,
        saved: list[int]) -> None:
    import fedwa.callbacks.checkpoint

    rounds: list[int] = []
    real = fedwa.callbacks.checkpoint.save_checkpoint
    monkeypatch.setattr(fedwa.callbacks.checkpoint, "save_checkpoint",
                        lambda run_dir, payload: (rounds.append(payload["round"]),
                                                  real(run_dir, payload))[1])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    simulate(resolve_config({**SMALL, "num-server-rounds": 3, "local-steps": 2,
                             "checkpoint-min-seconds": min_seconds,
                             "output-dir": str(tmp_path)}), run_dir, show_progress=False,
             plot=False)
    assert rounds == saved
    assert load_checkpoint(run_dir)["records_count"] == 4  # rounds 0-3 in metrics.jsonl


# --- SIGKILL mid-round, then resume -----------------------------------------------------------


def kill_after_checkpoint(settings: dict, run_dir: Path, after_round: int) -> int:
    """Start ``fedwa run`` in a child process, SIGKILL it as soon as the checkpoint of
    ``after_round`` exists (the next round is then in flight); return the checkpoint's round."""
    args = [sys.executable, "-m", "fedwa.cli", "run", "--quiet"]
    for key, value in {**settings, "output-dir": str(run_dir.parent),
                       "run-name": run_dir.name}.items():
        args += ["--set", f"{key}={value}"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    child = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    checkpoint = run_dir / CHECKPOINT_NAME
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise AssertionError("the run ended before it could be killed: "
                                     + child.stderr.read().decode()[-2000:])
            if checkpoint.exists():
                try:
                    done = int(load_checkpoint(run_dir)["round"])
                except CheckpointError:  # being replaced right now
                    done = -1
                if done >= after_round:
                    child.send_signal(signal.SIGKILL)
                    child.wait()
                    return done
            time.sleep(0.01)
        raise AssertionError("no checkpoint appeared in time")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("strategy", ["fedavg", "flwr.serverapp.strategy:FedAdam", "hwa", "partial", "dimat", "imwa-batched"])
def test_a_killed_run_resumes_to_the_metrics_of_an_uninterrupted_one(
        tmp_path: Path, strategy: str) -> None:
    # Flower's FedAdam by import path: its moments live in attributes (strategies.foreign).
    settings = {**SMALL, "strategy": strategy}
    if strategy == "imwa-batched":  # IMWA's replicas trained together (batch-clients)
        settings.update({"strategy": "imwa", "partition": "replicas", "batch-clients": True})
    if strategy == "hwa":
        settings["hwa-window"] = 2  # the offline average is in the checkpointed state
    rounds = int(settings["num-server-rounds"])
    whole = tmp_path / "whole"
    whole.mkdir()
    simulate(resolve_config({**settings, "output-dir": str(tmp_path)}), whole,
             show_progress=False, plot=False)

    killed = tmp_path / "killed"
    done = kill_after_checkpoint(settings, killed, after_round=2)
    written = read_rounds(killed)
    assert not (killed / "summary.json").exists()
    # At most the round in flight is lost: every round up to the checkpoint is on disk.
    assert done < rounds and len(written) >= done + 1

    assert cli_main(["run", "--quiet", "--resume", str(killed)]) == 0
    resumed = read_rounds(killed)
    assert [r["round"] for r in resumed] == list(range(rounds + 1))
    assert comparable(resumed) == comparable(read_rounds(whole))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["resumes"] == [{"after_round": done,
                                   "seconds_to_resume": summary["resumes"][0][
                                       "seconds_to_resume"]}]
    final = torch.load(killed / "model.pt", weights_only=True)
    expected = torch.load(whole / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_flwr_runs_entry_point_resumes_a_failed_run_from_its_run_config(tmp_path: Path) -> None:
    """``flwr run . --run-config "resume='/abs/run'"`` goes through the ServerApp's ``main``;
    here a run whose clients all fail from round 3 on is resumed that way."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    import fedwa.apps.client_app as client
    from fedwa.run.config import load_toml
    from fedwa.common.errors import TooFewRepliesError
    from fedwa.flower.local_backend import run_in_process
    from fedwa.apps.server_app import app as server_app
    from fedwa.apps.server_app import build_server_app

    settings = {**SMALL, "num-server-rounds": 4, "local-steps": 5}
    config = resolve_config({**settings, "output-dir": str(tmp_path)})
    failing = ClientApp()

    @failing.train()
    def train(message: Message, context: Context) -> Message:
        if int(message.content["config"]["server-round"]) >= 3:
            raise RuntimeError("the site went offline")
        return client.train(message, context)

    failing.query()(client.query)
    run_dir = tmp_path / "run"
    with pytest.raises(TooFewRepliesError):
        run_in_process(build_server_app(config, run_dir, plot=False), failing, 3)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert load_checkpoint(run_dir)["round"] == 2

    # What `flwr run .` hands the ServerApp: every key of pyproject.toml, plus the override.
    run_config = {**load_toml(REPO / "pyproject.toml"), "resume": str(run_dir)}
    run_in_process(server_app, client.app, 3, run_config=run_config)
    whole = tmp_path / "whole"
    whole.mkdir()
    simulate(config, whole, show_progress=False, plot=False)
    assert comparable(read_rounds(run_dir)) == comparable(read_rounds(whole))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


# --- issue 17, section 3: resume hardening ------------------------------------------------------


class Stopped(Exception):
    """Stands in for a kill: raised where the run would have died."""


def stop_after(monkeypatch: pytest.MonkeyPatch, checkpointed: int, stop_round: int) -> None:
    """Make the next run checkpoint only rounds up to ``checkpointed`` (as
    ``checkpoint-min-seconds`` does on short rounds) and die once round ``stop_round`` is
    recorded, before its checkpoint: deterministic where a SIGKILL is not."""
    import fedwa.run.compose as compose  # the composition root builds the checkpointer

    class Stopping(compose.Checkpointer):
        def __call__(self, server_round: int, arrays: object) -> None:
            if server_round == stop_round:
                raise Stopped(f"killed after round {server_round}")
            if server_round <= checkpointed:
                super().__call__(server_round, arrays)

    monkeypatch.setattr(compose, "Checkpointer", Stopping)


def run_stopped(settings: dict, run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                checkpointed: int, stop_round: int) -> None:
    """Run ``settings`` in this process into ``run_dir`` until :func:`stop_after` stops it."""
    import fedwa.apps.client_app as client
    from fedwa.flower.local_backend import run_in_process
    from fedwa.apps.server_app import build_server_app

    config = resolve_config({**settings, "output-dir": str(run_dir.parent)})
    stop_after(monkeypatch, checkpointed, stop_round)
    try:
        with pytest.raises(Stopped):
            run_in_process(build_server_app(config, run_dir, plot=False), client.app,
                           int(config["num-clients"]))
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("strategy", ["fedavg", "gossip"])
def test_a_run_resumed_from_its_round_0_checkpoint_records_round_0_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    """Issue 17: metrics.jsonl read [0, 0, 1, 2, ...] after a resume from the checkpoint of
    round 0 (run_rounds evaluated round 0 again whenever the first round was 1)."""
    settings = {**SMALL, "strategy": strategy, "num-server-rounds": 3, "local-steps": 5}
    run_dir = tmp_path / "run"
    run_stopped(settings, run_dir, monkeypatch, checkpointed=0, stop_round=2)
    assert load_checkpoint(run_dir)["round"] == 0
    assert [r["round"] for r in read_rounds(run_dir)] == [0, 1, 2]

    assert cli_main(["run", "--quiet", "--resume", str(run_dir)]) == 0
    assert [r["round"] for r in read_rounds(run_dir)] == [0, 1, 2, 3]
    whole = tmp_path / "whole"
    whole.mkdir()
    simulate(resolve_config({**settings, "output-dir": str(tmp_path)}), whole,
             show_progress=False, plot=False)
    assert comparable(read_rounds(run_dir)) == comparable(read_rounds(whole))
    # Every file a run saves is plain tensors: it loads with weights_only=True.
    saved = ["model.pt"] + (["node_models.pt"] if strategy == "gossip" else [])
    for name in saved:
        assert not torch.serialization.get_unsafe_globals_in_checkpoint(run_dir / name)
        torch.load(run_dir / name, weights_only=True)


class Hostile:
    """Pickles as a call of ``open(path, "w")``: loading it with weights_only=False creates
    ``path``, as the tester's 114-byte pickle ran ``os.system``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


class HostileCommand(Hostile):
    """The tester's case: a pickle that runs a shell command (here one that makes a file)."""

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


def hostile_file(path: Path, target: Path, kind: str) -> None:
    """A checkpoint.pt that would create ``target`` if it were unpickled freely."""
    import pickle

    if kind == "torch-zip":
        torch.save({"format": 2, "round": 0, "x": Hostile(target)}, path)
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps(Hostile(target)))
    elif kind == "os-system":
        path.write_bytes(pickle.dumps(HostileCommand(target), protocol=2))
    else:  # a format-1 file: numpy RNG state (allowed for it) beside the hostile object
        torch.save({"format": 1, "rng": {"numpy": np.random.get_state()},
                    "x": Hostile(target)}, path)


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle", "os-system", "format-1"])
def test_a_hostile_checkpoint_is_refused_in_one_line_and_never_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    """Issue 17: --resume ran code from checkpoint.pt (torch.load(weights_only=False))."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"strategy": "fedavg"}))
    target = tmp_path / "pwned"
    hostile_file(run_dir / CHECKPOINT_NAME, target, kind)
    assert cli_main(["run", "--quiet", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not target.exists()
    assert len(err) == 1 and "was refused and not loaded" in err[0]
    assert ("system" if kind == "os-system" else "open") in err[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [CHECKPOINT_NAME, "config.json"]


def test_a_checkpoint_is_plain_data_for_a_weights_only_load(finished: Path) -> None:
    """Whatever reads a checkpoint (fedwa or anyone's torch.load) needs no pickled objects:
    numpy's RNG state is stored as a tensor and comes back as numpy's state."""
    raw = torch.load(finished / CHECKPOINT_NAME, weights_only=True)
    assert raw["format"] == 2
    assert not torch.serialization.get_unsafe_globals_in_checkpoint(finished / CHECKPOINT_NAME)
    state = load_checkpoint(finished)["rng"]["numpy"]
    assert isinstance(state[1], np.ndarray) and state[1].dtype == np.uint32
    np.random.set_state(state)


def test_state_that_is_not_data_turns_checkpoints_off_at_the_start(tmp_path: Path) -> None:
    """A strategy state a safe load could not read back is found before the first round."""
    from fedwa.callbacks.checkpoint import Checkpointer
    from fedwa.callbacks.results import ResultsWriter

    class Odd:
        def state_dict(self) -> dict:
            return {"kept": [1, {"sampler": random.Random(0)}]}

    config = resolve_config({**SMALL, "output-dir": str(tmp_path)})
    checkpointer = Checkpointer(ResultsWriter(tmp_path), config, Odd(), grid=None,
                                total_rounds=1)
    assert checkpointer.every == 0
    assert "state_dict()['kept'][1]['sampler'] is a random.Random" in checkpointer.unsavable


def test_a_format_1_checkpoint_still_resumes_without_unpickling_objects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints of the previous format pickled numpy RNG states (and numpy arrays of
    Flower strategies' attributes); they load with numpy's array reconstructors allowed, and
    nothing else, and the run continues exactly."""
    settings = {**SMALL, "strategy": "flwr.serverapp.strategy:FedAdam", "num-server-rounds": 3,
                "local-steps": 5}
    run_dir = tmp_path / "run"
    run_stopped(settings, run_dir, monkeypatch, checkpointed=1, stop_round=2)
    old = load_checkpoint(run_dir)
    torch.save({**old, "format": 1}, run_dir / CHECKPOINT_NAME)  # numpy arrays pickled
    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(run_dir / CHECKPOINT_NAME))
    assert "numpy.ndarray" in names and all(n.startswith("numpy.") for n in names)

    assert cli_main(["run", "--quiet", "--resume", str(run_dir)]) == 0
    assert load_checkpoint(run_dir)["format"] == 2  # later checkpoints are the new format
    whole = tmp_path / "whole"
    whole.mkdir()
    simulate(resolve_config({**settings, "output-dir": str(tmp_path)}), whole,
             show_progress=False, plot=False)
    assert comparable(read_rounds(run_dir)) == comparable(read_rounds(whole))


def cli_sets(settings: dict) -> list[str]:
    """``--set key=value`` arguments for ``settings``."""
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def test_a_second_process_cannot_resume_a_folder_in_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Issue 17: two resumes of one folder at once interleaved their rounds and both exited
    0. The folder's lock is held here by another process, as a running resume holds it."""
    settings = {**SMALL, "num-server-rounds": 3, "local-steps": 5}
    run_dir = tmp_path / "run"
    run_stopped(settings, run_dir, monkeypatch, checkpointed=1, stop_round=2)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fedwa.callbacks.runlock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
         str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, env=os.environ.copy())
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = folder_bytes(run_dir)
        assert cli_main(["run", "--quiet", "--resume", str(run_dir)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert f"is in use by another fedwa run (process {holder.pid}); nothing was" in err[0]
        assert folder_bytes(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    # Once the other process is gone (even killed), the folder resumes.
    assert cli_main(["run", "--quiet", "--resume", str(run_dir)]) == 0
    assert [r["round"] for r in read_rounds(run_dir)] == [0, 1, 2, 3]
    assert not (run_dir / ".fedwa.lock").exists()


def test_a_new_run_holds_its_folder_lock_until_it_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New runs lock their folder too: a resume cannot start on a run that is still going."""
    import fedwa.run.compose as compose
    from fedwa.common.errors import RunFolderBusyError
    from fedwa.callbacks.runlock import RunLock

    seen: list[object] = []

    class Probing(compose.Checkpointer):
        def __call__(self, server_round: int, arrays: object) -> None:
            if server_round == 1:
                try:
                    RunLock(self.writer.run_dir).acquire().release()
                    seen.append("acquired")
                except RunFolderBusyError as err:
                    seen.append(err)
            super().__call__(server_round, arrays)

    monkeypatch.setattr(compose, "Checkpointer", Probing)
    run_dir = tmp_path / "run"
    settings = {**SMALL, "num-server-rounds": 2, "local-steps": 2, "output-dir": tmp_path,
                "run-name": "run"}
    assert cli_main(["run", "--quiet", *cli_sets(settings)]) == 0
    assert len(seen) == 1 and isinstance(seen[0], RunFolderBusyError)
    assert not (run_dir / ".fedwa.lock").exists()
    RunLock(run_dir).acquire().release()  # let go at the end


def test_an_error_inside_the_server_app_is_shown_and_its_empty_folder_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Issue 17: a bad was-layers value that reached the ServerApp (here: with the CLI's
    pre-checks skipped) showed only 'the run stopped before writing summary.json', even
    with --verbose, and left an empty run folder."""
    import fedwa.cli

    monkeypatch.setattr(fedwa.cli, "check_runnable", lambda config: None)
    out = tmp_path / "out"
    settings = {**SMALL, "model": "cnn", "was-layers": "bogus", "output-dir": out}
    assert cli_main(["run", "--quiet", "--verbose", *cli_sets(settings)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if line.startswith("fedwa: error")]
    assert len(err) == 1 and "config key 'was-layers' = 'bogus' is not allowed" in err[0]
    assert list(out.iterdir()) == []


def test_an_edited_config_on_resume_is_said_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Issue 17: an edited config.json on resume ended as 'the run stopped before writing
    summary.json'. The CLI says it before the engine starts; a caller that skips that check
    (simulate) still gets the ServerApp's own message."""
    settings = {**SMALL, "num-server-rounds": 3, "local-steps": 5}
    run_dir = tmp_path / "run"
    run_stopped(settings, run_dir, monkeypatch, checkpointed=1, stop_round=2)
    (run_dir / "summary.json").unlink()  # as a SIGKILL leaves it
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**saved, "lr": 0.01}))
    before = folder_bytes(run_dir)
    assert cli_main(["run", "--quiet", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was written with lr = 0.05, this run has 0.01" in err[0]
    assert folder_bytes(run_dir) == before

    with pytest.raises(CheckpointError, match="written with lr = 0.05, this run has 0.01"):
        simulate(resolve_config(resume_config(run_dir)), run_dir, show_progress=False,
                 plot=False)
    assert folder_bytes(run_dir) == before


def test_set_resume_is_refused_before_any_folder_is_made(
        unfinished: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 17: ``--set resume=DIR`` resumed the old run from inside a new one, exited 1
    and left an empty ``-2`` folder."""
    parent = unfinished.parent
    listing = sorted(p.name for p in parent.iterdir())
    before = folder_bytes(unfinished)
    settings = {"resume": unfinished, "output-dir": parent, "run-name": unfinished.name}
    assert cli_main(["run", "--quiet", *cli_sets(settings)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"use: fedwa run --resume {unfinished}" in err[0]
    assert sorted(p.name for p in parent.iterdir()) == listing
    assert folder_bytes(unfinished) == before


def test_strategy_state_of_every_shape_round_trips_through_a_weights_only_load() -> None:
    """What strategies' state_dicts hold (foreign.attribute_state's tagged dicts with numpy
    arrays, random states, Flower records, numpy scalars, nested containers) comes back
    equal, in type and bytes, from a file torch reads with weights_only=True."""
    import io
    from collections import OrderedDict

    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    from fedwa.callbacks.safe_state import from_plain, to_plain
    from strategies.foreign import _plain

    state = {
        "foreign": _plain({"m_t": ArrayRecord({"w": torch.ones(2, 3)}).to_numpy_ndarrays(),
                           "pair": (np.float32(1.5), None), "rng": random.Random(3)}, "x"),
        "numpy_rng": np.random.get_state(),
        "arrays": {"u32": np.arange(3, dtype=np.uint32), "big": np.arange(2, dtype=">f8"),
                   "text": np.array(["a", "bc"]), "empty": np.zeros((0, 2), np.float16)},
        "scalars": [np.float64(0.25), np.int64(-3), np.bool_(True)],
        "record": ArrayRecord(OrderedDict(w=torch.arange(4.0), n=torch.tensor(7))),
        "metrics": MetricRecord({"a": 1.0, "b": [1, 2]}), "config": ConfigRecord({"s": b"x"}),
        "tensors": OrderedDict(w=torch.nn.Parameter(torch.ones(2))), "nested": [(1, "a"), {}],
    }
    buffer = io.BytesIO()
    torch.save(to_plain(state), buffer)
    buffer.seek(0)
    back = from_plain(torch.load(buffer, weights_only=True))

    def same(a: object, b: object) -> bool:
        if isinstance(a, torch.Tensor):
            return type(b) is torch.Tensor and torch.equal(a.detach(), b)
        if isinstance(a, np.ndarray):
            return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
        if isinstance(a, np.generic):
            return type(a) is type(b) and a == b
        if isinstance(a, ArrayRecord):
            return isinstance(b, ArrayRecord) and [(k, v.dtype, v.shape, v.data) for k, v in
                                                    a.items()] == [(k, v.dtype, v.shape, v.data)
                                                                   for k, v in b.items()]
        if isinstance(a, (MetricRecord, ConfigRecord)):
            return type(a) is type(b) and dict(a) == dict(b)
        if isinstance(a, dict):
            return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k])
                                                                     for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return type(a) is type(b) and a == b

    assert same(state, back)


@pytest.mark.parametrize("name", ["swa", "fedadam"])
def test_a_checkpoint_written_by_the_flat_layout_resumes_exactly(tmp_path: Path,
                                                                 name: str) -> None:
    """Issue 19: these runs were stopped after round 3 of 3 (checkpoint of round 2) by fedwa
    before its modules moved into layers (commit d51fd2b, ``fedwa/checkpoint.py``). The
    checkpoint names no module path, so the moved code reads it, and the resumed run ends with
    the metrics and model of a run made from scratch by the moved code."""
    run_dir = tmp_path / name
    shutil.copytree(REPO / "tests" / "data" / "old_layout_runs" / name, run_dir)
    assert load_checkpoint(run_dir)["round"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"

    assert cli_main(["run", "--quiet", "--resume", str(run_dir)]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    whole = tmp_path / "whole"
    whole.mkdir()
    simulate(resolve_config({**{k: v for k, v in saved.items() if k != "resume"},
                             "output-dir": str(tmp_path)}), whole, show_progress=False,
             plot=False)
    resumed = read_rounds(run_dir)
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    assert comparable(resumed) == comparable(read_rounds(whole))
    final = torch.load(run_dir / "model.pt", weights_only=True)
    expected = torch.load(whole / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
