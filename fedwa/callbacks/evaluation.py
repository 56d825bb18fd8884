"""Evaluating the global model after every round: Flower's ``evaluate_fn`` of a fedwa run.

:class:`CentralEvaluator` evaluates on the server's balanced test set, recomputing BatchNorm
statistics first where the strategy asks (on the server's validation split, or federated from
the clients' sufficient statistics, :func:`recompute_bn_federated`); :class:`FederatedEvaluator`
sums the counts each node reports on its own held-out split. Either writes the round's record.
They are built by the composition root (:func:`fedwa.run.compose.RunParts.evaluator`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedwa.callbacks.results import ResultsWriter
from fedwa.common.errors import AllClientsFailedError
from fedwa.core.bn import (batchnorm_layers, combine_moments, has_batchnorm, moments_to_stats,
                           recompute_bn, set_bn_stats)
from fedwa.core.late_phase import collapse_state, ensemble_logits, num_members, set_active
from fedwa.core.metrics import classification_report, evaluate_model, report_from_counts
from fedwa.core.shadow import evaluation_seed, reseed_shadow
from fedwa.core.training import round_lr
from fedwa.data.task import make_plain_model, shot_options
from fedwa.flower.arrays import to_state_dict
from fedwa.flower.grid import FedwaGrid
from fedwa.flower.replies import (held_out_problem, model_problem, moments_problem,
                                  rejection_detail, screen)
from strategies.base import example_weighted

log = logging.getLogger("fedwa")

BN_MOMENTS_ACTION = f"{MessageType.QUERY}.bn_moments"


def member_bn_layers(model: torch.nn.Module, member: int | None) -> list[str]:
    """BN layers in forward order; only late-phase member ``member``'s copies when given."""
    names = [name for name, _ in batchnorm_layers(model)]
    if member is None:
        return names
    return [n for n in names if n.endswith(f"members.{member}")]



def bn_route(config: Mapping[str, Any]) -> str:
    """Where BatchNorm statistics of averaged models are recomputed: central/federated/off."""
    route = str(config["bn-recompute"])
    if route == "auto":
        return "central" if float(config["server-val-fraction"]) > 0 else "federated"
    return route


def values_per_example(model: torch.nn.Module, layer: str,
                       input_shape: tuple[int, ...]) -> int:
    """How many values per channel one example puts through BatchNorm layer ``layer`` (1
    after a linear layer, H*W after a convolution): one forward pass of a zero input.

    The random state is forked around the pass: shadow weights draw kernel transforms in
    eval mode, and this check must not change what the run computes.
    """
    module = dict(model.named_modules())[layer]
    seen: list[int] = []

    def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        seen.append(x.numel() // (x.shape[0] * x.shape[1]))

    handle = module.register_forward_pre_hook(hook)
    was_training = model.training
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0]


def recompute_bn_federated(grid: FedwaGrid, model: torch.nn.Module, timeout: float = 600.0,
                           member: int | None = None,
                           input_shape: tuple[int, ...] | None = None) -> None:
    """Recompute ``model``'s BatchNorm statistics from the clients' data, layer by layer.

    For each BN layer in forward order the server sends the current model to every node; each
    returns the count, sum and sum of squares of that layer's input on its own data (eval
    mode), and the server sets mean and variance from the totals. The result equals one exact
    pass over the union of the clients' data (:func:`fedwa.core.bn.federated_recompute_bn`).
    With late-phase weights, ``member`` selects the member whose BatchNorm copies are
    recomputed (the clients run that member).

    Every reply goes through :func:`fedwa.flower.replies.moments_problem` first: a NaN, a count
    that does not match the examples the node holds (``input_shape`` gives the values per
    example), or a negative variance leaves that node out of this layer's totals.

    Raises
    ------
    AllClientsFailedError
        No node returned usable moments for a layer.
    """
    for name in member_bn_layers(model, member):
        settings = {"bn-layer": name, **({"bn-member": member} if member is not None else {})}
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "config": ConfigRecord(settings)})
        messages = [Message(content, node, BN_MOMENTS_ACTION, group_id="bn")
                    for node in grid.get_node_ids()]
        channels = int(dict(model.named_modules())[name].num_features)
        positions = None
        if input_shape is not None:
            try:
                positions = values_per_example(model, name, tuple(input_shape))
            except Exception as err:  # noqa: BLE001 - a user's model may refuse a zero input
                # Then counts are only held to whole multiples of num-examples.
                log.info("BN statistics of %s: no probe pass (%s: %s); counts are checked "
                         "against num-examples only", name, type(err).__name__, err)
        replies = grid.send_and_receive(messages, timeout=timeout)
        usable, rejected = screen(
            replies, lambda r: moments_problem(r, channels,
                                               limit=grid.example_limit(r.metadata.src_node_id),
                                               positions=positions),
            f"BN statistics of {name}", grid.traffic.rejected)
        if not usable:
            raise AllClientsFailedError(f"no node returned usable BatchNorm statistics for "
                                        f"{name} ({rejection_detail(rejected) or 'no replies'})")
        parts = []
        for reply in usable:
            moments = to_state_dict(reply.content["moments"])
            parts.append({name: (moments["count"].reshape(()).double(),
                                 moments["sum"].double(), moments["sumsq"].double())})
        set_bn_stats(model, moments_to_stats(combine_moments(parts)))


