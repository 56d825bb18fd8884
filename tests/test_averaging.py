"""weighted_average and is_finite_state on values worked out by hand; fused against reference."""

import pytest
import torch

from fedwa.core.averaging import (flat_weighted_average, fused_weighted_average, is_finite_state,
                                  normalise_weights, reference_weighted_average, weighted_average)


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


# --- fused_weighted_average against the reference -----------------------------------------------

def test_fused_cut_into_blocks_by_hand():
    # Weights 1, 1, 2 -> 0.25, 0.25, 0.5. With blocks of 2 elements, "a" (5 elements) is cut
    # into pieces [0:2], [2:4], [4:5]; "b" (1 element) is packed whole.
    #   a: 0.25 * [0, 4, 8, 12, 16] + 0.25 * [4, 4, 4, 4, 4] + 0.5 * [2, 0, 2, 0, 2]
    #    = [0, 1, 2, 3, 4] + [1, 1, 1, 1, 1] + [1, 0, 1, 0, 1] = [2, 2, 4, 4, 6]
    #   b: 0.25 * 8 + 0.25 * 0 + 0.5 * 4 = 4
    #   n: max(1, 5, 3) = 5
    models = [
        {"a": torch.tensor([0.0, 4.0, 8.0, 12.0, 16.0]), "n": torch.tensor(1),
         "b": torch.tensor([8.0])},
        {"a": torch.full((5,), 4.0), "n": torch.tensor(5), "b": torch.tensor([0.0])},
        {"a": torch.tensor([2.0, 0.0, 2.0, 0.0, 2.0]), "n": torch.tensor(3),
         "b": torch.tensor([4.0])},
    ]
    for block in (1, 2, 3, 1024):
        out = fused_weighted_average(models, [1, 1, 2], block_elements=block)
        assert list(out) == ["a", "n", "b"]
        assert torch.equal(out["a"], torch.tensor([2.0, 2.0, 4.0, 4.0, 6.0]))
        assert torch.equal(out["b"], torch.tensor([4.0]))
        assert out["n"].dtype == torch.int64 and out["n"].item() == 5


def random_states(count, seed=0):
    """Models with mixed dtypes, shapes (0-dim, empty, large) and an integer counter."""
    gen = torch.Generator().manual_seed(seed)
    states = []
    for k in range(count):
        states.append({
            "conv.weight": torch.randn(64, 3, 3, 3, generator=gen),
            "bn.num_batches_tracked": torch.tensor(10 * k + 3),
            "big.weight": torch.randn(300, 437, generator=gen),   # 131100 elements, cut
            "scalar": torch.randn((), generator=gen),
            "empty": torch.randn(0, 4, generator=gen),
            "h64": torch.randn(1001, generator=gen, dtype=torch.float64),
            "h16": torch.randn(77, generator=gen).to(torch.float16),
            "counts": torch.randint(0, 50, (4,), generator=gen, dtype=torch.int32),
            # A transposed (non-contiguous) input: read through a copy, same values.
            "t.weight": torch.randn(129, 65, generator=gen).t(),
        })
    return states


@pytest.mark.parametrize("block", [None, 1 << 16, 4096, 1000, 64, 7])
def test_fused_equals_reference_on_random_states(block):
    states = random_states(7)
    weights = [3.0, 1.0, 0.5, 2.0, 7.0, 0.0, 1.25]
    before = [{n: t.clone() for n, t in sd.items()} for sd in states]
    kwargs = {} if block is None else {"block_elements": block}
    fused = fused_weighted_average(states, weights, **kwargs)
    reference = reference_weighted_average(states, weights)
    assert list(fused) == list(reference) == list(states[0])
    for n in reference:
        assert fused[n].dtype == reference[n].dtype == states[0][n].dtype, n
        assert fused[n].shape == states[0][n].shape, n
        if block is None or block % 64 == 0:
            # Same operations per element in the same order, and pieces that keep the vector
            # kernels' alignment: bitwise equal, not just close.
            assert torch.equal(fused[n], reference[n]), n
        else:
            # Other cuts move elements between vectorised and scalar loops, which may round
            # differently (float16 does here).
            torch.testing.assert_close(fused[n], reference[n], rtol=2e-3, atol=1e-3)
    # And both are the weighted mean (float64 check of the float32 entries).
    total = sum(weights)
    expected = sum(w / total * sd["big.weight"].double() for w, sd in zip(weights, states))
    torch.testing.assert_close(fused["big.weight"].double(), expected, rtol=1e-5, atol=1e-6)
    assert fused["bn.num_batches_tracked"].item() == 63
    assert torch.equal(fused["counts"], torch.stack([sd["counts"] for sd in states]).amax(0))
    # Inputs untouched; every output its own tensor, not a view of an input or of a shared buffer.
    for sd, copy in zip(states, before):
        for n in sd:
            assert torch.equal(sd[n], copy[n])
    pointers = {t.data_ptr() for sd in states for t in sd.values() if t.numel()}
    for n, t in fused.items():
        assert t._base is None and (t.numel() == 0 or t.data_ptr() not in pointers), n


