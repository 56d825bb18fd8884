"""Trainable Weight Averaging: subspace geometry, analytic optima, layer-wise blocks, fitting.

The geometry tests that are about the affine hull (fedwa's earlier basis) ask for
``basis="centred"`` explicitly; the default is the authors' uncentred span.
"""

import copy
import io
import math

import pytest
import torch
from torch import nn

from fedwa.models import build_model
from fedwa.core.twa import (
                            REFERENCE_LR,
                            Subspace,
                            SubspaceOptimizer,
                            fit_on_data,
                            flatten,
                            layer_blocks,
                            learnable_names,
                            lr_factor,
                            resolve_schedule,
                            step_milestones,
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
    """Every candidate is a point of the subspace: ``w - c`` lies in ``span(P)``."""
    for w in candidates:
        d = w - s.centre
        torch.testing.assert_close(s.basis.T @ (s.basis @ d), d, rtol=0, atol=1e-5)


def _span_projection(candidates, target):
    """Nearest point to target in the candidates' linear span, via a pseudo-inverse (float64)."""
    w = torch.stack(candidates).double()
    return w.T @ torch.linalg.pinv(w.T) @ target.double()


@pytest.mark.parametrize("basis, dim", [("centred", 4), ("uncentred", 5)])
def test_basis_orthonormal_and_spans_candidates(basis, dim):
    cands = _candidates(5, 50)
    s = Subspace.from_candidates(cands, basis=basis)
    assert s.dim == dim and s.basis.shape == (dim, 50) and s.blocks == [(0, 50)]
    torch.testing.assert_close(s.basis @ s.basis.T, torch.eye(dim), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.centre, torch.stack(cands).mean(0))
    _assert_spans(s, cands)
    if basis == "uncentred":  # the span of the w_i holds the w_i themselves and the centre
        for w in [*cands, s.centre]:
            torch.testing.assert_close(s.basis.T @ (s.basis @ w), w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("basis, dim, single", [("centred", 2, 0), ("uncentred", 3, 1)])
def test_rank_deficient_candidates_drop_to_their_rank(basis, dim, single):
    a, b, c = _candidates(3, 30, seed=1)
    # A duplicate in the middle and an affine combination at the end: the hull of {a, b, c}
    # (affine rank 2), inside their span (linear rank 3).
    cands = [a, a, b, c, 0.25 * a + 0.75 * b]
    s = Subspace.from_candidates(cands, basis=basis)
    assert s.dim == dim
    torch.testing.assert_close(s.basis @ s.basis.T, torch.eye(dim), rtol=0, atol=1e-5)
    _assert_spans(s, cands)
    # One candidate (or two equal ones): no direction when centred, the candidate's own one
    # when uncentred.
    assert Subspace.from_candidates([a], basis=basis).dim == single
    assert Subspace.from_candidates([a, a.clone()], basis=basis).dim == single


def test_uncentred_basis_of_two_candidates_spans_both_axes():
    # Candidates [1, 0] and [1, 1]: centre [1, 0.5]. Their span is the whole plane (dim 2,
    # P^T P = I); their affine hull is the vertical line x = 1 (dim 1, direction +-[0, 1]).
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    default = Subspace.from_candidates([a, b])
    assert default.dim == 2
    torch.testing.assert_close(default.basis.T @ default.basis, torch.eye(2), rtol=0, atol=1e-6)
    centred = Subspace.from_candidates([a, b], basis="centred")
    assert centred.dim == 1
    torch.testing.assert_close(centred.basis.abs(), torch.tensor([[0.0, 1.0]]), rtol=0,
                               atol=1e-6)
    for s in (default, centred):
        assert torch.equal(s.centre, torch.tensor([1.0, 0.5]))
        assert torch.equal(s.point(s.zeros()), s.centre)  # x = 0 is the SWA point
    # Only the span reaches the weights' origin, w = 0 (what weight decay pulls towards).
    torch.testing.assert_close(default.point(-(default.basis @ default.centre)[None]),
                               torch.zeros(2), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        Subspace.from_candidates([a, b], basis="affine")


def test_hand_example_unit_vectors():
    s = Subspace.from_candidates(list(torch.eye(3)), basis="centred")
    # centre (1/3, 1/3, 1/3); the hull is the plane x+y+z = 1, whose directions are orthogonal
    # to (1, 1, 1): k = 2.
    assert torch.equal(s.centre, torch.full((3,), 1 / 3))
    assert s.dim == 2
    torch.testing.assert_close(s.basis @ torch.ones(3), torch.zeros(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(s.basis @ s.basis.T, torch.eye(2), rtol=0, atol=1e-6)
    assert torch.equal(s.point(s.zeros()), s.centre)
    assert s.nbytes() == 4 * (3 + 2 * 3)
    # Uncentred, e1, e2, e3 span everything: k = 3 = n.
    full = Subspace.from_candidates(list(torch.eye(3)))
    assert full.dim == 3
    torch.testing.assert_close(full.basis.T @ full.basis, torch.eye(3), rtol=0, atol=1e-6)


def test_quadratic_identity_reaches_projection_of_optimum():
    # loss = 0.5 ||w - w*||^2, gradient w - w*: the optimum in the hull is the orthogonal
    # projection c + P^T P (w* - c), computed here independently with a pseudo-inverse.
    cands = _candidates(4, 20, seed=2)
    target = torch.randn(20, generator=torch.Generator().manual_seed(3))
    s = Subspace.from_candidates(cands, basis="centred")
    opt = SubspaceOptimizer(s, lr=0.1, momentum=0.5)
    w = s.point(opt.coefficients)
    for _ in range(200):
        w = opt.step(w - target)
    torch.testing.assert_close(w.double(), _hull_projection(cands, target), rtol=0, atol=1e-4)
    torch.testing.assert_close(opt.coefficients[0], s.basis @ (target - s.centre),
                               rtol=0, atol=1e-4)


def test_quadratic_identity_uncentred_reaches_projection_onto_the_span():
    # The same loss over the span of the candidates: its optimum is the projection of w* onto
    # span{w_i}, which the affine hull (one dimension fewer) does not reach.
    cands = _candidates(4, 20, seed=2)
    target = torch.randn(20, generator=torch.Generator().manual_seed(3))
    s = Subspace.from_candidates(cands)
    assert s.dim == 4
    opt = SubspaceOptimizer(s, lr=0.1, momentum=0.5)
    w = s.point(opt.coefficients)
    for _ in range(200):
        w = opt.step(w - target)
    best = _span_projection(cands, target)
    torch.testing.assert_close(w.double(), best, rtol=0, atol=1e-4)
    assert (best - _hull_projection(cands, target)).norm() > 0.1


def test_quadratic_diagonal_matches_analytic_optimum():
    cands = _candidates(4, 20, seed=4)
    target = torch.randn(20, generator=torch.Generator().manual_seed(5))
    a2 = torch.linspace(0.5, 2.0, 20).square()  # A = diag(0.5 .. 2), A^T A = diag(a^2)
    s = Subspace.from_candidates(cands, basis="centred")
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
    s = Subspace.from_candidates(cands, blocks=blocks, basis="centred")
    shared = Subspace.from_candidates(cands, basis="centred")
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


@pytest.mark.parametrize("basis", ["uncentred", "centred"])
def test_layer_wise_projection_is_the_exact_coefficient_gradient(basis):
    s = Subspace.from_candidates(_candidates(4, 10, seed=9), blocks=[(0, 4), (4, 10)],
                                 basis=basis)
    x = torch.randn(2, s.dim, generator=torch.Generator().manual_seed(10), requires_grad=True)
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
    s = Subspace.from_candidates(checkpoints, basis="centred")
    assert s.dim == 2
    model.train()

    def loss_at(weights: torch.Tensor) -> float:
        model.load_state_dict(unflatten(weights, model.state_dict(), names))
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x), y).item()

    start = loss_at(s.centre)
    best_candidate = min(loss_at(w) for w in checkpoints)
    # fedwa's earlier fit, spelled out: constant lr 0.1, no weight decay, BN (none here) eval.
    coefficients = fit_on_data(model, s, names, x, y, epochs=20, batch_size=32, lr=0.1,
                               schedule="constant", weight_decay=0.0, bn_mode="eval")
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
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
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


def test_adamw_state_round_trips_with_moments_and_step_count():
    s = Subspace.from_candidates(_candidates(4, 12, seed=13), blocks=[(0, 5), (5, 12)])
    g = torch.Generator().manual_seed(14)
    grads = [torch.randn(12, generator=g) for _ in range(5)]
    settings = dict(optimizer="adamw", weight_decay=0.01, schedule="auto", total_steps=5)
    opt = SubspaceOptimizer(s, 0.05, **settings)
    for grad in grads[:3]:
        opt.step(grad)
    state = opt.state_dict()
    assert set(state) == {"coefficients", "exp_avg", "exp_avg_sq", "step"}
    assert int(state["step"]) == 3
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = SubspaceOptimizer(s, 0.05, **settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.steps == 3 and resumed.current_lr() == opt.current_lr()
    for grad in grads[3:]:
        assert torch.equal(resumed.step(grad), opt.step(grad))
    # An SGD state is not an AdamW one.
    with pytest.raises(ValueError, match="exp_avg"):
        resumed.load_state_dict(SubspaceOptimizer(s, 0.05).state_dict())


# --- optimisers, schedules and weight decay, by hand --------------------------------------------


@pytest.mark.parametrize("basis, steps", [
    # uncentred: P^T P = I. lr 0.5, wd 0.1, momentum 0.9, g = [0.2, -0.4] at every step.
    #   w0 = c = [1, 0.5]
    #   d1 = g + 0.1 w0 = [0.3, -0.35];  v1 = d1;  w1 = w0 - 0.5 v1 = [0.85, 0.675]
    #   d2 = g + 0.1 w1 = [0.285, -0.3325];  v2 = 0.9 v1 + d2 = [0.555, -0.6475]
    #   w2 = w1 - 0.5 v2 = [0.5725, 0.99875]
    ("uncentred", [[0.85, 0.675], [0.5725, 0.99875]]),
    # centred: P^T P = diag(0, 1), only the second coordinate moves, by the same amounts.
    ("centred", [[1.0, 0.675], [1.0, 0.99875]]),
])
def test_sgd_weight_decay_is_l2_on_the_weights(basis, steps):
    s = Subspace.from_candidates([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])],
                                 basis=basis)
    opt = SubspaceOptimizer(s, 0.5, 0.9, weight_decay=0.1)
    for expected in steps:
        w = opt.step(torch.tensor([0.2, -0.4]))
        torch.testing.assert_close(w, torch.tensor(expected), rtol=0, atol=1e-6)
    # Without weight decay, the first step is w1 = c - 0.5 P^T P g.
    plain = SubspaceOptimizer(s, 0.5, 0.9)
    torch.testing.assert_close(plain.step(torch.tensor([0.2, -0.4])),
                               torch.tensor([0.9 if basis == "uncentred" else 1.0, 0.7]),
                               rtol=0, atol=1e-6)


def test_sgd_on_the_uncentred_basis_is_the_reference_loop():
    # main branch: the full weights w (starting at the centre) get the gradient P^T P g and
    # torch's SGD with momentum and coupled weight decay steps them. Because w stays in
    # span(P), stepping the coefficients is the same trajectory.
    cands = _candidates(4, 20, seed=15)
    target = torch.randn(20, generator=torch.Generator().manual_seed(16))
    s = Subspace.from_candidates(cands)
    projector = s.basis.T @ s.basis
    w_ref = s.centre.clone().requires_grad_(True)
    sgd = torch.optim.SGD([w_ref], lr=0.05, momentum=0.9, weight_decay=0.01)
    opt = SubspaceOptimizer(s, 0.05, 0.9, weight_decay=0.01)
    w = s.point(opt.coefficients)
    for _ in range(30):
        w = opt.step(w - target)
        w_ref.grad = projector @ (w_ref.detach() - target)
        sgd.step()
        torch.testing.assert_close(w, w_ref.detach(), rtol=0, atol=1e-5)


def test_adamw_first_step_moves_each_coefficient_by_lr():
    # Identity basis (candidates e1, e2, uncentred: x = w - c). Start from x0 = [0.5, -2]
    # with fresh moments; lr 0.1, decoupled decay 0.5, gradient g_x = [3, -0.01].
    # Bias-corrected first AdamW step: m / (1 - b1) = g, sqrt(v / (1 - b2)) = |g|, so
    #   x1 = (1 - 0.1 * 0.5) x0 - 0.1 * g / (|g| + 1e-8)
    #      = 0.95 * [0.5, -2] - 0.1 * [1, -1] = [0.375, -1.8]
    # whatever the gradient's size.
    s = Subspace.from_candidates(list(torch.eye(2)))
    opt = SubspaceOptimizer(s, 0.1, optimizer="adamw", weight_decay=0.5)
    x0 = torch.tensor([[0.5, -2.0]])
    opt.load_state_dict({"coefficients": x0, "exp_avg": torch.zeros(1, 2),
                         "exp_avg_sq": torch.zeros(1, 2), "step": torch.tensor(0)})
    g_x = torch.tensor([3.0, -0.01])
    opt.step(s.basis.T @ g_x)  # a weight-space gradient whose projection is g_x
    torch.testing.assert_close(opt.coefficients, torch.tensor([[0.375, -1.8]]), rtol=0,
                               atol=1e-6)
    assert opt.steps == 1


def test_adamw_matches_torch_adamw_on_the_coefficients():
    cands = _candidates(3, 15, seed=17)
    target = torch.randn(15, generator=torch.Generator().manual_seed(18))
    s = Subspace.from_candidates(cands, blocks=[(0, 6), (6, 15)])
    x_ref = torch.zeros(2, s.dim, requires_grad=True)
    adamw = torch.optim.AdamW([x_ref], lr=0.01, weight_decay=0.1)
    opt = SubspaceOptimizer(s, 0.01, optimizer="adamw", weight_decay=0.1)
    w = s.point(opt.coefficients)
    for _ in range(25):
        gradient = w - target
        x_ref.grad = s.project(gradient)
        adamw.step()
        w = opt.step(gradient)
        torch.testing.assert_close(opt.coefficients, x_ref.detach(), rtol=0, atol=1e-6)


def test_step_schedule_hand_values():
    # Four epochs: milestones int(0.5 * 4) = 2 and int(0.75 * 4 + 0.9) = 3.
    assert step_milestones(4) == (2, 3)
    assert [lr_factor("step", t, 4) for t in range(4)] == pytest.approx([1, 1, 0.1, 0.01])
    # main's 10 epochs: milestones 5 and int(8.4) = 8; with 3 batches per epoch the rate
    # changes at epoch boundaries, steps 15 and 24.
    assert step_milestones(10) == (5, 8)
    factors = [lr_factor("step", t, 30, steps_per_epoch=3) for t in range(30)]
    assert factors == pytest.approx([1] * 15 + [0.1] * 9 + [0.01] * 6)
    # One epoch: the first milestone is held at 1, so the whole fit runs at the full rate.
    assert lr_factor("step", 0, 1) == 1.0
    # Through the optimiser: momentum 0, lr 1, g = [1, 0] on an identity basis; the first
    # coordinate moves by -(1, 1, 0.1, 0.01): -1, -2, -2.1, -2.11 from the centre.
    s = Subspace.from_candidates(list(torch.eye(2)))
    opt = SubspaceOptimizer(s, 1.0, 0.0, schedule="step", total_steps=4)
    moved = [float(opt.step(torch.tensor([1.0, 0.0]))[0] - 0.5) for _ in range(4)]
    assert moved == pytest.approx([-1, -2, -2.1, -2.11])
    assert resolve_schedule("auto", "sgd") == "step"


def test_cosine_schedule_with_warmup_hand_values():
    # T = 10 steps, warmup W = int(0.2 * 10) = 2: (t + 1) / 2 for t < 2, then
    # (1 + cos(pi (t - 2) / 8)) / 2: t = 2 -> 1, t = 4 -> (1 + cos(pi / 4)) / 2 = 0.853553,
    # t = 6 -> (1 + cos(pi / 2)) / 2 = 0.5, t = 9 -> (1 + cos(7 pi / 8)) / 2 = 0.038060.
    factors = [lr_factor("cosine", t, 10) for t in range(10)]
    assert factors[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert factors[4] == pytest.approx(0.853553, abs=1e-6)
    assert factors[6] == pytest.approx(0.5)
    assert factors[9] == pytest.approx(0.038060, abs=1e-6)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))  # non-increasing after warmup
    # Under five steps there is no warmup step: cosine from the full rate.
    assert lr_factor("cosine", 0, 4) == 1.0
    assert resolve_schedule("auto", "adamw") == "cosine"
    assert lr_factor("constant", 7, 10) == 1.0
    with pytest.raises(ValueError):
        SubspaceOptimizer(Subspace.from_candidates(list(torch.eye(2))), 1.0, schedule="cosine")


def test_reference_learning_rates():
    assert REFERENCE_LR == {"sgd": 2.0, "adamw": 1e-3}


# --- fitting: BatchNorm mode, defaults, and fedwa's earlier fit --------------------------------


def _bn_problem(n: int = 64):
    g = torch.Generator().manual_seed(19)
    x = torch.randn(n, 1, 2, 2, generator=g)
    y = (x.flatten(1)[:, 0] - x.flatten(1)[:, 2] > 0).long()
    torch.manual_seed(20)
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    names = learnable_names(model)
    base = flatten(model.state_dict(), names)
    cands = [base + 0.3 * torch.randn(base.numel(), generator=g) for _ in range(3)]
    return model, names, Subspace.from_candidates(cands), x, y


def test_bn_train_mode_fits_on_batch_statistics():
    model, names, s, x, y = _bn_problem()
    settings = dict(epochs=2, batch_size=16, lr=0.5, schedule="constant", weight_decay=0.0)
    fits = {}
    for mode in ("train", "eval"):
        for shift in (0.0, 5.0):
            fitted = copy.deepcopy(model)
            fits[mode, shift] = fit_on_data(fitted, s, names, x + shift, y, bn_mode=mode,
                                            **settings)
            running_mean = fitted[1].running_mean
            if mode == "train":  # the forward passes updated the running statistics ...
                assert running_mean.abs().min() > 0
            else:                # ... which eval mode only reads
                assert torch.equal(running_mean, torch.zeros(4))
    # With batch statistics the BN layer removes a constant shift of the inputs from every
    # batch: the shifted data gives the same fit. With the running statistics (mean 0, var 1,
    # the model's fresh buffers) the shift goes straight into the logits: another fit.
    torch.testing.assert_close(fits["train", 5.0], fits["train", 0.0], rtol=0, atol=1e-4)
    assert (fits["eval", 5.0] - fits["eval", 0.0]).abs().max() > 0.1
    assert (fits["train", 0.0] - fits["eval", 0.0]).abs().max() > 1e-3


def test_bn_train_mode_first_step_is_the_batch_statistics_gradient():
    model, names, s, x, y = _bn_problem()
    expected = {}
    for mode in ("train", "eval"):
        reference = copy.deepcopy(model)
        reference.load_state_dict(unflatten(s.centre, reference.state_dict(), names),
                                  strict=False)
        reference.train(mode == "train")
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        params = dict(reference.named_parameters())
        gradient = torch.cat([params[n].grad.reshape(-1) for n in names])
        expected[mode] = -0.5 * s.project(gradient)  # one SGD step from x = 0, lr 0.5
        got = fit_on_data(copy.deepcopy(model), s, names, x, y, epochs=1, batch_size=len(x),
                          lr=0.5, schedule="constant", weight_decay=0.0, bn_mode=mode)
        torch.testing.assert_close(got, expected[mode], rtol=0, atol=1e-6)
    assert (expected["train"] - expected["eval"]).abs().max() > 1e-3


def test_bn_train_mode_merges_a_trailing_batch_of_one():
    model, names, s, x, y = _bn_problem(n=33)  # batches 16, 16, 1 -> 16, 17
    coefficients = fit_on_data(model, s, names, x, y, epochs=1, batch_size=16, lr=0.1,
                               bn_mode="train")
    assert torch.isfinite(coefficients).all()


def test_fit_defaults_are_the_reference_loop():
    # Defaults: sgd, lr 2, momentum 0.9, weight decay 1e-5, 10 epochs of 128-example batches,
    # step schedule (x0.1 from epoch 5, x0.01 from epoch 8), BatchNorm in train mode: the
    # main branch's train_twa.py, written out here with torch's SGD on the full weights.
    model, names, s, x, y = _bn_problem(n=256)  # two batches per epoch
    got = fit_on_data(copy.deepcopy(model), s, names, x, y, seed=3)

    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, value in unflatten(s.centre, reference.state_dict(), names).items():
            params[name].copy_(value)
    sgd = torch.optim.SGD([params[n] for n in names], lr=2.0, momentum=0.9, weight_decay=1e-5)
    lrs = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[5, 8], gamma=0.1)
    generator = torch.Generator().manual_seed(3)
    reference.train()
    for _ in range(10):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 128):
            idx = order[start:start + 128]
            sgd.zero_grad()
            nn.functional.cross_entropy(reference(x[idx]), y[idx]).backward()
            gradient = torch.cat([params[n].grad.reshape(-1) for n in names])
            projected = s.basis.T @ (s.basis @ gradient)
            for name, piece in unflatten(projected, reference.state_dict(), names).items():
                params[name].grad.copy_(piece)
            sgd.step()
        lrs.step()
    final = flatten(reference.state_dict(), names)
    torch.testing.assert_close(s.point(got), final, rtol=0, atol=1e-4)
    assert (s.point(got) - s.centre).abs().max() > 1e-2


