import copy
import dataclasses

import pytest
import torch
from torch import nn

from fedwa.core.alignment import (
                                  SPEC_BUILDERS,
                                  AxisRef,
                                  PermGroup,
                                  PermutationSpec,
                                  SpecBuilder,
                                  align_to,
                                  merge_aligned,
                                  permutation_spec,
                                  permute_state,
                                  random_permutations,
                                  register_spec,
                                  validate_spec,
                                  )
from fedwa.models import build_model

SHAPE = (1, 8, 8)
NAMES = ("mlp", "cnn", "resnet20")


def _model(name, seed=0, shape=SHAPE):
    """A model away from its initial state: BN affine params and running stats randomised."""
    model = build_model(name, shape, num_classes=5, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(7)
    return model


def _inputs(n=16, shape=SHAPE, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _clone_with(model, state):
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin


def _inverse(perm):
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return inv


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train_mode", [False, True])
def test_permuting_hidden_units_keeps_the_function(name, train_mode):
    model = _model(name)
    spec = permutation_spec(model)
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = _clone_with(model, permute_state(model.state_dict(), spec, perms))
    x = _inputs()
    model.train(train_mode)
    permuted.train(train_mode)
    with torch.no_grad():
        expected, got = model(x), permuted(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The permuted state really differs: the test would pass trivially otherwise.
    assert not torch.equal(permuted.state_dict()["classifier.weight"],
                           model.state_dict()["classifier.weight"])


def test_cnn_flatten_axis_permutes_in_blocks():
    model = _model("cnn")
    spec = permutation_spec(model)
    ref = next(r for r in spec.groups["conv2"].axes if r.key == "fc1.weight")
    assert (ref.axis, ref.block) == (1, 2 * 2)  # 8x8 input -> 2x2 maps after two pools
    perms = {k: torch.arange(g.size) for k, g in spec.groups.items()}
    perms["conv2"] = torch.arange(32).roll(1)  # new channel 0 = old channel 31
    w = model.state_dict()["fc1.weight"]
    out = permute_state(model.state_dict(), spec, perms)["fc1.weight"]
    torch.testing.assert_close(out[:, :4], w[:, 31 * 4 : 32 * 4], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 4:], w[:, : 31 * 4], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_align_recovers_a_random_permutation_exactly(name):
    original = _model(name)
    spec = permutation_spec(original)
    perms = random_permutations(spec, torch.Generator().manual_seed(5))
    copy = _clone_with(original, permute_state(original.state_dict(), spec, perms))
    found = align_to(original, copy, _inputs(24), spec, batch_size=10)
    for group, perm in perms.items():
        assert torch.equal(found[group], _inverse(perm)), group
    aligned = permute_state(copy.state_dict(), spec, found)
    reference = original.state_dict()
    assert list(aligned) == list(reference)
    for key, value in reference.items():
        assert torch.equal(aligned[key], value), key
    merged = merge_aligned([reference, aligned], [0.5, 0.5])
    for key, value in reference.items():
        assert merged[key].dtype == value.dtype
        assert torch.equal(merged[key], value), key


def test_align_to_itself_is_identity_and_restores_modes():
    model = _model("resnet20")
    model.train()
    other = _model("resnet20")
    other.eval()
    spec = permutation_spec(model)
    perms = align_to(model, other, _inputs(8), spec)
    assert all(torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert model.training and not other.training


def test_align_different_models_keeps_the_function():
    a, b = _model("cnn", seed=0), _model("cnn", seed=1)
    spec = permutation_spec(a)
    x = _inputs(16)
    perms = align_to(a, b, x, spec)
    assert not all(torch.equal(p, torch.arange(len(p))) for p in perms.values())
    aligned = _clone_with(b, permute_state(b.state_dict(), spec, perms))
    b.eval()
    aligned.eval()
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), b(x), rtol=1e-5, atol=1e-5)


def test_resnet20_spec_groups():
    spec = permutation_spec(_model("resnet20"))
    # 3 residual streams (one per stage) + 9 blocks' inner conv1/bn1 groups
    assert len(spec.groups) == 12
    assert [g for g in spec.groups if g.startswith("residual")] == [
        "residual0", "residual1", "residual2"
    ]
    keys = {r.key for r in spec.groups["residual0"].axes}
    assert {"conv1.weight", "bn1.running_var", "layer1.2.bn2.weight", "layer2.0.conv1.weight",
            "layer2.0.shortcut.0.weight"} <= keys
    assert "bn1.num_batches_tracked" not in keys
    assert {r.key for r in spec.groups["residual1"].axes} >= {
        "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_mean", "layer3.0.conv1.weight"
    }
    assert {"classifier.weight"} <= {r.key for r in spec.groups["residual2"].axes}
    assert len(permutation_spec(build_model("resnet32", SHAPE, 5)).groups) == 18


@pytest.mark.parametrize("name", ("mlp", "cnn", "resnet20", "resnet32"))
def test_spec_keys_exist_and_sizes_agree(name):
    model = build_model(name, (3, 12, 12), 4, width=2)
    spec = permutation_spec(model)
    state = model.state_dict()
    validate_spec(spec, model)
    for group in spec.groups.values():
        for ref in group.axes:
            assert state[ref.key].shape[ref.axis] == group.size * ref.block
    assert ("classifier.weight", 0) in spec.fixed


def test_validate_spec_catches_a_missing_group_and_bad_sizes():
    model = _model("cnn")
    spec = permutation_spec(model)
    partial = PermutationSpec(
        {k: g for k, g in spec.groups.items() if k != "fc1"}, spec.fixed
    )
    with pytest.raises(ValueError, match="fc1.bias axis 0 is neither permuted"):
        validate_spec(partial, model)
    g = spec.groups["conv1"]
    wrong = dict(spec.groups, conv1=dataclasses.replace(g, size=g.size + 1))
    with pytest.raises(ValueError, match="expected 17 units"):
        validate_spec(PermutationSpec(wrong, spec.fixed), model)
    ghost = dict(spec.groups, conv1=dataclasses.replace(g, axes=g.axes + (AxisRef("nope", 0),)))
    with pytest.raises(ValueError, match="no such key"):
        validate_spec(PermutationSpec(ghost, spec.fixed), model)


def test_permute_state_is_pure_and_checks_perms():
    model = _model("mlp")
    spec = permutation_spec(model)
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    perms = random_permutations(spec, torch.Generator().manual_seed(0))
    out = permute_state(state, spec, perms)
    for k in state:
        assert torch.equal(state[k], before[k])
        assert out[k].data_ptr() != state[k].data_ptr()
    with pytest.raises(ValueError, match="missing"):
        permute_state(state, spec, {"fc1": perms["fc1"]})
    with pytest.raises(ValueError, match="not a permutation"):
        permute_state(state, spec, dict(perms, fc1=torch.zeros(128, dtype=torch.long)))


def test_random_permutations_are_reproducible():
    spec = permutation_spec(_model("resnet20"))
    a = random_permutations(spec, torch.Generator().manual_seed(9))
    b = random_permutations(spec, torch.Generator().manual_seed(9))
    assert all(torch.equal(a[k], b[k]) for k in spec.groups)
    assert all(sorted(a[k].tolist()) == list(range(g.size)) for k, g in spec.groups.items())


def test_merge_aligned_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([5.0, -2.0]), "n": torch.tensor(8)}
    # 0.25 * [1, 2] + 0.75 * [5, -2] = [0.25 + 3.75, 0.5 - 1.5] = [4, -1]
    merged = merge_aligned([a, b], [0.25, 0.75])
    assert torch.equal(merged["w"], torch.tensor([4.0, -1.0]))
    assert torch.equal(merged["n"], torch.tensor(3))  # integer buffer: first state's value
    # weights are normalised: 1:3 is the same as 0.25:0.75
    assert torch.equal(merge_aligned([a, b], [1, 3])["w"], torch.tensor([4.0, -1.0]))
    with pytest.raises(ValueError):
        merge_aligned([a, b], [1.0])
    with pytest.raises(ValueError):
        merge_aligned([a, b], [0.0, 0.0])


def test_registry_extension_point():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(TypeError, match="register_spec"):
        permutation_spec(Tiny())

    @register_spec(Tiny)
    def tiny_spec(model):
        s = SpecBuilder(model)
        s.group("a", 4)
        s.produces("a", "a")
        s.consumes("a", "b")
        s.probe("a", "a")
        s.fix("a.weight", 1)
        s.fix("b.weight", 0)
        s.fix("b.bias", 0)
        return s.build()

    try:
        torch.manual_seed(0)
        ref = Tiny()
        spec = permutation_spec(ref)
        assert isinstance(spec.groups["a"], PermGroup)
        perm = {"a": torch.tensor([2, 0, 3, 1])}
        other = Tiny()
        other.load_state_dict(permute_state(ref.state_dict(), spec, perm))
        found = align_to(ref, other, torch.randn(32, 3), spec)
        assert torch.equal(found["a"], _inverse(perm["a"]))
    finally:
        SPEC_BUILDERS.pop(Tiny)
