"""BatchNorm recomputation: hand-worked moments, federated == central, exactness."""

import copy

import pytest
import torch
from torch import nn

from fedwa.core.bn import (
                           batchnorm_layers,
                           bn_moments,
                           combine_moments,
                           federated_recompute_bn,
                           has_batchnorm,
                           moments_to_stats,
                           recompute_bn,
                           set_bn_stats,
                           )
from fedwa.models import build_model

X1 = torch.tensor([[1.0, 2.0], [3.0, 6.0]])


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    # Random BN scales/shifts and running stats, so no layer is an identity by accident.
    g = torch.Generator().manual_seed(seed)
    for _, bn in batchnorm_layers(model):
        with torch.no_grad():
            bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))
    return model


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _eval_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each BN layer's eval-mode input over all of x, as [C, values]."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0].transpose(0, 1).reshape(module.num_features, -1).double()
        return hook

    hooks = [bn.register_forward_hook(keep(name)) for name, bn in batchnorm_layers(model)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_moments_and_stats_by_hand_1d():
    model = nn.Sequential(nn.BatchNorm1d(2))
    moments = bn_moments(model, X1)
    n, s, ss = moments["0"]
    # count 2 rows; sums 1+3=4, 2+6=8; squares 1+9=10, 4+36=40
    assert n.dtype == s.dtype == ss.dtype == torch.float64
    assert n.item() == 2.0
    assert s.tolist() == [4.0, 8.0] and ss.tolist() == [10.0, 40.0]
    mean, var = moments_to_stats(moments)["0"]
    # mean [4/2, 8/2]; var [10/2 - 2^2, 40/2 - 4^2] = [1, 4] (population, not unbiased [2, 8])
    assert mean.dtype == var.dtype == torch.float32
    assert mean.tolist() == [2.0, 4.0] and var.tolist() == [1.0, 4.0]


def test_batchnorm2d_counts_n_h_w_per_channel():
    model = nn.Sequential(nn.BatchNorm2d(2))
    x = torch.arange(12.0).reshape(2, 2, 1, 3)
    n, s, ss = bn_moments(model, x)["0"]
    # channel 0: 0,1,2 (example 0) and 6,7,8 (example 1); channel 1: 3,4,5 and 9,10,11
    assert n.item() == 2 * 1 * 3
    assert s.tolist() == [24.0, 42.0]
    assert ss.tolist() == [0 + 1 + 4 + 36 + 49 + 64, 9 + 16 + 25 + 81 + 100 + 121]
    mean, var = moments_to_stats(bn_moments(model, x))["0"]
    # 154/6 - 4^2 = 352/6 - 7^2 = 29/3
    torch.testing.assert_close(mean, torch.tensor([4.0, 7.0]))
    torch.testing.assert_close(var, torch.tensor([29 / 3, 29 / 3]))


def test_combine_adds_up_parts_and_batch_size_does_not_matter():
    model = nn.Sequential(nn.BatchNorm1d(2))
    parts = [bn_moments(model, X1[:1]), bn_moments(model, X1[1:])]
    whole = combine_moments(parts)["0"]
    assert [t.tolist() for t in whole] == [2.0, [4.0, 8.0], [10.0, 40.0]]
    assert [t.tolist() for t in bn_moments(model, X1, batch_size=1)["0"]] == \
           [2.0, [4.0, 8.0], [10.0, 40.0]]
    empty = bn_moments(model, X1[:0])["0"]
    assert [t.tolist() for t in empty] == [0.0, [0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ValueError):
        moments_to_stats({"0": empty})
    with pytest.raises(ValueError):
        combine_moments([])


def test_variance_clamped_at_zero():
    # ss/n - mean^2 = 1.9/2 - 1 = -0.05 from rounding-like noise -> 0
    moments = {"a": (torch.tensor(2.0, dtype=torch.float64),
                     torch.tensor([2.0], dtype=torch.float64),
                     torch.tensor([1.9], dtype=torch.float64))}
    assert moments_to_stats(moments)["a"][1].tolist() == [0.0]


def test_layers_restricts_measurement():
    model = build_model("cnn", (1, 8, 8), 10)
    assert [n for n, _ in batchnorm_layers(model)] == ["bn1", "bn2"]
    assert list(bn_moments(model, torch.randn(3, 1, 8, 8), layers=["bn2"])) == ["bn2"]
    with pytest.raises(KeyError):
        bn_moments(model, torch.randn(3, 1, 8, 8), layers=["conv1"])


def test_stacked_layers_by_hand_need_sequential_passes():
    # x = [1, 3]: layer 1 must get mean 2, var 1; it maps x to [-1, 1] (eps = 0), so layer 2
    # must get mean 0, var 1. One joint pass measures layer 2 with layer 1's OLD statistics
    # (mean 0, var 1: identity), i.e. mean 2, var 1 -- wrong; a second pass corrects it.
    def make():
        return nn.Sequential(nn.BatchNorm1d(1, eps=0.0), nn.BatchNorm1d(1, eps=0.0))

    x = torch.tensor([[1.0], [3.0]])
    exact = recompute_bn(make(), x)
    assert [exact[0].running_mean.item(), exact[0].running_var.item()] == [2.0, 1.0]
    assert [exact[1].running_mean.item(), exact[1].running_var.item()] == [0.0, 1.0]
    one = recompute_bn(make(), x, passes=1)
    assert [one[1].running_mean.item(), one[1].running_var.item()] == [2.0, 1.0]
    two = recompute_bn(make(), x, passes=2)
    assert [two[1].running_mean.item(), two[1].running_var.item()] == [0.0, 1.0]
    fed = federated_recompute_bn(make(), [x[:1], x[1:]])
    assert [fed[1].running_mean.item(), fed[1].running_var.item()] == [0.0, 1.0]


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_federated_equals_central_and_batch_size_free(name):
    model = _randomise(build_model(name, (1, 8, 8), 10, seed=0))
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    clients = [x[:5], x[5:28], x[28:]]
    central = _buffers(recompute_bn(copy.deepcopy(model), x))
    federated = _buffers(federated_recompute_bn(copy.deepcopy(model), clients, batch_size=4))
    small = _buffers(recompute_bn(copy.deepcopy(model), x, batch_size=7))
    before = _buffers(model)
    assert set(central) == set(before) and len(central) == 2 * len(batchnorm_layers(model))
    for key in central:
        assert not torch.allclose(central[key], before[key], atol=1e-3), key
        torch.testing.assert_close(federated[key], central[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(small[key], central[key], rtol=1e-5, atol=1e-5)


def test_exact_statistics_of_eval_inputs():
    model = _randomise(build_model("resnet20", (1, 8, 8), 10, seed=3), seed=3)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    def mismatch(m: nn.Module) -> float:
        worst = 0.0
        inputs = _eval_inputs(m, x)
        for name, bn in batchnorm_layers(m):
            v = inputs[name]
            mean, var = v.mean(dim=1), v.var(dim=1, unbiased=False)
            worst = max(worst, (bn.running_mean.double() - mean).abs().max().item(),
                        (bn.running_var.double() - var).abs().max().item()
                        / var.abs().max().item())
        return worst

    exact = recompute_bn(copy.deepcopy(model), x)
    assert mismatch(exact) < 1e-4
    # One joint pass leaves deeper layers measured under stale upstream statistics.
    assert mismatch(recompute_bn(copy.deepcopy(model), x, passes=1)) > 1e-2


def test_model_without_bn_unchanged():
    model = build_model("mlp", (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not has_batchnorm(model)
    # A wrongly shaped input proves that no forward pass runs.
    assert recompute_bn(model, torch.zeros(3, 5)) is model
    assert recompute_bn(model, torch.zeros(3, 5), passes=2) is model
    assert federated_recompute_bn(model, [torch.zeros(3, 5)]) is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_flags_restored_and_num_batches_tracked_untouched():
    model = _randomise(build_model("cnn", (1, 8, 8), 10))
    model.train()
    model.bn2.eval()
    for _, bn in batchnorm_layers(model):
        bn.num_batches_tracked.fill_(7)
    flags = {n: m.training for n, m in model.named_modules()}
    recompute_bn(model, torch.randn(6, 1, 8, 8), batch_size=4)
    federated_recompute_bn(model, [torch.randn(3, 1, 8, 8), torch.randn(2, 1, 8, 8)])
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(bn.num_batches_tracked.item() == 7 for _, bn in batchnorm_layers(model))


def test_set_bn_stats_keeps_buffer_dtype_and_other_layers():
    model = build_model("cnn", (1, 8, 8), 10).double()
    set_bn_stats(model, {"bn1": (torch.full((16,), 2.0), torch.full((16,), 3.0))})
    assert model.bn1.running_mean.dtype == torch.float64
    assert model.bn1.running_mean.tolist() == [2.0] * 16
    assert model.bn1.running_var.tolist() == [3.0] * 16
    assert model.bn2.running_mean.tolist() == [0.0] * 32  # untouched default
    with pytest.raises(KeyError):
        set_bn_stats(model, {"fc1": (torch.zeros(1), torch.ones(1))})
