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
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedwa.arrays import to_state_dict
from fedwa.bn import (batchnorm_layers, combine_moments, has_batchnorm, moments_to_stats,
                      recompute_bn, set_bn_stats)
from fedwa.config import resolve_config
from fedwa.errors import AllClientsFailedError
from fedwa.grid import FedwaGrid
from fedwa.late_phase import collapse_state, ensemble_logits, num_members, set_active
from fedwa.metrics import classification_report, evaluate_model
from fedwa.results import ResultsWriter, default_run_name, unique_dir
from fedwa.task import federated_data, make_model, make_plain_model, shot_options
from fedwa.training import configure_threads, resolve_device, round_lr
from strategies import build_strategy
from strategies.base import example_weighted

log = logging.getLogger("fedwa")

app = ServerApp()

BN_MOMENTS_ACTION = f"{MessageType.QUERY}.bn_moments"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the config comes from pyproject plus ``--run-config``."""
    run_federation(grid, resolve_config(context.run_config, other_strategy_keys="drop"))


def build_server_app(config: Mapping[str, Any], run_dir: str | Path | None = None, *,
                     plot: bool = True) -> ServerApp:
    """A ServerApp bound to a resolved config and, optionally, a run folder made beforehand.

    ``plot=False`` skips ``accuracy.png`` (importing matplotlib and drawing take about a second,
    which sweeps of short runs need not pay; ``fedwa plot RUN`` draws it later)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, run_dir, plot=plot)

    return server


def run_federation(grid: Grid, config: Mapping[str, Any],
                   run_dir: str | Path | None = None, *, plot: bool = True) -> Path:
    """Run every round of one federated run and write its results folder; return the folder."""
    config = dict(config)
    device = resolve_device(str(config["device"]))
    configure_threads(device)
    data = federated_data(config)
    model = make_model(config, data)
    strategy = build_strategy(config)
    if run_dir is None:
        run_dir = unique_dir(config["output-dir"], config["run-name"] or default_run_name(config))
    writer = ResultsWriter(run_dir, plot=plot)
    writer.write("config.json", config)
    writer.write("partition.json", data.summary())
    fedwa_grid = FedwaGrid(grid, config)
    log.info("fedwa: %s on %s, %d clients, %d rounds -> %s", config["strategy"],
             config["dataset"], config["num-clients"], config["num-server-rounds"], run_dir)
    if getattr(strategy, "decentralized", False):
        return _run_decentralized(fedwa_grid, config, strategy, data, device, writer)
    evaluator = CentralEvaluator(config, data, model, device, strategy, fedwa_grid, writer)
    try:
        strategy.start(
            grid=fedwa_grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=total_rounds(strategy, config),
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=evaluator,
        )
    except BaseException as err:
        evaluator.save_model()
        writer.finish("failed", {"error": f"{type(err).__name__}: {err}"})
        raise
    evaluator.save_model()
    writer.finish("completed")
    return Path(run_dir)


def _run_decentralized(grid: FedwaGrid, config: Mapping[str, Any], strategy: Any, data: Any,
                       device: torch.device, writer: ResultsWriter) -> Path:
    """No global model: the relay loop of :mod:`fedwa.decentralized`. Saves every node's
    final model (``node_models.pt``) and their plain average (``model.pt``)."""
    from fedwa.alignment import merge_aligned
    from fedwa.decentralized import run_decentralized

    try:
        models = run_decentralized(grid, config, strategy, data,
                                   lambda seed: make_model(config, data, seed), device, writer)
    except BaseException as err:
        writer.finish("failed", {"error": f"{type(err).__name__}: {err}"})
        raise
    torch.save(models, writer.run_dir / "node_models.pt")
    torch.save(merge_aligned([models[p] for p in sorted(models)], [1.0] * len(models)),
               writer.run_dir / "model.pt")
    writer.finish("completed")
    return writer.run_dir


def member_bn_layers(model: torch.nn.Module, member: int | None) -> list[str]:
    """BN layers in forward order; only late-phase member ``member``'s copies when given."""
    names = [name for name, _ in batchnorm_layers(model)]
    if member is None:
        return names
    return [n for n in names if n.endswith(f"members.{member}")]


