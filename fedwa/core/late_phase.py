"""Late-phase weights: K members of the BatchNorm layers and the head, collapsed at the end.

Late-phase weights (von Oswald, Kobayashi et al., "Neural networks with late-phase weights",
ICLR 2021, arXiv 2007.12927) give a small, cheap subset of the weights -- here every BatchNorm
layer (affine parameters and running statistics) and the final linear layer
``model.classifier`` -- ``K`` copies ("members"). Everything else is shared. In the late phase
the minibatches cycle through the members: batch ``i`` runs the network with member
``i mod K``, that member steps on its own batch, and the shared weights step once per cycle of
``K`` batches. At the end the members collapse into one plain network (section 2 of the paper:
the BatchNorm members are averaged in function space, the head in weight space).

Shared step
-----------
The authors' code (``utils/train_test.py`` of seijin-kobayashi/late-phase-weights) zeroes the
shared gradients at the start of a cycle, lets them accumulate over its ``K`` batches and steps
once with that *sum*, at the members' learning rate: :func:`train_late_phase` does this by
default (``shared_grad="sum"``). ``shared_grad="mean"`` divides the sum by the cycle's length
instead, which keeps the shared step the size of one plain SGD step on a ``K`` times larger
batch. An incomplete last cycle still steps (the authors discard it; see
:func:`train_late_phase`).

Members in federated learning
-----------------------------
A federated server averages member ``k`` with member ``k`` across clients by name. Whether a
client trains from that average or from its own members is the client's choice
(``late-phase-members`` in :mod:`fedwa.apps.client_app`); :func:`member_state` picks out the
entries a client keeps.

Layout
------
:class:`MemberModule` holds the ``K`` members of one module in an ``nn.ModuleList`` and runs
``members[active]``. A model carries its members from the start of a run to its end, so its
state-dict keys (``'<name>.members.<k>.<param>'``) never change and a federated server can
average member ``k`` with member ``k`` across clients purely by name. Before the late phase
only member 0 trains and is then copied into the others, so all members stay identical and the
model computes exactly what the plain model would; the late phase therefore starts from ``K``
identical copies (initialisation noise 0, as in the paper's CIFAR configurations).

Collapse
--------
:func:`collapse_state` works on state dicts alone (what the server holds). A BatchNorm member
in eval mode is the affine map ``y = a_k x + b_k`` with ``a_k = gamma_k / sqrt(var_k + eps)``
and ``b_k = beta_k - a_k mu_k``; the mean of the members' outputs is ``a x + b`` with
``a = mean_k a_k`` and ``b = mean_k b_k``, which one BatchNorm layer represents exactly
(``running_mean = 0``, ``running_var = 1 - eps``, ``weight = a``, ``bias = b``). The head's
members are averaged weight by weight, which for a linear layer is again the mean of the
members' outputs on the same input.

Example
-------
>>> from torch import nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.bn = nn.BatchNorm1d(2)
...         self.classifier = nn.Linear(2, 3)
...     def forward(self, x):
...         return self.classifier(self.bn(x))
>>> net = add_late_phase(Net(), 2)
>>> num_members(net), sorted(collapse_state(net.state_dict(), 2))[:2]
(2, ['bn.bias', 'bn.num_batches_tracked'])
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedwa.core.training import LocalTrainSpec, batch_order, schedule_lr, train_local

HEAD = "classifier"
_MEMBER_KEY = re.compile(r"^(?P<prefix>.+)\.members\.(?P<k>\d+)\.(?P<leaf>.+)$")


class MemberModule(nn.Module):
    """``K`` copies of a module; ``forward`` runs ``members[self.active]``.

    Part of late-phase weights (von Oswald et al., ICLR 2021, arXiv 2007.12927). State keys are
    ``'<name>.members.<k>.<param>'``. ``active`` is a plain attribute, not state: which member
    runs is a training-time choice and must not travel with the weights.

    Parameters
    ----------
    module : nn.Module
        The module to replicate; the members are deep copies of it (the module itself is not
        kept, so nothing outside can alias a member's tensors).
    k : int
        Number of members, at least 1.
    """

    members: nn.ModuleList
    active: int

    def __init__(self, module: nn.Module, k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"need at least one member, got {k}")
        self.members = nn.ModuleList(copy.deepcopy(module) for _ in range(k))
        self.active = 0

    def forward(self, *args, **kwargs):  # noqa: D102 - documented on the class
        return self.members[self.active](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"k={len(self.members)}, active={self.active}"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    # setattr on an existing child name replaces it in place in ``_modules``, so registration
    # order -- and with it the state-dict order -- stays that of the plain model.
    setattr(parent, child, module)


def late_phase_modules(model: nn.Module) -> list[tuple[str, MemberModule]]:
    """The :class:`MemberModule` layers of ``model`` with their names, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MemberModule)]


