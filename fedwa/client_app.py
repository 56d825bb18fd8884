"""The ClientApp: local training on the node's own partition, and local evaluation.

Every message carries the run config the server validated (see :mod:`fedwa.grid`); the node's
partition comes from its ``node_config`` (``partition-id``, ``num-partitions``), which the
simulation sets and a SuperNode takes from ``--node-config``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedwa.arrays import record_entries, to_record, to_state_dict
from fedwa.bn import bn_moments
from fedwa.config import resolve_config
from fedwa.grid import RUN_CONFIG_KEY
from fedwa.metrics import evaluate_model
from fedwa.node_data import node_data
from fedwa.late_phase import num_members, set_active, train_late_phase
from fedwa.shadow import reseed_shadow
from fedwa.task import federated_data, local_train_spec, make_model
from fedwa.wsa import scope_kl, scope_regulariser
from fedwa.training import (client_seed, configure_threads, local_gradient, resolve_device,
                            train_local)

app = ClientApp()


def run_config_of(message: Message, context: Context) -> dict[str, Any]:
    """The server's resolved config; ``context.run_config`` only when a message lacks it."""
    if RUN_CONFIG_KEY in message.content.config_records:
        return record_entries(message.content[RUN_CONFIG_KEY])
    return resolve_config(context.run_config, other_strategy_keys="drop")


def partition_id_of(context: Context, config: dict[str, Any]) -> int:
    """This node's partition, checked against the run's number of clients."""
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError("node_config has no 'partition-id': start the SuperNode with "
                         "--node-config \"partition-id=I num-partitions=N\"")
    pid = int(node_config["partition-id"])
    count = int(node_config.get("num-partitions", config["num-clients"]))
    if count != int(config["num-clients"]) or not 0 <= pid < count:
        raise ValueError(f"node has partition-id={pid}, num-partitions={count}, but the run has "
                         f"num-clients={config['num-clients']}")
    return pid


