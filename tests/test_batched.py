"""Batched training against K sequential ``train_local`` calls on the same models and data."""

import copy
import dataclasses

import pytest
import torch

from fedwa.core.batched import auto_max_clients, can_batch, train_batched
from fedwa.models import build_model
from fedwa.core.training import LocalTrainSpec, batch_order, train_local

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # One torch thread, as fedwa's clients train (configure_threads): on shared cores two
    # threads make these small models several times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Float tolerance: batched kernels (bmm, grouped convs) sum in another order than the
# per-model ones. In float32 a last-bit difference can also flip a discrete choice (a ReLU
# input at ~1e-8 from 0, a near-tie in max-pooling) and move a weight by ~1e-4 after a few
# steps; these tests use few, small examples where that did not happen, and the float64 runs
# (same code paths) pin the agreement down to rounding.
TOLERANCES = {torch.float32: {"rtol": 1e-4, "atol": 1e-5},
              torch.float64: {"rtol": 1e-9, "atol": 1e-11}}


def client_data(sizes, shape, num_classes=10, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=gen, dtype=dtype),
             torch.randint(0, num_classes, (n,), generator=gen)) for n in sizes]


def run_both(name, shape, sizes, spec, seeds, *, same_init=False, dtype=torch.float32,
             **batched_kwargs):
    """Train copies of K models sequentially and batched; return both lists and the stats."""
    models = [build_model(name, shape, 10, seed=0 if same_init else 10 + k).to(dtype)
              for k in range(len(sizes))]
    data = client_data(sizes, shape, dtype=dtype)
    sequential = [copy.deepcopy(m) for m in models]
    batched = [copy.deepcopy(m) for m in models]
    seq_stats = [train_local(m, x, y, spec, seed=s)
                 for m, (x, y), s in zip(sequential, data, seeds)]
    bat_stats = train_batched(batched, data, spec, seeds, "cpu", **batched_kwargs)
    return sequential, batched, seq_stats, bat_stats


def assert_same_training(sequential, batched, seq_stats, bat_stats):
    for k, (ms, mb) in enumerate(zip(sequential, batched)):
        ss, sb = ms.state_dict(), mb.state_dict()
        tol = TOLERANCES[ss["classifier.weight"].dtype]
        assert list(ss) == list(sb)
        for n in ss:
            assert ss[n].dtype == sb[n].dtype, n
            if torch.is_floating_point(ss[n]):
                torch.testing.assert_close(sb[n], ss[n], **tol, msg=f"client {k}: {n}")
            else:  # num_batches_tracked: exact
                assert torch.equal(sb[n], ss[n]), (k, n, sb[n], ss[n])
        for key in ("steps", "examples"):
            assert bat_stats[k][key] == seq_stats[k][key], (k, key)
        assert bat_stats[k]["loss"] == pytest.approx(seq_stats[k]["loss"], rel=1e-5, abs=1e-6)
        assert bat_stats[k]["seconds"] >= 0


# Momentum, weight decay and a cosine schedule that spans the steps (lr goes from 0.1 to ~0).
SPEC = LocalTrainSpec(steps=6, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-3,
                      lr_schedule="cosine", progress_start=0.0, progress_end=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)),
                                        ("cnn", (1, 16, 16))])
def test_equal_sizes_match_sequential(name, shape, dtype):
    out = run_both(name, shape, [24, 24, 24], SPEC, [3, 4, 5], dtype=dtype)
    assert_same_training(*out)
    # The models really trained (a vacuous pass would leave them at their start).
    start = build_model(name, shape, 10, seed=10).to(dtype)
    assert not torch.allclose(out[1][0].classifier.weight, start.classifier.weight)
    assert out[1][0].classifier.weight.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_unequal_sizes_with_partial_batches(name, dtype):
    # batch 8: 20 -> 8, 8, 4 | 8, 8, 4;  13 -> 8, 5 | 8, 5 | 8, 5;  32 -> 8, 8, 8, 8 | 8, 8.
    # Step 1: all 8. Step 2: sizes 4, 8, 8 -> two groups. Step 3: 8, 5... mixed sizes at
    # several steps, including three different sizes at once (step 5: 4, 5, 8).
    sizes = [20, 13, 32]
    seeds = [7, 8, 9]
    spec = SPEC
    per_step = [[len(b) for b in batch_order(n, spec.batch_size, spec,
                                             torch.Generator().manual_seed(s))]
                for n, s in zip(sizes, seeds)]
    assert per_step == [[8, 8, 4, 8, 8, 4], [8, 5, 8, 5, 8, 5], [8, 8, 8, 8, 8, 8]]
    assert_same_training(*run_both(name, (1, 8, 8), sizes, spec, seeds, dtype=dtype))


