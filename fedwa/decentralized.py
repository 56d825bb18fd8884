"""The decentralized round: the server's relay loop and a node's merge-and-train step.

:func:`run_decentralized` replaces Flower's global-model loop (``Strategy.start``) for
:class:`strategies.DecentralizedStrategy`: there is no global model to track. Each round the
server sends every node, in one message of type ``train.merge``, the latest models of its
neighbours (as one ArrayRecord each, ``node-<partition id>``) and its row of the mixing matrix;
it keeps the models the nodes send back, for the next round's messages and for evaluation.

:func:`merge_and_train` is what a node does with that message (:mod:`fedwa.client_app` calls
it): BatchNorm recomputation and activation-matching alignment on its own data (DIMAT only),
the weighted merge, BatchNorm recomputation of the merged model, and local training.

Per round the results hold the mean, min and max accuracy of the nodes' models on the test set,
the accuracy of the plain average of every node's weights (``consensus_*``), the consensus
distance (mean squared distance of the nodes' parameters to their mean) and the bytes per node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedwa.arrays import to_record, to_state_dict
from fedwa.alignment import align_to, merge_aligned, permutation_spec, permute_state
from fedwa.bn import has_batchnorm, recompute_bn
from fedwa.errors import AllClientsFailedError
from fedwa.metrics import evaluate_model
from fedwa.results import ResultsWriter
from fedwa.task import shot_options
from fedwa.training import LocalTrainSpec, train_local

log = logging.getLogger("fedwa")

MERGE_MESSAGE = "train.merge"


def neighbour_key(partition_id: int) -> str:
    return f"node-{partition_id}"


# --- node side --------------------------------------------------------------------------------


def probe_examples(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A seeded subset of a node's examples for BN statistics and activation matching."""
    if len(x) <= count:
        return x
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[:count]]


def merge_and_train(own: torch.nn.Module, neighbours: Mapping[int, Mapping[str, torch.Tensor]],
                    round_config: Mapping[str, Any], x: torch.Tensor, y: torch.Tensor,
                    spec: LocalTrainSpec, *, seed: int, make_model: Any,
                    device: torch.device | str = "cpu", bn_batch_size: int = 512,
                    evaluate_merged: Any = None) -> dict[str, float]:
    """One node's round, in place on ``own``: (align,) merge, recompute BN, train.

    Parameters
    ----------
    own : torch.nn.Module
        The node's current model; ends as the merged and trained model.
    neighbours : mapping of int to state dict
        The neighbours' latest models by partition id.
    round_config : mapping
        ``self-weight``, ``neighbours`` and ``neighbour-weights`` (the node's row of the mixing
        matrix), ``align``, ``merge-bn-recompute`` and ``dimat-examples``.
    x, y : torch.Tensor
        The node's own data.
    spec : LocalTrainSpec
        Local training of the round.
    seed : int
        Seed of local training and of the probe subset.
    make_model : callable
        Builds a fresh model of the run's architecture (to hold a neighbour while aligning).
    evaluate_merged : callable, optional
        Called with the merged model before training; its report's ``accuracy`` and
        ``balanced_accuracy`` come back as ``merged-accuracy``/``merged-balanced-accuracy``.
        Local training on a skewed partition pulls a node towards its own classes, so what
        merging achieved shows only before it.

    Returns
    -------
    dict
        Training statistics plus ``align-seconds`` and ``merge-seconds``.
    """
    started = time.perf_counter()
    ids = [int(j) for j in round_config["neighbours"]]
    weights = [float(round_config["self-weight"])] + [float(w) for w in
                                                       round_config["neighbour-weights"]]
    probe = probe_examples(x, int(round_config["dimat-examples"]), seed)
    with_bn = has_batchnorm(own)
    states = []
    if round_config["align"]:
        # Activation statistics must describe this node's data, not whatever data each model
        # last saw, before units are matched by their correlations on it.
        if with_bn:
            recompute_bn(own, probe, batch_size=bn_batch_size, device=device)
        states.append({k: v.detach().cpu().clone() for k, v in own.state_dict().items()})
        perm_spec = permutation_spec(own)
        other = make_model()
        for j in ids:
            other.load_state_dict(neighbours[j])
            if with_bn:
                recompute_bn(other, probe, batch_size=bn_batch_size, device=device)
            perms = align_to(own, other, probe, perm_spec)
            states.append(permute_state({k: v.detach().cpu() for k, v in
                                         other.state_dict().items()}, perm_spec, perms))
    else:
        states.append({k: v.detach().cpu().clone() for k, v in own.state_dict().items()})
        states.extend(dict(neighbours[j]) for j in ids)
    aligned = time.perf_counter()
    own.load_state_dict(merge_aligned(states, weights))
    if with_bn and round_config["merge-bn-recompute"]:
        recompute_bn(own, probe, batch_size=bn_batch_size, device=device)
    merged = time.perf_counter()
    extra = {"align-seconds": aligned - started, "merge-seconds": merged - aligned}
    if evaluate_merged is not None:
        report = evaluate_merged(own)
        extra.update({"merged-accuracy": report["accuracy"],
                      "merged-balanced-accuracy": report["balanced_accuracy"]})
    stats = train_local(own, x, y, spec, seed=seed, device=device)
    return {**stats, **extra}


