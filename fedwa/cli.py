"""The ``fedwa`` command: run one simulation, compare strategies over seeds, redraw plots.

User errors (bad config, missing data, a run whose clients all failed) print one line and exit
with status 2 (config) or 1 (run; also a run folder another process is using, a finished run
given to ``--resume``, a checkpoint that is refused); only a bug prints a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedwa.run.config import (all_known_keys, core_keys, folder_name, load_toml, parse_set,
                              resolve_config)
from fedwa.common.errors import ConfigError, FedwaError
from fedwa.callbacks.results import (PlotWorker, check_output_dir, default_run_name, mean_std,
                                     plot_curves, plot_run, read_rounds, unique_dir)
from fedwa.callbacks.runlock import RunLock, remove_if_empty

if TYPE_CHECKING:  # compose imports torch and Flower: `fedwa --help` need not
    from fedwa.run.compose import RunParts

# Quiet, offline-friendly Flower defaults; a user's own environment wins.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


# --- config gathering -------------------------------------------------------------------------


def gather_overrides(config_file: str | None, sets: Sequence[str]) -> dict[str, Any]:
    """TOML file values, then ``--set`` pairs on top.

    ``resume`` is refused here: given as a key, it resumed the old folder from inside a new
    run that had made (and left empty) a folder of its own, and exited 1 without saying why.
    The CLI resumes with ``--resume`` (``flwr run`` takes the key, see the README).
    """
    overrides: dict[str, Any] = load_toml(config_file) if config_file else {}
    overrides.update(parse_set(sets))
    if overrides.get("resume"):
        raise ConfigError("resume", overrides["resume"], "'' here; to continue that run, "
                          f"use: fedwa run --resume {overrides['resume']}")
    return overrides


def for_strategy(overrides: Mapping[str, Any], strategy: str, seed: int | None = None
                 ) -> dict[str, Any]:
    """Overrides for one strategy of a comparison: other strategies' keys are dropped."""
    from fedwa.run.config import _strategy_keys

    own = set(core_keys()) | set(_strategy_keys(strategy))
    foreign = set(all_known_keys()) - own
    picked = {k: v for k, v in overrides.items() if k not in foreign}
    picked["strategy"] = strategy
    if seed is not None:
        picked["seed"] = seed
    return picked


def set_log_levels(verbose: bool) -> None:
    """Flower's logs only with ``--verbose``.

    Flower logs a failed ServerApp with a traceback (fedwa reports it as one line; a genuine
    bug still raises with its traceback) and warns about settings fedwa makes on purpose, such
    as FedAvg's ``fraction_evaluate = 0``.
    """
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.CRITICAL)
    logging.getLogger("fedwa").setLevel(logging.INFO if verbose else logging.WARNING)


def check_runnable(config: Mapping[str, Any]) -> RunParts:
    """Everything that can be checked before an engine starts: the output folder, data files,
    the partition, the strategy and the model. Returns the run's parts
    (:func:`fedwa.run.compose.compose`), for :func:`simulate` to run without building them
    again."""
    from fedwa.common.errors import DataNotFoundError
    from fedwa.run.compose import compose

    # First: it is cheap, and a run that cannot write its folder should not load data. A
    # resumed run writes in its own folder, wherever output-dir points now.
    if config.get("resume"):
        check_output_dir(config["resume"], "resume")
    else:
        check_output_dir(config["output-dir"])
    try:
        return compose(config)
    except DataNotFoundError as err:
        raise ConfigError("data-root", config["data-root"], str(err)) from None


# --- running ----------------------------------------------------------------------------------


