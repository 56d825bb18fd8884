import numpy as np
import pytest

from fedwa.data import PARTITION_NAMES, partition_indices
from fedwa.common.errors import ConfigError

LABELS = np.random.default_rng(5).integers(0, 5, size=103)


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_every_index_exactly_once(scheme):
    parts = partition_indices(LABELS, 7, scheme, seed=0)
    assert len(parts) == 7
    _assert_exact_cover(parts, len(LABELS))
    assert all(p.dtype == np.int64 for p in parts)


def test_replicas_give_every_client_all_indices_in_own_order():
    parts = partition_indices(LABELS, 4, "replicas", seed=0)
    assert len(parts) == 4
    for p in parts:
        np.testing.assert_array_equal(np.sort(p), np.arange(len(LABELS)))
    orders = {tuple(p) for p in parts}
    assert len(orders) == 4


def test_replicas_allow_as_many_clients_as_examples_and_no_more():
    # Issue #17: an unbounded num-clients built one full order per client before the first
    # round (10**9 clients: memory without bound); replicas now has the other schemes' bound.
    assert len(partition_indices(np.arange(3), 3, "replicas", seed=0)) == 3
    with pytest.raises(ConfigError, match="at most 3 with partition = replicas"):
        partition_indices(np.arange(3), 5, "replicas", seed=0)


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition_indices(LABELS, 10, "iid", seed=3)]
    # 103 = 3 * 11 + 7 * 10
    assert sorted(sizes) == [10] * 7 + [11] * 3


def test_shards_align_with_classes():
    # 10 classes x 20 examples, 10 clients x 2 shards -> 20 shards of 10, each inside one class
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 20))
    parts = partition_indices(labels, 10, "shards", seed=1, shards_per_client=2)
    _assert_exact_cover(parts, 200)
    for p in parts:
        assert len(p) == 2 * 10
        counts = np.bincount(labels[p], minlength=10)
        assert np.count_nonzero(counts) <= 2
        assert set(counts[counts > 0]) <= {10, 20}  # whole shards only


def test_shards_spread_the_remainder():
    labels = np.repeat(np.arange(5), 41)  # 205 examples in 20 shards: 5 of 11, 15 of 10
    parts = partition_indices(labels, 10, "shards", seed=0, shards_per_client=2)
    _assert_exact_cover(parts, 205)
    assert {len(p) for p in parts} <= {20, 21, 22}


def _mean_max_class_fraction(parts, labels):
    return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])


def test_dirichlet_small_alpha_is_more_skewed():
    labels = np.repeat(np.arange(10), 100)
    skewed = partition_indices(labels, 10, "dirichlet", seed=0, dirichlet_alpha=0.1)
    flat = partition_indices(labels, 10, "dirichlet", seed=0, dirichlet_alpha=100.0)
    s, f = _mean_max_class_fraction(skewed, labels), _mean_max_class_fraction(flat, labels)
    assert f < 0.25  # near-uniform: about 1/10 plus noise
    assert s > f + 0.2


def test_dirichlet_respects_min_size():
    labels = np.repeat(np.arange(10), 100)
    for seed in range(5):
        parts = partition_indices(labels, 20, "dirichlet", seed=seed, dirichlet_alpha=0.3)
        assert min(len(p) for p in parts) >= 10
        parts = partition_indices(labels, 20, "dirichlet", seed=seed, dirichlet_alpha=1.0, min_size=25)
        assert min(len(p) for p in parts) >= 25


def test_dirichlet_gives_up_after_100_draws():
    # 200 examples, 20 clients: each needs exactly 10, hopeless with alpha = 0.01
    with pytest.raises(ConfigError) as err:
        partition_indices(np.repeat(np.arange(2), 100), 20, "dirichlet", seed=0, dirichlet_alpha=0.01)
    assert err.value.key == "dirichlet-alpha"
    assert "fewer than 10 examples in 100 draws" in str(err.value)


@pytest.mark.parametrize("scheme", [s for s in PARTITION_NAMES if s != "classes"])
def test_seeded(scheme):
    a = partition_indices(LABELS, 5, scheme, seed=11)
    b = partition_indices(LABELS, 5, scheme, seed=11)
    c = partition_indices(LABELS, 5, scheme, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(num_clients=3, scheme="by-writer"), "partition"),
        (dict(num_clients=0, scheme="iid"), "num-clients"),
        (dict(num_clients=104, scheme="iid"), "num-clients"),
        (dict(num_clients=104, scheme="dirichlet"), "num-clients"),
        (dict(num_clients=3, scheme="dirichlet", dirichlet_alpha=0.0), "dirichlet-alpha"),
        (dict(num_clients=3, scheme="dirichlet", dirichlet_alpha=-1.0), "dirichlet-alpha"),
        (dict(num_clients=3, scheme="shards", shards_per_client=0), "shards-per-client"),
        (dict(num_clients=3, scheme="shards", shards_per_client=35), "shards-per-client"),
    ],
)
def test_errors_name_their_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        partition_indices(LABELS, seed=0, **kwargs)
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_too_many_clients_message():
    with pytest.raises(ConfigError, match=r"at most 103 \(the number of training examples\)"):
        partition_indices(LABELS, 200, "shards", seed=0)


def test_classes_give_class_c_to_client_c_mod_n():
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4])
    parts = partition_indices(labels, 2, "classes", seed=0)
    # Client 0: classes 0, 2, 4; client 1: classes 1, 3.
    assert parts[0].tolist() == [0, 2, 4, 5, 7, 9, 10]
    assert parts[1].tolist() == [1, 3, 6, 8]
    assert [sorted(set(labels[p])) for p in partition_indices(labels, 5, "classes", 0)] == \
        [[0], [1], [2], [3], [4]]


def test_classes_need_a_class_per_client():
    with pytest.raises(ConfigError) as err:
        partition_indices(np.array([0, 1, 0, 1]), 3, "classes", seed=0)
    assert err.value.key == "num-clients" and "at most 2" in str(err.value)


def test_classes_ignore_the_seed():
    # Deterministic by definition: nothing is drawn.
    a = partition_indices(LABELS, 5, "classes", seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, partition_indices(LABELS, 5, "classes", 2)))
