"""Peak memory of a simulation against its number of clients (the in-process backend).

Each client count runs in a fresh Python process, so each peak RSS (``ru_maxrss``) is that
run's own: interpreter, torch, the dataset, the server's model, one round's replies and the
one client that is training. Clients that are not training hold nothing but their (here
empty) ``Context.state``, so the peak should grow with the replies a round collects, not with
anything resident per client.

    python simulations/bench_memory.py                    # 100 and 1000 clients, cnn
    python simulations/bench_memory.py --clients 10,100,1000 --rounds 2
    python simulations/bench_memory.py --clients 10000 --rounds 1 --model mlp --local-steps 1
    python simulations/bench_memory.py --clients 10000 --rounds 1 --model mlp --local-steps 1 \
        --code /tmp/main-export          # the same with another checkout's code (a baseline)

The workload is the `cnn` on Fashion-MNIST (balanced, iid, 60 images per client at 1000
clients), every client sampled every round, 2 local steps each, so the benchmark measures
memory rather than training time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The flat module paths (fedwa.config, fedwa.task): a --code checkout from before the layers
# has only those, and the layered code still imports them (fedwa.MOVED).
CHILD = """
import json, resource, sys, time
from pathlib import Path
from fedwa.cli import simulate
from fedwa.config import resolve_config
from fedwa.task import federated_data
config = resolve_config(json.loads(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
federated_data(config)
with_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run_dir = Path(config["output-dir"]) / "run"
run_dir.mkdir(parents=True)
started = time.perf_counter()
simulate(config, run_dir, show_progress=False)
import fedwa
print(json.dumps({"code": str(Path(fedwa.__file__).parents[1]), "rss_start_kib": before, "rss_with_data_kib": with_data,
                  "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "run_s": time.perf_counter() - started}))
"""


def measure(clients: int, rounds: int, model: str, local_steps: int = 2,
            code: str | None = None) -> dict:
    config = {"dataset": "fashion-mnist", "model": model, "partition": "iid",
              "imbalance-ratio": 1.0, "num-clients": clients, "num-server-rounds": rounds,
              "local-steps": local_steps, "batch-size": 32, "backend": "local",
              "output-dir": tempfile.mkdtemp(prefix="fedwa-mem-")}
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = code
    started = time.perf_counter()
    # -P: the working directory must not come ahead of PYTHONPATH (--code).
    result = subprocess.run([sys.executable, "-P", "-c", CHILD, json.dumps(config)],
                            capture_output=True, text=True, check=False, env=env,
                            cwd=config["output-dir"])
    if result.returncode != 0:
        raise SystemExit(f"{clients} clients failed:\n{result.stderr[-2000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["wall_s"] = time.perf_counter() - started
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--code", help="PYTHONPATH of the child: another checkout's code")
    args = parser.parse_args()
    print(f"| clients | peak RSS (GiB) | after imports (GiB) | with data (GiB) | run (s) |")
    print("|---|---|---|---|---|")
    for clients in (int(c) for c in args.clients.split(",")):
        f = measure(clients, args.rounds, args.model, args.local_steps, args.code)
        if args.code and Path(f["code"]).resolve() != Path(args.code).resolve():
            raise SystemExit(f"the child ran the fedwa in {f['code']}, not {args.code}")
        gib = 1024 ** 2  # ru_maxrss is in KiB on Linux
        print(f"| {clients} | {f['rss_peak_kib'] / gib:.2f} | {f['rss_start_kib'] / gib:.2f} | "
              f"{f['rss_with_data_kib'] / gib:.2f} | {f['run_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
