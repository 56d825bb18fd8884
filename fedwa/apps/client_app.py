"""The ClientApp: local training on the node's own partition, and local evaluation.

Every message carries the run config the server validated (see :mod:`fedwa.flower.grid`); the node's
partition comes from its ``node_config`` (``partition-id``, ``num-partitions``), which the
simulation sets and a SuperNode takes from ``--node-config``.

Training a message is :func:`prepare_train`, :func:`run_train`, :func:`train_reply`; the
``train`` handler does one message, :func:`train_many` several at once (batched where it can),
for the local backend's ``batch-clients``.

Late-phase weights (:mod:`fedwa.core.late_phase`): with ``late-phase-members = "averaged"`` a node
trains from the members the server averaged across clients; with ``"local"`` it keeps its own
members in ``context.state`` after each late-phase round and takes only the shared weights
from the server. Either way it replies with every entry, members included. The kept members
are not checkpointed: a resumed run's nodes start from the server's averaged members for their
first resumed round, and keep their own from then on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedwa.core import partial
from fedwa.flower.arrays import record_entries, record_named, to_record, to_state_dict
from fedwa.core.batched import can_batch, train_batched
from fedwa.core.bn import bn_moments
from fedwa.run.config import resolve_config
from fedwa.flower.grid import RUN_CONFIG_KEY
from fedwa.core.metrics import evaluate_model
from fedwa.data.node import DATA_DIR_KEY, node_data
from fedwa.common.plugins import is_import_path
from fedwa.core.late_phase import member_state, num_members, set_active, train_late_phase
from fedwa.core.shadow import has_shadow_weights, reseed_shadow
from fedwa.data.task import federated_data, local_train_spec, make_model
from fedwa.core.wsa import scope_kl, scope_regulariser
from fedwa.core.training import (LocalTrainSpec, client_seed, configure_threads, local_gradient,
                                 resolve_device, train_local)

app = ClientApp()


def run_config_of(message: Message, context: Context) -> dict[str, Any]:
    """The server's resolved config; ``context.run_config`` only when a message lacks it."""
    record = record_named(message.content, RUN_CONFIG_KEY, ConfigRecord)
    if record is not None:
        return record_entries(record)
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
#: A node's optimiser state kept across rounds (``keep-optimizer-state``: HWA's local SGD).
OPTIMIZER_STATE_KEY = "fedwa-optimizer-state"


def _load_kept_model(model: torch.nn.Module, context: Context) -> None:
    """Load the model this node keeps in ``context.state`` into ``model``, if it keeps one."""
    kept = record_named(context.state, LOCAL_MODEL_KEY, ArrayRecord)
    if kept is not None:
        model.load_state_dict(to_state_dict(kept))


#: One model per thread that :func:`train` reuses from message to message (see
#: :func:`_reused_model`); per thread because a client the local backend abandons at its
#: deadline may still be training on its worker thread while the next client starts.
_REUSED = threading.local()


def _reused_model(config: dict[str, Any], data) -> torch.nn.Module:  # noqa: ANN001
    """A built-in model of the run's architecture, the same object again for the next message.

    Building a module per message was a third of a one-step client's time in process (1 ms
    of ``nn.Linear`` initialisation for the ``mlp``). The caller loads a full state dict into
    it, which overwrites every parameter and buffer a built-in model has, so what a previous
    client left in it cannot leak into this one; gradients are dropped too. Only for
    built-in models without shadow weights or late-phase members: those hold state outside
    their state dict (transform seeds, the active member), and a user's module may too.
    """
    name = str(config["model"])
    if (is_import_path(name) or str(config.get("was-layers", ""))
            or int(config.get("late-phase-k", 1)) != 1):
        return make_model(config, data)
    key = (name, int(config["seed"]), int(config["model-width"]), tuple(data.input_shape),
           int(data.num_classes))
    cached = getattr(_REUSED, "entry", None)
    if cached is not None and cached[0] == key:
        model = cached[1]
        model.zero_grad(set_to_none=True)
        return model
    model = make_model(config, data)
    _REUSED.entry = (key, model)
    return model