class Progress:
    """Follows a run's ``metrics.jsonl`` and shows round r/R, accuracy, elapsed time and ETA."""

    def __init__(self, run_dir: Path, num_rounds: int, label: str, enabled: bool) -> None:
        self.run_dir, self.num_rounds, self.label, self.enabled = run_dir, num_rounds, label, enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> Progress:
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.enabled:
            self.thread.join()

    def _follow(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), TextColumn("eta"),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        with bar:
            task = bar.add_task(self.label, total=self.num_rounds, acc="starting")
            seen = 0
            while True:
                stopping = self.stop.wait(0.5)
                rounds = read_rounds(self.run_dir)
                if len(rounds) != seen and rounds:
                    seen = len(rounds)
                    last = rounds[-1]
                    acc = last.get("accuracy")
                    text = f"acc {acc:.4f}" if acc is not None else ""
                    bar.update(task, completed=int(last["round"]), acc=text)
                if stopping:
                    break


def simulate(config: Mapping[str, Any], run_dir: Path, *, show_progress: bool = True,
             label: str | None = None, verbose: bool = False,
             plot: bool = True, lock: RunLock | None = None,
             parts: RunParts | None = None) -> dict[str, Any]:
    """Run one validated config on its simulation backend; return its summary.

    ``plot=False`` leaves out the run's ``accuracy.png`` (for sweeps and benchmarks).
    ``backend = local`` drives the ServerApp and ClientApp in this process
    (:mod:`fedwa.flower.local_backend`); ``ray`` hands them to Flower's simulation engine.
    ``lock`` is ``run_dir``'s lock when the caller holds it; otherwise it is taken here
    (:class:`~fedwa.common.errors.RunFolderBusyError` when another process holds it).
    ``parts`` are the run's parts from :func:`check_runnable`; composed here when not given.

    An error that ends the run before it writes ``summary.json`` (a check inside the
    ServerApp, a config that does not match the checkpoint) is raised as it was, so the user
    sees its message rather than a missing file.
    """
    own_lock = None
    if lock is None or not lock.covers(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)  # as the ServerApp's writer would
        own_lock = lock = RunLock(run_dir).acquire()
    try:
        return _simulate(config, run_dir, show_progress=show_progress, label=label,
                         verbose=verbose, plot=plot, lock=lock, parts=parts)
    finally:
        if own_lock is not None:
            own_lock.release()


