"""The composition root: the one place that turns a resolved run config into the run's parts.

Everything a run is made of is built here, once, and handed down; the ServerApp
(:func:`fedwa.apps.server_app.serve`) and the CLI's checks only use what they are given:

1. :func:`compose` builds what the config alone decides, before any engine starts: the device,
   the federated data, the model factory and the initial global model, and the strategy; and it
   checks that a user's model fits the data and that the strategy accepts the model. The CLI
   calls it to check a run (:func:`fedwa.cli.check_runnable`) and hands the same parts to the
   run, so nothing is built twice.
2. :func:`open_run_folder` makes or reopens the run folder, holds its lock, reads the
   checkpoint of a resumed run and opens the results writer.
3. Once Flower hands the ServerApp its Grid, :meth:`RunParts.grid`, :meth:`RunParts.evaluator`
   and :meth:`RunParts.checkpointer` build the pieces that talk through it.

Example
-------
>>> from fedwa.run.config import resolve_config
>>> parts = compose(resolve_config({"dataset": "digits", "model": "mlp", "num-clients": 4}))
>>> parts.total_rounds, type(parts.strategy).__name__, parts.data.num_classes
(10, 'FedAvg', 10)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid

from fedwa.callbacks.checkpoint import (RUNTIME_KEYS, Checkpointer, check_not_finished,
                                        checkpointed_records, load_checkpoint)
from fedwa.callbacks.evaluation import CentralEvaluator, FederatedEvaluator
from fedwa.callbacks.results import ResultsWriter, default_run_name, unique_dir
from fedwa.callbacks.runlock import RunLock, remove_if_empty
from fedwa.common.errors import CheckpointError
from fedwa.core.training import configure_threads, resolve_device
from fedwa.data import FederatedData
from fedwa.data.task import check_model_fits, federated_data, make_model
from fedwa.flower.grid import FedwaGrid
from strategies import build_strategy


def total_rounds(strategy: Any, config: Mapping[str, Any]) -> int:
    """Rounds the strategy runs: its own count when it has one (IMWA episodes, TWA-t)."""
    counter = getattr(strategy, "total_rounds", None)
    return int(counter()) if counter else int(config["num-server-rounds"])


@dataclass
class RunFolder:
    """A run's folder while the run holds its lock.

    Attributes
    ----------
    path : Path
        The folder.
    writer : ResultsWriter
        Writes ``config.json``, ``partition.json``, ``metrics.jsonl`` and ``summary.json``.
    checkpoint : dict or None
        The checkpoint a resumed run continues from.
    """

    path: Path
    writer: ResultsWriter
    checkpoint: dict[str, Any] | None


@dataclass
class RunParts:
    """What one run is made of, built from its resolved config by :func:`compose`.

    Attributes
    ----------
    config : dict
        The resolved run config.
    device : torch.device
        Where the server evaluates (and, in the local backend, clients train).
    data : FederatedData
        The dataset, its partition and the server's test and validation splits.
    model : torch.nn.Module
        The initial global model (the run seed's shared initialisation); the central
        evaluator loads each round's model into it.
    strategy : object
        The server's strategy: a fedwa, Flower or user strategy.
    total_rounds : int
        Rounds the strategy runs.
    started : float
        ``time.perf_counter()`` when composing began (the run's time to resume counts from it).
    """

    config: dict[str, Any]
    device: torch.device
    data: FederatedData
    model: torch.nn.Module
    strategy: Any
    total_rounds: int
    started: float = field(default_factory=time.perf_counter)

    def make_model(self, seed: int | None = None) -> torch.nn.Module:
        """A fresh model of the run, initialised from the run seed or ``seed`` (the model
        factory: decentralized nodes each start from their own seed)."""
        return make_model(self.config, self.data, seed)

    def grid(self, grid: Grid) -> FedwaGrid:
        """Flower's Grid wrapped for this run: its config in every message, partition sizes
        to hold the nodes' counts to, node order."""
        # The server split the data: a node training on its partition cannot hold more.
        sizes = getattr(self.data, "client_indices", None)
        return FedwaGrid(grid, self.config,
                         partition_sizes=[len(idx) for idx in sizes] if sizes is not None
                         else None,
                         num_classes=int(self.data.num_classes))

    def evaluator(self, grid: FedwaGrid, writer: ResultsWriter) -> CentralEvaluator:
        """The round evaluator ``evaluation`` names: central or federated."""
        evaluator_class = (FederatedEvaluator if self.config["evaluation"] == "federated"
                           else CentralEvaluator)
        return evaluator_class(self.config, self.data, self.model, self.device, self.strategy,
                               grid, writer)

    def checkpointer(self, grid: FedwaGrid, writer: ResultsWriter,
                     evaluator: CentralEvaluator | None = None) -> Checkpointer:
        """The checkpointer of this run; with ``evaluator``, its last evaluated model is saved
        too (decentralized runs have none)."""
        return Checkpointer(writer, self.config, self.strategy, grid, self.total_rounds,
                            evaluated_model=None if evaluator is None
                            else lambda: evaluator.final_state)


def compose(config: Mapping[str, Any]) -> RunParts:
    """Build a run's parts from its resolved config, and check that they fit together.

    Parameters
    ----------
    config : Mapping
        A config from :func:`fedwa.run.config.resolve_config`.

    Returns
    -------
    RunParts
        The device, data, initial model, strategy and round count.

    Raises
    ------
    fedwa.common.errors.ConfigError
        A key that does not fit: the strategy's own checks (IMWA's budget, ``strategy-args``),
        a user's model that does not fit the data, a strategy that refuses the model.
    fedwa.common.errors.DataNotFoundError
        The dataset's files are not under ``data-root``.
    """
    started = time.perf_counter()
    config = dict(config)
    device = resolve_device(str(config["device"]))
    configure_threads(device)
    data = federated_data(config)
    model = make_model(config, data)
    # A strategy may check keys against each other (IMWA's budget), its constructor
    # arguments (strategy-args) and the model it will average (the DP wrappers).
    strategy = build_strategy(config)
    # A user's model is built and run once, and DIMAT's permutation spec looked up, so that a
    # bad plug-in is one line before the run rather than a failed first round.
    check_model_fits(config, data, strategy)
    check_model = getattr(strategy, "check_model", None)
    if check_model is not None:
        check_model(model.state_dict())
    return RunParts(config, device, data, model, strategy, total_rounds(strategy, config),
                    started)


def check_resumable(checkpoint: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose run computed something else than ``config`` would."""
    ignored = set(RUNTIME_KEYS) | {"resume"}
    saved = checkpoint["config"]
    changed = sorted(k for k in set(saved) | set(config)
                     if k not in ignored and saved.get(k) != config.get(k))
    if changed:
        key = changed[0]
        raise CheckpointError(f"the checkpoint in {config['resume']} was written with "
                              f"{key} = {saved.get(key)!r}, this run has {config.get(key)!r} "
                              "(was config.json edited?); a resumed run keeps its config")


@contextlib.contextmanager
def open_run_folder(parts: RunParts, run_dir: str | Path | None = None, *, plot: bool = True,
                    lock: RunLock | None = None) -> Iterator[RunFolder]:
    """The run's folder, locked for as long as the ``with`` block runs.

    With ``resume`` set it is that run's folder, and its checkpoint is read under the lock (a
    run that finished meanwhile is refused); otherwise ``run_dir``, or a new folder under
    ``output-dir``. ``lock`` is used when it is that folder's and held already (the CLI takes
    it before its checks). A folder made here and left empty by a failure is removed.
    """
    config = parts.config
    created = False
    if config["resume"]:
        run_dir = Path(config["resume"])
        if not (run_dir / "config.json").is_file():
            raise CheckpointError(f"{run_dir} is not a fedwa run folder (no config.json)")
    elif run_dir is None:
        run_dir = unique_dir(config["output-dir"], config["run-name"] or default_run_name(config))
        created = True
    else:
        created = not Path(run_dir).exists()
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(run_dir)
    own_lock = None if lock is not None and lock.covers(run_dir) else RunLock(run_dir).acquire()
    try:
        checkpoint = None
        if config["resume"]:
            check_not_finished(run_dir)
            checkpoint = load_checkpoint(run_dir)
            check_resumable(checkpoint, config)
        writer = ResultsWriter(run_dir, plot=plot)
        if checkpoint is None:
            writer.write("config.json", config)
            writer.write("partition.json", parts.data.summary())
        else:
            # Records written after the checkpoint belong to the round that was lost; the
            # summary of an earlier failed attempt no longer describes the run.
            writer.rewrite_rounds(checkpointed_records(checkpoint, run_dir))
            (writer.run_dir / "summary.json").unlink(missing_ok=True)
        yield RunFolder(run_dir, writer, checkpoint)
    except BaseException:
        if created:
            remove_if_empty(run_dir)
        raise
    finally:
        if own_lock is not None:
            own_lock.release()
