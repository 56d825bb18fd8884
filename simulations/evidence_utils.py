"""Shared by the evidence scripts: resumable runs and mean ± std cells."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedwa.cli import simulate
from fedwa.config import resolve_config
from fedwa.results import mean_std, read_rounds


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
    simulate(resolved, run_dir, show_progress=False)
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
