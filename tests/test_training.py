"""Local training: lr schedule, batch order, SGD steps checked against hand-computed gradients."""

import math
import signal
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from fedwa.run.config import resolve_config
from fedwa.common.errors import ConfigError
from fedwa.core.training import LocalTrainSpec, batch_order, client_seed, round_lr, train_local


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise Hang in the main thread when the block runs longer than ``seconds``."""

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- round_lr --------------------------------------------------------------------------------


def test_constant_lr():
    assert [round_lr(0.1, "constant", r, 10) for r in (1, 6, 10)] == [0.1, 0.1, 0.1]


def test_cosine_lr_hand_values():
    # lr = 0.1 * 0.5 * (1 + cos(pi * (r - 1) / 10))
    # r = 1:  cos(0) = 1            -> 0.1
    # r = 6:  cos(pi / 2) = 0       -> 0.05
    # r = 10: cos(0.9 pi) = -0.9510565163 -> 0.1 * 0.5 * 0.0489434837 = 0.00244717418
    assert round_lr(0.1, "cosine", 1, 10) == pytest.approx(0.1)
    assert round_lr(0.1, "cosine", 6, 10) == pytest.approx(0.05)
    assert round_lr(0.1, "cosine", 10, 10) == pytest.approx(0.00244717418, rel=1e-8)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="step"):
        round_lr(0.1, "step", 1, 10)


# --- batch_order -----------------------------------------------------------------------------


def test_epoch_drops_trailing_single_example():
    # 33 = 16 + 16 + 1: the last batch of one example is dropped.
    batches = batch_order(33, 16, LocalTrainSpec(epochs=1), gen())
    assert [len(b) for b in batches] == [16, 16]
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == 32 and seen.min() >= 0 and seen.max() <= 32


def test_epoch_keeps_trailing_batch_of_two_or_more():
    # 10 = 4 + 4 + 2: the batch of two stays.
    assert [len(b) for b in batch_order(10, 4, LocalTrainSpec(epochs=1), gen())] == [4, 4, 2]


def test_two_epochs_each_a_permutation():
    batches = batch_order(10, 4, LocalTrainSpec(epochs=2), gen())
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:]).tolist()) == list(range(10))


def test_single_example_client_still_trains():
    # With one example the single-example batch is all there is: it is kept.
    batches = batch_order(1, 16, LocalTrainSpec(epochs=2), gen())
    assert [b.tolist() for b in batches] == [[0], [0]]


def test_steps_mode_crosses_epochs():
    # 10 examples, batch 4: one epoch gives 4, 4, 2; 5 steps = a whole epoch + 2 batches.
    batches = batch_order(10, 4, LocalTrainSpec(epochs=7, steps=5), gen())
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    second = torch.cat(batches[3:]).tolist()
    assert len(set(second)) == 8  # within one epoch no index repeats


def test_steps_mode_exact_count_with_dropped_tail():
    # 33 examples, batch 16: 2 batches per epoch (the 1 is dropped); 5 steps -> 3 epochs drawn.
    batches = batch_order(33, 16, LocalTrainSpec(steps=5), gen())
    assert [len(b) for b in batches] == [16] * 5


def test_batch_order_seeded():
    spec = LocalTrainSpec(epochs=2)
    first = batch_order(50, 8, spec, gen(3))
    again = batch_order(50, 8, spec, gen(3))
    other = batch_order(50, 8, spec, gen(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_batch_size_one_is_rejected_or_trains():
    try:
        resolve_config({"batch-size": 1})
    except ConfigError:
        return  # fixed by rejecting batch-size < 2 up front
    with time_limit(2.0):
        batches = batch_order(4, 1, LocalTrainSpec(epochs=1), gen())
        assert [len(b) for b in batches] == [1, 1, 1, 1]
        assert len(batch_order(4, 1, LocalTrainSpec(steps=3), gen())) == 3


def test_steps_mode_without_examples_terminates():
    with time_limit(1.0):
        try:
            batches = batch_order(0, 16, LocalTrainSpec(steps=3), gen())
        except ValueError:
            return  # a clear error is a fine fix too
    assert batches == []


# --- train_local -----------------------------------------------------------------------------


def toy_data(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_local_same_seed_same_weights():
    x, y = toy_data()
    spec = LocalTrainSpec(epochs=2, batch_size=8, lr=0.1)
    a, b, c = toy_model(), toy_model(), toy_model()
    train_local(a, x, y, spec, seed=5)
    train_local(b, x, y, spec, seed=5)
    train_local(c, x, y, spec, seed=6)
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))
    assert not torch.equal(flat(a), flat(toy_model()))  # it did train


def test_train_local_reports_counts():
    x, y = toy_data(n=33)
    stats = train_local(toy_model(), x, y, LocalTrainSpec(epochs=2, batch_size=16), seed=0)
    # 2 epochs x (16 + 16; the single leftover is dropped) = 4 steps, 64 examples
    assert stats["steps"] == 4.0 and stats["examples"] == 64.0
    assert stats["loss"] > 0 and stats["seconds"] >= 0


def test_proximal_term_keeps_weights_near_start():
    x, y = toy_data()
    start = flat(toy_model())

    def distance(mu: float) -> float:
        model = toy_model()
        spec = LocalTrainSpec(steps=20, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0,
                              proximal_mu=mu)
        train_local(model, x, y, spec, seed=1)
        return float((flat(model) - start).norm())

    free, held = distance(0.0), distance(10.0)
    # lr * mu = 1: each step w <- anchor - lr * grad, so the drift stays about one step long
    # while the free run accumulates 20 steps.
    assert free > 0
    assert held < 0.5 * free


def one_weight_model(w0: float, w1: float) -> nn.Linear:
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[w0], [w1]]))
    return model


# One example x = 2, label 0, W = [[1], [0]]:
#   logits z = [2, 0]; p1 = 1 / (1 + e^2) = 0.1192029220, p0 = 1 - p1 = 0.8807970780
#   dL/dz = p - onehot(0) = [-p1, p1];  dL/dW = dL/dz * x = [-2 p1, 2 p1] = [-0.238405844, 0.238405844]
#   loss = -log p0 = log(1 + e^-2) = 0.1269280110
P1 = 1.0 / (1.0 + math.exp(2.0))
LOSS = math.log1p(math.exp(-2.0))
X1, Y1 = torch.tensor([[2.0]]), torch.tensor([0])


def test_one_sgd_step_matches_hand_gradient():
    model = one_weight_model(1.0, 0.0)
    spec = LocalTrainSpec(epochs=1, batch_size=32, lr=0.5, momentum=0.0, weight_decay=0.0)
    stats = train_local(model, X1, Y1, spec, seed=0)
    # W' = W - 0.5 * [-2 p1, 2 p1] = [1 + p1, -p1] = [1.119202922, -0.119202922]
    assert model.weight.detach().flatten().tolist() == pytest.approx([1 + P1, -P1], abs=1e-6)
    assert stats["loss"] == pytest.approx(LOSS, rel=1e-5)
    assert (stats["steps"], stats["examples"]) == (1.0, 1.0)


def test_one_sgd_step_with_weight_decay():
    model = one_weight_model(1.0, 0.0)
    spec = LocalTrainSpec(epochs=1, lr=0.5, momentum=0.0, weight_decay=0.1)
    train_local(model, X1, Y1, spec, seed=0)
    # grad + 0.1 * W = [-2 p1 + 0.1, 2 p1 + 0]; W' = [1 - 0.5 (0.1 - 2 p1), -p1]
    #                = [0.95 + p1, -p1] = [1.069202922, -0.119202922]
    assert model.weight.detach().flatten().tolist() == pytest.approx([0.95 + P1, -P1], abs=1e-6)


def test_proximal_term_has_no_gradient_at_the_anchor():
    model = one_weight_model(1.0, 0.0)
    spec = LocalTrainSpec(epochs=1, lr=0.5, momentum=0.0, weight_decay=0.0, proximal_mu=5.0)
    train_local(model, X1, Y1, spec, seed=0)
    # First step starts at the anchor: mu (w - anchor) = 0, same update as plain SGD.
    assert model.weight.detach().flatten().tolist() == pytest.approx([1 + P1, -P1], abs=1e-6)


def test_two_proximal_steps_hand_values():
    model = one_weight_model(1.0, 0.0)
    spec = LocalTrainSpec(steps=2, lr=0.5, momentum=0.0, weight_decay=0.0, proximal_mu=1.0)
    train_local(model, X1, Y1, spec, seed=0)
    # Step 1: W1 = [1 + p1, -p1] (no proximal gradient at the anchor).
    # Step 2 at W1: logits = 2 * W1 = [2 + 2 p1, -2 p1]; q1 = 1 / (1 + e^(2 + 4 p1))
    #   grad = [-2 q1 + mu (W1_0 - 1), 2 q1 + mu (W1_1 - 0)] = [-2 q1 + p1, 2 q1 - p1]
    #   W2 = W1 - 0.5 grad = [1 + p1 + q1 - p1/2, -p1 - q1 + p1/2] = [1 + p1/2 + q1, -p1/2 - q1]
    q1 = 1.0 / (1.0 + math.exp(2.0 + 4.0 * P1))
    expected = [1 + P1 / 2 + q1, -P1 / 2 - q1]
    assert model.weight.detach().flatten().tolist() == pytest.approx(expected, abs=1e-6)


def test_regulariser_is_added_to_the_loss_gradient_not_the_reported_loss():
    model = one_weight_model(1.0, 0.0)
    spec = LocalTrainSpec(epochs=1, lr=0.5, momentum=0.0, weight_decay=0.0)
    stats = train_local(model, X1, Y1, spec, seed=0, regulariser=lambda m: m.weight.sum())
    # d(sum W)/dW = 1: W' = [1 - 0.5 (1 - 2 p1), 0 - 0.5 (1 + 2 p1)] = [0.5 + p1, -0.5 - p1]
    assert model.weight.detach().flatten().tolist() == pytest.approx([0.5 + P1, -0.5 - P1],
                                                                     abs=1e-6)
    assert stats["loss"] == pytest.approx(LOSS, rel=1e-5)


def test_momentum_second_step_hand_values():
    model = one_weight_model(0.0, 0.0)
    spec = LocalTrainSpec(steps=2, lr=0.1, momentum=0.5, weight_decay=0.0)
    train_local(model, X1, Y1, spec, seed=0)
    # W = 0: p = [0.5, 0.5]; g0 = [(0.5 - 1) * 2, 0.5 * 2] = [-1, 1]; buf = g0; W1 = [0.1, -0.1]
    # At W1: logits = [0.2, -0.2]; r1 = 1 / (1 + e^0.4); g1 = [-2 r1, 2 r1]
    #   buf = 0.5 buf + g1 = [-0.5 - 2 r1, 0.5 + 2 r1]; W2 = W1 - 0.1 buf
    #       = [0.1 + 0.05 + 0.2 r1, -0.15 - 0.2 r1]
    r1 = 1.0 / (1.0 + math.exp(0.4))
    expected = [0.15 + 0.2 * r1, -0.15 - 0.2 * r1]
    assert model.weight.detach().flatten().tolist() == pytest.approx(expected, abs=1e-6)


# --- client_seed -----------------------------------------------------------------------------


def test_client_seed_hand_value():
    # 1 * 1_000_003 + 2 * 10_007 + 3 = 1_000_003 + 20_014 + 3 = 1_020_020
    assert client_seed(1, 2, 3) == 1_020_020


def test_client_seed_distinct_per_round_and_client():
    seeds = {client_seed(0, r, c) for r in range(1, 51) for c in range(100)}
    assert len(seeds) == 50 * 100
    assert client_seed(0, 1, 0) != client_seed(1, 1, 0)
    assert client_seed(7, 3, 4) == client_seed(7, 3, 4)


# --- optimizer = adam / adamw ----------------------------------------------------------------


@pytest.mark.parametrize("name, weight_decay", [("adam", 0.0), ("adam", 1e-2), ("adamw", 1e-2)])
def test_adam_matches_torch_adam_step_for_step(name: str, weight_decay: float):
    x, y = toy_data()
    make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    hand = toy_model()
    optimiser = make(hand.parameters(), lr=1e-3, weight_decay=weight_decay)
    full = LocalTrainSpec(steps=4, batch_size=8, lr=1e-3, weight_decay=weight_decay,
                          optimizer=name)
    batches = batch_order(len(x), 8, full, gen(3))
    for k, idx in enumerate(batches, start=1):
        loss = nn.functional.cross_entropy(hand(x[idx]), y[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        # train_local for k steps (a fresh optimiser) is the hand loop's first k steps.
        model = toy_model()
        spec = LocalTrainSpec(steps=k, batch_size=8, lr=1e-3, weight_decay=weight_decay,
                              optimizer=name)
        train_local(model, x, y, spec, seed=3)
        assert torch.equal(flat(model), flat(hand)), k


ADAM_EPS, B1, B2 = 1e-8, 0.9, 0.999


def test_one_adam_step_hand_values():
    model = one_weight_model(1.0, 0.0)
    spec = LocalTrainSpec(epochs=1, lr=0.1, weight_decay=0.0, optimizer="adam")
    train_local(model, X1, Y1, spec, seed=0)
    # Step 1: m_hat = g, v_hat = g^2, so W' = W - lr g / (|g| + eps); g = [-2 p1, 2 p1].
    a = 2 * P1 / (2 * P1 + ADAM_EPS)
    assert model.weight.detach().flatten().tolist() == pytest.approx([1 + 0.1 * a, -0.1 * a],
                                                                     abs=1e-7)


def test_two_adam_steps_hand_values():
    model = one_weight_model(1.0, 0.0)
    spec = LocalTrainSpec(steps=2, lr=0.1, weight_decay=0.0, optimizer="adam")
    train_local(model, X1, Y1, spec, seed=0)
    g0 = 2 * P1
    a = g0 / (g0 + ADAM_EPS)
    w1 = [1 + 0.1 * a, -0.1 * a]
    # At W1: logits = 2 W1; q1 = softmax prob of class 1; g1 = [-2 q1, 2 q1].
    q1 = 1.0 / (1.0 + math.exp(2 * w1[0] - 2 * w1[1]))
    g1 = 2 * q1
    # m = b1 (1 - b1) g0 + (1 - b1) g1, v = b2 (1 - b2) g0^2 + (1 - b2) g1^2; bias-corrected
    # by 1 - b^2; both rows have the same |update| with opposite signs.
    m_hat = (B1 * (1 - B1) * g0 + (1 - B1) * g1) / (1 - B1 ** 2)
    v_hat = (B2 * (1 - B2) * g0 ** 2 + (1 - B2) * g1 ** 2) / (1 - B2 ** 2)
    step = 0.1 * m_hat / (math.sqrt(v_hat) + ADAM_EPS)
    assert model.weight.detach().flatten().tolist() == pytest.approx(
        [w1[0] + step, w1[1] - step], abs=1e-6)


def test_adam_couples_weight_decay_and_adamw_decouples_it():
    adam, adamw = one_weight_model(1.0, 0.0), one_weight_model(1.0, 0.0)
    train_local(adam, X1, Y1, LocalTrainSpec(lr=0.1, weight_decay=0.1, optimizer="adam"), seed=0)
    train_local(adamw, X1, Y1, LocalTrainSpec(lr=0.1, weight_decay=0.1, optimizer="adamw"),
                seed=0)
    # Adam: g' = g + wd W = [-2 p1 + 0.1, 2 p1], a sign step of lr: W' = [1.1, -0.1] (to eps).
    g0 = 0.1 - 2 * P1
    assert adam.weight.detach().flatten().tolist() == pytest.approx(
        [1 + 0.1 * (-g0) / (abs(g0) + ADAM_EPS), -0.1 * 2 * P1 / (2 * P1 + ADAM_EPS)], abs=1e-7)
    # AdamW: W <- W (1 - lr wd) first, then the plain Adam step: W' = [0.99 + 0.1, -0.1].
    a = 2 * P1 / (2 * P1 + ADAM_EPS)
    assert adamw.weight.detach().flatten().tolist() == pytest.approx(
        [0.99 + 0.1 * a, -0.1 * a], abs=1e-7)


def test_adam_ignores_momentum_and_sgd_stays_the_default():
    a, b = one_weight_model(1.0, 0.0), one_weight_model(1.0, 0.0)
    train_local(a, X1, Y1, LocalTrainSpec(steps=3, lr=0.1, momentum=0.0, optimizer="adam"),
                seed=0)
    train_local(b, X1, Y1, LocalTrainSpec(steps=3, lr=0.1, momentum=0.9, optimizer="adam"),
                seed=0)
    assert torch.equal(a.weight, b.weight)
    assert LocalTrainSpec().optimizer == "sgd"
    from fedwa.data.task import local_train_spec

    assert local_train_spec(resolve_config({}), {}).optimizer == "sgd"
    adam = resolve_config({"optimizer": "adam", "lr": 1e-3, "weight-decay": 0.0})
    spec = local_train_spec(adam, {"server-round": 2})
    assert (spec.optimizer, spec.lr, spec.weight_decay) == ("adam", 1e-3, 0.0)


def test_batch_clients_never_batches_a_non_sgd_job():
    from fedwa.core.batched import can_batch
    from fedwa.apps.client_app import TrainJob

    assert can_batch(LocalTrainSpec(optimizer="sgd"))
    for name in ("adam", "adamw"):
        spec = LocalTrainSpec(optimizer=name)
        assert not can_batch(spec)
        job = TrainJob(None, None, 0.0, {}, torch.device("cpu"), 0, {}, toy_model(),
                       *toy_data(), spec, 0, None, None)
        assert not job.batchable()  # train_many then trains it one by one with train_local


# --- an optimiser kept across rounds (HWA's local SGD learners) --------------------------------


def _full_batch_setup():
    from fedwa.core.training import LocalTrainSpec

    torch.manual_seed(0)
    x = torch.randn(12, 3)
    y = torch.arange(12) % 2
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    # Batches of the whole data set: every step sees the same examples whatever the round's
    # batch order, so one round of 2 steps and two rounds of 1 step take the same gradients
    # exactly when the optimiser's state carries over.
    spec = LocalTrainSpec(epochs=1, steps=1, batch_size=64, lr=0.1, momentum=0.9,
                          weight_decay=0.0)
    return model, x, y, spec


def test_a_kept_optimiser_makes_two_rounds_of_one_step_one_round_of_two():
    import copy
    import dataclasses

    from fedwa.core.training import train_local

    model, x, y, spec = _full_batch_setup()
    whole = copy.deepcopy(model)
    train_local(whole, x, y, dataclasses.replace(spec, steps=2), seed=0)
    kept_model, fresh_model = copy.deepcopy(model), copy.deepcopy(model)
    state: dict = {}
    for r in (1, 2):
        train_local(kept_model, x, y, spec, seed=r, optimizer_state=state)
        train_local(fresh_model, x, y, spec, seed=r)
    assert set(state) == {f"{i}.momentum_buffer" for i in range(4)}
    for a, b, c in zip(whole.parameters(), kept_model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # A fresh optimiser restarts the velocity: step 2 moves by lr g2, not lr (g2 + 0.9 g1).
    assert any(not torch.allclose(c, a, atol=1e-4)
               for a, c in zip(whole.parameters(), fresh_model.parameters()))


def test_kept_momentum_by_hand():
    # One weight w = 0 under loss (w - 1)^2 / 2 would need a custom loss; instead check the
    # buffer itself: after round 1 (one step) torch's SGD buffer is the first gradient g1;
    # after round 2 it is 0.9 g1 + g2.
    import copy

    from fedwa.core.training import train_local

    model, x, y, spec = _full_batch_setup()
    state: dict = {}
    probe = copy.deepcopy(model)
    loss = torch.nn.functional.cross_entropy(probe(x), y)
    g1 = torch.autograd.grad(loss, list(probe.parameters()))
    train_local(model, x, y, spec, seed=1, optimizer_state=state)
    for i, g in enumerate(g1):
        torch.testing.assert_close(state[f"{i}.momentum_buffer"], g, rtol=0, atol=1e-7)
    probe = copy.deepcopy(model)
    loss = torch.nn.functional.cross_entropy(probe(x), y)
    g2 = torch.autograd.grad(loss, list(probe.parameters()))
    train_local(model, x, y, spec, seed=2, optimizer_state=state)
    for i, (a, b) in enumerate(zip(g1, g2)):
        torch.testing.assert_close(state[f"{i}.momentum_buffer"], 0.9 * a + b, rtol=0,
                                   atol=1e-6)


def test_kept_state_of_another_model_is_refused():
    from fedwa.core.training import train_local

    model, x, y, spec = _full_batch_setup()
    with pytest.raises(ValueError, match="does not fit a model with 4 parameters"):
        train_local(model, x, y, spec, seed=0,
                    optimizer_state={"9.momentum_buffer": torch.zeros(2)})


def test_kept_adam_state_round_trips_with_its_step_count():
    import dataclasses

    from fedwa.core.training import load_optimiser_state, make_optimiser, optimiser_state

    model, x, y, spec = _full_batch_setup()
    spec = dataclasses.replace(spec, optimizer="adam", momentum=0.0)
    opt = make_optimiser(model.parameters(), spec)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    flat = optimiser_state(opt)
    assert float(flat["0.step"]) == 3.0 and "0.exp_avg_sq" in flat
    again = make_optimiser(model.parameters(), spec)
    load_optimiser_state(again, flat)
    restored = optimiser_state(again)
    assert set(restored) == set(flat)
    assert all(torch.equal(restored[k].float(), flat[k].float()) for k in flat)
