"""weighted_average and is_finite_state on values worked out by hand."""

import pytest
import torch

from fedwa.averaging import is_finite_state, normalise_weights, weighted_average


def test_two_models_weighted():
    a = {"w": torch.tensor([0.0, 2.0])}
    b = {"w": torch.tensor([4.0, 6.0])}
    # weights 1, 3 -> 0.25, 0.75: [0*.25 + 4*.75, 2*.25 + 6*.75] = [3, 5]
    out = weighted_average([a, b], [1, 3])
    assert torch.equal(out["w"], torch.tensor([3.0, 5.0]))


def test_three_models_weights_are_normalised():
    models = [{"w": torch.tensor([[1.0, -2.0]])}, {"w": torch.tensor([[3.0, 2.0]])},
              {"w": torch.tensor([[5.0, 4.0]])}]
    # 2, 2, 4 -> 0.25, 0.25, 0.5:
    #   col 0: 1*.25 + 3*.25 + 5*.5 = 0.25 + 0.75 + 2.5 = 3.5
    #   col 1: -2*.25 + 2*.25 + 4*.5 = 2.0
    expected = torch.tensor([[3.5, 2.0]])
    assert torch.equal(weighted_average(models, [2, 2, 4])["w"], expected)
    # Scaling every weight changes nothing.
    assert torch.equal(weighted_average(models, [20, 20, 40])["w"], expected)


def test_uniform_by_default():
    models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([8.0])}]
    # (1 + 3 + 8) / 3 = 4
    assert weighted_average(models)["w"].item() == pytest.approx(4.0)


def test_zero_weight_ignores_model():
    a = {"w": torch.tensor([1.0])}
    b = {"w": torch.tensor([100.0])}
    assert weighted_average([a, b], [1, 0])["w"].item() == 1.0


def test_integer_buffer_takes_max_and_keeps_dtype():
    models = [
        {"w": torch.tensor([1.0]), "n": torch.tensor(3), "c": torch.tensor([1, 9], dtype=torch.int32)},
        {"w": torch.tensor([2.0]), "n": torch.tensor(7), "c": torch.tensor([4, 2], dtype=torch.int32)},
        {"w": torch.tensor([3.0]), "n": torch.tensor(5), "c": torch.tensor([3, 3], dtype=torch.int32)},
    ]
    out = weighted_average(models, [1, 1, 2])
    # n: max(3, 7, 5) = 7, not the weighted mean (3 + 7 + 10) / 4 = 5
    assert out["n"].dtype == torch.int64 and out["n"].shape == () and out["n"].item() == 7
    # c: elementwise max
    assert out["c"].dtype == torch.int32 and out["c"].tolist() == [4, 9]
    # w: (1 + 2 + 6) / 4 = 2.25
    assert out["w"].item() == 2.25


def test_float_dtypes_kept():
    models = [{"h": torch.tensor([1.0], dtype=torch.float64)},
              {"h": torch.tensor([2.0], dtype=torch.float64)}]
    out = weighted_average(models)
    assert out["h"].dtype == torch.float64 and out["h"].item() == 1.5


def test_inputs_not_modified_and_not_aliased():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(6)}
    before = [{k: v.clone() for k, v in sd.items()} for sd in (a, b)]
    out = weighted_average([a, b], [3, 1])
    for sd, copy in zip((a, b), before):
        for k in sd:
            assert torch.equal(sd[k], copy[k])
    # The result owns its tensors, even for a single model.
    single = weighted_average([a])
    single["w"].add_(10.0)
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0]))
    assert out["w"].data_ptr() not in (a["w"].data_ptr(), b["w"].data_ptr())


def test_key_order_kept():
    # Float and integer entries interleaved: the result follows the first model's order.
    names = ["z.weight", "bn.num_batches_tracked", "a.bias", "m.count", "b.weight"]
    sd = {n: (torch.tensor(1) if "num" in n or "count" in n else torch.ones(2)) for n in names}
    out = weighted_average([sd, {n: sd[n].clone() for n in reversed(names)}])
    assert list(out) == names


def test_zero_models():
    with pytest.raises(ValueError, match="zero models"):
        weighted_average([])


def test_negative_weight():
    a, b = {"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}
    with pytest.raises(ValueError, match=">= 0"):
        weighted_average([a, b], [2, -1])


def test_zero_sum_weights():
    a, b = {"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([a, b], [0, 0])


def test_weight_count_mismatch():
    a, b = {"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}
    with pytest.raises(ValueError, match="3 weights for 2 models"):
        weighted_average([a, b], [1, 1, 1])


def test_normalise_weights():
    assert normalise_weights([1, 3], 2) == [0.25, 0.75]
    assert normalise_weights(None, 4) == [0.25] * 4
    with pytest.raises(ValueError):
        normalise_weights([float("nan"), 1.0], 2)


def test_is_finite_state():
    assert is_finite_state({"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(3)})
    assert not is_finite_state({"w": torch.tensor([1.0, float("nan")])})
    assert not is_finite_state({"a": torch.ones(2), "w": torch.tensor([float("-inf")])})
    # Integer entries cannot hold NaN and are not checked.
    assert is_finite_state({"n": torch.tensor([2**62])})
    assert is_finite_state({})
