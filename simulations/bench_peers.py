"""fedwa beside its peers, each side one fresh process timed from start to exit (issue #18).

The workload: FedAvg on the embedded ``digits`` data (sklearn's 8x8 digits), an IID partition
of the whole balanced pool, fedwa's ``mlp`` (64-128-128-10) from the same initial weights on every
side, SGD (lr 0.05, momentum 0.9, no weight decay) with batches of 32, the same number of local
steps on every client, every client in every round, and the global model evaluated centrally on
the same test set after every round. Scales (``--scales``): ``10x5`` (10 clients, 5 steps each),
``100x1`` and ``1000x1`` (1 step each), 20 rounds (``--rounds``).

Sides (``--sides``):

``loop``
    A plain torch loop in one process, made of fedwa's own functions (data, model,
    ``train_local``, ``weighted_average``, ``evaluate_model``): the floor.
``fedwa``, ``fedwa-batch``, ``fedwa-ray``
    ``python -m fedwa.cli run`` with the workload's ``--set`` keys: the local backend, the local
    backend with ``batch-clients = true``, and the Ray backend (slow to start).
``pfl``
    pfl-research (PyPI ``pfl``, PyTorch): ``PyTorchModel``, ``FederatedAveraging``,
    ``SimulatedBackend`` with weighting by data points, ``CentralEvaluationCallback``.
``flgo``
    FLGo (PyPI ``flgo``): a task generated from the per-client arrays
    (``gen_direct_task_from_file``), ``flgo.algorithm.fedavg``, full participation, a logger
    that evaluates on the server's test set only.
``flower``
    Stock Flower (1.42 message API): a quickstart-style ``ServerApp`` with Flower's ``FedAvg``
    and central ``evaluate_fn`` plus a ``ClientApp``, run by ``flwr.simulation.run_simulation``
    (Ray); slow to start.

The data (every client's examples, the test set) and the initial weights are written once per
scale, by fedwa's data code, into a ``.npz`` that the peer processes read; fedwa's own sides build
the same split from the same config and seed. Every side trains with one torch thread.

Measured per run: ``wall_s``, the whole process from ``exec`` to exit, start-up included;
``rounds_s``, the seconds the side itself reports for its rounds (fedwa: the ``seconds`` of its
per-round records; loop/pfl/flgo/flower: the driver's clock around the round loop);
``cpu_s``, the user + system CPU time of the worker and the descendants it waited for
(steadier than wall time on a shared machine, blind to daemons such as Ray's);
``peak_rss_mb``, the largest summed resident memory of the process tree (sampled from /proc
every 50 ms, so a spike shorter than that can be missed); the final central accuracy. Sides
take turns ``--repeats`` times; the table shows each side's median, the ratio of its median wall
time to the loop's and to pfl's.

    python simulations/bench_peers.py --python pfl=/work/venv-peers/bin/python \\
        --python flgo=/work/venv-peers/bin/python --repeats 3
    python simulations/bench_peers.py --sides loop,fedwa --scales 10x5 --rounds 2

A peer side whose package its interpreter cannot import is skipped with one line saying so.
This module imports only the standard library at the top: a worker process (``--worker``) pays
for its own side's imports and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCALES = {"10x5": (10, 5), "100x1": (100, 1), "1000x1": (1000, 1)}
SIDES = ("loop", "fedwa", "fedwa-batch", "fedwa-ray", "pfl", "flgo", "flower")
DEFAULT_SIDES = "loop,fedwa,fedwa-batch,pfl,flgo"
#: The package a peer side's interpreter must import (the others need fedwa itself).
PEER_PACKAGES = {"pfl": "pfl", "flgo": "flgo", "flower": "flwr", "fedwa-ray": "ray"}
BATCH_SIZE = 32
LR = 0.05
MOMENTUM = 0.9
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
RSS_PERIOD_S = 0.05
RESCAN_S = 1.0


def fedwa_sets(clients: int, steps: int, rounds: int) -> dict[str, Any]:
    """The workload as fedwa run-config keys (the other sides are given the same numbers)."""
    return {
        "dataset": "digits", "model": "mlp", "seed": 0,
        # Ratio 1 keeps a balanced pool (every class cut to the smallest count); iid splits it.
        "partition": "iid", "imbalance-ratio": 1.0, "server-val-fraction": 0.0,
        "num-clients": clients, "num-server-rounds": rounds, "fraction-train": 1.0,
        "fraction-evaluate": 0.0, "evaluation": "central",
        "local-steps": steps, "batch-size": BATCH_SIZE, "optimizer": "sgd", "lr": LR,
        "momentum": MOMENTUM, "weight-decay": 0.0, "lr-schedule": "constant", "device": "cpu",
    }


# --- the shared data file -------------------------------------------------------------------


def write_npz(path: Path, clients: int, steps: int, rounds: int) -> dict[str, Any]:
    """Write one scale's data and initial weights from fedwa's own builders; returns a summary.

    Keys: ``x`` (every client's examples, client after client, ``[n, 1, 8, 8]`` float32),
    ``y``, ``offsets`` (client ``i`` holds ``x[offsets[i]:offsets[i+1]]``), ``x_test``,
    ``y_test``, and ``w:<name>`` for every entry of the initial model's state dict.
    """
    import numpy as np

    from fedwa.run.config import resolve_config
    from fedwa.data.task import federated_data, make_model

    config = resolve_config(fedwa_sets(clients, steps, rounds))
    data = federated_data(config)
    parts = [data.client_data(pid) for pid in range(clients)]
    sizes = [len(x) for x, _ in parts]
    model = make_model(config, data)
    x_test, y_test = data.test_data()
    arrays = {
        "x": np.concatenate([x.numpy() for x, _ in parts]).astype(np.float32),
        "y": np.concatenate([y.numpy() for _, y in parts]).astype(np.int64),
        "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "x_test": x_test.numpy().astype(np.float32), "y_test": y_test.numpy().astype(np.int64),
        **{f"w:{k}": v.detach().numpy() for k, v in model.state_dict().items()},
    }
    np.savez(path, **arrays)
    return {"train_examples": int(sum(sizes)), "test_examples": int(len(y_test)),
            "client_sizes_min_max": [min(sizes), max(sizes)]}


def load_npz(path: str) -> dict[str, Any]:
    """The arrays of :func:`write_npz` as torch tensors (``init`` holds the state dict)."""
    import numpy as np
    import torch

    with np.load(path) as f:
        out = {k: torch.from_numpy(f[k]) for k in f.files if not k.startswith("w:")}
        out["init"] = {k[2:]: torch.from_numpy(f[k]) for k in f.files if k.startswith("w:")}
    return out


def mlp_like_fedwa(num_inputs: int, hidden: int, num_classes: int):  # noqa: ANN201
    """fedwa's ``mlp`` layers (fedwa/models: Flatten, 2 x Linear+ReLU, classifier), rebuilt
    with torch only, so a peer's process imports nothing of fedwa; the names match its state
    dict, so the initial weights load as they are."""
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(num_inputs, hidden)
            self.relu1 = nn.ReLU()
            self.fc2 = nn.Linear(hidden, hidden)
            self.relu2 = nn.ReLU()
            self.classifier = nn.Linear(hidden, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.relu2(self.fc2(self.relu1(self.fc1(self.flatten(x))))))

    return MLP


def build_mlp(arrays: dict[str, Any]):  # noqa: ANN201
    """fedwa's ``mlp`` with the run's initial weights, sized from the state dict."""
    init = arrays["init"]
    hidden, inputs = init["fc1.weight"].shape
    model = mlp_like_fedwa(int(inputs), int(hidden), int(init["classifier.weight"].shape[0]))()
    model.load_state_dict(init)
    return model


def test_accuracy(model, x, y) -> float:  # noqa: ANN001
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode, without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# --- workers: one side in its own process ---------------------------------------------------


def worker_loop(args: argparse.Namespace) -> dict[str, Any]:
    """FedAvg as a plain loop of fedwa's functions, one module reused for every client
    (:func:`plain_fedavg.fedavg_loop`, bench_overhead.py's loop too)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plain_fedavg import fedavg_loop

    from fedwa.run.config import resolve_config

    config = resolve_config(fedwa_sets(args.clients, args.steps, args.rounds))
    result = fedavg_loop(config, fresh_model_per_client=False)
    return {"rounds_s": result["rounds_s"], "accuracies": result["accuracies"]}


def worker_pfl(args: argparse.Namespace) -> dict[str, Any]:
    """FedAvg in pfl-research's in-process simulation, with its PyTorch model adapter."""
    import functools

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted, get_overall_value
    from pfl.model.pytorch import PyTorchModel

    arrays = load_npz(args.npz)
    offsets = arrays["offsets"].tolist()
    base = build_mlp(arrays)

    class Net(type(base)):  # pfl's adapter asks the module for loss() and metrics()
        def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
            self.eval() if eval else self.train()
            return torch.nn.functional.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict:  # noqa: A002
            self.eval()
            logits = self(x)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            correct = (logits.argmax(1) == y).sum()
            return {"loss": Weighted(float(loss), len(y)),
                    "accuracy": Weighted(float(correct), len(y))}

    net = Net()
    net.load_state_dict(base.state_dict())
    # One pass over a client's data gives ceil(n / 32) batches; pfl stops a pass at
    # local_num_steps but does not start a second, so the scale must fit in one pass.
    fewest = min(offsets[i + 1] - offsets[i] for i in range(args.clients))
    if -(-fewest // BATCH_SIZE) < args.steps:
        raise SystemExit(f"pfl driver: a client with {fewest} examples makes fewer than "
                         f"{args.steps} steps of {BATCH_SIZE} in one pass")
    rng = np.random.default_rng(0)

    def user_dataset(user_id: int) -> Dataset:
        # Fresh order every time the user is sampled (pfl's Dataset iterates in order).
        lo, hi = offsets[user_id], offsets[user_id + 1]
        order = torch.from_numpy(rng.permutation(hi - lo)) + lo
        return Dataset((arrays["x"][order], arrays["y"][order]), user_id=user_id)

    users = list(range(args.clients))
    training = FederatedDataset(user_dataset, get_user_sampler("minimize_reuse", users))
    model = PyTorchModel(
        model=net,
        local_optimizer_create=functools.partial(torch.optim.SGD, momentum=MOMENTUM),
        # FedAvg: the averaged difference applied with step 1 is the weighted model average.
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=training, val_data=None,
                               postprocessors=[WeightByDatapoints()])
    accuracies: list[float] = []

    class Record(TrainingProcessCallback):
        """Keeps the central accuracy that the evaluation callback (listed before) reported.

        pfl's callback evaluates the initial model before training (its figures arrive with
        iteration 0's metrics) and then the model after iterations 1 .. R-1, i.e. after rounds
        2 .. R: the last figure is the final model's, as on the other sides.
        """

        def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Metrics]:
            for name, value in aggregate_metrics:
                if str(name) == "Central val | accuracy" and central_iteration > 0:
                    accuracies.append(float(get_overall_value(value)))
            return False, Metrics()

    started = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=args.rounds,
                                           evaluation_frequency=1,
                                           train_cohort_size=args.clients, val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=LR, local_num_epochs=None,
                                              local_num_steps=args.steps,
                                              local_batch_size=BATCH_SIZE),
        model_eval_params=NNEvalHyperParams(local_batch_size=1024),
        callbacks=[CentralEvaluationCallback(Dataset((arrays["x_test"], arrays["y_test"])),
                                             model_eval_params=NNEvalHyperParams(
                                                 local_batch_size=1024)),
                   Record()])
    return {"rounds_s": time.perf_counter() - started, "accuracies": accuracies,
            "final_check": test_accuracy(net, arrays["x_test"], arrays["y_test"])}


