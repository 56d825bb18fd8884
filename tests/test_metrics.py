import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedwa.common.errors import ConfigError
from fedwa.core.metrics import (
                                balanced_accuracy,
                                classification_report,
                                evaluate_model,
                                per_class_accuracy,
                                shot_groups,
                                )

# 4 classes, class 3 absent from the targets.
TARGETS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDS = np.array([0, 0, 0, 1, 1, 0, 2, 2, 3, 0])
# class 0: 3/4 correct, class 1: 1/2, class 2: 2/4; overall 6/10


def test_per_class_accuracy():
    assert per_class_accuracy(PREDS, TARGETS, 4) == [pytest.approx(3 / 4), 0.5, 0.5, None]


def test_balanced_accuracy_skips_absent_class():
    # (3/4 + 1/2 + 1/2) / 3; class 3 not counted as 0
    assert balanced_accuracy(PREDS, TARGETS, 4) == pytest.approx(7 / 12)


def test_shot_groups_absolute_boundaries():
    counts = [101, 100, 99, 21, 20, 19]
    expected = ["many", "medium", "medium", "medium", "medium", "few"]
    assert shot_groups(counts, "absolute") == expected
    assert shot_groups(counts, "absolute", many_shot_min=99, few_shot_max=21) == [
        "many", "many", "medium", "medium", "few", "few",
    ]


def test_shot_groups_thirds_with_ties():
    # C = 6 -> 2 many, 2 few. Sorted (count desc, index asc): 1, 2, 5 (30s), 0, 4 (10s), 3.
    counts = [10, 30, 30, 5, 10, 30]
    assert shot_groups(counts) == ["medium", "many", "many", "few", "few", "medium"]
    # C = 4 -> 1 many, 1 few; C = 2 -> C // 3 = 0, all medium
    assert shot_groups([1, 1, 1, 1], "thirds") == ["many", "medium", "medium", "few"]
    assert shot_groups([50, 5]) == ["medium", "medium"]


def test_shot_groups_unknown_split():
    with pytest.raises(ConfigError, match="shot-split"):
        shot_groups([1, 2, 3], "quartiles")


def test_classification_report_values():
    # absolute with [500, 100, 20, 5]: many {0}, medium {1, 2} (both boundaries), few {3};
    # thirds gives the same groups (C // 3 = 1).
    for split in ("absolute", "thirds"):
        r = classification_report(PREDS, TARGETS, 4, [500, 100, 20, 5], shot_split=split)
        assert r["accuracy"] == pytest.approx(6 / 10)
        assert r["balanced_accuracy"] == pytest.approx(7 / 12)
        assert r["per_class_accuracy"] == [pytest.approx(3 / 4), 0.5, 0.5, None]
        assert r["many_shot_accuracy"] == pytest.approx(3 / 4)
        assert r["medium_shot_accuracy"] == pytest.approx((1 / 2 + 2 / 4) / 2)
        assert r["few_shot_accuracy"] is None  # its only class is absent from the targets
        assert r["shot_groups"] == ["many", "medium", "medium", "few"]
    json.dumps(r, allow_nan=False)
    assert type(r["accuracy"]) is float and type(r["per_class_accuracy"][0]) is float


def test_classification_report_empty_groups():
    # all counts 50 -> nothing above 100 or below 20: many and few groups are empty
    r = classification_report(PREDS, TARGETS, 4, [50] * 4, shot_split="absolute")
    assert r["many_shot_accuracy"] is None and r["few_shot_accuracy"] is None
    assert r["medium_shot_accuracy"] == pytest.approx(7 / 12)


def test_classification_report_rejects_bad_input():
    with pytest.raises(ValueError):
        classification_report(PREDS, TARGETS, 4, [1, 2, 3])
    with pytest.raises(ValueError):
        classification_report(PREDS, TARGETS, 3, [1, 2, 3])  # pred 3 out of range
    with pytest.raises(ValueError):
        classification_report(np.array([]), np.array([]), 3, [1, 2, 3])


def _hand_model():
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        linear.bias.zero_()
    # Dropout would scramble the logits unless evaluate_model switches to eval mode.
    return nn.Sequential(linear, nn.Dropout(0.9))


def test_evaluate_model_by_hand():
    model = _hand_model()
    model.train()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [-1.0, -1.0]])
    y = torch.tensor([0, 1, 2, 2])
    # logits = [x0, x1, 0]: [2,0,0] [0,1,0] [1,3,0] [-1,-1,0] -> preds 0, 1, 1, 2
    e = math.exp
    losses = [
        math.log(e(2) + 2) - 2,
        math.log(e(1) + 2) - 1,
        math.log(e(1) + e(3) + 1) - 0,
        math.log(2 * e(-1) + 1) - 0,
    ]
    # thirds on [10, 5, 1]: many {0}, medium {1}, few {2}
    r = evaluate_model(model, x, y, num_classes=3, train_class_counts=[10, 5, 1], batch_size=3)
    assert r["loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert r["accuracy"] == pytest.approx(3 / 4)
    assert r["per_class_accuracy"] == [1.0, 1.0, 0.5]
    assert r["balanced_accuracy"] == pytest.approx(5 / 6)
    groups = (r["many_shot_accuracy"], r["medium_shot_accuracy"], r["few_shot_accuracy"])
    assert groups == (1.0, 1.0, 0.5)
    assert type(r["loss"]) is float
    json.dumps(r, allow_nan=False)
    assert model.training and model[1].training


def test_evaluate_model_restores_mixed_flags():
    model = _hand_model()
    model.train()
    model[0].eval()
    x, y = torch.zeros(2, 2), torch.tensor([0, 1])
    evaluate_model(model, x, y, num_classes=3, train_class_counts=[1, 1, 1])
    assert model.training and not model[0].training and model[1].training
    model.eval()
    evaluate_model(model, x, y, num_classes=3, train_class_counts=[1, 1, 1])
    assert not any(m.training for m in model.modules())
