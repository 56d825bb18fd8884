"""The server's round loop: Flower's ``Strategy.start`` with a start round and retries.

Flower's :meth:`flwr.serverapp.strategy.Strategy.start` always numbers rounds from 1, so it
cannot continue a run from a checkpoint, and a round whose replies are too few can only end the
run. :func:`run_rounds` calls the same strategy hooks in the same order (``configure_train``,
``send_and_receive``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``, then
the server's ``evaluate_fn``) with two additions:

- ``first_round``: a resumed run starts at the round after its checkpoint, and the strategies
  see the true round numbers (learning-rate schedules, IMWA episodes and SWA windows depend on
  them). Whether round 0 (the initial model) is evaluated is said apart, by ``resumed``: a
  run resumed from its round-0 checkpoint also starts at round 1, and must not evaluate and
  record round 0 a second time;
- ``retries``: a round whose aggregation raises :class:`~fedwa.common.errors.TooFewRepliesError` is
  configured and sent again, up to ``retries`` times, before the error ends the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedwa.common.errors import TooFewRepliesError

log = logging.getLogger("fedwa")

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def run_rounds(strategy: Any, grid: Any, arrays: ArrayRecord, *, num_rounds: int,
               first_round: int = 1, resumed: bool = False, timeout: float = 3600.0,
               retries: int = 0,
               evaluate_fn: EvaluateFn | None = None,
               train_config: ConfigRecord | None = None,
               evaluate_config: ConfigRecord | None = None) -> ArrayRecord:
    """Run rounds ``first_round`` to ``num_rounds`` of ``strategy``; return the last arrays.

    ``evaluate_fn(0, arrays)`` runs first only for a new run (``resumed`` false): a resumed
    run evaluated its initial model before it was interrupted, and its round-0 record is
    already in ``metrics.jsonl``, also when it resumes from the checkpoint of round 0 (and so
    starts at round 1 like a new run).
    """
    # One record each for the whole run, as in Flower: strategies write the round's settings
    # into it before every round.
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    if not resumed and evaluate_fn is not None:
        evaluate_fn(0, arrays)
    for server_round in range(first_round, num_rounds + 1):
        for attempt in range(retries + 1):
            replies = grid.send_and_receive(
                strategy.configure_train(server_round, arrays, train_config, grid),
                timeout=timeout)
            try:
                new_arrays, _ = strategy.aggregate_train(server_round, replies)
                break
            except TooFewRepliesError as err:
                if attempt == retries:
                    raise
                log.warning("%s; trying round %d again (%d of %d retries left)", err,
                            server_round, retries - attempt, retries)
        if new_arrays is not None:
            arrays = new_arrays
        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, evaluate_config, grid),
            timeout=timeout)
        strategy.aggregate_evaluate(server_round, replies)
        if evaluate_fn is not None:
            evaluate_fn(server_round, arrays)
    return arrays