def test_weighted_average_is_the_fused_one():
    states = random_states(3, seed=1)
    out = weighted_average(states, [1, 2, 3])
    fused = fused_weighted_average(states, [1, 2, 3])
    assert all(torch.equal(out[n], fused[n]) for n in out)


def test_fused_single_model_and_uniform_weights():
    states = random_states(1, seed=2)
    out = fused_weighted_average(states, block_elements=64)
    for n, t in states[0].items():
        assert torch.equal(out[n], t), n
    uniform = fused_weighted_average(random_states(4, seed=3), block_elements=100)
    reference = reference_weighted_average(random_states(4, seed=3))
    assert all(torch.equal(uniform[n], reference[n]) for n in reference)


def test_fused_integer_only_and_empty_states():
    ints = [{"n": torch.tensor(k), "c": torch.tensor([k, 5 - k])} for k in range(4)]
    out = fused_weighted_average(ints, block_elements=64)
    assert out["n"].item() == 3 and out["c"].tolist() == [3, 5]
    assert fused_weighted_average([{}, {}]) == {}


def test_fused_rejects_mismatched_shapes():
    a = {"w": torch.zeros(3), "v": torch.zeros(2)}
    b = {"w": torch.zeros(3), "v": torch.zeros(1)}  # would broadcast silently in add_
    with pytest.raises(ValueError, match=r"'v' has shape \(1,\) in model 1 but \(2,\) in model 0"):
        weighted_average([a, b])


# --- flat buffers -------------------------------------------------------------------------------

def test_flat_average_by_hand_and_in_blocks():
    # Weights 1, 1, 2 -> 0.25, 0.25, 0.5:
    #   0.25 * [0, 4, 8] + 0.25 * [4, 4, 4] + 0.5 * [2, 0, 2] = [2, 2, 4]
    rows = torch.tensor([[0.0, 4.0, 8.0], [4.0, 4.0, 4.0], [2.0, 0.0, 2.0]])
    for block in (1, 2, 1024):
        assert torch.equal(flat_weighted_average(rows, [1, 1, 2], block_elements=block),
                           torch.tensor([2.0, 2.0, 4.0]))
        assert torch.equal(flat_weighted_average(list(rows), [1, 1, 2], block_elements=block),
                           torch.tensor([2.0, 2.0, 4.0]))
    with pytest.raises(ValueError, match="K x P"):
        flat_weighted_average(torch.zeros(3))
    with pytest.raises(ValueError, match="one length"):
        flat_weighted_average([torch.zeros(3), torch.zeros(4)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [None, 4096, 7])
def test_flat_average_equals_the_state_dict_average_bit_for_bit(dtype, block):
    # A model's tensors laid back to back in one row; odd sizes put each tensor's tail
    # elements in the middle of the row's vector loops, which for float32/64 rounds alike.
    gen = torch.Generator().manual_seed(5)
    sizes = [1, 3, 130, 67, 2000, 9, 64]
    rows = (torch.randn(6, sum(sizes), generator=gen) * 10).to(dtype)
    states = [dict(zip(map(str, range(len(sizes))), row.split(sizes))) for row in rows]
    weights = [3.0, 1.0, 0.5, 2.0, 7.0, 1.25]
    kwargs = {} if block is None else {"block_elements": block}
    flat = flat_weighted_average(rows, weights, **kwargs).split(sizes)
    reference = reference_weighted_average(states, weights)
    assert all(torch.equal(piece, reference[n]) for piece, n in zip(flat, reference))
