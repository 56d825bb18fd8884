"""The decentralized round: the server's relay loop and a node's merge-and-train step.

:func:`run_decentralized` replaces Flower's global-model loop (``Strategy.start``) for
:class:`strategies.DecentralizedStrategy`: there is no global model to track. Each round the
server sends every node, in one message of type ``train.merge``, the latest models of its
neighbours (as one ArrayRecord each, ``node-<partition id>``) and its row of the mixing matrix;
it keeps the models the nodes send back, for the next round's messages and for evaluation.
DIMAT on a complete graph (``dimat-basis = single``, its default there) makes two exchanges
per round instead: the round's merger merges every model in its own basis and replies
untrained, then every node receives that one merge and trains it. With
``node-pretrain-epochs`` every node first trains its own model, with no neighbour sent.

:func:`merge_and_train` is what a node does with that message (:mod:`fedwa.apps.client_app` calls
it): BatchNorm recomputation and activation-matching alignment (DIMAT only) on its own data
or on the shared proxy set (:func:`alignment_examples`), the weighted merge, BatchNorm
recomputation of the merged model, and local training.

Per round the results hold the mean, min and max accuracy of the nodes' models on the test set,
the accuracy of the plain average of every node's weights (``consensus_*``), the consensus
distance (mean squared distance of the nodes' parameters to their mean), the bytes per node,
and the mean accuracy before (``premerge_accuracy``) and after (``merged_accuracy``) the
round's merge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedwa.flower.arrays import to_record, to_state_dict
from fedwa.core.alignment import align_to, merge_aligned, permutation_spec, permute_state
from fedwa.core.bn import has_batchnorm, recompute_bn
from fedwa.common.errors import AllClientsFailedError
from fedwa.core.metrics import evaluate_model
from fedwa.flower.replies import model_problem, node_limit, rejection_detail, screen
from fedwa.callbacks.results import ResultsWriter, read_rounds
from fedwa.data.task import shot_options
from fedwa.core.training import LocalTrainSpec, train_local

log = logging.getLogger("fedwa")

MERGE_MESSAGE = "train.merge"
#: Metrics of a merge reply the server reads as single numbers (``float(...)``).
MERGE_SCALARS = ("merged-accuracy", "merged-balanced-accuracy", "align-seconds",
                 "merge-seconds", "train-loss")


def neighbour_key(partition_id: int) -> str:
    return f"node-{partition_id}"


# --- node side --------------------------------------------------------------------------------


def probe_examples(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A seeded subset of a node's examples for BN statistics and activation matching."""
    if len(x) <= count:
        return x
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[:count]]


