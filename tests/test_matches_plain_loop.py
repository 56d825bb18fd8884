"""`fedwa run`'s in-process FedAvg computes what a plain torch loop computes, number for number.

The loop builds a fresh model for every client and averages state dicts; fedwa reuses one
module across its ClientApp calls, ships records and averages them as it decodes them. With
the same seeds every round's central accuracy, per-class accuracy and loss must be equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedwa.core.averaging import weighted_average
from fedwa.cli import simulate
from fedwa.run.config import resolve_config
from fedwa.core.metrics import evaluate_model
from fedwa.callbacks.results import read_rounds
from fedwa.data.task import federated_data, local_train_spec, make_model, shot_options
from fedwa.core.training import client_seed, train_local


def plain_loop(config: dict) -> list[dict]:
    """FedAvg by hand: every client from a new model, weights = example counts."""
    data = federated_data(config)
    model = make_model(config, data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_test, y_test = data.test_data()
    reports = []
    for server_round in range(1, int(config["num-server-rounds"]) + 1):
        states, weights = [], []
        for pid in range(int(config["num-clients"])):
            client = make_model(config, data)
            client.load_state_dict(state)
            x, y = data.client_data(pid)
            train_local(client, x, y, local_train_spec(config, {"server-round": server_round}),
                        seed=client_seed(int(config["seed"]), server_round, pid))
            states.append(client.state_dict())
            weights.append(len(x))
        state = weighted_average(states, weights)
        model.load_state_dict(state)
        reports.append(evaluate_model(model, x_test, y_test, num_classes=data.num_classes,
                                      train_class_counts=data.train_class_counts,
                                      batch_size=int(config["eval-batch-size"]),
                                      **shot_options(config)))
    return reports


@pytest.mark.parametrize("model", ["mlp", "cnn"])  # cnn: BatchNorm buffers travel too
def test_fedwa_run_equals_the_plain_loop(tmp_path: Path, model: str) -> None:
    config = resolve_config({"dataset": "digits", "model": model, "num-clients": 5,
                             "num-server-rounds": 3, "local-steps": 2, "partition": "iid",
                             "imbalance-ratio": 1.0, "batch-size": 16,
                             "output-dir": str(tmp_path)})
    simulate(config, tmp_path / "run", show_progress=False, plot=False)
    rounds = read_rounds(tmp_path / "run")[1:]
    expected = plain_loop(config)
    assert len(rounds) == len(expected) == 3
    for record, report in zip(rounds, expected):
        for key in ("accuracy", "balanced_accuracy", "per_class_accuracy", "loss"):
            assert record[key] == report[key], (record["round"], key)
    # Not a run that learned nothing (where any two computations would agree).
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