def _starting_model(config: dict[str, Any], data, received: ArrayRecord,  # noqa: ANN001
                    round_config: dict[str, Any], context: Context, *,
                    reuse: bool = False) -> torch.nn.Module:
    """The model this round starts from.

    Normally the received model. With ``keep-local-model`` (partial averaging) the node keeps
    its own full model in ``context.state`` across rounds and the server sends only some
    entries: those replace the node's own, the rest stay local. A node with no model yet
    starts from the run's shared initialisation (so it always gets a fresh module).
    ``reuse``: the received model is loaded into :func:`_reused_model`'s module (one message
    at a time per thread; not for jobs prepared together, which each need their own).
    """
    if round_config.get("keep-local-model") or not reuse:
        model = make_model(config, data)
    else:
        model = _reused_model(config, data)
    if round_config.get("keep-local-model"):
        _load_kept_model(model, context)
        # Whole entries or rows "<entry>[a:b]" of them (fedwa.core.partial): only those change.
        model.load_state_dict(partial.merge(model.state_dict(), to_state_dict(received)))
    else:
        model.load_state_dict(to_state_dict(received))
    return model


LATE_PHASE_MEMBERS_KEY = "fedwa-late-phase-members"


def _keeps_members(config: dict[str, Any], model: torch.nn.Module) -> bool:
    """Whether this node keeps its own late-phase members (``late-phase-members = "local"``)."""
    return config.get("late-phase-members", "averaged") == "local" and num_members(model) > 1


def _late_phase_started(config: dict[str, Any], spec: LocalTrainSpec) -> bool:
    """Whether this round trains in the late phase: its progress has reached the start."""
    return spec.progress_start >= float(config["late-phase-start"]) - 1e-9


def _load_kept_members(model: torch.nn.Module, context: Context) -> None:
    """Overwrite ``model``'s late-phase members with the ones this node keeps, if any.

    With ``late-phase-members = "local"`` a node takes only the shared weights from the
    server; its members are its own, as trained in its last late-phase round. Before its
    first late-phase round it keeps none and starts from the received members (identical
    copies of one model until the late phase starts).
    """
    kept = record_named(context.state, LATE_PHASE_MEMBERS_KEY, ArrayRecord)
    if kept is None:
        return
    state = model.state_dict()
    members = to_state_dict(kept)
    if set(members) != set(member_state(state)):
        # A kept record from another model would silently mix two models' members.
        raise ValueError(f"the late-phase members kept in context.state ({len(members)} "
                         f"entries) do not match this model's ({len(member_state(state))})")
    state.update(members)
    model.load_state_dict(state)


def _regulariser(round_config: dict[str, Any]):  # noqa: ANN202
    """WSA's scope term when the strategy sent target scopes, else None."""
    if "wsa-lambda" not in round_config:
        return None, None
    names = list(round_config["wsa-names"])
    targets = {n: (torch.tensor(mu), torch.tensor(sigma)) for n, mu, sigma in
               zip(names, round_config["wsa-mu"], round_config["wsa-sigma"])}
    return scope_regulariser(targets, names, float(round_config["wsa-lambda"])), targets


@dataclass
class TrainJob:
    """One train message, prepared: everything :func:`train` computes before training."""

    message: Message
    context: Context
    started: float
    config: dict[str, Any]
    device: torch.device
    pid: int
    round_config: dict[str, Any]
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    spec: LocalTrainSpec
    seed: int
    regulariser: Any
    targets: Any

    def batchable(self) -> bool:
        """Whether :func:`fedwa.core.batched.train_batched` can train this job: plain SGD on a
        model with one set of weights and no random transforms in its forward."""
        return (self.regulariser is None and num_members(self.model) == 1
                and not has_shadow_weights(self.model) and can_batch(self.spec)
                and not self.round_config.get("keep-optimizer-state"))


def prepare_train(message: Message, context: Context, *, reuse_model: bool = False
                  ) -> TrainJob:
    """Read a train message: config, partition, starting model, batch-order seed.

    ``reuse_model``: train in this thread's reused module (:func:`_reused_model`); only for
    a job trained and answered before the next is prepared, as :func:`train` does.
    """
    started = time.perf_counter()
    config, device, pid, data = _local_data(message, context)
    round_config = dict(message.content["config"]) if "config" in message.content else {}
    model = _starting_model(config, data, message.content["arrays"], round_config, context,
                            reuse=reuse_model)
    if _keeps_members(config, model):
        # Shared weights from the server, members the node's own: the server's member average
        # still reaches its evaluation and records, but no client trains from it.
        _load_kept_members(model, context)
    x, y = _own(config, context, data, pid)
    server_round = int(round_config.get("server-round", 1))
    regulariser, targets = _regulariser(round_config)
    seed = client_seed(int(config["seed"]), server_round, pid)
    reseed_shadow(model, seed)  # shadow-weight transforms: a fresh, reproducible draw per round
    return TrainJob(message, context, started, config, device, pid, round_config, model, x, y,
                    local_train_spec(config, round_config), seed, regulariser, targets)


