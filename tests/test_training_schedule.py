"""The per-step lr schedule of local training, the round spec, and the local gradient."""

import copy
import math

import pytest
import torch
from torch import nn

from fedwa.run.config import resolve_config
from fedwa.data.task import local_train_spec
from fedwa.core.training import LocalTrainSpec, local_gradient, schedule_lr, train_local

# --- schedule_lr -------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_constant_schedule_is_the_base_lr(progress):
    assert schedule_lr(0.2, "constant", progress) == 0.2


def test_cosine_schedule_by_hand():
    # 0.2 * 0.5 * (1 + cos(0))      = 0.2
    # 0.2 * 0.5 * (1 + cos(pi / 2)) = 0.1
    # 0.2 * 0.5 * (1 + cos(pi))     = 0
    assert schedule_lr(0.2, "cosine", 0.0) == pytest.approx(0.2, abs=1e-15)
    assert schedule_lr(0.2, "cosine", 0.5) == pytest.approx(0.1, abs=1e-15)
    assert schedule_lr(0.2, "cosine", 1.0) == pytest.approx(0.0, abs=1e-15)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="linear"):
        schedule_lr(0.1, "linear", 0.3)


# --- train_local follows the schedule step by step ----------------------------------------------

# base * 0.5 * (1 + cos(pi * p)) with base 0.1, for p = 0, 0.125, 0.25, 0.375:
#   cos(0)       = 1            -> 0.1
#   cos(pi / 8)  = 0.9238795325 -> 0.1 * 0.5 * 1.9238795325 = 0.09619397663
#   cos(pi / 4)  = 0.7071067812 -> 0.1 * 0.5 * 1.7071067812 = 0.08535533906
#   cos(3pi / 8) = 0.3826834324 -> 0.1 * 0.5 * 1.3826834324 = 0.06913417162
COSINE_LRS = [0.1, 0.09619397663, 0.08535533906, 0.06913417162]


def cosine_spec(**changes) -> LocalTrainSpec:
    fields = dict(steps=4, batch_size=2, lr=0.1, momentum=0.0, weight_decay=0.0,
                  lr_schedule="cosine", progress_start=0.0, progress_end=0.5)
    fields.update(changes)
    return LocalTrainSpec(**fields)


def tiny_data(n: int = 8, classes: int = 3):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def recorded_lrs(monkeypatch, spec: LocalTrainSpec) -> list[float]:
    seen: list[float] = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    x, y = tiny_data()
    model = nn.Linear(2, 3)
    train_local(model, x, y, spec, seed=0)
    return seen


def test_cosine_lr_is_set_before_every_step(monkeypatch):
    # p = 0 + (0.5 - 0) * step / 4 = 0, 0.125, 0.25, 0.375
    assert recorded_lrs(monkeypatch, cosine_spec()) == pytest.approx(COSINE_LRS, rel=1e-9)


def test_cosine_lr_inside_a_later_window(monkeypatch):
    # progress (0.5, 1.0), 2 steps: p = 0.5, 0.75
    #   0.1 * 0.5 * (1 + cos(pi/2))  = 0.05
    #   0.1 * 0.5 * (1 + cos(3pi/4)) = 0.05 * (1 - 0.7071067812) = 0.01464466094
    spec = cosine_spec(steps=2, progress_start=0.5, progress_end=1.0)
    assert recorded_lrs(monkeypatch, spec) == pytest.approx([0.05, 0.01464466094], rel=1e-9)


def test_constant_lr_stays_put(monkeypatch):
    spec = cosine_spec(lr_schedule="constant")
    assert recorded_lrs(monkeypatch, spec) == [0.1, 0.1, 0.1, 0.1]


def one_class_model() -> nn.Linear:
    # One output class: cross-entropy is log(1) = 0 with zero gradient, so the only gradient
    # is the regulariser's d/dw sum(w) = 1 on every weight.
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    return model


def test_cosine_lr_moves_the_weights_by_the_summed_lrs():
    model = one_class_model()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(8, dtype=torch.long)
    stats = train_local(model, x, y, cosine_spec(), seed=0, regulariser=lambda m: m.weight.sum())
    # plain SGD, gradient 1: w_4 = w_0 - sum of the four lrs
    #   0.1 + 0.09619397663 + 0.08535533906 + 0.06913417162 = 0.35068348731
    assert stats["steps"] == 4.0
    expected = torch.tensor([[1.0 - 0.35068348731, -2.0 - 0.35068348731]])
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-6)


def test_constant_lr_moves_the_weights_by_steps_times_lr():
    model = one_class_model()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(8, dtype=torch.long)
    train_local(model, x, y, cosine_spec(lr_schedule="constant"), seed=0,
                regulariser=lambda m: m.weight.sum())
    # 4 steps x 0.1 = 0.4
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[0.6, -2.4]]),
                               rtol=0, atol=1e-6)


# --- local_train_spec --------------------------------------------------------------------------


