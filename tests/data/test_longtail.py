import numpy as np
import pytest

from fedwa.data import long_tail_counts, long_tail_indices
from fedwa.common.errors import ConfigError


def test_exp_profile_matches_hand_worked_counts():
    # floor(6000 * 100 ** (-c / 9)); 100 ** (1 / 9) = 1.668100537...
    # c=1: 6000 / 1.6681 = 3596.906 -> 3596 (the brief said 3597)
    # c=8: 6000 / 100 * 1.6681 = 100.086 -> 100 (the brief said 99)
    # c=9: 6000 / 100 = 60 exactly.
    assert long_tail_counts(6000, 10, 100, "exp") == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


def test_exp_profile_small_exact_case_and_default_profile():
    # 100 * 4 ** (-c / 2) = 100, 50, 25, all exact in floating point
    assert long_tail_counts(100, 3, 4) == [100, 50, 25]
    # 30 * 8 ** (-c / 3) = 30, 15, 7.5, 3.75
    assert long_tail_counts(30, 4, 8, "exp") == [30, 15, 7, 3]


def test_step_profile():
    assert long_tail_counts(500, 10, 10, "step") == [500] * 5 + [50] * 5
    # odd C: the first C // 2 = 2 classes are the head; 100 / 3 = 33.3 -> 33
    assert long_tail_counts(100, 5, 3, "step") == [100, 100, 33, 33, 33]


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_ratio_one_is_balanced(profile):
    assert long_tail_counts(500, 10, 1, profile) == [500] * 10


def test_every_count_is_at_least_one():
    # 5 / sqrt(1000) = 0.158 and 5 / 1000 both floor to 0
    assert long_tail_counts(5, 3, 1000) == [5, 1, 1]
    assert long_tail_counts(5, 4, 1000, "step") == [5, 5, 1, 1]


@pytest.mark.parametrize("rho", [0.5, 0, -3, float("nan"), "10"])
def test_ratio_below_one_raises(rho):
    with pytest.raises(ConfigError) as err:
        long_tail_counts(100, 10, rho)
    assert err.value.key == "imbalance-ratio"
    assert "imbalance-ratio" in str(err.value) and ">= 1" in str(err.value)


def test_unknown_profile_raises():
    with pytest.raises(ConfigError) as err:
        long_tail_counts(100, 10, 10, "linear")
    assert err.value.key == "imbalance-type"
    assert "'exp' or 'step'" in str(err.value)


def _labels():
    # available counts 50, 40, 30, 60 -> n_max is the smallest, 30
    labels = np.repeat(np.arange(4), [50, 40, 30, 60])
    return np.random.default_rng(123).permutation(labels)


def test_long_tail_indices_class_counts_and_uniqueness():
    labels = _labels()
    idx = long_tail_indices(labels, 8, "exp", seed=0)
    assert np.bincount(labels[idx]).tolist() == [30, 15, 7, 3]
    assert len(np.unique(idx)) == len(idx) == 55
    assert np.all(np.diff(idx) > 0)  # sorted
    assert idx.min() >= 0 and idx.max() < len(labels)


def test_long_tail_indices_step_and_balanced():
    labels = _labels()
    assert np.bincount(labels[long_tail_indices(labels, 3, "step", 0)]).tolist() == [30, 30, 10, 10]
    assert np.bincount(labels[long_tail_indices(labels, 1, "exp", 0)]).tolist() == [30] * 4


def test_long_tail_indices_seeded():
    labels = _labels()
    a = long_tail_indices(labels, 8, "exp", seed=7)
    b = long_tail_indices(labels, 8, "exp", seed=7)
    c = long_tail_indices(labels, 8, "exp", seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_long_tail_indices_validates():
    with pytest.raises(ConfigError, match="imbalance-type"):
        long_tail_indices(_labels(), 8, "zipf", 0)
