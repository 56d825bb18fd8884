"""Batched local training: many clients of one architecture trained in one computation.

:func:`fedwa.core.training.train_local` trains one model at a time; for small models and inputs
much of its time is per-operation overhead (Python, dispatch, tiny kernels) rather than
arithmetic. :func:`train_batched` stacks the weights of ``K`` models along a new leading
dimension and runs the model's own ``forward`` on all of them at once with
``torch.func.vmap`` over ``torch.func.functional_call``: convolutions become grouped
convolutions (vmap's own rule), so one kernel call does the work of ``K``. Linear and
BatchNorm layers use rules of this module: linear layers one ``bmm(W, x^T)``, which hands back
the weight gradients contiguous (vmap's own rule returns them transposed, and SGD's fused
kernel would need them copied); BatchNorm folds the clients into the channel dimension (one
native batch norm, affine part and running-statistics update included). Gradients come from
ordinary autograd on the sum of the clients' losses (client ``k``'s loss depends only on
client ``k``'s slice of the stacked weights, so the gradient of the sum is every client's own
gradient), and ``torch.optim.SGD``'s own functional step (its fused kernel where available)
updates the stacked tensors: its update is elementwise, hence every client's own update.

Where it pays (``simulations/bench_batched.py``, one CPU thread on a heavily shared 2-core
machine, ratios of interleaved repeats, which moved by about +-25% between runs): with the 8x8
inputs of the ``digits`` dataset and 5 equal steps of batch 32 at K = 100, the batched loop
ran 3.0x as many client updates per second as the sequential one for both the mlp and the cnn.
Over Dirichlet(0.5) client sizes (``--partition dirichlet``, 1 epoch, ~18 examples per client,
so 1-2 steps each), 1.8-2.9x for the mlp at K = 100 and 2.8-4.5x at K = 1000. With 28x28
inputs the kernels' own work dominates, which batching does not reduce: mlp 1.05-2.1x; the cnn
gained nothing there before this module's unequal-step support (0.94-1.05x) and was not
measured again.

What is the same as ``train_local``, per model:

- the batch order (:func:`fedwa.core.training.batch_order` with a generator seeded by the client's
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

Clients may hold different amounts of data, hence make different numbers of steps (epoch
mode over a Dirichlet partition) and end epochs on partial batches; they still train in one
computation:

- *Finished clients are left out, not masked.* The clients of a chunk are sorted by step
  count, longest first, so at step ``s`` the clients that still have a step ``s`` are a
  prefix of the stack, and only their slices (views) take part: in the forward, in the
  gradient and in SGD's update. Masking the update of a whole stacked tensor (a zero gradient,
  or lr 0) would not do: weight decay and momentum move a weight whose gradient is zero, so a
  finished client's weights and momentum buffer would have to be saved and restored at every
  step (two more passes over every model). A finished client's weights, BatchNorm statistics
  and ``num_batches_tracked`` are not read or written again until they are copied back.
- *One lr per client.* A per-step schedule spans each client's own step count, so clients
  with different counts have different lrs at one step; SGD runs once per distinct lr, on the
  (contiguous, by the sort) runs of clients that share it. Momentum buffers start at zero:
  ``momentum * 0 + grad`` is exactly ``grad``, SGD's first step.
- *Partial batches: padded where exact, else split.* Each step's clients are cut into
  contiguous ranges, each one vmapped forward. For models that treat every example on its own
  (linear layers, convolutions, activations, pooling: the mlp, see ``_pads_exactly``) shorter
  batches are padded with zero rows that weigh 0 in the loss (exact: a padded row gets no
  gradient and changes no other row), and a range is cut only where sizes differ more than
  twofold. For models with BatchNorm, padded examples would enter the batch statistics, so a
  range holds clients of one batch size.

Not supported (use ``train_local``): ``train_local``'s ``regulariser`` callable (an arbitrary
function of one ``nn.Module`` cannot see the stacked weights), models that draw random numbers
in ``forward`` (dropout, shadow-weight transforms; vmap refuses them), and any
:class:`~fedwa.core.training.LocalTrainSpec` option this module does not know
(:func:`can_batch` says whether a spec is supported).

Example
-------
>>> import torch
>>> from fedwa.models import build_model
>>> from fedwa.core.training import LocalTrainSpec
>>> models = [build_model("mlp", (1, 4, 4), 3, seed=k) for k in range(2)]
>>> data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
>>> stats = train_batched(models, data, LocalTrainSpec(steps=2, batch_size=4), [0, 1])
>>> [s["steps"] for s in stats]
[2.0, 2.0]
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
import types
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.optim.sgd import sgd as sgd_step  # torch.optim.SGD's own functional step

import fedwa.models as fedwa_models
from fedwa.core.training import LocalTrainSpec, batch_order, schedule_lr

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
                    "not supported by batched training; use fedwa.core.training.train_local")
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


_Entries = tuple[dict[str, Tensor], dict[str, Tensor]]  # a model's named parameters, buffers


def _entries(model: nn.Module) -> _Entries:
    """``model``'s named parameters and buffers, as ``named_parameters`` and ``named_buffers``
    give them (shared tensors once, under their first name), in one module walk; and the
    model put in training mode, as ``train_local`` leaves it.

    One walk, not the three of ``named_parameters``, ``named_buffers`` and ``train()``: for a
    small client those walks cost more than its share of a batched step.
    """
    params: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    seen: set[int] = set()
    training = True
    for prefix, module in model.named_modules():
        training = training and module.training
        dot = prefix + "." if prefix else ""
        for members, out in ((module._parameters, params), (module._buffers, buffers)):
            for name, tensor in members.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    out[dot + name] = tensor
    if not training:
        model.train()
    return params, buffers


def _check_same_architecture(models: Sequence[nn.Module], entries: Sequence[_Entries]) -> None:
    """Raise ``ValueError`` unless every model has the first one's class, names and shapes."""

    def signature(model: nn.Module, own: _Entries) -> tuple:
        named = list(own[0].items()) + list(own[1].items())
        return type(model), [(n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in named]

    first = signature(models[0], entries[0])
    for k, (model, own) in enumerate(zip(models[1:], entries[1:]), start=1):
        if signature(model, own) != first:
            raise ValueError(f"model {k} differs from model 0 in class, parameter or buffer "
                             "names, shapes, dtypes or requires_grad; batched training needs "
                             "one architecture")


@dataclasses.dataclass(frozen=True)
class _Range:
    """Clients ``first`` to ``end - 1`` of a chunk, one vmapped forward at one step.

    Their batches have ``size`` examples, or, where ``padded``, at most ``size``: the shorter
    ones are padded to it (only for models where that is exact, :func:`_pads_exactly`).
    """

    first: int
    end: int
    size: int
    padded: bool


# Padding a batch of n examples to the size of a longer one computes the padded rows too; a
# range of clients is cut where its largest batch would exceed this many times its smallest:
# each range costs a vmapped forward and backward (~1 ms on these CPUs), more than the work
# padded up to twice the examples adds for the mlp at batch 32.
_PAD_RATIO = 2.0


def _client_order(order: list[Tensor]) -> tuple[int, int]:
    """Sort key of a client in a chunk: most steps first, then the longest last batch."""
    return (-len(order), -len(order[-1]) if order else 0)


def _plan_steps(orders: Sequence[list[Tensor]], pad: bool) -> list[tuple[int, list[_Range]]]:
    """Every step's ``(active, ranges)`` for ``orders`` sorted by :func:`_client_order`.

    At step ``s`` the clients that still have a step ``s`` are a prefix of the chunk (the
    sort), ``active`` of them, cut into contiguous ranges: runs of one batch size, or, with
    ``pad``, runs whose largest batch is at most :data:`_PAD_RATIO` times their smallest. In
    epoch mode every batch but an epoch's last is full, and the clients at their last batch
    come after those with more steps, longest last batch first: few ranges.
    """
    plan = []
    for step in range(len(orders[0]) if orders else 0):
        active = sum(1 for order in orders if len(order) > step)
        ranges: list[_Range] = []
        low = 0
        for k in range(active):
            n = len(orders[k][step])
            if ranges:
                last = ranges[-1]
                if n == last.size and not last.padded or (
                        pad and max(last.size, n) <= _PAD_RATIO * min(low, n)):
                    low = min(low, n)
                    ranges[-1] = _Range(last.first, k + 1, max(last.size, n),
                                        last.padded or n != last.size)
                    continue
            ranges.append(_Range(k, k + 1, n, False))
            low = n
        plan.append((active, ranges))
    return plan


# Modules whose forward in training mode treats every example of a batch on its own (no
# statistics over the batch), compared by exact type: a subclass may override forward. A model
# built only of these (and of fedwa's own containers, whose forward only chains them) gives a
# padded example's row no influence on the other rows, and a zero weight in the loss then gives
# it none on the gradient.
_PER_EXAMPLE_MODULES = frozenset({
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Flatten, nn.Unflatten,
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh,
    nn.Sigmoid, nn.Softplus, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.LayerNorm, nn.GroupNorm, nn.Sequential,
    fedwa_models.MLP, fedwa_models.SmallCNN, fedwa_models.BasicBlock, fedwa_models.ResNet,
})


def _pads_exactly(model: nn.Module) -> bool:
    """Whether a client's short batch may be padded to a longer one without changing its step.

    True for models built only of :data:`_PER_EXAMPLE_MODULES` (the mlp; not the cnn or the
    ResNets, whose BatchNorm normalises over the batch). Anything else, a user's model
    included, is split by batch size instead, which is exact for any model.
    """
    return all(type(module) in _PER_EXAMPLE_MODULES for module in model.modules())


def _gather(tensors: Sequence[Tensor], orders: Sequence[list[Tensor]], members: list[int],
            step: int, size: int) -> Tensor:
    """``tensors[k][orders[k][step]]`` of every member, stacked: ``(members, size, ...)``.

    Gathered straight into the stacked batch, client by client: concatenating all clients'
    data first would copy every example once more than sequential training does. A member
    whose batch is shorter than ``size`` fills the start of its row; the rest are zeros (a
    finite value: the padded rows' zero loss weight must not meet an inf or a NaN).
    """
    first = tensors[members[0]]
    shape = (len(members), size, *first.shape[1:])
    lengths = [len(orders[k][step]) for k in members]
    full = all(n == size for n in lengths)
    out = (torch.empty if full else torch.zeros)(shape, dtype=first.dtype, device=first.device)
    for i, (k, n) in enumerate(zip(members, lengths)):
        torch.index_select(tensors[k], 0, orders[k][step], out=out[i] if n == size
                           else out[i, :n])
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


class _StackedLinear(torch.autograd.Function):
    """``F.linear`` whose vmap rule computes ``(W x^T)^T``: weight gradients come out contiguous.

    Under vmap's own rule the gradient of a stacked weight ``(K, out, in)`` comes back as a
    transposed view, which SGD's fused kernel either gets copied (a pass over every weight at
    every step) or runs slowly on. Here the product is ``bmm(W, x^T)``, whose gradient with
    respect to ``W`` is ``bmm(grad^T, x)``: ``(K, out, in)``, contiguous. The output is then a
    transposed view, which the next layer's ``x^T`` turns back into a contiguous operand. Same
    dot products as ``x W^T``, summed in another order (float tolerance). Only ever called
    under vmap with the weight (and bias) stacked along dimension 0.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch's signature
        pass

    @staticmethod
    def vmap(info, in_dims, x: Tensor, weight: Tensor,  # noqa: ANN001
             bias: Tensor | None) -> tuple[Tensor, int]:
        if in_dims[1] != 0 or (bias is not None and in_dims[2] != 0):
            raise RuntimeError("stacked linear needs weight and bias stacked along dimension 0")
        clients = info.batch_size
        if in_dims[0] is None:
            x = x.unsqueeze(0).expand(clients, *x.shape)
        else:
            x = x.movedim(in_dims[0], 0)
        lead = x.shape[1:-1]
        rows = x.reshape(clients, -1, x.shape[-1])  # (K, B, in)
        out = torch.bmm(weight, rows.transpose(1, 2)).transpose(1, 2)  # (K, B, out)
        if bias is not None:
            out = out + bias.unsqueeze(1)
        return out.reshape(clients, *lead, weight.shape[1]), 0


def _stacked_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """``nn.Linear.forward`` via the stacked rule."""
    return _StackedLinear.apply(x, self.weight, self.bias)


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
        elif type(module) is nn.Linear:
            module.forward = types.MethodType(_stacked_linear_forward, module)
    return template


def _train_chunk(models: Sequence[nn.Module], entries: Sequence[_Entries],
                 datasets: Sequence[tuple[Tensor, Tensor]], orders: Sequence[list[Tensor]],
                 spec: LocalTrainSpec, device: torch.device,
                 template: nn.Module) -> list[dict[str, float]]:
    """Train models with any step counts (``orders``, one batch list each) as one computation.

    Every model has at least one step and is on ``device``. Clients whose steps are over are
    left out of the remaining steps altogether (see :func:`_masked_step`); the result of each
    is that of training it alone. ``template`` is :func:`_batched_template` of the models.
    """
    started = time.perf_counter()
    # Longest first: at every step the clients still training are then a prefix of the stack,
    # and a prefix of the stack (clients are its outermost dimension) is one dense block.
    rank = sorted(range(len(models)), key=lambda k: _client_order(orders[k]))
    models = [models[k] for k in rank]
    datasets = [datasets[k] for k in rank]
    orders = [orders[k] for k in rank]
    count = len(models)
    steps_of = [len(order) for order in orders]
    param_names = [n for n, _ in template.named_parameters()]
    buffer_names = [n for n, _ in template.named_buffers()]
    own_params = [entries[k][0] for k in rank]
    own_buffers = [entries[k][1] for k in rank]
    with torch.no_grad():
        params = {n: torch.stack([own[n].detach() for own in own_params])
                  for n in param_names}
        buffers = {n: torch.stack([own[n] for own in own_buffers]) for n in buffer_names}
    # Frozen parameters stay frozen: train_local's SGD never gets a gradient for them (and so
    # never decays them either).
    trainable = [n for n in param_names if own_params[0][n].requires_grad]
    anchor = None
    if spec.proximal_mu > 0:
        anchor = {n: p.clone() for n, p in params.items()}

    examples = [sum(len(idx) for idx in order) for order in orders]
    total_loss = torch.zeros(count, device=device)
    xs = [x.to(device) for x, _ in datasets]
    ys = [y.to(device) for _, y in datasets]
    orders = [[idx.to(device) for idx in order] for order in orders]
    plan = _plan_steps(orders, _pads_exactly(template))

    def client_loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        # The module's own forward on one client's slice: BatchNorm updates that client's
        # running statistics in place, inside the stacked buffer.
        return nn.functional.cross_entropy(functional_call(template, (p, b), (x,)), y)

    def padded_loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor,
                    weight: Tensor, length: Tensor) -> Tensor:
        # The mean over the client's own examples: padded rows weigh 0 (their loss, finite,
        # times 0 adds exact zeros, and their gradient is exactly 0).
        per_example = nn.functional.cross_entropy(functional_call(template, (p, b), (x,)), y,
                                                  reduction="none")
        return (per_example * weight).sum() / length

    batched_loss = vmap(client_loss)
    batched_padded_loss = vmap(padded_loss)
    fused = _fused_sgd_available(params[trainable[0]]) if trainable else False
    momentum_buffers: dict[str, Tensor] | None = {} if spec.momentum != 0 else None
    for step, (active, ranges) in enumerate(plan):
        objective = torch.zeros((), device=device)
        pieces: list[tuple[_Range, dict[str, Tensor]]] = []
        for r in ranges:
            # The range's leaves: views of its clients' slices of the stacked weights, taking
            # the gradient; the finished clients (past the active prefix) are in no range.
            leaves = {n: p[r.first:r.end].detach() for n, p in params.items()}
            for n in trainable:
                leaves[n].requires_grad_(True)
            # Views too: BatchNorm's in-place update of them lands in the stacked buffers.
            live_buffers = {n: b[r.first:r.end] for n, b in buffers.items()}
            members = list(range(r.first, r.end))
            xb = _gather(xs, orders, members, step, r.size)
            yb = _gather(ys, orders, members, step, r.size)
            if r.padded:
                lengths = torch.tensor([len(orders[k][step]) for k in members], device=device)
                weight = (torch.arange(r.size, device=device) < lengths[:, None]).to(xb.dtype)
                losses = batched_padded_loss(leaves, live_buffers, xb, yb, weight,
                                             lengths.to(xb.dtype))
            else:
                losses = batched_loss(leaves, live_buffers, xb, yb)
            total_loss[r.first:r.end] += losses.detach()
            objective = objective + losses.sum()
            if anchor is not None:
                # Summed over clients, each client's term depends only on its own weights.
                objective = objective + 0.5 * spec.proximal_mu * sum(
                    (leaves[n] - anchor[n][r.first:r.end]).pow(2).sum() for n in param_names)
            pieces.append((r, leaves))
        # autograd.grad rather than backward(): the gradients go straight to SGD, not through
        # .grad of leaves that live for one step.
        inputs = [leaves[n] for _, leaves in pieces for n in trainable]
        flat_grads = torch.autograd.grad(objective, inputs, allow_unused=True)
        per_range = [(r.first, r.end, dict(zip(trainable, flat_grads[i * len(trainable):
                                                                    (i + 1) * len(trainable)])))
                     for i, (r, _) in enumerate(pieces)]
        _masked_step(params, per_range, momentum_buffers, spec, step, steps_of, fused)

    with torch.no_grad():
        for k in range(count):
            for n, p in own_params[k].items():
                p.copy_(params[n][k])
            for n, b in own_buffers[k].items():
                b.copy_(buffers[n][k])
    # One wall time for the chunk; each client is charged its share of the steps.
    elapsed = time.perf_counter() - started
    all_steps = max(sum(steps_of), 1)
    losses_out = total_loss.cpu()
    stats = [{
        "loss": float(losses_out[k]) / max(steps_of[k], 1),
        "steps": float(steps_of[k]),
        "examples": float(examples[k]),
        "seconds": elapsed * steps_of[k] / all_steps,
    } for k in range(count)]
    unsorted: list[dict[str, float]] = [{}] * count
    for position, k in enumerate(rank):
        unsorted[k] = stats[position]
    return unsorted


def _fused_sgd_available(tensor: Tensor) -> bool:
    """Whether torch's fused SGD kernel takes this tensor (a floating-point one on CPU or CUDA).

    The fused kernel reads and writes weights, gradient and momentum once per step; the
    per-tensor path makes about four passes, which over ``K`` models no longer fit in cache.
    """
    return torch.is_floating_point(tensor) and tensor.device.type in ("cpu", "cuda")


def _masked_step(params: dict[str, Tensor],
                 pieces: Sequence[tuple[int, int, dict[str, Tensor | None]]],
                 momentum_buffers: dict[str, Tensor] | None, spec: LocalTrainSpec, step: int,
                 steps_of: Sequence[int], fused: bool) -> None:
    """``train_local``'s SGD step ``step`` for the clients of ``pieces``, and only them.

    ``pieces`` are ``(first, end, gradients)`` of this step's ranges of clients; clients in
    none (their steps are over) are not read or written: SGD on a whole stacked tensor would
    move them too, since weight decay and momentum change a weight whose gradient is zero.
    The step runs torch's own SGD (``torch.optim.sgd.sgd``, the functional form of
    ``torch.optim.SGD``) on views of the clients' slices of the weights, gradients and
    momentum buffers: one call per lr. With a constant lr that is one call; a per-step
    schedule spans each client's own step count (``steps_of``), so clients with different
    counts may have different lrs.

    Momentum buffers start as zeros, and SGD always takes its non-first step: a client's first
    step then sets its buffer to ``momentum * 0 + grad``, which is ``grad`` exactly, as SGD's
    first step does. (SGD's own first step would make one new buffer per call, and a call's
    clients change from step to step.)
    """
    span = spec.progress_end - spec.progress_start
    calls: dict[float, tuple[list[Tensor], list[Tensor], list[Tensor | None]]] = {}
    for first, end, grads in pieces:
        # Runs of clients with one lr within the range: the sort by step count keeps clients of
        # one count, hence one lr, together.
        runs: list[tuple[int, int, float]] = []
        for k in range(first, end):
            lr = (spec.lr if spec.lr_schedule == "constant" else schedule_lr(
                spec.lr, spec.lr_schedule, spec.progress_start + span * step / steps_of[k]))
            if runs and runs[-1][2] == lr:
                runs[-1] = (runs[-1][0], k + 1, lr)
            else:
                runs.append((k, k + 1, lr))
        for n, g in grads.items():
            if g is None:  # an unused parameter: skipped, as SGD does
                continue
            # Weight, gradient and momentum buffer contiguous: the fused kernel walks memory
            # linearly (a gradient laid out otherwise than its weight had its elements
            # silently mixed up, torch 2.14, CPU) and is 3.5x slower on other layouts. The
            # stacked rules keep the built-in layers' gradients contiguous (_StackedLinear).
            g = g if g.is_contiguous() else g.contiguous()
            weight = params[n]
            if momentum_buffers is not None and n not in momentum_buffers:
                momentum_buffers[n] = torch.zeros_like(weight)
            for a, b, lr in runs:
                weights, gradients, buffers = calls.setdefault(lr, ([], [], []))
                weights.append(weight[a:b])
                gradients.append(g if (a, b) == (first, end) else g[a - first:b - first])
                buffers.append(momentum_buffers[n][a:b] if momentum_buffers is not None
                               else None)
    with torch.no_grad():
        for lr, (weights, gradients, buffers) in calls.items():
            sgd_step(weights, gradients, buffers, foreach=False, fused=fused,
                     weight_decay=spec.weight_decay, momentum=spec.momentum, lr=lr,
                     dampening=0.0, nesterov=False, maximize=False)


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
        Each client's examples and labels; sizes, hence step counts, may differ (they still
        train together).
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
        times the model's share of the chunk's steps; 0 for a model with no step).

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
    entries = [_entries(model) for model in models]
    _check_same_architecture(models, entries)
    if max_clients is None:
        max_clients = auto_max_clients(spec.batch_size, datasets[0][0].shape[1:])
    device = torch.device(device)
    for k, model in enumerate(models):
        # model.to(device) only where needed: its module walk costs more than a small
        # client's share of a batched step.
        own = itertools.chain(entries[k][0].values(), entries[k][1].values())
        if (not all(t.is_cpu for t in own) if device.type == "cpu"
                else any(t.device != device for t in own)):
            model.to(device)
            entries[k] = _entries(model)
    orders = [batch_order(len(x), spec.batch_size, spec, torch.Generator().manual_seed(seed))
              for (x, _), seed in zip(datasets, seeds)]
    # Longest first, then chunk after chunk: a chunk runs as many steps as its longest client,
    # and clients of like step counts together keep its short ones few (those cost nothing once
    # their steps are over, but every step costs a little per chunk). A client with no step
    # (an empty partition) is left as train_local leaves it: on the device, in training mode.
    ranked = sorted(range(len(models)), key=lambda k: _client_order(orders[k]))
    training = [k for k in ranked if orders[k]]
    results: list[dict[str, float] | None] = [None] * len(models)
    for k in ranked[len(training):]:
        results[k] = {"loss": 0.0, "steps": 0.0, "examples": 0.0, "seconds": 0.0}
    template = _batched_template(models[0])
    for start in range(0, len(training), max_clients):
        chunk = training[start:start + max_clients]
        stats = _train_chunk([models[k] for k in chunk], [entries[k] for k in chunk],
                             [datasets[k] for k in chunk], [orders[k] for k in chunk], spec,
                             device, template)
        for k, s in zip(chunk, stats):
            results[k] = s
    return results  # type: ignore[return-value]
