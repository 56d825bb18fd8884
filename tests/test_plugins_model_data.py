"""Your own model and your own data: `model = "module:function"`, `dataset = "module:function"`
and `dataset = "npz"`, through the CLI, and the permutation specs DIMAT needs for them.

The plug-in modules live in tests/plugins/ (the README's examples: my_model.py, my_data.py,
my_residual.py, write_npz.py; bad_plugins.py breaks one rule per function).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedwa.core.alignment import (SpecBuilder, derive_spec, permutation_spec, permute_state,
                                  random_permutations)
from fedwa.cli import main
from fedwa.run.config import resolve_config
from fedwa.data import load_dataset
from fedwa.common.errors import ConfigError
from fedwa.models import build_model, model_origin
from fedwa.callbacks.results import read_rounds
from fedwa.data.task import federated_data

PLUGINS = Path(__file__).resolve().parent / "plugins"
sys.path.insert(0, str(PLUGINS))  # as `PYTHONPATH=tests/plugins` would

import bad_plugins  # noqa: E402
import my_data  # noqa: E402
import my_model  # noqa: E402
import my_residual  # noqa: E402
from write_npz import write_npz  # noqa: E402

# Small and quick: 3 clients on digits-sized data, a few local steps.
FAST = {"num-clients": 3, "num-server-rounds": 2, "local-steps": 15, "batch-size": 32,
        "node-eval-examples": 100}


def cli_run(tmp_path: Path, name: str, **overrides: object) -> tuple[int, Path]:
    """`fedwa run --quiet --set k=v ...` in this process; returns the exit code and run dir."""
    settings = {**FAST, "output-dir": str(tmp_path / "runs"), "run-name": name, **overrides}
    decentralized = str(settings.get("strategy", "fedavg")) in ("dimat", "gossip")
    if not decentralized:
        settings.pop("node-eval-examples")
    argv = ["run", "--quiet"]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    return main(argv), tmp_path / "runs" / name


def completed(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    return summary


def partition(run_dir: Path) -> dict:
    return json.loads((run_dir / "partition.json").read_text())


# --- your own model ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fedavg", "swa"])
def test_a_custom_mlp_factory_trains_end_to_end(strategy: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, run_dir = cli_run(tmp_path, strategy, strategy=strategy, model="my_model:make_mlp")
    assert code == 0, capsys.readouterr().err
    completed(run_dir)
    assert json.loads((run_dir / "config.json").read_text())["model"] == "my_model:make_mlp"
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # Chance is 0.1; the plug-in model learns (seen: about 0.45 after 2 rounds).
    assert rounds[-1]["accuracy"] > max(0.25, rounds[0]["accuracy"] + 0.1)
    # The model that trained is the user's: its saved weights carry MLP's layer names.
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert list(saved) == list(my_model.make_mlp((1, 8, 8), 10).state_dict())


def test_the_factory_is_seeded_and_records_its_origin() -> None:
    a = build_model("my_model:make_net", (1, 8, 8), 10, seed=3)
    b = build_model("my_model:make_net", (1, 8, 8), 10, seed=3)
    c = build_model("my_model:make_net", (1, 8, 8), 10, seed=4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])
    origin = model_origin(a)
    assert origin is not None and origin.input_shape == (1, 8, 8) and origin.spec_fn is None
    assert model_origin(build_model("cnn", (1, 8, 8), 10)) is None


# --- your own data ----------------------------------------------------------------------------


def test_a_custom_dataset_is_long_tailed_and_partitioned(tmp_path: Path) -> None:
    code, run_dir = cli_run(tmp_path, "data", dataset="my_data:load", model="my_model:make_net",
                            **{"imbalance-ratio": 10, "partition": "dirichlet",
                               "dirichlet-alpha": 0.3, "num-server-rounds": 1})
    assert code == 0
    completed(run_dir)
    split = partition(run_dir)
    (_, y_train), (_, y_test), names = my_data.load()
    head = int(np.bincount(y_train.numpy(), minlength=10).min())
    counts = split["train_class_counts"]
    # Exponential profile n_c = n_max * rho^(-c/9), n_max the smallest class of the loader's data.
    assert counts == [max(1, int(head * 10 ** (-c / 9) + 1e-9)) for c in range(10)]
    assert split["num_test"] == len(y_test) == 300
    assert split["test_class_counts"] == np.bincount(y_test.numpy(), minlength=10).tolist()
    assert split["class_names"] == names
    clients = np.array(split["client_class_counts"])
    assert clients.sum(axis=0).tolist() == counts
    # Dirichlet(0.3) gives the clients very different label mixes.
    shares = clients / clients.sum(axis=1, keepdims=True)
    assert np.abs(shares - shares.mean(axis=0)).max() > 0.15
    assert read_rounds(run_dir)[-1]["balanced_accuracy"] is not None


@pytest.mark.parametrize("partition_scheme", ["iid", "classes", "shards", "replicas"])
def test_every_partition_works_on_a_custom_dataset(partition_scheme: str) -> None:
    config = resolve_config({"dataset": "my_data:load", "partition": partition_scheme,
                             "num-clients": 4, "imbalance-ratio": 1})
    data = federated_data(config)
    counts = np.array(data.client_class_counts())
    if partition_scheme == "replicas":  # every client holds the whole pool
        assert all(row.tolist() == data.train_class_counts for row in counts)
        return
    assert counts.sum(axis=0).tolist() == data.train_class_counts
    if partition_scheme == "iid":
        assert counts.sum(axis=1).max() - counts.sum(axis=1).min() <= 1
    if partition_scheme == "classes":  # class-disjoint: each class on exactly one client
        assert ((counts > 0).sum(axis=0) == 1).all()


def test_a_loader_may_return_torch_datasets_and_take_data_root(tmp_path: Path) -> None:
    pairs = load_dataset("my_data:load")
    datasets = load_dataset("my_data:load_datasets", str(tmp_path))
    assert torch.equal(pairs.x_train, datasets.x_train)
    assert torch.equal(pairs.y_test, datasets.y_test)
    assert datasets.y_train.dtype == torch.int64 and datasets.input_shape == (1, 8, 8)


def test_the_npz_folder_gives_the_same_split_as_the_callable(tmp_path: Path) -> None:
    folder = write_npz(tmp_path / "my_npz")
    settings = {"imbalance-ratio": 10, "partition": "dirichlet", "num-server-rounds": 1,
                "model": "my_model:make_mlp"}
    code, from_npz = cli_run(tmp_path, "npz", dataset="npz", **{"data-root": folder},
                             **settings)
    assert code == 0
    code, from_loader = cli_run(tmp_path, "loader", dataset="my_data:load", **settings)
    assert code == 0
    a, b = partition(from_npz), partition(from_loader)
    for key in ("train_class_counts", "test_class_counts", "client_sizes",
                "client_class_counts", "class_names"):
        assert a[key] == b[key], key
    assert a["dataset"] == "npz"
    # Same examples, same partition, same training: the same accuracy curve.
    assert [r["accuracy"] for r in read_rounds(from_npz)] == \
        [r["accuracy"] for r in read_rounds(from_loader)]


def test_npz_without_class_names_takes_the_classes_from_the_labels(tmp_path: Path) -> None:
    (x, y), (xt, yt), _ = my_data.load()
    keep, keep_test = y < 4, yt < 4
    np.savez(tmp_path / "train.npz", x=x[keep].numpy(), y=y[keep].numpy())
    np.savez(tmp_path / "test.npz", x=xt[keep_test].numpy(), y=yt[keep_test].numpy())
    data = load_dataset("npz", str(tmp_path))
    assert data.num_classes == 4 and data.class_names == ("0", "1", "2", "3")
    assert torch.equal(data.x_train, x[keep])  # used as given: not re-normalised


# --- permutation specs for DIMAT --------------------------------------------------------------


def hand_written_spec(model: nn.Module) -> object:
    """my_model.make_net's spec as a person writes it (8x8 input, one 2x2 pool -> 4x4)."""
    b = SpecBuilder(model)
    b.group("0", 16)
    b.produces("0", "0")
    b.produces("0", "1")
    b.consumes("0", "5", block=16)
    b.probe("0", "1")
    b.group("5", 64)
    b.produces("5", "5")
    b.consumes("5", "7")
    b.probe("5", "5")
    b.fix("0.weight", 1)
    b.fix("7.weight", 0)
    b.fix("7.bias", 0)
    return b.build()


