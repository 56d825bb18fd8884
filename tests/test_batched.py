"""Batched training against K sequential ``train_local`` calls on the same models and data."""

import copy
import dataclasses

import pytest
import torch

from fedwa.batched import auto_max_clients, can_batch, train_batched
from fedwa.models import build_model
from fedwa.training import LocalTrainSpec, batch_order, train_local

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