def _simulate(config: Mapping[str, Any], run_dir: Path, *, show_progress: bool,
              label: str | None, verbose: bool, plot: bool, lock: RunLock,
              parts: RunParts | None) -> dict[str, Any]:
    """:func:`simulate` with the run folder locked."""
    for name, value in FLOWER_ENV.items():
        os.environ.setdefault(name, value)
    # Imported here so that `fedwa --help` and config errors stay fast.
    from fedwa.apps.client_app import app as client_app
    from fedwa.apps.server_app import build_server_app
    from fedwa.run.compose import compose

    set_log_levels(verbose)
    if parts is None:
        parts = compose(config)
    # The ServerApp writes the results and leaves accuracy.png to the worker, which imports
    # matplotlib meanwhile: the plot is drawn once summary.json is written, as before, but
    # its imports no longer add to the run's time.
    plotter = PlotWorker() if plot else None
    server_app = build_server_app(config, run_dir, plot=False, lock=lock, parts=parts)
    summary_path = run_dir / "summary.json"
    # A failed attempt's summary may be there already: only one this run wrote counts.
    before = summary_path.stat().st_mtime_ns if summary_path.exists() else None
    ended = False
    try:
        with Progress(run_dir, parts.total_rounds, label or run_dir.name, show_progress):
            if config["backend"] == "local":
                _run_local(server_app, client_app, config)
            else:
                _run_ray(server_app, client_app, config, verbose)
        ended = True
    finally:
        if plotter is not None:
            try:
                # Whenever there are rounds, also after a failure or Ctrl-C, as the
                # ServerApp's ResultsWriter.finish drew it.
                if read_rounds(run_dir):
                    plotter.draw(run_dir)
            except Exception:  # noqa: BLE001 - the run's own error is the one to report
                if ended:
                    raise
            finally:
                plotter.close()
    written = summary_path.exists() and summary_path.stat().st_mtime_ns != before
    if not written:
        error = server_app.fedwa_error
        if error is not None:
            # A FedwaError becomes one line in main(); anything else is a bug and keeps its
            # traceback (Ray's engine had swallowed both).
            raise error
        raise FedwaError(f"the run stopped before writing {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed":
        raise FedwaError(f"run failed: {summary.get('error', 'unknown error')} ({run_dir})")
    return summary


def _run_local(server_app: Any, client_app: Any, config: Mapping[str, Any]) -> None:
    from fedwa.apps.client_app import train_many
    from fedwa.flower.local_backend import run_in_process

    # Everything alive now (torch, Flower, the data: about 210,000 objects) stays alive for
    # the whole run, yet every full collection of the cyclic GC walked it again: at 1000
    # clients a round's replies set off such collections, 0.5-2 s each here. Frozen,
    # the collector skips them; unfrozen afterwards, so a process that goes on (tests, a
    # notebook, `fedwa compare`) collects them as before.
    gc.freeze()
    try:
        run_in_process(server_app, client_app, int(config["num-clients"]),
                       seed=int(config["seed"]),
                       train_many=train_many if config["batch-clients"] else None)
    except FedwaError:
        # Already recorded in summary.json (status failed), which simulate() reports as one
        # line, as with Ray, whose engine swallows the ServerApp's exception. Anything else is
        # a bug and keeps its traceback.
        pass
    finally:
        gc.unfreeze()


def _run_ray(server_app: Any, client_app: Any, config: Mapping[str, Any],
             verbose: bool) -> None:
    from flwr.simulation import run_simulation

    cpus = float(config["client-cpus"])
    backend_config = {
        "client_resources": {"num_cpus": cpus, "num_gpus": float(config["client-gpus"])},
        "init_args": {"num_cpus": max(os.cpu_count() or 1, int(cpus + 0.999)),
                      "include_dashboard": False, "logging_level": "ERROR"},
    }
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=int(config["num-clients"]),
                   backend_config=backend_config, verbose_logging=verbose)


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume and args.config:
        raise ConfigError("CONFIG", args.config, "no config file with --resume: a resumed "
                          "run keeps the config saved in its folder")
    lock: RunLock | None = None
    created: Path | None = None
    try:
        if args.resume:
            from fedwa.callbacks.checkpoint import load_checkpoint, resume_config
            from fedwa.run.compose import check_resumable

            run_dir = Path(args.resume).resolve()
            if (run_dir / "config.json").is_file():
                # First: a folder another process is running is said to be so, and changed
                # by no one else from here to the end of this run.
                lock = RunLock(run_dir).acquire()
            config = resolve_config(resume_config(run_dir, parse_set(args.set)))
            # An edited config.json: said now, in one line, not from inside the engine.
            check_resumable(load_checkpoint(run_dir), config)
        else:
            config = resolve_config(gather_overrides(args.config, args.set))
        set_log_levels(args.verbose)
        parts = check_runnable(config)
        if not args.resume:
            run_dir = unique_dir(config["output-dir"],
                                 config["run-name"] or default_run_name(config))
            created = run_dir
            lock = RunLock(run_dir).acquire()
        summary = simulate(config, run_dir, show_progress=not args.quiet,
                           verbose=args.verbose, lock=lock, parts=parts)
    except BaseException:
        if created is not None:
            remove_if_empty(created)  # a run that failed before writing anything
        raise
    finally:
        if lock is not None:
            lock.release()
    final = summary["final"]
    print(f"final accuracy {final['accuracy']:.4f}, balanced {final['balanced_accuracy']:.4f} "
          f"after {summary['rounds']} rounds ({summary['total_seconds']:.1f}s)")
    print(f"results: {run_dir}")
    return 0


# --- comparing --------------------------------------------------------------------------------