def alignment_examples(round_config: Mapping[str, Any], data: Any,
                       x: torch.Tensor) -> torch.Tensor:
    """The examples a node aligns and recomputes BatchNorm statistics on.

    ``align-data = "proxy"`` (``dimat-align-data``): the run's server validation split, which
    :func:`fedwa.data.build_federated_data` holds out of the pool before the partition, so it
    is disjoint from every node's training data and the same for every node. Otherwise the
    node's own training examples ``x``.
    """
    if round_config.get("align-data", "local") == "proxy":
        proxy, _ = data.server_val()
        if not len(proxy):
            raise ValueError("dimat-align-data = proxy, but the server validation split is "
                             "empty (server-val-fraction is 0)")
        return proxy
    return x


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def merge_and_train(own: torch.nn.Module, neighbours: Mapping[int, Mapping[str, torch.Tensor]],
                    round_config: Mapping[str, Any], x: torch.Tensor, y: torch.Tensor,
                    spec: LocalTrainSpec, *, seed: int, make_model: Any,
                    device: torch.device | str = "cpu", bn_batch_size: int = 512,
                    evaluate_merged: Any = None,
                    align_x: torch.Tensor | None = None) -> dict[str, float]:
    """One node's round, in place on ``own``: (align,) merge, recompute BN, train.

    Parameters
    ----------
    own : torch.nn.Module
        The node's current model; ends as the merged and trained model.
    neighbours : mapping of int to state dict
        The neighbours' latest models by partition id.
    round_config : mapping
        ``self-weight``, ``neighbours`` and ``neighbour-weights`` (the node's row of the mixing
        matrix), ``align``, ``merge-bn-recompute`` and ``dimat-examples``. Optional:
        ``align-to`` (a partition id in ``neighbours`` whose model is the basis every model,
        the node's own included, is aligned to; -1 or absent: the node's own model),
        ``probe-seed`` (seed of the probe subset; default ``seed``) and ``train`` (false: merge
        only, no local training). A model of weight 0 is not merged (it can still be the
        basis); with a single model left of weight > 0 the "merge" is that model, copied:
        pre-training (no neighbours) and DIMAT's one merge given to every node (own weight 0).
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
    align_x : torch.Tensor, optional
        Examples for BatchNorm recomputation and activation matching (see
        :func:`alignment_examples`); default ``x``.

    Returns
    -------
    dict
        Training statistics plus ``align-seconds`` and ``merge-seconds``.
    """
    started = time.perf_counter()
    ids = [int(j) for j in round_config["neighbours"]]
    self_weight = float(round_config["self-weight"])
    weight_of = dict(zip(ids, (float(w) for w in round_config["neighbour-weights"])))
    probe_seed = int(round_config.get("probe-seed", seed))
    probe = probe_examples(x if align_x is None else align_x, int(round_config["dimat-examples"]),
                           probe_seed)
    with_bn = has_batchnorm(own)
    anchor = int(round_config.get("align-to", -1))
    states, weights = [], []
    if round_config["align"]:
        # Activation statistics must describe the alignment data, not whatever data each
        # model last saw, before units are matched by their correlations on it.
        if with_bn:
            recompute_bn(own, probe, batch_size=bn_batch_size, device=device)
        own_state = _state_copy(own)
        perm_spec = permutation_spec(own)
        other = make_model()
        reference = own
        if anchor >= 0:
            reference = make_model()
            reference.load_state_dict(neighbours[anchor])
            if with_bn:
                recompute_bn(reference, probe, batch_size=bn_batch_size, device=device)
        if self_weight > 0:
            if reference is own:
                states.append(own_state)
            else:
                perms = align_to(reference, own, probe, perm_spec)
                states.append(permute_state(own_state, perm_spec, perms))
            weights.append(self_weight)
        for j in ids:
            if weight_of[j] <= 0:
                continue  # the anchor of a node that is not its neighbour: basis only
            if j == anchor:
                states.append(_state_copy(reference))
            else:
                other.load_state_dict(neighbours[j])
                if with_bn:
                    recompute_bn(other, probe, batch_size=bn_batch_size, device=device)
                perms = align_to(reference, other, probe, perm_spec)
                states.append(permute_state({k: v.detach().cpu() for k, v in
                                             other.state_dict().items()}, perm_spec, perms))
            weights.append(weight_of[j])
    else:
        if self_weight > 0:
            states.append(_state_copy(own))
            weights.append(self_weight)
        for j in ids:
            if weight_of[j] > 0:
                states.append(dict(neighbours[j]))
                weights.append(weight_of[j])
    if not states:
        raise ValueError("nothing to merge: the node's own weight and every neighbour's are 0")
    aligned = time.perf_counter()
    if len(states) > 1:
        own.load_state_dict(merge_aligned(states, weights))
    elif self_weight <= 0:
        own.load_state_dict(states[0])  # one model given as it is (DIMAT's single merge)
    if with_bn and round_config["merge-bn-recompute"]:
        recompute_bn(own, probe, batch_size=bn_batch_size, device=device)
    merged = time.perf_counter()
    extra = {"align-seconds": aligned - started, "merge-seconds": merged - aligned}
    if evaluate_merged is not None:
        report = evaluate_merged(own)
        extra.update({"merged-accuracy": report["accuracy"],
                      "merged-balanced-accuracy": report["balanced_accuracy"]})
    if not round_config.get("train", True):
        return {"loss": 0.0, "steps": 0.0, "examples": 0.0, "seconds": 0.0, **extra}
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
                      resumed: bool = False, after_round: Callable[[int], None] | None = None,
                      ) -> dict[int, dict[str, torch.Tensor]]:
    """Every round of a decentralized run; returns the nodes' final models by partition id.

    A resumed run (``resumed``) starts at ``first_round`` with the relay's models already in
    ``strategy.models`` and its earlier rounds, round 0 included, in ``metrics.jsonl``: it
    neither pre-trains nor records round 0 again, also when it resumes from the checkpoint of
    round 0. ``after_round(r)`` runs once round ``r`` is recorded (checkpoints).

    Round 0 records the nodes as they enter the first merge: their initialisations or, with
    ``node-pretrain-epochs`` > 0, the models after pre-training (one exchange of
    ``train.merge`` messages that carry no neighbour: every node trains its own model, nothing
    is merged). Every round's record holds ``premerge_accuracy`` (the mean node accuracy of
    the models that went into the round's merge: the previous record's ``accuracy``, read back
    from ``metrics.jsonl`` in a resumed run) beside ``merged_accuracy`` (the merged models before
    local training), so round 1 reports accuracy before and after the first merge.

    With DIMAT's ``single`` basis (complete graphs) a round is two exchanges: the round's
    merger receives every other model and replies with the merged model, untrained; then
    every node receives that model and trains it. If the merger's reply is unusable, the
    next node (in partition order) merges instead.

    ``grid`` is a :class:`fedwa.flower.grid.FedwaGrid` (ordered node ids, traffic counts). A node
    whose reply is unusable (error, wrong names or shapes, NaN) keeps its previous model in
    the relay and is counted in ``clients_failed``; the round goes on. When no node replies
    usably the run stops with :class:`AllClientsFailedError`.
    """
    from strategies.base import train_metrics

    num_nodes = int(config["num-clients"])
    node_ids = list(grid.get_node_ids())
    # Ray's SuperNodes register one by one after the engine starts; on a loaded machine the
    # first call can come before any has (seen in the test suite). Wait for them, as Flower's
    # own strategies wait for min_available_nodes.
    deadline = time.monotonic() + 120.0
    while len(node_ids) < num_nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) != num_nodes:
        refused = rejection_detail(list(getattr(grid, "rejected_nodes", {}).items()))
        raise AllClientsFailedError(f"{len(node_ids)} nodes answered, the topology needs "
                                    f"{num_nodes}" + (f" (refused: {refused})" if refused else ""))
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
    basis = str(getattr(strategy, "basis", "own"))
    last_time = time.perf_counter()
    previous_accuracy: float | None = None
    if resumed:
        # The round before the first one is on disk (kept when metrics.jsonl was cut back to
        # the checkpoint), round 0 included.
        before = [r for r in read_rounds(writer.run_dir) if r.get("round") == first_round - 1]
        previous_accuracy = before[-1].get("accuracy") if before else None

    def evaluate(server_round: int, train: Mapping[str, Any] | None, failed: int,
                 merged_replies: Sequence[Message] = (),
                 extra: Mapping[str, Any] | None = None) -> None:
        nonlocal last_time, previous_accuracy
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
        merged = [float(r.content["metrics"]["merged-accuracy"]) for r in merged_replies
                  if "merged-accuracy" in r.content["metrics"]]
        accuracies = [r["accuracy"] for r in reports]
        balanced = [r["balanced_accuracy"] for r in reports]
        record = {
            "round": server_round, "model": "nodes", **mean_report(reports),
            "eval_examples": len(y),
            "node_accuracy": accuracies, "node_balanced_accuracy": balanced,
            "node_accuracy_min": min(accuracies), "node_accuracy_max": max(accuracies),
            "node_balanced_accuracy_min": min(balanced),
            # The nodes' models that went into this round's merge (the previous record).
            "premerge_accuracy": previous_accuracy if server_round else None,
            # The nodes' merged models before local training (evaluated by the nodes).
            "merged_accuracy": float(np.mean(merged)) if merged else None,
            "merged_accuracy_min": min(merged) if merged else None,
            "consensus_accuracy": consensus["accuracy"],
            "consensus_balanced_accuracy": consensus["balanced_accuracy"],
            "consensus_distance": consensus_distance(states, param_names),
            "seconds": time.perf_counter() - last_time if server_round else 0.0,
            "bytes_down": traffic.bytes_down, "bytes_up": traffic.bytes_up,
            "bytes_per_node": (traffic.bytes_down + traffic.bytes_up) / num_nodes,
            "clients_ok": num_nodes - failed if train is not None else 0,
            "clients_failed": failed if train is not None else 0,
            "train_loss": train.get("train-loss") if train else None,
            "client_train": dict(train) if train else None,
            "topology": strategy.topology,
            "dimat_basis": basis if getattr(strategy, "align", False) else None,
            **(extra or {}),
        }
        writer.append_round(record)
        log.info("round %d/%d  node accuracy %.4f (min %.4f)  consensus %.4f", server_round,
                 rounds, record["accuracy"], record["node_accuracy_min"],
                 record["consensus_accuracy"])
        previous_accuracy = record["accuracy"]
        last_time = time.perf_counter()

    def exchange(group: str, plan: Mapping[int, tuple[dict[str, Any],
                                                      Mapping[int, Mapping[str, torch.Tensor]]]],
                 required: Sequence[str] = ()
                 ) -> tuple[list[Message], list[tuple[int, str]]]:
        """Send each planned node its config and models; the usable replies (partition
        order) and the failures. Replies go through :func:`fedwa.flower.replies.model_problem`:
        the model's names, shapes and dtypes, payloads that are what they declare, example
        counts within what the node holds, and the metrics read below (``required`` ones
        too) single finite numbers."""
        messages = []
        for node in node_ids:
            pid = pid_of[node]
            if pid not in plan:
                continue
            round_config, models = plan[pid]
            content = RecordDict({"config": ConfigRecord(round_config)})
            for j, state in models.items():
                content[neighbour_key(j)] = to_record(state)
            messages.append(Message(content, node, MERGE_MESSAGE, group_id=group))
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        limit = getattr(grid, "example_limit", None)

        def check(reply: Message) -> str | None:
            if reply.metadata.src_node_id not in pid_of:
                return "unknown node"
            return model_problem(reply, expected, limit=node_limit(limit,
                                                                  reply.metadata.src_node_id),
                                 scalars=MERGE_SCALARS, required=required)

        usable, failures = screen(replies, check, f"exchange {group}")
        usable.sort(key=lambda r: pid_of[r.metadata.src_node_id])
        return usable, failures

    def none_usable(what: str, failures: Sequence[tuple[int, str]]) -> AllClientsFailedError:
        detail = "; ".join(f"node {n}: {p}" for n, p in failures[:3])
        return AllClientsFailedError(f"{what}: none of the {num_nodes} nodes returned a usable "
                                     f"model ({detail or 'no replies'})")

    def keep(replies: Sequence[Message]) -> None:
        for reply in replies:
            strategy.models[pid_of[reply.metadata.src_node_id]] = to_state_dict(
                reply.content["arrays"])

    if not resumed:
        pretrain = int(getattr(strategy, "pretrain_epochs", lambda: 0)())
        if pretrain > 0:
            # Pre-training: no neighbour is sent, so nothing is merged.
            usable, failures = exchange("pretrain", {pid: (strategy.pretrain_config(pid), {})
                                                     for pid in range(num_nodes)})
            if not usable:
                raise none_usable("pre-training", failures)
            keep(usable)
            evaluate(0, dict(train_metrics(usable)), num_nodes - len(usable),
                     extra={"pretrain_epochs": pretrain})
        else:
            evaluate(0, None, 0)
        if after_round is not None:
            after_round(0)
    for server_round in range(first_round, rounds + 1):
        extra: dict[str, Any] = {}
        if basis == "single":
            merged_state, merger_reply = None, None
            for attempt in range(num_nodes):
                merger = (strategy.merger(server_round) + attempt) % num_nodes
                merge_config = strategy.merger_config(server_round, merger)
                sent = {j: strategy.models[j] for j in merge_config["neighbours"]}
                replies, failures = exchange(f"{server_round}.merge",
                                             {merger: (merge_config, sent)},
                                             required=("align-seconds", "merge-seconds"))
                if replies:
                    merger_reply = replies[0]
                    merged_state = to_state_dict(merger_reply.content["arrays"])
                    break
                log.warning("round %d: merger %d failed; the next node merges", server_round,
                            merger)
            if merged_state is None or merger_reply is None:
                raise none_usable(f"round {server_round} (the one merge)", [])
            usable, failures = exchange(str(server_round), {
                pid: (strategy.given_config(server_round, pid, merger), {merger: merged_state})
                for pid in range(num_nodes)})
            merged_replies = [merger_reply]
            extra = {"merger": merger, "merger_attempts": attempt + 1}
        else:
            plan = {}
            for pid in range(num_nodes):
                plan[pid] = (strategy.round_config(server_round, pid),
                             {j: strategy.models[j] for j in strategy.senders(server_round, pid)})
            usable, failures = exchange(str(server_round), plan)
            merged_replies = usable
            if basis == "anchor":
                extra = {"merger": strategy.merger(server_round)}
        if not usable:
            raise none_usable(f"round {server_round}", failures)
        keep(usable)
        strategy.after_round(server_round, usable)
        train = dict(train_metrics(usable))
        if basis == "single":
            metrics = merger_reply.content["metrics"]
            train.update({"align-seconds": float(metrics["align-seconds"]),
                          "merge-seconds": float(metrics["merge-seconds"])})
        evaluate(server_round, train, num_nodes - len(usable), merged_replies, extra)
        if after_round is not None:
            after_round(server_round)
    return strategy.models
