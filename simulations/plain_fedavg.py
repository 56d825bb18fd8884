"""FedAvg as a plain torch loop of fedwa's own functions: the floor the benchmarks time fedwa
against (``bench_overhead.py``, ``bench_peers.py``).

It imports torch and the few fedwa modules it calls, nothing of Flower, the CLI, results or
plots, so a process that runs only this pays only for what a hand-written loop would.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any


def fedavg_loop(config: Mapping[str, Any], *, fresh_model_per_client: bool = True
                ) -> dict[str, Any]:
    """Run ``config``'s rounds as FedAvg over every client; the seconds and accuracies.

    Each client trains a copy of the global state with :func:`fedwa.core.training.train_local`
    (its seed from :func:`fedwa.core.training.client_seed`), the states are averaged by example
    count and the global model is evaluated on the test set after every round.
    ``fresh_model_per_client`` builds a module per client, as fedwa did before it reused one;
    otherwise one module is loaded again for every client.

    Returns
    -------
    dict
        ``rounds_s`` and ``rounds_cpu_s`` (the round loop only), ``accuracies`` (per round).
    """
    import torch

    from fedwa.core.averaging import weighted_average
    from fedwa.core.metrics import evaluate_model
    from fedwa.data.task import federated_data, local_train_spec, make_model
    from fedwa.core.training import client_seed, configure_threads, train_local

    configure_threads(torch.device("cpu"))
    data = federated_data(config)
    model = make_model(config, data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_test, y_test = data.test_data()
    reused = None if fresh_model_per_client else make_model(config, data)
    accuracies = []
    started, cpu = time.perf_counter(), time.process_time()
    for server_round in range(1, int(config["num-server-rounds"]) + 1):
        spec = local_train_spec(config, {"server-round": server_round})
        states, weights = [], []
        for pid in range(int(config["num-clients"])):
            client = reused if reused is not None else make_model(config, data)
            client.load_state_dict(state)
            x, y = data.client_data(pid)
            train_local(client, x, y, spec,
                        seed=client_seed(int(config["seed"]), server_round, pid))
            states.append({k: v.clone() for k, v in client.state_dict().items()})
            weights.append(len(x))
        state = weighted_average(states, weights)
        model.load_state_dict(state)
        accuracies.append(evaluate_model(model, x_test, y_test, num_classes=data.num_classes,
                                         train_class_counts=data.train_class_counts)["accuracy"])
    return {"rounds_s": time.perf_counter() - started, "rounds_cpu_s": time.process_time() - cpu,
            "accuracies": accuracies}