def _earlier_fit(model, s, names, x, y, *, epochs, batch_size, lr, momentum, seed):
    """fedwa's fit before the reference defaults, by hand: BN in eval mode, projected
    heavy-ball SGD on the coefficients, constant lr, no weight decay."""
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    coefficients, velocity = s.zeros(), s.zeros()
    weights = s.point(coefficients)
    model.eval()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            with torch.no_grad():
                for name, value in unflatten(weights, params, names).items():
                    params[name].copy_(value)
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            gradient = torch.cat([params[n].grad.reshape(-1) for n in names])
            velocity = velocity.mul(momentum).add(s.project(gradient))
            coefficients = coefficients.add(velocity, alpha=-lr)
            weights = s.point(coefficients)
    return coefficients


def test_earlier_settings_reproduce_the_earlier_fit_exactly():
    # TWA-v before: lr 0.05, 3 epochs, batch 64, momentum 0.9, constant, no decay, BN eval,
    # on the centred basis; here on a CNN with BatchNorm and 150 digits-sized examples.
    g = torch.Generator().manual_seed(21)
    x = torch.randn(150, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (150,), generator=g)
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    names = learnable_names(model)
    base = flatten(model.state_dict(), names)
    cands = [base + 0.05 * torch.randn(base.numel(), generator=g) for _ in range(3)]
    s = Subspace.from_candidates(cands, basis="centred")
    settings = dict(epochs=3, batch_size=64, lr=0.05, momentum=0.9, seed=4)
    expected = _earlier_fit(copy.deepcopy(model), s, names, x, y, **settings)
    got = fit_on_data(copy.deepcopy(model), s, names, x, y, optimizer="sgd",
                      schedule="constant", weight_decay=0.0, bn_mode="eval", **settings)
    assert torch.equal(got, expected)
    assert not math.isclose(float(got.abs().max()), 0.0)
