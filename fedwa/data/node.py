"""What one node trains and evaluates on: its partition of the run's data, or its own folder.

In simulation every node's data is a partition of the run's dataset. A real SuperNode may hold
its own files instead: start it with ``--node-config "partition-id=I num-partitions=N
data-dir='/data/site-a'"`` and put two files there:

- ``train.npz`` with ``x`` (float32, ``[n, C, H, W]``, preprocessed as the run's ``dataset``
  is: the model's input shape) and ``y`` (integer labels in ``0 .. num_classes - 1``);
- ``test.npz`` (same arrays, optional): the node's own test split.

The same two files make the ``npz`` dataset of a simulation (``dataset = "npz"``,
``data-root`` = the folder; there ``test.npz`` is required), checked by the same
:func:`check_examples`, so a simulation and a deployment can read the very same files.

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

from fedwa.common.errors import FedwaError

DATA_DIR_KEY = "data-dir"


@dataclass(frozen=True)
class NodeData:
    """A node's training examples and, when it has one, its own test split."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None


def check_examples(x: Any, y: Any, where: str, num_classes: int | None = None,
                   input_shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one split of examples and return it as ``float32`` images and ``int64`` labels.

    The one set of rules for examples fedwa did not make itself: a SuperNode's ``data-dir``
    files, the ``npz`` dataset and a user's dataset function.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        Images ``[n, C, H, W]`` of a floating-point dtype (converted to float32), all finite.
    y : torch.Tensor or numpy.ndarray
        ``n`` labels of an integer dtype.
    where : str
        What the examples are ("train.npz", "the train split"), named in the message.
    num_classes : int, optional
        When given, labels must lie in ``0 .. num_classes - 1``.
    input_shape : tuple of int, optional
        When given, ``x.shape[1:]`` must equal it.

    Returns
    -------
    tuple of torch.Tensor
        ``(x, y)``; tensors that already had these dtypes are not copied.

    Raises
    ------
    FedwaError
        Naming ``where`` and the first rule broken.
    """
    arrays = []
    for name, a in (("x", x), ("y", y)):
        if isinstance(a, np.ndarray):
            if a.dtype == object or a.dtype.kind in "USV":
                raise FedwaError(f"{where}: {name} has dtype {a.dtype}, not numbers")
            a = torch.from_numpy(np.ascontiguousarray(a))
        elif not isinstance(a, torch.Tensor):
            raise FedwaError(f"{where}: {name} is a {type(a).__name__}; expected a torch "
                             "tensor or a numpy array")
        arrays.append(a)
    x, y = arrays
    if not x.is_floating_point():
        # Raw pixels (uint8) would train, badly: the scale is the user's to choose.
        raise FedwaError(f"{where}: x has dtype {x.dtype}; expected floating point (float32), "
                         "already scaled and normalised (e.g. x / 255)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise FedwaError(f"{where}: y has dtype {y.dtype}; expected integer class labels")
    if x.ndim != 4 or (input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape)):
        shape = ", ".join(map(str, input_shape)) if input_shape is not None else "C, H, W"
        raise FedwaError(f"{where}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; "
                         f"expected x of [n, {shape}] and n > 0 labels")
    if y.ndim != 1 or len(x) != len(y) or not len(y):
        raise FedwaError(f"{where}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; "
                         "expected as many labels as images (y of shape [n], n > 0)")
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise FedwaError(f"{where}: x holds NaN or infinite values")
    y = y.to(torch.int64)
    low, high = int(y.min()), int(y.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        allowed = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise FedwaError(f"{where}: labels run from {low} to {high}; y must hold whole "
                         f"numbers in {allowed}")
    return x, y


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` file (``x``, ``y`` and optionally ``class_names``).

    Raises
    ------
    FedwaError
        If the file is not a readable npz archive or lacks ``x`` or ``y``.
    """
    try:
        # allow_pickle stays off: a data file must never run code.
        with np.load(path, allow_pickle=False) as arrays:
            found = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError) as err:
        raise FedwaError(f"{path} is not a readable .npz file ({err})") from None
    if "x" not in found or "y" not in found:
        raise FedwaError(f"{path} must hold arrays 'x' and 'y', it has {sorted(found)}")
    return found


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
        arrays = read_npz(path)
        parts.append(check_examples(arrays["x"], arrays["y"], str(path), num_classes,
                                    tuple(input_shape)))
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