def test_one_example_tail_dropped_like_sequential():
    # 17 examples, batch 8: 8, 8 and a dropped trailing batch of 1 -> epochs of 2 steps.
    spec = dataclasses.replace(SPEC, steps=5)
    assert_same_training(*run_both("cnn", (1, 8, 8), [17, 24, 9], spec, [1, 2, 3]))


def test_epoch_mode_with_different_step_counts():
    # epochs=2, batch 8: 24 -> 6 steps, 12 -> 4 steps, 40 -> 10 steps, all in one batched
    # computation, each with the lr schedule spanning its own steps (three lrs per step).
    # float64: in float32 the 10-step client's conv weights here end ~2e-4 apart (a last-bit
    # difference that flips a discrete choice, see TOLERANCES); in float64 they agree to 1e-15.
    spec = LocalTrainSpec(epochs=2, steps=0, batch_size=8, lr=0.05, momentum=0.9,
                          weight_decay=5e-4, lr_schedule="cosine", progress_start=0.2,
                          progress_end=0.6)
    out = run_both("cnn", (1, 8, 8), [24, 12, 40], spec, [0, 1, 2], dtype=torch.float64)
    assert [s["steps"] for s in out[3]] == [6.0, 4.0, 10.0]
    assert_same_training(*out)


def test_no_momentum_no_weight_decay_constant_lr():
    spec = LocalTrainSpec(steps=4, batch_size=6, lr=0.2, momentum=0.0, weight_decay=0.0)
    assert_same_training(*run_both("mlp", (1, 8, 8), [18, 12, 30], spec, [5, 6, 7]))


def test_proximal_term_is_batched():
    # Same start (as in FedProx, all clients receive the global model), large mu.
    spec = dataclasses.replace(SPEC, proximal_mu=0.5)
    assert_same_training(*run_both("cnn", (1, 8, 8), [16, 24, 20], spec, [1, 2, 3], same_init=True))


def test_chunks_give_the_same_result():
    # max_clients=2 splits the three clients into chunks of 2 and 1.
    spec = dataclasses.replace(SPEC, steps=3)
    assert_same_training(*run_both("cnn", (1, 8, 8), [16, 24, 20], spec, [1, 2, 3], max_clients=2))


def test_shared_dataset_and_empty_client():
    # Two clients hold the same tensors (replicas partition), one holds nothing.
    shape = (1, 8, 8)
    (x, y), = client_data([20], shape)
    data = [(x, y), (x, y), (x[:0], y[:0])]
    spec = dataclasses.replace(SPEC, steps=3)
    models = [build_model("mlp", shape, 10, seed=k) for k in range(3)]
    sequential = [copy.deepcopy(m) for m in models]
    seq_stats = [train_local(m, xx, yy, spec, seed=s)
                 for m, (xx, yy), s in zip(sequential, data, [4, 5, 6])]
    bat_stats = train_batched(models, data, spec, [4, 5, 6])
    assert bat_stats[2]["steps"] == 0.0 and bat_stats[2]["examples"] == 0.0
    assert_same_training(sequential, models, seq_stats, bat_stats)


def test_auto_max_clients():
    # 2**19 input elements per chunk, within [8, 64]:
    #   batch 32 x 784 (28x28) = 25088 -> 524288 // 25088 = 20
    #   batch 32 x 64 (8x8) = 2048 -> 256 -> 64;  batch 64 x 3072 (32x32x3) -> 2 -> 8
    assert auto_max_clients(32, (1, 28, 28)) == 20
    assert auto_max_clients(32, (1, 8, 8)) == 64
    assert auto_max_clients(64, (3, 32, 32)) == 8


