"""The ServerApp: runs the rounds of one run through Flower's Grid, evaluating and
checkpointing after every round, and writes the run's results folder.

It builds nothing itself: :func:`fedwa.run.compose.compose` turns the config into the run's
parts (data, model factory, strategy, round count) and :func:`fedwa.run.compose.open_run_folder`
opens the folder, its checkpoint and its results writer; :func:`serve` runs them.

``app`` reads its config from ``context.run_config`` (``flwr run .``); :func:`build_server_app`
binds an already-validated config, and optionally parts already composed (the ``fedwa`` CLI,
tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

# Re-exported: these lived here before the composition root and the evaluation callbacks
# moved out (fedwa.server_app.CentralEvaluator and friends in users' code).
from fedwa.callbacks.checkpoint import (RUNTIME_KEYS, Checkpointer, restore_client_models,
                                        resume_config, set_rng_state)
from fedwa.callbacks.evaluation import (BN_MOMENTS_ACTION, CentralEvaluator,
                                        FederatedEvaluator, recompute_bn_federated,
                                        values_per_example)
from fedwa.callbacks.results import ResultsWriter
from fedwa.callbacks.runlock import RunLock
from fedwa.flower.arrays import to_record
from fedwa.flower.grid import FedwaGrid
from fedwa.flower.rounds import run_rounds
from fedwa.run.compose import (RunFolder, RunParts, check_resumable, compose,
                               open_run_folder, total_rounds)
from fedwa.run.config import resolve_config

__all__ = ["BN_MOMENTS_ACTION", "CentralEvaluator", "FederatedEvaluator", "app", "build_server_app",
           "check_resumable", "main", "recompute_bn_federated", "restore", "run_federation",
           "serve", "total_rounds", "values_per_example"]

log = logging.getLogger("fedwa")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the config comes from pyproject plus ``--run-config``.

    ``--run-config "resume='/abs/run/folder'"`` continues that run from its checkpoint with
    its own saved config (only :data:`fedwa.callbacks.checkpoint.RUNTIME_KEYS` are taken from
    here).
    """
    config = resolve_config(context.run_config, other_strategy_keys="drop")
    if config["resume"]:
        config = resolve_config(resume_config(
            config["resume"], {k: config[k] for k in RUNTIME_KEYS}))
    run_federation(grid, config)


def build_server_app(config: Mapping[str, Any], run_dir: str | Path | None = None, *,
                     plot: bool = True, lock: RunLock | None = None,
                     parts: RunParts | None = None) -> ServerApp:
    """A ServerApp bound to a resolved config and, optionally, a run folder made beforehand.

    ``plot=False`` skips ``accuracy.png`` (importing matplotlib and drawing take about a second,
    which sweeps of short runs need not pay; ``fedwa plot RUN`` draws it later). ``lock`` is
    the run folder's lock when the caller holds it already (the CLI takes it before its
    checks); ``parts`` the run's parts when the caller composed them already (the CLI, for its
    checks). The exception that ended the ServerApp, if any, is kept as its
    ``fedwa_error``: Ray's engine swallows it, and an error raised before ``summary.json``
    exists would otherwise reach the user as no more than a missing file."""
    server = ServerApp()
    server.fedwa_error = None

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, config, run_dir, plot=plot, lock=lock, parts=parts)
        except BaseException as err:
            server.fedwa_error = err
            raise

    return server


def run_federation(grid: Grid, config: Mapping[str, Any],
                   run_dir: str | Path | None = None, *, plot: bool = True,
                   lock: RunLock | None = None, parts: RunParts | None = None) -> Path:
    """Run every round of one federated run and write its results folder; return the folder.

    With ``resume`` set, continue that folder's run after its last checkpointed round. The
    folder's lock (:mod:`fedwa.callbacks.runlock`) is held from before the checkpoint is read
    to after ``summary.json`` is written; ``lock`` is used when it is that folder's and held
    already. A folder this call created and left empty (it failed before writing anything) is
    removed. ``parts`` are composed from ``config`` when not given.
    """
    if parts is None:
        parts = compose(config)
    with open_run_folder(parts, run_dir, plot=plot, lock=lock) as folder:
        return serve(grid, parts, folder)