class CentralEvaluator:
    """Flower's ``evaluate_fn``: evaluates on the balanced test set and writes the round record.

    It asks the strategy which models to evaluate (``models_to_evaluate``); the first one gives
    the round's main metrics, others are reported under their name.
    """

    #: Where the metrics come from, as written in every round record.
    mode = "central"

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
        # Shadow weights with desire-oriented inference draw random kernel transforms in eval
        # mode: every evaluation reseeds them from (run seed, round), so the same config and
        # seed give the same numbers, also after a resume.
        self.shadow_seed = evaluation_seed(int(config["seed"]), 0)

    def prepare(self, name: str, arrays: ArrayRecord) -> str | None:
        """Load ``arrays`` into the model, recomputing BN statistics where the strategy asks.

        Returns the route used, or None.
        """
        self.model.load_state_dict(to_state_dict(arrays))
        reseed_shadow(self.model, self.shadow_seed)  # BN recomputation may draw transforms
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
                recompute_bn_federated(self.grid, self.model, member=member,
                                       input_shape=tuple(self.data.input_shape))
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
        reseed_shadow(model, self.shadow_seed)
        report = evaluate_model(
            model, self.x_test, self.y_test, num_classes=self.data.num_classes,
            train_class_counts=self.data.train_class_counts,
            batch_size=int(self.config["eval-batch-size"]), device=self.device, **shots)
        if self.members > 1:
            reseed_shadow(self.model, self.shadow_seed)
            logits = ensemble_logits(self.model.to(self.device), self.x_test.to(self.device))
            ensemble = classification_report(
                logits.argmax(1).cpu().numpy(), self.y_test.numpy(), self.data.num_classes,
                self.data.train_class_counts, **shots)
            report.update({f"ensemble_{k}": ensemble[k] for k in
                           ("accuracy", "balanced_accuracy", "few_shot_accuracy")})
        return report

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        round_seconds = time.perf_counter() - self.last
        self.shadow_seed = evaluation_seed(int(self.config["seed"]), server_round)
        chooser = getattr(self.strategy, "models_to_evaluate", None)
        models = chooser(server_round, arrays) if chooser else {"global": arrays}
        (main_name, main_arrays), *others = models.items()
        routes = {}
        routes[main_name] = self.prepare(main_name, main_arrays)
        report = self.evaluate()
        self.final_state = {k: v.detach().cpu().clone()
                            for k, v in self.model.state_dict().items()}
        record: dict[str, Any] = {"round": server_round, "model": main_name,
                                  "evaluation": self.mode, **report}
        for name, other in others:
            routes[name] = self.prepare(name, other)
            extra = self.evaluate()
            record.update({f"{name}_{k}": extra[k] for k in
                           ("accuracy", "balanced_accuracy", "few_shot_accuracy", "loss")})
        # Traffic after evaluation: federated BN statistics are part of the round's bytes.
        traffic = self.grid.take_traffic()
        record["bn_route"] = {n: r for n, r in routes.items() if r} or None
        # Replies left out other than training ones (BN moments, evaluation counts, handshakes,
        # client evaluations), with node and reason: training rejections are in "rejected".
        evaluate_rejected = [{"what": "client evaluation", "node": n, "reason": p} for n, p in
                             getattr(self.strategy, "last_evaluate_rejected", ())]
        record["replies_rejected"] = (traffic.rejected + evaluate_rejected) or None
        client_eval = getattr(self.strategy, "last_evaluate_metrics", {}) if server_round else {}
        record.update({f"clients_{k.replace('-', '_')}": v for k, v in client_eval.items()})
        basis = getattr(self.strategy, "basis_bytes", None)
        if basis is not None and basis():
            record["twa_basis_bytes"] = basis()
        failures = getattr(self.strategy, "last_failures", None)
        client_train = getattr(self.strategy, "last_train_metrics", None)
        ok = []
        if failures is None or client_train is None:
            # Without fedwa's base the strategy screened nothing: count only replies that pass
            # the guard (a list-valued partition-id or an inf count would break the sums
            # below). A fedwa strategy has screened them already; not checked twice.
            ok = [r.content["metrics"] for r in traffic.replies
                  if model_problem(r, None) is None]
        failed = len(failures) if failures is not None else len(traffic.replies) - len(ok)
        # Errors, rejected replies (bad names, shapes, dtypes, NaN) and clients that did not
        # answer in time, with the nodes and reasons (fedwa strategies only).
        faults = getattr(self.strategy, "last_faults", None) or {}
        missing = int(faults.get("clients_missing", 0))
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
            # A retried round's traffic holds every attempt's replies; the strategy knows
            # which attempt counted.
            "clients_ok": (faults["clients_sampled"] - failed - missing if faults
                           else len(traffic.replies) - failed) if server_round > 0 else 0,
            "clients_failed": failed + missing if server_round > 0 else 0,
            "train_loss": client_train.get("train-loss") if client_train else None,
            "client_train": client_train or None,
        })
        if server_round > 0:
            record.update(faults)
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


