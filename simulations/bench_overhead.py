"""fedwa's simulation backends against a plain single-process loop doing the same training.

Every side calls the same functions (data, model, `train_local`, `weighted_average`, central
evaluation) with the same seeds, so they compute the same models; the script reports whether
the final accuracies agree and prints the wall times and their ratios to the loop. Start-up is
included on every side (for Ray: starting Ray and the actors importing torch; for the loop:
building data and model).

    python simulations/bench_overhead.py                       # 10 clients x 20 rounds, cnn
    python simulations/bench_overhead.py --set dataset=digits --set model=mlp
    python simulations/bench_overhead.py --sides loop,local --repeats 3

Sides: `loop`; `local` (the in-process backend, fedwa's default); `batched` (the local backend
with `batch-clients = true`: a round's clients trained in one batched computation, equal to the
loop's training to float tolerance only); `ray2` (Ray, two CPUs per client, so one client at a
time like the loop); `ray1` (Ray, one CPU per client: two clients train at once on 2 cores). With `--repeats n` the sides take turns n times and each side's
fastest time counts, which damps the noise of these shared machines. Compare ratios from one
run, not seconds across runs.

Whole-process mode (``--whole-process``) times what a user waits for: each side is a fresh
Python process, from its start to its exit. ``loop`` is the plain loop above in a process that
imports only torch and the fedwa functions it calls; ``fedwa`` is the real command
(``python -m fedwa.cli run --set ... --quiet``, local backend, batching off, accuracy.png
drawn), once with this checkout's code and, with ``--baseline DIR``, once with the code in
DIR (e.g. an export of main), taking turns. For every side it reports the process wall time,
the rounds (the loop's rounds; ``fedwa.flower.rounds.run_rounds`` in the command, timed by wrapping
it before the ServerApp imports it), start-up = wall - rounds (interpreter, imports, data,
writing results, the plot, exit), the same three in CPU seconds (``wait4``'s user + system
time; ``process_time`` for the rounds), which other processes on a shared machine disturb
far less than wall time, and the peak RSS (``wait4``'s ``ru_maxrss``); then each
side's ratios to the loop, whether the sides' final accuracies agree and whether baseline and
candidate wrote the same ``metrics.jsonl`` apart from timings.

    python simulations/bench_overhead.py --whole-process --baseline /tmp/main-export \
        --repeats 3 --clients 100 --set dataset=digits --set model=mlp --set partition=iid \
        --set imbalance-ratio=1 --set local-steps=1 --set batch-size=32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from plain_fedavg import fedavg_loop

from fedwa.cli import FLOWER_ENV, simulate
from fedwa.run.config import parse_set, resolve_config
from fedwa.callbacks.results import read_rounds
from fedwa.data.task import federated_data


def plain_loop(config: dict, out: Path | None = None) -> tuple[float, float]:
    """FedAvg as a plain loop (:func:`plain_fedavg.fedavg_loop`); (seconds, final accuracy)."""
    started = time.perf_counter()
    result = fedavg_loop(config)
    return time.perf_counter() - started, result["accuracies"][-1]


def flower(config: dict, out: Path, backend: str, client_cpus: float = 1.0,
           batch_clients: bool = False) -> tuple[float, float]:
    config = resolve_config({**config, "backend": backend, "client-cpus": client_cpus,
                             "batch-clients": batch_clients})
    run_dir = out / f"{backend}-cpus{client_cpus:g}-{time.monotonic_ns()}"
    run_dir.mkdir()
    started = time.perf_counter()
    # No accuracy.png: drawing it is a results feature (about 1 s of matplotlib), not
    # simulation, and the loop draws nothing either.
    simulate(config, run_dir, show_progress=False, plot=False)
    return time.perf_counter() - started, read_rounds(run_dir)[-1]["accuracy"]


SIDES = {
    "loop": plain_loop,
    "local": lambda config, out: flower(config, out, "local"),
    "batched": lambda config, out: flower(config, out, "local", batch_clients=True),
    "ray2": lambda config, out: flower(config, out, "ray", client_cpus=2.0),
    "ray1": lambda config, out: flower(config, out, "ray", client_cpus=1.0),
}


# The plain loop as a process of its own: torch and the few fedwa functions it calls, nothing
# of Flower, the CLI, results or plots. Same training as plain_loop() above.
LOOP_CHILD = """
import json, os, sys
sys.path.insert(0, sys.argv[2])  # simulations/, for plain_fedavg
from plain_fedavg import fedavg_loop
result = fedavg_loop(json.loads(sys.argv[1]))
import fedwa
print("BENCH " + json.dumps({"rounds_s": result["rounds_s"],
                            "rounds_cpu_s": result["rounds_cpu_s"],
                            "accuracy": result["accuracies"][-1],
                            "code_path": os.path.dirname(os.path.dirname(fedwa.__file__))}))