def num_members(model: nn.Module) -> int:
    """Number of late-phase members ``K`` of ``model``; 1 when it has no late-phase layers.

    Raises
    ------
    ValueError
        If two late-phase layers disagree on ``K``.
    """
    counts = {len(m.members) for _, m in late_phase_modules(model)}
    if len(counts) > 1:
        raise ValueError(f"late-phase layers disagree on the number of members: {sorted(counts)}")
    return counts.pop() if counts else 1


def add_late_phase(model: nn.Module, k: int) -> nn.Module:
    """Give ``model`` ``k`` late-phase members, in place (von Oswald et al. 2021, section 2).

    Every ``_BatchNorm`` that tracks running statistics and ``model.classifier`` are replaced
    by a :class:`MemberModule` of ``k`` identical deep copies. Modules inside the classifier
    are not wrapped again: the classifier's members already own them.

    Parameters
    ----------
    model : nn.Module
        Changed in place. A model that already has ``k`` members is returned as is.
    k : int
        Number of members; ``k == 1`` leaves the model unchanged (plain training).

    Returns
    -------
    nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        If ``k < 1``, if the model already has a different number of members, or if the model
        itself is a BatchNorm layer (its root cannot be replaced in place).
    """
    if k < 1:
        raise ValueError(f"need at least one member, got {k}")
    if late_phase_modules(model):
        if num_members(model) != k:
            raise ValueError(f"model already has {num_members(model)} members, asked for {k}")
        return model
    if k == 1:
        return model
    if isinstance(model, _BatchNorm):
        raise ValueError("wrap a model that contains the BatchNorm layer, not the layer itself")
    targets: list[str] = []
    if isinstance(getattr(model, HEAD, None), nn.Module):
        targets.append(HEAD)
    for name, module in model.named_modules():
        inside_head = name == HEAD or name.startswith(HEAD + ".")
        if isinstance(module, _BatchNorm) and module.track_running_stats and not inside_head:
            targets.append(name)
    for name in targets:
        _replace(model, name, MemberModule(model.get_submodule(name), k))
    return model


def set_active(model: nn.Module, k: int) -> None:
    """Make member ``k`` the one every late-phase layer of ``model`` runs."""
    count = num_members(model)
    if not 0 <= k < count:
        raise ValueError(f"member {k} out of range for {count} members")
    for _, module in late_phase_modules(model):
        module.active = k


@torch.no_grad()
def sync_members(model: nn.Module, source: int = 0) -> None:
    """Copy member ``source`` (parameters and buffers) into every other member.

    Used after training before the late phase, so that all members stay the plain model.
    """
    count = num_members(model)
    if not 0 <= source < count:
        raise ValueError(f"member {source} out of range for {count} members")
    for _, module in late_phase_modules(model):
        # state_dict holds buffers (running statistics, num_batches_tracked) as well as
        # parameters; load_state_dict copies into the existing tensors, so optimisers and
        # other references to the members' parameters stay valid.
        state = module.members[source].state_dict()
        for j, member in enumerate(module.members):
            if j != source:
                member.load_state_dict(state)


def member_names(state_keys: Iterable[str]) -> dict[str, dict[str, dict[int, str]]]:
    """Group the member keys of a state dict: ``prefix -> leaf -> {k: full key}``.

    ``'bn1.members.2.running_mean'`` becomes ``{'bn1': {'running_mean': {2: <that key>}}}``.
    Keys of shared weights are left out. Prefixes and leaves keep their first-seen order.
    """
    groups: dict[str, dict[str, dict[int, str]]] = {}
    for key in state_keys:
        match = _MEMBER_KEY.match(key)
        if match is None:
            continue
        leaves = groups.setdefault(match["prefix"], {})
        leaves.setdefault(match["leaf"], {})[int(match["k"])] = key
    return groups


