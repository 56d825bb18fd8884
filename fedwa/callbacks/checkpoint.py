"""Checkpoints: what a run needs to continue after it was killed, written after rounds.

A checkpoint is one file, ``checkpoint.pt`` in the run folder, written to a temporary name,
flushed to disk and renamed into place, so a reader (or a resumed run) only ever sees a whole
checkpoint of a finished round. It holds:

- ``round``: the last finished round (0 = only the initial model was evaluated);
- ``arrays``: the global model after that round (``None`` in decentralized mode);
- ``strategy``: the strategy's :meth:`state_dict` (SWA/EMA averages, IMWA replicas, the
  relay's per-node models, ...), serialised at once because strategies hand out live tensors;
- ``client_models``: models that clients keep between rounds (partial averaging), by
  partition id, fetched from the nodes with a ``query.local_model`` message;
- ``rng``: the server process's Python, NumPy and torch generator states;
- ``records_count``: how many per-round records ``metrics.jsonl`` held (on resume the file
  is cut back to them, so a round record written after the checkpoint cannot be counted
  twice). The records themselves stay in ``metrics.jsonl``: saving them again every round
  would make a checkpoint cost grow with the run's length;
- ``evaluated_model``: the last evaluated main model (saved as ``model.pt`` at the end);
- ``config``: the run config the checkpoint belongs to.

The file holds only data: tensors, numbers, strings, None and containers of them, with numpy
arrays and Flower records converted (:mod:`fedwa.callbacks.safe_state`), and it is read with
``torch.load(weights_only=True)``, so a crafted ``checkpoint.pt`` cannot run code on
``--resume``; one naming any other class or function is refused, unloaded, in one line.
Checkpoints of the previous format (1, whose RNG states were pickled numpy arrays) are read
with numpy's array reconstructors allowed for that one load, and only those.

``metrics.jsonl`` is flushed to disk before each checkpoint, so a checkpoint on disk always has
its records there. A checkpoint that falls due less than ``checkpoint-min-seconds`` after the
previous one is skipped (the last round's never is): on rounds of a few milliseconds, writing
every round cost a tenth of the run, and a kill still loses at most that many seconds plus
the round in flight.

Resuming (:func:`resume_config`, then ``run_federation``) continues at ``round + 1`` and loses
at most the round that was in flight. Client-side state travels back to the nodes in a
``query.restore_local_model`` message before the first resumed round.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from fedwa.flower.arrays import record_named, to_record, to_state_dict
from fedwa.flower.replies import kept_model_problem, screen
from fedwa.common.errors import CheckpointError, UnsavableStateError
from fedwa.callbacks.results import read_rounds, write_durably
from fedwa.callbacks.safe_state import (UnsafeFileError, from_plain, legacy_numpy_names, load_data,
                                        one_line, to_plain)

log = logging.getLogger("fedwa")

CHECKPOINT_NAME = "checkpoint.pt"
#: 2: plain data only, read with weights_only=True (1: RNG states as pickled numpy arrays).
FORMAT = 2
LEGACY_FORMAT = 1
LOCAL_MODEL_ACTION = f"{MessageType.QUERY}.local_model"
RESTORE_ACTION = f"{MessageType.QUERY}.restore_local_model"

#: Keys a resumed run may change: where and how it runs, not what it computes.
RUNTIME_KEYS = ("backend", "device", "client-cpus", "client-gpus", "round-timeout",
                "min-available-clients", "round-retries", "checkpoint-every",
                "checkpoint-min-seconds")


# --- random generators ------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The server process's generator states: Python, NumPy, torch (and CUDA if present).

    Python's is a tuple of ints, torch's are ``uint8`` tensors; NumPy's key array is stored
    as a tensor when the checkpoint is written (:func:`fedwa.callbacks.safe_state.to_plain`).
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the file ---------------------------------------------------------------------------------


def checkpoint_bytes(payload: Mapping[str, Any]) -> bytes:
    """``payload`` serialised as a checkpoint file's contents: plain data only.

    Raises :class:`~fedwa.common.errors.UnsavableStateError` when it holds something else (see
    :func:`fedwa.callbacks.safe_state.to_plain`), rather than writing a file no safe load
    reads back.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **to_plain(dict(payload), "checkpoint")}, buffer)
    return buffer.getvalue()


