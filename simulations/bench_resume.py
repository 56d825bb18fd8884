"""What a SIGKILL costs a run, and how long resuming takes.

Runs one config three ways, on the same machine in the same invocation:

1. uninterrupted (``fedwa run``);
2. killed with SIGKILL in the middle of round ``--kill-in + 1`` (as soon as the checkpoint of
   round ``--kill-in`` exists, plus ``--into`` seconds);
3. resumed with ``fedwa run --resume``.

Prints the rounds on disk and checkpointed at the kill, the training time lost (the part of
the in-flight round that ran), the resume's wall time (process start included) and its time to
resume inside the ServerApp (loading the checkpoint, restoring clients), and whether the
resumed run's final metrics equal the uninterrupted run's.

    python simulations/bench_resume.py                              # digits, mlp, 3 clients
    python simulations/bench_resume.py simulations/fmnist_longtail.toml \\
        --set num-server-rounds=6 --kill-in 3 --into 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedwa.callbacks.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedwa.common.errors import CheckpointError
from fedwa.callbacks.results import read_rounds

DEFAULTS = ["dataset=digits", "model=mlp", "num-clients=3", "num-server-rounds=6",
            "local-steps=100", "checkpoint-min-seconds=0"]
TIMING = {"seconds", "client_train"}


def fedwa_run(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedwa.cli", "run", "--quiet", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def checkpointed_round(run_dir: Path) -> int:
    try:
        return int(load_checkpoint(run_dir)["round"]) if (run_dir / CHECKPOINT_NAME).exists() \
            else -1
    except CheckpointError:  # being replaced at this instant
        return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="TOML run config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kill-in", type=int, default=3,
                        help="kill once this round is checkpointed (default 3)")
    parser.add_argument("--into", type=float, default=0.15,
                        help="seconds into the next round to kill (default 0.15)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    sets = [s for pair in DEFAULTS + args.set for s in ("--set", pair)]
    common = ([args.config] if args.config else []) + sets + ["--set", f"output-dir={out}"]

    started = time.perf_counter()
    whole = fedwa_run(common + ["--set", "run-name=whole"])
    if whole.wait():
        print(whole.stderr.read().decode(), file=sys.stderr)
        return 1
    whole_seconds = time.perf_counter() - started

    killed_dir = out / "killed"
    child = fedwa_run(common + ["--set", "run-name=killed"])
    while checkpointed_round(killed_dir) < args.kill_in:
        if child.poll() is not None:
            print("the run ended before the kill", file=sys.stderr)
            return 1
        time.sleep(0.01)
    time.sleep(args.into)
    child.send_signal(signal.SIGKILL)
    killed_at = time.time()
    child.wait()
    # The work lost is what ran after the last checkpoint that reached the disk.
    lost = killed_at - (killed_dir / CHECKPOINT_NAME).stat().st_mtime
    on_disk = read_rounds(killed_dir)
    done = checkpointed_round(killed_dir)

    started = time.perf_counter()
    resumed = fedwa_run(["--resume", str(killed_dir)])
    if resumed.wait():
        print(resumed.stderr.read().decode(), file=sys.stderr)
        return 1
    resume_seconds = time.perf_counter() - started
    summary = json.loads((killed_dir / "summary.json").read_text())
    a, b = read_rounds(out / "whole"), read_rounds(killed_dir)
    same = [{k: v for k, v in r.items() if k not in TIMING} for r in a] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in b]
    model_same = all(torch.equal(x, y) for x, y in zip(
        torch.load(out / "whole" / "model.pt", weights_only=True).values(),
        torch.load(killed_dir / "model.pt", weights_only=True).values()))
    per_round = sum(r["seconds"] for r in a[1:]) / max(len(a) - 1, 1)
    print(f"config: {' '.join(common[:-2])}")
    print(f"uninterrupted run: {whole_seconds:.1f} s wall, {per_round:.2f} s per round")
    print(f"killed {lost:.2f} s after round {done}'s checkpoint: {len(on_disk) - 1} rounds in "
          f"metrics.jsonl, {done} checkpointed; lost: {lost:.2f} s of round {done + 1}, "
          f"the round in flight")
    print(f"resume: {resume_seconds:.1f} s wall for {len(b) - 1 - done} remaining rounds "
          f"(process start included); time to resume inside the ServerApp "
          f"{summary['resumes'][0]['seconds_to_resume']:.3f} s; checkpoints cost "
          f"{summary['checkpoint_seconds']:.3f} s in the resumed part")
    print(f"resumed run's records equal the uninterrupted run's: {same}; final model equal: "
          f"{model_same}; checkpoint.pt is {(killed_dir / CHECKPOINT_NAME).stat().st_size / 1e6:.2f} MB")
    print(f"runs kept in {out}")
    return 0 if same and model_same else 1


if __name__ == "__main__":
    sys.exit(main())
