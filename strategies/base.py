"""What every fedwa strategy shares: building from the run config, guarding against bad replies,
seeded client sampling, a hook that names the models to evaluate, and ``start()`` for a
Flower ServerApp of the user's own.

:class:`FedwaStrategy` is a mixin placed before a Flower strategy class::

    class FedAvgM(FedwaStrategy, flwr.serverapp.strategy.FedAvgM): ...

so Flower's own algorithms keep their math while gaining fedwa's guarantees.

Two ways to run a strategy
--------------------------
fedwa's own ServerApp (``fedwa run``, ``flwr run .``) drives the hooks through
:func:`fedwa.flower.rounds.run_rounds` and evaluates with
:class:`fedwa.callbacks.evaluation.CentralEvaluator`; it never calls
:meth:`FedwaStrategy.start`. A user's own ServerApp calls ``strategy.start(grid=...,
initial_arrays=..., num_rounds=..., evaluate_fn=...)`` as with any Flower strategy:
:meth:`FedwaStrategy.start` runs Flower's round loop, hands ``evaluate_fn`` the strategy's
main model (the first of :meth:`~FedwaStrategy.models_to_evaluate`: SWA's average,
TWA's fitted point, ...) and returns it in the ``Result``. A strategy that needs its ClientApp
to do more than Flower's quickstart client does (partial averaging, WSA, TWA-t's gradient
rounds) says so in :meth:`~FedwaStrategy.protocol_hint` and stops with
:class:`ClientProtocolError` at the first round whose replies show a client ignoring it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Result

from fedwa.flower.arrays import array_view, record_named
from fedwa.common.keys import Key
from fedwa.common.errors import FedwaError, TooFewRepliesError
from fedwa.flower.replies import evaluate_problem, model_problem, node_limit, screen

log = logging.getLogger("fedwa")

#: Where a user's own Flower app finds what each strategy needs from its ClientApp.
PROTOCOL_DOC = ("docs/flower-apps.md in fedwa's repository (the README's section 'fedwa "
                "strategies in your own Flower app' links it)")

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]

#: Flower strategies (flwr 1.41-1.42) whose ``configure_train`` / ``configure_evaluate`` only
#: record something (FedProx's ``proximal-mu``, the arrays sent) before calling FedAvg's, which
#: samples. fedwa samples for these itself, with a private generator; any other parent that
#: defines the hook (it samples its own way) runs with the global `random` seeded for the call
#: and restored after it.
PRE_SAMPLING = frozenset({"FedAvgM", "FedProx", "FedOpt", "QFedAvg", "FedXgbBagging"})


class ClientProtocolError(FedwaError):
    """The replies show a ClientApp that does not follow a message protocol the strategy needs
    (e.g. Flower's quickstart client under partial averaging). Retrying cannot help."""


def ordered_node_ids(grid: Any) -> list[int]:
    """The grid's node ids in a fixed order, so a seeded draw picks the same nodes.

    :class:`fedwa.flower.grid.FedwaGrid` already lists them in partition order (the same in every
    run although Flower draws random node ids); any other grid is sorted by id.
    """
    nodes = list(grid.get_node_ids())
    return nodes if hasattr(grid, "partition_of") else sorted(nodes)


def sample_node_ids(grid: Any, rng: random.Random, fraction: float, min_nodes: int,
                    min_available: int, *, poll_seconds: float = 1.0
                    ) -> tuple[list[int], list[int]]:
    """Sample nodes as Flower's FedAvg does, but with ``rng`` instead of the global `random`.

    Parameters
    ----------
    grid : Grid
        Flower's grid (or :class:`fedwa.flower.grid.FedwaGrid`).
    rng : random.Random
        The draw; seeding it fixes the sample for a given list of nodes.
    fraction : float
        Share of the connected nodes to sample (``fraction_train`` / ``fraction_evaluate``).
    min_nodes : int
        Sample at least this many (``min_train_nodes`` / ``min_evaluate_nodes``).
    min_available : int
        Wait until this many nodes (and at least the sample size) are connected.
    poll_seconds : float, optional
        Pause between checks while waiting, as Flower's ``sample_nodes`` does.

    Returns
    -------
    tuple of (list of int, list of int)
        The sampled node ids and all connected node ids.
    """
    # Sample size from the nodes connected now, then wait for enough of them: Flower's order.
    size = max(int(len(ordered_node_ids(grid)) * fraction), min_nodes)
    needed = max(min_available, size)
    while len(nodes := ordered_node_ids(grid)) < needed:
        log.info("waiting for nodes to connect: %d connected (minimum required: %d)",
                 len(nodes), needed)
        time.sleep(poll_seconds)
    return rng.sample(nodes, size), nodes


def node_messages(record: RecordDict, node_ids: Iterable[int], message_type: str
                  ) -> list[Message]:
    """One message per node, all carrying the same content (as Flower's FedAvg builds them)."""
    return [Message(content=record, dst_node_id=node, message_type=message_type)
            for node in node_ids]


def reply_problem(reply: Message, expected: ArrayRecord | None,
                  limit: float | None = None) -> str | None:
    """Why a training reply cannot be aggregated, or ``None`` when it can.

    :func:`fedwa.flower.replies.model_problem`: the one guard for every reply the server decodes.
    ``limit`` caps ``num-examples`` (the examples the node reported at the handshake).
    """
    return model_problem(reply, expected, limit=limit)


def match_dtypes(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """Cast each array back to the dtype of the model that was sent.

    Numpy-based aggregation turns float32 into float64 and integer counters into floats.
    """
    out = {}
    for name, array in arrays.items():
        values = array_view(array)
        dtype = array_view(like[name]).dtype if name in like else values.dtype
        if values.dtype == dtype:
            out[name] = array  # already right: no need to serialise it again
            continue
        if np.issubdtype(dtype, np.integer):
            values = np.rint(values)
        values = np.asarray(values).astype(dtype)  # rint of a 0-d array is a scalar
        out[name] = Array(np.array(values, order="C", copy=True))  # keeps 0-d arrays 0-d
    return ArrayRecord(out)


class FedwaStrategy:
    """Mixin that makes a Flower strategy a fedwa strategy.

    Subclasses declare ``config_keys`` (their own run-config keys) and map them to constructor
    arguments in :meth:`kwargs_from_config`. The guarantees:

    - a reply that is an error, has the wrong names, shapes or dtypes, a payload that is not
      what its fields declare, NaN/inf values or metrics, or claims more examples than its node
      reported at the handshake (:mod:`fedwa.flower.replies`) is logged with its node id, counted in
      the round's metrics and left out; so is a client that did not answer within
      ``round-timeout``; the round goes on with the others;
    - when fewer than ``min-available-clients`` replies are usable,
      :class:`~fedwa.common.errors.TooFewRepliesError` stops the round (Flower's FedAvg would
      quietly keep the old model); the round loop retries it ``round-retries`` times first;
    - client sampling is seeded by run seed and round, with a private generator (the global
      `random` state is left alone);
    - the aggregate keeps the dtypes of the model that was sent;
    - in a user's own ServerApp, :meth:`start` evaluates and returns the strategy's main model,
      and a client that ignores the strategy's message protocol stops the first round with
      :class:`ClientProtocolError`.
    """

    config_keys: ClassVar[tuple[Key, ...]] = ()
    #: Names from :meth:`models_to_evaluate` whose BatchNorm statistics the server recomputes
    #: before evaluating them (averages of models that trained apart).
    recompute_bn: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *args: Any, seed: int = 0,
                 run_config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.run_config = dict(run_config or {})
        self.sent_arrays: ArrayRecord | None = None
        #: The grid of the last configure call: knows each node's examples (FedwaGrid).
        self.grid: Any = None
        self.last_failures: list[tuple[int, str]] = []
        self.last_evaluate_metrics: dict[str, float] = {}
        self.last_evaluate_rejected: list[tuple[int, str]] = []
        self.last_train_metrics: dict[str, float] | None = None
        self.last_usable: list[Message] = []
        self.last_sampled = 0
        self.last_faults: dict[str, Any] = {}
        #: Set by :meth:`start`: the strategy runs in a Flower ServerApp of the user's own.
        self.in_stock_app = False
        #: The last plain global model (the training model) of a :meth:`start` run.
        self.training_arrays: ArrayRecord | None = None

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FedwaStrategy:
        """Build the strategy from a resolved run config."""
        fraction_evaluate = float(config["fraction-evaluate"])
        return cls(
            fraction_train=float(config["fraction-train"]),
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
            # Wait until every client is connected: in simulation they all are at once.
            min_available_nodes=int(config["num-clients"]),
            seed=int(config["seed"]),
            run_config=config,
            **cls.kwargs_from_config(config),
        )

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments taken from the strategy's own keys."""
        return {}

    # --- Flower hooks -------------------------------------------------------------------------

    def sampling_rng(self, phase: str, server_round: int) -> random.Random:
        """A private generator for one round's client sampling, seeded by run seed and round.

        Private, so a user's app keeps its own global `random` state; seeded with the string
        fedwa once passed to ``random.seed``, so the same seed draws the same clients as before.
        """
        return random.Random(f"fedwa-{phase}-{self.seed}-{server_round}")

    def _samples_itself(self, hook: str) -> bool:
        """Whether fedwa can sample for the Flower parent's ``hook`` (see :data:`PRE_SAMPLING`).

        True when every Flower class after this mixin that defines ``hook`` only records
        something before handing over to FedAvg's, which samples: fedwa then runs them with
        the fraction at 0 (FedAvg's hook returns before it samples) and samples itself.
        """
        mro = type(self).__mro__
        for cls in mro[mro.index(FedwaStrategy) + 1:]:
            if hook not in vars(cls):
                continue
            if cls is FlowerFedAvg:
                return True
            if cls.__name__ not in PRE_SAMPLING or not cls.__module__.startswith("flwr."):
                return False
        return False

    def _parent_hook(self, hook: str, phase: str, server_round: int, arrays: ArrayRecord,
                     config: ConfigRecord, grid: Any, fraction_attr: str, min_attr: str,
                     message_type: str) -> list[Message]:
        """The Flower parent's ``hook``, with fedwa's seeded sampling and the global `random`
        left as it was."""
        parent = getattr(super(), hook)
        rng = self.sampling_rng(phase, server_round)
        if not self._samples_itself(hook):
            # A parent that samples its own way (Flower's DP wrappers, FedXgbCyclic) draws from
            # the global `random`: seed it for the call and put the user's state back after.
            state = random.getstate()
            random.setstate(rng.getstate())
            try:
                return list(parent(server_round, arrays, config, grid))
            finally:
                random.setstate(state)
        fraction = getattr(self, fraction_attr)
        setattr(self, fraction_attr, 0.0)
        try:
            leftover = list(parent(server_round, arrays, config, grid))
        finally:
            setattr(self, fraction_attr, fraction)
        if leftover:
            raise RuntimeError(f"the Flower parent of {type(self).__name__} sampled nodes in "
                               f"{hook} with {fraction_attr} = 0; fedwa's seeded sampling "
                               "does not fit this Flower version")
        if fraction == 0.0:  # Flower's meaning: this phase is skipped
            return []
        node_ids, nodes = sample_node_ids(grid, rng, fraction, getattr(self, min_attr),
                                          self.min_available_nodes)
        log.info("%s: sampled %d nodes (out of %d)", hook, len(node_ids), len(nodes))
        config["server-round"] = server_round  # as Flower does, every round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return node_messages(record, node_ids, message_type)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        self.sent_arrays = arrays
        self.grid = grid
        if "min-available-clients" in self.run_config:
            # Round 1 waits for every node; later rounds go on without nodes that died
            # (Flower's sampling would otherwise wait for them forever). Nodes whose handshake
            # was refused never take part, so round 1 does not wait for them either.
            if server_round == 1 and hasattr(grid, "rejected_nodes"):
                grid.get_node_ids()  # the handshake, which may refuse nodes, runs first
            refused = len(getattr(grid, "rejected_nodes", ()))
            self.min_available_nodes = (
                max(int(self.run_config["num-clients"]) - refused, 1) if server_round == 1
                else int(self.run_config["min-available-clients"]))
        messages = self._parent_hook("configure_train", "train", server_round, arrays, config,
                                     grid, "fraction_train", "min_train_nodes",
                                     MessageType.TRAIN)
        self.last_sampled = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Any) -> Iterable[Message]:
        self.grid = grid
        self.last_evaluate_rejected = []  # this round's, from aggregate_evaluate
        return self._parent_hook("configure_evaluate", "evaluate", server_round, arrays, config,
                                 grid, "fraction_evaluate", "min_evaluate_nodes",
                                 MessageType.EVALUATE)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = self.screen_replies(server_round, replies)
        self.last_usable = usable
        arrays = self.aggregate_replies(server_round, usable)
        if arrays is not None and self.sent_arrays is not None:
            arrays = match_dtypes(arrays, self.sent_arrays)
        metrics = train_metrics(usable)
        self.last_train_metrics = dict(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Example-weighted client evaluation; kept for the round's record (``clients_*``).

        Replies go through :func:`fedwa.flower.replies.evaluate_problem` first: an error, a count
        above what the node holds (:meth:`evaluate_limit`) or a NaN metric is left out, so one
        client can neither end the run nor dictate the reported client accuracy.
        """
        usable, rejected = screen(
            replies, lambda r: evaluate_problem(r, self.evaluate_limit(r.metadata.src_node_id)),
            f"evaluation, round {server_round}")
        self.last_evaluate_rejected = rejected
        records = [r.content["metrics"] for r in usable]
        if not records:
            self.last_evaluate_metrics = {}
            return None
        self.last_evaluate_metrics = example_weighted(
            records, [float(m["num-examples"]) for m in records])
        return MetricRecord(self.last_evaluate_metrics)

    def example_limit(self, node: int) -> float | None:
        """Most examples a training reply of ``node`` may claim: what it reported at the
        handshake (:meth:`fedwa.flower.grid.FedwaGrid.example_limit`); None on a grid that does not
        know (a Flower grid in a user's own app), where only finiteness is checked."""
        return node_limit(getattr(self.grid, "example_limit", None), node)

    def evaluate_limit(self, node: int) -> float | None:
        """Most examples an evaluation reply of ``node`` may claim (fedwa's clients evaluate
        on their training partition: :meth:`example_limit`)."""
        return self.example_limit(node)

    # --- fedwa hooks --------------------------------------------------------------------------

    def screen_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Drop unusable replies (logged with node ids); raise if none is left."""
        replies = list(replies)
        usable, self.last_failures = [], []
        errors = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                problem = self.reply_problem(server_round, reply)
            except Exception as err:  # noqa: BLE001 - a faulty reply must not end the run
                problem = f"reply could not be checked ({type(err).__name__}: {err})"
            if problem is None:
                usable.append(reply)
            else:
                errors += reply.has_error()
                self.last_failures.append((node, problem))
                log.warning("round %d: node %d left out: %s", server_round, node, problem)
        sampled = max(self.last_sampled, len(replies))
        missing = sampled - len(replies)
        if missing:
            log.warning("round %d: %d of %d sampled clients did not answer within the round's "
                        "timeout", server_round, missing, sampled)
        self.last_faults = {
            "clients_sampled": sampled,
            "clients_error": errors,  # the client raised or its node failed
            "clients_rejected": len(self.last_failures) - errors,  # bad content, never averaged
            "clients_missing": missing,  # no reply within round-timeout
            "rejected": [{"node": n, "reason": p} for n, p in self.last_failures] or None,
        }
        needed = int(self.run_config.get("min-available-clients", 1))
        if self.in_stock_app:
            self.check_protocol(server_round, usable, needed)
        if len(usable) < max(needed, 1):
            detail = "; ".join(f"node {n}: {p}" for n, p in self.last_failures[:3])
            if missing:
                detail = "; ".join(filter(None, [detail, f"{missing} did not answer"]))
            if not usable:
                text = f"none of the {sampled} sampled clients returned a usable model"
            else:
                text = (f"only {len(usable)} of the {sampled} sampled clients returned a usable "
                        f"model; min-available-clients is {needed}")
            raise TooFewRepliesError(f"round {server_round}: {text} ({detail or 'no replies'})")
        # Sort by partition so floating-point sums run in the same order in every run; the
        # grid's partition (from the handshake) over the reply's own claim.
        partition_of = getattr(self.grid, "partition_of", None) or {}
        usable.sort(key=lambda r: (partition_of.get(r.metadata.src_node_id,
                                                     r.content["metrics"].get("partition-id", 0)),
                                   r.metadata.src_node_id))
        return usable

    def reply_problem(self, server_round: int, reply: Message) -> str | None:
        """Why one training reply cannot be aggregated (:func:`reply_problem` against the
        model sent, ``num-examples`` capped by :meth:`example_limit`), or None."""
        return reply_problem(reply, self.sent_arrays,
                             self.example_limit(reply.metadata.src_node_id))

    def protocol_hint(self, server_round: int) -> str | None:
        """What this round asks of the ClientApp beyond Flower's quickstart protocol (a model
        in ``"arrays"`` and ``"config"`` in; ``"arrays"`` and ``"metrics"`` with
        ``num-examples`` back), or None when a quickstart client is enough."""
        return None

    def protocol_problem(self, server_round: int, reply: Message) -> str | None:
        """Why a usable reply shows that its client ignored :meth:`protocol_hint`, or None."""
        return None

    def check_protocol(self, server_round: int, usable: list[Message], needed: int) -> None:
        """Stop with :class:`ClientProtocolError` when the replies show a client that ignores
        this round's protocol: a usable reply that breaks it, or too few usable replies in a
        round that asks for more than Flower's quickstart protocol (checked in :meth:`start`
        runs only: fedwa's own ClientApp follows every protocol)."""
        hint = self.protocol_hint(server_round)
        if hint is None:
            return
        name = type(self).__name__
        for reply in usable:
            problem = self.protocol_problem(server_round, reply)
            if problem is not None:
                raise ClientProtocolError(
                    f"{name}, round {server_round}: node {reply.metadata.src_node_id}: "
                    f"{problem}. {hint} See {PROTOCOL_DOC}.")
        if len(usable) < max(needed, 1):
            detail = "; ".join(f"node {n}: {p}" for n, p in self.last_failures[:3])
            raise ClientProtocolError(
                f"{name}, round {server_round}: no usable reply ({detail or 'no replies'}). "
                f"{hint} See {PROTOCOL_DOC}.")

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """Turn usable replies into the new global arrays (default: the Flower parent's math)."""
        arrays, _ = super().aggregate_train(server_round, replies)
        return arrays

    def total_rounds(self) -> int:
        """Server rounds this strategy runs (IMWA's episodes, TWA-t's extra rounds differ)."""
        return int(self.run_config.get("num-server-rounds", 1))

    def state_dict(self) -> dict[str, Any]:
        """Everything that must survive a round, for checkpoints (none for plain FedAvg)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def models_to_evaluate(self, server_round: int, arrays: ArrayRecord
                           ) -> dict[str, ArrayRecord]:
        """Models the server evaluates after a round; the first is the run's main model.

        Strategies that report an averaged model beside the training model (SWA, EMA, HWA)
        return both, e.g. ``{"swa": ..., "global": arrays}``.
        """
        return {"global": arrays}

    def main_model(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The run's main model after ``server_round``: the first of :meth:`models_to_evaluate`."""
        return next(iter(self.models_to_evaluate(server_round, arrays).values()))

    # --- a user's own ServerApp -----------------------------------------------------------------

    def bind_rounds(self, num_rounds: int) -> None:
        """Re-derive what depends on the run's length (SWA's window start, IMWA's episodes,
        ...) once :meth:`start` has written ``num-server-rounds`` into the run config."""

    def start(self, grid: Any, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: EvaluateFn | None = None, *,
              evaluate_all_models: bool = False) -> Result:
        """Run the strategy in a Flower ServerApp of the user's own; return Flower's Result.

        Flower's :meth:`~flwr.serverapp.strategy.Strategy.start` with fedwa's method kept:
        ``evaluate_fn`` gets the strategy's main model (the first of
        :meth:`models_to_evaluate`: SWA's, EMA's and HWA's averages, TWA's fitted point) instead
        of the training model, and ``Result.arrays`` is that model after the last round. The
        training model stays in :attr:`training_arrays`. fedwa's own ServerApp does not use
        this method (:func:`fedwa.flower.rounds.run_rounds`).

        Parameters
        ----------
        grid, initial_arrays, timeout, train_config, evaluate_config, evaluate_fn
            As in Flower's ``Strategy.start``.
        num_rounds : int, optional
            Rounds of the run. A strategy built directly (``run_config`` empty) takes it as its
            ``num-server-rounds``; one built from a run config must be started with that
            config's value. The loop runs :meth:`total_rounds` rounds: IMWA's episodes,
            HWA's synchronisations and TWA-t's extra gradient rounds may differ from it.
        evaluate_all_models : bool, optional
            Also pass the other models of :meth:`models_to_evaluate` (e.g. the training model
            ``global``) to ``evaluate_fn``; their metrics join the round's record as
            ``<name>_<metric>``.

        Raises
        ------
        ValueError
            ``num_rounds`` disagrees with the run config's ``num-server-rounds``.
        ClientProtocolError
            A client ignores what the strategy asks of it (:meth:`protocol_hint`).
        """
        configured = self.run_config.get("num-server-rounds")
        if configured is None:
            self.run_config["num-server-rounds"] = int(num_rounds)
            self.bind_rounds(int(num_rounds))
        elif int(configured) != int(num_rounds):
            raise ValueError(f"{type(self).__name__} was built for num-server-rounds = "
                             f"{configured} (its run_config) but start() got num_rounds = "
                             f"{num_rounds}: pass num_rounds={configured}, or build the "
                             "strategy without a run_config")
        rounds = self.total_rounds()
        if rounds != num_rounds:
            log.info("%s runs %d server rounds for num_rounds = %d", type(self).__name__,
                     rounds, num_rounds)
        self.in_stock_app = True
        self.training_arrays = initial_arrays
        wrapped = None
        if evaluate_fn is not None:
            def wrapped(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                return self._evaluate_models(evaluate_fn, server_round, arrays,
                                             evaluate_all_models)
        try:
            result = super().start(grid, initial_arrays, rounds, timeout, train_config,
                                   evaluate_config, wrapped)
        finally:
            self.in_stock_app = False
        last = result.arrays if len(result.arrays) else initial_arrays
        self.training_arrays = last
        result.arrays = self.main_model(rounds, last)
        return result

    def _evaluate_models(self, evaluate_fn: EvaluateFn, server_round: int,
                         arrays: ArrayRecord, evaluate_all: bool) -> MetricRecord | None:
        models = self.models_to_evaluate(server_round, arrays)
        (_, main), *others = models.items()
        metrics = evaluate_fn(server_round, main)
        if not evaluate_all or not others:
            return metrics
        merged = dict(metrics or {})
        for name, other in others:
            extra = evaluate_fn(server_round, other) or {}
            merged.update({f"{name}_{k}": v for k, v in extra.items()})
        return MetricRecord(merged)


#: Reply metrics that are bookkeeping, not measurements: never averaged.
NOT_AVERAGED = frozenset({"num-examples", "partition-id"})


def example_weighted(records: list[Any], examples: list[float]) -> dict[str, float]:
    """Example-weighted mean of every numeric, non-bookkeeping metric present in all records."""
    total = sum(examples)
    names = [k for k, v in records[0].items()
             if k not in NOT_AVERAGED and isinstance(v, (int, float))
             and all(isinstance(r.get(k), (int, float)) for r in records)]
    return {k: sum(float(r[k]) * n for r, n in zip(records, examples)) / total for k in names}


def train_metrics(replies: list[Message]) -> MetricRecord:
    """Example-weighted means of the usable replies' metrics, plus totals (ids not averaged)."""
    records = [r.content["metrics"] for r in replies]
    examples = [float(m["num-examples"]) for m in records]
    return MetricRecord({**example_weighted(records, examples),
                         "num-examples": int(sum(examples)), "num-clients": len(replies)})
