"""Evidence for partial model averaging and WSA on non-IID Fashion-MNIST.

Setup: Fashion-MNIST, 10 clients, Dirichlet alpha 0.1 and 0.5, imbalance ratio 1 and 10, the
`cnn`, seeds 0..4, `ROUNDS` rounds of `STEPS` local SGD steps (batch 64). A fixed step count
keeps every client's work, and so the run time, the same across the imbalance settings. Rows
per setting:

- FedAvg;
- partial averaging with tau = 2 and 4 at equal rounds, groups of equal bytes
  (`partial-grouping = "equal"`: weights cut by output rows, 1/tau of FedAvg's bytes per round);
- the same with whole-layer groups (`"balanced"`, the earlier default: the `cnn`'s fc1 is a
  group by itself, so with tau 4 one round in four sends 0.95 of FedAvg's bytes and the other
  three 0.002-0.045; over a whole cycle of tau rounds either grouping sends one model);
- FedAvg at equal bytes: ROUNDS / tau rounds, the bytes partial averaging with tau groups
  spends in ROUNDS rounds (also 1/tau of the local compute: what the same traffic buys);
- periodic full averaging, the paper's baseline (arXiv 2201.03789): FedAvg averaging every
  tau rounds' worth of training, i.e. ROUNDS / tau rounds of tau * STEPS local steps. Same
  local iterations and the same traffic as partial averaging with tau groups; the lr follows
  the same per-step cosine (the schedule moves with the run's progress, step by step);
- WSA with two strengths.

Columns: mean ± std of final balanced accuracy, and megabytes communicated (down + up). A
second table gives partial averaging's paired per-seed differences against both baselines.
Resumable: finished runs are not run again (runs are named by setting and row, so the
whole-layer rows `partial2`/`partial4` reuse runs made before equal groups existed).

    python simulations/partial_wsa_evidence.py --seeds 0,1,2,3,4 --out runs/partial-wsa
    python simulations/partial_wsa_evidence.py --methods partial4-equal,fedavg-steps4 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_utils import cell, evidence_main, final, finished  # noqa: E402

from fedwa.callbacks.results import mean_std  # noqa: E402

ROUNDS = 8
STEPS = 30
TAUS = (2, 4)
SETTINGS = {f"a{alpha:g}-rho{rho:g}": {"dirichlet-alpha": alpha, "imbalance-ratio": rho}
            for alpha in (0.1, 0.5) for rho in (1.0, 10.0)}
BASE = {"dataset": "fashion-mnist", "model": "cnn", "partition": "dirichlet",
        "num-clients": 10, "num-server-rounds": ROUNDS, "local-steps": STEPS, "batch-size": 64,
        "lr": 0.05, "lr-schedule": "cosine"}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("FedAvg", {"strategy": "fedavg"}),
    **{f"partial{t}-equal": (f"partial, tau {t}, equal rounds, equal-byte groups", {
        "strategy": "partial", "partial-groups": t, "partial-grouping": "equal"})
       for t in TAUS},
    **{f"partial{t}": (f"partial, tau {t}, equal rounds, whole-layer groups", {
        "strategy": "partial", "partial-groups": t, "partial-grouping": "balanced"})
       for t in TAUS},
    **{f"fedavg-bytes{t}": (f"FedAvg, {ROUNDS // t} rounds (bytes of partial tau {t})", {
        "strategy": "fedavg", "num-server-rounds": ROUNDS // t}) for t in TAUS},
    **{f"fedavg-steps{t}": (f"FedAvg every {t} rounds' steps: {ROUNDS // t} rounds of "
                            f"{t * STEPS} steps (paper's baseline for tau {t})", {
        "strategy": "fedavg", "num-server-rounds": ROUNDS // t, "local-steps": t * STEPS})
       for t in TAUS},
    "wsa-0.1": ("WSA, lambda 0.1", {"strategy": "wsa", "wsa-lambda": 0.1}),
    "wsa-1": ("WSA, lambda 1", {"strategy": "wsa", "wsa-lambda": 1.0}),
}
#: Paired comparisons: (label, row, baseline row).
PAIRS = [
    *((f"partial tau {t} equal - FedAvg {ROUNDS // t} rounds x {t * STEPS} steps "
       "(same steps, same bytes)", f"partial{t}-equal", f"fedavg-steps{t}") for t in TAUS),
    *((f"partial tau {t} equal - FedAvg {ROUNDS // t} rounds (same bytes)",
       f"partial{t}-equal", f"fedavg-bytes{t}") for t in TAUS),
    *((f"partial tau {t} equal - FedAvg (same rounds)", f"partial{t}-equal", "fedavg")
      for t in TAUS),
    *((f"partial tau {t} equal - whole-layer groups", f"partial{t}-equal", f"partial{t}")
      for t in TAUS),
]


def megabytes(run_dir: Path) -> float:
    summary = json.loads((run_dir / "summary.json").read_text())
    return (summary["bytes_down"] + summary["bytes_up"]) / 1e6


def plan(settings: list[str] | None = None, methods: list[str] | None = None
         ) -> list[tuple[str, dict[str, Any]]]:
    """The (run name, config) pairs of one seed, setting-major; all of them by default."""
    for name, known in (("setting", SETTINGS), ("method", METHODS)):
        unknown = sorted(set((settings if name == "setting" else methods) or ()) - set(known))
        if unknown:
            raise SystemExit(f"unknown {name}(s) {unknown}; known: {', '.join(known)}")
    return [(f"{setting}-{key}", {**BASE, **SETTINGS[setting], **METHODS[key][1]})
            for setting in settings or list(SETTINGS) for key in methods or list(METHODS)]


def paired(out: Path, seeds: list[int], run: str, base: str) -> str:
    """Per-seed ``run - base`` in balanced-accuracy points: 'mean ± std (wins/seeds up)'."""
    diffs = []
    for s in seeds:
        a, b = out / f"{run}-s{s}", out / f"{base}-s{s}"
        if (a / "summary.json").exists() and (b / "summary.json").exists():
            x, y = final(a, "", "balanced_accuracy"), final(b, "", "balanced_accuracy")
            if x is not None and y is not None:
                diffs.append(100.0 * (x - y))
    mean, std, n = mean_std(diffs)
    return f"{mean:+.2f} ± {std:.2f} ({sum(d > 0 for d in diffs)}/{n} up)" if n else "n/a"


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
    lines += ["Paired differences over the seeds (balanced accuracy, points):", "",
              "| comparison | " + " | ".join(SETTINGS) + " |",
              "|---|" + "---|" * len(SETTINGS)]
    for label, run, base in PAIRS:
        cells = [paired(out, seeds, f"{s}-{run}", f"{s}-{base}") for s in SETTINGS]
        if any(c != "n/a" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    def plan_of(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
        return plan(args.settings.split(",") if args.settings else None,
                    args.methods.split(",") if args.methods else None)

    return evidence_main(__doc__, "runs/partial-wsa", plan_of, table,
                         {"--settings": "comma-separated subset of " + ", ".join(SETTINGS),
                          "--methods": "comma-separated subset of " + ", ".join(METHODS)})


if __name__ == "__main__":
    sys.exit(main())
