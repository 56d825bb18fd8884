"""The one guard every reply the server decodes goes through.

A client (or whatever answers in its place) controls every byte of its reply: the records it
holds, the metric types, each array's declared ``dtype``/``shape``/``stype`` and the payload
bytes, which nothing ties to those fields. The server therefore checks a reply *before* it
reads anything from it, and a reply that fails is left out, logged with its node id and the
reason, and counted; it never ends the run. Only when too few usable replies remain does the
caller stop, with :class:`~fedwa.common.errors.TooFewRepliesError` or
:class:`~fedwa.common.errors.AllClientsFailedError` as before.

Each kind of reply has its check, all built from the same pieces:

- :func:`model_problem`: a model-shaped reply (training, TWA-t's gradients, DIMAT/gossip
  merges): names, shapes and dtypes of the model sent, payloads that are what they declare,
  finite values, and metrics that pass :func:`metrics_problem`;
- :func:`moments_problem`: one BatchNorm layer's count, sum and sum of squares;
- :func:`handshake_problem`: a node's partition id and what it holds;
- :func:`held_out_problem`: federated-evaluation class counts;
- :func:`evaluate_problem`: client-side evaluation metrics;
- :func:`kept_model_problem`: the models and optimiser states nodes keep.

Example counts are capped (:func:`count_problem`): a node may not claim more examples than the
partition it reported at the handshake (:meth:`fedwa.flower.grid.FedwaGrid.example_limit`), so one
client cannot dictate an example-weighted average or a federated accuracy.

This module sits in :mod:`fedwa` and imports nothing from :mod:`strategies`;
:func:`strategies.base.reply_problem` is :func:`model_problem`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedwa.flower.arrays import PayloadError, checked_view, record_named

log = logging.getLogger("fedwa")

#: Why a reply cannot be used, or None when it can.
Problem = str | None
Check = Callable[[Message], Problem]


# --- pieces -----------------------------------------------------------------------------------


def error_problem(reply: Message) -> Problem:
    """The client's own error, reduced to its last line (a traceback's exception)."""
    if not reply.has_error():
        return None
    reason = str(reply.error.reason or "").strip().splitlines()
    return f"client error: {reason[-1] if reason else 'no reason given'}"


def records_of(reply: Message, *names: tuple[str, type], what: str = "reply"
               ) -> tuple[Problem, list[Any]]:
    """The reply's records ``(name, kind)``, or why it has none to read: the client's error,
    or a missing one (``"<what> lacks 'a' or 'b'"``)."""
    problem = error_problem(reply)
    if problem is not None:
        return problem, []
    records = [record_named(reply.content, name, kind) for name, kind in names]
    if any(record is None for record in records):
        return f"{what} lacks " + " or ".join(f"'{name}'" for name, _ in names), []
    return None, records


def number_problem(value: Any, what: str, *, integer: bool = False,
                   low: float | None = None, high: float | None = None,
                   low_open: bool = False) -> Problem:
    """Why ``value`` is not a finite real number in range, or None.

    ``bool`` is refused although Python counts it as an int: no metric fedwa reads is one.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{what} is {value!r}, expected a number"
    if not math.isfinite(value):
        return f"{what} is {value!r}, expected a finite number"
    if integer and value != int(value):
        return f"{what} is {value!r}, expected a whole number"
    if low is not None and (value <= low if low_open else value < low):
        return f"{what} is {value!r}, expected {'>' if low_open else '>='} {low:g}"
    if high is not None and value > high:
        return f"{what} is {value!r}, expected at most {high:g}"
    return None


def count_problem(value: Any, limit: float | None, what: str = "num-examples") -> Problem:
    """Why an example count is unusable: not a finite number > 0, or above ``limit``.

    ``limit`` is what the node holds (its handshake); None where the server cannot know it
    (a Flower grid of a user's own app).
    """
    if number_problem(value, what, low=0, low_open=True) is not None:
        # One wording for a missing, non-numeric, infinite, NaN or non-positive count.
        return f"{what} is {value!r}, expected a number > 0"
    if limit is not None and value > limit:
        return (f"{what} is {value!r}, more than the {limit:g} examples the node reported "
                "at the handshake")
    return None


