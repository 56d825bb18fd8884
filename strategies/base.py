"""What every fedwa strategy shares: building from the run config, guarding against bad replies,
seeded client sampling, and a hook that names the models to evaluate.

:class:`FedwaStrategy` is a mixin placed before a Flower strategy class::

    class FedAvgM(FedwaStrategy, flwr.serverapp.strategy.FedAvgM): ...

so Flower's own algorithms keep their math while gaining fedwa's guarantees.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from fedwa.arrays import array_view, record_named
from fedwa.config import Key
from fedwa.errors import TooFewRepliesError

log = logging.getLogger("fedwa")


def reply_problem(reply: Message, expected: ArrayRecord | None) -> str | None:
    """Why a training reply cannot be aggregated, or ``None`` when it can."""
    if reply.has_error():
        reason = reply.error.reason.strip().splitlines()
        return f"client error: {reason[-1] if reason else 'no reason given'}"
    arrays = record_named(reply.content, "arrays", ArrayRecord)
    metrics = record_named(reply.content, "metrics", MetricRecord)
    if arrays is None or metrics is None:
        return "reply lacks 'arrays' or 'metrics'"
    examples = metrics.get("num-examples")
    if not isinstance(examples, (int, float)) or not examples > 0:
        return f"num-examples is {examples!r}, expected a number > 0"
    if expected is not None:
        if set(arrays.keys()) != set(expected.keys()):
            missing = sorted(set(expected.keys()) - set(arrays.keys()))[:3]
            extra = sorted(set(arrays.keys()) - set(expected.keys()))[:3]
            return f"its array names differ from the model sent (missing {missing}, extra {extra})"
        for name, array in arrays.items():
            if tuple(array.shape) != tuple(expected[name].shape):
                return (f"array '{name}' has shape {tuple(array.shape)}, expected "
                        f"{tuple(expected[name].shape)}")
            if array.dtype != expected[name].dtype:
                # Averaging would silently up- or down-cast it; a float16 or int reply is a
                # client built differently from the server.
                return f"array '{name}' has dtype {array.dtype}, expected {expected[name].dtype}"
    for name, array in arrays.items():
        values = array_view(array)
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"array '{name}' holds NaN or inf"
    return None


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

    - a reply that is an error, has the wrong names, shapes or dtypes, or holds NaN/inf is
      logged with its node id, counted in the round's metrics and left out; so is a client
      that did not answer within ``round-timeout``; the round goes on with the others;
    - when fewer than ``min-available-clients`` replies are usable,
      :class:`~fedwa.errors.TooFewRepliesError` stops the round (Flower's FedAvg would quietly
      keep the old model); the round loop retries it ``round-retries`` times first;
    - client sampling is seeded by run seed and round;
    - the aggregate keeps the dtypes of the model that was sent.
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
        self.last_failures: list[tuple[int, str]] = []
        self.last_evaluate_metrics: dict[str, float] = {}
        self.last_train_metrics: dict[str, float] | None = None
        self.last_usable: list[Message] = []
        self.last_sampled = 0
        self.last_faults: dict[str, Any] = {}

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

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        self.sent_arrays = arrays
        if "min-available-clients" in self.run_config:
            # Round 1 waits for every node; later rounds go on without nodes that died
            # (Flower's sampling would otherwise wait for them forever).
            self.min_available_nodes = (int(self.run_config["num-clients"]) if server_round == 1
                                        else int(self.run_config["min-available-clients"]))
        # Flower samples with the `random` module over grid.get_node_ids(); FedwaGrid lists
        # nodes in partition order, so seeding here fixes which clients train.
        random.seed(f"fedwa-train-{self.seed}-{server_round}")
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.last_sampled = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Any) -> Iterable[Message]:
        random.seed(f"fedwa-evaluate-{self.seed}-{server_round}")
        return super().configure_evaluate(server_round, arrays, config, grid)

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
        """Example-weighted client evaluation; kept for the round's record (``clients_*``)."""
        records = [m for r in replies if not r.has_error()
                   and (m := record_named(r.content, "metrics", MetricRecord)) is not None]
        if not records:
            self.last_evaluate_metrics = {}
            return None
        self.last_evaluate_metrics = example_weighted(
            records, [float(m.get("num-examples", 1)) for m in records])
        return MetricRecord(self.last_evaluate_metrics)

    # --- fedwa hooks --------------------------------------------------------------------------

    def screen_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Drop unusable replies (logged with node ids); raise if none is left."""
        replies = list(replies)
        usable, self.last_failures = [], []
        errors = 0
        for reply in replies:
            problem = reply_problem(reply, self.sent_arrays)
            if problem is None:
                usable.append(reply)
            else:
                node = reply.metadata.src_node_id
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
        # Sort by partition so floating-point sums run in the same order in every run.
        usable.sort(key=lambda r: (r.content["metrics"].get("partition-id", 0),
                                   r.metadata.src_node_id))
        return usable

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
