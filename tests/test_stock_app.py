"""fedwa's strategies in a stock Flower app (issue #16): every exported strategy, started with
``strategy.start(...)`` from a ServerApp written as Flower's quickstart writes one, against a
quickstart ClientApp (``tests/stock_app``), in one ``flwr.simulation.run_simulation``.

What is asserted: the time averages (SWA, EMA, HWA, IMWA, TWA-v with server data) give the
``evaluate_fn`` and the ``Result`` their averaged model, checked against the averages computed
here from the FedAvg run's global models (the same clients train the same models in both runs);
the strategies that need more of the client (partial averaging, WSA, TWA-t's gradient rounds,
the decentralized ones) stop with an error that says what is missing. Never a silent FedAvg.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import strategies
from strategies.base import ClientProtocolError

pytestmark = pytest.mark.e2e

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the app's package, as a user's app would be importable
    sys.path.insert(0, str(TESTS))

from stock_app.client_app import LOCAL_EPOCHS, LR, round_seed  # noqa: E402
from stock_app.server_app import NUM_ROUNDS, as_numpy  # noqa: E402
from stock_app.task import Net, initial_model, load_partition, load_test, train  # noqa: E402

NUM_NODES = 3
SAMPLING = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": NUM_NODES,
            "min_evaluate_nodes": NUM_NODES, "min_available_nodes": NUM_NODES}
EMA_DECAY = 0.5


def factories() -> dict:
    """How a user builds each strategy in their own ServerApp (no fedwa run config)."""
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    x_val, y_val = load_test()
    return {
        "flower-FedAvg": lambda: FlowerFedAvg(**SAMPLING),  # the reference
        "FedAvg": lambda: strategies.FedAvg(**SAMPLING),
        "FedAvgM": lambda: strategies.FedAvgM(**SAMPLING, server_momentum=0.9),
        "FedProx": lambda: strategies.FedProx(**SAMPLING, proximal_mu=0.1),
        "FedAdam": lambda: strategies.FedAdam(**SAMPLING, eta=0.01, eta_l=LR),
        "FedMedian": lambda: strategies.FedMedian(**SAMPLING),
        "FedTrimmedAvg": lambda: strategies.FedTrimmedAvg(**SAMPLING, beta=0.34),
        "Krum": lambda: strategies.Krum(**SAMPLING),
        "Bulyan": lambda: strategies.Bulyan(**SAMPLING),
        "IMWA": lambda: strategies.IMWA(**SAMPLING),
        "HWA": lambda: strategies.HWA(**SAMPLING, hwa_window=2),
        "SWA": lambda: strategies.SWA(**SAMPLING),
        "EMA": lambda: strategies.EMA(**SAMPLING, ema_decay=EMA_DECAY),
        "TWAv": lambda: strategies.TWAv(**SAMPLING, model_fn=Net, server_data=(x_val, y_val),
                                        twa_epochs=3, twa_batch_size=64, twa_lr=0.05),
        "TWAv-no-data": lambda: strategies.TWAv(**SAMPLING),
        "TWAt": lambda: strategies.TWAt(**SAMPLING, model_fn=Net, twa_rounds=1),
        "PartialAveraging": lambda: strategies.PartialAveraging(**SAMPLING),
        "WSA": lambda: strategies.WSA(**SAMPLING),
        "DIMAT": lambda: strategies.DIMAT(num_nodes=NUM_NODES),
        "Gossip": lambda: strategies.Gossip(num_nodes=NUM_NODES),
    }


START_KWARGS = {"EMA": {"evaluate_all_models": True}}


def simulate(strategy_factories: dict, client_module: str) -> dict:
    """Run the stock ServerApp over ``strategy_factories`` against the ClientApp ``app`` of
    ``client_module``, in one Ray simulation of NUM_NODES nodes; return the outcomes."""
    import importlib

    from flwr.simulation import run_simulation

    from stock_app.server_app import build_server_app

    client_app = importlib.import_module(client_module).app
    # Ray's workers import the ClientApp's module by name, as they would a user's app.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), saved]))
    results: dict = {}
    try:
        run_simulation(server_app=build_server_app(strategy_factories, results, START_KWARGS),
                       client_app=client_app, num_supernodes=NUM_NODES,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                     "logging_level": "ERROR"}})
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return results


@pytest.fixture(scope="module")
def outcomes() -> dict:
    """Every strategy against Flower's quickstart ClientApp."""
    return simulate(factories(), "stock_app.client_app")