def run_train(job: TrainJob) -> dict[str, float]:
    """Train the job's model in place, one client on its own."""
    if num_members(job.model) > 1:
        # Late-phase weights: the members train apart once the run's progress passes the start.
        return train_late_phase(job.model, job.x, job.y, job.spec, seed=job.seed,
                                device=job.device, late=_late_phase_started(job.config, job.spec),
                                shared_grad=str(job.config.get("late-phase-shared-grad", "sum")))
    if not job.round_config.get("keep-optimizer-state"):
        return train_local(job.model, job.x, job.y, job.spec, seed=job.seed, device=job.device,
                           regulariser=job.regulariser)
    # The node continues its own optimiser (momentum buffers, Adam moments) from its last
    # round instead of starting a fresh one: a local SGD learner that only synchronises its
    # weights (HWA's online averaging).
    kept = record_named(job.context.state, OPTIMIZER_STATE_KEY, ArrayRecord)
    state = dict(to_state_dict(kept)) if kept is not None else {}
    stats = train_local(job.model, job.x, job.y, job.spec, seed=job.seed, device=job.device,
                        regulariser=job.regulariser, optimizer_state=state)
    job.context.state[OPTIMIZER_STATE_KEY] = to_record(state)
    return stats


def train_reply(job: TrainJob, stats: dict[str, float]) -> Message:
    """The reply to a trained job: the entries the server asked for, and the metrics."""
    model, round_config = job.model, job.round_config
    if job.device.type != "cpu":  # a module walk that costs more than a tiny model's step
        model.to("cpu")
    state = model.state_dict()
    metrics = {
        "num-examples": len(job.x),
        "partition-id": job.pid,
        "train-loss": stats["loss"],
        "train-steps": stats["steps"],
        "train-seconds": stats["seconds"],
    }
    if job.targets is not None:
        with torch.no_grad():
            metrics["wsa-kl"] = float(scope_kl(state, job.targets, list(job.targets)))
    if round_config.get("keep-local-model"):
        job.context.state[LOCAL_MODEL_KEY] = to_record(state)
    if _keeps_members(job.config, model) and _late_phase_started(job.config, job.spec):
        # Only late-phase rounds: before them the members are copies of one model, and a node
        # keeping none takes the received ones, as in "averaged" mode.
        job.context.state[LATE_PHASE_MEMBERS_KEY] = to_record(member_state(state))
    names = round_config.get("return-names") or list(job.message.content["arrays"].keys())
    returned = partial.select(state, names)
    if CLIPPING_NORM_KEY in round_config:
        returned = clip_update(returned, job.message.content["arrays"],
                               float(round_config[CLIPPING_NORM_KEY]))
        metrics["clipping-norm"] = float(round_config[CLIPPING_NORM_KEY])
    metrics["seconds"] = time.perf_counter() - job.started
    return Message(RecordDict({"arrays": to_record(returned),
                               "metrics": MetricRecord(metrics)}), reply_to=job.message)


#: The round-config key Flower's client-side fixed-clipping DP wrapper
#: (``DifferentialPrivacyClientSideFixedClipping``) sends its clipping norm under.
CLIPPING_NORM_KEY = "clipping_norm"


def clip_update(new: dict[str, torch.Tensor], sent: ArrayRecord, clipping_norm: float
                ) -> dict[str, torch.Tensor]:
    """``sent + update * min(1, C / ||update||)``, ``update = new - sent`` over all arrays.

    Flat clipping of the whole model update (McMahan et al., ICLR 2018, arXiv 1710.06963),
    what Flower's ``fixedclipping_mod`` does; fedwa's ClientApp applies it itself because its
    messages carry the run config as a second ConfigRecord, which that mod refuses.
    """
    received = to_state_dict(sent)
    update = {k: v.double() - received[k].double() for k, v in new.items()}
    norm = float(torch.sqrt(sum((u * u).sum() for u in update.values())))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: (received[k].double() + update[k] * scale).to(new[k].dtype) for k in new}


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received model on this node's partition; reply with weights and metrics."""
    job = prepare_train(message, context, reuse_model=True)
    return train_reply(job, run_train(job))