def save_checkpoint(run_dir: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as the run's checkpoint, atomically; return its path."""
    path = Path(run_dir) / CHECKPOINT_NAME
    write_durably(path, checkpoint_bytes(payload))
    return path


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Read a run folder's checkpoint, or raise :class:`CheckpointError` saying why not."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT_NAME} to resume from (was it run "
                              "with checkpoint-every = 0, or killed before round 0 ended?)")
    legacy = False
    try:
        try:
            payload = load_data(path)
        except UnsafeFileError as err:
            # Read, never run: the names come from the pickle's opcodes, nothing was built.
            if not set(err.names) <= legacy_numpy_names():
                raise
            # Format 1 pickled the numpy RNG state: numpy's array reconstructors only.
            payload, legacy = load_data(path, legacy_numpy=True), True
        payload = from_plain(payload)
    except UnsafeFileError as err:
        # Named first: what made it refused, not numpy's names a format-1 file may also hold.
        legacy_names = legacy_numpy_names()
        names = [n for n in err.names if n not in legacy_names] or err.names
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        raise CheckpointError(f"{path} was refused and not loaded: it names {shown}, which no "
                              "fedwa checkpoint holds (only tensors and plain data), so "
                              "nothing in it ran") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same answer
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: "
                              f"{one_line(err)})") from None
    formats = (LEGACY_FORMAT,) if legacy else (FORMAT, LEGACY_FORMAT)
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        raise CheckpointError(f"{path} is not a fedwa checkpoint of format {FORMAT} (or "
                              f"{LEGACY_FORMAT})")
    return payload


def checkpointed_records(checkpoint: Mapping[str, Any], run_dir: str | Path
                         ) -> list[dict[str, Any]]:
    """The round records of ``run_dir`` up to the checkpoint's round: what ``metrics.jsonl``
    is cut back to on resume. Raises :class:`CheckpointError` when the file lacks some."""
    if "records" in checkpoint:  # checkpoints written before 2026-11-22 carried the records
        return [dict(r) for r in checkpoint["records"]]
    done = int(checkpoint["round"])
    records = [r for r in read_rounds(run_dir) if int(r.get("round", -1)) <= done]
    expected = int(checkpoint["records_count"])
    if len(records) != expected:
        raise CheckpointError(f"{Path(run_dir) / 'metrics.jsonl'} holds {len(records)} round "
                              f"records up to round {done}, the checkpoint counted {expected}; "
                              "was the file edited or truncated?")
    return records


def check_not_finished(run_dir: str | Path) -> None:
    """Refuse a run that completed: resuming it would rewrite its ``summary.json`` (its
    ``total_seconds`` became the seconds of the empty resume) and ``model.pt``. A failed run
    (``status`` failed) or a killed one (no ``summary.json``) may be resumed."""
    path = Path(run_dir) / "summary.json"
    try:
        status = json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return  # no summary (killed), or a torn one: the checkpoint decides
    if status == "completed":
        raise CheckpointError(f"{run_dir} is a finished run (summary.json: status completed); "
                              "there is nothing to resume, and its results stay as they are")


