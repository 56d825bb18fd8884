"""Classification metrics for long-tailed evaluation: overall, balanced and per shot group.

All results are plain Python floats or None (never numpy scalars, never NaN) so that reports
can be written with ``json.dumps(..., allow_nan=False)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedwa.common.errors import ConfigError

SHOT_GROUPS = ("many", "medium", "few")


def _as_labels(
    preds: np.ndarray, targets: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(preds, dtype=np.int64).reshape(-1)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if preds.shape != targets.shape:
        raise ValueError(f"preds and targets differ in length: {preds.size} vs {targets.size}")
    # An out-of-range label would silently count in the accuracy but in no class.
    for name, a in (("preds", preds), ("targets", targets)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes})")
    return preds, targets


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(sum(present) / len(present)) if present else None


def per_class_accuracy(
    preds: np.ndarray, targets: np.ndarray, num_classes: int
) -> list[float | None]:
    """Recall of every class: the fraction of its examples predicted correctly.

    Parameters
    ----------
    preds, targets : numpy.ndarray
        Predicted and true integer labels, same length.
    num_classes : int
        Number of classes; the result has this length.

    Returns
    -------
    list of float or None
        Accuracy per class, None for a class absent from ``targets``.
    """
    preds, targets = _as_labels(preds, targets, num_classes)
    correct = np.bincount(targets[preds == targets], minlength=num_classes)
    total = np.bincount(targets, minlength=num_classes)
    return [float(correct[c] / total[c]) if total[c] else None for c in range(num_classes)]


def balanced_accuracy(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``targets``.

    Parameters
    ----------
    preds, targets : numpy.ndarray
        Predicted and true integer labels, same length.
    num_classes : int
        Number of classes.

    Returns
    -------
    float
        Balanced accuracy.

    Raises
    ------
    ValueError
        If ``targets`` is empty.
    """
    value = _mean_or_none(per_class_accuracy(preds, targets, num_classes))
    if value is None:
        raise ValueError("balanced accuracy of an empty set of targets")
    return value


def shot_groups(
    train_class_counts: Sequence[int],
    split: str = "thirds",
    many_shot_min: int = 100,
    few_shot_max: int = 20,
) -> list[str]:
    """Assign every class to the "many", "medium" or "few" shot group by its training count.

    Parameters
    ----------
    train_class_counts : sequence of int
        Number of training examples of each class (over the whole federation).
    split : {"thirds", "absolute"}, optional
        ``"absolute"`` follows Liu et al. 2019 (OLTR, arXiv 1904.05160): many if
        ``count > many_shot_min``, few if ``count < few_shot_max``, else medium.
        ``"thirds"`` (default) sorts classes by count, descending, ties broken by lower class
        index first, and makes the first ``C // 3`` many and the last ``C // 3`` few. It is the
        default because on small datasets (8x8 digits, long-tailed Fashion-MNIST) the absolute
        thresholds leave whole groups empty, so their accuracies would be undefined.
    many_shot_min, few_shot_max : int, optional
        Thresholds of the absolute split.

    Returns
    -------
    list of str
        One group name per class.

    Raises
    ------
    ConfigError
        If ``split`` is unknown.
    """
    counts = [int(c) for c in train_class_counts]
    if split == "absolute":
        return [
            "many" if c > many_shot_min else "few" if c < few_shot_max else "medium" for c in counts
        ]
    if split != "thirds":
        raise ConfigError("shot-split", split, "'thirds' or 'absolute'")
    k = len(counts) // 3
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    groups = ["medium"] * len(counts)
    for rank, c in enumerate(order):
        if rank < k:
            groups[c] = "many"
        elif rank >= len(counts) - k:
            groups[c] = "few"
    return groups


def classification_report(
    preds: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    train_class_counts: Sequence[int],
    *,
    shot_split: str = "thirds",
    many_shot_min: int = 100,
    few_shot_max: int = 20,
) -> dict:
    """Overall, balanced, per-class and per-shot-group accuracy, as a JSON-ready dict.

    Parameters
    ----------
    preds, targets : numpy.ndarray
        Predicted and true integer labels, same non-zero length.
    num_classes : int
        Number of classes.
    train_class_counts : sequence of int
        Training examples per class, used to form the shot groups (see :func:`shot_groups`).
    shot_split, many_shot_min, few_shot_max
        Passed to :func:`shot_groups`.

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy`` (floats), ``per_class_accuracy`` (list, None for
        classes absent from ``targets``), ``many_shot_accuracy``, ``medium_shot_accuracy``,
        ``few_shot_accuracy`` (mean accuracy over the group's classes present in ``targets``,
        None if there are none) and ``shot_groups`` (group name per class).

    Raises
    ------
    ValueError
        If ``targets`` is empty or ``train_class_counts`` has not ``num_classes`` entries.
    """
    preds, targets = _as_labels(preds, targets, num_classes)
    if targets.size == 0:
        raise ValueError("classification report of an empty set of targets")
    if len(train_class_counts) != num_classes:
        raise ValueError(
            f"train_class_counts has {len(train_class_counts)} entries, expected {num_classes}"
        )
    correct = np.bincount(targets[preds == targets], minlength=num_classes)
    total = np.bincount(targets, minlength=num_classes)
    return _report_of_counts(correct, total, train_class_counts, shot_split, many_shot_min,
                             few_shot_max)


