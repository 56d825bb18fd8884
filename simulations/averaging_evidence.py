"""Evidence for the averaging strategies on long-tailed Fashion-MNIST (issue: IMWA, HWA, SWA,
EMA and TWA).

Setup: Fashion-MNIST made long-tailed with rho = 100 (exp profile), the balanced 10k test set,
the `cnn`, seeds 0..4. Every run of the Dirichlet(0.5) setting has 10 clients, the same data
(10% of the long-tailed pool held by the server, so every method gets BN statistics recomputed
the same way, centrally) and the same total local compute: `ROUNDS` x 1 local epoch.

- FedAvg and SWA come from one run (SWA trains exactly as FedAvg; `global_*` is FedAvg).
- MWA is IMWA with one episode; IMWA has `IMWA_EPISODES` equal episodes; the same IMWA run
  keeps an EMA of the episode averages (IMWA+EMA).
- HWA: FedAvg's online schedule (one local epoch between averages) plus a window of 5.
- TWA-v trains `ROUNDS` rounds, then fits on the server split (server compute only).
- TWA-t trains `ROUNDS - TWA_T_ROUNDS` rounds and spends the rest of the budget on gradient
  rounds (each one local pass), so its local compute equals the others'.
- Replicas setting (the IMWA paper's): 3 clients that each hold the whole pool in their own
  order, `REPLICA_ROUNDS` epochs each; MWA (1 episode) against IMWA (one per epoch).

Runs are resumable: a finished run (summary.json says completed) is not run again.

    python simulations/averaging_evidence.py --seeds 0,1,2,3,4 --out runs/evidence
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedwa.cli import rounds_to_target
from fedwa.callbacks.results import read_rounds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_utils import cell, evidence_main, final, finished  # noqa: E402

ROUNDS = 10
IMWA_EPISODES = 5
TWA_T_ROUNDS = 3
REPLICA_ROUNDS = 4

BASE = {"dataset": "fashion-mnist", "model": "cnn", "imbalance-ratio": 100.0,
        "imbalance-type": "exp", "partition": "dirichlet", "dirichlet-alpha": 0.5,
        "num-clients": 10, "num-server-rounds": ROUNDS, "local-epochs": 1, "batch-size": 64,
        "lr": 0.05, "lr-schedule": "cosine", "server-val-fraction": 0.1}

RUNS: dict[str, dict[str, Any]] = {
    "swa": {"strategy": "swa"},
    "ema": {"strategy": "ema", "ema-decay": 0.7},
    "hwa": {"strategy": "hwa", "hwa-window": 5},
    "mwa-dirichlet": {"strategy": "imwa", "imwa-episodes": 1},
    "imwa-dirichlet": {"strategy": "imwa", "imwa-episodes": IMWA_EPISODES,
                       "imwa-ema-decay": 0.5},
    "twa-v": {"strategy": "twa-v"},
    "twa-t": {"strategy": "twa-t", "num-server-rounds": ROUNDS - TWA_T_ROUNDS,
              "twa-rounds": TWA_T_ROUNDS},
    "mwa-replicas": {"strategy": "imwa", "partition": "replicas", "num-clients": 3,
                     "num-server-rounds": REPLICA_ROUNDS, "imwa-episodes": 1},
    "imwa-replicas": {"strategy": "imwa", "partition": "replicas", "num-clients": 3,
                      "num-server-rounds": REPLICA_ROUNDS, "imwa-episodes": REPLICA_ROUNDS},
}

# Table rows: (label, run, metric prefix: "" = the run's main model, "global_"/"ema_"/"swa_").
ROWS = [
    ("FedAvg", "swa", "global_"),
    ("MWA (Dirichlet 0.5, 10 clients)", "mwa-dirichlet", ""),
    (f"IMWA, {IMWA_EPISODES} episodes (Dirichlet)", "imwa-dirichlet", ""),
    ("IMWA+EMA (Dirichlet)", "imwa-dirichlet", "ema_"),
    ("MWA (replicas, 3 clients)", "mwa-replicas", ""),
    (f"IMWA, {REPLICA_ROUNDS} episodes (replicas)", "imwa-replicas", ""),
    ("HWA (window 5)", "hwa", ""),
    ("SWA (second half)", "swa", ""),
    ("EMA (decay 0.7)", "ema", ""),
    ("TWA-v", "twa-v", ""),
    ("SWA over TWA-v's candidates", "twa-v", "swa_"),
    (f"TWA-t ({ROUNDS - TWA_T_ROUNDS} rounds + {TWA_T_ROUNDS} gradient rounds)", "twa-t", ""),
    ("SWA over TWA-t's candidates", "twa-t", "swa_"),
]


def table(out: Path, seeds: list[int]) -> str:
    lines = ["| method | seeds | final balanced acc (%) | final few-shot acc (%) | "
             "final acc (%) |", "|---|---|---|---|---|"]
    for label, name, prefix in ROWS:
        dirs = finished(out, name, seeds)
        if not dirs:
            continue
        cells = [cell(final(d, prefix, metric) for d in dirs)
                 for metric in ("balanced_accuracy", "few_shot_accuracy", "accuracy")]
        lines.append(f"| {label} | {len(dirs)} | " + " | ".join(cells) + " |")
    # Rounds HWA needs to reach FedAvg's final accuracy, seed by seed.
    reached = []
    for s in seeds:
        fedavg, hwa = out / f"swa-s{s}", out / f"hwa-s{s}"
        if (fedavg / "summary.json").exists() and (hwa / "summary.json").exists():
            target = final(fedavg, "global_", "accuracy")
            reached.append(rounds_to_target(read_rounds(hwa), target))
    if reached:
        hits = [r for r in reached if r is not None]
        lines.append("")
        lines.append(f"HWA reaches FedAvg's final accuracy (same seed) in round(s) {reached} "
                     f"of {ROUNDS} ({len(hits)}/{len(reached)} seeds reach it).")
    return "\n".join(lines) + "\n"


def main() -> int:
    def plan(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
        names = args.only.split(",") if args.only else list(RUNS)
        return [(name, {**BASE, **RUNS[name]}) for name in names]

    return evidence_main(__doc__, "runs/evidence", plan, table,
                         {"--only": "comma-separated run names (default: all)"})


if __name__ == "__main__":
    sys.exit(main())