def resume_config(run_dir: str | Path, runtime: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The overrides that continue ``run_dir``: its saved config, ``resume`` set to it, and
    ``runtime`` keys (only those of :data:`RUNTIME_KEYS`) on top.

    Raises :class:`CheckpointError` when the folder is not a resumable run (or a finished
    one), and
    :class:`~fedwa.common.errors.ConfigError` when ``runtime`` holds a key that would change what
    the run computes.
    """
    from fedwa.common.errors import ConfigError

    run_dir = Path(run_dir).resolve()
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a fedwa run folder (no config.json)")
    check_not_finished(run_dir)
    checkpointed_records(load_checkpoint(run_dir), run_dir)  # fail now, before any engine starts
    for key in runtime or {}:
        if key not in RUNTIME_KEYS:
            raise ConfigError(key, runtime[key], "not changeable on resume; only "
                              + ", ".join(RUNTIME_KEYS) + " are")
    saved = json.loads(config_path.read_text())
    return {**saved, **dict(runtime or {}), "resume": str(run_dir)}


# --- state kept by the clients ----------------------------------------------------------------


#: Prefix of a node's kept optimiser state among its checkpointed entries: torch module names
#: cannot hold a "/", so these never collide with a model's state-dict keys.
OPTIMIZER_PREFIX = "optimizer-state/"


def fetch_client_models(grid: Any, timeout: float) -> dict[int, dict[str, torch.Tensor]]:
    """Every node's kept model (partial averaging) and kept optimiser state (HWA), by
    partition id, the optimiser's entries under :data:`OPTIMIZER_PREFIX`; nodes keeping
    none, or not answering, are left out."""
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), node, LOCAL_MODEL_ACTION, group_id="checkpoint")
                for node in nodes]
    models = {}

    def check(reply: Message) -> str | None:
        # A kept model with a bad payload or NaN would be restored into the node on resume.
        if reply.metadata.src_node_id not in grid.partition_of:
            return "not a node of this run"
        return kept_model_problem(reply)

    replies = grid.send_and_receive(messages, timeout=timeout)
    usable, _ = screen(replies, check, "checkpoint: kept model",
                       getattr(getattr(grid, "traffic", None), "rejected", None))
    for reply in usable:
        node = reply.metadata.src_node_id
        kept = {}
        arrays = record_named(reply.content, "arrays", ArrayRecord)
        if arrays:
            kept.update(to_state_dict(arrays))
        optimizer = record_named(reply.content, "optimizer", ArrayRecord)
        if optimizer:
            kept.update({OPTIMIZER_PREFIX + k: v for k, v in to_state_dict(optimizer).items()})
        if kept:
            models[grid.partition_of[node]] = kept
    return models


def _restore_content(kept: Mapping[str, torch.Tensor]) -> RecordDict:
    """A node's checkpointed entries as the restore message: model and optimiser apart."""
    model = {k: v for k, v in kept.items() if not k.startswith(OPTIMIZER_PREFIX)}
    optimizer = {k[len(OPTIMIZER_PREFIX):]: v for k, v in kept.items()
                 if k.startswith(OPTIMIZER_PREFIX)}
    content = RecordDict({"arrays": to_record(model)})
    if optimizer:
        content["optimizer"] = to_record(optimizer)
    return content


def restore_client_models(grid: Any, models: Mapping[int, Mapping[str, torch.Tensor]],
                          timeout: float) -> int:
    """Send each node its kept model back (``query.restore_local_model``); return how many
    nodes took theirs. A node missing from ``models`` keeps starting from the global model."""
    nodes = {grid.partition_of[n]: n for n in grid.get_node_ids()}
    messages = [Message(_restore_content(models[pid]), node, RESTORE_ACTION, group_id="resume")
                for pid, node in nodes.items() if pid in models]
    restored = 0
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("resume: node %d could not restore its model: %s",
                        reply.metadata.src_node_id, reply.error.reason.strip()[-200:])
        else:
            restored += 1
    return restored


class Checkpointer:
    """Writes the run's checkpoint after every ``every``-th round (and the last one).

    Parameters
    ----------
    writer : fedwa.callbacks.results.ResultsWriter
        The run's results folder (the checkpoint goes beside ``metrics.jsonl``).
    config : mapping
        The resolved run config.
    strategy : object
        Its ``state_dict()`` is saved; a strategy with ``keeps_client_models = True`` also has
        the nodes' kept models fetched.
    grid : fedwa.flower.grid.FedwaGrid
        For fetching client models.
    total_rounds : int
        The run's last round (always checkpointed).
    evaluated_model : callable, optional
        Returns the last evaluated main model (state dict) to save with the checkpoint.
    """

    def __init__(self, writer: Any, config: Mapping[str, Any], strategy: Any, grid: Any,
                 total_rounds: int, evaluated_model: Any = None) -> None:
        self.writer, self.config, self.strategy, self.grid = writer, dict(config), strategy, grid
        self.every = int(config.get("checkpoint-every", 1))
        self.min_seconds = float(config.get("checkpoint-min-seconds", 0.0))
        self.last_written = -math.inf  # time.monotonic() of the last checkpoint
        self.total_rounds = total_rounds
        self.evaluated_model = evaluated_model
        self.seconds = 0.0
        self.last_round: int | None = None
        #: Why this run cannot be checkpointed (its strategy holds state that is not data).
        self.unsavable: str | None = None
        if self.every:
            self._strategy_state()  # say it now, not after the first round

    def _strategy_state(self) -> dict[str, Any] | None:
        """The strategy's state, or None (said once, checkpoints off) when it is not data."""
        try:
            if not callable(getattr(self.strategy, "state_dict", None)):
                raise UnsavableStateError("it has no state_dict()")
            # Converted now, so that state a safe load could not read back is found at the
            # start of the run, not in a checkpoint that cannot be resumed.
            return to_plain(self.strategy.state_dict(),
                            f"{type(self.strategy).__name__}.state_dict()")
        except UnsavableStateError as err:
            self.unsavable = str(err)
            self.every = 0
            log.warning("checkpoints are off: strategy %s holds state a checkpoint cannot "
                        "store (%s), so this run cannot be resumed",
                        type(self.strategy).__name__, err)
            return None

    def __call__(self, server_round: int, arrays: ArrayRecord | None) -> None:
        last = server_round == self.total_rounds
        if self.every == 0 or (server_round % self.every and not last):
            return
        state = self._strategy_state()
        if state is None:
            return
        if not last and time.monotonic() - self.last_written < self.min_seconds:
            return
        started = time.perf_counter()
        client_models = None
        if getattr(self.strategy, "keeps_client_models", False):
            client_models = fetch_client_models(self.grid, float(self.config["round-timeout"]))
            self.grid.take_traffic()  # checkpoint traffic is not the next round's
        self.writer.sync()  # the records it counts reach the disk first
        save_checkpoint(self.writer.run_dir, {
            "round": server_round,
            "total_rounds": self.total_rounds,
            "arrays": dict(to_state_dict(arrays)) if arrays is not None else None,
            "strategy": state,
            "client_models": client_models,
            "rng": rng_state(),
            "records_count": self.writer.rounds_written,
            "evaluated_model": self.evaluated_model() if self.evaluated_model else None,
            "config": self.config,
            "resumes": self.writer.extra.get("resumes", []),
            "saved_at": time.time(),
        })
        self.seconds += time.perf_counter() - started
        self.last_round = server_round
        self.last_written = time.monotonic()
