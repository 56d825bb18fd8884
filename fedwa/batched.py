"""Batched local training: many clients of one architecture trained in one computation.

:func:`fedwa.training.train_local` trains one model at a time; for small models and inputs
much of its time is per-operation overhead (Python, dispatch, tiny kernels) rather than
arithmetic. :func:`train_batched` stacks the weights of ``K`` models along a new leading
dimension and runs the model's own ``forward`` on all of them at once with
``torch.func.vmap`` over ``torch.func.functional_call``: linear layers become batched matrix
products and convolutions grouped convolutions (vmap's own batching rules), so one kernel
call does the work of ``K``. BatchNorm layers use a rule of this module that folds the
clients into the channel dimension (one native batch norm, affine part and running-statistics
update included). Gradients come from ordinary autograd on the sum of the clients' losses
(client ``k``'s loss depends only on client ``k``'s slice of the stacked weights, so the
gradient of the sum is every client's own gradient), and ``torch.optim.SGD`` itself (its
fused kernel where available) steps the stacked tensors: its update is elementwise, hence
every client's own update.

Where it pays (``simulations/bench_batched.py``: 5 steps of batch 32, K = 10 to 1000 clients,
one CPU thread on a shared 2-core machine): with the 8x8 inputs of the ``digits`` dataset the
batched loop ran 2.0-3.4x as many client updates per second as the sequential one for the mlp
and 1.5-2.4x for the cnn. With 28x28 inputs the kernels' own work (max-pooling, BatchNorm and
convolutions over the activations) dominates, which batching does not reduce: mlp 1.3-1.5x,
cnn 0.94-1.05x (no gain).

What is the same as ``train_local``, per model:

- the batch order (:func:`fedwa.training.batch_order` with a generator seeded by the client's
  seed), including the dropped trailing one-example batch;
- the loss (mean cross-entropy of the batch), the per-step lr of ``spec.lr_schedule`` over
  ``[progress_start, progress_end)``, SGD (momentum buffer started with the first gradient,
  L2 weight decay added to the gradient, no dampening, no Nesterov);
- FedProx's ``mu/2 ||w - w_start||^2`` term (``spec.proximal_mu``);
- BatchNorm in train mode: batch statistics over the client's own batch, running statistics
  and ``num_batches_tracked`` updated in place in the stacked buffers exactly as the module
  does it, since the module's own ``forward`` runs under vmap;
- the returned stats ``loss``, ``steps``, ``examples``, ``seconds``.

Results agree with sequential training to float tolerance, not bitwise: batched kernels sum in
a different order. In float64 the two agree to ~1e-15 (tests/test_batched.py). In float32 a
last-bit difference occasionally flips a discrete choice (a ReLU input within ~1e-8 of zero, a
near-tie in max-pooling) and then that client's weights differ by ~1e-4 after a few steps, as
they would between two machines.

Clients may hold different amounts of data. Clients with different numbers of steps (epoch
mode with different dataset sizes) are trained in separate batched groups. At a step where
clients' batches differ in size (a last partial batch of an epoch), the clients are split by
batch size and each sub-group runs its own vmapped forward; the backward pass and the SGD
update stay one computation. Splitting, not padding with a mask: padded examples would enter
BatchNorm's batch statistics.

Not supported (use ``train_local``): ``train_local``'s ``regulariser`` callable (an arbitrary
function of one ``nn.Module`` cannot see the stacked weights), models that draw random numbers
in ``forward`` (dropout, shadow-weight transforms; vmap refuses them), and any
:class:`~fedwa.training.LocalTrainSpec` option this module does not know
(:func:`can_batch` says whether a spec is supported).

Example
-------
>>> import torch
>>> from fedwa.models import build_model
>>> from fedwa.training import LocalTrainSpec
>>> models = [build_model("mlp", (1, 4, 4), 3, seed=k) for k in range(2)]
>>> data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
>>> stats = train_batched(models, data, LocalTrainSpec(steps=2, batch_size=4), [0, 1])
>>> [s["steps"] for s in stats]
[2.0, 2.0]
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import types
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedwa.training import LocalTrainSpec, batch_order, schedule_lr

# Spec fields this module implements. A field added to LocalTrainSpec later is unknown here: a
# spec that sets it to anything but its default is refused rather than silently ignored.
_SUPPORTED_FIELDS = frozenset({
    "epochs", "steps", "batch_size", "lr", "momentum", "weight_decay", "proximal_mu",
    "lr_schedule", "progress_start", "progress_end",
})

# Clients per vmapped computation when the caller does not say: as many as keep one step's
# input batch of the chunk near 2**19 elements, within [8, 64]. Past that the activations of a
# chunk fall out of the CPU caches and every elementwise pass slows down (measured on this
# repository's cnn: 28x28 inputs, batch 32 ran best with ~16 clients per chunk; 8x8 inputs
# with 64), while the per-call overhead is already amortised at a few dozen clients.
_CHUNK_ELEMENTS = 2**19
_CHUNK_RANGE = (8, 64)


def auto_max_clients(batch_size: int, example_shape: Sequence[int]) -> int:
    """The default chunk size of :func:`train_batched` for this batch and input shape.

    Parameters
    ----------
    batch_size : int
        Examples per step.
    example_shape : sequence of int
        Shape of one example, e.g. ``(1, 28, 28)``.

    Returns
    -------
    int
        Clients per vmapped computation.
    """
    per_client = max(1, batch_size) * max(1, math.prod(example_shape))
    low, high = _CHUNK_RANGE
    return max(low, min(high, _CHUNK_ELEMENTS // per_client))


def _unsupported(spec: LocalTrainSpec) -> str | None:
    """The reason ``spec`` cannot be batched, or ``None`` when it can."""
    for field in dataclasses.fields(spec):
        if field.name in _SUPPORTED_FIELDS:
            continue
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        if getattr(spec, field.name) != default:
            return (f"LocalTrainSpec option {field.name!r} = {getattr(spec, field.name)!r} is "
                    "not supported by batched training; use fedwa.training.train_local")
    try:
        schedule_lr(spec.lr, spec.lr_schedule, spec.progress_start)
    except ValueError as error:
        return f"LocalTrainSpec option 'lr_schedule': {error}"
    return None


def can_batch(spec: LocalTrainSpec) -> bool:
    """Whether :func:`train_batched` supports every option of ``spec``.

    Parameters
    ----------
    spec : LocalTrainSpec
        The clients' training settings.

    Returns
    -------
    bool
        ``True`` when every option is one batched training implements (all of today's
        options, FedProx's ``proximal_mu`` included) and the lr schedule is known. A
        ``regulariser`` callable, which ``train_local`` takes beside the spec, is never
        batchable.
    """
    return _unsupported(spec) is None


def _check_same_architecture(models: Sequence[nn.Module]) -> None:
    """Raise ``ValueError`` unless every model has the first one's class, names and shapes."""

    def signature(model: nn.Module) -> tuple:
        entries = list(model.named_parameters()) + list(model.named_buffers())
        return type(model), [(n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in entries]

    first = signature(models[0])
    for k, model in enumerate(models[1:], start=1):
        if signature(model) != first:
            raise ValueError(f"model {k} differs from model 0 in class, parameter or buffer "
                             "names, shapes, dtypes or requires_grad; batched training needs "
                             "one architecture")


def _plan_steps(orders: Sequence[list[Tensor]]) -> list[list[tuple[list[int], int]]]:
    """For every step, the clients grouped by batch size: ``(members, batch_size)`` pairs.

    Usually one group holds every client; a last partial batch of an epoch opens another.
    """
    plan = []
    for step in range(len(orders[0])):
        by_size: dict[int, list[int]] = {}
        for k, order in enumerate(orders):
            by_size.setdefault(len(order[step]), []).append(k)
        plan.append([(members, size) for size, members in by_size.items()])
    return plan


def _gather(tensors: Sequence[Tensor], orders: Sequence[list[Tensor]], members: list[int],
            step: int, size: int) -> Tensor:
    """``tensors[k][orders[k][step]]`` of every member, stacked: ``(members, size, ...)``.

    Gathered straight into the stacked batch, client by client: concatenating all clients'
    data first would copy every example once more than sequential training does.
    """
    first = tensors[members[0]]
    out = torch.empty((len(members), size, *first.shape[1:]), dtype=first.dtype,
                      device=first.device)
    for i, k in enumerate(members):
        torch.index_select(tensors[k], 0, orders[k][step], out=out[i])
    return out


class _StackedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm whose vmap rule is one native call over all clients.

    vmap's own rule for ``batch_norm`` with per-client weights normalises without the affine
    part and then applies weight and bias with separate multiply and add passes (and their
    backward passes). Here client ``k``'s channel ``c`` becomes channel ``k * C + c`` of one
    batch norm over ``(batch, K * C, ...)``: per channel it is the same computation, with the
    affine part, the running-statistics update (through views of the stacked buffers) and the
    backward in the native kernels. Only ever called under vmap with the buffers, weight and
    bias stacked along dimension 0 (see ``_batched_template``).
    """

    @staticmethod
    def forward(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor,
                bias: Tensor, momentum: float, eps: float) -> Tensor:
        return nn.functional.batch_norm(x, running_mean, running_var, weight, bias, True,
                                        momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch's signature
        pass

    @staticmethod
    def vmap(info, in_dims, x: Tensor, running_mean: Tensor, running_var: Tensor,  # noqa: ANN001
             weight: Tensor, bias: Tensor, momentum: float, eps: float) -> tuple[Tensor, int]:
        if any(d != 0 for d in in_dims[1:5]):
            raise RuntimeError("stacked batch norm needs buffers, weight and bias stacked "
                               "along dimension 0")
        clients = info.batch_size
        # (batch, clients, channels, ...): the layout vmap's convolution rule hands over, in
        # which folding clients into channels is a view, not a copy.
        if in_dims[0] is None:
            x = x.unsqueeze(1).expand(x.shape[0], clients, *x.shape[1:])
        else:
            x = x.movedim(in_dims[0], 1)
        batch, channels, rest = x.shape[0], x.shape[2], x.shape[3:]
        folded = x.reshape(batch, clients * channels, *rest)
        # view(-1) of the stacked (contiguous) buffers: the in-place update lands in them.
        out = nn.functional.batch_norm(
            folded, running_mean.view(-1), running_var.view(-1), weight.reshape(-1),
            bias.reshape(-1), True, momentum, eps)
        return out.view(batch, clients, channels, *rest), 1


def _stacked_batch_norm_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``_BatchNorm.forward`` in training mode with a fixed momentum, via the stacked rule."""
    self.num_batches_tracked.add_(1)
    return _StackedBatchNorm.apply(x, self.running_mean, self.running_var, self.weight,
                                   self.bias, self.momentum, self.eps)


def _batched_template(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to run under vmap, its plain BatchNorm layers on the fused rule.

    Only the standard layers in their common configuration (affine, tracking running
    statistics, a fixed momentum) are switched; any other keeps vmap's generic rule, which is
    slower but equally exact. The copy's own weights are never used (functional_call).
    """
    template = copy.deepcopy(model)
    for module in template.modules():
        if (type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and module.affine
                and module.track_running_stats and module.momentum is not None):
            module.forward = types.MethodType(_stacked_batch_norm_forward, module)
    return template


def _train_chunk(models: Sequence[nn.Module], datasets: Sequence[tuple[Tensor, Tensor]],
                 orders: Sequence[list[Tensor]], spec: LocalTrainSpec,
                 device: torch.device) -> list[dict[str, float]]:
    """Train models that all make ``len(orders[0])`` steps, as one batched computation."""
    started = time.perf_counter()
    count = len(models)
    steps = len(orders[0])
    for model in models:
        model.to(device).train()
    template = _batched_template(models[0])
    param_names = [n for n, _ in template.named_parameters()]
    buffer_names = [n for n, _ in template.named_buffers()]
    own_params = [dict(m.named_parameters()) for m in models]
    own_buffers = [dict(m.named_buffers()) for m in models]
    with torch.no_grad():
        params = {n: torch.stack([own[n] for own in own_params]) for n in param_names}
        buffers = {n: torch.stack([own[n] for own in own_buffers]) for n in buffer_names}
    # Frozen parameters stay frozen: train_local's SGD never gets a gradient for them (and so
    # never decays them either).
    trainable = [n for n in param_names if own_params[0][n].requires_grad]
    for n in trainable:
        params[n].requires_grad_(True)
    anchor = None
    if spec.proximal_mu > 0:
        anchor = {n: p.detach().clone() for n, p in params.items()}

    examples = [sum(len(idx) for idx in order) for order in orders]
    total_loss = torch.zeros(count, device=device)
    xs = [x.to(device) for x, _ in datasets]
    ys = [y.to(device) for _, y in datasets]
    orders = [[idx.to(device) for idx in order] for order in orders]
    plan = _plan_steps(orders) if steps > 0 else []

    def client_loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        # The module's own forward on one client's slice: BatchNorm updates that client's
        # running statistics in place, inside the stacked buffer.
        return nn.functional.cross_entropy(functional_call(template, (p, b), (x,)), y)

    batched_loss = vmap(client_loss)
    param_list = [params[n] for n in trainable]
    optimiser = _stacked_sgd(param_list, spec)
    per_step = spec.lr_schedule != "constant"
    span = spec.progress_end - spec.progress_start
    for step in range(steps):
        if per_step:
            lr = schedule_lr(spec.lr, spec.lr_schedule,
                             spec.progress_start + span * step / steps)
            for group in optimiser.param_groups:
                group["lr"] = lr
        objective = torch.zeros((), device=device)
        for members, size in plan[step]:
            xb = _gather(xs, orders, members, step, size)
            yb = _gather(ys, orders, members, step, size)
            positions = None if len(members) == count else torch.tensor(members, device=device)
            if positions is None:
                losses = batched_loss(params, buffers, xb, yb)
                total_loss += losses.detach()
            else:
                # Clients whose batch has another size this step: their slice of the weights
                # (autograd routes the gradient back into the stacked tensors) and of the
                # buffers (copied back after BatchNorm updated them).
                sub_params = {n: p.index_select(0, positions) for n, p in params.items()}
                sub_buffers = {n: b.index_select(0, positions) for n, b in buffers.items()}
                losses = batched_loss(sub_params, sub_buffers, xb, yb)
                with torch.no_grad():
                    for n, b in buffers.items():
                        b.index_copy_(0, positions, sub_buffers[n])
                    total_loss.index_add_(0, positions, losses.detach().to(total_loss.dtype))
            objective = objective + losses.sum()
        if anchor is not None:
            # Summed over clients, each client's term depends only on its own weights.
            objective = objective + 0.5 * spec.proximal_mu * sum(
                (params[n] - anchor[n]).pow(2).sum() for n in param_names)
        # autograd.grad rather than backward(): backward would copy every gradient that vmap
        # hands back transposed into the parameter's layout (a full pass over K models).
        grads = torch.autograd.grad(objective, param_list, allow_unused=True)
        for p, g in zip(param_list, grads):
            # None for an unused parameter: SGD skips it, as it would per model. The fused
            # kernel walks memory linearly and silently mixes up elements of a gradient laid
            # out differently from its parameter (torch 2.14, CPU): hand it contiguous ones.
            p.grad = g if g is None or g.is_contiguous() else g.contiguous()
        optimiser.step()

    with torch.no_grad():
        for k in range(count):
            for n, p in own_params[k].items():
                p.copy_(params[n][k])
            for n, b in own_buffers[k].items():
                b.copy_(buffers[n][k])
    # One wall time for the chunk; each client is charged an equal share of it.
    share = (time.perf_counter() - started) / count
    losses_out = total_loss.cpu()
    return [{
        "loss": float(losses_out[k]) / max(steps, 1),
        "steps": float(steps),
        "examples": float(examples[k]),
        "seconds": share,
    } for k in range(count)]


def _stacked_sgd(params: list[Tensor], spec: LocalTrainSpec) -> torch.optim.SGD:
    """``train_local``'s optimiser, over the stacked weights.

    SGD's update is elementwise, so on stacked tensors it is every client's own update. The
    fused kernel reads and writes weights, gradient and momentum once per step; the default
    per-tensor path makes about four passes, which over ``K`` models no longer fit in cache.
    """
    settings = {"lr": spec.lr, "momentum": spec.momentum, "weight_decay": spec.weight_decay}
    try:
        return torch.optim.SGD(params, fused=True, **settings)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.SGD(params, **settings)


def train_batched(
    models: Sequence[nn.Module],
    datasets: Sequence[tuple[Tensor, Tensor]],
    spec: LocalTrainSpec,
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
    *,
    max_clients: int | None = None,
) -> list[dict[str, float]]:
    """Train each ``models[k]`` in place on ``datasets[k]``, all of them batched together.

    Per model, the result is that of ``train_local(models[k], *datasets[k], spec,
    seed=seeds[k], device=device)`` (to float tolerance); see the module docstring for what
    is mirrored and what is not supported.

    Parameters
    ----------
    models : sequence of nn.Module
        One architecture (same class, parameter and buffer names, shapes and dtypes). Trained
        in place and moved to ``device``; their ``.grad`` is left untouched (``train_local``
        leaves the last step's gradients there).
    datasets : sequence of (x, y) tensor pairs
        Each client's examples and labels; sizes may differ.
    spec : LocalTrainSpec
        Shared by all clients; must satisfy :func:`can_batch`.
    seeds : sequence of int
        Each client's batch-order seed, as ``train_local``'s ``seed``.
    device : torch.device or str
        Where to train.
    max_clients : int, optional
        At most this many clients run in one vmapped computation (bounds the activations'
        memory and keeps them in cache); more are trained chunk after chunk. Default:
        :func:`auto_max_clients` of the batch size and the first client's example shape.

    Returns
    -------
    list of dict
        Per model, as ``train_local``: ``loss`` (mean training loss over the steps), ``steps``,
        ``examples`` (examples seen), ``seconds`` (the wall time of the model's batched chunk
        divided by the number of models in it).

    Raises
    ------
    ValueError
        If the lengths of ``models``, ``datasets`` and ``seeds`` differ, the models differ in
        architecture, or ``spec`` sets an option batched training does not support (the
        message names it).
    """
    if not len(models) == len(datasets) == len(seeds):
        raise ValueError(f"{len(models)} models, {len(datasets)} datasets and {len(seeds)} "
                         "seeds: one of each per client")
    if max_clients is not None and max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}")
    reason = _unsupported(spec)
    if reason is not None:
        raise ValueError(reason)
    if not models:
        return []
    _check_same_architecture(models)
    if max_clients is None:
        max_clients = auto_max_clients(spec.batch_size, datasets[0][0].shape[1:])
    device = torch.device(device)
    orders = [batch_order(len(x), spec.batch_size, spec, torch.Generator().manual_seed(seed))
              for (x, _), seed in zip(datasets, seeds)]
    # The lr schedule spans each client's own number of steps, so clients with different step
    # counts cannot share a step loop: one batched group per step count.
    by_steps: dict[int, list[int]] = {}
    for k, order in enumerate(orders):
        by_steps.setdefault(len(order), []).append(k)
    results: list[dict[str, float] | None] = [None] * len(models)
    for members in by_steps.values():
        for start in range(0, len(members), max_clients):
            chunk = members[start:start + max_clients]
            stats = _train_chunk([models[k] for k in chunk], [datasets[k] for k in chunk],
                                 [orders[k] for k in chunk], spec, device)
            for k, s in zip(chunk, stats):
                results[k] = s
    return results  # type: ignore[return-value]