def test_can_batch_and_errors():
    assert can_batch(SPEC)
    assert can_batch(dataclasses.replace(SPEC, proximal_mu=0.1))
    bad = dataclasses.replace(SPEC, lr_schedule="step")
    assert not can_batch(bad)
    models = [build_model("mlp", (1, 4, 4), 3, seed=k) for k in range(2)]
    data = client_data([8, 8], (1, 4, 4), num_classes=3)
    with pytest.raises(ValueError, match="lr_schedule"):
        train_batched(models, data, bad, [0, 1])
    with pytest.raises(ValueError, match="one of each"):
        train_batched(models, data, SPEC, [0])
    mixed = [models[0], build_model("mlp", (1, 4, 4), 5)]
    with pytest.raises(ValueError, match="architecture"):
        train_batched(mixed, data, SPEC, [0, 1])
    assert train_batched([], [], SPEC, []) == []


def test_unknown_spec_option_is_refused():
    # A future LocalTrainSpec option batched training does not know must be refused by name
    # when set, and ignored at its default.
    @dataclasses.dataclass(frozen=True)
    class FutureSpec(LocalTrainSpec):
        clip_norm: float = 0.0

    assert can_batch(FutureSpec(steps=2))
    assert not can_batch(FutureSpec(steps=2, clip_norm=1.0))
    models = [build_model("mlp", (1, 4, 4), 3, seed=k) for k in range(2)]
    data = client_data([8, 8], (1, 4, 4), num_classes=3)
    with pytest.raises(ValueError, match="clip_norm"):
        train_batched(models, data, FutureSpec(steps=2, clip_norm=1.0), [0, 1])


def test_frozen_parameters_stay_frozen():
    spec = dataclasses.replace(SPEC, steps=3)
    shape = (1, 8, 8)
    models = [build_model("cnn", shape, 10, seed=k) for k in range(3)]
    for m in models:
        m.fc1.weight.requires_grad_(False)
    data = client_data([16, 16, 16], shape)
    sequential = [copy.deepcopy(m) for m in models]
    seq_stats = [train_local(m, x, y, spec, seed=s)
                 for m, (x, y), s in zip(sequential, data, [1, 2, 3])]
    start = [m.fc1.weight.clone() for m in models]
    bat_stats = train_batched(models, data, spec, [1, 2, 3])
    assert_same_training(sequential, models, seq_stats, bat_stats)
    assert all(torch.equal(m.fc1.weight, w) for m, w in zip(models, start))


# --- unequal step counts in one batched computation ------------------------------------------


def test_masked_step_moves_only_the_clients_in_a_piece():
    # Three stacked one-weight clients, SGD with momentum 0.9, weight decay 0.1, lr 0.5.
    # Step 0, clients 0 and 1 (gradients 0.5, 1.0):
    #   client 0: buffer = 0.5 + 0.1 * 1 = 0.6,  weight = 1 - 0.5 * 0.6 = 0.7
    #   client 1: buffer = 1.0 + 0.1 * 2 = 1.2,  weight = 2 - 0.5 * 1.2 = 1.4
    #   client 2 (no step): weight 3, buffer 0, untouched
    # Step 1, client 0 only (gradient 0):
    #   client 0: buffer = 0.9 * 0.6 + 0 + 0.1 * 0.7 = 0.61, weight = 0.7 - 0.5 * 0.61 = 0.395
    #   client 1 stays at 1.4 and 1.2; SGD over the whole stack would have moved it by its
    #   momentum and decay to 1.4 - 0.5 * (0.9 * 1.2 + 0.1 * 1.4) = 0.79.
    from fedwa.core.batched import _masked_step

    spec = LocalTrainSpec(lr=0.5, momentum=0.9, weight_decay=0.1)
    params = {"w": torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)}
    buffers: dict = {}
    steps_of = [2, 1, 0]
    _masked_step(params, [(0, 2, {"w": torch.tensor([[0.5], [1.0]], dtype=torch.float64)})],
                 buffers, spec, 0, steps_of, True)
    assert params["w"].flatten().tolist() == pytest.approx([0.7, 1.4, 3.0], abs=1e-15)
    assert buffers["w"].flatten().tolist() == pytest.approx([0.6, 1.2, 0.0], abs=1e-15)
    _masked_step(params, [(0, 1, {"w": torch.zeros(1, 1, dtype=torch.float64)})],
                 buffers, spec, 1, steps_of, True)
    assert params["w"].flatten().tolist() == pytest.approx([0.395, 1.4, 3.0], abs=1e-15)
    assert buffers["w"].flatten().tolist() == pytest.approx([0.61, 1.2, 0.0], abs=1e-15)
    assert params["w"][2].item() == 3.0 and buffers["w"][2].item() == 0.0  # bit for bit


