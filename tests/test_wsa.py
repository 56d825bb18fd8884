import math

import pytest
import torch
from torch import nn

from fedwa.models import build_model
from fedwa.core.wsa import (
                            fuse_scopes,
                            gaussian_kl,
                            scope_kl,
                            scope_layers,
                            scope_regulariser,
                            scopes,
                            scopes_from_tensors,
                            scopes_to_tensors,
                            )


def _log_normal_pdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize(
    "mu,sigma,mu_t,sigma_t",
    [(0.0, 1.0, 1.0, 2.0), (0.5, 0.7, -0.3, 1.5), (2.0, 1.5, 1.0, 0.8)],
)
def test_gaussian_kl_matches_numerical_integral(mu, sigma, mu_t, sigma_t):
    # KL(p || q) = integral p(x) (log p(x) - log q(x)) dx by the trapezoid rule on
    # [-20, 20] with step 2e-4 (200001 points, float64): the tails beyond +-20 carry
    # p < 1e-40 for every pair here, and the rule's error is O(h^2) ~ 1e-8.
    x = torch.linspace(-20.0, 20.0, 200_001, dtype=torch.float64)
    log_p = _log_normal_pdf(x, mu, sigma)
    log_q = _log_normal_pdf(x, mu_t, sigma_t)
    numeric = torch.trapezoid(log_p.exp() * (log_p - log_q), x)
    closed = gaussian_kl(
        torch.tensor(mu, dtype=torch.float64),
        torch.tensor(sigma, dtype=torch.float64),
        mu_t,
        sigma_t,
    )
    assert float(closed) == pytest.approx(float(numeric), abs=1e-4)


def test_gaussian_kl_hand_value_and_identity():
    # KL(N(0,1) || N(1,2^2)) = log(2/1) + (1 + (0-1)^2) / (2*4) - 1/2 = log 2 + 0.25 - 0.5
    kl = gaussian_kl(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0))
    assert float(kl) == pytest.approx(math.log(2) - 0.25, abs=1e-6)
    # log(s/s) = 0 and s^2 / (2 s^2) = 1/2 exactly in floating point, so KL is exactly 0.
    mu, sigma = torch.tensor([0.3, -2.0, 7.0]), torch.tensor([0.1, 1.0, 3.3])
    assert torch.equal(gaussian_kl(mu, sigma, mu, sigma), torch.zeros(3))
    # KL is not symmetric: KL(N(1,4) || N(0,1)) = log(1/2) + (4 + 1)/2 - 1/2 = 2 - log 2.
    assert float(gaussian_kl(1.0, 2.0, 0.0, 1.0)) == pytest.approx(2 - math.log(2), abs=1e-6)


def test_scopes_by_hand():
    # entries 1, 2, 3, 4: mu = 10/4 = 2.5;
    # var = ((-1.5)^2 + (-0.5)^2 + 0.5^2 + 1.5^2) / 4 = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    # (population: divide by 4, the unbiased estimate would give 5/3).
    state = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([5.0])}
    s = scopes(state, ["w", "b"])
    assert list(s) == ["w", "b"]
    mu, sigma = s["w"]
    assert mu.shape == () and sigma.shape == ()
    assert float(mu) == pytest.approx(2.5, abs=1e-6)
    assert float(sigma) == pytest.approx(math.sqrt(1.25), abs=1e-6)
    # A single entry has variance 0; sigma = sqrt(0 + 1e-12) = 1e-6 stays positive.
    assert float(s["b"][0]) == 5.0
    assert 0 < float(s["b"][1]) <= 1e-6 * 1.0001


def test_scopes_are_differentiable():
    w = nn.Parameter(torch.tensor([1.0, 3.0]))
    mu, sigma = scopes({"w": w}, ["w"])["w"]
    # mu = (w1 + w2) / 2 -> d mu / d w = [0.5, 0.5]
    mu.backward()
    assert torch.allclose(w.grad, torch.tensor([0.5, 0.5]))
    w.grad = None
    # sigma = sqrt(((w1 - mu)^2 + (w2 - mu)^2) / 2) = 1 -> d sigma / d w_i = (w_i - mu)/(n sigma)
    # = [-1, 1] / 2
    sigma.backward()
    assert torch.allclose(w.grad, torch.tensor([-0.5, 0.5]), atol=1e-6)