HELD_OUT_ACTION = f"{MessageType.EVALUATE}.held_out"


class FederatedEvaluator(CentralEvaluator):
    """``evaluation = "federated"``: the server holds no test set. After every round each node
    evaluates the model on its own held-out test split and returns per-class counts; their
    sums give the round's metrics (:func:`fedwa.core.metrics.report_from_counts`), exactly those
    of one evaluation over the union of the nodes' test splits. Shot groups come from the
    class counts the nodes reported at the handshake."""

    mode = "federated"

    def evaluate(self) -> dict[str, Any]:
        arrays = ArrayRecord(self.model.state_dict())
        nodes = self.grid.get_node_ids()
        messages = [Message(RecordDict({"arrays": arrays}), node, HELD_OUT_ACTION,
                            group_id="held-out") for node in nodes]
        replies = self.grid.send_and_receive(messages,
                                             timeout=float(self.config["round-timeout"]))
        # Counts above the node's test split, or inconsistent ones, would skew the metrics of
        # the whole federation: such replies are left out like bad training replies.
        num_classes = int(self.data.num_classes)
        usable, rejected = screen(
            replies, lambda r: held_out_problem(r, num_classes,
                                                self.grid.test_limit(r.metadata.src_node_id)),
            "federated evaluation", self.grid.traffic.rejected)
        counts = [r.content["metrics"] for r in usable]
        if rejected:
            log.warning("federated evaluation: the metrics cover the %d nodes whose counts "
                        "were usable", len(counts))
        if not counts:
            raise AllClientsFailedError("federated evaluation: no node returned usable counts "
                                        f"({rejection_detail(rejected) or 'no replies'})")
        total = np.sum([list(m["class-total"]) for m in counts], axis=0)
        correct = np.sum([list(m["class-correct"]) for m in counts], axis=0)
        train_counts = np.sum([list(self.grid.node_info[n]["class-counts"]) for n in nodes],
                              axis=0)
        report = report_from_counts(correct, total, sum(float(m["loss-sum"]) for m in counts),
                                    train_counts.tolist(), **shot_options(self.config))
        report["evaluated_by"] = len(counts)
        report["eval_examples"] = int(total.sum())
        return report
