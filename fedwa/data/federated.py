"""The federated view of a dataset: long-tailed pool, server validation split, client shards."""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedwa.data.datasets import Dataset, load_dataset
from fedwa.data.longtail import long_tail_indices
from fedwa.data.partition import partition_indices
from fedwa.common.errors import ConfigError, FedwaError


class PartitionIdError(FedwaError, IndexError):
    """A client asked for a partition id outside ``0 .. num_clients - 1``."""


def _frozen(a: np.ndarray) -> np.ndarray:
    # Index arrays are shared through the build cache; make accidental writes fail loudly.
    a = np.asarray(a, dtype=np.int64)
    a.setflags(write=False)
    return a


def _counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(labels, minlength=num_classes)]


@dataclass
class FederatedData:
    """A dataset split for one federated run.

    All index arrays are positions into ``dataset.x_train`` and are read-only;
    the object may be shared through the :func:`build_federated_data` cache.

    Attributes
    ----------
    dataset : Dataset
        The full dataset (its test set is never long-tailed).
    train_indices : numpy.ndarray
        The long-tailed training pool minus the server validation split.
    val_indices : numpy.ndarray
        The server validation split, stratified over classes; may be empty.
    client_indices : list of numpy.ndarray
        One array per client, drawn from `train_indices`.
    settings : dict
        The build arguments, reported by :meth:`summary`.
    """

    dataset: Dataset
    train_indices: np.ndarray
    val_indices: np.ndarray
    client_indices: list[np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.dataset.input_shape

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    def _labels(self) -> np.ndarray:
        return self.dataset.y_train.numpy()

    @property
    def train_class_counts(self) -> list[int]:
        """Class counts of the long-tailed pool the clients share."""
        return _counts(self._labels()[self.train_indices], self.num_classes)

    def _take(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.array(indices, dtype=np.int64))
        return self.dataset.x_train[idx], self.dataset.y_train[idx]

    def client_data(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of one client (fresh tensors, safe to modify).

        Raises
        ------
        PartitionIdError
            If `partition_id` is not in ``0 .. num_clients - 1``.
        """
        if not isinstance(partition_id, (int, np.integer)) or not 0 <= partition_id < self.num_clients:
            raise PartitionIdError(
                f"partition id {partition_id!r} is out of range: the data is split over "
                f"{self.num_clients} clients (num-clients), so ids are 0..{self.num_clients - 1}; "
                "the number of simulated supernodes must equal num-clients")
        return self._take(self.client_indices[int(partition_id)])

    def server_val(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of the server validation split (possibly empty)."""
        return self._take(self.val_indices)

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The balanced test set. These are the cached tensors: do not modify them."""
        return self.dataset.x_test, self.dataset.y_test

    def client_class_counts(self) -> list[list[int]]:
        """Per client, the number of examples of each class."""
        labels = self._labels()
        return [_counts(labels[idx], self.num_classes) for idx in self.client_indices]

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable description of the split (for logs and reports)."""
        return {
            "dataset": self.dataset.name,
            "num_classes": self.num_classes,
            "class_names": list(self.dataset.class_names),
            "num_train": int(len(self.train_indices)),
            "num_val": int(len(self.val_indices)),
            "num_test": int(len(self.dataset.y_test)),
            "train_class_counts": self.train_class_counts,
            "val_class_counts": _counts(self._labels()[self.val_indices], self.num_classes),
            "test_class_counts": _counts(self.dataset.y_test.numpy(), self.num_classes),
            "client_sizes": [int(len(idx)) for idx in self.client_indices],
            "client_class_counts": self.client_class_counts(),
            "settings": dict(self.settings),
        }


def derived_seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for the long-tail subset, the server split and the partition.

    Spawned from ``numpy.random.SeedSequence(seed)`` so that the three steps
    draw unrelated random streams, yet all follow from the one run seed.
    """
    return tuple(int(child.generate_state(1)[0])  # type: ignore[return-value]
                 for child in np.random.SeedSequence(seed).spawn(3))


def _server_split(labels: np.ndarray, pool: np.ndarray, fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of `pool` into (rest, validation)."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == c])
        # Capped so every class keeps at least one training example.
        val.append(members[:min(round(fraction * len(members)), len(members) - 1)])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64)
    return np.setdiff1d(pool, val_idx), val_idx


@functools.lru_cache(maxsize=4)
def build_federated_data(*, dataset: str, data_root: str | None, seed: int, num_clients: int,
                         partition: str, dirichlet_alpha: float, shards_per_client: int,
                         imbalance_ratio: float, imbalance_type: str, server_val_fraction: float,
                         download: bool = False, data_stamp: float = 0.0) -> FederatedData:
    """Load a dataset and split it for a federated run.

    Steps: load -> long-tailed subset of the training set -> stratified server
    validation split -> partition of the rest over clients. The test set stays
    balanced. Each random step has its own seed from :func:`derived_seeds`.

    Cached per process (the last 4 argument sets) because simulated clients
    rebuild it for every message; the result must not be modified.

    Parameters
    ----------
    dataset, data_root, download
        See :func:`fedwa.data.load_dataset`.
    seed : int
        Run seed, >= 0.
    num_clients, partition, dirichlet_alpha, shards_per_client
        See :func:`fedwa.data.partition_indices`.
    imbalance_ratio, imbalance_type
        See :func:`fedwa.data.long_tail_counts`.
    server_val_fraction : float
        Fraction in [0, 1) of each class of the long-tailed pool held out for
        server-side validation (``round(fraction * n_c)``, at most ``n_c - 1``).
    data_stamp : float, optional
        Part of the cache key only: :func:`fedwa.data.data_stamp` of the dataset's files,
        so a rewritten ``npz`` folder is not served from this cache.

    Returns
    -------
    FederatedData

    Raises
    ------
    ConfigError
        For an invalid value, naming its run-config key.
    DataNotFoundError
        If the dataset files are missing.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    if (not isinstance(server_val_fraction, numbers.Real)
            or not 0 <= server_val_fraction < 1):
        raise ConfigError("server-val-fraction", server_val_fraction, "a fraction in [0, 1)")
    data = load_dataset(dataset, data_root, download)
    labels = data.y_train.numpy()
    lt_seed, val_seed, part_seed = derived_seeds(int(seed))

    pool = long_tail_indices(labels, imbalance_ratio, imbalance_type, lt_seed)
    train_idx, val_idx = _server_split(labels, pool, float(server_val_fraction), val_seed)
    partition_args = {"dirichlet_alpha": dirichlet_alpha, "shards_per_client": shards_per_client}
    try:
        parts = partition_indices(labels[train_idx], num_clients, partition, part_seed,
                                  **partition_args)
    except ConfigError as err:
        if len(val_idx) == 0:
            raise
        # The partition failed on what the server split left. If the whole pool would have
        # split, the hold-out is to blame, not the partition's own key (dirichlet-alpha,
        # num-clients, shards-per-client) that the error names.
        try:
            partition_indices(labels[pool], num_clients, partition, part_seed, **partition_args)
        except ConfigError:
            raise err from None
        raise ConfigError("server-val-fraction", server_val_fraction,
                          f"a smaller fraction: holding out {len(val_idx)} of the {len(pool)} "
                          f"training examples for the server leaves {len(train_idx)}, too few "
                          f"for {num_clients} clients with partition = {partition} (the "
                          "whole pool would split)") from None
    settings = {
        "seed": seed, "num_clients": num_clients, "partition": partition,
        "dirichlet_alpha": dirichlet_alpha, "shards_per_client": shards_per_client,
        "imbalance_ratio": imbalance_ratio, "imbalance_type": imbalance_type,
        "server_val_fraction": server_val_fraction,
    }
    return FederatedData(
        dataset=data,
        train_indices=_frozen(train_idx),
        val_indices=_frozen(val_idx),
        client_indices=[_frozen(train_idx[p]) for p in parts],
        settings={k: (v.item() if isinstance(v, np.generic) else v) for k, v in settings.items()},
    )
