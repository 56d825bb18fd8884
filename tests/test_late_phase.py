"""Late-phase weights: member layout, exact collapse, cycling updates, ensembling."""

import copy

import pytest
import torch
from torch import nn

from fedwa.core.late_phase import (
                                   MemberModule,
                                   add_late_phase,
                                   collapse_state,
                                   ensemble_logits,
                                   is_member_state,
                                   late_phase_modules,
                                   member_names,
                                   num_members,
                                   set_active,
                                   sync_members,
                                   train_late_phase,
                                   )
from fedwa.models import build_model
from fedwa.core.training import LocalTrainSpec, batch_order, train_local

SHAPE = (1, 4, 4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as fedwa.core.training.configure_threads sets for CPU clients: on a busy
    machine a second thread only adds contention to these tiny tensors."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ConvBNHead(nn.Module):
    """conv -> BN -> flatten -> classifier: linear after the BN, so collapse is exact."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(3 * 16, 4)

    def forward(self, x):
        return self.classifier(self.flatten(self.bn(self.conv(x))))


class Holder(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(x)


@torch.no_grad()
def randomise_members(model: nn.Module, seed: int, bn_only: bool = False) -> None:
    """Give every member distinct random parameters and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    for name, module in late_phase_modules(model):
        if bn_only and name == "classifier":
            continue
        for member in module.members:
            for pname, t in list(member.named_parameters()) + list(member.named_buffers()):
                if not t.is_floating_point():
                    t.fill_(int(torch.randint(1, 50, (), generator=g)))
                elif pname == "running_var":
                    t.copy_(torch.rand(t.shape, generator=g) * 2 + 0.1)
                elif pname == "weight" and isinstance(member, nn.modules.batchnorm._BatchNorm):
                    t.copy_(torch.rand(t.shape, generator=g) * 2 - 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g))


def data(n: int = 20, seed: int = 0, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, classes, (n,), generator=g)


def member_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    outs = []
    with torch.no_grad():
        for j in range(num_members(model)):
            set_active(model, j)
            outs.append(model(x))
    return outs


# --- layout ----------------------------------------------------------------------------------


def test_add_late_phase_wraps_bn_and_head_only():
    model = add_late_phase(build_model("cnn", SHAPE, 3), 3)
    names = [name for name, _ in late_phase_modules(model)]
    assert names == ["bn1", "bn2", "classifier"]
    assert num_members(model) == 3
    keys = list(model.state_dict())
    assert "bn1.members.2.running_var" in keys and "classifier.members.1.bias" in keys
    assert "conv1.weight" in keys and "fc1.weight" in keys
    # Members are distinct tensors, not aliases.
    m = model.classifier.members
    assert m[0].weight.data_ptr() != m[1].weight.data_ptr()
    assert torch.equal(m[0].weight, m[1].weight)
    assert is_member_state(keys)
    assert not is_member_state(build_model("cnn", SHAPE, 3).state_dict())
    assert member_names(keys)["bn2"]["weight"] == {k: f"bn2.members.{k}.weight" for k in range(3)}


def test_mlp_gets_a_head_only_and_resnet_every_bn():
    mlp = add_late_phase(build_model("mlp", SHAPE, 3), 2)
    assert [n for n, _ in late_phase_modules(mlp)] == ["classifier"]
    resnet = add_late_phase(build_model("resnet20", SHAPE, 3), 2)
    plain = build_model("resnet20", SHAPE, 3)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert len(late_phase_modules(resnet)) == n_bn + 1
    # The collapse recovers exactly the plain key set, in the plain order.
    assert list(collapse_state(resnet.state_dict(), 2)) == list(plain.state_dict())


def test_k1_leaves_model_unchanged_and_rewrap_is_checked():
    model = build_model("cnn", SHAPE, 3)
    keys = list(model.state_dict())
    assert add_late_phase(model, 1) is model
    assert list(model.state_dict()) == keys and num_members(model) == 1
    add_late_phase(model, 2)
    assert add_late_phase(model, 2) is model and num_members(model) == 2
    with pytest.raises(ValueError):
        add_late_phase(model, 3)


