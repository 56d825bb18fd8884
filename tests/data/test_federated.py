import json

import numpy as np
import pytest
import torch

from fedwa.data import FederatedData, PartitionIdError, build_federated_data, derived_seeds
from fedwa.common.errors import ConfigError, FedwaError

BASE = dict(dataset="digits", data_root=None, seed=3, num_clients=5, partition="dirichlet",
            dirichlet_alpha=0.5, shards_per_client=2, imbalance_ratio=10.0, imbalance_type="exp",
            server_val_fraction=0.2)

# Digits train pool (test split removed) has at least 144 per class, so the
# exp profile with rho = 10 keeps floor(144 * 10 ** (-c / 9)) per class:
LONG_TAIL = [144, 111, 86, 66, 51, 40, 31, 24, 18, 14]
# round(0.2 * n_c): 28.8, 22.2, 17.2, 13.2, 10.2, 8.0, 6.2, 4.8, 3.6, 2.8
VAL = [29, 22, 17, 13, 10, 8, 6, 5, 4, 3]


def build(**overrides) -> FederatedData:
    return build_federated_data(**{**BASE, **overrides})


def _val_counts(fd):
    return np.bincount(fd.dataset.y_train.numpy()[fd.val_indices], minlength=10).tolist()


def test_long_tail_and_stratified_server_split():
    fd = build()
    assert _val_counts(fd) == VAL
    assert fd.train_class_counts == [n - v for n, v in zip(LONG_TAIL, VAL)]
    assert fd.num_classes == 10 and fd.input_shape == (1, 8, 8)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_clients_cover_the_pool_disjoint_from_val(partition):
    fd = build(partition=partition)
    union = np.concatenate(fd.client_indices)
    assert len(np.unique(union)) == len(union)  # no example given twice
    np.testing.assert_array_equal(np.sort(union), fd.train_indices)
    assert len(np.intersect1d(fd.val_indices, fd.train_indices)) == 0


def test_replicas_share_the_whole_pool():
    fd = build(partition="replicas", num_clients=3)
    for idx in fd.client_indices:
        np.testing.assert_array_equal(np.sort(idx), fd.train_indices)
    assert not np.array_equal(fd.client_indices[0], fd.client_indices[1])


def test_summary_is_json_and_consistent():
    fd = build()
    s = json.loads(json.dumps(fd.summary()))
    assert s["dataset"] == "digits" and s["num_classes"] == 10 and len(s["class_names"]) == 10
    assert s["num_val"] == sum(VAL) and s["num_train"] == sum(LONG_TAIL) - sum(VAL)
    assert s["num_test"] == 300 and s["test_class_counts"] == [30] * 10
    assert [sum(c) for c in s["client_class_counts"]] == s["client_sizes"]
    assert sum(s["client_sizes"]) == s["num_train"]
    assert np.sum(s["client_class_counts"], axis=0).tolist() == s["train_class_counts"]
    assert s["settings"]["partition"] == "dirichlet" and s["settings"]["seed"] == 3


def test_client_data_and_val_tensors():
    fd = build()
    x, y = fd.client_data(2)
    idx = torch.from_numpy(np.array(fd.client_indices[2]))
    assert x.shape == (len(idx), 1, 8, 8)
    assert torch.equal(y, fd.dataset.y_train[idx]) and torch.equal(x, fd.dataset.x_train[idx])
    xv, yv = fd.server_val()
    assert xv.shape[0] == sum(VAL) and torch.bincount(yv, minlength=10).tolist() == VAL
    xt, yt = fd.test_data()
    assert xt.shape == (300, 1, 8, 8) and torch.bincount(yt).tolist() == [30] * 10


@pytest.mark.parametrize("bad", [-1, 5, "0"])
def test_bad_partition_id(bad):
    with pytest.raises(PartitionIdError, match="0..4") as err:
        build().client_data(bad)
    assert isinstance(err.value, IndexError) and isinstance(err.value, FedwaError)


def test_seeded_and_cached():
    a = build_federated_data.__wrapped__(**BASE)  # bypass the cache: a genuine rebuild
    b = build_federated_data.__wrapped__(**BASE)
    c = build_federated_data.__wrapped__(**{**BASE, "seed": 4})
    np.testing.assert_array_equal(a.val_indices, b.val_indices)
    assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))
    assert not all(np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices))
    assert build() is build()


def test_derived_seeds_are_distinct_and_stable():
    s = derived_seeds(3)
    assert s == derived_seeds(3) and len(set(s)) == 3 and s != derived_seeds(4)


def test_index_arrays_are_read_only():
    fd = build()
    with pytest.raises(ValueError):
        fd.client_indices[0][0] = 0


def test_no_server_split():
    fd = build(server_val_fraction=0.0, partition="iid")
    assert len(fd.val_indices) == 0 and fd.train_class_counts == LONG_TAIL
    xv, yv = fd.server_val()
    assert xv.shape == (0, 1, 8, 8) and yv.shape == (0,)
    json.dumps(fd.summary())


def test_every_class_keeps_a_training_example():
    # rho = 1000 leaves 1 example in the tail classes; round(0.9 * 1) = 1 would take it
    fd = build(dataset="synthetic", imbalance_ratio=1000.0, server_val_fraction=0.9, partition="iid")
    assert min(fd.train_class_counts) >= 1
    assert fd.train_class_counts[9] == 1 and _val_counts(fd)[9] == 0


@pytest.mark.parametrize("frac", [1.0, -0.1, 1.5])
def test_bad_server_val_fraction(frac):
    with pytest.raises(ConfigError) as err:
        build(server_val_fraction=frac)
    assert err.value.key == "server-val-fraction" and "[0, 1)" in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (dict(imbalance_ratio=0.5), "imbalance-ratio"),
    (dict(partition="nope"), "partition"),
    (dict(num_clients=10_000), "num-clients"),
    (dict(seed=-1), "seed"),
    (dict(dataset="nope"), "dataset"),
])
def test_config_errors_propagate(overrides, key):
    with pytest.raises(ConfigError) as err:
        build(**overrides)
    assert err.value.key == key
