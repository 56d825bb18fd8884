import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedwa.models import build_model
from fedwa.shadow import (
    TRANSFORMS,
    AffineParams,
    ShadowConv2d,
    add_shadow_weights,
    conv_layer_names,
    kernel_transform,
    reseed_shadow,
    sample_affine,
    transform_kernel,
)

CNN_SHAPE = (1, 8, 8)


def _cnn(**kwargs):
    return add_shadow_weights(build_model("cnn", CNN_SHAPE, 3, seed=0), **kwargs)


def _x(n=2, shape=CNN_SHAPE, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- kernel transforms


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_unit_scale_no_shift_is_identity(transform):
    # With align_corners=False the identity grid lands on the pixel centres; the only error
    # is float64 rounding of the normalised grid (~1e-16 per coordinate).
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = transform_kernel(w, transform, AffineParams(1.0, 0.0, 0.0))
    torch.testing.assert_close(out, w, rtol=0.0, atol=1e-12)


def test_translate_one_pixel_moves_values_and_shifts_in_zeros():
    k = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(1, 1, 3, 3)
    # Content displaced by one pixel (2/3 normalised units) right and down: offset = -dx, -dy.
    out = transform_kernel(k, "translate", AffineParams(1.0, -2.0 / 3.0, -2.0 / 3.0))
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 4.0, 5.0]], dtype=k.dtype)
    torch.testing.assert_close(out[0, 0], expected, rtol=0.0, atol=1e-12)
    # And one pixel left only.
    out = transform_kernel(k, "translate", AffineParams(1.0, 2.0 / 3.0, 0.0))
    expected = torch.tensor([[2.0, 3.0, 0.0], [5.0, 6.0, 0.0], [8.0, 9.0, 0.0]], dtype=k.dtype)
    torch.testing.assert_close(out[0, 0], expected, rtol=0.0, atol=1e-12)


def test_resize_crop_top_left_window_on_a_ramp():
    # Kernel value = column index + 1. A window of side 2/3 centred at (-1/3, -1/3) reads
    # x = (2/3) p - 1/3 for output centres p = -2/3, 0, 2/3, i.e. pixel coordinates
    # -1/6 (clamped to the edge by "border" padding; zero padding would give 5/6), 1/2 and
    # 7/6: bilinear on a ramp returns coordinate + 1. Rows are constant, so y plays no role.
    ramp = torch.arange(1.0, 4.0, dtype=torch.float64).repeat(3, 1).reshape(1, 1, 3, 3)
    out = transform_kernel(ramp, "resize-crop", AffineParams(2.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0))
    expected = torch.tensor([1.0, 1.5, 13.0 / 6.0], dtype=ramp.dtype).repeat(3, 1)
    torch.testing.assert_close(out[0, 0], expected, rtol=0.0, atol=1e-12)


def test_one_random_map_shared_by_all_kernels():
    # Identical kernels in every (out, in) slot must stay identical after the transform.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 3, 3, generator=g)
    w = base.repeat(4, 2, 1, 1)
    out = kernel_transform(w, "resize-crop", g)
    assert torch.equal(out, out[:1, :1].expand_as(out))
    assert not torch.allclose(out[0, 0], base[0, 0])


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_one_by_one_kernels_unchanged_and_draw_nothing(transform):
    w = torch.randn(4, 3, 1, 1)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert kernel_transform(w, transform, g) is w
    assert torch.equal(g.get_state(), state)


def test_sample_affine_ranges_and_reproducibility():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = sample_affine("resize-crop", g)
        assert 0.8 - 1e-12 <= p.scale**2 <= 1.0 + 1e-12
        # The window [c - scale, c + scale] stays inside the kernel's [-1, 1].
        assert abs(p.offset_x) <= 1.0 - p.scale + 1e-12
        assert abs(p.offset_y) <= 1.0 - p.scale + 1e-12
        q = sample_affine("translate", g)
        # 30% of the kernel size = 0.6 normalised units (the kernel spans 2).
        assert q.scale == 1.0 and abs(q.offset_x) <= 0.6 and abs(q.offset_y) <= 0.6
    a = [sample_affine("translate", torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]
    assert sample_affine("translate", torch.Generator().manual_seed(4)) != a[0]


def test_unknown_transform_rejected():
    with pytest.raises(ValueError, match="resize-crop"):
        kernel_transform(torch.zeros(1, 1, 3, 3), "rotate", torch.Generator())
    with pytest.raises(ValueError, match="transform"):
        _cnn(transform="rotate")
    with pytest.raises(ValueError, match="inference"):
        _cnn(inference="mean")


# ---------------------------------------------------------------- ShadowConv2d


def test_eval_plain_is_exactly_the_plain_conv():
    model = _cnn()
    x = _x()
    model.eval()
    conv = model.conv1
    with torch.no_grad():
        conv.shadow_scale.fill_(0.5)  # must be ignored by the plain mode
    expected = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    assert torch.equal(conv(x), expected)


def test_eval_shadow_uses_scaled_weight():
    model = _cnn(inference="shadow")
    x = _x()
    model.eval()
    conv = model.conv1
    with torch.no_grad():
        conv.shadow_scale.fill_(0.7)
        expected = F.conv2d(x, conv.shadow_scale * conv.weight, None, conv.stride, conv.padding)
        plain = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
        out = conv(x)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, plain)


