"""End-to-end: real Flower runs on real data, through the CLI's runner.

Runs use the default in-process backend; the Ray backend is run where the two must agree.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedwa.cli import simulate
from fedwa.run.config import resolve_config
from fedwa.data import DEBIAN_FASHION_MNIST_DIR
from fedwa.common.errors import FedwaError
from fedwa.callbacks.results import read_rounds
from strategies import FedAvg

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SMALL = {"dataset": "digits", "model": "cnn", "num-clients": 4, "num-server-rounds": 4,
         "partition": "dirichlet", "dirichlet-alpha": 0.5, "imbalance-ratio": 10.0,
         "lr": 0.05, "client-cpus": 1.0}
TIMING_KEYS = {"seconds"}


def run(tmp_path: Path, name: str, **overrides: object) -> Path:
    config = resolve_config({**SMALL, "output-dir": str(tmp_path), **overrides})
    run_dir = tmp_path / name
    run_dir.mkdir()
    simulate(config, run_dir, show_progress=False)
    return run_dir


def without_timing(rounds: list[dict]) -> list[dict]:
    """Records without wall-clock times (the server's and the clients')."""
    out = []
    for r in rounds:
        r = {k: v for k, v in r.items() if k not in TIMING_KEYS}
        if r.get("client_train"):
            r["client_train"] = {k: v for k, v in r["client_train"].items()
                                 if k not in ("train-seconds", "seconds")}
        out.append(r)
    return out


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("fedavg"), "fedavg")


def test_digits_fedavg_learns_and_writes_results(fedavg_run: Path) -> None:
    rounds = read_rounds(fedavg_run)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    # Floor: 4 rounds of FedAvg on long-tailed (rho=10) digits reach well above chance (10%);
    # seen here: about 0.7. 0.45 leaves room for other CPUs' float differences.
    assert rounds[-1]["accuracy"] > 0.45
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.3
    for key in ("accuracy", "balanced_accuracy", "per_class_accuracy", "many_shot_accuracy",
                "medium_shot_accuracy", "few_shot_accuracy", "loss", "seconds", "bytes_down",
                "bytes_up"):
        assert key in rounds[-1], key
    assert len(rounds[-1]["per_class_accuracy"]) == 10
    # Every round sends the model to 4 clients and gets 4 models back: equal byte counts.
    assert rounds[1]["bytes_down"] == rounds[1]["bytes_up"] > 0
    assert rounds[1]["clients_ok"] == 4 and rounds[1]["clients_failed"] == 0
    for name in ("config.json", "partition.json", "summary.json", "accuracy.png"):
        assert (fedavg_run / name).is_file(), name
    summary = json.loads((fedavg_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final"]["accuracy"] == rounds[-1]["accuracy"]
    partition = json.loads((fedavg_run / "partition.json").read_text())
    assert sum(partition["client_sizes"]) == partition["num_train"]
    assert [sum(c) for c in partition["client_class_counts"]] == partition["client_sizes"]


def test_same_config_and_seed_give_identical_metrics(fedavg_run: Path, tmp_path: Path) -> None:
    again = run(tmp_path, "again")
    assert without_timing(read_rounds(again)) == without_timing(read_rounds(fedavg_run))


def test_the_ray_backend_gives_the_same_metrics(fedavg_run: Path, tmp_path: Path) -> None:
    on_ray = run(tmp_path, "ray", backend="ray")
    assert json.loads((on_ray / "config.json").read_text())["backend"] == "ray"
    assert without_timing(read_rounds(on_ray)) == without_timing(read_rounds(fedavg_run))


def test_other_seed_gives_other_metrics(fedavg_run: Path, tmp_path: Path) -> None:
    other = run(tmp_path, "other", **{"num-server-rounds": 1, "seed": 1})
    assert read_rounds(other)[1]["accuracy"] != read_rounds(fedavg_run)[1]["accuracy"]


def readme_example() -> str:
    text = (REPO / "docs" / "strategies.md").read_text()
    match = re.search(r"<!-- custom-strategy-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/strategies.md lost its custom strategy example"
    return match.group(1)


def test_readme_custom_strategy_runs(fedavg_run: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_strategies.py").write_text(readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_strategies", None)
    custom = run(tmp_path, "custom", **{"strategy": "my_strategies:UniformFedAvg",
                                        "num-server-rounds": 1})
    assert json.loads((custom / "summary.json").read_text())["status"] == "completed"
    # Uniform client weights differ from FedAvg's example weights on a Dirichlet partition.
    assert read_rounds(custom)[1]["loss"] != read_rounds(fedavg_run)[1]["loss"]


# --- faults: strategies that make chosen clients fail, defined here and named by import path --

class _Faulty(FedAvg):
    """Sends partitions in ``broken`` something that makes their reply unusable."""

    broken: tuple[int, ...] = ()

    def breaks(self, node: int, message: Message, grid) -> Message:  # noqa: ANN001
        return message

    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
        messages = list(super().configure_train(server_round, arrays, config, grid))
        partition_of = grid.partition_of
        return [self.breaks(m.metadata.dst_node_id, m, grid)
                if partition_of[m.metadata.dst_node_id] in self.broken else m
                for m in messages]


class UnknownActionForOne(_Faulty):
    """Partition 1 gets a message type its ClientApp has no function for: an error reply."""

    broken = (1,)

    def breaks(self, node, message, grid):  # noqa: ANN001, ANN201
        return Message(message.content, node, f"{MessageType.TRAIN}.nonexistent")


class UnknownActionForAll(UnknownActionForOne):
    broken = (0, 1, 2, 3)


class ExplodingLrForOne(_Faulty):
    """Partition 2 trains with lr=1e30: its weights come back as inf/NaN."""

    broken = (2,)

    def breaks(self, node, message, grid):  # noqa: ANN001, ANN201
        content = RecordDict({"arrays": message.content["arrays"],
                              "config": ConfigRecord({**dict(message.content["config"]),
                                                      "lr": 1e30})})
        return Message(content, node, message.metadata.message_type)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_failing_client_is_left_out_and_the_round_goes_on(tmp_path: Path, backend: str) -> None:
    rounds = read_rounds(run(tmp_path, "one", **{"strategy": f"{__name__}:UnknownActionForOne",
                                                 "num-server-rounds": 2, "backend": backend}))
    assert [(r["clients_ok"], r["clients_failed"]) for r in rounds[1:]] == [(3, 1), (3, 1)]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


def test_a_non_finite_reply_never_reaches_the_global_model(tmp_path: Path) -> None:
    rounds = read_rounds(run(tmp_path, "nan", **{"strategy": f"{__name__}:ExplodingLrForOne",
                                                 "num-server-rounds": 2}))
    assert [(r["clients_ok"], r["clients_failed"]) for r in rounds[1:]] == [(3, 1), (3, 1)]
    assert all(r["loss"] is not None and r["loss"] < 10 for r in rounds)


def test_the_run_stops_with_an_error_when_every_client_fails(tmp_path: Path) -> None:
    with pytest.raises(FedwaError, match="round 1: none of the 4 sampled clients"):
        run(tmp_path, "all", **{"strategy": f"{__name__}:UnknownActionForAll"})
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["status"] == "failed" and "none of the 4" in summary["error"]


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_long_tailed_fashion_mnist(tmp_path: Path) -> None:
    rounds = read_rounds(run(tmp_path, "fmnist", **{
        "dataset": "fashion-mnist", "model": "mlp", "num-clients": 4, "num-server-rounds": 3,
        "imbalance-ratio": 100.0, "local-steps": 60, "batch-size": 64}))
    partition_counts = json.loads((tmp_path / "fmnist" / "partition.json").read_text())
    assert partition_counts["num_test"] == 10_000
    assert partition_counts["train_class_counts"][0] == 6000
    # Floor: chance is 0.1; seen here after 3 rounds of 60 steps on rho=100: 0.52.
    assert rounds[-1]["accuracy"] > 0.4


def test_fraction_train_samples_the_same_clients_for_the_same_seed(tmp_path: Path) -> None:
    first = read_rounds(run(tmp_path, "a", **{"fraction-train": 0.5, "num-server-rounds": 2}))
    second = read_rounds(run(tmp_path, "b", **{"fraction-train": 0.5, "num-server-rounds": 2}))
    assert [r["clients_ok"] for r in first[1:]] == [2, 2]
    assert without_timing(first) == without_timing(second)


def test_readme_example_is_self_contained() -> None:
    code = readme_example()
    assert "import" in code and "class UniformFedAvg" in code
    compile(textwrap.dedent(code), "README example", "exec")


# --- batch-clients ------------------------------------------------------------------------------


def test_batch_clients_trains_the_round_together_and_matches_one_by_one(
        fedavg_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import fedwa.apps.client_app

    groups: list[int] = []
    real = fedwa.apps.client_app.train_batched
    monkeypatch.setattr(fedwa.apps.client_app, "train_batched",
                        lambda models, *a, **k: (groups.append(len(models)),
                                                 real(models, *a, **k))[1])
    batched = run(tmp_path, "batched", **{"batch-clients": True})
    assert groups == [4, 4, 4, 4]  # every round's four clients in one batched call
    ones, together = read_rounds(fedavg_run), read_rounds(batched)
    # Batched kernels sum in another order: equal to float tolerance, not bit for bit.
    for a, b in zip(ones, together):
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.02)
    final = torch.load(batched / "model.pt", weights_only=True)
    reference = torch.load(fedavg_run / "model.pt", weights_only=True)
    for name, value in reference.items():
        torch.testing.assert_close(final[name], value, rtol=1e-3, atol=1e-3)


def test_batch_clients_leaves_unbatchable_training_to_the_client_app(tmp_path: Path) -> None:
    # WSA's scope regulariser cannot be batched: every client trains alone, as without the
    # key, so the runs agree exactly.
    settings = {"strategy": "wsa", "num-server-rounds": 2}
    alone = without_timing(read_rounds(run(tmp_path, "alone", **settings)))
    together = without_timing(read_rounds(run(tmp_path, "together", **settings,
                                              **{"batch-clients": True})))
    assert together == alone


def test_batch_clients_needs_the_local_backend() -> None:
    from fedwa.common.errors import ConfigError

    with pytest.raises(ConfigError, match="'batch-clients' = True is not allowed: false with "
                                          "backend = ray"):
        resolve_config({"batch-clients": True, "backend": "ray"})