def run_config(**overrides):
    return resolve_config({"num-server-rounds": 4, "lr": 0.08, "lr-schedule": "cosine",
                           "local-epochs": 2, "batch-size": 16, "momentum": 0.5,
                           "weight-decay": 0.001, **overrides})


@pytest.mark.parametrize("server_round, start, end", [
    (1, 0.0, 0.25),   # (0/4, 1/4)
    (3, 0.5, 0.75),   # (2/4, 3/4)
    (4, 0.75, 1.0),   # (3/4, 4/4)
])
def test_default_progress_is_the_rounds_share(server_round, start, end):
    spec = local_train_spec(run_config(), {"server-round": server_round})
    assert (spec.progress_start, spec.progress_end) == (start, end)
    assert spec.lr_schedule == "cosine" and spec.lr == 0.08
    assert (spec.epochs, spec.steps, spec.batch_size) == (2, 0, 16)
    assert (spec.momentum, spec.weight_decay, spec.proximal_mu) == (0.5, 0.001, 0.0)


def test_strategy_values_override_the_run_config():
    sent = {"server-round": 2, "progress-start": 0.3, "progress-end": 0.6,
            "local-epochs": 5, "local-steps": 7, "proximal-mu": 0.01}
    spec = local_train_spec(run_config(), sent)
    assert (spec.progress_start, spec.progress_end) == (0.3, 0.6)  # not (0.25, 0.5)
    assert (spec.epochs, spec.steps, spec.proximal_mu) == (5, 7, 0.01)
    assert spec.lr_schedule == "cosine" and spec.lr == 0.08


def test_a_sent_lr_overrides_and_makes_the_round_constant():
    spec = local_train_spec(run_config(), {"server-round": 2, "lr": 0.2})
    assert spec.lr == 0.2 and spec.lr_schedule == "constant"


# --- local_gradient ----------------------------------------------------------------------------


def hand_data():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    return x, y


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
def test_local_gradient_of_a_linear_model_by_hand(batch_size):
    model = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.weight)
    x, y = hand_data()
    loss, grads = local_gradient(model, x, y, batch_size=batch_size)
    # logits 0 -> softmax p = [0.5, 0.5]; every CE is ln 2, so the mean is ln 2.
    assert loss == pytest.approx(math.log(2), rel=1e-6)
    # dL/dW = (1/3) sum_i (p - e_{y_i}) x_i^T
    #   i1: [-0.5, 0.5] x [1, 0] -> rows [-0.5, 0], [0.5, 0]
    #   i2: [0.5, -0.5] x [0, 2] -> rows [0, 1], [0, -1]
    #   i3: [0.5, -0.5] x [1, 1] -> rows [0.5, 0.5], [-0.5, -0.5]
    #   sum rows [0, 1.5], [0, -1.5]  / 3 -> [0, 0.5], [0, -0.5]
    assert list(grads) == ["weight"]
    torch.testing.assert_close(grads["weight"], torch.tensor([[0.0, 0.5], [0.0, -0.5]]),
                               rtol=0, atol=1e-7)


def bn_model() -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4]))
        bn.running_var.copy_(torch.tensor([1.5, 2.0, 0.5, 1.0]))
        bn.num_batches_tracked.fill_(5)
    return model


def test_local_gradient_matches_autograd_and_keeps_bn_buffers():
    model = bn_model()
    reference = copy.deepcopy(model).train()
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, generator=gen), torch.tensor([0, 1, 1, 0, 1, 0])

    loss, grads = local_gradient(model, x, y, batch_size=64)  # one chunk: BN over all 6

    # Reference: the mean CE of the whole batch in train mode, differentiated by autograd.
    ref_loss = nn.functional.cross_entropy(reference(x), y)
    params = dict(reference.named_parameters())
    ref_grads = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()))))
    assert loss == pytest.approx(ref_loss.item(), rel=1e-6)

    assert list(grads) == list(model.state_dict())  # the model's names, in its order
    for name, g in grads.items():
        assert g.shape == model.state_dict()[name].shape, name
    for name in params:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)
    # Buffers come back as zeros with the buffer's own dtype.
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert name in grads
        assert grads[name].dtype == buffers_before[name].dtype
        assert torch.count_nonzero(grads[name]) == 0
    # The forward in train mode updated BN's running statistics; they are restored.
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, buffers_before[name], rtol=0, atol=0)


def test_local_gradient_chunks_give_the_sum_of_chunk_losses():
    # With BN, batch_size 2 means BN statistics per chunk of 2: the loss is
    # sum_chunks sum_i CE_i / N with each chunk normalised on its own.
    model = bn_model()
    reference = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 3, generator=gen), torch.tensor([1, 0, 1, 1])
    loss, grads = local_gradient(model, x, y, batch_size=2)
    ref = sum(nn.functional.cross_entropy(reference(x[s:s + 2]), y[s:s + 2], reduction="sum")
              for s in (0, 2)) / 4
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)
    assert model[1].num_batches_tracked.item() == 5
