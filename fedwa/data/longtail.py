"""Long-tailed (class-imbalanced) subsets of a training set, as in Cao et al. 2019 (LDAM)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from fedwa.common.errors import ConfigError

IMBALANCE_TYPES = ("exp", "step")


def _check(imbalance_ratio: float, profile: str) -> None:
    if (not isinstance(imbalance_ratio, numbers.Real) or isinstance(imbalance_ratio, bool)
            or not math.isfinite(imbalance_ratio) or imbalance_ratio < 1):
        raise ConfigError("imbalance-ratio", imbalance_ratio, "a number >= 1 (1 means balanced)")
    if profile not in IMBALANCE_TYPES:
        raise ConfigError("imbalance-type", profile, "'exp' or 'step'")


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float,
                     profile: str = "exp") -> list[int]:
    """Per-class example counts of a long-tailed distribution; class 0 is the head.

    Parameters
    ----------
    n_max : int
        Count of the head class.
    num_classes : int
        Number of classes ``C``.
    imbalance_ratio : float
        ``rho`` = head count / tail count, at least 1 (1 gives a balanced set).
    profile : {"exp", "step"}
        ``exp``: ``n_c = floor(n_max * rho ** (-c / (C - 1)))``.
        ``step``: the first ``C // 2`` classes keep `n_max`, the others get
        ``floor(n_max / rho)``.

    Returns
    -------
    list of int
        ``C`` counts, each at least 1.

    Raises
    ------
    ConfigError
        For ``rho < 1`` (key ``imbalance-ratio``) or an unknown profile
        (key ``imbalance-type``).
    """
    _check(imbalance_ratio, profile)
    if n_max < 1 or num_classes < 1:
        raise ValueError(f"n_max and num_classes must be >= 1, got {n_max} and {num_classes}")
    if num_classes == 1:
        return [n_max]
    if profile == "exp":
        raw = [n_max * imbalance_ratio ** (-c / (num_classes - 1)) for c in range(num_classes)]
    else:
        raw = [n_max if c < num_classes // 2 else n_max / imbalance_ratio for c in range(num_classes)]
    # The epsilon keeps exact products such as 6000 * 100 ** -1 = 60 from
    # flooring to 59 when the float lands a hair below the integer.
    return [max(1, math.floor(r + 1e-9)) for r in raw]


def long_tail_indices(labels: np.ndarray, imbalance_ratio: float, profile: str,
                      seed: int) -> np.ndarray:
    """Choose a long-tailed subset of a labelled set.

    The head count is the smallest class count present in `labels`, so every
    class can supply its target count exactly. Classes are ranked by label
    value (the smallest label is the head).

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels, shape ``[N]``.
    imbalance_ratio : float
        See :func:`long_tail_counts`.
    profile : {"exp", "step"}
        See :func:`long_tail_counts`.
    seed : int
        Seeds which examples each class keeps (a permutation per class).

    Returns
    -------
    numpy.ndarray
        Sorted int64 positions into `labels`.
    """
    labels = np.asarray(labels)
    _check(imbalance_ratio, profile)
    classes, available = np.unique(labels, return_counts=True)
    if len(classes) == 0:
        return np.empty(0, dtype=np.int64)
    counts = long_tail_counts(int(available.min()), len(classes), imbalance_ratio, profile)
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, counts)]
    return np.sort(np.concatenate(kept)).astype(np.int64)
