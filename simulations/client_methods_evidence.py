"""Evidence for the client-side training methods: late-phase weights and shadow weights (WAS).

Setup: long-tailed Fashion-MNIST (rho = 10), 10 clients, Dirichlet alpha 0.5, the `cnn`,
seeds 0..4, `ROUNDS` rounds of one local epoch, no data augmentation anywhere, final-round
accuracy (not the best round). The server holds 10% of the long-tailed pool, so SWA's BatchNorm
statistics are recomputed centrally (the federated route costs one message round per BN layer
and member, which makes K = 4 late-phase runs several times slower). Three runs per seed:

- `swa-plain`: plain training under SWA; its `global_*` metrics are plain FedAvg (SWA trains
  exactly as FedAvg does);
- `swa-late`: the same with late-phase weights (K = 4, members train apart for the last 40% of
  the run); `global_*` is FedAvg with late-phase weights;
- `fedavg-shadow`: FedAvg with shadow weights on every conv layer (resize-crop, plain
  inference).

The extra client time is the mean over rounds of the clients' mean training seconds per round,
against plain training in the same seed's plain run.

    python simulations/client_methods_evidence.py --seeds 0,1,2,3,4 --out runs/client-methods
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedwa.callbacks.results import read_rounds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_utils import cell, evidence_main, final, finished  # noqa: E402

ROUNDS = 10
BASE = {"dataset": "fashion-mnist", "model": "cnn", "imbalance-ratio": 10.0,
        "partition": "dirichlet", "dirichlet-alpha": 0.5, "num-clients": 10,
        "num-server-rounds": ROUNDS, "local-epochs": 1, "batch-size": 64, "lr": 0.05,
        "lr-schedule": "cosine", "server-val-fraction": 0.1}
RUNS = {
    "swa-plain": {"strategy": "swa"},
    "swa-late": {"strategy": "swa", "late-phase-k": 4, "late-phase-start": 0.6},
    "fedavg-shadow": {"strategy": "fedavg", "was-layers": "all"},
}
ROWS = [  # label, run, metric prefix
    ("FedAvg, plain", "swa-plain", "global_"),
    ("FedAvg, late-phase K=4", "swa-late", "global_"),
    ("SWA, plain", "swa-plain", ""),
    ("SWA, late-phase K=4", "swa-late", ""),
    ("SWA, late-phase K=4, members' ensemble", "swa-late", "ensemble_"),
    ("FedAvg, shadow weights", "fedavg-shadow", ""),
]


def client_seconds(run_dir: Path) -> float:
    """Mean over rounds of the clients' mean local training time."""
    rounds = [r["client_train"]["train-seconds"] for r in read_rounds(run_dir)[1:]
              if r.get("client_train")]
    return sum(rounds) / len(rounds)


def table(out: Path, seeds: list[int]) -> str:
    lines = ["| method | seeds | final balanced acc (%) | final few-shot acc (%) | "
             "client s/round (vs plain) |", "|---|---|---|---|---|"]
    for label, name, prefix in ROWS:
        dirs = finished(out, name, seeds)
        if not dirs:
            continue
        ratios = []
        for d in dirs:
            plain = out / d.name.replace(name, "swa-plain")
            if (plain / "summary.json").exists():
                ratios.append(client_seconds(d) / client_seconds(plain))
        lines.append(
            f"| {label} | {len(dirs)} | {cell(final(d, prefix, 'balanced_accuracy') for d in dirs)}"
            f" | {cell(final(d, prefix, 'few_shot_accuracy') for d in dirs)} | "
            f"{cell((client_seconds(d) for d in dirs), 1.0, 2)} "
            f"(x{sum(ratios) / len(ratios):.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    return evidence_main(__doc__, "runs/client-methods",
                         lambda args: [(n, {**BASE, **o}) for n, o in RUNS.items()], table)


if __name__ == "__main__":
    sys.exit(main())