def test_eval_is_deterministic_and_draws_nothing():
    model = _cnn(inference="shadow").eval()
    state = model.conv1.generator.get_state()
    x = _x()
    assert torch.equal(model(x), model(x))
    assert torch.equal(model.conv1.generator.get_state(), state)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_train_passes_differ_unless_reseeded(transform):
    model = _cnn(transform=transform).train()
    x = _x()
    with torch.no_grad():
        first, second = model(x), model(x)
        assert not torch.allclose(first, second)
        reseed_shadow(model, 11)
        a = model(x)
        reseed_shadow(model, 11)
        b = model(x)
    assert torch.equal(a, b)


def test_same_seed_same_transforms_different_seed_differs():
    x = _x()
    with torch.no_grad():
        a = _cnn(seed=3).train()(x)
        b = _cnn(seed=3).train()(x)
        c = _cnn(seed=4).train()(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_layer_stream_independent_of_selection():
    # A layer's generator is seeded from (seed, its index among all convs), not its rank
    # among the selected ones.
    full, only = _cnn(seed=2), _cnn(seed=2, layers=["conv2"])
    assert torch.equal(full.conv2.shadow_weight(), only.conv2.shadow_weight())


def test_deepcopy_keeps_generator_state():
    model = _cnn()
    model.conv1.shadow_weight()
    twin = copy.deepcopy(model)
    assert torch.equal(model.conv1.shadow_weight(), twin.conv1.shadow_weight())


def test_gradients_reach_weight_and_scale():
    model = _cnn().train()
    model(_x()).square().sum().backward()
    for name in ("conv1", "conv2"):
        conv = model.get_submodule(name)
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert conv.shadow_scale.grad is not None and conv.shadow_scale.grad.abs() > 0


def test_scale_gradient_matches_chain_rule():
    # d/da sum(conv(x; a T(W))) = sum(conv(x; T(W))) since the conv is linear in its weight.
    conv = ShadowConv2d(2, 3, 3, bias=False, generator_seed=0)
    x = _x(1, (2, 5, 5))
    conv(x).sum().backward()
    conv.reseed(0)
    with torch.no_grad():
        tw = kernel_transform(conv.weight, conv.transform, conv.generator)
        expected = F.conv2d(x, tw).sum()
    torch.testing.assert_close(conv.shadow_scale.grad, expected, rtol=1e-5, atol=1e-5)


def test_one_by_one_shadow_conv_trains_on_scaled_weight():
    conv = nn.Conv2d(3, 2, 1, stride=2, bias=True)
    shadow = ShadowConv2d.from_conv(conv, generator_seed=0).train()
    with torch.no_grad():
        shadow.shadow_scale.fill_(1.5)
        x = _x(1, (3, 4, 4))
        expected = F.conv2d(x, shadow.shadow_scale * shadow.weight, shadow.bias, stride=2)
        assert torch.equal(shadow(x), expected)


def test_from_conv_copies_config_and_weights_without_sharing():
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2, bias=True,
                     padding_mode="reflect")
    shadow = ShadowConv2d.from_conv(conv, "translate", "shadow", 7)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                 "dilation", "groups", "padding_mode"):
        assert getattr(shadow, attr) == getattr(conv, attr)
    assert torch.equal(shadow.weight, conv.weight) and torch.equal(shadow.bias, conv.bias)
    assert shadow.weight.data_ptr() != conv.weight.data_ptr()
    assert shadow.shadow_scale.item() == 1.0 and shadow.shadow_scale.shape == ()
    assert (shadow.transform, shadow.inference) == ("translate", "shadow")
    x = _x(1, (2, 6, 6))
    with torch.no_grad():
        assert torch.equal(shadow.eval()(x), conv(x))  # a = 1, reflect padding kept


# ---------------------------------------------------------------- add_shadow_weights


def test_add_shadow_weights_on_cnn_replaces_all_convs():
    plain = build_model("cnn", CNN_SHAPE, 3, seed=0)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    model = add_shadow_weights(plain)
    assert model is plain
    assert conv_layer_names(model) == ["conv1", "conv2"]
    assert isinstance(model.conv1, ShadowConv2d) and isinstance(model.conv2, ShadowConv2d)
    after = model.state_dict()
    assert set(after) - set(before) == {"conv1.shadow_scale", "conv2.shadow_scale"}
    assert set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_add_shadow_weights_single_layer():
    model = _cnn(layers="conv2")
    assert isinstance(model.conv2, ShadowConv2d)
    assert type(model.conv1) is nn.Conv2d
    assert [k for k in model.state_dict() if k.endswith("shadow_scale")] == ["conv2.shadow_scale"]


def test_unknown_layer_names_allowed_ones():
    with pytest.raises(ValueError, match=r"conv9.*conv1.*conv2"):
        _cnn(layers=["conv9"])
    with pytest.raises(ValueError, match="fc1"):
        _cnn(layers="fc1")


def test_wrapping_twice_refused():
    model = _cnn()
    with pytest.raises(ValueError, match="already"):
        add_shadow_weights(model, layers="conv1")


def test_global_rng_untouched():
    model = build_model("cnn", CNN_SHAPE, 3, seed=0)
    state = torch.get_rng_state()
    add_shadow_weights(model).train()
    with torch.no_grad():
        model(_x())
    assert torch.equal(torch.get_rng_state(), state)


def test_resnet20_forward_and_shortcuts():
    model = add_shadow_weights(build_model("resnet20", (3, 8, 8), 10, seed=0), seed=1)
    names = conv_layer_names(model)
    assert "layer2.0.shortcut.0" in names and len(names) == 21
    assert all(isinstance(model.get_submodule(n), ShadowConv2d) for n in names)
    x = _x(2, (3, 8, 8))
    with torch.no_grad():
        out = model.train()(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert model.eval()(x).shape == (2, 10)