def test_the_derived_spec_of_a_plain_chain_equals_the_hand_written_one() -> None:
    model = build_model("my_model:make_net", (1, 8, 8), 10, seed=0)
    assert derive_spec(model, (1, 8, 8)) == hand_written_spec(model)
    assert permutation_spec(model) == hand_written_spec(model)
    # And for fedwa's own mlp and cnn, which have hand-written specs registered.
    from fedwa.core.alignment import SPEC_BUILDERS

    for name, shape in (("mlp", (1, 8, 8)), ("cnn", (3, 12, 16))):
        own = build_model(name, shape, 10, seed=0)
        assert derive_spec(own, shape) == SPEC_BUILDERS[type(own)](own)


class LeNetStyle(nn.Module):
    """Functional calls, a view-flatten and scaling: still a plain chain."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, 12)
        self.out = nn.Linear(12, 10)
        self.act = nn.ReLU()  # one parameter-free layer used twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.b1(self.c1(x)))
        x = nn.functional.max_pool2d(self.act(self.c2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.out(self.fc(x).relu() * 2)


@pytest.mark.parametrize("make", [lambda: build_model("my_model:make_net", (1, 8, 8), 10),
                                  lambda: LeNetStyle(),
                                  lambda: my_residual.make_net((1, 8, 8), 10)],
                         ids=["sequential", "functional", "residual-user-spec"])
def test_a_spec_permutes_the_model_without_changing_its_function(make) -> None:  # noqa: ANN001
    model = make()
    spec = (my_residual.permutation_spec(model) if isinstance(model, my_residual.ResidualNet)
            else derive_spec(model, (1, 8, 8)))
    with torch.no_grad():  # non-trivial BN statistics, so their permutation matters too
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before = model(x)
    perms = random_permutations(spec, torch.Generator().manual_seed(1))
    permuted = permute_state(model.state_dict(), spec, perms)
    changed = [k for k in permuted if not torch.equal(permuted[k], model.state_dict()[k])]
    model.load_state_dict(permuted)
    assert changed  # the weights moved ...
    assert torch.allclose(model(x), before, atol=1e-5)  # ... the function did not


def test_a_user_spec_beside_the_factory_is_used() -> None:
    model = build_model("my_residual:make_net", (1, 8, 8), 10)
    assert model_origin(model).spec_fn is my_residual.permutation_spec
    assert permutation_spec(model) == my_residual.permutation_spec(model)


def test_dimat_runs_with_a_derived_spec_and_with_a_user_spec(tmp_path: Path) -> None:
    for name, model in (("derived", "my_model:make_net"), ("user", "my_residual:make_net")):
        code, run_dir = cli_run(tmp_path, name, strategy="dimat", model=model,
                                **{"num-server-rounds": 1})
        assert code == 0, name
        completed(run_dir)
        # Round 1 merged aligned models: the merge's own accuracy was measured.
        assert read_rounds(run_dir)[-1]["accuracy"] > 0.1


def test_the_derivation_refuses_what_is_not_a_chain() -> None:
    with pytest.raises(TypeError, match=r"joins 2 tensors .*residual"):
        derive_spec(bad_plugins.residual((1, 8, 8), 10), (1, 8, 8))
    with pytest.raises(TypeError, match="joins 2 tensors"):
        derive_spec(build_model("resnet20", (1, 8, 8), 10), (1, 8, 8))

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)
            self.out = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(self.fc(x.flatten(1)).relu()))

    with pytest.raises(TypeError, match="called twice"):
        derive_spec(Shared(), (1, 8, 8))
    with pytest.raises(TypeError, match="pass input_shape"):
        permutation_spec(Shared())


# --- bad plug-ins: one line, exit 2, before any engine starts ---------------------------------

BAD = [
    # (overrides, key named, piece of the message)
    ({"model": "no_such_module:make"}, "model", "cannot import no_such_module"),
    ({"model": "my_model:no_such_factory"}, "model", "has no attribute no_such_factory"),
    ({"model": "bad_plugins:NOT_CALLABLE"}, "model", "not callable"),
    ({"model": "bad_plugins:takes_one_argument"}, "model",
     "cannot be called as make_net(input_shape, num_classes)"),
    ({"model": "bad_plugins:returns_a_dict"}, "model", "it returned a dict"),
    ({"model": "bad_plugins:wrong_number_of_outputs"}, "model", "it gave [2, 11]"),
    ({"model": "bad_plugins:wrong_input_size"}, "model", "RuntimeError"),
    ({"model": "not an import path"}, "model", "one of mlp, cnn"),
    ({"model": "bad_plugins:residual", "strategy": "dimat"}, "model",
     "no permutation spec for Residual"),
    ({"model": "my_model:make_mlp", "model-width": 2}, "model-width", "takes no width"),
    ({"dataset": "no_such_module:load"}, "dataset", "cannot import no_such_module"),
    ({"dataset": "my_data:nope"}, "dataset", "has no attribute nope"),
    ({"dataset": "bad_plugins:needs_arguments"}, "dataset", "needs other arguments"),
    ({"dataset": "bad_plugins:two_things"}, "dataset", "returned a tuple of 2"),
    ({"dataset": "bad_plugins:uint8_images"}, "dataset", "x has dtype torch.uint8"),
    ({"dataset": "bad_plugins:float_labels"}, "dataset", "y has dtype torch.float32"),
    ({"dataset": "bad_plugins:labels_out_of_range"}, "dataset", "in 0..4"),
    ({"dataset": "bad_plugins:lengths_differ"}, "dataset", "as many labels as images"),
    ({"dataset": "bad_plugins:flat_images"}, "dataset", "expected x of [n, C, H, W]"),
    ({"dataset": "npz"}, "data-root", "data-root is not set"),
    ({"dataset": "npz", "data-root": "ONLY_TRAIN"}, "data-root", "has no test.npz"),
    ({"dataset": "npz", "data-root": "INT_NPZ"}, "data-root", "x has dtype torch.int64"),
]


@pytest.mark.parametrize("overrides,key,piece", BAD, ids=[
    "-".join(str(v).split(":")[-1].replace(" ", "_") for v in o.values()) for o, _, _ in BAD])
def test_a_bad_plug_in_is_one_line_and_exit_2(overrides: dict, key: str, piece: str,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    only_train = tmp_path / "only_train"
    write_npz(only_train)
    (only_train / "test.npz").unlink()
    int_npz = tmp_path / "int_npz"
    int_npz.mkdir()
    bad_plugins.write_int_npz(int_npz)
    overrides = {k: {"ONLY_TRAIN": only_train, "INT_NPZ": int_npz}.get(v, v)
                 for k, v in overrides.items()}
    code, run_dir = cli_run(tmp_path, "bad", **overrides)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    value = str(overrides.get(key, ""))
    assert f"config key '{key}' = " in err and value in err, err
    assert piece in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before any engine started


def test_a_supernode_data_dir_follows_the_same_rules(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fedwa.common.errors import FedwaError
    from fedwa.data.node import node_data

    folder = tmp_path / "site"
    folder.mkdir()
    bad_plugins.write_int_npz(folder)
    data = SimpleNamespace(input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(FedwaError, match=r"train.npz: x has dtype torch.int64"):
        node_data({"evaluation": "central"}, {"data-dir": str(folder)}, data, 0)
    good = write_npz(tmp_path / "good")  # the npz dataset's files serve a SuperNode as they are
    mine = node_data({"evaluation": "central"}, {"data-dir": str(good)}, data, 0)
    assert torch.equal(mine.x, load_dataset("npz", str(good)).x_train)
    assert torch.equal(mine.y, load_dataset("npz", str(good)).y_train)


def test_a_bad_plug_in_from_the_shell_has_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PLUGINS)}
    done = subprocess.run([sys.executable, "-m", "fedwa.cli", "run", "--quiet", "--set",
                           "model=bad_plugins:returns_a_dict", "--set",
                           f"output-dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "fedwa: error: config key 'model' = 'bad_plugins:returns_a_dict' is not allowed: an "
        "import path module:function naming a factory make_net(input_shape, num_classes) that "
        "returns a torch.nn.Module; it returned a dict"]


def test_the_config_checks_only_the_shape_of_an_import_path() -> None:
    # Resolving a config must not import the user's code (it happens once data is loaded).
    assert resolve_config({"model": "surely_absent_module:make"})["model"] == \
        "surely_absent_module:make"
    assert "surely_absent_module" not in sys.modules
    with pytest.raises(ConfigError, match="'dataset' = 'imagenet'.*npz, or an import path"):
        resolve_config({"dataset": "imagenet"})
