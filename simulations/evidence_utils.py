"""Shared by the evidence scripts: resumable runs and mean ± std cells."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedwa.cli import FLOWER_ENV, simulate
from fedwa.run.config import resolve_config
from fedwa.callbacks.results import mean_std, read_rounds


def ensure_run(out: Path, name: str, seed: int, config: Mapping[str, Any]) -> Path:
    """Run ``config`` into ``out/<name>-s<seed>`` unless a completed run is already there.

    An interrupted run's folder is renamed aside, never overwritten.
    """
    run_dir = out / f"{name}-s{seed}"
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
        return run_dir
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}-interrupted-{int(time.time())}"))
    run_dir.mkdir(parents=True)
    resolved = resolve_config({**config, "seed": seed, "output-dir": str(out)})
    started = time.time()
    simulate(resolved, run_dir, show_progress=False, plot=False)
    print(f"{name} seed {seed}: {time.time() - started:.0f}s", flush=True)
    return run_dir


def finished(out: Path, name: str, seeds: Iterable[int]) -> list[Path]:
    return [out / f"{name}-s{s}" for s in seeds if (out / f"{name}-s{s}" / "summary.json").exists()]


def final(run_dir: Path, prefix: str, metric: str) -> float | None:
    """A metric of the last round; ``prefix`` picks a reported model ("" = the main one)."""
    last = read_rounds(run_dir)[-1]
    if prefix == "" or (prefix == "global_" and last.get("model") == "global"):
        return last.get(metric)
    return last.get(prefix + metric)


def cell(values: Iterable[float | None], scale: float = 100.0, digits: int = 2) -> str:
    mean, std, n = mean_std(values)
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}" if n else "n/a"


def evidence_main(doc: str, default_out: str, plan: Callable[[argparse.Namespace],
                  list[tuple[str, dict[str, Any]]]], table: Callable[[Path, list[int]], str],
                  options: Mapping[str, str] | None = None) -> int:
    """The command line every evidence script shares.

    ``plan(args)`` lists the (run name, config) pairs of one seed; runs go seed-major, so a
    partial result already covers every method. ``options`` adds string flags (name: help).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--table-only", action="store_true")
    for flag, text in (options or {}).items():
        parser.add_argument(flag, help=text)
    args = parser.parse_args()
    for name, value in FLOWER_ENV.items():
        os.environ.setdefault(name, value)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.table_only:
        for seed in seeds:
            for name, config in plan(args):
                ensure_run(out, name, seed, config)
    text = table(out, seeds)
    (out / "evidence.md").write_text(text)
    print(text)
    return 0