def test_sync_members_copies_params_and_buffers():
    model = add_late_phase(build_model("cnn", SHAPE, 3), 3)
    randomise_members(model, 1)
    source = {n: t.clone() for n, t in model.bn1.members[1].state_dict().items()}
    assert not torch.equal(model.bn1.members[0].running_mean, source["running_mean"])
    sync_members(model, 1)
    for module in (model.bn1, model.bn2, model.classifier):
        reference = module.members[1].state_dict()
        for member in module.members:
            for name, value in member.state_dict().items():
                assert torch.equal(value, reference[name]), name
    for name, value in model.bn1.members[2].state_dict().items():
        assert torch.equal(value, source[name])  # running stats and num_batches_tracked too


# --- collapse --------------------------------------------------------------------------------


@pytest.mark.parametrize("bn_cls, shape", [(nn.BatchNorm2d, (5, 4, 3, 3)), (nn.BatchNorm1d, (6, 4))])
def test_collapsed_bn_equals_mean_of_member_outputs(bn_cls, shape):
    model = add_late_phase(Holder(bn_cls(4)), 3)
    randomise_members(model, 2)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    expected = torch.stack(member_outputs(model, x)).mean(0)
    # Members really differ, otherwise the check is empty.
    assert (member_outputs(model, x)[0] - expected).abs().max() > 0.1
    plain = Holder(bn_cls(4))
    state = collapse_state(model.state_dict(), 3)
    plain.load_state_dict(state)
    plain.eval()
    assert torch.allclose(plain(x), expected, atol=1e-5, rtol=1e-5)
    counts = [int(m.num_batches_tracked) for m in model.bn.members]
    assert int(state["bn.num_batches_tracked"]) == max(counts)


def test_collapsed_bn_without_affine_is_exact_too():
    model = add_late_phase(Holder(nn.BatchNorm1d(4, affine=False)), 2)
    randomise_members(model, 4)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(5))
    expected = torch.stack(member_outputs(model, x)).mean(0)
    plain = Holder(nn.BatchNorm1d(4, affine=False))
    plain.load_state_dict(collapse_state(model.state_dict(), 2))
    assert torch.allclose(plain.eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_cnn_collapse_head_is_mean_and_bn_layers_are_exact():
    model = add_late_phase(build_model("cnn", SHAPE, 3), 3)
    randomise_members(model, 6)
    state = model.state_dict()
    collapsed = collapse_state(state, 3)
    plain = build_model("cnn", SHAPE, 3)
    assert list(collapsed) == list(plain.state_dict())
    plain.load_state_dict(collapsed)  # strict
    for leaf in ("weight", "bias"):
        heads = torch.stack([state[f"classifier.members.{k}.{leaf}"] for k in range(3)])
        assert torch.allclose(collapsed[f"classifier.{leaf}"], heads.mean(0), atol=1e-7)
    assert torch.equal(collapsed["conv1.weight"], state["conv1.weight"])
    plain.eval()
    for name in ("bn1", "bn2"):
        channels = getattr(plain, name).num_features
        x = torch.randn(4, channels, 2, 2, generator=torch.Generator().manual_seed(7))
        layer = getattr(model, name)
        layer.eval()
        outs = []
        for member in layer.members:
            outs.append(member(x))
        assert torch.allclose(getattr(plain, name)(x), torch.stack(outs).mean(0), atol=1e-5)


def test_collapse_of_model_with_only_bn_members_differing_is_exact():
    model = add_late_phase(ConvBNHead(), 3)
    randomise_members(model, 8, bn_only=True)
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(9))
    expected = torch.stack(member_outputs(model, x)).mean(0)
    plain = ConvBNHead()
    plain.load_state_dict(collapse_state(model.state_dict(), 3))
    assert torch.allclose(plain.eval()(x), expected, atol=1e-5)


def test_collapse_checks_member_count():
    state = add_late_phase(build_model("cnn", SHAPE, 3), 3).state_dict()
    with pytest.raises(ValueError):
        collapse_state(state, 2)
    with pytest.raises(ValueError):
        collapse_state(build_model("cnn", SHAPE, 3).state_dict(), 3)
    plain = build_model("cnn", SHAPE, 3).state_dict()
    assert all(torch.equal(plain[k], v) for k, v in collapse_state(plain, 1).items())


# --- training --------------------------------------------------------------------------------

