"""A run's output folder: resolved config, partition summary, per-round metrics, summary, plots.

Layout of ``<output-dir>/<run-name>/``::

    config.json       the resolved run config (every key, defaults filled in)
    partition.json    class counts of the training pool, of each client, of the test set
    metrics.jsonl     one JSON object per round (round 0 is the initial model)
    summary.json      status, final and best-round values, totals
    accuracy.png      accuracy curves

Files are written whole and renamed into place, so a reader never sees half a file; an existing
folder is never reused, so nothing a user ran before is overwritten.

``metrics.jsonl`` gets a line per round, written through at once (a killed process loses
nothing), and is flushed to disk (``fsync``) before each checkpoint rather than after every
line: on these machines a sync costs the run a few milliseconds (the training after it slows
down), as much as a tiny round's messages.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SCALAR_KEYS = ("accuracy", "balanced_accuracy", "many_shot_accuracy", "medium_shot_accuracy",
               "few_shot_accuracy", "loss")


def unique_dir(parent: str | Path, name: str, key: str = "output-dir") -> Path:
    """Create ``parent/name``, or ``name-2``, ``name-3``... if it exists; return it.

    Raises
    ------
    ConfigError
        Naming ``key`` (the config key or flag that gave ``parent``) when the folder cannot
        be made: ``parent`` is a file, read-only, on a full disk. :func:`check_output_dir`
        catches these before a run; this is for what changes in between.
    """
    from fedwa.common.errors import ConfigError

    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 10_000):
            path = parent / (name if attempt == 1 else f"{name}-{attempt}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise ConfigError(key, str(parent), f"a folder fedwa can make run folders in (making "
                          f"{err.filename or parent} failed: {err.strerror})") from None
    raise ConfigError(key, str(parent), f"a folder with a free run folder name: {name} to "
                      f"{name}-9999 are taken")


#: Bytes written (and removed) by :func:`check_output_dir`: enough to meet a full disk's
#: ENOSPC, too little to matter on one with room.
PROBE_BYTES = 4096


def _write_probe(folder: Path) -> None:
    """Write :data:`PROBE_BYTES` to a temporary file in ``folder``, flush them to disk, and
    remove the file; raise ``OSError`` as the write does (EACCES, EROFS, ENOSPC...)."""
    import tempfile

    with tempfile.TemporaryFile(dir=folder, prefix=".fedwa-probe-") as f:
        f.write(b"\0" * PROBE_BYTES)
        f.flush()
        os.fsync(f.fileno())


def check_output_dir(output_dir: str | Path, key: str = "output-dir") -> None:
    """Check, writing nothing that stays, that run folders can be made under ``output_dir``.

    The folder need not exist yet: its nearest existing ancestor must be a folder that takes
    a write (a small temporary file, flushed to disk, so a full disk shows here and not in
    the first round).

    Raises
    ------
    ConfigError
        Naming ``key``: a file where a folder should be, a read-only folder, a full disk.
    """
    from fedwa.common.errors import ConfigError

    path = Path(os.path.expanduser(str(output_dir)))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "it is" if existing == path else f"{existing} is"
        raise ConfigError(key, str(output_dir), f"a folder (or a path where one can be made): "
                          f"{what} a file")
    try:
        _write_probe(existing)
    except OSError as err:
        raise ConfigError(key, str(output_dir), f"a folder fedwa can write run folders in: "
                          f"writing in {existing} failed: {err.strerror or err}") from None


def default_run_name(config: Mapping[str, Any]) -> str:
    def plain(name: Any) -> str:  # module:Class plug-ins, without a path separator
        # Cut to 60 characters: a long import path must not push the folder name past the
        # file system's 255 bytes (the run-name key allows 200).
        return str(name).replace(":", ".").replace("/", ".").replace("\\", ".")[-60:]

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{plain(config['strategy'])}-{plain(config['dataset'])}-s{config['seed']}-{stamp}"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (write a temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a temporary file, flushed to disk, renamed into place.

    A process that dies leaves the old file or the new one, never half of one. The folder is
    not fsynced: after a power cut the old file may come back, which on short rounds is
    cheaper than syncing it every time.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON cannot hold NaN: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ResultsWriter:
    """Writes one run's folder as the run goes."""

    def __init__(self, run_dir: str | Path, *, plot: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.plot = plot
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.started = time.time()
        #: Entries added to ``summary.json`` when the run finishes.
        self.extra: dict[str, Any] = {}
        #: Lines in ``metrics.jsonl`` (checkpoints count them; the records stay in the file).
        self.rounds_written = 0
        self._metrics_file: Any = None  # kept open: a line per round is then one write

    def write(self, name: str, obj: Any) -> None:
        write_json(self.run_dir / name, _clean(obj))

    def append_round(self, record: Mapping[str, Any]) -> None:
        """Add a line to ``metrics.jsonl``; readers see it at once (see :meth:`sync`)."""
        record = _clean(dict(record))
        self.rounds_written += 1
        if self._metrics_file is None:
            self._metrics_file = self.metrics_path.open("a")
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()

    def sync(self) -> None:
        """Flush ``metrics.jsonl`` to disk (before a checkpoint that counts its lines)."""
        if self._metrics_file is not None:
            os.fsync(self._metrics_file.fileno())

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    def rewrite_rounds(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` with ``records``, atomically (a resumed run drops what
        was written after its checkpoint)."""
        self.close()
        records = [_clean(dict(record)) for record in records]
        self.rounds_written = len(records)
        lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
        write_durably(self.metrics_path, lines.encode())

    def finish(self, status: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` (and the plot, unless off, when there are rounds); return the
        summary."""
        self.sync()
        self.close()
        rounds = read_rounds(self.run_dir)
        summary = summarise(rounds)
        summary.update({"status": status, "total_seconds": time.time() - self.started})
        summary.update(self.extra)
        summary.update(extra or {})
        self.write("summary.json", summary)
        if rounds and self.plot:
            plot_run(self.run_dir)
        return summary


def read_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-round records of a run (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rounds


def summarise(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Final and best-round values of a run's records."""
    if not rounds:
        return {"rounds": 0}
    final = rounds[-1]
    scored = [r for r in rounds if r.get("accuracy") is not None]
    best = max(scored, key=lambda r: r["accuracy"]) if scored else final
    return {
        "rounds": int(final["round"]),
        "final": {k: final.get(k) for k in SCALAR_KEYS},
        "final_per_class_accuracy": final.get("per_class_accuracy"),
        "best": {"round": best["round"], **{k: best.get(k) for k in SCALAR_KEYS}},
        "bytes_down": sum(int(r.get("bytes_down", 0)) for r in rounds),
        "bytes_up": sum(int(r.get("bytes_up", 0)) for r in rounds),
        "train_seconds": sum(float(r.get("seconds", 0.0)) for r in rounds),
    }


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


# The plot worker's program: matplotlib imported at once, then one run folder read from stdin
# and drawn. Exit 0 once accuracy.png is written, 1 on any error (the parent then draws
# itself, so the user sees the error, if any, as without a worker).
_PLOT_WORKER = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from fedwa.callbacks.results import _pyplot, plot_run
_pyplot()
line = sys.stdin.readline().strip()
if line:
    plot_run(line)
"""


class PlotWorker:
    """A second Python process that imports matplotlib while the run trains, then draws.

    Importing matplotlib and drawing ``accuracy.png`` cost a run about a second after its
    last round (longer than a small run's rounds). Started before the rounds, the worker's
    imports run on another core meanwhile; :meth:`draw` then only waits for the drawing, and
    ``accuracy.png`` is there when it returns, as when the run drew it itself. Should the
    worker fail (or the machine refuse a process), :meth:`draw` draws in this process.
    """

    def __init__(self) -> None:
        import subprocess
        import sys

        try:
            self._process: Any = subprocess.Popen(
                [sys.executable, "-c", _PLOT_WORKER, json.dumps(sys.path)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            self._process = None

    def draw(self, run_dir: str | Path, timeout: float = 120.0) -> Path:
        """Draw ``run_dir``'s ``accuracy.png`` (:func:`plot_run`) and stop the worker."""
        process, self._process = self._process, None
        if process is not None:
            try:
                process.communicate(f"{Path(run_dir).resolve()}\n".encode(), timeout=timeout)
                if process.returncode == 0:
                    return Path(run_dir) / "accuracy.png"
            except (OSError, ValueError):  # the worker died before reading (a broken pipe)
                process.kill()
                process.wait()
            except BaseException:  # a timeout, or Ctrl-C: no worker outlives the run
                process.kill()
                process.wait()
                raise
        return plot_run(run_dir)

    def close(self) -> None:
        """Stop a worker that was not needed (a run with no rounds to draw)."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's accuracy curves (overall, balanced, and per shot group) to a PNG."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    rounds = read_rounds(run_dir)
    if not rounds:
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl with rounds")
    x = [r["round"] for r in rounds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")):
        left.plot(x, [r.get(key) for r in rounds], marker=".", label=label)
    for group in ("many", "medium", "few"):
        right.plot(x, [r.get(f"{group}_shot_accuracy") for r in rounds], marker=".",
                   label=f"{group}-shot")
    title = run_dir.name
    for ax, name in ((left, "overall"), (right, "by training-class frequency")):
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "accuracy.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean and sample standard deviation of the values that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return math.nan, math.nan, 0
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return mean, math.sqrt(var), len(vals)


def draw_mean_bands(ax: Any, groups: Mapping[str, Sequence[str | Path]],
                    key: str = "accuracy") -> None:
    """On ``ax``: per label, the mean of ``key`` per round over its runs, ± one std as a band."""
    for label, run_dirs in groups.items():
        runs = [read_rounds(d) for d in run_dirs]
        runs = [r for r in runs if r]
        if not runs:
            continue
        # By round number, not line index: a folder whose metrics.jsonl repeats or skips a
        # round (an old resume wrote round 0 twice) must not shift its curve against the rest.
        by_round = [{rec["round"]: rec for rec in r if isinstance(rec.get("round"), int)}
                    for r in runs]
        xs = sorted(set.intersection(*(set(b) for b in by_round)))
        stats = [mean_std(b[x].get(key) for b in by_round) for x in xs]
        means = [s[0] for s in stats]
        stds = [s[1] for s in stats]
        ax.plot(xs, means, marker=".", label=f"{label} (n={len(runs)})")
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                        [m + s for m, s in zip(means, stds)], alpha=0.2)


def plot_curves(groups: Mapping[str, Sequence[str | Path]], out: str | Path,
                key: str = "accuracy") -> Path:
    """Overlay the mean (band: ± one std over seeds) of ``key`` per round for each label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_mean_bands(ax, groups, key)
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {key.replace('_', ' ')}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
