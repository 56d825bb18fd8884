"""Evidence for the decentralized mode: DIMAT against gossip on non-IID Fashion-MNIST.

Setup: Fashion-MNIST (balanced), 5 and 10 nodes, class-disjoint (class c goes to node c mod N)
and Dirichlet alpha 0.1 partitions, every node from its own initialisation (`independent`),
ring and full topologies with Metropolis mixing, the `cnn`, seeds 0..2, `ROUNDS` rounds of
`STEPS` local SGD steps (batch 64). Nodes align and recompute BatchNorm statistics on 128 of
their own examples; per-round node accuracies use a stratified 500-example test subset and
the last round the whole test set. (Sized so that 48 runs fit in about an hour of one core.)

Reported per setting: final mean and min node accuracy (after local training), the mean
accuracy of the nodes' merged models before local training, the accuracy of the plain
average of all nodes, and megabytes per node; `decentralized.png` plots the mean node
accuracy per round. Resumable: finished runs are not run again.

    python simulations/decentralized_evidence.py --seeds 0,1,2 --out runs/decentralized
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_utils import cell, evidence_main, finished  # noqa: E402

from fedwa.results import draw_mean_bands, read_rounds  # noqa: E402

ROUNDS = 6
STEPS = 20
SETTINGS = {f"n{n}-{part}-{topo}": {"num-clients": n, "topology": topo, **parts}
            for n in (5, 10)
            for part, parts in (("classes", {"partition": "classes"}),
                                ("dir0.1", {"partition": "dirichlet", "dirichlet-alpha": 0.1}))
            for topo in ("ring", "full")}
BASE = {"dataset": "fashion-mnist", "model": "cnn", "imbalance-ratio": 1.0,
        "num-server-rounds": ROUNDS, "local-steps": STEPS, "batch-size": 64, "lr": 0.05,
        "lr-schedule": "cosine", "node-init": "independent", "mixing": "metropolis",
        "dimat-examples": 128, "node-eval-examples": 500}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "dimat": ("DIMAT", {"strategy": "dimat"}),
    "gossip": ("gossip", {"strategy": "gossip"}),
}


def last(run_dir: Path, key: str) -> float | None:
    return read_rounds(run_dir)[-1].get(key)


def table(out: Path, seeds: list[int]) -> str:
    lines = ["| setting | method | seeds | mean node acc (%) | min node acc (%) | "
             "merged, before training (%) | average of all nodes (%) | MB per node |",
             "|---|---|---|---|---|---|---|---|"]
    curves: dict[str, dict[str, list[Path]]] = {}
    for setting in SETTINGS:
        for key, (label, _) in METHODS.items():
            dirs = finished(out, f"{setting}-{key}", seeds)
            if not dirs:
                continue
            mb = [sum(r.get("bytes_per_node", 0) for r in read_rounds(d)) / 1e6 for d in dirs]
            lines.append(
                f"| {setting} | {label} | {len(dirs)} | {cell(last(d, 'accuracy') for d in dirs)}"
                f" | {cell(last(d, 'node_accuracy_min') for d in dirs)}"
                f" | {cell(last(d, 'merged_accuracy') for d in dirs)}"
                f" | {cell(last(d, 'consensus_accuracy') for d in dirs)}"
                f" | {cell(mb, 1.0, 1)} |")
            curves.setdefault(setting, {})[label] = dirs
    if curves:
        plot(curves, out / "decentralized.png")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, dict[str, list[Path]]], path: Path) -> None:
    """One panel per setting: mean node accuracy per round, ± one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(curves)
    cols = 4
    rows = (len(settings) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False,
                             sharey=True)
    for ax, setting in zip(axes.flat, settings):
        draw_mean_bands(ax, curves[setting], "accuracy")
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("mean node accuracy")
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    def plan(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
        settings = args.settings.split(",") if args.settings else list(SETTINGS)
        return [(f"{setting}-{key}", {**BASE, **SETTINGS[setting], **overrides})
                for setting in settings for key, (_, overrides) in METHODS.items()]

    return evidence_main(__doc__, "runs/decentralized", plan, table,
                         {"--settings": "comma-separated subset of " + ", ".join(SETTINGS)})


if __name__ == "__main__":
    sys.exit(main())