def member_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The member entries of a state dict (``'<name>.members.<k>.<leaf>'``), in its order.

    Every parameter and buffer of every late-phase member (running statistics and
    ``num_batches_tracked`` included); the shared weights are left out. The tensors are the
    state's own, not copies.
    """
    return {key: value for key, value in state.items() if _MEMBER_KEY.match(key) is not None}


def is_member_state(state_keys: Iterable[str]) -> bool:
    """Whether any key belongs to a late-phase member (``'<name>.members.<k>.<param>'``)."""
    return any(_MEMBER_KEY.match(key) is not None for key in state_keys)


def _collapse_bn(tensors: dict[str, list[Tensor]], eps: float) -> dict[str, Tensor]:
    """One BatchNorm leaf set whose eval output is the mean of the members' eval outputs."""
    mean = torch.stack([t.double() for t in tensors["running_mean"]])
    var = torch.stack([t.double() for t in tensors["running_var"]])
    gamma = (torch.stack([t.double() for t in tensors["weight"]]) if "weight" in tensors
             else torch.ones_like(mean))
    beta = (torch.stack([t.double() for t in tensors["bias"]]) if "bias" in tensors
            else torch.zeros_like(mean))
    # Member k in eval mode: y = a_k x + b_k; averaging outputs averages the a_k and b_k.
    scale = gamma / torch.sqrt(var + eps)
    a = scale.mean(0)
    b = (beta - scale * mean).mean(0)
    like = tensors["running_mean"][0]
    out: dict[str, Tensor] = {}
    if "weight" in tensors:
        # Normalisation becomes the identity (sqrt(1 - eps + eps) = 1), the affine part a, b.
        out["weight"] = a.to(tensors["weight"][0].dtype)
        out["bias"] = b.to(tensors["bias"][0].dtype)
        out["running_mean"] = torch.zeros_like(like)
        out["running_var"] = torch.full_like(tensors["running_var"][0], 1.0 - eps)
    else:
        # Without affine parameters the statistics carry the map: 1/sqrt(v + eps) = a and
        # -m a = b. v > 0 since a is a mean of values 1/sqrt(var_k + eps) <= 1/sqrt(eps).
        out["running_mean"] = (-b / a).to(like.dtype)
        out["running_var"] = (1.0 / (a * a) - eps).to(tensors["running_var"][0].dtype)
    if "num_batches_tracked" in tensors:
        out["num_batches_tracked"] = torch.stack(tensors["num_batches_tracked"]).max()
    return out