SPEC = LocalTrainSpec(epochs=1, batch_size=5, lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_before_late_phase_member0_trains_like_train_local(k, schedule):
    spec = LocalTrainSpec(epochs=2, batch_size=6, lr=0.1, momentum=0.9, weight_decay=1e-3,
                          proximal_mu=0.01 if k == 3 else 0.0, lr_schedule=schedule,
                          progress_start=0.2, progress_end=0.4)
    x, y = data(20)
    plain = build_model("cnn", SHAPE, 3, seed=1)
    model = add_late_phase(copy.deepcopy(plain), k)
    keys = list(model.state_dict())
    ref = train_local(plain, x, y, spec, seed=11)
    got = train_late_phase(model, x, y, spec, seed=11, late=False)
    assert list(model.state_dict()) == keys
    assert got["loss"] == ref["loss"] and got["steps"] == ref["steps"] == got["shared_steps"]
    assert got["examples"] == ref["examples"]
    collapsed = collapse_state(model.state_dict(), k)
    for name, value in plain.state_dict().items():
        if "running_var" in name or "running_mean" in name or name.startswith("bn"):
            continue  # the BN layers are checked through their outputs below
        assert torch.allclose(collapsed[name], value, atol=1e-7, rtol=0), name
    if k == 1:
        for name, value in plain.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
    else:
        # Members identical after syncing, member 0 equal to the plain model.
        for _, module in late_phase_modules(model):
            for member in module.members[1:]:
                for name, value in member.state_dict().items():
                    assert torch.equal(value, module.members[0].state_dict()[name])
        for name, value in plain.state_dict().items():
            member_key = name.replace("bn1.", "bn1.members.0.").replace(
                "bn2.", "bn2.members.0.").replace("classifier.", "classifier.members.0.")
            assert torch.allclose(model.state_dict()[member_key], value, atol=1e-7, rtol=0), name
    # The collapse of identical members computes what the member model computes.
    rebuilt = build_model("cnn", SHAPE, 3)
    rebuilt.load_state_dict(collapsed)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), plain.eval()(x), atol=1e-5)


def test_late_phase_with_one_member_is_plain_sgd():
    x, y = data(20)
    plain = build_model("cnn", SHAPE, 3, seed=2)
    model = copy.deepcopy(plain)
    ref = train_local(plain, x, y, SPEC, seed=5)
    got = train_late_phase(model, x, y, SPEC, seed=5, late=True)
    assert got["loss"] == ref["loss"] and got["shared_steps"] == got["steps"] == ref["steps"]
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_shared_steps_once_per_cycle_members_once_per_own_batch():
    k, steps = 3, 7
    spec = LocalTrainSpec(steps=steps, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0)
    x, y = data(16)
    model = add_late_phase(build_model("cnn", SHAPE, 3, seed=3), k)
    keys = list(model.state_dict())
    snapshots: list[dict[str, torch.Tensor]] = []

    def snap(module, args):
        if module.training:
            snapshots.append({
                "shared": module.fc1.weight.detach().clone(),
                **{f"m{j}": module.classifier.members[j].weight.detach().clone()
                   for j in range(k)},
                "active": module.classifier.active,
            })

    handle = model.register_forward_pre_hook(snap)
    out = train_late_phase(model, x, y, spec, seed=4, late=True)
    handle.remove()
    assert out["steps"] == 7 and out["shared_steps"] == 3 and out["examples"] == 28
    assert list(model.state_dict()) == keys
    final = {"shared": model.fc1.weight.detach(),
             **{f"m{j}": model.classifier.members[j].weight.detach() for j in range(k)}}
    states = snapshots + [final]
    assert [s["active"] for s in snapshots] == [0, 1, 2, 0, 1, 2, 0]
    shared_changed = [not torch.equal(states[i]["shared"], states[i + 1]["shared"])
                      for i in range(steps)]
    # Changes after batches 3 and 6 (full cycles) and 7 (the incomplete cycle), 1-based.
    assert shared_changed == [False, False, True, False, False, True, True]
    for i in range(steps):
        moved = [j for j in range(k)
                 if not torch.equal(states[i][f"m{j}"], states[i + 1][f"m{j}"])]
        assert moved == [i % k], i
    assert model.classifier.active == 0