#: FLGo's task configuration: the benchmark module FLGo copies into its task folder. It reads
#: the arrays from the file named by BENCH_PEERS_NPZ.
FLGO_CONFIG = '''
import os
import sys

import numpy as np
import torch
import torch.utils.data

sys.path.insert(0, os.environ["BENCH_PEERS_DIR"])
from bench_peers import build_mlp, load_npz  # noqa: E402

_arrays = load_npz(os.environ["BENCH_PEERS_NPZ"])
_off = _arrays["offsets"].tolist()
# One dataset per client: FLGo's direct task keeps this split as it is.
train_data = [torch.utils.data.TensorDataset(_arrays["x"][a:b], _arrays["y"][a:b])
              for a, b in zip(_off[:-1], _off[1:])]
test_data = torch.utils.data.TensorDataset(_arrays["x_test"], _arrays["y_test"])
val_data = None


def DataLoader(dataset, batch_size=64, **kwargs):
    # A new order every pass over a client's data, as the other sides do.
    return torch.utils.data.DataLoader(dataset, batch_size=int(batch_size), shuffle=True, **kwargs)


def data_to_device(batch, device):
    return batch[0].to(device), batch[1].to(device)


def compute_loss(model, batch, device):
    x, y = data_to_device(batch, device)
    return {"loss": torch.nn.functional.cross_entropy(model(x), y)}


@torch.no_grad()
def eval(model, loader, device):
    correct, loss, n = 0.0, 0.0, 0
    for batch in loader:
        x, y = data_to_device(batch, device)
        logits = model(x)
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        n += len(y)
    return {"accuracy": correct / n, "loss": loss / n}


def get_model(*args, **kwargs):
    return build_mlp(_arrays)
'''


