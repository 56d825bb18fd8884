"""The stock ServerApp: ``strategy.start(...)`` with a central ``evaluate_fn``, as in Flower's
quickstart, for a series of strategies in one run (one simulation start for all of them)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from stock_app.task import Net, initial_model, load_test, test

NUM_ROUNDS = 3


def as_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """A copy of ``arrays`` as numpy arrays, entry by entry."""
    return {name: np.array(array.numpy(), copy=True) for name, array in arrays.items()}


def central_evaluate(seen: list[tuple[int, dict[str, np.ndarray]]]
                     ) -> Callable[[int, ArrayRecord], MetricRecord]:
    """A quickstart ``evaluate_fn`` on the server's test set that also keeps what it saw."""
    x, y = load_test()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append((server_round, as_numpy(arrays)))
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, x, y)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    return evaluate_fn


def build_server_app(factories: Mapping[str, Callable[[], Any]],
                     outcomes: dict[str, dict[str, Any]],
                     start_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> ServerApp:
    """A ServerApp that runs every strategy of ``factories`` in turn on the same nodes.

    ``outcomes[name]`` gets the ``result`` and ``strategy`` of a run, or the ``error`` it raised
    (at construction or in ``start``), and ``seen``: the ``(round, arrays)`` the evaluate_fn got.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord(initial_model().state_dict())
        for name, factory in factories.items():
            seen: list[tuple[int, dict[str, np.ndarray]]] = []
            outcome: dict[str, Any] = {"seen": seen}
            outcomes[name] = outcome
            # The app's own use of `random`: the test checks that no fedwa strategy moved it.
            random.seed(f"stock-app-{name}")
            outcome["random_before"] = random.getstate()
            try:
                strategy = factory()
                outcome["strategy"] = strategy
                outcome["result"] = strategy.start(
                    grid=grid, initial_arrays=initial, num_rounds=NUM_ROUNDS,
                    evaluate_fn=central_evaluate(seen), **(start_kwargs or {}).get(name, {}))
            except Exception as err:  # noqa: BLE001 - the test asserts on it
                outcome["error"] = err
            outcome["random_after"] = random.getstate()

    return app