def int_list_problem(values: Any, what: str, length: int | None = None) -> Problem:
    """Why ``values`` is not a list of whole numbers >= 0 (of ``length`` entries)."""
    if not isinstance(values, list):
        return f"{what} is {type(values).__name__}, expected a list of counts"
    if length is not None and len(values) != length:
        return f"{what} has {len(values)} entries, expected {length}"
    for i, v in enumerate(values):
        problem = number_problem(v, f"{what}[{i}]", integer=True, low=0)
        if problem is not None:
            return problem
    return None


def metrics_problem(metrics: MetricRecord, *, limit: float | None = None,
                    count: str | None = "num-examples", scalars: Sequence[str] = (),
                    required: Sequence[str] = ()) -> Problem:
    """Why a reply's metrics cannot be used.

    Parameters
    ----------
    metrics : MetricRecord
        The reply's metrics.
    limit : float, optional
        Most examples the node may claim (:func:`count_problem`).
    count : str or None, optional
        The example-count entry, required; None when the reply has none.
    scalars : sequence of str, optional
        Entries that must be single numbers when present (their readers call ``float``).
    required : sequence of str, optional
        Entries that must be present (and single numbers).

    Every number, in a list or not, must be finite: a NaN loss or accuracy would turn the
    round's averages into NaN. ``partition-id``, when present, is a whole number >= 0 (the
    server sorts replies by it).
    """
    if count is not None:
        problem = count_problem(metrics.get(count), limit, count)
        if problem is not None:
            return problem
    for key in (*required, *scalars, "partition-id"):
        if key not in metrics:
            if key in required:
                return f"metrics lack '{key}'"
            continue
        problem = number_problem(metrics[key], key, integer=key == "partition-id",
                                 low=0 if key == "partition-id" else None)
        if problem is not None:
            return problem
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return f"metric '{key}' holds NaN or inf"
    return None


def arrays_problem(arrays: ArrayRecord, expected: ArrayRecord | None = None, *,
                   what: str = "array") -> Problem:
    """Why a record of arrays cannot be used.

    With ``expected`` (the model that was sent) the names, declared shapes and dtypes must be
    the same; in any case every payload must be what it declares
    (:func:`fedwa.flower.arrays.checked_view`) and every float value finite.
    """
    if expected is not None:
        if set(arrays.keys()) != set(expected.keys()):
            missing = sorted(set(expected.keys()) - set(arrays.keys()))[:3]
            extra = sorted(set(arrays.keys()) - set(expected.keys()))[:3]
            return f"its array names differ from the model sent (missing {missing}, extra {extra})"
        for name, array in arrays.items():
            if tuple(array.shape) != tuple(expected[name].shape):
                return (f"{what} '{name}' has shape {tuple(array.shape)}, expected "
                        f"{tuple(expected[name].shape)}")
            if array.dtype != expected[name].dtype:
                # Averaging would silently up- or down-cast it; a float16 or int reply is a
                # client built differently from the server.
                return f"{what} '{name}' has dtype {array.dtype}, expected {expected[name].dtype}"
    for name, array in arrays.items():
        try:
            values = checked_view(array)
        except PayloadError as err:
            return f"{what} '{name}': {err}"
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"{what} '{name}' holds NaN or inf"
    return None


# --- one check per kind of reply -------------------------------------------------------------


def model_problem(reply: Message, expected: ArrayRecord | None, *,
                  limit: float | None = None, scalars: Sequence[str] = (),
                  required: Sequence[str] = ()) -> Problem:
    """Why a model-shaped reply (training, gradient, merge) cannot be aggregated, or None.

    ``limit`` caps ``num-examples`` (:func:`count_problem`); ``scalars`` and ``required`` name
    metrics that must be single numbers (:func:`metrics_problem`).
    """
    problem, records = records_of(reply, ("arrays", ArrayRecord), ("metrics", MetricRecord))
    if problem is not None:
        return problem
    arrays, metrics = records
    return (metrics_problem(metrics, limit=limit, scalars=scalars, required=required)
            or arrays_problem(arrays, expected))


#: Entries of a BatchNorm-moments reply (``fedwa.apps.client_app.batchnorm_moments``).
MOMENT_NAMES = frozenset({"count", "sum", "sumsq"})


