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

The fidelity suite (issue #15) takes DIMAT's departures from its authors' code
(nsaadati/DIMAT) one at a time on the 5-node Dirichlet 0.1 settings: the basis (one merge for
every node on the complete graph, the default since #15; the rotating anchor on the ring),
one epoch of pre-training, the proxy alignment data (a held-out 10% shared by every node,
1024 examples), the reference's Adam at lr 1e-3 (at our 20 steps per round, not its 2
epochs), all three together, gossip with the same pre-training and optimiser, and both
methods from a shared initialisation (any gap there is alignment's harm alone).
`simulations/results/decentralized` was measured before #15, when every DIMAT node merged in
its own basis (now `dimat-basis = own`).

    python simulations/decentralized_evidence.py --suite fidelity --seeds 0,1,2 \
        --out runs/dimat-fidelity
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_utils import cell, evidence_main, finished  # noqa: E402

from fedwa.callbacks.results import draw_mean_bands, read_rounds  # noqa: E402

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
#: The reference's local optimiser (nsaadati/DIMAT: Adam at lr 1e-3, fresh after every merge),
#: at our step budget: the reference trains 2 epochs between merges, 19x our 20 steps.
REFERENCE_OPTIMIZER = {"optimizer": "adam", "lr": 0.001, "weight-decay": 0.0,
                       "lr-schedule": "constant"}
PRETRAIN = {"node-pretrain-epochs": 1}
#: The reference aligns on the training set shared by every agent; ours is a held-out 10%.
PROXY = {"server-val-fraction": 0.1, "dimat-align-data": "proxy", "dimat-examples": 1024}
#: Run key -> (label, overrides, topologies it applies to; None = all). ``dimat`` and
#: ``gossip`` are the only methods of the original suite (all eight settings); the others are
#: the fidelity ablation of DIMAT's departures from its authors' code (issue #15), run on
#: the 5-node Dirichlet settings.
METHODS: dict[str, tuple[str, dict[str, Any], tuple[str, ...] | None]] = {
    "dimat": ("DIMAT (default basis: single on full, own on ring)", {"strategy": "dimat"}, None),
    "gossip": ("gossip", {"strategy": "gossip"}, None),
    "dimat-own": ("DIMAT, own basis (fedwa before #15)", {"strategy": "dimat",
                                                         "dimat-basis": "own"}, ("full",)),
    "dimat-anchor": ("DIMAT, rotating anchor basis", {"strategy": "dimat",
                                                      "dimat-basis": "anchor"}, ("ring",)),
    "dimat-pretrain": ("DIMAT + 1 pre-training epoch", {"strategy": "dimat", **PRETRAIN}, None),
    "dimat-proxy": ("DIMAT + proxy alignment data", {"strategy": "dimat", **PROXY}, None),
    "dimat-adam": ("DIMAT + reference optimiser (Adam 1e-3)", {"strategy": "dimat",
                                                               **REFERENCE_OPTIMIZER}, None),
    "dimat-reference": ("DIMAT as the reference: pre-training, proxy data, Adam",
                        {"strategy": "dimat", **PRETRAIN, **PROXY, **REFERENCE_OPTIMIZER}, None),
    "gossip-reference": ("gossip + pre-training, Adam (reference's control)",
                         {"strategy": "gossip", **PRETRAIN, **REFERENCE_OPTIMIZER}, None),
    "dimat-shared": ("DIMAT, shared init", {"strategy": "dimat", "node-init": "shared"}, None),
    "gossip-shared": ("gossip, shared init", {"strategy": "gossip", "node-init": "shared"}, None),
}
ORIGINAL_METHODS = ("dimat", "gossip")
FIDELITY_SETTINGS = ("n5-dir0.1-full", "n5-dir0.1-ring")


def applies(key: str, setting: str) -> bool:
    topologies = METHODS[key][2]
    return topologies is None or SETTINGS[setting]["topology"] in topologies


def last(run_dir: Path, key: str) -> float | None:
    return read_rounds(run_dir)[-1].get(key)


def first_merge(run_dir: Path, key: str) -> float | None:
    """``key`` of round 1, the first merge (``premerge_accuracy`` there is round 0's nodes)."""
    rounds = [r for r in read_rounds(run_dir) if r.get("round") == 1]
    return rounds[0].get(key) if rounds else None


def table(out: Path, seeds: list[int]) -> str:
    lines = ["| setting | method | seeds | mean node acc (%) | min node acc (%) | "
             "merged, before training (%) | average of all nodes (%) | "
             "first merge: nodes before (%) | first merge: merged (%) | MB per node |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    curves: dict[str, dict[str, list[Path]]] = {}
    for setting in SETTINGS:
        for key, (label, _, _) in METHODS.items():
            dirs = finished(out, f"{setting}-{key}", seeds)
            if not dirs:
                continue
            mb = [sum(r.get("bytes_per_node", 0) for r in read_rounds(d)) / 1e6 for d in dirs]
            lines.append(
                f"| {setting} | {label} | {len(dirs)} | {cell(last(d, 'accuracy') for d in dirs)}"
                f" | {cell(last(d, 'node_accuracy_min') for d in dirs)}"
                f" | {cell(last(d, 'merged_accuracy') for d in dirs)}"
                f" | {cell(last(d, 'consensus_accuracy') for d in dirs)}"
                f" | {cell(first_merge(d, 'premerge_accuracy') for d in dirs)}"
                f" | {cell(first_merge(d, 'merged_accuracy') for d in dirs)}"
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
        fidelity = args.suite == "fidelity"
        settings = (args.settings.split(",") if args.settings
                    else list(FIDELITY_SETTINGS if fidelity else SETTINGS))
        methods = (args.methods.split(",") if args.methods
                   else [m for m in METHODS if fidelity or m in ORIGINAL_METHODS])
        for name, known in (("setting", SETTINGS), ("method", METHODS)):
            unknown = sorted(set(settings if name == "setting" else methods) - set(known))
            if unknown:
                raise SystemExit(f"unknown {name} {unknown}; known: {', '.join(known)}")
        return [(f"{setting}-{key}", {**BASE, **SETTINGS[setting], **METHODS[key][1]})
                for setting in settings for key in methods if applies(key, setting)]

    return evidence_main(__doc__, "runs/decentralized", plan, table,
                         {"--settings": "comma-separated subset of " + ", ".join(SETTINGS),
                          "--methods": "comma-separated subset of " + ", ".join(METHODS),
                          "--suite": "original (8 settings, DIMAT and gossip; the default) or "
                                     "fidelity (the 5-node Dirichlet settings, every row)"})


if __name__ == "__main__":
    sys.exit(main())