def _fmt(stats: tuple[float, float, int], scale: float = 100.0, digits: int = 2) -> str:
    mean, std, n = stats
    if n == 0:
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def rounds_to_target(rounds: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """The first round whose accuracy reaches ``target``, or None."""
    for r in rounds:
        if r.get("accuracy") is not None and r["accuracy"] >= target and r["round"] > 0:
            return int(r["round"])
    return None


def comparison_table(groups: Mapping[str, Sequence[Path]], target: float | None = None
                     ) -> tuple[str, dict[str, Any]]:
    """Markdown table (mean ± std over seeds, in %) and the same numbers as a dict."""
    header = ["strategy", "runs", "final acc", "best acc", "final bal. acc", "few-shot acc"]
    if target is not None:
        header.append(f"rounds to {target:.0%}")
    header += ["MB down+up", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    numbers: dict[str, Any] = {}
    for label, run_dirs in groups.items():
        summaries = [json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs]
        finals = [s["final"] for s in summaries]
        row = {
            "final_accuracy": mean_std(f["accuracy"] for f in finals),
            "best_accuracy": mean_std(s["best"]["accuracy"] for s in summaries),
            "final_balanced_accuracy": mean_std(f["balanced_accuracy"] for f in finals),
            "final_few_shot_accuracy": mean_std(f["few_shot_accuracy"] for f in finals),
            "megabytes": mean_std((s["bytes_down"] + s["bytes_up"]) / 1e6 for s in summaries),
            "wall_seconds": mean_std(s["total_seconds"] for s in summaries),
        }
        cells = [label, str(len(summaries)), _fmt(row["final_accuracy"]),
                 _fmt(row["best_accuracy"]), _fmt(row["final_balanced_accuracy"]),
                 _fmt(row["final_few_shot_accuracy"])]
        if target is not None:
            reached = [rounds_to_target(read_rounds(d), target) for d in run_dirs]
            row["rounds_to_target"] = reached
            hits = [r for r in reached if r is not None]
            cells.append(f"{sum(hits) / len(hits):.1f} ({len(hits)}/{len(reached)} reached)"
                         if hits else f"not reached (0/{len(reached)})")
        cells += [_fmt(row["megabytes"], 1.0, 1), _fmt(row["wall_seconds"], 1.0, 1)]
        lines.append("| " + " | ".join(cells) + " |")
        numbers[label] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
        numbers[label]["runs"] = [str(d) for d in run_dirs]
    return "\n".join(lines) + "\n", numbers


def cmd_compare(args: argparse.Namespace) -> int:
    overrides = gather_overrides(args.config, args.set)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies:
        raise ConfigError("--strategies", args.strategies, "a comma-separated list of names")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError("--seeds", args.seeds, "comma-separated whole numbers") from None
    if not seeds:
        raise ConfigError("--seeds", args.seeds, "at least one seed")
    if args.name is not None:
        # The comparison's folder, made in output-dir like a run's: the same rules as run-name.
        problem = folder_name(args.name) if args.name else "a non-empty folder name"
        if problem is not None:
            raise ConfigError("--name", args.name, problem)
    # Validate every run before starting the first, so a typo does not cost an hour.
    plan = [(s, seed, resolve_config(for_strategy(overrides, s, seed)))
            for s in strategies for seed in seeds]
    set_log_levels(getattr(args, "verbose", False))
    # The first seed of each strategy is checked, and runs on the parts its check composed.
    checked = {i: check_runnable(plan[i][2]) for i in range(0, len(plan), len(seeds))}
    out = unique_dir(plan[0][2]["output-dir"], args.name or
                     time.strftime("compare-%Y%m%d-%H%M%S"))
    groups: dict[str, list[Path]] = {s: [] for s in strategies}
    for i, (strategy, seed, config) in enumerate(plan, 1):
        run_dir = unique_dir(out, f"{strategy.replace(':', '.')}-s{seed}")
        label = f"[{i}/{len(plan)}] {strategy} seed {seed}"
        try:
            simulate(config, run_dir, show_progress=not args.quiet, label=label,
                     verbose=args.verbose, parts=checked.pop(i - 1, None))
        except BaseException:
            # Folders a failed run left empty go, and the comparison's if nothing is left.
            if remove_if_empty(run_dir):
                remove_if_empty(out)
            raise
        groups[strategy].append(run_dir)
    table, numbers = comparison_table(groups, args.target)
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps(numbers, indent=1))
    plot_curves(groups, out / "compare_accuracy.png", "accuracy")
    plot_curves(groups, out / "compare_balanced_accuracy.png", "balanced_accuracy")
    print(table)
    print(f"results: {out}")
    return 0


# --- plotting ---------------------------------------------------------------------------------


def check_image_path(flag: str, path: Path) -> None:
    """Refuse, before anything is drawn, an image file matplotlib cannot write.

    Raises
    ------
    ConfigError
        Naming ``flag``: an extension matplotlib has no writer for (it would raise only after
        every run's own plot was redrawn), or a folder that does not exist.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(flag, str(path), "an image file name ending in ."
                          + ", .".join(formats))
    if not path.parent.is_dir():
        raise ConfigError(flag, str(path), f"a file in an existing folder ({path.parent} is "
                          "not one)")


def cmd_plot(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not (d / "metrics.jsonl").exists():
            raise ConfigError("RUN_DIR", str(d), "a run folder holding metrics.jsonl")
    if args.out:
        check_image_path("--out", Path(args.out))
    for d in dirs:
        print(plot_run(d))
    if args.out or len(dirs) > 1:
        out = Path(args.out) if args.out else dirs[0].parent / "overlay_accuracy.png"
        print(plot_curves({d.name: [d] for d in dirs}, out, args.metric))
    return 0


# --- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedwa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated simulation")
    run.add_argument("config", nargs="?", help="TOML file with run-config keys")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a killed or failed run from its last checkpoint")
    run.set_defaults(func=cmd_run)

    compare = sub.add_parser("compare", help="run strategies over seeds on the same data")
    compare.add_argument("config", nargs="?", help="TOML file with run-config keys")
    compare.add_argument("--strategies", required=True, help="comma-separated, e.g. fedavg,fedprox")
    compare.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    compare.add_argument("--target", type=float, help="accuracy target for 'rounds to target'")
    compare.add_argument("--name", help="name of the comparison folder")
    compare.set_defaults(func=cmd_compare)

    for p in (run, compare):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a run-config key (repeatable)")
        p.add_argument("--quiet", action="store_true", help="no progress display")
        p.add_argument("--verbose", action="store_true", help="show Flower's and fedwa's logs")

    plot = sub.add_parser("plot", help="redraw the plots of finished runs")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", help="also overlay all runs into this PNG")
    plot.add_argument("--metric", default="accuracy", help="metric of the overlay")
    plot.set_defaults(func=cmd_plot)

    sub.add_parser("deploy", help="credentials, or a SuperLink and SuperNodes on this machine "
                   "running a config (see `fedwa deploy --help`)", add_help=False)

    keys = sub.add_parser("keys", help="list every run-config key with its default")
    keys.add_argument("--toml", action="store_true",
                      help="print as TOML (the [tool.flwr.app.config] table of pyproject.toml)")
    keys.add_argument("--markdown", action="store_true", help="print the README's key table")
    keys.set_defaults(func=cmd_keys)
    return parser


def cmd_keys(args: argparse.Namespace) -> int:
    from fedwa.run.config import toml_value

    if args.markdown:
        from fedwa.run.config import markdown_table

        print(markdown_table(), end="")
        return 0
    for key in all_known_keys().values():
        if args.toml:
            print(f"{key.name} = {toml_value(key.default)}")
        else:
            print(f"{key.name:24} {key.default!r:14} {key.help}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["deploy"]:
        # The deployment launcher keeps its own command line (python -m fedwa.deploy).
        from fedwa.deploy import main as deploy_main

        return deploy_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fedwa: error: {err}", file=sys.stderr)
        return 2
    except FedwaError as err:
        print(f"fedwa: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedwa: interrupted; finished rounds are in the run folder", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