def test_scope_kl_sums_layers():
    # layer a: entries -1, 1 -> mu 0, sigma 1; target N(1, 2^2) -> log 2 - 0.25
    # layer b: entries 1, 3 -> mu 2, sigma 1; target N(2, 1) -> 0
    state = {"a": torch.tensor([-1.0, 1.0]), "b": torch.tensor([1.0, 3.0])}
    targets = {"a": (1.0, 2.0), "b": (torch.tensor(2.0), torch.tensor(1.0))}
    total = scope_kl(state, targets, ["a", "b"])
    assert total.shape == ()
    assert float(total) == pytest.approx(math.log(2) - 0.25, abs=1e-6)
    assert float(scope_kl(state, targets, ["b"])) == pytest.approx(0.0, abs=1e-6)
    assert float(scope_kl(state, targets, [])) == 0.0
    with pytest.raises(KeyError, match="'a'"):
        scope_kl(state, {"b": (2.0, 1.0)}, ["a", "b"])


def test_fuse_two_gaussians_by_hand():
    a = {"l": (torch.tensor(0.0), torch.tensor(1.0))}  # N(0, 1)
    b = {"l": (torch.tensor(2.0), torch.tensor(1.0))}  # N(2, 1)
    # 1:1 -> mu* = 0.5*0 + 0.5*2 = 1
    #        sigma*^2 = 0.5*(1 + 0^2) + 0.5*(1 + 2^2) - 1^2 = 0.5 + 2.5 - 1 = 2
    mu, sigma = fuse_scopes([a, b])["l"]
    assert mu.shape == () and sigma.shape == ()
    assert float(mu) == pytest.approx(1.0, abs=1e-6)
    assert float(sigma) ** 2 == pytest.approx(2.0, abs=1e-6)
    # 1:3 -> p = (0.25, 0.75): mu* = 0.75*2 = 1.5
    #        sigma*^2 = 0.25*(1 + 0) + 0.75*(1 + 4) - 1.5^2 = 0.25 + 3.75 - 2.25 = 1.75
    for weights in ([1, 3], [2.0, 6.0]):  # normalised, so only the ratio matters
        mu, sigma = fuse_scopes([a, b], weights)["l"]
        assert float(mu) == pytest.approx(1.5, abs=1e-6)
        assert float(sigma) ** 2 == pytest.approx(1.75, abs=1e-6)


@pytest.mark.parametrize("weights,p", [(None, 0.5), ([1, 3], 0.75)])
def test_fuse_matches_sampled_mixture(weights, p):
    # Draw from p0 N(0,1) + p1 N(2,1) and compare with the sample mean and variance. With
    # 200k draws the standard errors are ~0.003 (mean) and ~0.008 (variance), well inside 0.02.
    g = torch.Generator().manual_seed(0)
    n = 200_000
    second = torch.rand(n, generator=g) < p  # component N(2, 1) with probability p
    x = torch.randn(n, generator=g, dtype=torch.float64) + 2.0 * second
    a = {"l": (torch.tensor(0.0), torch.tensor(1.0))}
    b = {"l": (torch.tensor(2.0), torch.tensor(1.0))}
    mu, sigma = fuse_scopes([a, b], weights)["l"]
    assert float(mu) == pytest.approx(float(x.mean()), abs=0.02)
    assert float(sigma) ** 2 == pytest.approx(float(x.var(unbiased=False)), abs=0.02)


def test_fuse_rejects_mismatched_clients():
    a = {"l": (torch.tensor(0.0), torch.tensor(1.0))}
    with pytest.raises(ValueError):
        fuse_scopes([a, {"m": (torch.tensor(0.0), torch.tensor(1.0))}])
    with pytest.raises(ValueError):
        fuse_scopes([])
    with pytest.raises(ValueError):
        fuse_scopes([a, a], [1.0])


def _linear_with_weight():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # mu 2.5, sigma sqrt(1.25)
        layer.bias.zero_()
    return layer


def test_one_sgd_step_moves_scope_towards_target():
    layer = _linear_with_weight()
    mu_t, sigma_t = 0.0, 0.5
    reg = scope_regulariser({"weight": (mu_t, sigma_t)}, ["weight"], strength=1.0)
    lr = 0.01
    loss = reg(layer)
    # KL(N(2.5, 1.25) || N(0, 0.25)) = log(0.5/sqrt(1.25)) + (1.25 + 6.25)/0.5 - 0.5
    expected = math.log(0.5 / math.sqrt(1.25)) + 15 - 0.5
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert layer.bias.grad is None  # only the named layer is regularised
    with torch.no_grad():  # plain SGD step (no momentum), written out: w <- w - lr * grad
        layer.weight -= lr * layer.weight.grad
    mu0, sigma0 = 2.5, math.sqrt(1.25)
    mu1, sigma1 = (float(v) for v in scopes(layer.state_dict(), ["weight"])["weight"])
    assert abs(mu1 - mu_t) < abs(mu0 - mu_t)
    assert abs(sigma1 - sigma_t) < abs(sigma0 - sigma_t)
    # Exact step, n = 4 entries: dKL/dmu = (mu - mu*)/sigma*^2 = 2.5/0.25 = 10 and
    # dKL/dsigma = -1/sigma + sigma/sigma*^2 = -0.894427 + 4.472136 = 3.577709.
    # The step moves every entry by -lr*(dKL/dmu/n + dKL/dsigma*(w_i - mu)/(n sigma)), so
    # mu1 = mu0 - lr*10/4 = 2.475 and the deviations shrink by the factor
    # 1 - lr*dKL/dsigma/(n sigma), i.e. sigma1 = sigma0 - lr*3.577709/4 = 1.109090.
    assert mu1 == pytest.approx(2.475, abs=1e-5)
    g_sigma = -1 / sigma0 + sigma0 / sigma_t**2
    assert sigma1 == pytest.approx(sigma0 - lr * g_sigma / 4, abs=1e-5)