@pytest.mark.parametrize("fused", [True, False])
def test_masked_step_gives_each_client_the_lr_of_its_own_step_count(fused):
    # Cosine from lr 1 over [0, 1), no momentum or decay: at step 1 a 4-step client is at
    # progress 1/4, lr = (1 + cos(pi / 4)) / 2 = 0.853553..., a 2-step one at progress 1/2,
    # lr = 0.5. Gradient 1 each: weights 10 - 0.853553 and 10 - 0.5.
    from fedwa.core.batched import _masked_step

    spec = LocalTrainSpec(lr=1.0, momentum=0.0, weight_decay=0.0, lr_schedule="cosine")
    params = {"w": torch.full((3, 1), 10.0, dtype=torch.float64)}
    _masked_step(params, [(0, 3, {"w": torch.ones(3, 1, dtype=torch.float64)})], None, spec,
                 1, [4, 4, 2], fused)
    lr4 = (1 + 2 ** -0.5) / 2
    assert params["w"].flatten().tolist() == pytest.approx([10 - lr4, 10 - lr4, 9.5], abs=1e-15)


def test_plan_cuts_each_step_into_ranges_of_the_clients_still_training():
    # batch 8, one epoch: 32 -> 8 8 8 8, 20 -> 8 8 4, 13 -> 8 5, 5 -> 5; sorted by step count,
    # then by the size of the last batch (already in that order here).
    from fedwa.core.batched import _Range, _client_order, _plan_steps

    spec = LocalTrainSpec(epochs=1, batch_size=8)
    orders = [batch_order(n, 8, spec, torch.Generator().manual_seed(0)) for n in (32, 20, 13, 5)]
    assert sorted(orders, key=_client_order) == orders
    padded = _plan_steps(orders, pad=True)
    # Padding joins sizes within a factor of 2 of each other: 8 with 5, 8 with 4.
    assert padded == [(4, [_Range(0, 4, 8, True)]), (3, [_Range(0, 3, 8, True)]),
                      (2, [_Range(0, 2, 8, True)]), (1, [_Range(0, 1, 8, False)])]
    exact = _plan_steps(orders, pad=False)
    assert exact == [(4, [_Range(0, 3, 8, False), _Range(3, 4, 5, False)]),
                     (3, [_Range(0, 2, 8, False), _Range(2, 3, 5, False)]),
                     (2, [_Range(0, 1, 8, False), _Range(1, 2, 4, False)]),
                     (1, [_Range(0, 1, 8, False)])]
    # 8 and 3 are more than a factor 2 apart: two ranges even with padding.
    short = [batch_order(n, 8, spec, torch.Generator().manual_seed(0)) for n in (8, 3)]
    assert _plan_steps(short, pad=True) == [(2, [_Range(0, 1, 8, False),
                                                _Range(1, 2, 3, False)])]


def test_pads_only_models_without_batch_statistics():
    from fedwa.core.batched import _pads_exactly

    class MyLinear(torch.nn.Linear):  # a subclass may do anything in forward
        pass

    assert _pads_exactly(build_model("mlp", (1, 8, 8), 10))
    assert not _pads_exactly(build_model("cnn", (1, 8, 8), 10))  # BatchNorm
    assert not _pads_exactly(torch.nn.Sequential(MyLinear(4, 2)))
    assert _pads_exactly(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))


