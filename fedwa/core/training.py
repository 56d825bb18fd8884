"""Local training of one client: SGD (or Adam/AdamW) over tensors held in memory, sliced into
minibatches.

Data stays as tensors and is sliced by index (a per-sample DataLoader is ~10x slower on these
CPUs). Every source of randomness is a seeded ``torch.Generator``, so one client, round and seed
always see the same batches.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

import torch
from torch import nn

Regulariser = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class LocalTrainSpec:
    """How much and how a client trains in one round.

    ``steps > 0`` fixes the number of SGD steps (epochs are then ignored); otherwise the client
    makes ``epochs`` passes over its data.

    ``optimizer`` is ``"sgd"`` (``lr``, ``momentum``, ``weight_decay`` as coupled L2),
    ``"adam"`` (``lr``, ``weight_decay`` as coupled L2; momentum is not used) or ``"adamw"``
    (``lr``, decoupled ``weight_decay``); Adam and AdamW use torch's default betas (0.9, 0.999)
    and eps (1e-8). Every call of :func:`train_local` creates a fresh optimiser: no state
    carries over from one round to the next (DIMAT's "fresh optimiser after each merge").
    """

    epochs: int = 1
    steps: int = 0
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    proximal_mu: float = 0.0
    # The lr follows the run's global progress (0 = start of training, 1 = end), not the
    # round: the round covers [progress_start, progress_end) and the lr moves step by step.
    lr_schedule: str = "constant"
    progress_start: float = 0.0
    progress_end: float = 1.0
    optimizer: str = "sgd"


OPTIMIZERS = ("sgd", "adam", "adamw")


def optimiser_state(optimiser: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as flat tensors, ``'<param index>.<name>'``.

    E.g. ``'3.momentum_buffer'`` for SGD, ``'3.exp_avg'``, ``'3.exp_avg_sq'`` and ``'3.step'``
    for Adam: what a client keeps across rounds (:func:`train_local`'s ``optimizer_state``),
    in a form a Flower ``ArrayRecord`` carries. Hyperparameters are not included: they come
    from the round's :class:`LocalTrainSpec`.
    """
    flat: dict[str, torch.Tensor] = {}
    for index, entries in optimiser.state_dict()["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                flat[f"{index}.{name}"] = value.detach().clone()
            elif isinstance(value, (int, float)):
                flat[f"{index}.{name}"] = torch.tensor(float(value))
    return flat


def load_optimiser_state(optimiser: torch.optim.Optimizer,
                         flat: Mapping[str, torch.Tensor]) -> None:
    """Continue ``optimiser`` from :func:`optimiser_state`'s tensors (its own hyperparameters).

    Raises
    ------
    ValueError
        If an entry names a parameter index the optimiser does not have, or is not
        ``'<index>.<name>'``: the kept state belongs to another model.
    """
    current = optimiser.state_dict()
    count = sum(len(group["params"]) for group in current["param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or not name or int(index) >= count:
            raise ValueError(f"optimiser state entry {key!r} does not fit a model with "
                             f"{count} parameters")
        state.setdefault(int(index), {})[name] = value.clone()
    optimiser.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def make_optimiser(params, spec: LocalTrainSpec) -> torch.optim.Optimizer:  # noqa: ANN001
    """A fresh optimiser of ``spec.optimizer`` over ``params`` (see :class:`LocalTrainSpec`)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                               weight_decay=spec.weight_decay)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}: one of {', '.join(OPTIMIZERS)}")


@functools.lru_cache(maxsize=16)
def resolve_device(name: str) -> torch.device:
    """``auto`` means cuda when torch sees one, else the CPU (asked once per process: asking
    costs ~10 us, more than a tiny client's message otherwise spends in this module)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def configure_threads(device: torch.device) -> None:
    """One torch thread per process on CPU: with two, epochs ran 5-40x slower in bursts here."""
    if device.type == "cpu" and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def schedule_lr(base_lr: float, schedule: str, progress: float) -> float:
    """The learning rate at a point of the whole run (``progress`` in [0, 1]).

    ``cosine`` decays from ``base_lr`` at the start towards 0 at the end.
    """
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def round_lr(base_lr: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """The client learning rate at the start of a server round (1-based)."""
    return schedule_lr(base_lr, schedule, (server_round - 1) / num_rounds)


def batch_order(num_examples: int, batch_size: int, spec: LocalTrainSpec,
                generator: torch.Generator) -> list[torch.Tensor]:
    """The index batches of one round: whole epochs, or exactly ``spec.steps`` batches.

    A trailing batch of one example is dropped: BatchNorm cannot train on a single example.
    """
    if num_examples == 0:
        return []
    batches: list[torch.Tensor] = []
    wanted = spec.steps if spec.steps > 0 else None
    epochs = 0
    while True:
        perm = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, batch_size):
            idx = perm[start:start + batch_size]
            if len(idx) < 2 and batch_size > 1 and num_examples > 1:
                continue
            batches.append(idx)
            if wanted is not None and len(batches) == wanted:
                return batches
        epochs += 1
        if wanted is None and epochs == spec.epochs:
            return batches


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: LocalTrainSpec,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    regulariser: Regulariser | None = None,
    optimizer_state: MutableMapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``(x, y)`` with a fresh optimiser (``spec.optimizer``).

    Parameters
    ----------
    model : nn.Module
        Trained in place; moved to ``device``.
    x, y : torch.Tensor
        The client's examples and labels.
    spec : LocalTrainSpec
        Epochs or steps, batch size and optimiser settings.
    seed : int
        Seeds the batch order (derive it from run seed, round and client).
    device : torch.device or str
        Where to train.
    regulariser : callable, optional
        Extra loss term ``f(model) -> scalar tensor`` added at every step.
    optimizer_state : mutable mapping, optional
        A client that keeps its optimiser across rounds (HWA's local SGD learners): the state
        to continue from (:func:`optimiser_state`'s tensors; empty = a fresh optimiser), and
        replaced in place by the state after this round. ``None`` (default): a fresh
        optimiser that is dropped afterwards, as in FedAvg.

    Returns
    -------
    dict
        ``loss`` (mean training loss over the steps), ``steps``, ``examples`` (examples seen),
        ``seconds``.
    """
    started = time.perf_counter()
    device = torch.device(device)
    model.to(device).train()
    anchor = None
    if spec.proximal_mu > 0:
        # FedProx (Li et al. 2020): mu/2 * ||w - w_global||^2 keeps the client near the model
        # it received.
        anchor = [p.detach().clone() for p in model.parameters()]
    optimiser = make_optimiser(model.parameters(), spec)
    if optimizer_state:
        load_optimiser_state(optimiser, optimizer_state)
    generator = torch.Generator().manual_seed(seed)
    batches = batch_order(len(x), spec.batch_size, spec, generator)
    x_dev, y_dev = x.to(device), y.to(device)
    total_loss = torch.zeros((), device=device)
    seen = 0
    per_step = spec.lr_schedule != "constant"
    span = spec.progress_end - spec.progress_start
    for step, idx in enumerate(batches):
        if per_step:
            lr = schedule_lr(spec.lr, spec.lr_schedule,
                             spec.progress_start + span * step / len(batches))
            for group in optimiser.param_groups:
                group["lr"] = lr
        idx = idx.to(device)
        loss = nn.functional.cross_entropy(model(x_dev[idx]), y_dev[idx])
        total_loss += loss.detach()
        if anchor is not None:
            loss = loss + 0.5 * spec.proximal_mu * sum(
                (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
        if regulariser is not None:
            loss = loss + regulariser(model)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        seen += len(idx)
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(optimiser_state(optimiser))
    steps = len(batches)
    return {
        "loss": float(total_loss) / max(steps, 1),
        "steps": float(steps),
        "examples": float(seen),
        "seconds": time.perf_counter() - started,
    }


def client_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed per (run, round, client)."""
    return (run_seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63 - 1)


def local_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                   device: torch.device | str = "cpu") -> tuple[float, dict[str, torch.Tensor]]:
    """Mean cross-entropy over ``(x, y)`` and its gradient, for every state-dict entry.

    BatchNorm runs in train mode (batch statistics over chunks of ``batch_size``), as during
    training; buffers get zero "gradients" so the result has the model's names and shapes.
    The model's own buffers are restored afterwards.
    """
    device = torch.device(device)
    model.to(device).train()
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device, dtype=torch.float64)
    x_dev, y_dev = x.to(device), y.to(device)
    for start in range(0, len(x), batch_size):
        xb, yb = x_dev[start:start + batch_size], y_dev[start:start + batch_size]
        loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum") / len(x)
        loss.backward()
        total += loss.detach()
    params = dict(model.named_parameters())
    gradients = {}
    for name, value in model.state_dict().items():
        grad = params[name].grad if name in params else None
        gradients[name] = (grad.detach().cpu().clone() if grad is not None
                           else torch.zeros_like(value, device="cpu"))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(saved[name])
    return float(total), gradients