def worker_flgo(args: argparse.Namespace) -> dict[str, Any]:
    """FedAvg in FLGo: a task from the per-client arrays, its fedavg, central evaluation."""
    import torch

    torch.set_num_threads(1)
    import flgo
    import flgo.algorithm.fedavg as fedavg
    from flgo.experiment.logger import BasicLogger

    work = Path(tempfile.mkdtemp(prefix="bench-flgo-"))
    config_file = work / "digits_config.py"
    config_file.write_text(FLGO_CONFIG)
    os.environ["BENCH_PEERS_NPZ"] = str(Path(args.npz).resolve())
    os.environ["BENCH_PEERS_DIR"] = str(Path(__file__).resolve().parent)
    os.chdir(work)  # FLGo names the task module by its path relative to the working directory
    sys.path.insert(0, str(work))
    task = flgo.gen_direct_task_from_file("digits_task", str(config_file), target_path=str(work))
    accuracies: list[float] = []
    stamps: list[float] = []

    class CentralLogger(BasicLogger):
        """Evaluates the global model on the server's test set only (no client metrics)."""

        def initialize(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_once(self, *args: Any, **kwargs: Any) -> None:
            accuracies.append(float(self.coordinator.test()["accuracy"]))
            stamps.append(time.perf_counter())

    option = {
        "num_rounds": args.rounds, "num_steps": args.steps, "batch_size": BATCH_SIZE,
        "learning_rate": LR, "momentum": MOMENTUM, "weight_decay": 0.0,
        "learning_rate_decay": 1.0, "sample": "full", "proportion": 1.0,
        "train_holdout": 0.0, "test_holdout": 0.0, "eval_interval": 1, "seed": 0,
        "gpu": [], "torch_num_threads": 1, "test_batch_size": 1024, "no_tqdm": True,
        "log_level": "WARNING", "no_log_console": True,
    }
    runner = flgo.init(task, fedavg, option=option, Logger=CentralLogger)
    runner.run()
    # The first evaluation is of the initial model, before round 1.
    return {"rounds_s": stamps[-1] - stamps[0], "accuracies": accuracies[1:]}


def worker_flower(args: argparse.Namespace) -> dict[str, Any]:
    """A quickstart-style Flower app (FedAvg, central evaluate_fn) in Flower's simulation."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    torch.set_num_threads(1)
    arrays = load_npz(args.npz)
    offsets = arrays["offsets"].tolist()
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        x = arrays["x"][offsets[pid]:offsets[pid + 1]]
        y = arrays["y"][offsets[pid]:offsets[pid + 1]]
        net = build_mlp(arrays)
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        net.train()
        optimiser = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
        generator = torch.Generator().manual_seed(int(msg.content["config"]["server-round"])
                                                  * 10_007 + pid)
        steps = 0
        while steps < args.steps:
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), BATCH_SIZE):
                idx = order[start:start + BATCH_SIZE]
                optimiser.zero_grad()
                torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                optimiser.step()
                steps += 1
                if steps == args.steps:
                    break
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()),
                              "metrics": MetricRecord({"num-examples": len(x)})})
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()
    accuracies: list[float] = []
    clock: dict[str, float] = {}

    def central(server_round: int, record: ArrayRecord) -> MetricRecord:
        if server_round == 0:
            clock["start"] = time.perf_counter()
            return MetricRecord({})
        net = build_mlp(arrays)
        net.load_state_dict(record.to_torch_state_dict())
        accuracies.append(test_accuracy(net, arrays["x_test"], arrays["y_test"]))
        clock["end"] = time.perf_counter()
        return MetricRecord({"accuracy": accuracies[-1]})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                          min_train_nodes=args.clients, min_available_nodes=args.clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(build_mlp(arrays).state_dict()),
                       num_rounds=args.rounds, evaluate_fn=central)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return {"rounds_s": clock["end"] - clock["start"], "accuracies": accuracies}


WORKERS = {"loop": worker_loop, "pfl": worker_pfl, "flgo": worker_flgo, "flower": worker_flower}


# --- the parent: process tree, memory, turns -------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int]]:
    """``pid -> (ppid, session id)`` of every process /proc shows."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone between listdir and open
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        fields = stat[stat.rindex(b")") + 2:].split()
        table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


def tree_members(root: int) -> set[int]:
    """``root``, its descendants, and anything left in its session (a daemon such as Ray's
    raylet that moved to init keeps the session it was started in)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    members = {pid for pid, (_, sid) in table.items() if sid == root}
    stack, seen = [root], {root}
    while stack:
        pid = stack.pop()
        members.add(pid)
        for child in children.get(pid, []):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return members


def rss_bytes(pids: set[int]) -> int:
    """Summed resident memory of ``pids`` (those that have exited count 0)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def tree_rss(root: int) -> int:
    """Summed RSS of :func:`tree_members`."""
    return rss_bytes(tree_members(root))


class TreeSampler:
    """Peak RSS of a process tree, sampled cheaply.

    Listing every process costs ~20 ms here (a full /proc scan), as much CPU as the sampled
    sides need to train, so the member set is refreshed every ``RESCAN_S`` only; in between
    only the known members' ``statm`` is read. A process that lives less than ``RESCAN_S``
    can be missed: the sides' processes live for the whole run.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.members = {root}
        self.scanned = float("-inf")
        self.peak = 0

    def sample(self) -> None:
        now = time.monotonic()
        if now - self.scanned >= RESCAN_S:
            self.members = tree_members(self.root)
            self.scanned = now
        self.peak = max(self.peak, rss_bytes(self.members))


def run_timed(command: list[str], env: dict[str, str], cwd: Path,
              timeout_s: float) -> dict[str, Any]:
    """Run ``command`` as a new session; its wall time, peak tree RSS, exit status, output."""
    import resource

    log = cwd / "output.log"
    # The runs are one after another, so the growth of this process's children's CPU time is
    # the run's: the worker and every descendant it waited for (user + system).
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = TreeSampler(proc.pid)
        while proc.poll() is None:
            sampler.sample()
            if time.perf_counter() - started > timeout_s:
                os.killpg(proc.pid, 9)
                proc.wait()
                break
            time.sleep(RSS_PERIOD_S)
        wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    # Ray leaves its daemons running after the driver exits: end this run's session only.
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": sampler.peak / 2**20, "returncode": proc.returncode,
            "output_tail": log.read_text(errors="replace")[-2000:]}


def side_command(side: str, python: str, scale: str, rounds: int, npz: Path,
                 run_dir: Path) -> list[str]:
    """The command line of one run of ``side``."""
    clients, steps = SCALES[scale]
    if side.startswith("fedwa"):
        sets = {**fedwa_sets(clients, steps, rounds), "output-dir": str(run_dir),
                "run-name": "run", "backend": "ray" if side == "fedwa-ray" else "local",
                "batch-clients": side == "fedwa-batch"}
        command = [python, "-m", "fedwa.cli", "run", "--quiet"]
        for key, value in sets.items():
            command += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        return command
    return [python, str(Path(__file__).resolve()), "--worker", side, "--npz", str(npz),
            "--clients", str(clients), "--steps", str(steps), "--rounds", str(rounds),
            "--result", str(run_dir / "result.json")]


def side_result(side: str, run_dir: Path) -> dict[str, Any]:
    """``rounds_s`` and ``accuracies`` as the side reported them."""
    if side.startswith("fedwa"):
        records = [json.loads(line) for line in
                   (run_dir / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rounds = [r for r in records if r["round"] > 0]
        return {"rounds_s": sum(r["seconds"] for r in rounds),
                "accuracies": [r["accuracy"] for r in rounds]}
    return json.loads((run_dir / "result.json").read_text())


def missing_package(side: str, python: str) -> str | None:
    """Why ``side`` cannot run with ``python`` (one line), else ``None``."""
    package = PEER_PACKAGES.get(side)
    probe = (f"import importlib.util, sys; sys.exit(importlib.util.find_spec({package!r}) "
             "is None)") if package else "import sys"
    found = subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    if found:
        return None
    return (f"{side}: skipped, {python} cannot import {package} "
            f"(pass --python {side}=/path/to/python of a venv that has it)")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(runs: list[dict[str, Any]], sides: list[str], scale: str) -> list[dict[str, Any]]:
    """Per side at one scale: medians of the ok runs and the wall-time ratios."""
    rows = []
    for side in sides:
        ok = [r for r in runs if r["side"] == side and r["scale"] == scale and r["ok"]]
        if not ok:
            continue
        rows.append({"side": side, "runs": len(ok),
                     "wall_s": median([r["wall_s"] for r in ok]),
                     "rounds_s": median([r["rounds_s"] for r in ok]),
                     "cpu_s": median([r.get("cpu_s", float("nan")) for r in ok]),
                     "peak_rss_mb": median([r["peak_rss_mb"] for r in ok]),
                     "accuracy": median([r["accuracy"] for r in ok])})
    base = {row["side"]: row["wall_s"] for row in rows}
    for row in rows:
        row["x_loop"] = row["wall_s"] / base["loop"] if "loop" in base else None
        row["x_pfl"] = row["wall_s"] / base["pfl"] if "pfl" in base else None
    return rows


def table(rows: list[dict[str, Any]], scale: str, rounds: int) -> str:
    """A Markdown table of :func:`summarise`'s rows."""
    clients, steps = SCALES[scale]
    lines = [f"{clients} clients x {steps} step(s), {rounds} rounds",
             "| side | runs | wall s | rounds s | CPU s | peak RSS MB | final acc | wall / loop "
             "| wall / pfl |", "|---|---|---|---|---|---|---|---|---|"]
    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"
    for r in rows:
        lines.append(f"| {r['side']} | {r['runs']} | {r['wall_s']:.2f} | {r['rounds_s']:.2f} "
                     f"| {r['cpu_s']:.2f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['accuracy']:.4f} | {ratio(r['x_loop'])} "
                     f"| {ratio(r['x_pfl'])} |")
    return "\n".join(lines)


def parse_pythons(values: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    pythons = {}
    for value in values:
        side, sep, path = value.partition("=")
        if not sep or side not in SIDES:
            parser.error(f"--python {value!r}: SIDE=/path/to/python with SIDE one of "
                         + ", ".join(SIDES))
        pythons[side] = path
    return pythons


def run_bench(sides: list[str], scales: list[str], rounds: int, repeats: int,
              pythons: dict[str, str], timeout_s: float, work: Path) -> dict[str, Any]:
    """Every available side at every scale, in turns; the raw runs and per-scale tables."""
    env = {**os.environ, **FLOWER_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [
               os.environ.get("PYTHONPATH")])])}
    skipped = {}
    available = []
    for side in sides:
        reason = missing_package(side, pythons.get(side, sys.executable))
        if reason:
            print(reason, flush=True)
            skipped[side] = reason
        else:
            available.append(side)
    runs: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    for scale in scales:
        clients, steps = SCALES[scale]
        npz = work / f"digits-{scale}.npz"
        data[scale] = write_npz(npz, clients, steps, rounds)
        for repeat in range(repeats):
            for side in available:
                python = pythons.get(side, sys.executable)
                run_dir = Path(tempfile.mkdtemp(prefix=f"{side}-{scale}-", dir=work))
                timed = run_timed(side_command(side, python, scale, rounds, npz, run_dir), env,
                                  run_dir, timeout_s)
                run = {"side": side, "scale": scale, "repeat": repeat, "python": python,
                       **{k: timed[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "returncode")}}
                try:
                    result = side_result(side, run_dir)
                    run.update(ok=timed["returncode"] == 0, rounds_s=result["rounds_s"],
                               accuracy=result["accuracies"][-1],
                               accuracies=result["accuracies"])
                except (OSError, KeyError, IndexError, ValueError):
                    run.update(ok=False, output_tail=timed["output_tail"])
                runs.append(run)
                if run["ok"]:
                    print(f"{scale} {side} #{repeat}: wall {run['wall_s']:.2f}s rounds "
                          f"{run['rounds_s']:.2f}s peak {run['peak_rss_mb']:.0f} MB acc "
                          f"{run['accuracy']:.4f}", flush=True)
                else:
                    print(f"{scale} {side} #{repeat}: FAILED (exit {timed['returncode']}):\n"
                          f"{timed['output_tail'][-800:]}", flush=True)
    summary = {scale: summarise(runs, available, scale) for scale in scales}
    return {"rounds": rounds, "repeats": repeats, "scales": scales, "sides": available,
            "skipped": skipped, "data": data, "summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default=DEFAULT_SIDES,
                        help="comma-separated subset of " + ", ".join(SIDES))
    parser.add_argument("--scales", default=",".join(SCALES),
                        help="comma-separated subset of " + ", ".join(SCALES))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--python", action="append", default=[], metavar="SIDE=PATH",
                        help="the interpreter of a side (e.g. a venv with pfl and flgo)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--json", default=str(REPO / "simulations" / "results" / "bench_peers"
                                              / "bench_peers.json"),
                        help="where the raw runs go ('' for nowhere)")
    # A worker: one side's run, in this fresh process.
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--npz", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        Path(args.result).write_text(json.dumps(result))
        return 0
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    if not sides or any(s not in SIDES for s in sides):
        parser.error(f"--sides {args.sides!r}: any of {', '.join(SIDES)}")
    if not scales or any(s not in SCALES for s in scales):
        parser.error(f"--scales {args.scales!r}: any of {', '.join(SCALES)}")
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    figures = run_bench(sides, scales, args.rounds, args.repeats,
                        parse_pythons(args.python, parser), args.timeout, work)
    for scale in scales:
        print("\n" + table(figures["summary"][scale], scale, args.rounds))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        print(f"\nraw runs: {args.json}")
    return 0 if all(r["ok"] for r in figures["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