# Dirichlet-like sizes at batch 8, one epoch: 0 -> no step, 5 -> 1 step (5), 24 -> 3 steps,
# 61 -> 8 steps (last 5), 17 -> 8 8 (the trailing one-example batch dropped), 30 -> 8 8 8 6,
# 2 -> one batch of 2.
DIRICHLET_SIZES = [24, 0, 5, 61, 17, 30, 2]
DIRICHLET_SEEDS = [11, 12, 13, 14, 15, 16, 17]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("momentum,weight_decay,mu,schedule", [
    (0.9, 5e-3, 0.0, "cosine"), (0.0, 0.0, 0.0, "constant"), (0.9, 5e-4, 0.3, "constant")])
def test_unequal_step_counts_match_sequential(name, momentum, weight_decay, mu, schedule):
    spec = LocalTrainSpec(epochs=1, steps=0, batch_size=8, lr=0.1, momentum=momentum,
                          weight_decay=weight_decay, proximal_mu=mu, lr_schedule=schedule,
                          progress_start=0.1, progress_end=0.4)
    out = run_both(name, (1, 8, 8), DIRICHLET_SIZES, spec, DIRICHLET_SEEDS,
                   same_init=mu > 0, dtype=torch.float64)
    assert [s["steps"] for s in out[3]] == [3.0, 0.0, 1.0, 8.0, 2.0, 4.0, 1.0]
    assert_same_training(*out)


def test_clients_with_no_or_one_step_end_as_sequential_training_leaves_them():
    # Among clients with 3 steps: one with none (empty) and one with a single batch of 5.
    # The empty one is bit for bit where it started, BatchNorm statistics and count included;
    # the one-step one agrees with train_local and has counted exactly one batch.
    sizes, seeds = [24, 0, 5, 24], [1, 2, 3, 4]
    spec = LocalTrainSpec(epochs=1, steps=0, batch_size=8, lr=0.1, momentum=0.9,
                          weight_decay=5e-3)
    models = [build_model("cnn", (1, 8, 8), 10, seed=10 + k).double() for k in range(4)]
    start = [copy.deepcopy(m.state_dict()) for m in models]
    sequential, batched, seq_stats, bat_stats = run_both(
        "cnn", (1, 8, 8), sizes, spec, seeds, dtype=torch.float64)
    assert_same_training(sequential, batched, seq_stats, bat_stats)
    for n, value in batched[1].state_dict().items():
        assert torch.equal(value, start[1][n]), n
    assert [int(m.bn1.num_batches_tracked) for m in batched] == [3, 0, 1, 3]
    assert bat_stats[1] == {"loss": 0.0, "steps": 0.0, "examples": 0.0, "seconds": 0.0}
    assert bat_stats[2]["steps"] == 1.0 and bat_stats[2]["examples"] == 5.0


def test_unequal_step_counts_in_float32_and_chunks():
    # The mlp (padded batches) in float32, and chunks of 3 that cut the sorted clients.
    spec = LocalTrainSpec(epochs=2, steps=0, batch_size=8, lr=0.05, momentum=0.9,
                          weight_decay=5e-4, lr_schedule="cosine")
    assert_same_training(*run_both("mlp", (1, 8, 8), DIRICHLET_SIZES, spec, DIRICHLET_SEEDS))
    assert_same_training(*run_both("mlp", (1, 8, 8), DIRICHLET_SIZES, spec, DIRICHLET_SEEDS,
                                   dtype=torch.float64, max_clients=3))
    assert_same_training(*run_both("cnn", (1, 8, 8), DIRICHLET_SIZES, spec, DIRICHLET_SEEDS,
                                   dtype=torch.float64, max_clients=3))


def test_entries_walk_matches_named_parameters_and_sets_training_mode():
    from fedwa.core.batched import _entries

    model = build_model("cnn", (1, 8, 8), 10)
    model.extra = torch.nn.Linear(2, 2)
    model.tied = model.extra  # the same module twice: its tensors once, first name
    model.eval()
    params, buffers = _entries(model)
    assert list(params) == [n for n, _ in model.named_parameters()]
    assert list(buffers) == [n for n, _ in model.named_buffers()]
    assert all(params[n] is t for n, t in model.named_parameters())
    assert all(m.training for m in model.modules())  # as train_local leaves it
