"""Trainable Weight Averaging: subspace geometry, analytic optima, layer-wise blocks, fitting."""

import io

import pytest
import torch
from torch import nn

from fedwa.models import build_model
from fedwa.twa import (
    Subspace,
    SubspaceOptimizer,
    fit_on_data,
    flatten,
    layer_blocks,
    learnable_names,
    unflatten,
)


def _candidates(n: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) for _ in range(n)]


def _hull_projection(candidates, target):
    """Nearest point to target in the candidates' affine hull, via a pseudo-inverse (float64)."""
    w = torch.stack(candidates).double()
    c = w.mean(0)
    centred = w - c
    return c + centred.T @ torch.linalg.pinv(centred.T) @ (target.double() - c)


def _assert_spans(s: Subspace, candidates) -> None:
    for w in candidates:
        d = w - s.centre
        torch.testing.assert_close(s.basis.T @ (s.basis @ d), d, rtol=0, atol=1e-5)


def test_basis_orthonormal_and_spans_candidates():
    cands = _candidates(5, 50)
    s = Subspace.from_candidates(cands)
    assert s.dim == 4 and s.basis.shape == (4, 50) and s.blocks == [(0, 50)]
    torch.testing.assert_close(s.basis @ s.basis.T, torch.eye(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.centre, torch.stack(cands).mean(0))
    _assert_spans(s, cands)


def test_rank_deficient_candidates_drop_to_affine_rank():
    a, b, c = _candidates(3, 30, seed=1)
    # A duplicate in the middle and an affine combination at the end: the hull of {a, b, c}.
    cands = [a, a, b, c, 0.25 * a + 0.75 * b]
    s = Subspace.from_candidates(cands)
    assert s.dim == 2
    torch.testing.assert_close(s.basis @ s.basis.T, torch.eye(2), rtol=0, atol=1e-5)
    _assert_spans(s, cands)
    assert Subspace.from_candidates([a]).dim == 0
    assert Subspace.from_candidates([a, a.clone()]).dim == 0


def test_hand_example_unit_vectors():
    s = Subspace.from_candidates(list(torch.eye(3)))
    # centre (1/3, 1/3, 1/3); the hull is the plane x+y+z = 1, whose directions are orthogonal
    # to (1, 1, 1): k = 2.
    assert torch.equal(s.centre, torch.full((3,), 1 / 3))
    assert s.dim == 2
    torch.testing.assert_close(s.basis @ torch.ones(3), torch.zeros(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(s.basis @ s.basis.T, torch.eye(2), rtol=0, atol=1e-6)
    assert torch.equal(s.point(s.zeros()), s.centre)
    assert s.nbytes() == 4 * (3 + 2 * 3)


def test_quadratic_identity_reaches_projection_of_optimum():
    # loss = 0.5 ||w - w*||^2, gradient w - w*: the optimum in the hull is the orthogonal
    # projection c + P^T P (w* - c), computed here independently with a pseudo-inverse.
    cands = _candidates(4, 20, seed=2)
    target = torch.randn(20, generator=torch.Generator().manual_seed(3))
    s = Subspace.from_candidates(cands)
    opt = SubspaceOptimizer(s, lr=0.1, momentum=0.5)
    w = s.point(opt.coefficients)
    for _ in range(200):
        w = opt.step(w - target)
    torch.testing.assert_close(w.double(), _hull_projection(cands, target), rtol=0, atol=1e-4)
    torch.testing.assert_close(opt.coefficients[0], s.basis @ (target - s.centre),
                               rtol=0, atol=1e-4)


def test_quadratic_diagonal_matches_analytic_optimum():
    cands = _candidates(4, 20, seed=4)
    target = torch.randn(20, generator=torch.Generator().manual_seed(5))
    a2 = torch.linspace(0.5, 2.0, 20).square()  # A = diag(0.5 .. 2), A^T A = diag(a^2)
    s = Subspace.from_candidates(cands)
    opt = SubspaceOptimizer(s, lr=0.1, momentum=0.5)
    w = s.point(opt.coefficients)
    for _ in range(600):
        w = opt.step(a2 * (w - target))
    p, c = s.basis.double(), s.centre.double()
    x_star = torch.linalg.solve(p @ (a2.double()[:, None] * p.T),
                                p @ (a2.double() * (target.double() - c)))
    torch.testing.assert_close(opt.coefficients[0].double(), x_star, rtol=0, atol=1e-4)
    # Basis-free check of optimality: the residual gradient is orthogonal to the hull.
    centred = torch.stack(cands).double() - c
    assert (centred @ (a2.double() * (w.double() - target.double()))).abs().max() < 1e-4


def test_layer_wise_point_and_projection():
    blocks = [(0, 3), (3, 7), (7, 10)]
    cands = _candidates(4, 10, seed=6)
    s = Subspace.from_candidates(cands, blocks=blocks)
    shared = Subspace.from_candidates(cands)
    assert s.dim == 3 and s.zeros().shape == (3, 3)
    g = torch.randn(10, generator=torch.Generator().manual_seed(7))
    proj = s.project(g)
    assert proj.shape == (3, 3)
    for row, (lo, hi) in zip(proj, blocks):
        torch.testing.assert_close(row, s.basis[:, lo:hi] @ g[lo:hi])
    torch.testing.assert_close(proj.sum(0), shared.project(g)[0])
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(8))
    # w = c + sum_b (P masked to block b)^T x_b
    manual = s.centre.clone()
    for xb, (lo, hi) in zip(x, blocks):
        mask = torch.zeros(10)
        mask[lo:hi] = 1
        manual += (s.basis * mask).T @ xb
    torch.testing.assert_close(s.point(x), manual)
    torch.testing.assert_close(s.point(x[:1].expand(3, 3)), shared.point(x[:1]))


def test_layer_wise_projection_is_the_exact_coefficient_gradient():
    s = Subspace.from_candidates(_candidates(4, 10, seed=9), blocks=[(0, 4), (4, 10)])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(10), requires_grad=True)
    w = s.point(x)
    loss = (w.square() * torch.arange(10.0)).sum()
    (grad_x,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(s.project(2 * w.detach() * torch.arange(10.0)), grad_x)


def test_blocks_must_tile_the_coordinates():
    cands = _candidates(3, 6)
    for bad in ([(0, 3)], [(0, 3), (4, 6)], [(0, 4), (3, 6)], [(3, 6), (0, 3)], []):
        with pytest.raises(ValueError):
            Subspace.from_candidates(cands, blocks=bad)


def test_names_blocks_flatten_round_trip():
    model = build_model("cnn", (1, 8, 8), 10).double()
    names = learnable_names(model)
    assert names == ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight",
                     "bn2.bias", "fc1.weight", "fc1.bias", "classifier.weight",
                     "classifier.bias"]
    # conv1 16*9 = 144; bn1 2*16 = 32; conv2 32*16*9 = 4608; bn2 2*32 = 64;
    # fc1 (32*2*2)*64 + 64 = 8256; classifier 64*10 + 10 = 650
    bounds = [0, 144, 176, 4784, 4848, 13104, 13754]
    assert layer_blocks(model, names) == list(zip(bounds[:-1], bounds[1:]))
    assert len(layer_blocks(model, names, by="parameter")) == 10
    with pytest.raises(ValueError):
        layer_blocks(model, names, by="module")
    state = model.state_dict()
    vector = flatten(state, names)
    assert vector.dtype == torch.float32 and vector.shape == (13754,)
    back = unflatten(vector, state, names)
    assert list(back) == names
    for name in names:
        assert back[name].dtype == torch.float64 and back[name].shape == state[name].shape
        torch.testing.assert_close(back[name], state[name].float().double())
    with pytest.raises(ValueError):
        unflatten(vector[:-1], state, names)
    model.conv1.weight.requires_grad_(False)
    assert learnable_names(model) == names[1:]


def test_fit_on_data_lowers_loss_from_the_centre():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 2, 2, generator=g)
    y = (x.flatten(1)[:, 0] + x.flatten(1)[:, 3] > 0).long()  # linearly separable
    # Candidates as in TWA: checkpoints along one SGD trajectory (steps 0, 5, 10).
    model = build_model("mlp", (1, 2, 2), 2, seed=0)
    names = learnable_names(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = []
    for step in range(11):
        if step % 5 == 0:
            checkpoints.append(flatten(model.state_dict(), names))
        sgd.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sgd.step()
    s = Subspace.from_candidates(checkpoints)
    assert s.dim == 2
    model.train()

    def loss_at(weights: torch.Tensor) -> float:
        model.load_state_dict(unflatten(weights, model.state_dict(), names))
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x), y).item()

    start = loss_at(s.centre)
    best_candidate = min(loss_at(w) for w in checkpoints)
    coefficients = fit_on_data(model, s, names, x, y, epochs=20, batch_size=32, lr=0.1)
    assert model.training  # flag restored
    assert all(p.grad is None for p in model.parameters())
    final = s.point(coefficients)
    torch.testing.assert_close(flatten(model.state_dict(), names), final)
    # Extrapolating along the trajectory beats the centre and every candidate.
    assert loss_at(final) < best_candidate - 0.1 < start - 0.1


def test_state_dict_round_trips():
    cands = _candidates(4, 12, seed=11)
    s = Subspace.from_candidates(cands, blocks=[(0, 5), (5, 12)])
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    loaded = Subspace.from_candidates(_candidates(2, 3))
    loaded.load_state_dict(torch.load(buffer))
    assert torch.equal(loaded.centre, s.centre) and torch.equal(loaded.basis, s.basis)
    assert loaded.blocks == [(0, 5), (5, 12)]

    g = torch.Generator().manual_seed(12)
    grads = [torch.randn(12, generator=g) for _ in range(4)]
    opt = SubspaceOptimizer(s, lr=0.05, momentum=0.9)
    for grad in grads[:3]:
        opt.step(grad)
    resumed = SubspaceOptimizer(loaded, lr=0.05, momentum=0.9)
    resumed.load_state_dict(opt.state_dict())
    assert torch.equal(resumed.step(grads[3]), opt.step(grads[3]))
    assert torch.equal(resumed.velocity, opt.velocity)
    with pytest.raises(ValueError):
        SubspaceOptimizer(Subspace.from_candidates(cands), lr=0.05).load_state_dict(
            opt.state_dict())