def train_many(messages: Sequence[Message], contexts: Sequence[Context]
               ) -> list[Message | Exception]:
    """:func:`train` for several nodes at once (the local backend's ``batch-clients``).

    Jobs that :meth:`TrainJob.batchable` and share a training spec and device are trained
    together by :func:`fedwa.core.batched.train_batched` (in one computation whatever their step
    counts); the others one by one, as :func:`train` would. Each entry of the result is the
    node's reply, or the exception its message raised (the caller turns it into an error
    reply, as Flower does for a ClientApp that raises).
    """
    results: list[Message | Exception | None] = [None] * len(messages)
    jobs: dict[int, TrainJob] = {}
    for i, (message, context) in enumerate(zip(messages, contexts)):
        try:
            jobs[i] = prepare_train(message, context)
        except Exception as error:  # noqa: BLE001 - one node's failure is its own reply
            results[i] = error
    groups: dict[tuple, list[int]] = {}
    for i, job in jobs.items():
        key = (job.spec, job.device) if job.batchable() else ("alone", i)
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        try:
            if len(members) > 1:
                trained = train_batched([jobs[i].model for i in members],
                                        [(jobs[i].x, jobs[i].y) for i in members],
                                        jobs[members[0]].spec,
                                        [jobs[i].seed for i in members],
                                        device=jobs[members[0]].device)
            else:
                trained = [run_train(jobs[members[0]])]
        except Exception as error:  # noqa: BLE001 - the group's nodes all fail alike
            for i in members:
                results[i] = error
            continue
        for i, stats in zip(members, trained):
            try:
                results[i] = train_reply(jobs[i], stats)
            except Exception as error:  # noqa: BLE001
                results[i] = error
    return results  # type: ignore[return-value]


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
        _load_kept_model(model, context)
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
    from fedwa.apps.decentralized import (alignment_examples, merge_and_train, neighbour_key,
                                          stratified_subset)

    started = time.perf_counter()
    config, device, pid, data = _local_data(message, context)
    round_config = dict(message.content["config"])
    node_seed = int(round_config["node-seed"])

    def node_model() -> torch.nn.Module:
        return make_model(config, data, node_seed)

    own = node_model()  # round 1: the node's own initialisation (shared or its own seed)
    _load_kept_model(own, context)
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
                            evaluate_merged=evaluate_merged,
                            align_x=alignment_examples(round_config, data, x))
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
    own = node_data(config, context.node_config, data, pid)
    counts = torch.bincount(own.y, minlength=data.num_classes).tolist()
    # The server caps the example counts of this node's later replies by these (and, for a
    # node on the run's partitions, checks them against the partition it built).
    info = MetricRecord({"partition-id": pid, "num-examples": len(own.y), "class-counts": counts,
                         "test-examples": len(own.y_test) if own.y_test is not None else 0,
                         "own-data": int(bool(context.node_config.get(DATA_DIR_KEY)))})
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
    arrays = record_named(message.content, "arrays", ArrayRecord)
    if arrays:
        context.state[LOCAL_MODEL_KEY] = arrays
    optimizer = record_named(message.content, "optimizer", ArrayRecord)
    if optimizer:
        context.state[OPTIMIZER_STATE_KEY] = optimizer
    return Message(RecordDict({"metrics": MetricRecord({"restored": 1})}), reply_to=message)


@app.query("local_model")
def local_model(message: Message, context: Context) -> Message:
    """The model this node keeps across rounds (partial averaging), e.g. to study or deploy
    personalised models; an empty record when it keeps none."""
    arrays = record_named(context.state, LOCAL_MODEL_KEY, ArrayRecord)
    if arrays is None:
        arrays = ArrayRecord()
    content = RecordDict({"arrays": arrays})
    optimizer = record_named(context.state, OPTIMIZER_STATE_KEY, ArrayRecord)
    if optimizer is not None:
        content["optimizer"] = optimizer  # checkpoints keep it too (fedwa.callbacks.checkpoint)
    return Message(content, reply_to=message)
