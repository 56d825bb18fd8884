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
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedwa.averaging import weighted_average
from fedwa.cli import FLOWER_ENV, simulate
from fedwa.config import parse_set, resolve_config
from fedwa.metrics import evaluate_model
from fedwa.results import read_rounds
from fedwa.task import federated_data, local_train_spec, make_model
from fedwa.training import client_seed, configure_threads, train_local


def plain_loop(config: dict, out: Path | None = None) -> tuple[float, float]:
    """FedAvg as a plain loop; returns (seconds, final accuracy)."""
    started = time.perf_counter()
    configure_threads(torch.device("cpu"))
    data = federated_data(config)
    model = make_model(config, data)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    x_test, y_test = data.test_data()
    accuracy = float("nan")
    for server_round in range(1, int(config["num-server-rounds"]) + 1):
        states, weights = [], []
        for pid in range(int(config["num-clients"])):
            client = make_model(config, data)
            client.load_state_dict(global_state)
            x, y = data.client_data(pid)
            train_local(client, x, y, local_train_spec(config, {"server-round": server_round}),
                        seed=client_seed(int(config["seed"]), server_round, pid))
            states.append(client.state_dict())
            weights.append(len(x))
        global_state = weighted_average(states, weights)
        model.load_state_dict(global_state)
        accuracy = evaluate_model(model, x_test, y_test, num_classes=data.num_classes,
                                  train_class_counts=data.train_class_counts)["accuracy"]
    return time.perf_counter() - started, accuracy


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sides", default="loop,local,ray2",
                        help="comma-separated subset of " + ", ".join(SIDES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or "loop" not in sides:
        parser.error(f"--sides {args.sides!r}: 'loop' plus any of {', '.join(SIDES)}")
    import os

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
