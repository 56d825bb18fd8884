"""Model, data and training of the stock app (Flower quickstart style, on scikit-learn's digits).

Everything is small and deterministic so that two strategies run in one simulation see the same
client training: the same global model and round give bit-identical client models.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

#: Test examples held back per class; the rest is split between the clients.
TEST_PER_CLASS = 20


class Net(nn.Module):
    """A two-layer perceptron for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.reshape(len(x), -1))))


def initial_model() -> Net:
    """The run's starting model, the same in every call."""
    torch.manual_seed(0)
    return Net()


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(bunch.target, dtype=torch.int64)


def split() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training pool and of the test set (fixed)."""
    _, y = _digits()
    rng = np.random.default_rng(0)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y.numpy() == c))[:TEST_PER_CLASS]
                                   for c in range(10)]))
    train = np.setdiff1d(np.arange(len(y)), test)
    return rng.permutation(train), test


def load_partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s examples: a share of the pool proportional to ``id + 1``, so
    clients hold different numbers of examples (example weights then matter), cut to 90 at
    most to keep training quick."""
    x, y = _digits()
    train, _ = split()
    weights = np.arange(1, num_partitions + 1)
    bounds = np.concatenate([[0], np.cumsum(weights)]) * len(train) // weights.sum()
    mine = train[bounds[partition_id]:bounds[partition_id + 1]][: 30 * (partition_id + 1)]
    return x[mine], y[mine]


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The server's held-out test set."""
    x, y = _digits()
    _, test = split()
    return x[test], y[test]


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
          seed: int, regulariser: Callable[[nn.Module], torch.Tensor] | None = None) -> float:
    """SGD on minibatches of 16 in a seeded order; the mean loss of the last epoch.

    ``regulariser(net)``, when given, is added to every batch's loss (WSA's scope term)."""
    torch.set_num_threads(1)  # bit-identical results run to run
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    total = 0.0
    for _ in range(epochs):
        total = 0.0
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 16):
            batch = order[start:start + 16]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            if regulariser is not None:
                loss = loss + regulariser(net)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
    return total / len(x)


def test(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean loss and accuracy."""
    net.eval()
    with torch.no_grad():
        logits = net(x)
        loss = float(nn.functional.cross_entropy(logits, y))
        accuracy = float((logits.argmax(1) == y).float().mean())
    return loss, accuracy