def serve(grid: Grid, parts: RunParts, folder: RunFolder) -> Path:
    """The rounds of one run, from its composed parts, in its locked folder."""
    config, strategy, writer, checkpoint = parts.config, parts.strategy, folder.writer, \
        folder.checkpoint
    fedwa_grid = parts.grid(grid)
    rounds = parts.total_rounds
    log.info("fedwa: %s on %s, %d clients, %d rounds -> %s", config["strategy"],
             config["dataset"], config["num-clients"], rounds, folder.path)
    if getattr(strategy, "decentralized", False):
        return _run_decentralized(fedwa_grid, parts, folder)
    evaluator = parts.evaluator(fedwa_grid, writer)
    checkpointer = parts.checkpointer(fedwa_grid, writer, evaluator)
    arrays, first_round = ArrayRecord(parts.model.state_dict()), 1
    if checkpoint is not None:
        arrays, first_round = restore(checkpoint, strategy, fedwa_grid, config, writer,
                                      parts.started)
        evaluator.final_state = checkpoint["evaluated_model"]

    def evaluate_and_checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluator(server_round, arrays)
        checkpointer(server_round, arrays)
        return metrics

    try:
        # Said apart from first_round: a resume from the checkpoint of round 0 also starts
        # at round 1, and its round 0 is already recorded.
        run_rounds(strategy, fedwa_grid, arrays, num_rounds=rounds, first_round=first_round,
                   resumed=checkpoint is not None, timeout=float(config["round-timeout"]),
                   retries=int(config["round-retries"]), evaluate_fn=evaluate_and_checkpoint)
    except BaseException as err:
        evaluator.save_model()
        writer.finish("failed", {"error": f"{type(err).__name__}: {err}",
                                 **checkpoint_summary(checkpointer)})
        raise
    evaluator.save_model()
    writer.finish("completed", checkpoint_summary(checkpointer))
    return folder.path


def restore(checkpoint: Mapping[str, Any], strategy: Any, grid: FedwaGrid,
            config: Mapping[str, Any], writer: ResultsWriter, started: float
            ) -> tuple[ArrayRecord | None, int]:
    """Put the strategy, the clients' kept models and the RNGs back as they were after the
    checkpointed round; return the global arrays and the first round to run."""
    strategy.load_state_dict(checkpoint["strategy"])
    client_models = checkpoint.get("client_models")
    own = getattr(strategy, "client_models", None)
    if own is not None:
        client_models = own()
    if client_models:
        restored = restore_client_models(grid, client_models, float(config["round-timeout"]))
        grid.take_traffic()  # the restore is not part of the next round's traffic
        log.info("resume: %d nodes took back their kept models", restored)
    set_rng_state(checkpoint["rng"])
    done = int(checkpoint["round"])
    seconds = time.perf_counter() - started
    # Kept in the summary (and in later checkpoints, for runs resumed more than once).
    writer.extra["resumes"] = list(checkpoint.get("resumes", [])) + [
        {"after_round": done, "seconds_to_resume": round(seconds, 3)}]
    log.info("resume: continuing after round %d (%.1fs to resume)", done, seconds)
    arrays = checkpoint["arrays"]
    return (to_record(arrays) if arrays is not None else None), done + 1


def checkpoint_summary(checkpointer: Checkpointer) -> dict[str, Any]:
    return {"checkpoint_round": checkpointer.last_round,
            "checkpoint_seconds": round(checkpointer.seconds, 3)}


def _run_decentralized(grid: FedwaGrid, parts: RunParts, folder: RunFolder) -> Path:
    """No global model: the relay loop of :mod:`fedwa.apps.decentralized`. Saves every node's
    final model (``node_models.pt``) and their plain average (``model.pt``)."""
    from fedwa.apps.decentralized import run_decentralized
    from fedwa.core.alignment import merge_aligned

    config, strategy, writer, checkpoint = parts.config, parts.strategy, folder.writer, \
        folder.checkpoint
    checkpointer = parts.checkpointer(grid, writer)
    first_round = 1
    try:
        if checkpoint is not None:
            _, first_round = restore(checkpoint, strategy, grid, config, writer, parts.started)
        models = run_decentralized(grid, config, strategy, parts.data, parts.make_model,
                                   parts.device, writer,
                                   timeout=float(config["round-timeout"]),
                                   first_round=first_round, resumed=checkpoint is not None,
                                   after_round=lambda r: checkpointer(r, None))
    except BaseException as err:
        writer.finish("failed", {"error": f"{type(err).__name__}: {err}",
                                 **checkpoint_summary(checkpointer)})
        raise
    torch.save(models, writer.run_dir / "node_models.pt")
    torch.save(merge_aligned([models[p] for p in sorted(models)], [1.0] * len(models)),
               writer.run_dir / "model.pt")
    writer.finish("completed", checkpoint_summary(checkpointer))
    return writer.run_dir