# --- server side ------------------------------------------------------------------------------


def stratified_subset(y: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Indices of about ``count`` examples with every class in its share (all when 0)."""
    if count <= 0 or count >= len(y):
        return torch.arange(len(y))
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        share = max(1, round(count * len(members) / len(y)))
        picked.append(members[torch.randperm(len(members), generator=generator)[:share]])
    return torch.sort(torch.cat(picked)).values


def consensus_distance(states: Sequence[Mapping[str, torch.Tensor]],
                       names: Sequence[str]) -> float:
    """Mean over nodes of the squared L2 distance of their parameters to the nodes' mean."""
    total = 0.0
    for name in names:
        stacked = torch.stack([s[name].double() for s in states])
        total += float(((stacked - stacked.mean(0)) ** 2).sum())
    return total / len(states)


def mean_report(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Element-wise mean of evaluation reports: numbers and lists of numbers; others as first."""
    out: dict[str, Any] = {}
    for key, value in reports[0].items():
        values = [r.get(key) for r in reports]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = float(np.mean(values))
        elif all(isinstance(v, list) and v and all(isinstance(e, (int, float)) for e in v)
                 for v in values):
            out[key] = np.mean(np.asarray(values, dtype=float), axis=0).tolist()
        else:
            out[key] = value
    return out


def run_decentralized(grid: Any, config: Mapping[str, Any], strategy: Any, data: Any,
                      make_model: Any, device: torch.device, writer: ResultsWriter,
                      timeout: float | None = None, first_round: int = 1,
                      after_round: Callable[[int], None] | None = None,
                      ) -> dict[int, dict[str, torch.Tensor]]:
    """Every round of a decentralized run; returns the nodes' final models by partition id.

    A resumed run starts at ``first_round`` with the relay's models already in
    ``strategy.models``; ``after_round(r)`` runs once round ``r`` is recorded (checkpoints).

    ``grid`` is a :class:`fedwa.grid.FedwaGrid` (ordered node ids, traffic counts). A node
    whose reply is unusable (error, wrong names or shapes, NaN) keeps its previous model in
    the relay and is counted in ``clients_failed``; the round goes on. When no node replies
    usably the run stops with :class:`AllClientsFailedError`.
    """
    from strategies.base import reply_problem, train_metrics

    node_ids = list(grid.get_node_ids())
    num_nodes = int(config["num-clients"])
    if len(node_ids) != num_nodes:
        raise AllClientsFailedError(f"{len(node_ids)} nodes answered, the topology needs "
                                    f"{num_nodes}")
    pid_of = {node: grid.partition_of[node] for node in node_ids}
    template = make_model(strategy.node_seed(0))
    expected = ArrayRecord(template.state_dict())
    if not strategy.models:
        strategy.models = {pid: make_model(strategy.node_seed(pid)).state_dict()
                           for pid in range(num_nodes)}
    param_names = [n for n, _ in template.named_parameters()]
    x_test, y_test = data.test_data()
    eval_count = int(config["node-eval-examples"])
    subset = stratified_subset(y_test, eval_count, int(config["seed"]))
    rounds = strategy.total_rounds()
    shots = shot_options(config)
    last_time = time.perf_counter()

    def evaluate(server_round: int, train: Mapping[str, Any] | None, failed: int,
                 usable_replies: Sequence[Message] = ()) -> None:
        nonlocal last_time
        final = server_round == rounds
        idx = torch.arange(len(y_test)) if final else subset
        x, y = x_test[idx], y_test[idx]

        def report(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
            template.load_state_dict(state)
            return evaluate_model(template, x, y, num_classes=data.num_classes,
                                  train_class_counts=data.train_class_counts,
                                  batch_size=int(config["eval-batch-size"]), device=device,
                                  **shots)

        states = [strategy.models[pid] for pid in range(num_nodes)]
        reports = [report(s) for s in states]
        consensus = report(merge_aligned(states, [1.0] * num_nodes))
        traffic = grid.take_traffic()
        merged = [float(r.content["metrics"]["merged-accuracy"]) for r in usable_replies
                  if "merged-accuracy" in r.content["metrics"]]
        accuracies = [r["accuracy"] for r in reports]
        balanced = [r["balanced_accuracy"] for r in reports]
        record = {
            "round": server_round, "model": "nodes", **mean_report(reports),
            "eval_examples": len(y),
            "node_accuracy": accuracies, "node_balanced_accuracy": balanced,
            "node_accuracy_min": min(accuracies), "node_accuracy_max": max(accuracies),
            "node_balanced_accuracy_min": min(balanced),
            # The nodes' merged models before local training (evaluated by the nodes).
            "merged_accuracy": float(np.mean(merged)) if merged else None,
            "merged_accuracy_min": min(merged) if merged else None,
            "consensus_accuracy": consensus["accuracy"],
            "consensus_balanced_accuracy": consensus["balanced_accuracy"],
            "consensus_distance": consensus_distance(states, param_names),
            "seconds": time.perf_counter() - last_time if server_round else 0.0,
            "bytes_down": traffic.bytes_down, "bytes_up": traffic.bytes_up,
            "bytes_per_node": (traffic.bytes_down + traffic.bytes_up) / num_nodes,
            "clients_ok": num_nodes - failed if server_round else 0,
            "clients_failed": failed if server_round else 0,
            "train_loss": train.get("train-loss") if train else None,
            "client_train": dict(train) if train else None,
            "topology": strategy.topology,
        }
        writer.append_round(record)
        log.info("round %d/%d  node accuracy %.4f (min %.4f)  consensus %.4f", server_round,
                 rounds, record["accuracy"], record["node_accuracy_min"],
                 record["consensus_accuracy"])
        last_time = time.perf_counter()

    if first_round == 1:
        evaluate(0, None, 0)
        if after_round is not None:
            after_round(0)
    for server_round in range(first_round, rounds + 1):
        messages = []
        for node in node_ids:
            pid = pid_of[node]
            content = RecordDict({"config": ConfigRecord(strategy.round_config(server_round,
                                                                               pid))})
            for j in strategy.neighbours[pid]:
                content[neighbour_key(j)] = to_record(strategy.models[j])
            messages.append(Message(content, node, MERGE_MESSAGE, group_id=str(server_round)))
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        usable, failures = [], []
        for reply in replies:
            problem = reply_problem(reply, expected)
            node = reply.metadata.src_node_id
            if problem is None and node in pid_of:
                usable.append(reply)
            else:
                failures.append((node, problem or "unknown node"))
                log.warning("round %d: node %d left out: %s", server_round, node, problem)
        if not usable:
            detail = "; ".join(f"node {n}: {p}" for n, p in failures[:3])
            raise AllClientsFailedError(f"round {server_round}: none of the {num_nodes} nodes "
                                        f"returned a usable model ({detail or 'no replies'})")
        usable.sort(key=lambda r: pid_of[r.metadata.src_node_id])
        for reply in usable:
            state = to_state_dict(reply.content["arrays"])
            strategy.models[pid_of[reply.metadata.src_node_id]] = state
        strategy.after_round(server_round, usable)
        failed = num_nodes - len(usable)
        evaluate(server_round, dict(train_metrics(usable)), failed, usable)
        if after_round is not None:
            after_round(server_round)
    return strategy.models
