"""Evidence for partial model averaging and WSA on non-IID Fashion-MNIST.

Setup: Fashion-MNIST, 10 clients, Dirichlet alpha 0.1 and 0.5, imbalance ratio 1 and 10, the
`cnn`, seeds 0..4, `ROUNDS` rounds of `STEPS` local SGD steps (batch 64). A fixed step count
keeps every client's work, and so the run time, the same across the imbalance settings. Rows
per setting:

- FedAvg;
- partial averaging with tau = 2 and 4 at equal rounds (1/tau of FedAvg's bytes);
- FedAvg at equal bytes: ROUNDS / tau rounds, the bytes partial averaging with tau groups
  spends in ROUNDS rounds (also 1/tau of the local compute, which is the point of the row:
  what the same traffic buys each way);
- WSA with two strengths.

Columns: mean ± std of final balanced accuracy, and megabytes communicated (down + up).
Resumable: finished runs are not run again.

    python simulations/partial_wsa_evidence.py --seeds 0,1,2,3,4 --out runs/partial-wsa
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_utils import cell, evidence_main, final, finished  # noqa: E402

ROUNDS = 8
STEPS = 30
SETTINGS = {f"a{alpha:g}-rho{rho:g}": {"dirichlet-alpha": alpha, "imbalance-ratio": rho}
            for alpha in (0.1, 0.5) for rho in (1.0, 10.0)}
BASE = {"dataset": "fashion-mnist", "model": "cnn", "partition": "dirichlet",
        "num-clients": 10, "num-server-rounds": ROUNDS, "local-steps": STEPS, "batch-size": 64,
        "lr": 0.05, "lr-schedule": "cosine"}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("FedAvg", {"strategy": "fedavg"}),
    "partial2": ("partial, tau 2, equal rounds", {"strategy": "partial", "partial-groups": 2}),
    "partial4": ("partial, tau 4, equal rounds", {"strategy": "partial", "partial-groups": 4}),
    "fedavg-bytes2": (f"FedAvg, {ROUNDS // 2} rounds (bytes of partial tau 2)", {
        "strategy": "fedavg", "num-server-rounds": ROUNDS // 2}),
    "fedavg-bytes4": (f"FedAvg, {ROUNDS // 4} rounds (bytes of partial tau 4)", {
        "strategy": "fedavg", "num-server-rounds": ROUNDS // 4}),
    "wsa-0.1": ("WSA, lambda 0.1", {"strategy": "wsa", "wsa-lambda": 0.1}),
    "wsa-1": ("WSA, lambda 1", {"strategy": "wsa", "wsa-lambda": 1.0}),
}


def megabytes(run_dir: Path) -> float:
    summary = json.loads((run_dir / "summary.json").read_text())
    return (summary["bytes_down"] + summary["bytes_up"]) / 1e6


def table(out: Path, seeds: list[int]) -> str:
    lines = []
    for setting in SETTINGS:
        lines += [f"**{setting}**", "", "| method | seeds | final balanced acc (%) | MB |",
                  "|---|---|---|---|"]
        for key, (label, _) in METHODS.items():
            dirs = finished(out, f"{setting}-{key}", seeds)
            if dirs:
                lines.append(f"| {label} | {len(dirs)} | "
                             f"{cell(final(d, '', 'balanced_accuracy') for d in dirs)} | "
                             f"{cell((megabytes(d) for d in dirs), 1.0, 1)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    def plan(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
        settings = args.settings.split(",") if args.settings else list(SETTINGS)
        return [(f"{setting}-{key}", {**BASE, **SETTINGS[setting], **overrides})
                for setting in settings for key, (_, overrides) in METHODS.items()]

    return evidence_main(__doc__, "runs/partial-wsa", plan, table,
                         {"--settings": "comma-separated subset of " + ", ".join(SETTINGS)})


if __name__ == "__main__":
    sys.exit(main())