@pytest.mark.parametrize("n", [3, 2])
@pytest.mark.parametrize("shared_grad", [None, "sum", "mean"])
def test_shared_step_uses_summed_or_mean_gradient_and_members_their_own(n, shared_grad):
    """One (possibly incomplete) cycle, checked against gradients computed by hand.

    ``None`` is the default, which must be the authors' sum; an incomplete cycle of ``n < K``
    batches still steps, with the sum (mean) of its ``n`` gradients."""
    k, lr = 3, 0.2
    spec = LocalTrainSpec(steps=n, batch_size=4, lr=lr, momentum=0.0, weight_decay=0.0)
    x, y = data(12)
    model = add_late_phase(ConvBNHead(), k)
    randomise_members(model, 10)  # distinct members, so member j's gradient is its own
    start = copy.deepcopy(model)
    batches = batch_order(len(x), spec.batch_size, spec, torch.Generator().manual_seed(8))
    shared_grads, member_grads = [], []
    for i, idx in enumerate(batches):
        probe = copy.deepcopy(start).train()
        set_active(probe, i % k)
        loss = nn.functional.cross_entropy(probe(x[idx]), y[idx])
        loss.backward()
        shared_grads.append(probe.conv.weight.grad.clone())
        member_grads.append((probe.classifier.members[i % k].weight.grad.clone(),
                             probe.bn.members[i % k].weight.grad.clone()))
    options = {} if shared_grad is None else {"shared_grad": shared_grad}
    out = train_late_phase(model, x, y, spec, seed=8, late=True, **options)
    assert out["shared_steps"] == 1 and out["steps"] == n
    combined = torch.stack(shared_grads)
    combined = combined.mean(0) if shared_grad == "mean" else combined.sum(0)
    expected_conv = start.conv.weight - lr * combined
    assert torch.allclose(model.conv.weight, expected_conv, atol=1e-6)
    for j in range(k):
        head = start.classifier.members[j].weight
        gamma = start.bn.members[j].weight
        if j < n:
            head = head - lr * member_grads[j][0]
            gamma = gamma - lr * member_grads[j][1]
        assert torch.allclose(model.classifier.members[j].weight, head, atol=1e-6)
        assert torch.allclose(model.bn.members[j].weight, gamma, atol=1e-6)
    # Member j's running statistics moved only if it saw a batch.
    for j in range(k):
        moved = not torch.equal(model.bn.members[j].running_mean, start.bn.members[j].running_mean)
        assert moved == (j < n)


def test_sum_mode_moves_the_shared_weights_k_times_as_far_as_mean_mode():
    """First cycle, plain SGD: the shared weights stay put within the cycle and every batch
    meets a fresh member, so both modes see the same gradients g_1..g_K; "sum" steps by
    -lr (g_1 + ... + g_K), "mean" by a K-th of that."""
    k, lr = 4, 0.05
    spec = LocalTrainSpec(steps=k, batch_size=5, lr=lr, momentum=0.0, weight_decay=0.0)
    x, y = data(20, seed=3)
    start = add_late_phase(build_model("cnn", SHAPE, 3, seed=6), k)
    randomise_members(start, 13)
    trained = {}
    for mode in ("sum", "mean"):
        trained[mode] = copy.deepcopy(start)
        train_late_phase(trained[mode], x, y, spec, seed=21, late=True, shared_grad=mode)
    # Independent gradients: autograd on a fresh copy of the starting model per batch.
    batches = batch_order(len(x), spec.batch_size, spec, torch.Generator().manual_seed(21))
    assert len(batches) == k
    shared_names = [n for n in dict(start.named_parameters()) if ".members." not in n]
    assert shared_names  # conv1, conv2, fc1: the check is not empty
    total = {n: torch.zeros_like(p) for n, p in start.named_parameters() if n in shared_names}
    for i, idx in enumerate(batches):
        probe = copy.deepcopy(start).train()
        set_active(probe, i)
        nn.functional.cross_entropy(probe(x[idx]), y[idx]).backward()
        for n, p in probe.named_parameters():
            if n in total:
                total[n] += p.grad
    before = dict(start.named_parameters())
    after = {mode: dict(model.named_parameters()) for mode, model in trained.items()}
    for n in shared_names:
        moved_sum = after["sum"][n] - before[n]
        moved_mean = after["mean"][n] - before[n]
        assert moved_sum.abs().max() > 0, n
        assert torch.allclose(moved_sum, k * moved_mean, rtol=1e-4, atol=1e-7), n
        assert torch.allclose(moved_sum, -lr * total[n], rtol=1e-4, atol=1e-7), n
    # The members do not depend on the mode within the first cycle: bit for bit the same.
    for n, value in trained["sum"].state_dict().items():
        if ".members." in n:
            assert torch.equal(value, trained["mean"].state_dict()[n]), n