def moments_problem(reply: Message, channels: int, *, limit: float | None = None,
                    positions: int | None = None) -> Problem:
    """Why one node's BatchNorm moments cannot be added to the others', or None.

    Parameters
    ----------
    reply : Message
        ``moments`` (``count`` of shape (1,) or (), ``sum`` and ``sumsq`` of ``channels``
        entries, floats) and ``metrics`` with ``num-examples``.
    channels : int
        The layer's number of channels.
    limit : float, optional
        Most examples the node may claim.
    positions : int, optional
        Values per channel and example at this layer (1 after a linear layer, H*W after a
        convolution); when given, ``count`` must be ``num-examples * positions`` exactly.
        Without it, ``count`` must still be a whole multiple of ``num-examples``.

    A node's share of the pooled mean is its count; an inflated count would drag every
    channel's statistics towards its own, so count and examples are tied together and capped.
    A variance below zero (``sumsq`` < ``sum``^2 / ``count``, beyond rounding) cannot come
    from any data.
    """
    problem, records = records_of(reply, ("moments", ArrayRecord), ("metrics", MetricRecord))
    if problem is not None:
        return problem
    moments, metrics = records
    if set(moments.keys()) != MOMENT_NAMES:
        return f"moments hold {sorted(moments.keys())}, expected {sorted(MOMENT_NAMES)}"
    problem = (metrics_problem(metrics, limit=limit)
               or arrays_problem(moments, what="moment"))
    if problem is not None:
        return problem
    values = {name: checked_view(moments[name]) for name in MOMENT_NAMES}
    for name, array in values.items():
        if array.dtype.kind != "f":
            return f"moment '{name}' has dtype {array.dtype}, expected a float dtype"
    if values["count"].size != 1:
        return f"moment 'count' has shape {values['count'].shape}, expected (1,)"
    for name in ("sum", "sumsq"):
        if values[name].shape != (channels,):
            return f"moment '{name}' has shape {values[name].shape}, expected ({channels},)"
    count, examples = float(values["count"].reshape(())), float(metrics["num-examples"])
    if positions is not None:
        if count != examples * positions:
            return (f"moment count is {count:g}, expected num-examples x {positions} values "
                    f"per channel = {examples * positions:g}")
    elif count < examples or count != examples * round(count / examples):
        return f"moment count {count:g} is not a whole multiple of num-examples {examples:g}"
    sums = values["sum"].astype(np.float64)
    squares = values["sumsq"].astype(np.float64)
    # Tolerance for float rounding of sums over many values.
    slack = 1e-6 * np.maximum(squares, 1.0)
    if (squares - sums * sums / count < -slack).any():
        return "moment 'sumsq' is below sum^2 / count: a negative variance"
    return None


def handshake_problem(reply: Message, num_clients: int, num_classes: int | None = None,
                      partition_size: Callable[[int], int | None] | None = None) -> Problem:
    """Why a node's handshake (``info``: ``partition-id``, ``num-examples``, ``class-counts``,
    optionally ``test-examples`` and ``own-data``) cannot be used, or None.

    ``partition_size(pid)`` is the size of that partition as the server built it, where the
    node trains on the run's partitions (``own-data`` absent or 0): the node may not claim
    more training plus test examples than that.
    """
    problem, records = records_of(reply, ("info", MetricRecord), what="handshake")
    if problem is not None:
        return problem
    (info,) = records
    if "partition-id" not in info:
        return "handshake lacks 'partition-id'"
    problem = number_problem(info["partition-id"], "partition-id", integer=True, low=0,
                             high=num_clients - 1)
    if problem is not None:
        return problem
    problem = (count_problem(info.get("num-examples"), None)
               or int_list_problem(info.get("class-counts"), "class-counts", num_classes))
    if problem is not None:
        return problem
    examples = info["num-examples"]
    if sum(info["class-counts"]) != examples:
        return (f"class-counts add up to {sum(info['class-counts'])}, num-examples is "
                f"{examples}")
    test = info.get("test-examples", 0)
    problem = number_problem(test, "test-examples", integer=True, low=0)
    if problem is not None:
        return problem
    size = partition_size(int(info["partition-id"])) if partition_size else None
    if size is not None and not info.get("own-data") and examples + test > size:
        return (f"num-examples {examples:g} + test-examples {test:g} is more than partition "
                f"{int(info['partition-id'])}'s {size} examples")
    return None