@pytest.fixture(scope="module")
def protocol_outcomes() -> dict:
    """The strategies that need more of the client, against a ClientApp that follows the
    documented protocols (tests/stock_app/protocol_client_app.py)."""
    every = factories()
    return simulate({n: every[n] for n in ("FedAvg", "PartialAveraging", "WSA", "TWAt")},
                    "stock_app.protocol_client_app")


def ran(outcomes: dict, name: str, rounds: int = NUM_ROUNDS) -> dict:
    """The outcome of a run of ``rounds`` rounds that must have worked, with its evaluated
    models by round."""
    outcome = outcomes[name]
    assert "error" not in outcome, f"{name} failed: {outcome['error']!r}"
    seen = outcome["seen"]
    assert sorted({r for r, _ in seen}) == list(range(rounds + 1))
    outcome["by_round"] = {}
    for r, arrays in seen:
        outcome["by_round"].setdefault(r, arrays)  # the main model comes first in a round
    return outcome


def failed(outcomes: dict, name: str) -> BaseException:
    outcome = outcomes[name]
    assert "error" in outcome, f"{name} ran without the clients it needs: a silent FedAvg"
    return outcome["error"]


def mean(*states: dict, weights: list[float] | None = None) -> dict:
    weights = weights or [1.0] * len(states)
    total = sum(weights)
    return {k: sum(w * s[k].astype(np.float64) for w, s in zip(weights, states)) / total
            for k in states[0]}


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
                                        for k in a)


