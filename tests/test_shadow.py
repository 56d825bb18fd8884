import copy
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Names added with the "reference" transform, the scale init and the evaluation seed are
# reached through the module, so that on an older fedwa.core.shadow only the tests using them
# fail, not the whole file at import.
from fedwa.core import shadow
from fedwa.models import build_model
from fedwa.core.shadow import (
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
AFFINE = ("resize-crop", "translate")


def _cnn(**kwargs):
    return add_shadow_weights(build_model("cnn", CNN_SHAPE, 3, seed=0), **kwargs)


def _x(n=2, shape=CNN_SHAPE, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _seeded_conv(*args, seed=0, **kwargs):
    """A ShadowConv2d whose default (global-RNG) weight initialisation is seeded, without
    moving the caller's global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ShadowConv2d(*args, **kwargs)


def _passes(model, x, n=8):
    """``n`` forward passes without gradients, stacked: several independent draws, so that a
    "reference" layer (whole kernel kept in ~84% of the draws) is perturbed in some."""
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(n)])


# ---------------------------------------------------------------- kernel transforms


@pytest.mark.parametrize("transform", AFFINE)
def test_unit_scale_no_shift_is_identity(transform):
    # With align_corners=False the identity grid lands on the pixel centres; the only error
    # is float64 rounding of the normalised grid (~1e-16 per coordinate).
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = transform_kernel(w, transform, AffineParams(1.0, 0.0, 0.0))
    torch.testing.assert_close(out, w, rtol=0.0, atol=1e-12)


def test_reference_whole_kernel_crop_is_the_weight_itself():
    w = torch.randn(2, 3, 3, 3)
    assert transform_kernel(w, "reference", shadow.CropParams(0, 0, 3, 3)) is w
    with pytest.raises(ValueError, match="CropParams"):
        transform_kernel(w, "reference", AffineParams(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="AffineParams"):
        transform_kernel(w, "translate", shadow.CropParams(0, 0, 3, 3))
    with pytest.raises(ValueError, match="does not fit"):
        shadow.resized_crop(w, shadow.CropParams(2, 0, 2, 3))


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


def test_reference_resize_of_two_rows_hand_worked():
    # Rows 0-1 of a 3 x 3 kernel (a 2 x 3 crop) stretched to 3 rows: output row r reads source
    # row y = (r + 0.5) * 2/3 - 0.5 = -1/6, 1/2, 7/6, i.e. row 0 (clamped at the top edge),
    # the midpoint of rows 0 and 1, and row 1 (clamped at the bottom edge of the crop). The
    # columns keep their size, so they are copied unchanged.
    k = torch.tensor([[1.0, 2.0, 4.0], [3.0, 8.0, -2.0], [100.0, 100.0, 100.0]],
                     dtype=torch.float64).reshape(1, 1, 3, 3)
    row0, row1 = k[0, 0, 0], k[0, 0, 1]
    out = transform_kernel(k, "reference", shadow.CropParams(0, 0, 2, 3))
    torch.testing.assert_close(out[0, 0], torch.stack([row0, (row0 + row1) / 2, row1]),
                               rtol=0.0, atol=1e-12)
    # The same along the columns: columns 1-2 (a 3 x 2 crop at left = 1).
    out = transform_kernel(k, "reference", shadow.CropParams(0, 1, 3, 2))
    col1, col2 = k[0, 0, :, 1], k[0, 0, :, 2]
    torch.testing.assert_close(out[0, 0], torch.stack([col1, (col1 + col2) / 2, col2], dim=1),
                               rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("kernel", [(3, 3), (5, 5), (3, 5)])
def test_reference_resize_equals_torchvision_resized_crop(kernel):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    kh, kw = kernel
    w = torch.randn(4, 3, kh, kw, generator=torch.Generator().manual_seed(0))
    crops = [shadow.CropParams(i, j, h, ww) for h in range(1, kh + 1) for ww in range(1, kw + 1)
             for i in range(kh - h + 1) for j in range(kw - ww + 1)]
    for params in crops:
        expected = tvf.resized_crop(w, *params, [kh, kw],
                                    interpolation=tvf.InterpolationMode.BILINEAR,
                                    antialias=True)
        torch.testing.assert_close(shadow.resized_crop(w, params), expected,
                                   msg=lambda m, p=params: f"{p}: {m}")


def test_reference_is_differentiable_in_the_weight():
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True,
                    generator=torch.Generator().manual_seed(0))
    for params in (shadow.CropParams(1, 0, 2, 3), shadow.CropParams(0, 1, 3, 2),
                   shadow.CropParams(0, 0, 3, 3)):
        assert torch.autograd.gradcheck(
            lambda v, p=params: transform_kernel(v, "reference", p), (w,))


def test_reference_unchanged_fraction_matches_the_analytic_probability():
    # Hand-worked for a 3 x 3 kernel (area 9): target area t ~ U(7.2, 9), aspect r with
    # ln r ~ U(-L, L), L = ln(4/3); w = round(sqrt(t r)), h = round(sqrt(t / r)) are 2 or 3
    # (sqrt(t r) lies in [2.32, 3.47]), never both 2 (w h ~ t >= 7.2 > 2.5**2), so every
    # first attempt fits. The kernel is unchanged iff w = h = 3, i.e. t r >= 6.25 and
    # t / r >= 6.25, i.e. |ln r| <= ln(t / 6.25), which always holds once t >= 6.25 * 4/3:
    #   P = (1/1.8) [ (9 - 25/3) + (1/L) * int_{7.2}^{25/3} ln(t / 6.25) dt ]
    # with int ln(t/c) dt = t ln(t/c) - t: P = 0.843926...
    c, L = 6.25, math.log(4.0 / 3.0)

    def antiderivative(t):
        return t * math.log(t / c) - t

    analytic = ((9.0 - 25.0 / 3.0) + (antiderivative(25.0 / 3.0) - antiderivative(7.2)) / L) / 1.8
    # The same integral on a fine midpoint grid, as a check of the algebra.
    t = np.linspace(7.2, 9.0, 100_001)
    t = (t[1:] + t[:-1]) / 2
    assert np.mean(np.minimum(1.0, np.log(t / c) / L)) == pytest.approx(analytic, abs=1e-9)
    assert analytic == pytest.approx(0.843926, abs=1e-6)

    n = 4000
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(123)
    unchanged = sum(kernel_transform(w, "reference", g) is w for _ in range(n))
    std = math.sqrt(analytic * (1.0 - analytic) / n)  # binomial, ~0.0057
    assert abs(unchanged / n - analytic) < 4 * std, unchanged / n


@pytest.mark.parametrize("kernel", [(3, 3), (5, 5)])
def test_sample_crop_has_the_distribution_of_torchvision(kernel):
    transforms = pytest.importorskip("torchvision.transforms")
    n = 3000
    g = torch.Generator().manual_seed(7)
    ours = Counter(tuple(shadow.sample_crop(kernel, g)) for _ in range(n))
    with torch.random.fork_rng():  # torchvision draws from the global RNG
        torch.manual_seed(7)
        image = torch.zeros(1, *kernel)
        theirs = Counter(transforms.RandomResizedCrop.get_params(image, [0.8, 1.0],
                                                                 [3 / 4, 4 / 3])
                         for _ in range(n))
    for crop in set(ours) | set(theirs):
        p = (ours[crop] + theirs[crop]) / (2 * n)
        # Difference of two binomial frequencies: std sqrt(2 p (1 - p) / n).
        assert abs(ours[crop] - theirs[crop]) / n <= 5 * math.sqrt(2 * p * (1 - p) / n) + 1e-9, \
            (crop, ours[crop], theirs[crop])


@pytest.mark.parametrize("kernel", [(3, 3), (1, 3), (3, 1), (2, 7)])
def test_sample_crop_falls_back_to_torchvision_centre_crop(kernel):
    # With a tiny area every attempt rounds a side to 0 and is rejected: both take the
    # deterministic centre crop (the whole kernel when its aspect ratio is within range).
    # Largest side tried: sqrt(14 * 0.002 * 4/3) = 0.19 < 0.5, which rounds to 0.
    transforms = pytest.importorskip("torchvision.transforms")
    scale = (0.001, 0.002)
    ours = shadow.sample_crop(kernel, torch.Generator().manual_seed(0), scale=scale)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = transforms.RandomResizedCrop.get_params(torch.zeros(1, *kernel), list(scale),
                                                         [3 / 4, 4 / 3])
    assert tuple(ours) == tuple(theirs) == tuple(shadow.centre_crop(kernel))
    assert tuple(shadow.centre_crop((3, 3))) == (0, 0, 3, 3)
    assert tuple(shadow.centre_crop((1, 3))) == (0, 1, 1, 1)  # width cut to round(4/3) = 1


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_one_random_map_shared_by_all_kernels(transform):
    # Identical kernels in every (out, in) slot must stay identical after the transform.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 3, 3, generator=g)
    w = base.repeat(4, 2, 1, 1)
    changed = 0
    for _ in range(20):
        out = kernel_transform(w, transform, g)
        assert torch.equal(out, out[:1, :1].expand_as(out))
        changed += not torch.allclose(out[0, 0], base[0, 0])
    assert changed > 0


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


def test_unknown_scale_init_rejected():
    with pytest.raises(ValueError, match="scale_init"):
        _cnn(scale_init="normal")
    with pytest.raises(ValueError, match="scale_init"):
        ShadowConv2d(1, 1, 3, scale_init="zero")


# ---------------------------------------------------------------- defaults and scale init


def test_defaults_are_the_authors_transform_and_a_unit_scale():
    # The transform is the authors'; the scale starts at 1 (a documented departure: plain
    # inference would feed the BN 1/a times what it was trained on), U(0, 1) on request.
    conv = ShadowConv2d(2, 3, 3)
    assert conv.transform == "reference"
    assert conv.shadow_scale.item() == 1.0
    model = _cnn(seed=5)
    assert model.conv1.transform == model.conv2.transform == "reference"
    assert ShadowConv2d.from_conv(nn.Conv2d(1, 1, 3)).transform == "reference"
    assert all(model.get_submodule(n).shadow_scale.item() == 1.0 for n in ("conv1", "conv2"))
    uniform = ShadowConv2d(2, 3, 3, scale_init="uniform")
    assert uniform.shadow_scale.item() == pytest.approx(shadow.initial_scale("uniform", 0))


def test_scale_init_uniform_is_seeded_per_layer():
    a = _cnn(seed=3, scale_init="uniform")
    b = _cnn(seed=3, scale_init="uniform")
    c = _cnn(seed=4, scale_init="uniform")
    scales = [[m.get_submodule(n).shadow_scale.item() for n in ("conv1", "conv2")]
              for m in (a, b, c)]
    assert scales[0] == scales[1]  # same seed, same a, bit for bit
    assert scales[0][0] != scales[0][1]  # one draw per layer
    assert scales[0] != scales[2]
    assert all(0.0 <= s < 1.0 for row in scales for s in row)
    # A layer's a depends on its (seed, index), not on which other layers are selected.
    only = _cnn(seed=3, layers=["conv2"], scale_init="uniform")
    assert only.conv2.shadow_scale.item() == scales[0][1]


def test_scale_init_leaves_the_layer_generator_and_global_rngs_alone():
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    model = _cnn(seed=2, scale_init="uniform")
    assert torch.equal(torch.get_rng_state(), torch_state)
    numpy_after = np.random.get_state()
    assert numpy_after[0] == numpy_state[0] and np.array_equal(numpy_after[1], numpy_state[1])
    # The transforms' stream is exactly the one seeded from (seed, index), not advanced by
    # drawing a.
    twin = _cnn(seed=2, scale_init="one")
    assert torch.equal(model.conv1.generator.get_state(), twin.conv1.generator.get_state())
    reseed_shadow(twin, 2)
    assert torch.equal(model.conv2.generator.get_state(), twin.conv2.generator.get_state())


def test_scale_init_one_gives_unit_scales():
    model = _cnn(seed=3, scale_init="one")
    assert all(model.get_submodule(n).shadow_scale.item() == 1.0 for n in ("conv1", "conv2"))
    conv = ShadowConv2d.from_conv(nn.Conv2d(2, 2, 3), scale_init="one")
    assert conv.shadow_scale.item() == 1.0


def test_task_threads_scale_init_from_the_config():
    from fedwa.data.task import make_plain_model

    data = SimpleNamespace(input_shape=CNN_SHAPE, num_classes=3)
    config = {"seed": 0, "model": "cnn", "model-width": 1, "was-layers": "all",
              "was-transform": "reference", "was-inference": "plain"}

    def scales(model):
        return [model.get_submodule(n).shadow_scale.item() for n in ("conv1", "conv2")]

    one = make_plain_model({**config, "was-scale-init": "one"}, data)
    assert scales(one) == [1.0, 1.0]
    uniform = make_plain_model({**config, "was-scale-init": "uniform"}, data)
    assert scales(uniform) == scales(_cnn(seed=0, scale_init="uniform"))
    assert scales(make_plain_model(config, data)) == scales(one)  # default: one
    assert uniform.conv1.transform == "reference"


# ---------------------------------------------------------------- ShadowConv2d


def test_eval_plain_is_exactly_the_plain_conv_and_draws_nothing():
    model = _cnn()
    x = _x()
    model.eval()
    conv = model.conv1
    with torch.no_grad():
        conv.shadow_scale.fill_(0.5)  # must be ignored by the plain mode
    state = conv.generator.get_state()
    expected = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    assert torch.equal(conv(x), expected)
    assert torch.equal(conv(x), expected)
    assert torch.equal(conv.generator.get_state(), state)
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_eval_shadow_uses_a_fresh_random_transform(transform):
    # Desire-oriented mode: a * T(W) with T drawn at every forward pass, as in training.
    model = _cnn(inference="shadow", transform=transform).eval()
    x = _x()
    conv = model.conv1
    with torch.no_grad():
        conv.shadow_scale.fill_(0.7)
        conv.reseed(9)
        outputs = [conv(x) for _ in range(10)]
        conv.reseed(9)
        expected = [F.conv2d(x, conv.shadow_scale * kernel_transform(conv.weight, transform,
                                                                     conv.generator),
                             None, conv.stride, conv.padding) for _ in range(10)]
    for out, exp in zip(outputs, expected):
        assert torch.equal(out, exp)
    # Two passes can differ, and at least one pass is not a * W.
    assert any(not torch.equal(o, outputs[0]) for o in outputs[1:])
    scaled = F.conv2d(x, 0.7 * conv.weight, None, conv.stride, conv.padding)
    assert any(not torch.allclose(o, scaled) for o in outputs)


def test_eval_shadow_repeats_after_a_reseed():
    model = _cnn(inference="shadow").eval()
    x = _x()
    reseed_shadow(model, shadow.evaluation_seed(0, 3))
    first = _passes(model, x)
    reseed_shadow(model, shadow.evaluation_seed(0, 3))
    second = _passes(model, x)
    assert torch.equal(first, second)
    assert any(not torch.equal(first[k], first[0]) for k in range(1, len(first)))
    reseed_shadow(model, shadow.evaluation_seed(0, 4))  # another round, other draws
    assert not torch.equal(_passes(model, x), first)


def test_evaluation_seed_is_reproducible_and_separate():
    seeds = {shadow.evaluation_seed(s, r) for s in range(3) for r in range(5)}
    assert len(seeds) == 15
    assert shadow.evaluation_seed(1, 2) == shadow.evaluation_seed(1, 2)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError):
        shadow.evaluation_seed(-1, 0)


def test_eval_shadow_depends_on_batching():
    # One draw per forward pass: the same examples split in two batches see two transforms.
    model = _cnn(inference="shadow", transform="translate").eval()
    x = _x(4)
    with torch.no_grad():
        reseed_shadow(model, 1)
        whole = model(x)
        reseed_shadow(model, 1)
        halves = torch.cat([model(x[:2]), model(x[2:])])
    # the first batch draws the same transform (a batch of 4 and one of 2 may round apart)
    assert torch.allclose(whole[:2], halves[:2], rtol=0, atol=1e-6)
    assert not torch.allclose(whole[2:], halves[2:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_train_passes_differ_unless_reseeded(transform):
    model = _cnn(transform=transform).train()
    x = _x()
    runs = _passes(model, x)
    assert any(not torch.allclose(runs[k], runs[0]) for k in range(1, len(runs)))
    reseed_shadow(model, 11)
    a = _passes(model, x)
    reseed_shadow(model, 11)
    b = _passes(model, x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_same_seed_same_transforms_different_seed_differs(transform):
    x = _x()
    a = _passes(_cnn(seed=3, transform=transform).train(), x)
    b = _passes(_cnn(seed=3, transform=transform).train(), x)
    c = _passes(_cnn(seed=4, transform=transform).train(), x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def _shadow_weights(conv, n=8):
    with torch.no_grad():
        return torch.stack([conv.shadow_weight() for _ in range(n)])


def _some_perturbed(draws, conv):
    # Equal streams are only evidence if some draws actually changed the kernels.
    with torch.no_grad():
        scaled = conv.shadow_scale * conv.weight
    return any(not torch.equal(d, scaled) for d in draws)


def test_layer_stream_independent_of_selection():
    # A layer's generator is seeded from (seed, its index among all convs), not its rank
    # among the selected ones.
    full, only = _cnn(seed=2), _cnn(seed=2, layers=["conv2"])
    draws = _shadow_weights(full.conv2)
    assert torch.equal(draws, _shadow_weights(only.conv2))
    assert _some_perturbed(draws, full.conv2)


def test_deepcopy_keeps_generator_state():
    model = _cnn()
    model.conv1.shadow_weight()
    twin = copy.deepcopy(model)
    draws = _shadow_weights(model.conv1)
    assert torch.equal(draws, _shadow_weights(twin.conv1))
    assert _some_perturbed(draws, model.conv1)


def test_gradients_reach_weight_and_scale():
    # Without a normalisation after it (see the BatchNorm tests below) every shadow conv's
    # scale and weight get a gradient through T.
    model = nn.Sequential(_seeded_conv(1, 2, 3, generator_seed=0), nn.ReLU(),
                          _seeded_conv(2, 2, 3, generator_seed=1, seed=1)).train()
    model(_x()).square().sum().backward()
    for conv in (model[0], model[2]):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert conv.shadow_scale.grad is not None and conv.shadow_scale.grad.abs() > 1e-3


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_scale_gradient_matches_chain_rule(transform):
    # d/da sum(conv(x; a T(W))) = sum(conv(x; T(W))) since the conv is linear in its weight.
    conv = _seeded_conv(2, 3, 3, bias=False, transform=transform, generator_seed=0)
    x = _x(1, (2, 5, 5))
    conv(x).sum().backward()
    conv.reseed(0)
    with torch.no_grad():
        tw = kernel_transform(conv.weight, conv.transform, conv.generator)
        expected = F.conv2d(x, tw).sum()
    torch.testing.assert_close(conv.shadow_scale.grad, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- what the scale does (not) under BatchNorm


def _head(conv, batchnorm, eps=1e-5):
    """conv -> (BatchNorm) -> ReLU -> linear head, on 3 x 6 x 6 inputs."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        head = nn.Linear(conv.out_channels * 36, 5)
    norm = [nn.BatchNorm2d(conv.out_channels, eps=eps)] if batchnorm else []
    return nn.Sequential(conv, *norm, nn.ReLU(), nn.Flatten(), head).train()


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)


def _gradients_and_drift(batchnorm, steps=20, eps=1e-5):
    """|dL/da| / ||dL/dW|| at the start, and how far a moved in ``steps`` plain SGD steps
    with momentum and no weight decay."""
    conv = _seeded_conv(3, 4, 3, padding=1, bias=False, generator_seed=0, scale_init="uniform")
    model = _head(conv, batchnorm, eps)
    x, y = _batch()
    a0 = conv.shadow_scale.item()
    F.cross_entropy(model(x), y).backward()
    ratio = conv.shadow_scale.grad.abs().item() / conv.weight.grad.norm().item()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    w0 = conv.weight.detach().clone()
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    weight_moved = ((conv.weight - w0).norm() / w0.norm()).item()
    return ratio, abs(conv.shadow_scale.item() - a0) / a0, weight_moved


def test_scale_learns_where_no_batchnorm_follows():
    # conv -> ReLU -> linear: a is a gain of the layer, dL/da = sum(dL/dy * z) is of the
    # order of dL/dW (measured 0.03-0.3 of ||dL/dW|| over 10 init seeds), and a moves by O(1)
    # (measured ~3.4 relative) in 20 steps.
    ratio, scale_moved, weight_moved = _gradients_and_drift(batchnorm=False)
    assert ratio > 1e-2
    assert scale_moved > 0.1 and weight_moved > 0.1


def test_scale_cancels_under_train_mode_batchnorm():
    # conv -> BN (train) -> ...: BN(a z) = BN(z) for a > 0 up to eps, so dL/da is ~0 next to
    # dL/dW (measured 1e-7..4e-5 over 10 init seeds) and without weight decay a stays where
    # it started (measured ~3e-4 relative in 20 steps) while W moves by O(1).
    ratio, scale_moved, weight_moved = _gradients_and_drift(batchnorm=True)
    assert ratio < 1e-3
    assert scale_moved < 1e-2 and weight_moved > 0.1
    # The cancellation goes through eps only: with eps as large as the variance of z, the
    # loss depends on a again.
    ratio_large_eps, _, _ = _gradients_and_drift(batchnorm=True, steps=0, eps=1.0)
    assert ratio_large_eps > 100 * ratio


@pytest.mark.parametrize("bias", [False, True])
def test_batchnorm_output_is_invariant_to_the_scale(bias):
    # Hand-derived: in train mode BN sees a z + b with batch mean a mu + b and (biased)
    # variance a**2 var, so BN(a z + b) = a (z - mu) / sqrt(a**2 var + eps)
    # = (z - mu) / sqrt(var + eps / a**2): BN(z) up to eps, with or without a conv bias.
    conv = _seeded_conv(3, 4, 3, padding=1, bias=bias, generator_seed=0)
    bn = nn.BatchNorm2d(4).train()  # affine weight 1, bias 0
    x, _ = _batch()
    with torch.no_grad():
        conv.shadow_scale.fill_(1.0)
        conv.reseed(4)  # the same T for every a
        z = conv(x) - (conv.bias.view(1, -1, 1, 1) if bias else 0.0)
        mu = z.mean(dim=(0, 2, 3), keepdim=True)
        var = z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        outputs = {}
        for a in (1.0, 0.3, 0.05):
            conv.shadow_scale.fill_(a)
            conv.reseed(4)
            convolved = conv(x)
            assert a == 1.0 or not torch.allclose(convolved, z)  # the conv's output scales
            outputs[a] = bn(convolved)
            torch.testing.assert_close(outputs[a], (z - mu) / torch.sqrt(var + bn.eps / a**2),
                                       rtol=1e-4, atol=1e-4)
    # Where a**2 var >> eps the scale is invisible after the BN: the outputs differ by the
    # factor sqrt((var + eps) / (var + eps / a**2)) = 1 - O(eps / (a**2 var)).
    assert (0.3**2 * var).min() > 100 * bn.eps
    torch.testing.assert_close(outputs[0.3], outputs[1.0], rtol=1e-2, atol=1e-2)


def test_one_by_one_shadow_conv_trains_on_scaled_weight():
    conv = nn.Conv2d(3, 2, 1, stride=2, bias=True)
    shadow_conv = ShadowConv2d.from_conv(conv, generator_seed=0).train()
    with torch.no_grad():
        shadow_conv.shadow_scale.fill_(1.5)
        x = _x(1, (3, 4, 4))
        expected = F.conv2d(x, shadow_conv.shadow_scale * shadow_conv.weight, shadow_conv.bias,
                            stride=2)
        assert torch.equal(shadow_conv(x), expected)


def test_from_conv_copies_config_and_weights_without_sharing():
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2, bias=True,
                     padding_mode="reflect")
    copied = ShadowConv2d.from_conv(conv, "translate", "shadow", 7, scale_init="one")
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                 "dilation", "groups", "padding_mode"):
        assert getattr(copied, attr) == getattr(conv, attr)
    assert torch.equal(copied.weight, conv.weight) and torch.equal(copied.bias, conv.bias)
    assert copied.weight.data_ptr() != conv.weight.data_ptr()
    assert copied.shadow_scale.item() == 1.0 and copied.shadow_scale.shape == ()
    assert (copied.transform, copied.inference) == ("translate", "shadow")
    x = _x(1, (2, 6, 6))
    plain = ShadowConv2d.from_conv(conv, "translate", "plain", 7)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), conv(x))  # reflect padding kept
    uniform = ShadowConv2d.from_conv(conv, "translate", "plain", 7, scale_init="uniform")
    # a is drawn in float64 and stored in the weight's dtype.
    assert uniform.shadow_scale.item() == torch.tensor(shadow.initial_scale("uniform", 7),
                                                       dtype=torch.float32).item()


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


@pytest.mark.parametrize("inference", ["plain", "shadow"])
def test_global_rng_untouched(inference):
    model = build_model("cnn", CNN_SHAPE, 3, seed=0)
    state = torch.get_rng_state()
    add_shadow_weights(model, inference=inference).train()
    with torch.no_grad():
        model(_x())
        model.eval()(_x())
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