class ScalarShared(nn.Module):
    """One shared scalar ``w`` in front of a two-class linear head: ``logits = W (w x) + b``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.classifier = nn.Linear(1, 2)

    def forward(self, x):
        return self.classifier(self.w * x)


@pytest.mark.parametrize("k, shared_grad, expected_w", [
    (2, "sum", 3.0), (2, "mean", 1.5),
    (3, "sum", 3.0), (3, "mean", 1.5),  # an incomplete cycle of 2 < K batches still steps
])
def test_scalar_shared_weight_worked_by_hand(k, shared_grad, expected_w):
    """Worked by hand. Start at w = 0, so the logits are b = 0 and p = (1/2, 1/2) on every
    batch of the cycle. Member j's head is W_j = (a_j, -a_j) with a_0 = 1, a_1 = 2. Both
    batches are the one example x = 2 with label 0, so dL/dlogits = p - e_0 = (-1/2, 1/2) and
    dL/dw = (-1/2) a_j x + (1/2)(-a_j) x = -a_j x: g_1 = -2 (member 0), g_2 = -4 (member 1).
    With lr = 0.5: "sum" gives w = -0.5 (-6) = 3, "mean" w = -0.5 (-3) = 1.5. The heads'
    weights get no gradient (their input w x is 0); member j's bias moves by
    -lr (p - e_0) = (0.25, -0.25)."""
    model = add_late_phase(ScalarShared(), k)
    with torch.no_grad():
        for j, member in enumerate(model.classifier.members):
            member.weight.copy_(torch.tensor([[j + 1.0], [-(j + 1.0)]]))
            member.bias.zero_()
    x, y = torch.full((2, 1), 2.0), torch.zeros(2, dtype=torch.long)
    spec = LocalTrainSpec(steps=2, batch_size=1, lr=0.5, momentum=0.0, weight_decay=0.0)
    out = train_late_phase(model, x, y, spec, seed=0, late=True, shared_grad=shared_grad)
    assert out["steps"] == 2 and out["shared_steps"] == 1
    assert model.w.item() == pytest.approx(expected_w, abs=1e-6)
    for j, member in enumerate(model.classifier.members):
        assert torch.equal(member.weight, torch.tensor([[j + 1.0], [-(j + 1.0)]]))
        bias = [0.25, -0.25] if j < 2 else [0.0, 0.0]
        assert torch.allclose(member.bias, torch.tensor(bias), atol=1e-7), j


def test_shared_grad_is_checked():
    model = add_late_phase(ConvBNHead(), 2)
    x, y = data(8)
    with pytest.raises(ValueError, match="shared_grad"):
        train_late_phase(model, x, y, SPEC, seed=0, late=True, shared_grad="average")


# --- ensemble --------------------------------------------------------------------------------


def test_ensemble_logits_is_log_mean_softmax_and_restores_state():
    model = add_late_phase(build_model("cnn", SHAPE, 3, seed=4), 3)
    randomise_members(model, 12)
    x, _ = data(9)
    by_hand = torch.stack([torch.softmax(o, dim=1) for o in member_outputs(model, x)]).mean(0)
    model.train()
    set_active(model, 2)
    got = ensemble_logits(model, x, batch_size=4)
    assert torch.allclose(got, by_hand.log(), atol=1e-5)
    assert torch.allclose(got.exp().sum(1), torch.ones(9), atol=1e-5)
    assert all(m.training for m in model.modules())
    assert all(m.active == 2 for _, m in late_phase_modules(model))
    # Genuinely an ensemble: differs from every single member.
    for o in member_outputs(model, x):
        assert not torch.allclose(torch.log_softmax(o, dim=1), got, atol=1e-3)


def test_ensemble_of_plain_model_is_its_log_softmax():
    model = build_model("mlp", SHAPE, 3, seed=5).eval()
    x, _ = data(6)
    with torch.no_grad():
        expected = torch.log_softmax(model(x), dim=1)
    assert torch.allclose(ensemble_logits(model, x), expected, atol=1e-6)
    assert not model.training


def test_member_module_forward_uses_active_member():
    module = MemberModule(nn.Linear(2, 1), 2)
    with torch.no_grad():
        module.members[1].weight.fill_(3.0)
        module.members[1].bias.zero_()
    module.active = 1
    assert module(torch.ones(1, 2)).item() == 6.0
    assert list(module.state_dict()) == ["members.0.weight", "members.0.bias",
                                         "members.1.weight", "members.1.bias"]


# --- members in federated learning -----------------------------------------------------------


@pytest.fixture
def identity():
    """The server's task identity, which Flower's Message constructor reads (the Ray
    simulation and fedwa.flower.local_backend.run_in_process set it likewise)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def plain_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What a server sends back: float entries averaged, counters taken from the first."""
    return {n: torch.stack([s[n] for s in states]).mean(0) if v.is_floating_point() else v
            for n, v in states[0].items()}


@pytest.mark.parametrize("batch_clients", [False, True])
@pytest.mark.parametrize("mode", ["local", "averaged"])
def test_clients_keep_their_own_members_only_in_local_mode(identity, monkeypatch, mode,
                                                           batch_clients):
    """Two clients on different data, rounds 1 (early), 3 and 4 (late) of 4. In "local" mode a
    client starts round 4 from its own round-3 members, bit for bit, and the received shared
    weights; in "averaged" mode from the received model. Either way it replies with every
    entry, and keeps nothing before the late phase."""
    from flwr.app import ConfigRecord, MessageType, RecordDict

    from fedwa.apps import client_app
    from fedwa.flower.arrays import to_record, to_state_dict
    from fedwa.run.config import resolve_config
    from fedwa.flower.grid import RUN_CONFIG_KEY
    from fedwa.flower.local_backend import InProcessGrid
    from fedwa.data.task import federated_data, make_model

    config = resolve_config({"dataset": "digits", "model": "cnn", "num-clients": 2,
                             "num-server-rounds": 4, "late-phase-k": 2,
                             "late-phase-start": 0.5, "late-phase-members": mode,
                             "local-steps": 4, "batch-size": 16, "device": "cpu"})
    grid = InProcessGrid(client_app.app, 2, run_config=config,
                         train_many=client_app.train_many if batch_clients else None)
    nodes = grid.get_node_ids()
    pid = {node: int(grid.contexts[node].node_config["partition-id"]) for node in nodes}
    starts: dict[int, dict[str, torch.Tensor]] = {}
    run_train = client_app.run_train

    def capture(job):
        starts[job.pid] = {n: v.clone() for n, v in job.model.state_dict().items()}
        return run_train(job)

    monkeypatch.setattr(client_app, "run_train", capture)

    def train_round(server_round: int, state: dict[str, torch.Tensor]
                    ) -> dict[int, dict[str, torch.Tensor]]:
        content = RecordDict({"arrays": to_record(state),
                              "config": ConfigRecord({"server-round": server_round}),
                              RUN_CONFIG_KEY: ConfigRecord(config)})
        messages = [grid.create_message(content, MessageType.TRAIN, node, str(server_round))
                    for node in nodes]
        replies = grid.send_and_receive(messages)
        errors = [r.error for r in replies if r.has_error()]
        assert not errors, errors
        return {pid[r.metadata.src_node_id]: dict(to_state_dict(r.content["arrays"]))
                for r in replies}

    def kept(node: int) -> dict[str, torch.Tensor] | None:
        state = grid.contexts[node].state
        key = client_app.LATE_PHASE_MEMBERS_KEY
        return dict(to_state_dict(state[key])) if key in state else None

    initial = make_model(config, federated_data(config)).state_dict()
    keys = list(initial)
    members = [n for n in keys if ".members." in n]
    shared = [n for n in keys if ".members." not in n]
    assert members and shared

    early = train_round(1, initial)  # progress 0 < 0.5: members stay copies, nothing kept
    assert all(list(reply) == keys for reply in early.values())
    assert all(kept(node) is None for node in nodes)

    received3 = plain_average(list(early.values()))
    late = train_round(3, received3)  # progress 0.5: the first late-phase round
    for node in nodes:
        assert list(late[pid[node]]) == keys  # the reply still carries every entry
        if mode == "averaged":
            assert kept(node) is None
        else:
            own = kept(node)
            assert list(own) == members
            for n in members:
                assert torch.equal(own[n], late[pid[node]][n]), n
    # The two clients really trained apart, so "own" and "average" can be told apart.
    assert any(not torch.equal(late[0][n], late[1][n]) for n in members)

    received4 = plain_average(list(late.values()))
    train_round(4, received4)
    for p in (0, 1):
        start = starts[p]
        for n in shared:
            assert torch.equal(start[n], received4[n]), n
        for n in members:
            expected = late[p][n] if mode == "local" else received4[n]
            assert torch.equal(start[n], expected), n
        if mode == "local":
            assert any(not torch.equal(start[n], received4[n]) for n in members
                       if start[n].is_floating_point())