def _collapse_mean(tensors: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Average every leaf over the members (counters: the maximum)."""
    out: dict[str, Tensor] = {}
    for leaf, values in tensors.items():
        if values[0].is_floating_point() or values[0].is_complex():
            out[leaf] = torch.stack([v.double() for v in values]).mean(0).to(values[0].dtype)
        else:
            out[leaf] = torch.stack(list(values)).max(0).values
    return out


def collapse_state(state: Mapping[str, Tensor], k: int, *, eps: float = 1e-5) -> dict[str, Tensor]:
    """Collapse a member model's state dict into the plain model's (von Oswald et al. 2021).

    Parameters
    ----------
    state : mapping from str to Tensor
        State dict of a model prepared by :func:`add_late_phase` (e.g. the server's average).
    k : int
        Number of members every late-phase layer must have.
    eps : float, optional
        The BatchNorm layers' ``eps``; it is not part of a state dict. 1e-5 is PyTorch's
        default, used by every model of :mod:`fedwa.models`.

    Returns
    -------
    dict
        The plain model's state dict (keys as :func:`fedwa.models.build_model` makes them, in
        its order): shared entries cloned; every member group with ``running_mean`` and
        ``running_var`` collapsed as a BatchNorm layer, whose eval-mode output is the mean of
        the members' outputs; every other group (the classifier) averaged entry by entry,
        integer counters by their maximum.

    Raises
    ------
    ValueError
        If ``k > 1`` and the state has no member keys, or a group does not have exactly the
        members ``0 .. k-1`` with the same entries each.
    """
    groups = member_names(state)
    if not groups:
        if k != 1:
            raise ValueError(f"state has no late-phase members, expected {k}")
        return {name: value.clone() for name, value in state.items()}
    collapsed: dict[str, dict[str, Tensor]] = {}
    for prefix, leaves in groups.items():
        for leaf, by_member in leaves.items():
            if sorted(by_member) != list(range(k)):
                raise ValueError(f"{prefix}.{leaf}: members {sorted(by_member)}, expected 0..{k - 1}")
        tensors = {leaf: [state[by_member[j]] for j in range(k)] for leaf, by_member in leaves.items()}
        is_bn = "running_mean" in tensors and "running_var" in tensors
        collapsed[prefix] = _collapse_bn(tensors, eps) if is_bn else _collapse_mean(tensors)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _MEMBER_KEY.match(key)
        if match is None:
            out[key] = value.clone()
        elif match["prefix"] in collapsed:
            # The first key of a group stands where the plain layer's keys stood; emit them all
            # there, in the member's leaf order, so the result follows the plain model's order.
            for leaf, value_c in collapsed.pop(match["prefix"]).items():
                out[f"{match['prefix']}.{leaf}"] = value_c
    return out


@torch.no_grad()
def ensemble_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Log of the mean of the members' softmax outputs (von Oswald et al. 2021, ensembling).

    Returning log-probabilities keeps ``argmax`` and ``cross_entropy`` meaningful on the
    result: ``cross_entropy`` re-normalises by a log-sum-exp that is already 0.

    Parameters
    ----------
    model : nn.Module
        A model with late-phase members (or a plain model: its log-softmax).
    x : Tensor
        Inputs; moved in chunks to the model's device.
    batch_size : int, optional
        Chunk size of the forward passes.

    Returns
    -------
    Tensor
        ``[len(x), num_classes]`` on ``x``'s device, float32. The model runs in eval mode;
        its training flags and active members are restored afterwards.
    """
    modules = late_phase_modules(model)
    count = num_members(model)
    flags = [(m, m.training) for m in model.modules()]
    actives = [(m, m.active) for _, m in modules]
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    model.eval()
    chunks = []
    try:
        for start in range(0, max(len(x), 1), batch_size):
            xb = x[start:start + batch_size].to(device)
            log_probs = []
            for j in range(count):
                if modules:
                    set_active(model, j)
                log_probs.append(torch.log_softmax(model(xb).float(), dim=1))
            # log(mean_k p_k) = logsumexp_k(log p_k) - log K, without underflowing small p_k.
            chunks.append(torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(count))
    finally:
        for module, flag in flags:
            module.training = flag
        for module, active in actives:
            module.active = active
    return torch.cat(chunks).to(x.device)


SHARED_GRADS = ("sum", "mean")


def train_late_phase(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: LocalTrainSpec,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    late: bool,
    shared_grad: str = "sum",
) -> dict[str, float]:
    """Train a late-phase model in place for one round (von Oswald et al. 2021, algorithm 1).

    Before the late phase (``late=False``) member 0 trains exactly as
    :func:`fedwa.core.training.train_local` trains the plain model (same batches, optimiser and lr
    schedule; the other members get no gradient, and SGD skips parameters without one), and
    is then copied into all members, so they stay identical.

    In the late phase (``late=True``) batch ``i`` runs member ``i mod K``, which takes its own
    SGD step on that batch (its gradient is cleared before every batch). The shared weights'
    gradients are cleared at the start of each cycle of ``K`` batches, accumulate over the
    cycle while the shared weights stay fixed, and the shared weights take one step at the
    end of the cycle, with the learning rate scheduled at the cycle's first batch (the one the
    members use there; with a constant schedule the members' rate):

    - ``shared_grad="sum"`` (default): the step uses the *sum* of the ``K`` gradients, as the
      authors' code does (``utils/train_test.py`` of seijin-kobayashi/late-phase-weights: a
      plain ``backward`` per batch, no division by ``K``). The shared weights thus move like
      plain SGD on a ``K`` times larger batch at ``K`` times the learning rate.
    - ``shared_grad="mean"``: the step uses their *mean*, the gradient of the mean loss over
      the cycle, comparable to one plain SGD step on a ``K`` times larger batch.

    Momentum and weight decay are those of :class:`torch.optim.SGD`, applied once per shared
    step (weight decay is not multiplied by ``K`` in ``"sum"`` mode); a FedProx term is part
    of every batch's loss, so it accumulates like the data gradients.

    A last, incomplete cycle of ``n < K`` batches still steps, with the sum (or the mean) of
    its ``n`` gradients. This departs from the authors' code on purpose: there an incomplete
    cycle at the end of an epoch is discarded (its gradient is cleared at the next epoch's
    start), which loses at most ``K - 1`` of an epoch's ~391 CIFAR batches; a federated round
    may hold few batches, fewer than ``K`` even, and discarding would drop a large share of
    the round's data from the shared weights, or never move them at all.

    Parameters
    ----------
    model : nn.Module
        Prepared by :func:`add_late_phase`; trained in place and moved to ``device``.
    x, y : Tensor
        The client's examples and labels.
    spec : LocalTrainSpec
        Epochs or steps, batch size, optimiser settings (momentum and weight decay apply to
        both optimisers), lr schedule and FedProx ``proximal_mu``.
    seed : int
        Seeds the batch order, as in :func:`fedwa.core.training.train_local`.
    device : torch.device or str
        Where to train.
    late : bool
        Whether the late phase has started.
    shared_grad : {"sum", "mean"}, optional
        How the shared weights combine a cycle's gradients (see above); ignored before the
        late phase.

    Returns
    -------
    dict
        ``loss`` (mean cross-entropy over the batches), ``steps`` (batches = member steps),
        ``shared_steps`` (steps of the shared weights), ``examples``, ``seconds``.

    Raises
    ------
    ValueError
        If ``shared_grad`` is neither ``"sum"`` nor ``"mean"``.
    """
    if shared_grad not in SHARED_GRADS:
        raise ValueError(f"shared_grad must be one of {SHARED_GRADS}, got {shared_grad!r}")
    modules = late_phase_modules(model)
    count = num_members(model)
    previous = modules[0][1].active if modules else 0
    if not late:
        if modules:
            set_active(model, 0)
        result = train_local(model, x, y, spec, seed=seed, device=device)
        if modules:
            sync_members(model, 0)
            set_active(model, previous)
        result["shared_steps"] = result["steps"]
        return result

    started = time.perf_counter()
    device = torch.device(device)
    model.to(device).train()
    per_member: list[list[nn.Parameter]] = [[] for _ in range(count)]
    for _, module in modules:
        for j, member in enumerate(module.members):
            per_member[j].extend(member.parameters())
    member_ids = {id(p) for params in per_member for p in params}
    shared = [p for p in model.parameters() if id(p) not in member_ids]
    members = [p for params in per_member for p in params]

    def sgd(params: list[nn.Parameter]) -> torch.optim.SGD | None:
        # torch refuses an empty parameter list; a model may have nothing shared (or no member).
        if not params:
            return None
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                               weight_decay=spec.weight_decay)

    shared_opt, member_opt = sgd(shared), sgd(members)
    anchor = None
    if spec.proximal_mu > 0:
        # FedProx (Li et al. 2020) around the received weights, for the weights in play.
        anchor = {id(p): p.detach().clone() for p in model.parameters()}
    generator = torch.Generator().manual_seed(seed)
    batches = batch_order(len(x), spec.batch_size, spec, generator)
    x_dev, y_dev = x.to(device), y.to(device)
    total_loss = torch.zeros((), device=device)
    seen = 0
    shared_steps = 0
    per_step = spec.lr_schedule != "constant"
    span = spec.progress_end - spec.progress_start

    def set_lr(optimiser: torch.optim.SGD | None, lr: float) -> None:
        if optimiser is not None:
            for group in optimiser.param_groups:
                group["lr"] = lr

    if shared_opt is not None:
        shared_opt.zero_grad(set_to_none=True)
    cycle_lr = spec.lr
    for step, idx in enumerate(batches):
        lr = spec.lr
        if per_step:
            lr = schedule_lr(spec.lr, spec.lr_schedule,
                             spec.progress_start + span * step / len(batches))
        position = step % count
        if position == 0:
            cycle_lr = lr
        if modules:
            set_active(model, position)
        idx = idx.to(device)
        loss = nn.functional.cross_entropy(model(x_dev[idx]), y_dev[idx])
        total_loss += loss.detach()
        if anchor is not None:
            in_play = shared + per_member[position]
            loss = loss + 0.5 * spec.proximal_mu * sum(
                (p - anchor[id(p)]).pow(2).sum() for p in in_play)
        # Only the active member's gradients are cleared and refilled; the shared gradients
        # keep accumulating until the cycle ends.
        if member_opt is not None:
            member_opt.zero_grad(set_to_none=True)
        loss.backward()
        if member_opt is not None:
            set_lr(member_opt, lr)
            member_opt.step()
        seen += len(idx)
        cycle_end = position == count - 1 or step == len(batches) - 1
        if cycle_end and shared_opt is not None:
            n = position + 1
            # "sum" steps with the accumulated gradient as it is, as the authors' code does.
            if shared_grad == "mean" and n > 1:
                with torch.no_grad():
                    for p in shared:
                        if p.grad is not None:
                            p.grad.div_(n)
            set_lr(shared_opt, cycle_lr)
            shared_opt.step()
            shared_opt.zero_grad(set_to_none=True)
        if cycle_end:
            shared_steps += 1
    if member_opt is not None:
        member_opt.zero_grad(set_to_none=True)
    if modules:
        set_active(model, previous)
    steps = len(batches)
    return {
        "loss": float(total_loss) / max(steps, 1),
        "steps": float(steps),
        "shared_steps": float(shared_steps),
        "examples": float(seen),
        "seconds": time.perf_counter() - started,
    }
