"""What one node trains and evaluates on: its partition of the run's data, or its own folder.

In simulation every node's data is a partition of the run's dataset. A real SuperNode may hold
its own files instead: start it with ``--node-config "partition-id=I num-partitions=N
data-dir='/data/site-a'"`` and put two files there:

- ``train.npz`` with ``x`` (float32, ``[n, C, H, W]``, preprocessed as the run's ``dataset``
  is: the model's input shape) and ``y`` (integer labels in ``0 .. num_classes - 1``);
- ``test.npz`` (same arrays, optional): the node's own test split.

With ``evaluation = "federated"`` the server holds no test set: every node evaluates the
global model on its test split (``test.npz``, or a stratified ``local-test-fraction`` of its
data, held out from training and seeded by run seed and partition) and returns per-class
counts, which the server adds up into the same metrics a central evaluation reports.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedwa.errors import FedwaError

DATA_DIR_KEY = "data-dir"


@dataclass(frozen=True)
class NodeData:
    """A node's training examples and, when it has one, its own test split."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None


@functools.lru_cache(maxsize=8)
def _load_folder(folder: str, stamp: float, input_shape: tuple[int, ...],
                 num_classes: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """``train.npz`` (and ``test.npz`` if present) of ``folder``, checked; cached per mtime."""
    parts = []
    for name in ("train.npz", "test.npz"):
        path = Path(folder) / name
        if not path.is_file():
            if name == "train.npz":
                raise FedwaError(f"node_config data-dir = {folder!r}: there is no {name}; "
                                 "expected train.npz (and optionally test.npz) with arrays "
                                 "x and y")
            continue
        with np.load(path) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise FedwaError(f"{path} must hold arrays 'x' and 'y', it has "
                                 f"{sorted(arrays.files)}")
            x, y = np.asarray(arrays["x"], dtype=np.float32), np.asarray(arrays["y"])
        if tuple(x.shape[1:]) != tuple(input_shape) or len(x) != len(y) or not len(y):
            raise FedwaError(f"{path}: x has shape {x.shape} and y {y.shape}; expected x of "
                             f"[n, {', '.join(map(str, input_shape))}] and n > 0 labels")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
            raise FedwaError(f"{path}: y must hold whole numbers in 0..{num_classes - 1}")
        parts.append((torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))))
    return tuple(parts)


def held_out(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A boolean mask of a stratified ``fraction`` of ``y``: at least one example of every
    class with two or more, none of a class with one (it must stay trainable)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(y), dtype=torch.bool)
    for label in torch.unique(y):
        where = torch.nonzero(y == label).flatten()
        if len(where) < 2:
            continue
        take = min(len(where) - 1, max(1, round(fraction * len(where))))
        mask[where[torch.randperm(len(where), generator=generator)[:take]]] = True
    return mask


def node_data(config: Mapping[str, Any], node_config: Mapping[str, Any], data: Any,
              partition_id: int) -> NodeData:
    """The node's examples: its ``data-dir`` files or its partition; with federated evaluation
    and no test file, a held-out test split is taken from them (and not trained on)."""
    folder = node_config.get(DATA_DIR_KEY)
    test = None
    if folder:
        folder = str(Path(str(folder)).expanduser().resolve())
        if not Path(folder).is_dir():
            raise FedwaError(f"node_config data-dir = {folder!r} is not a folder")
        # New or rewritten files must not be served from the cache.
        stamp = max((p.stat().st_mtime for p in Path(folder).glob("*.npz")), default=0.0)
        parts = _load_folder(folder, stamp, tuple(data.input_shape), int(data.num_classes))
        (x, y), test = parts[0], (parts[1] if len(parts) > 1 else None)
    else:
        x, y = data.client_data(partition_id)
    if config.get("evaluation") != "federated":
        return NodeData(x, y)
    if test is not None:
        return NodeData(x, y, *test)
    mask = held_out(y, float(config["local-test-fraction"]),
                    int(config["seed"]) * 1_000_003 + partition_id)
    return NodeData(x[~mask], y[~mask], x[mask], y[mask])