def distance(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def fedavg_globals(outcomes: dict) -> dict:
    """FedAvg's global model after every round (round 0: the initial model)."""
    return ran(outcomes, "FedAvg")["by_round"]


def test_every_exported_strategy_is_run():
    exported = {n for n in strategies.__all__ if isinstance(getattr(strategies, n), type)
                and n not in ("FedwaStrategy", "DecentralizedStrategy")}
    assert exported <= set(factories())


def test_global_random_state_is_the_apps_own(outcomes: dict):
    # Flower's FedAvg samples with the global `random`; fedwa's strategies use their own.
    moved = {name for name, o in outcomes.items() if o["random_before"] != o["random_after"]}
    assert moved == {"flower-FedAvg"}


# --- strategies that are (or train like) FedAvg ----------------------------------------------


def test_fedwa_fedavg_matches_flowers_and_returns_its_model(outcomes: dict, fedavg_globals):
    flower = ran(outcomes, "flower-FedAvg")
    result = as_numpy(outcomes["FedAvg"]["result"].arrays)
    assert close(result, as_numpy(flower["result"].arrays))
    assert close(result, fedavg_globals[NUM_ROUNDS])
    assert distance(result, fedavg_globals[0]) > 1e-3  # it trained


@pytest.mark.parametrize("name", ["FedAvgM", "FedProx", "FedAdam"])
def test_flower_optimisers_run_and_return_their_model(outcomes: dict, fedavg_globals, name):
    outcome = ran(outcomes, name)
    result = as_numpy(outcome["result"].arrays)
    assert close(result, outcome["by_round"][NUM_ROUNDS])
    assert sorted(outcome["result"].train_metrics_clientapp) == list(range(1, NUM_ROUNDS + 1))
    assert sorted(outcome["result"].evaluate_metrics_clientapp) == list(range(1, NUM_ROUNDS + 1))
    if name == "FedProx":  # Flower's FedProx writes proximal-mu before fedwa samples
        assert outcome["result"].train_metrics_clientapp[1]["proximal-mu"] == pytest.approx(0.1)
    else:
        assert outcome["result"].train_metrics_clientapp[1]["proximal-mu"] == -1.0
    if name == "FedAdam":  # a server optimiser, not FedAvg's step
        assert distance(result, fedavg_globals[NUM_ROUNDS]) > 1e-3


@pytest.mark.parametrize("name", ["FedMedian", "FedTrimmedAvg", "Krum", "Bulyan"])
def test_robust_rules_run_in_a_users_app_and_return_their_model(outcomes: dict, fedavg_globals,
                                                               name):
    outcome = ran(outcomes, name)
    result = as_numpy(outcome["result"].arrays)
    assert close(result, outcome["by_round"][NUM_ROUNDS])
    assert distance(result, fedavg_globals[0]) > 1e-3  # it trained
    if name in ("FedMedian", "Krum"):  # of three models, neither is their mean
        assert distance(result, fedavg_globals[NUM_ROUNDS]) > 1e-6


# --- time averages: the averaged model is what is evaluated and returned --------------------


def test_swa_returns_the_mean_of_its_window(outcomes: dict, fedavg_globals):
    outcome = ran(outcomes, "SWA")
    g = fedavg_globals
    assert outcome["strategy"].start_round == 2  # 3 // 2 + 1: rounds 2 and 3
    seen, result = outcome["by_round"], as_numpy(outcome["result"].arrays)
    assert close(seen[1], g[1])  # nothing averaged yet: the global model
    assert close(seen[2], g[2])  # the window holds round 2 only
    assert close(seen[3], mean(g[2], g[3]))
    assert close(result, mean(g[2], g[3]))
    assert distance(result, g[NUM_ROUNDS]) > 1e-4  # not FedAvg's result
    # SWA trains like FedAvg: its training model is FedAvg's.
    assert close(as_numpy(outcome["strategy"].training_arrays), g[NUM_ROUNDS])
    accuracy = outcome["result"].evaluate_metrics_serverapp[NUM_ROUNDS]["accuracy"]
    assert accuracy != outcomes["FedAvg"]["result"].evaluate_metrics_serverapp[NUM_ROUNDS][
        "accuracy"] or distance(result, g[NUM_ROUNDS]) > 1e-4


def test_ema_returns_the_exponential_average(outcomes: dict, fedavg_globals):
    outcome = ran(outcomes, "EMA")
    g, d = fedavg_globals, EMA_DECAY
    expected = g[1]
    for r in range(2, NUM_ROUNDS + 1):
        expected = mean(expected, g[r], weights=[d, 1 - d])
    result = as_numpy(outcome["result"].arrays)
    assert close(result, expected)
    assert distance(result, g[NUM_ROUNDS]) > 1e-4
    # evaluate_all_models: the training model's metrics beside the average's
    metrics = outcome["result"].evaluate_metrics_serverapp[NUM_ROUNDS]
    fedavg = outcomes["FedAvg"]["result"].evaluate_metrics_serverapp[NUM_ROUNDS]
    assert metrics["global_accuracy"] == pytest.approx(fedavg["accuracy"])
    assert "accuracy" in metrics


def test_hwa_returns_the_window_average(outcomes: dict, fedavg_globals):
    outcome = ran(outcomes, "HWA")
    g = fedavg_globals
    assert close(outcome["by_round"][2], mean(g[1], g[2]))
    result = as_numpy(outcome["result"].arrays)
    assert close(result, mean(g[2], g[3]))  # hwa_window = 2
    assert distance(result, g[NUM_ROUNDS]) > 1e-4


def test_imwa_averages_the_clients_uniformly(outcomes: dict, fedavg_globals):
    outcome = ran(outcomes, "IMWA")
    # Round 1 from the shared initial model: the clients' models, trained here the same way.
    clients = []
    for pid in range(NUM_NODES):
        model = initial_model()
        x, y = load_partition(pid, NUM_NODES)
        train(model, x, y, epochs=LOCAL_EPOCHS, lr=LR, seed=round_seed(1, pid))
        clients.append(({k: v.detach().numpy() for k, v in model.state_dict().items()}, len(x)))
    uniform = mean(*(c for c, _ in clients))
    weighted = mean(*(c for c, _ in clients), weights=[n for _, n in clients])
    assert close(outcome["by_round"][1], uniform)
    assert close(fedavg_globals[1], weighted)  # the check can tell the two apart
    assert distance(uniform, weighted) > 1e-4
    result = as_numpy(outcome["result"].arrays)
    assert close(result, outcome["by_round"][NUM_ROUNDS])
    assert outcome["strategy"].lengths == [1] * NUM_ROUNDS  # one episode per round


def test_twa_v_returns_its_fitted_point_in_the_candidates_hull(outcomes: dict, fedavg_globals):
    outcome = ran(outcomes, "TWAv")
    g = fedavg_globals
    result = as_numpy(outcome["result"].arrays)
    assert close(outcome["by_round"][NUM_ROUNDS], result)
    centre = mean(g[2], g[3])  # candidates: rounds 2 and 3, the second half
    assert distance(result, centre) > 1e-5  # the fit moved away from the SWA point
    assert distance(result, g[NUM_ROUNDS]) > 1e-5  # and it is not the training model
    # ... along the one direction the two candidates span.
    names = list(centre)
    step = np.concatenate([(result[k] - centre[k]).ravel() for k in names])
    direction = np.concatenate([(g[3][k] - g[2][k]).astype(np.float64).ravel() for k in names])
    t = step @ direction / (direction @ direction)
    assert np.linalg.norm(step - t * direction) < 1e-3 * np.linalg.norm(step)


def test_twa_v_without_server_data_says_what_to_pass(outcomes: dict):
    err = failed(outcomes, "TWAv-no-data")
    assert isinstance(err, ValueError)
    assert "server_data=(x, y)" in str(err) and "model_fn" in str(err)


# --- strategies that need more of the ClientApp: a clear error, never FedAvg ----------------


def test_partial_averaging_names_the_client_protocol(outcomes: dict):
    err = failed(outcomes, "PartialAveraging")
    assert isinstance(err, ClientProtocolError)
    text = str(err)
    assert "round 1" in text
    for piece in ("keep-local-model", "return-names", "keeps its own full model"):
        assert piece in text, piece
    assert len(outcomes["PartialAveraging"]["seen"]) == 1  # only round 0 was evaluated


def test_wsa_names_the_missing_scope_term(outcomes: dict):
    err = failed(outcomes, "WSA")
    assert isinstance(err, ClientProtocolError)
    text = str(err)
    assert "round 1" in text and "'wsa-kl'" in text
    for piece in ("wsa-lambda", "wsa-names", "wsa-mu", "wsa-sigma"):
        assert piece in text, piece


def test_twa_t_names_the_gradient_handler(outcomes: dict, fedavg_globals):
    err = failed(outcomes, "TWAt")
    assert isinstance(err, ClientProtocolError)
    text = str(err)
    assert f"round {NUM_ROUNDS + 1}" in text  # training rounds are FedAvg's; gradients are not
    assert "@app.train('gradient')" in text and "No train function registered" in text
    seen = dict(outcomes["TWAt"]["seen"])
    assert close(seen[NUM_ROUNDS], mean(fedavg_globals[2], fedavg_globals[3]))  # the SWA point


@pytest.mark.parametrize("name", ["DIMAT", "Gossip"])
def test_decentralized_strategies_say_they_need_fedwas_apps(outcomes: dict, name):
    err = failed(outcomes, name)
    assert isinstance(err, ClientProtocolError)
    text = str(err)
    assert "no global model" in text and "train.merge" in text
    assert "fedwa.apps.server_app" in text and "fedwa.apps.client_app" in text
    assert outcomes[name]["seen"] == []


# --- the same strategies with a ClientApp that follows the documented protocols -------------


def test_partial_averaging_runs_with_a_client_that_keeps_its_model(protocol_outcomes: dict):
    import torch

    from fedwa.core.partial import merge, select

    g = ran(protocol_outcomes, "FedAvg")["by_round"]
    outcome = ran(protocol_outcomes, "PartialAveraging")
    strategy = outcome["strategy"]
    # Round 1 trains from the initial model, as FedAvg's does, and averages group 0 only.
    tensors = {k: torch.from_numpy(v) for k, v in g[0].items()}
    expected = merge(tensors, select({k: torch.from_numpy(v) for k, v in g[1].items()},
                                     strategy.groups[0]))
    assert close(outcome["by_round"][1], {k: v.numpy() for k, v in expected.items()})
    assert distance(outcome["by_round"][1], g[1]) > 1e-5  # group 1 was not averaged
    result = as_numpy(outcome["result"].arrays)
    assert close(result, {k: v.numpy() for k, v in strategy.full.items()})
    assert distance(result, g[NUM_ROUNDS]) > 1e-5
    # The last round's clients evaluated the models they keep.
    assert "eval_acc" in outcome["result"].evaluate_metrics_clientapp[NUM_ROUNDS]


def test_wsa_runs_with_a_client_that_adds_the_scope_term(protocol_outcomes: dict):
    g = ran(protocol_outcomes, "FedAvg")["by_round"]
    outcome = ran(protocol_outcomes, "WSA")
    kl = outcome["result"].train_metrics_clientapp[1]["wsa-kl"]
    assert np.isfinite(kl) and kl >= 0
    assert outcome["strategy"].names == ["fc1.weight", "fc2.weight"]
    assert distance(as_numpy(outcome["result"].arrays), g[NUM_ROUNDS]) > 1e-5


def test_twa_t_runs_with_a_client_that_answers_gradient_rounds(protocol_outcomes: dict):
    g = ran(protocol_outcomes, "FedAvg")["by_round"]
    outcome = ran(protocol_outcomes, "TWAt", rounds=NUM_ROUNDS + 1)  # one gradient round
    centre = mean(g[2], g[3])
    assert close(outcome["by_round"][NUM_ROUNDS], centre)  # the SWA point
    result = as_numpy(outcome["result"].arrays)
    assert close(result, outcome["by_round"][NUM_ROUNDS + 1])
    assert distance(result, centre) > 1e-6  # one optimiser step away from it