def _report_of_counts(correct: np.ndarray, total: np.ndarray,
                      train_class_counts: Sequence[int], shot_split: str, many_shot_min: int,
                      few_shot_max: int) -> dict:
    """The report of per-class correct and total counts (both reports' common part)."""
    per_class = [float(c / n) if n else None for c, n in zip(correct, total)]
    groups = shot_groups(train_class_counts, shot_split, many_shot_min, few_shot_max)
    report: dict = {
        "accuracy": float(correct.sum() / total.sum()),
        "balanced_accuracy": _mean_or_none(per_class),
        "per_class_accuracy": per_class,
    }
    for g in SHOT_GROUPS:
        report[f"{g}_shot_accuracy"] = _mean_or_none(
            [acc for acc, grp in zip(per_class, groups) if grp == g]
        )
    report["shot_groups"] = groups
    return report


def report_from_counts(
    class_correct: Sequence[int],
    class_total: Sequence[int],
    loss_sum: float,
    train_class_counts: Sequence[int],
    *,
    shot_split: str = "thirds",
    many_shot_min: int = 100,
    few_shot_max: int = 20,
) -> dict:
    """:func:`classification_report` plus ``loss`` from per-class counts summed over nodes.

    Federated evaluation: each node counts, per class, its test examples and the correct
    predictions; the sums give exactly the report of one evaluation over the union of the
    nodes' test splits.
    """
    correct = np.asarray(class_correct, dtype=np.int64)
    total = np.asarray(class_total, dtype=np.int64)
    if correct.shape != total.shape or total.sum() == 0 or (correct > total).any():
        raise ValueError(f"per-class counts do not add up: correct {correct.tolist()}, "
                         f"total {total.tolist()}")
    report = _report_of_counts(correct, total, train_class_counts, shot_split, many_shot_min,
                               few_shot_max)
    report["loss"] = float(loss_sum) / float(total.sum())
    return report


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    train_class_counts: Sequence[int],
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    shot_split: str = "thirds",
    many_shot_min: int = 100,
    few_shot_max: int = 20,
) -> dict:
    """Evaluate a classifier on ``(x, y)``: :func:`classification_report` plus the mean loss.

    The model runs in eval mode; every submodule's training flag is restored afterwards.
    Note: the model is moved to ``device`` with ``model.to(device)`` and stays there.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch of inputs to ``[B, num_classes]`` logits.
    x : torch.Tensor
        Inputs, first dimension indexing examples (may live on any device).
    y : torch.Tensor
        Integer labels, shape ``[N]``.
    num_classes : int
        Number of classes.
    train_class_counts : sequence of int
        Training examples per class, for the shot groups.
    batch_size : int, optional
        Examples per forward pass.
    device : str or torch.device, optional
        Where the forward passes run.
    shot_split, many_shot_min, few_shot_max
        Passed to :func:`shot_groups`.

    Returns
    -------
    dict
        The keys of :func:`classification_report` plus ``loss``, the mean cross-entropy
        over all examples.
    """
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"x and y must be non-empty and equally long, got {len(x)} and {len(y)}")
    # model.train(flag) would overwrite submodules that were deliberately in another mode.
    flags = {m: m.training for m in model.modules()}
    model.to(device).eval()
    try:
        total_loss, preds = 0.0, []
        for start in range(0, len(y), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device).long()
            logits = model(xb)
            # float64 keeps the running sum exact enough over many batches.
            total_loss += F.cross_entropy(logits.double(), yb, reduction="sum").item()
            preds.append(logits.argmax(dim=1).cpu())
    finally:
        for m, flag in flags.items():
            m.training = flag
    report = classification_report(
        torch.cat(preds).numpy(),
        y.cpu().numpy(),
        num_classes,
        train_class_counts,
        shot_split=shot_split,
        many_shot_min=many_shot_min,
        few_shot_max=few_shot_max,
    )
    report["loss"] = total_loss / len(y)
    return report