def _own(config: dict[str, Any], context: Context, data, pid: int  # noqa: ANN001
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples this node trains on (its partition or its data-dir, minus a held-out
    test split under federated evaluation)."""
    own = node_data(config, context.node_config, data, pid)
    return own.x, own.y


def _local_data(message: Message, context: Context):  # noqa: ANN202
    config = run_config_of(message, context)
    device = resolve_device(str(config["device"]))
    configure_threads(device)
    pid = partition_id_of(context, config)
    data = federated_data(config)
    return config, device, pid, data


def _load_model(config: dict[str, Any], data, arrays: ArrayRecord) -> torch.nn.Module:  # noqa: ANN001
    model = make_model(config, data)
    model.load_state_dict(to_state_dict(arrays))
    return model


LOCAL_MODEL_KEY = "fedwa-local-model"


def _starting_model(config: dict[str, Any], data, received: ArrayRecord,  # noqa: ANN001
                    round_config: dict[str, Any], context: Context) -> torch.nn.Module:
    """The model this round starts from.

    Normally the received model. With ``keep-local-model`` (partial averaging) the node keeps
    its own full model in ``context.state`` across rounds and the server sends only some
    entries: those replace the node's own, the rest stay local. A node with no model yet
    starts from the run's shared initialisation.
    """
    model = make_model(config, data)
    if round_config.get("keep-local-model"):
        if LOCAL_MODEL_KEY in context.state.array_records:
            model.load_state_dict(to_state_dict(context.state[LOCAL_MODEL_KEY]))
        state = model.state_dict()
        state.update(to_state_dict(received))
        model.load_state_dict(state)
    else:
        model.load_state_dict(to_state_dict(received))
    return model


def _regulariser(round_config: dict[str, Any]):  # noqa: ANN202
    """WSA's scope term when the strategy sent target scopes, else None."""
    if "wsa-lambda" not in round_config:
        return None, None
    names = list(round_config["wsa-names"])
    targets = {n: (torch.tensor(mu), torch.tensor(sigma)) for n, mu, sigma in
               zip(names, round_config["wsa-mu"], round_config["wsa-sigma"])}
    return scope_regulariser(targets, names, float(round_config["wsa-lambda"])), targets


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received model on this node's partition; reply with weights and metrics."""
    started = time.perf_counter()
    config, device, pid, data = _local_data(message, context)
    round_config = dict(message.content["config"]) if "config" in message.content else {}
    received = message.content["arrays"]
    model = _starting_model(config, data, received, round_config, context)
    x, y = _own(config, context, data, pid)
    server_round = int(round_config.get("server-round", 1))
    regulariser, targets = _regulariser(round_config)
    spec = local_train_spec(config, round_config)
    seed = client_seed(int(config["seed"]), server_round, pid)
    reseed_shadow(model, seed)  # shadow-weight transforms: a fresh, reproducible draw per round
    if num_members(model) > 1:
        # Late-phase weights: the members train apart once the run's progress passes the start.
        late = spec.progress_start >= float(config["late-phase-start"]) - 1e-9
        stats = train_late_phase(model, x, y, spec, seed=seed, device=device, late=late)
    else:
        stats = train_local(model, x, y, spec, seed=seed, device=device,
                            regulariser=regulariser)
    if device.type != "cpu":  # a module walk that costs more than a tiny model's step
        model.to("cpu")
    state = model.state_dict()
    metrics = {
        "num-examples": len(x),
        "partition-id": pid,
        "train-loss": stats["loss"],
        "train-steps": stats["steps"],
        "train-seconds": stats["seconds"],
    }
    if targets is not None:
        with torch.no_grad():
            metrics["wsa-kl"] = float(scope_kl(state, targets, list(targets)))
    if round_config.get("keep-local-model"):
        context.state[LOCAL_MODEL_KEY] = to_record(state)
    names = round_config.get("return-names") or list(received.keys())
    metrics["seconds"] = time.perf_counter() - started
    return Message(RecordDict({"arrays": to_record({n: state[n] for n in names}),
                               "metrics": MetricRecord(metrics)}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received model on this node's own training partition.

    Nodes hold no test split of their own in simulation; this reports how well the model fits
    each client's local distribution. With ``evaluate-local-model`` the node evaluates its own
    kept model (partial averaging) on the balanced test set instead.
    """
    config, device, pid, data = _local_data(message, context)
    round_config = dict(message.content["config"]) if "config" in message.content else {}
    if round_config.get("evaluate-local-model"):
        # Partial averaging: how good is the node's own model, on the balanced test set.
        model = make_model(config, data)
        if LOCAL_MODEL_KEY in context.state.array_records:
            model.load_state_dict(to_state_dict(context.state[LOCAL_MODEL_KEY]))
        x, y = data.test_data()
    else:
        model = _load_model(config, data, message.content["arrays"])
        x, y = _own(config, context, data, pid)
    report = evaluate_model(model, x, y, num_classes=data.num_classes,
                            train_class_counts=data.train_class_counts,
                            batch_size=int(config["eval-batch-size"]), device=device)
    metrics = MetricRecord({"num-examples": len(x), "local-accuracy": report["accuracy"],
                            "local-balanced-accuracy": report["balanced_accuracy"],
                            "local-loss": report["loss"]})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


@app.evaluate("held_out")
def evaluate_held_out(message: Message, context: Context) -> Message:
    """Federated evaluation (``evaluation = "federated"``): the received model on this node's
    own test split, as per-class counts the server can add up exactly."""
    config, device, pid, data = _local_data(message, context)
    own = node_data(config, context.node_config, data, pid)
    if own.x_test is None or not len(own.y_test):
        raise ValueError(f"partition {pid} has no test split to evaluate on")
    model = _load_model(config, data, message.content["arrays"])
    report = evaluate_model(model, own.x_test, own.y_test, num_classes=data.num_classes,
                            train_class_counts=[1] * data.num_classes,
                            batch_size=int(config["eval-batch-size"]), device=device)
    total = torch.bincount(own.y_test, minlength=data.num_classes)
    recall = report["per_class_accuracy"]
    correct = [round((r or 0.0) * int(n)) for r, n in zip(recall, total.tolist())]
    metrics = MetricRecord({"num-examples": len(own.y_test), "partition-id": pid,
                            "class-total": total.tolist(), "class-correct": correct,
                            "loss-sum": report["loss"] * len(own.y_test)})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


@app.train("merge")
def merge(message: Message, context: Context) -> Message:
    """Decentralized round (DIMAT, gossip): merge the neighbours' models into this node's own,
    aligned first for DIMAT, then train; the node keeps its model in ``context.state``."""
    from fedwa.decentralized import merge_and_train, neighbour_key, stratified_subset

    started = time.perf_counter()
    config, device, pid, data = _local_data(message, context)
    round_config = dict(message.content["config"])
    node_seed = int(round_config["node-seed"])

    def node_model() -> torch.nn.Module:
        return make_model(config, data, node_seed)

    own = node_model()  # round 1: the node's own initialisation (shared or its own seed)
    if LOCAL_MODEL_KEY in context.state.array_records:
        own.load_state_dict(to_state_dict(context.state[LOCAL_MODEL_KEY]))
    ids = [int(j) for j in round_config["neighbours"]]
    neighbours = {j: to_state_dict(message.content[neighbour_key(j)]) for j in ids}
    x, y = _own(config, context, data, pid)
    server_round = int(round_config["server-round"])
    seed = client_seed(int(config["seed"]), server_round, pid)
    evaluate_merged = None
    if round_config.get("evaluate-merged"):
        x_test, y_test = data.test_data()
        idx = stratified_subset(y_test, int(round_config["eval-examples"]), int(config["seed"]))

        def evaluate_merged(model: torch.nn.Module) -> dict[str, Any]:
            return evaluate_model(model, x_test[idx], y_test[idx],
                                  num_classes=data.num_classes,
                                  train_class_counts=data.train_class_counts,
                                  batch_size=int(config["eval-batch-size"]), device=device)

    stats = merge_and_train(own, neighbours, round_config, x, y,
                            local_train_spec(config, round_config), seed=seed,
                            make_model=node_model, device=device,
                            bn_batch_size=int(config["eval-batch-size"]),
                            evaluate_merged=evaluate_merged)
    if device.type != "cpu":
        own.to("cpu")
    state = own.state_dict()
    context.state[LOCAL_MODEL_KEY] = to_record(state)
    metrics = {
        "num-examples": len(x), "partition-id": pid, "train-loss": stats["loss"],
        "train-steps": stats["steps"], "train-seconds": stats["seconds"],
        "align-seconds": stats["align-seconds"], "merge-seconds": stats["merge-seconds"],
        **{k: stats[k] for k in ("merged-accuracy", "merged-balanced-accuracy") if k in stats},
        # What arrived, so tests (and users) can check the relay: sender ids and checksums.
        "received-from": ids,
        "received-sums": [float(sum(t.double().sum() for t in neighbours[j].values()
                                    if t.is_floating_point())) for j in ids],
        "seconds": time.perf_counter() - started,
    }
    return Message(RecordDict({"arrays": to_record(state), "metrics": MetricRecord(metrics)}),
                   reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Handshake: tell the server this node's partition and what it holds."""
    config, _, pid, data = _local_data(message, context)
    _, y = _own(config, context, data, pid)
    counts = torch.bincount(y, minlength=data.num_classes).tolist()
    info = MetricRecord({"partition-id": pid, "num-examples": len(y), "class-counts": counts})
    return Message(RecordDict({"info": info}), reply_to=message)


@app.train("gradient")
def gradient(message: Message, context: Context) -> Message:
    """The gradient of this node's training loss at the received weights (federated TWA-t)."""
    config, device, pid, data = _local_data(message, context)
    model = _load_model(config, data, message.content["arrays"])
    x, y = _own(config, context, data, pid)
    loss, gradients = local_gradient(model, x, y, batch_size=int(config["batch-size"]),
                                     device=device)
    metrics = MetricRecord({"num-examples": len(x), "partition-id": pid, "train-loss": loss})
    return Message(RecordDict({"arrays": to_record(gradients), "metrics": metrics}),
                   reply_to=message)


@app.query("bn_moments")
def batchnorm_moments(message: Message, context: Context) -> Message:
    """Sufficient statistics (count, sum, sum of squares) of one BatchNorm layer's input on
    this node's data, for the server to recompute the layer's statistics federatedly."""
    config, device, pid, data = _local_data(message, context)
    model = _load_model(config, data, message.content["arrays"])
    settings = message.content["config"]
    layer = str(settings["bn-layer"])
    if "bn-member" in settings:  # late-phase weights: measure that member's path
        set_active(model, int(settings["bn-member"]))
    x, _ = _own(config, context, data, pid)
    count, total, squares = bn_moments(model, x, layers=[layer], device=device,
                                       batch_size=int(config["eval-batch-size"]))[layer]
    moments = ArrayRecord({"count": count.reshape(1), "sum": total, "sumsq": squares})
    return Message(RecordDict({"moments": moments,
                               "metrics": MetricRecord({"num-examples": len(x),
                                                        "partition-id": pid})}),
                   reply_to=message)


@app.query("restore_local_model")
def restore_local_model(message: Message, context: Context) -> Message:
    """A resumed run gives the node back the model it kept between rounds (partial averaging,
    decentralized mode), as the checkpoint recorded it."""
    context.state[LOCAL_MODEL_KEY] = message.content["arrays"]
    return Message(RecordDict({"metrics": MetricRecord({"restored": 1})}), reply_to=message)


@app.query("local_model")
def local_model(message: Message, context: Context) -> Message:
    """The model this node keeps across rounds (partial averaging), e.g. to study or deploy
    personalised models; an empty record when it keeps none."""
    state = context.state
    arrays = state[LOCAL_MODEL_KEY] if LOCAL_MODEL_KEY in state.array_records else ArrayRecord()
    return Message(RecordDict({"arrays": arrays}), reply_to=message)