def held_out_problem(reply: Message, num_classes: int, limit: float | None = None) -> Problem:
    """Why a node's federated-evaluation counts cannot be added to the others', or None.

    ``class-total`` and ``class-correct`` must be ``num_classes`` whole numbers >= 0, with
    correct <= total per class; ``num-examples`` must be their total, within ``limit`` (the
    test examples the node reported at the handshake); ``loss-sum`` a finite number >= 0.
    """
    problem, records = records_of(reply, ("metrics", MetricRecord))
    if problem is not None:
        return problem
    (metrics,) = records
    problem = (metrics_problem(metrics, limit=limit)
               or int_list_problem(metrics.get("class-total"), "class-total", num_classes)
               or int_list_problem(metrics.get("class-correct"), "class-correct", num_classes)
               or number_problem(metrics.get("loss-sum"), "loss-sum", low=0))
    if problem is not None:
        return problem
    total, correct = metrics["class-total"], metrics["class-correct"]
    if any(c > t for c, t in zip(correct, total)):
        return "class-correct exceeds class-total"
    if sum(total) != metrics["num-examples"]:
        return f"class-total adds up to {sum(total)}, num-examples is {metrics['num-examples']}"
    return None


def evaluate_problem(reply: Message, limit: float | None = None) -> Problem:
    """Why a client-side evaluation reply (``metrics`` with ``num-examples``) cannot be
    averaged, or None."""
    problem, records = records_of(reply, ("metrics", MetricRecord))
    if problem is not None:
        return problem
    (metrics,) = records
    return metrics_problem(metrics, limit=limit)


def kept_model_problem(reply: Message) -> Problem:
    """Why a node's kept model / optimiser state (``arrays``, ``optimizer``, both optional)
    cannot go into a checkpoint, or None."""
    problem = error_problem(reply)
    if problem is not None:
        return problem
    for key in ("arrays", "optimizer"):
        record = reply.content.get(key) if key in reply.content else None
        if record is not None and not isinstance(record, ArrayRecord):
            return f"'{key}' is not an ArrayRecord"
        if record is not None:
            problem = arrays_problem(record, what=f"{key} entry")
            if problem is not None:
                return problem
    return None


# --- screening --------------------------------------------------------------------------------


def screen(replies: Iterable[Message], check: Check, what: str,
           sink: list[dict[str, Any]] | None = None
           ) -> tuple[list[Message], list[tuple[int, str]]]:
    """Split replies into usable ones and ``(node, reason)`` rejections, logging each.

    Parameters
    ----------
    replies : iterable of Message
        The replies of one exchange.
    check : callable
        The reply's problem, or None (one of this module's ``*_problem`` functions, bound).
    what : str
        Names the exchange in the log (``"round 3"``, ``"BN statistics of layer bn1"``).
    sink : list of dict, optional
        Also appends ``{"what", "node", "reason"}`` for each rejection (the grid's count of
        the round's rejected replies, :attr:`fedwa.flower.grid.RoundTraffic.rejected`).

    A check that raises is a bug in the check, not the client's fault, but it must not end the
    run either: the reply is left out with the exception as its reason.
    """
    usable, rejected = [], []
    for reply in replies:
        try:
            problem = check(reply)
        except Exception as err:  # noqa: BLE001 - see the docstring
            problem = f"reply could not be checked ({type(err).__name__}: {err})"
        if problem is None:
            usable.append(reply)
            continue
        node = int(reply.metadata.src_node_id)
        rejected.append((node, problem))
        log.warning("%s: node %d left out: %s", what, node, problem)
        if sink is not None:
            sink.append({"what": what, "node": node, "reason": problem})
    return usable, rejected


def rejection_detail(rejected: Sequence[tuple[int, str]], most: int = 3) -> str:
    """The first rejections as ``node N: reason; ...`` for an error message."""
    return "; ".join(f"node {n}: {p}" for n, p in rejected[:most])


def node_limit(limits: Mapping[int, float] | Callable[[int], float | None] | None,
               node: int) -> float | None:
    """The example cap of ``node`` from a mapping or a function; None when unknown."""
    if limits is None:
        return None
    if callable(limits):
        return limits(node)
    return limits.get(node)
