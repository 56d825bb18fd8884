"""The ServerApp: builds data, model and strategy from the run config, runs the rounds through
Flower's Grid, evaluates centrally after every round and writes the run's results folder.

``app`` reads its config from ``context.run_config`` (``flwr run .``); :func:`build_server_app`
binds an already-validated config (the ``fedwa`` CLI, tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedwa.config import resolve_config
from fedwa.grid import FedwaGrid
from fedwa.metrics import evaluate_model
from fedwa.results import ResultsWriter, default_run_name, unique_dir
from fedwa.task import federated_data, make_model
from fedwa.training import configure_threads, resolve_device, round_lr
from strategies import build_strategy

log = logging.getLogger("fedwa")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the config comes from pyproject plus ``--run-config``."""
    run_federation(grid, resolve_config(context.run_config, other_strategy_keys="drop"))


def build_server_app(config: Mapping[str, Any], run_dir: str | Path | None = None) -> ServerApp:
    """A ServerApp bound to a resolved config and, optionally, a run folder made beforehand."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, run_dir)

    return server


def run_federation(grid: Grid, config: Mapping[str, Any],
                   run_dir: str | Path | None = None) -> Path:
    """Run every round of one federated run and write its results folder; return the folder."""
    config = dict(config)
    device = resolve_device(str(config["device"]))
    configure_threads(device)
    data = federated_data(config)
    model = make_model(config, data)
    strategy = build_strategy(config)
    if run_dir is None:
        run_dir = unique_dir(config["output-dir"], config["run-name"] or default_run_name(config))
    writer = ResultsWriter(run_dir)
    writer.write("config.json", config)
    writer.write("partition.json", data.summary())
    fedwa_grid = FedwaGrid(grid, config)
    evaluator = CentralEvaluator(config, data, model, device, strategy, fedwa_grid, writer)
    log.info("fedwa: %s on %s, %d clients, %d rounds -> %s", config["strategy"],
             config["dataset"], config["num-clients"], config["num-server-rounds"], run_dir)
    try:
        strategy.start(
            grid=fedwa_grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=int(config["num-server-rounds"]),
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=evaluator,
        )
    except BaseException as err:
        writer.finish("failed", {"error": f"{type(err).__name__}: {err}"})
        raise
    writer.finish("completed")
    return Path(run_dir)


class CentralEvaluator:
    """Flower's ``evaluate_fn``: evaluates on the balanced test set and writes the round record.

    It asks the strategy which models to evaluate (``models_to_evaluate``); the first one gives
    the round's main metrics, others are reported under their name.
    """

    def __init__(self, config: Mapping[str, Any], data: Any, model: torch.nn.Module,
                 device: torch.device, strategy: Any, grid: FedwaGrid,
                 writer: ResultsWriter) -> None:
        self.config, self.data, self.model, self.device = config, data, model, device
        self.strategy, self.grid, self.writer = strategy, grid, writer
        self.x_test, self.y_test = data.test_data()
        self.last = time.perf_counter()

    def evaluate(self, arrays: ArrayRecord) -> dict[str, Any]:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate_model(
            self.model, self.x_test, self.y_test, num_classes=self.data.num_classes,
            train_class_counts=self.data.train_class_counts,
            batch_size=int(self.config["eval-batch-size"]), device=self.device,
            shot_split=str(self.config["shot-split"]),
            many_shot_min=int(self.config["many-shot-min"]),
            few_shot_max=int(self.config["few-shot-max"]))

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        round_seconds = time.perf_counter() - self.last
        chooser = getattr(self.strategy, "models_to_evaluate", None)
        models = chooser(server_round, arrays) if chooser else {"global": arrays}
        (main_name, main_arrays), *others = models.items()
        report = self.evaluate(main_arrays)
        traffic = self.grid.take_traffic()
        record: dict[str, Any] = {"round": server_round, "model": main_name, **report}
        for name, other in others:
            extra = self.evaluate(other)
            record.update({f"{name}_{k}": extra[k] for k in
                           ("accuracy", "balanced_accuracy", "few_shot_accuracy", "loss")})
        # Replies arrive in any order; sum in partition order so the float result is the same.
        train = sorted((r.content["metrics"] for r in traffic.replies if not r.has_error()),
                       key=lambda m: float(m.get("partition-id", 0)))
        examples = sum(float(m.get("num-examples", 0)) for m in train)
        failures = getattr(self.strategy, "last_failures", None)
        failed = len(failures) if failures is not None else len(traffic.replies) - len(train)
        record.update({
            "seconds": round_seconds if server_round > 0 else 0.0,
            "bytes_down": traffic.bytes_down,
            "bytes_up": traffic.bytes_up,
            "lr": round_lr(float(self.config["lr"]), str(self.config["lr-schedule"]),
                           max(server_round, 1), int(self.config["num-server-rounds"])),
            "clients_ok": len(traffic.replies) - failed if server_round > 0 else 0,
            "clients_failed": failed if server_round > 0 else 0,
            "train_loss": (sum(float(m.get("train-loss", 0.0)) * float(m["num-examples"])
                               for m in train) / examples) if examples else None,
        })
        self.writer.append_round(record)
        log.info("round %d/%d  accuracy %.4f  balanced %.4f  loss %.4f  (%.1fs)", server_round,
                 self.config["num-server-rounds"], report["accuracy"],
                 report["balanced_accuracy"], report["loss"], record["seconds"])
        self.last = time.perf_counter()
        return MetricRecord({k: float(report[k]) for k in ("accuracy", "balanced_accuracy",
                                                           "loss")})
