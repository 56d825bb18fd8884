"""Per-round cost of running fedwa through Flower's Deployment Engine, against the simulation.

The same config runs, in one invocation, on each side:

- ``sim``: the in-process simulation (``fedwa.cli.simulate``, ``backend = "local"``);
- ``deploy``: a SuperLink and 2 SuperNodes on 127.0.0.1 (TLS, SuperNode auth) with Flower's
  default isolation: every message starts a new ``flwr-clientapp`` process;
- ``deploy-warm``: the same with ``--isolation process`` and fedwa's long-lived ClientApp
  worker per SuperNode (``fedwa.deploy.clientapp_worker``, tasks run inside it);
- ``deploy-fork``: the same worker forking a child per message (torch already imported).

Per-round time comes from each run's ``metrics.jsonl`` (``seconds`` of rounds 1..R; round 0 is
the initial evaluation). Round 1 also pays each side's warm-up (first process, data
building), so the steady state (rounds 2..R) is printed too. The deployment's start-up (SuperLink
up, keys registered, SuperNodes online) is timed apart.

    python simulations/bench_deploy_overhead.py                      # digits, mlp, 2 x 4 rounds
    python simulations/bench_deploy_overhead.py --sides sim,deploy-warm --set local-steps=5
    python simulations/bench_deploy_overhead.py --project-dir /tmp/slim-copy   # another FAB

The machine is shared and noisy: compare the sides of one invocation, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedwa.cli import FLOWER_ENV, simulate
from fedwa.run.config import parse_set, resolve_config
from fedwa.deploy import PROJECT_DIR, Deployment, format_run_config
from fedwa.callbacks.results import read_rounds, unique_dir

BASE = {"dataset": "digits", "model": "mlp", "num-clients": 2, "num-server-rounds": 4,
        "strategy": "fedavg", "seed": 0}
DEPLOY_SIDES = {"deploy": ("subprocess", "inprocess"),
                "deploy-warm": ("process", "inprocess"),
                "deploy-fork": ("process", "fork")}


def round_seconds(run_dir: Path) -> list[float]:
    """``seconds`` of rounds 1..R from ``metrics.jsonl``."""
    return [float(r["seconds"]) for r in read_rounds(run_dir) if int(r["round"]) >= 1]


def final_accuracy(run_dir: Path) -> float:
    """Accuracy of the last round."""
    return float(read_rounds(run_dir)[-1]["accuracy"])


def run_sim(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """The in-process simulation of ``config``."""
    started = time.perf_counter()
    run_dir = unique_dir(out, "sim")
    simulate({**config, "backend": "local"}, run_dir, show_progress=False, plot=False)
    return {"run_dir": run_dir, "wall": time.perf_counter() - started, "startup": 0.0}


def run_deploy(overrides: dict[str, Any], out: Path, isolation: str, worker_mode: str,
               project_dir: Path) -> dict[str, Any]:
    """One deployment on 127.0.0.1 running the app with ``overrides``; all stopped afterwards.

    Only the overrides go to ``--run-config``; the other keys take the defaults of
    ``[tool.flwr.app.config]``, which are fedwa's defaults (tests/test_app_config.py).
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-deploy-{isolation}-", dir=out))
    started = time.perf_counter()
    with Deployment(workdir, int(overrides["num-clients"]), isolation=isolation,
                    worker_mode=worker_mode) as deployment:
        deployment.start()
        run_dir = deployment.run_app(format_run_config(overrides), project_dir=project_dir,
                                     output_dir=out / f"runs-{isolation}-{worker_mode}")
        wall = time.perf_counter() - started
        startup = deployment.startup_seconds
    leftover = deployment.leftover_pids()
    if leftover:
        print(f"warning: processes left after stop: {leftover}", file=sys.stderr)
    return {"run_dir": run_dir, "wall": wall, "startup": startup}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="sim,deploy,deploy-warm",
                        help="comma-separated: sim, deploy, deploy-warm, deploy-fork")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--project-dir", type=Path, default=PROJECT_DIR,
                        help="the Flower app the deployments run (default: this checkout)")
    parser.add_argument("--out", type=Path, help="folder for runs and logs (default: tmp)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    for name, value in FLOWER_ENV.items():
        os.environ.setdefault(name, value)

    out = (args.out or Path(tempfile.mkdtemp(prefix="bench-deploy-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = {**BASE, **parse_set(args.set)}
    config = resolve_config({**overrides, "output-dir": str(out)})
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s != "sim" and s not in DEPLOY_SIDES]
    if unknown:
        parser.error(f"unknown side(s): {', '.join(unknown)}")
    print(f"config: dataset={config['dataset']} model={config['model']} "
          f"clients={config['num-clients']} rounds={config['num-server-rounds']} "
          f"local-epochs={config['local-epochs']} local-steps={config['local-steps']}; "
          f"output in {out}", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for side in sides:
        print(f"running {side} ...", flush=True)
        if side == "sim":
            res = run_sim(config, out)
        else:
            isolation, worker_mode = DEPLOY_SIDES[side]
            res = run_deploy(overrides, out, isolation, worker_mode, args.project_dir)
        secs = round_seconds(res["run_dir"])
        res.update(rounds=secs, per_round=statistics.mean(secs),
                   steady=statistics.mean(secs[1:]) if len(secs) > 1 else secs[0],
                   accuracy=final_accuracy(res["run_dir"]), run_dir=str(res["run_dir"]))
        results[side] = res

    ref = results.get("sim")
    print()
    print(f"{'side':<12} {'s/round':>8} {'rounds 2+':>10} {'x sim':>8} {'+s/round':>9} "
          f"{'start-up':>9} {'wall':>7} {'accuracy':>9}  per-round seconds")
    for side, res in results.items():
        ratio = f"{res['per_round'] / ref['per_round']:.0f}x" if ref and side != "sim" else ""
        extra = f"{res['steady'] - ref['steady']:+.2f}" if ref and side != "sim" else ""
        print(f"{side:<12} {res['per_round']:>8.3f} {res['steady']:>10.3f} {ratio:>8} "
              f"{extra:>9} {res['startup']:>8.1f}s {res['wall']:>6.1f}s "
              f"{res['accuracy']:>9.4f}  {' '.join(f'{s:.2f}' for s in res['rounds'])}")
    for side, res in results.items():
        if side in ("deploy-warm", "deploy-fork") and "deploy" in results:
            print(f"{side} against deploy: {results['deploy']['steady'] / res['steady']:.1f}x "
                  f"faster per steady round")
    accs = {round(r["accuracy"], 6) for r in results.values()}
    print("final accuracies agree" if len(accs) == 1 else f"final accuracies differ: {accs}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
