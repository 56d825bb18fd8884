"""Evidence for the methods as their authors ran them: late-phase weights, shadow weights (WAS),
TWA-v/TWA-t, IMWA/MWA and HWA, each against its baseline on the same data and seeds.

Two suites share one plan:

- ``digits`` (the default, minutes): scikit-learn's 8x8 digits made long-tailed with rho = 10
  (527 training images, 58 held by the server, a balanced test set of 300), 10 clients,
  Dirichlet 0.5, the `cnn`, 2 local epochs of batch 16 per round (about 6 steps), lr 0.05
  cosine. Short runs have 10 rounds; long runs 30 (3x), where the papers' late-training
  claims (late-phase, SWA/HWA) have room to show.
- ``fashion-mnist`` (about an hour a seed here): the settings of the README's earlier
  evidence: Fashion-MNIST long-tailed with rho = 100 for the averaging strategies and
  rho = 10 for the client methods, 10 rounds x 1 local epoch of batch 64.

Rows and their baselines (same seed, paired):

- MWA / IMWA (Dirichlet and replicas) with the paper's uniform average and BN recomputed,
  and MWA with the earlier example-weighted average and averaged BN buffers;
- TWA-v with the authors' journal recipe (the default: AdamW lr 1e-3, cosine, 10 epochs),
  with the conference code's (main branch: SGD lr 2, step schedule, uncentred basis) and with
  fedwa's earlier budget (SGD lr 0.05, 3 epochs, centred basis, BN in eval mode); TWA-t with
  10 training rounds + the reference's 10 gradient rounds, journal and main recipes; the
  early-training claim: TWA-v after half the rounds against FedAvg after all of them;
- HWA where it differs from SWA: an online period of a third of a round (more rounds of fewer
  steps at the same total of local steps) and a window of 6 synchronisations, shorter than
  SWA's span of half the run; short and long; clients keeping their optimiser across syncs
  (the default) and starting a fresh one every sync (fedwa's earlier HWA); and the short
  pair without momentum, where the two are the same;
- late-phase weights (K = 4, start 0.6) with the authors' summed shared gradient, members
  averaged across clients or kept local, and the earlier mean gradient; short and long;
- shadow weights on every conv: the authors' transform with a = 1 and with a ~ U(0, 1)
  (plain and desire-oriented inference), and the earlier resize-crop transform.

Runs are resumable and go seed-major (a finished run is not run again):

    python simulations/fidelity_evidence.py --suite digits --seeds 0,1,2,3,4 --out runs/fidelity-digits
    python simulations/fidelity_evidence.py --suite fashion-mnist --seeds 0,1,2 --out runs/fidelity-fmnist
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedwa.cli import rounds_to_target
from fedwa.callbacks.results import mean_std, read_rounds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_utils import cell, evidence_main, final, finished  # noqa: E402

SHORT, LONG = 10, 30

DIGITS = {"dataset": "digits", "model": "cnn", "imbalance-ratio": 10.0, "imbalance-type": "exp",
          "partition": "dirichlet", "dirichlet-alpha": 0.5, "num-clients": 10,
          "num-server-rounds": SHORT, "local-epochs": 2, "batch-size": 16, "lr": 0.05,
          "lr-schedule": "cosine", "server-val-fraction": 0.1}
DIGITS_STEPS = 6  # ~ 2 epochs of a digits client's ~50 examples at batch 16

FMNIST = {"dataset": "fashion-mnist", "model": "cnn", "imbalance-ratio": 100.0,
          "imbalance-type": "exp", "partition": "dirichlet", "dirichlet-alpha": 0.5,
          "num-clients": 10, "num-server-rounds": SHORT, "local-epochs": 1, "batch-size": 64,
          "lr": 0.05, "lr-schedule": "cosine", "server-val-fraction": 0.1}
FMNIST_STEPS = 21  # ~ one epoch of a client's share of the 13.4k-image pool at batch 64

EARLIER_TWA = {"twa-optimizer": "sgd", "twa-basis": "centred", "twa-lr": 0.05, "twa-epochs": 3,
               "twa-batch-size": 64, "twa-schedule": "constant", "twa-weight-decay": 0.0,
               "twa-bn-mode": "eval"}
# The authors' conference code (main branch): SGD at lr 2 with the step schedule.
MAIN_TWA = {"twa-optimizer": "sgd", "twa-basis": "uncentred", "twa-weight-decay": 1e-5}
LATE = {"late-phase-k": 4, "late-phase-start": 0.6}
REPLICAS = {"partition": "replicas", "num-clients": 3, "num-server-rounds": 4}


def runs(suite: str) -> dict[str, dict[str, Any]]:
    """Every run of one seed: name -> config."""
    base = DIGITS if suite == "digits" else FMNIST
    steps = DIGITS_STEPS if suite == "digits" else FMNIST_STEPS
    by_steps = {"local-steps": steps}
    # An online period of a third of a round; a window of 6 syncs = 2 rounds' worth, shorter
    # than SWA's span (the second half of the run).
    hwa = {"strategy": "hwa", **by_steps, "hwa-sync-steps": steps // 3, "hwa-window": 6}
    plan: dict[str, dict[str, Any]] = {
        # FedAvg (global_*) and SWA (the second half) come from one run.
        "swa": {"strategy": "swa"},
        "mwa-dirichlet": {"strategy": "imwa", "imwa-episodes": 1},
        "mwa-dirichlet-earlier": {"strategy": "imwa", "imwa-episodes": 1,
                                  "imwa-weighting": "examples", "imwa-bn": "average"},
        "imwa-dirichlet": {"strategy": "imwa", "imwa-episodes": 5, "imwa-ema-decay": 0.5},
        "mwa-replicas": {"strategy": "imwa", **REPLICAS, "imwa-episodes": 1},
        "imwa-replicas": {"strategy": "imwa", **REPLICAS, "imwa-episodes": 4},
        "twa-v": {"strategy": "twa-v"},
        "twa-v-earlier": {"strategy": "twa-v", **EARLIER_TWA},
        "twa-t": {"strategy": "twa-t", "twa-rounds": 10},
        "twa-v-half": {"strategy": "twa-v", "num-server-rounds": SHORT // 2},
        "twa-v-main": {"strategy": "twa-v", **MAIN_TWA},
        "twa-t-main": {"strategy": "twa-t", "twa-rounds": 10, **MAIN_TWA},
        "swa-steps": {"strategy": "swa", **by_steps},
        "hwa-steps": hwa,
        "hwa-steps-fresh": {**hwa, "hwa-optimizer-state": "fresh"},
        # The control: FedAvg's schedule (one sync a round, a window of one) with the clients
        # keeping their optimisers as HWA's do, to tell the averaging from the momentum.
        "fedavg-steps-kept": {**hwa, "hwa-sync-steps": steps, "hwa-window": 1},
        "fedavg-late": {"strategy": "fedavg", **LATE},
        "fedavg-late-local": {"strategy": "fedavg", **LATE, "late-phase-members": "local"},
        "fedavg-late-mean": {"strategy": "fedavg", **LATE, "late-phase-shared-grad": "mean"},
        "fedavg-was": {"strategy": "fedavg", "was-layers": "all"},
        "fedavg-was-uniform": {"strategy": "fedavg", "was-layers": "all",
                               "was-scale-init": "uniform"},
        "fedavg-was-uniform-dom": {"strategy": "fedavg", "was-layers": "all",
                                   "was-scale-init": "uniform", "was-inference": "shadow"},
        "fedavg-was-earlier": {"strategy": "fedavg", "was-layers": "all",
                               "was-transform": "resize-crop"},
    }
    if suite == "digits":
        long = {"num-server-rounds": LONG}
        plan.update({
            # Every round starts a fresh client optimiser, so with momentum 0.9 a round of
            # H = 2 steps never builds up its velocity: the same pair without momentum tells
            # how much of HWA's loss that is.
            "swa-steps-nomom": {"strategy": "swa", **by_steps, "momentum": 0.0},
            "hwa-steps-nomom": {**hwa, "momentum": 0.0},
            "swa-long": {"strategy": "swa", **long},
            "swa-steps-long": {"strategy": "swa", **by_steps, **long},
            "hwa-steps-long": {**hwa, **long},
            "hwa-steps-long-fresh": {**hwa, **long, "hwa-optimizer-state": "fresh"},
            "fedavg-steps-kept-long": {**hwa, **long, "hwa-sync-steps": steps, "hwa-window": 1},
            "fedavg-late-long": {"strategy": "fedavg", **LATE, **long},
            "fedavg-late-local-long": {"strategy": "fedavg", **LATE, **long,
                                       "late-phase-members": "local"},
        })
    else:
        # The client methods ran on rho = 10 in the earlier evidence; the slow TWA-v-earlier
        # and the long runs are left to the digits suite.
        client = {"imbalance-ratio": 10.0}
        for name in list(plan):
            if name.startswith("fedavg-"):
                plan[name] = {**plan[name], **client}
        plan["swa-rho10"] = {"strategy": "swa", **client}
        for name in ("twa-v-earlier", "fedavg-late-mean", "fedavg-was-uniform-dom",
                     "fedavg-was-earlier", "twa-v-half", "twa-t-main"):
            del plan[name]
    return {name: {**base, **overrides} for name, overrides in plan.items()}


# (label, run, metric prefix, baseline run, baseline prefix); "" = the run's main model.
ROWS = [
    ("FedAvg", "swa", "global_", None, None),
    ("MWA, Dirichlet (uniform, BN recomputed)", "mwa-dirichlet", "", "swa", "global_"),
    ("MWA, Dirichlet (earlier: by examples, averaged BN)", "mwa-dirichlet-earlier", "",
     "mwa-dirichlet", ""),
    ("IMWA, 5 episodes, Dirichlet", "imwa-dirichlet", "", "mwa-dirichlet", ""),
    ("IMWA+EMA, Dirichlet", "imwa-dirichlet", "ema_", "imwa-dirichlet", ""),
    ("MWA, replicas (3 clients)", "mwa-replicas", "", None, None),
    ("IMWA, 4 episodes, replicas", "imwa-replicas", "", "mwa-replicas", ""),
    ("SWA (second half)", "swa", "", "swa", "global_"),
    ("TWA-v (journal: AdamW)", "twa-v", "", "twa-v", "swa_"),
    ("TWA-v (journal: AdamW) vs FedAvg", "twa-v", "", "swa", "global_"),
    ("TWA-v (main branch: SGD lr 2)", "twa-v-main", "", "twa-v-main", "swa_"),
    ("TWA-v (earlier budget)", "twa-v-earlier", "", "twa-v-earlier", "swa_"),
    ("TWA-t (10 rounds + 10 gradient rounds, AdamW)", "twa-t", "", "twa-t", "swa_"),
    ("TWA-t vs FedAvg", "twa-t", "", "swa", "global_"),
    ("TWA-t (main branch: SGD lr 2)", "twa-t-main", "", "twa-t-main", "swa_"),
    ("TWA-v after half the rounds vs FedAvg after all", "twa-v-half", "", "swa", "global_"),
    ("FedAvg after half the rounds", "twa-v-half", "global_", "swa", "global_"),
    ("FedAvg, local steps", "swa-steps", "global_", None, None),
    ("SWA, local steps", "swa-steps", "", "swa-steps", "global_"),
    ("HWA (H = 1/3 round, window 6)", "hwa-steps", "", "swa-steps", "global_"),
    ("HWA vs SWA", "hwa-steps", "", "swa-steps", ""),
    ("HWA's online (synchronised) model", "hwa-steps", "global_", "swa-steps", "global_"),
    ("HWA, fresh optimiser every sync (earlier)", "hwa-steps-fresh", "", "swa-steps",
     "global_"),
    ("FedAvg, clients keeping their optimiser (control)", "fedavg-steps-kept", "", "swa-steps",
     "global_"),
    ("HWA vs FedAvg with kept optimisers", "hwa-steps", "", "fedavg-steps-kept", ""),
    ("FedAvg, local steps, momentum 0", "swa-steps-nomom", "global_", "swa-steps", "global_"),
    ("HWA, momentum 0", "hwa-steps-nomom", "", "swa-steps-nomom", "global_"),
    ("HWA's online model, momentum 0", "hwa-steps-nomom", "global_", "swa-steps-nomom",
     "global_"),
    ("late-phase K=4, averaged members", "fedavg-late", "", "swa", "global_"),
    ("late-phase K=4, averaged members: ensemble", "fedavg-late", "ensemble_", "swa",
     "global_"),
    ("late-phase K=4, local members", "fedavg-late-local", "", "swa", "global_"),
    ("late-phase K=4, local members: ensemble", "fedavg-late-local", "ensemble_", "swa",
     "global_"),
    ("late-phase K=4, earlier mean gradient", "fedavg-late-mean", "", "fedavg-late", ""),
    ("shadow weights, reference, a = 1", "fedavg-was", "", "swa", "global_"),
    ("shadow weights, reference, a ~ U(0,1), plain inference", "fedavg-was-uniform", "",
     "swa", "global_"),
    ("shadow weights, reference, a ~ U(0,1), desire-oriented", "fedavg-was-uniform-dom", "",
     "swa", "global_"),
    ("shadow weights, earlier resize-crop, a = 1", "fedavg-was-earlier", "", "swa",
     "global_"),
    ("FedAvg, 30 rounds", "swa-long", "global_", None, None),
    ("SWA, 30 rounds", "swa-long", "", "swa-long", "global_"),
    ("FedAvg, 30 rounds of local steps", "swa-steps-long", "global_", None, None),
    ("SWA, 30 rounds of local steps", "swa-steps-long", "", "swa-steps-long", "global_"),
    ("HWA, 30 rounds' steps (H = 1/3 round, window 6)", "hwa-steps-long", "",
     "swa-steps-long", "global_"),
    ("HWA vs SWA, 30 rounds' steps", "hwa-steps-long", "", "swa-steps-long", ""),
    ("HWA, 30 rounds' steps, fresh optimiser every sync (earlier)", "hwa-steps-long-fresh", "",
     "swa-steps-long", "global_"),
    ("FedAvg, 30 rounds, clients keeping their optimiser (control)", "fedavg-steps-kept-long",
     "", "swa-steps-long", "global_"),
    ("HWA vs FedAvg with kept optimisers, 30 rounds' steps", "hwa-steps-long", "",
     "fedavg-steps-kept-long", ""),
    ("late-phase K=4, averaged, 30 rounds", "fedavg-late-long", "", "swa-long", "global_"),
    ("late-phase K=4, averaged, 30 rounds: ensemble", "fedavg-late-long", "ensemble_",
     "swa-long", "global_"),
    ("late-phase K=4, local, 30 rounds", "fedavg-late-local-long", "", "swa-long", "global_"),
    ("late-phase K=4, local, 30 rounds: ensemble", "fedavg-late-local-long", "ensemble_",
     "swa-long", "global_"),
]


def paired(out: Path, seeds: list[int], run: str, prefix: str, base: str,
           base_prefix: str, metric: str = "balanced_accuracy") -> tuple[str, int, int]:
    """Per-seed difference ``run - base`` in points: 'mean ± std', wins, seeds."""
    diffs = []
    for s in seeds:
        a, b = out / f"{run}-s{s}", out / f"{base}-s{s}"
        if (a / "summary.json").exists() and (b / "summary.json").exists():
            x, y = final(a, prefix, metric), final(b, base_prefix, metric)
            if x is not None and y is not None:
                diffs.append(100.0 * (x - y))
    mean, std, n = mean_std(diffs)
    if not n:
        return "n/a", 0, 0
    return f"{mean:+.2f} ± {std:.2f}", sum(d > 0 for d in diffs), n


def table(out: Path, seeds: list[int]) -> str:
    client_base = "swa-rho10" if finished(out, "swa-rho10", seeds) else "swa"
    lines = ["| method | seeds | final balanced acc (%) | final few-shot acc (%) | "
             "paired difference (points) | baseline | seeds up |",
             "|---|---|---|---|---|---|---|"]
    for label, name, prefix, base, base_prefix in ROWS:
        dirs = finished(out, name, seeds)
        if not dirs:
            continue
        values = [cell(final(d, prefix, m) for d in dirs)
                  for m in ("balanced_accuracy", "few_shot_accuracy")]
        if base is not None and name.startswith("fedavg-") and base == "swa":
            base = client_base
        if base is None:
            diff, base_label, up = "", "", ""
        else:
            text, wins, n = paired(out, seeds, name, prefix, base, base_prefix)
            diff, up = text, f"{wins}/{n}"
            base_label = f"{base} {base_prefix.rstrip('_') or 'main'}"
        lines.append(f"| {label} | {len(dirs)} | {values[0]} | {values[1]} | {diff} | "
                     f"{base_label} | {up} |")
    # Rounds HWA needs to reach FedAvg's final accuracy (HWA's rounds are syncs of 1/3 round).
    for hwa, fedavg in (("hwa-steps", "swa-steps"), ("hwa-steps-long", "swa-steps-long"),
                        ("hwa-steps-fresh", "swa-steps")):
        reached = []
        for s in seeds:
            h, f = out / f"{hwa}-s{s}", out / f"{fedavg}-s{s}"
            if (h / "summary.json").exists() and (f / "summary.json").exists():
                reached.append(rounds_to_target(read_rounds(h), final(f, "global_", "accuracy")))
        if reached:
            total = len(read_rounds(out / f"{hwa}-s{seeds[0]}")) - 1
            lines.append("")
            lines.append(f"{hwa}: sync at which HWA first reaches FedAvg's final accuracy "
                         f"(same seed), of {total}: {reached}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    def plan(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
        suite = runs(args.suite or "digits")
        names = args.only.split(",") if args.only else list(suite)
        return [(name, suite[name]) for name in names]

    return evidence_main(__doc__, "runs/fidelity-digits", plan, table,
                         {"--suite": "digits (default) or fashion-mnist",
                          "--only": "comma-separated run names (default: all)"})


if __name__ == "__main__":
    sys.exit(main())
