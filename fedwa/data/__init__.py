"""Datasets, long-tailed subsets and federated partitions.

Typical use: ``build_federated_data(...)`` gives a :class:`FederatedData` whose
``client_data(partition_id)`` returns one client's tensors.
"""

from fedwa.data.datasets import (
    DATASET_NAMES,
    DEBIAN_FASHION_MNIST_DIR,
    LOADER_CONTRACT,
    NPZ_CONTRACT,
    Dataset,
    check_available,
    data_stamp,
    load_dataset,
    npz_files,
    read_idx,
)
from fedwa.data.federated import FederatedData, PartitionIdError, build_federated_data, derived_seeds
from fedwa.data.longtail import IMBALANCE_TYPES, long_tail_counts, long_tail_indices
from fedwa.data.partition import PARTITION_NAMES, partition_indices

__all__ = [
    "DATASET_NAMES",
    "DEBIAN_FASHION_MNIST_DIR",
    "LOADER_CONTRACT",
    "NPZ_CONTRACT",
    "IMBALANCE_TYPES",
    "PARTITION_NAMES",
    "Dataset",
    "FederatedData",
    "PartitionIdError",
    "build_federated_data",
    "check_available",
    "data_stamp",
    "derived_seeds",
    "load_dataset",
    "long_tail_counts",
    "long_tail_indices",
    "npz_files",
    "partition_indices",
    "read_idx",
]