"""

# `fedwa run` as a user types it, with run_rounds timed. The wrapper is put in place before
# the ServerApp imports the function by name. `fedwa.rounds` is the flat path: a --baseline
# from before the layers has only that one, and the layered code still imports it (fedwa.MOVED)
# as the same module as fedwa.flower.rounds.
FEDWA_CHILD = """
import json, sys, time
import fedwa.rounds
inner = fedwa.rounds.run_rounds
took, cpu = [], []
def run_rounds(*args, **kwargs):
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        return inner(*args, **kwargs)
    finally:
        took.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
fedwa.rounds.run_rounds = run_rounds
from fedwa.cli import main
code = main(sys.argv[1:])
import fedwa, os
print("BENCH " + json.dumps({"rounds_s": sum(took), "rounds_cpu_s": sum(cpu), "code": code,
                            "code_path": os.path.dirname(os.path.dirname(fedwa.__file__))}))
"""

#: Keys of a metrics.jsonl record that hold wall-clock times, left out of the comparison.
TIMING_KEYS = ("seconds", "train-seconds", "seconds_to_resume")


def _untimed(value: Any) -> Any:
    """``value`` without its timing entries (recursively), for comparing two runs' records."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _child(args: list[str], pythonpath: str, log: Path) -> dict[str, Any]:
    """Run ``python args`` with ``PYTHONPATH=pythonpath``; its wall time, peak RSS, report."""
    env = {**os.environ, "PYTHONPATH": pythonpath, **FLOWER_ENV}
    with open(log, "w") as out:
        started = time.perf_counter()
        # -P: no script folder or working directory ahead of PYTHONPATH, else a `python -c`
        # child started inside a checkout imports that checkout's fedwa, not PYTHONPATH's.
        proc = subprocess.Popen([sys.executable, "-P", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{args[:3]} failed ({proc.returncode}):\n{text[-3000:]}")
    report = json.loads(lines[-1][len("BENCH "):])
    if report.get("code_path", pythonpath) != pythonpath:
        raise SystemExit(f"the child ran the fedwa in {report['code_path']}, not {pythonpath}")
    cpu = usage.ru_utime + usage.ru_stime
    report.update(wall_s=wall, startup_s=wall - report["rounds_s"], cpu_s=cpu,
                  startup_cpu_s=cpu - report["rounds_cpu_s"],
                  peak_rss_mib=usage.ru_maxrss / 1024)  # KiB on Linux
    return report


def whole_process(config: dict, baseline: str | None, repeats: int, out: Path) -> dict:
    """Every side as a fresh process, taking turns ``repeats`` times (see the docstring)."""
    here = str(Path(__file__).resolve().parents[1])
    sides = {"loop": here, "fedwa": here}
    if baseline:
        sides["baseline"] = str(Path(baseline).resolve())
    names = ("dataset", "model", "partition", "imbalance-ratio", "num-clients",
             "num-server-rounds", "local-steps", "local-epochs", "batch-size", "lr", "momentum",
             "weight-decay", "seed", "dirichlet-alpha", "evaluation")
    sets = [a for k in names for a in ("--set", f"{k}={config[k]}")]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for repeat in range(repeats):
        for side, path in sides.items():
            log = out / f"{side}-{repeat}.log"
            if side == "loop":
                args = ["-c", LOOP_CHILD, json.dumps(config), str(Path(__file__).resolve().parent)]
            else:
                args = ["-c", FEDWA_CHILD, "run", *sets, "--set", f"output-dir={out}",
                        "--set", f"run-name={side}-{repeat}", "--quiet"]
            report = _child(args, path, log)
            if side != "loop":
                rounds = read_rounds(out / f"{side}-{repeat}")
                report["accuracy"] = rounds[-1]["accuracy"]
                report["records"] = _untimed(rounds)
            runs[side].append(report)
            print(f"{side}: wall {report['wall_s']:.2f}s rounds {report['rounds_s']:.2f}s "
                  f"start-up {report['startup_s']:.2f}s | cpu {report['cpu_s']:.2f}s rounds "
                  f"{report['rounds_cpu_s']:.2f}s start-up {report['startup_cpu_s']:.2f}s | "
                  f"peak {report['peak_rss_mib']:.0f} MiB", flush=True)
    fields = ("wall_s", "rounds_s", "startup_s", "cpu_s", "rounds_cpu_s", "startup_cpu_s",
              "peak_rss_mib")
    # The median of the turns: less sensitive than the minimum to one lucky turn of a side.
    median = {side: {f: round(statistics.median(r[f] for r in reports), 3) for f in fields}
              for side, reports in runs.items()}
    figures: dict[str, Any] = {
        "workload": f"{config['model']} on {config['dataset']}, {config['num-clients']} "
                    f"clients x {config['num-server-rounds']} rounds, "
                    f"local-steps={config['local-steps']}",
        "repeats": repeats,
        "median": median,
        "runs": {side: [{f: round(r[f], 3) for f in fields} for r in reports]
                 for side, reports in runs.items()},
        "ratio_to_loop": {side: {f: round(m[f] / median["loop"][f], 3)
                                 for f in ("wall_s", "rounds_s", "cpu_s", "rounds_cpu_s")}
                          for side, m in median.items() if side != "loop"},
        "startup_minus_loop_s": {side: {f: round(m[f] - median["loop"][f], 3)
                                        for f in ("startup_s", "startup_cpu_s")}
                                 for side, m in median.items() if side != "loop"},
        "final_accuracy": {side: sorted({r["accuracy"] for r in reports})
                           for side, reports in runs.items()},
    }
    if baseline:
        figures["metrics_identical_to_baseline"] = all(
            r["records"] == b["records"] for r in runs["fedwa"] for b in runs["baseline"])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sides", default="loop,local,ray2",
                        help="comma-separated subset of " + ", ".join(SIDES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--whole-process", action="store_true",
                        help="each side a fresh process: wall, rounds, start-up, peak RSS")
    parser.add_argument("--baseline", metavar="DIR",
                        help="--whole-process: also run `fedwa run` with the code in DIR")
    args = parser.parse_args()
    if args.whole_process:
        for name, value in FLOWER_ENV.items():
            os.environ.setdefault(name, value)
        out = Path(tempfile.mkdtemp(prefix="fedwa-bench-"))
        config = resolve_config({
            "dataset": "fashion-mnist", "model": "cnn", "imbalance-ratio": 100.0,
            "partition": "dirichlet", "num-clients": args.clients,
            "num-server-rounds": args.rounds, "local-epochs": 1, "batch-size": 64,
            **parse_set(args.set)})
        figures = whole_process(config, args.baseline, args.repeats, out)
        print(json.dumps(figures, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        accuracies = {a for v in figures["final_accuracy"].values() for a in v}
        print("identical final accuracy on every side:", len(accuracies) == 1)
        if args.baseline:
            print("metrics.jsonl identical to the baseline's (timings aside):",
                  figures["metrics_identical_to_baseline"])
        return 0
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or "loop" not in sides:
        parser.error(f"--sides {args.sides!r}: 'loop' plus any of {', '.join(SIDES)}")
    for name, value in FLOWER_ENV.items():
        os.environ.setdefault(name, value)
    out = Path(tempfile.mkdtemp(prefix="fedwa-bench-"))
    config = resolve_config({
        "dataset": "fashion-mnist", "model": "cnn", "imbalance-ratio": 100.0,
        "partition": "dirichlet", "num-clients": args.clients, "num-server-rounds": args.rounds,
        "local-epochs": 1, "batch-size": 64, "output-dir": str(out), **parse_set(args.set)})
    federated_data(config)  # warm the file cache so no side pays the first read alone
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    accuracy: dict[str, float] = {}
    for _ in range(args.repeats):
        for side in sides:
            took, accuracy[side] = SIDES[side](config, out)
            seconds[side].append(took)
            print(f"{side}: {took:.2f}s", flush=True)
    best = {side: min(times) for side, times in seconds.items()}
    figures = {
        "workload": f"{config['model']} on {config['dataset']} (rho={config['imbalance-ratio']:g}"
                    f"), {args.clients} clients x {args.rounds} rounds",
        "repeats": args.repeats,
        "seconds": {side: [round(t, 2) for t in times] for side, times in seconds.items()},
        "best_s": {side: round(t, 2) for side, t in best.items()},
        "ratio_to_loop": {side: round(t / best["loop"], 3) for side, t in best.items()
                          if side != "loop"},
        "final_accuracy": accuracy,
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    # Same code and seeds: the sides should agree. Over many rounds of a conv net they can drift
    # by float rounding between processes (oneDNN kernels), so this is reported, not asserted.
    exact = {side: a for side, a in accuracy.items() if side != "batched"}
    print("identical final accuracy on every side:", len(set(exact.values())) == 1,
          "(batched training agrees to float tolerance only)" if "batched" in accuracy else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