def test_regulariser_strength_scales_and_zero_gradient_at_target():
    layer = _linear_with_weight()
    targets = scopes(layer.state_dict(), ["weight"])  # the current scope itself
    reg = scope_regulariser(targets, ["weight"], strength=3.0)
    loss = reg(layer)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert layer.weight.grad.abs().max() < 1e-6
    # Away from the target, the value is strength * scope_kl.
    far = {"weight": (0.0, 0.5)}
    expected = 3.0 * float(scope_kl(layer.state_dict(), far, ["weight"]))
    assert float(scope_regulariser(far, ["weight"], 3.0)(layer).detach()) == pytest.approx(expected)
    with pytest.raises(ValueError):
        scope_regulariser(far, ["weight"], -1.0)
    with pytest.raises(KeyError):
        scope_regulariser(far, ["bias"], 1.0)


def test_scope_layers_mlp_and_cnn():
    mlp = build_model("mlp", (1, 4, 4), 3)
    assert scope_layers(mlp) == ["fc1.weight", "fc2.weight", "classifier.weight"]
    assert scope_layers(mlp, include="all") == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "classifier.weight",
        "classifier.bias",
    ]
    cnn = build_model("cnn", (1, 4, 4), 3)
    assert scope_layers(cnn) == ["conv1.weight", "conv2.weight", "fc1.weight", "classifier.weight"]
    # The convolutions have no bias; BN contributes its affine weight and bias, not its buffers.
    assert scope_layers(cnn, include="all") == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "conv2.weight",
        "bn2.weight",
        "bn2.bias",
        "fc1.weight",
        "fc1.bias",
        "classifier.weight",
        "classifier.bias",
    ]
    with pytest.raises(ValueError):
        scope_layers(cnn, include="biases")


def test_scope_layers_resnet_and_other_convs():
    resnet = build_model("resnet20", (1, 8, 8), 3)
    names = scope_layers(resnet)
    # stem conv + 3 stages * 3 blocks * 2 convs + 2 shortcut projections + classifier = 22
    assert len(names) == 22
    assert names[0] == "conv1.weight" and names[-1] == "classifier.weight"
    assert "layer2.0.shortcut.0.weight" in names and "layer2.0.shortcut.1.weight" not in names
    params = dict(resnet.named_parameters())
    assert all(n in params for n in names)
    model = nn.ModuleDict(
        {
            "a": nn.Conv1d(1, 2, 3),
            "e": nn.Embedding(4, 2),
            "c": nn.Conv3d(1, 2, 1),
            "n": nn.LayerNorm(2),
        }
    )
    assert scope_layers(model) == ["a.weight", "c.weight"]


def test_scopes_tensor_round_trip():
    s = {
        "layer1.0.conv1.weight": (torch.tensor(0.25), torch.tensor(1.5)),
        "classifier.weight": (torch.tensor(-3.0), torch.tensor(0.125)),
    }
    flat = scopes_to_tensors(s)
    assert list(flat) == [
        "layer1.0.conv1.weight.mu",
        "layer1.0.conv1.weight.sigma",
        "classifier.weight.mu",
        "classifier.weight.sigma",
    ]
    assert all(t.shape == (1,) for t in flat.values())
    back = scopes_from_tensors(flat)
    assert list(back) == list(s)
    for name, (mu, sigma) in s.items():
        assert back[name][0].shape == () and back[name][1].shape == ()
        assert torch.equal(back[name][0], mu) and torch.equal(back[name][1], sigma)
    with pytest.raises(ValueError):
        scopes_from_tensors({"a.mu": torch.tensor([1.0])})  # sigma missing
    with pytest.raises(ValueError):
        scopes_from_tensors({"a.mean": torch.tensor([1.0])})