def total_rounds(strategy: Any, config: Mapping[str, Any]) -> int:
    """Rounds the strategy runs: its own count when it has one (IMWA episodes, TWA-t)."""
    counter = getattr(strategy, "total_rounds", None)
    return int(counter()) if counter else int(config["num-server-rounds"])


def bn_route(config: Mapping[str, Any]) -> str:
    """Where BatchNorm statistics of averaged models are recomputed: central/federated/off."""
    route = str(config["bn-recompute"])
    if route == "auto":
        return "central" if float(config["server-val-fraction"]) > 0 else "federated"
    return route


def recompute_bn_federated(grid: FedwaGrid, model: torch.nn.Module, timeout: float = 600.0,
                           member: int | None = None) -> None:
    """Recompute ``model``'s BatchNorm statistics from the clients' data, layer by layer.

    For each BN layer in forward order the server sends the current model to every node; each
    returns the count, sum and sum of squares of that layer's input on its own data (eval
    mode), and the server sets mean and variance from the totals. The result equals one exact
    pass over the union of the clients' data (:func:`fedwa.bn.federated_recompute_bn`).
    With late-phase weights, ``member`` selects the member whose BatchNorm copies are
    recomputed (the clients run that member).
    """
    for name in member_bn_layers(model, member):
        settings = {"bn-layer": name, **({"bn-member": member} if member is not None else {})}
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "config": ConfigRecord(settings)})
        messages = [Message(content, node, BN_MOMENTS_ACTION, group_id="bn")
                    for node in grid.get_node_ids()]
        parts, failures = [], []
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                failures.append(reply.metadata.src_node_id)
                continue
            moments = to_state_dict(reply.content["moments"])
            parts.append({name: (moments["count"].reshape(()), moments["sum"],
                                 moments["sumsq"])})
        if failures:
            log.warning("BN statistics: nodes %s did not answer; using the others", failures)
        if not parts:
            raise AllClientsFailedError(f"no node returned BatchNorm statistics for {name}")
        set_bn_stats(model, moments_to_stats(combine_moments(parts)))


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
        self.route = bn_route(config) if has_batchnorm(model) else "off"
        self.members = num_members(model)
        self.plain = make_plain_model(config, data) if self.members > 1 else None
        self.final_state: dict[str, torch.Tensor] | None = None

    def prepare(self, name: str, arrays: ArrayRecord) -> str | None:
        """Load ``arrays`` into the model, recomputing BN statistics where the strategy asks.

        Returns the route used, or None.
        """
        self.model.load_state_dict(to_state_dict(arrays))
        if name not in getattr(self.strategy, "recompute_bn", ()) or self.route == "off":
            return None
        # Late-phase weights: every member's BatchNorm copies get their own statistics.
        members = [None] if self.members == 1 else list(range(self.members))
        for member in members:
            if member is not None:
                set_active(self.model, member)
            if self.route == "central":
                x_val, _ = self.data.server_val()
                recompute_bn(self.model, x_val, batch_size=int(self.config["eval-batch-size"]),
                             device=self.device, layers=member_bn_layers(self.model, member))
            else:
                recompute_bn_federated(self.grid, self.model, member=member)
        set_active(self.model, 0)
        return self.route

    def save_model(self) -> None:
        """Save the last main evaluated model (BN recomputed where it was) as model.pt; with
        late-phase weights that is the collapsed model, and the members go to
        model_members.pt."""
        if self.final_state is None:
            return
        if self.members > 1:
            torch.save(self.final_state, self.writer.run_dir / "model_members.pt")
            torch.save(collapse_state(self.final_state, self.members),
                       self.writer.run_dir / "model.pt")
        else:
            torch.save(self.final_state, self.writer.run_dir / "model.pt")

    def evaluate(self) -> dict[str, Any]:
        """Metrics of the loaded model; late-phase members are collapsed into one model, and
        their ensemble is reported too (``ensemble_*``)."""
        shots = shot_options(self.config)
        model = self.model
        if self.members > 1:
            self.plain.load_state_dict(collapse_state(self.model.state_dict(), self.members))
            model = self.plain
        report = evaluate_model(
            model, self.x_test, self.y_test, num_classes=self.data.num_classes,
            train_class_counts=self.data.train_class_counts,
            batch_size=int(self.config["eval-batch-size"]), device=self.device, **shots)
        if self.members > 1:
            logits = ensemble_logits(self.model.to(self.device), self.x_test.to(self.device))
            ensemble = classification_report(
                logits.argmax(1).cpu().numpy(), self.y_test.numpy(), self.data.num_classes,
                self.data.train_class_counts, **shots)
            report.update({f"ensemble_{k}": ensemble[k] for k in
                           ("accuracy", "balanced_accuracy", "few_shot_accuracy")})
        return report

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        round_seconds = time.perf_counter() - self.last
        chooser = getattr(self.strategy, "models_to_evaluate", None)
        models = chooser(server_round, arrays) if chooser else {"global": arrays}
        (main_name, main_arrays), *others = models.items()
        routes = {}
        routes[main_name] = self.prepare(main_name, main_arrays)
        report = self.evaluate()
        self.final_state = {k: v.detach().cpu().clone()
                            for k, v in self.model.state_dict().items()}
        record: dict[str, Any] = {"round": server_round, "model": main_name, **report}
        for name, other in others:
            routes[name] = self.prepare(name, other)
            extra = self.evaluate()
            record.update({f"{name}_{k}": extra[k] for k in
                           ("accuracy", "balanced_accuracy", "few_shot_accuracy", "loss")})
        # Traffic after evaluation: federated BN statistics are part of the round's bytes.
        traffic = self.grid.take_traffic()
        record["bn_route"] = {n: r for n, r in routes.items() if r} or None
        client_eval = getattr(self.strategy, "last_evaluate_metrics", {}) if server_round else {}
        record.update({f"clients_{k.replace('-', '_')}": v for k, v in client_eval.items()})
        basis = getattr(self.strategy, "basis_bytes", None)
        if basis is not None and basis():
            record["twa_basis_bytes"] = basis()
        ok = [r.content["metrics"] for r in traffic.replies if not r.has_error()]
        failures = getattr(self.strategy, "last_failures", None)
        failed = len(failures) if failures is not None else len(traffic.replies) - len(ok)
        client_train = getattr(self.strategy, "last_train_metrics", None)
        if client_train is None and ok:  # a strategy without fedwa's base: all error-free replies
            # Replies arrive in any order; sum in partition order for a repeatable float.
            ok.sort(key=lambda m: float(m.get("partition-id", 0)))
            client_train = example_weighted(ok, [float(m.get("num-examples", 0)) for m in ok])
        client_train = client_train if server_round > 0 else None
        record.update({
            "seconds": round_seconds if server_round > 0 else 0.0,
            "bytes_down": traffic.bytes_down,
            "bytes_up": traffic.bytes_up,
            "lr": round_lr(float(self.config["lr"]), str(self.config["lr-schedule"]),
                           max(server_round, 1), int(self.config["num-server-rounds"])),
            "clients_ok": len(traffic.replies) - failed if server_round > 0 else 0,
            "clients_failed": failed if server_round > 0 else 0,
            "train_loss": client_train.get("train-loss") if client_train else None,
            "client_train": client_train or None,
        })
        extra = getattr(self.strategy, "round_metrics", None)
        if extra is not None and server_round > 0:
            record.update(extra())
        self.writer.append_round(record)
        log.info("round %d/%d  accuracy %.4f  balanced %.4f  loss %.4f  (%.1fs)", server_round,
                 self.config["num-server-rounds"], report["accuracy"],
                 report["balanced_accuracy"], report["loss"], record["seconds"])
        self.last = time.perf_counter()
        return MetricRecord({k: float(report[k]) for k in ("accuracy", "balanced_accuracy",
                                                           "loss")})
