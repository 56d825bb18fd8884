"""Trainable Weight Averaging: optimise the weights inside the span of checkpoints.

TWA (Li et al., "Trainable Weight Averaging: Efficient Training by Optimizing Historical
Solutions", ICLR 2023, arXiv 2205.13104) replaces the fixed uniform average of SWA by weights
trained within the low-dimensional subspace of candidate checkpoints ``w_1 .. w_n``. The
weights are written as

    w(x) = c + P^T x,        c = mean_i w_i (the SWA point),   P: [k, D] orthonormal rows,

so ``x = 0`` is SWA. Gradient descent on ``x`` uses the projected gradient ``P g`` (``g`` the
gradient in weight space), which is exactly ``d loss / d x``: training costs one extra
``k x D`` product per step, and only ``k`` numbers per block have to be communicated or stored
besides ``c`` and ``P``.

Basis (:meth:`Subspace.from_candidates`)
----------------------------------------
``"uncentred"`` (the conference version, the authors' ``main`` branch; this function's
default, while the TWA strategies default to the journal's ``"centred"``):
``P`` spans ``{w_i}`` themselves, ``k <= n``. Their span contains the centre, so ``w(x)`` is
any *linear* combination of the candidates, and the weights' overall scale is one of the
directions: weight decay (a pull towards zero weights) then acts within the subspace, as in
the reference's training, where torch's SGD adds ``wd * w`` to the projected gradient and the
weights stay in ``span(P)``. ``"centred"`` (the journal version's centring, fedwa's earlier
behaviour): ``P`` spans ``{w_i - c}``, ``k <= n - 1``, the affine hull: only combinations whose
coefficients sum to 1, one direction fewer.

Layer-wise coefficients (the journal version) split the ``D`` coordinates into ``L`` blocks
(per parameter tensor or per layer) with a coefficient vector each:
``w = c + sum_b P[:, b]^T x_b``. The rows of ``P[:, b]`` are not orthonormal, but ``P[:, b]
g[b]`` is still the exact gradient with respect to ``x_b``, so the update is a valid gradient
step in the enlarged ``L x k`` coefficient space (which contains the shared-``x`` one as the
case of equal rows). The journal normalises (and quantises) each block's centred rows instead
of orthonormalising them; fedwa keeps one orthonormal float32 ``P`` for both.

Optimiser and schedule (:class:`SubspaceOptimizer`)
----------------------------------------------------
``"sgd"`` (``main`` branch; the functions' default here, while the TWA strategies default to
the journal's ``"adamw"``): heavy-ball momentum 0.9, learning rate 2, coupled L2
weight decay ``1e-5`` on the weights ``w`` (not on ``x``), step schedule x0.1 at 50% and 75%
of the fit. ``"adamw"`` (journal): AdamW on the coefficients, learning rate ``1e-3``, cosine
schedule after a linear warmup over the first 20% of the steps. :data:`REFERENCE_LR` holds
the two learning rates.

BatchNorm (:func:`fit_on_data`)
-------------------------------
Both branches fit with the model in train mode: BatchNorm normalises with batch statistics,
the loss training minimised, and the running statistics are recomputed afterwards. That is
the default (``bn_mode="train"``); ``"eval"`` normalises with the running statistics, which
makes the loss a function of the weights alone.

Example
-------
>>> import torch
>>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
>>> Subspace.from_candidates([a, b]).dim, Subspace.from_candidates([a, b], basis="centred").dim
(2, 1)
>>> Subspace.from_candidates([a, b]).point(torch.zeros(1, 2))
tensor([1.0000, 0.5000])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Block = tuple[int, int]

#: Bases of :meth:`Subspace.from_candidates`; the first is the default.
BASES = ("uncentred", "centred")
#: Coefficient optimisers of :class:`SubspaceOptimizer`; the first is the default.
OPTIMIZERS = ("sgd", "adamw")
#: Learning-rate schedules (:func:`lr_factor`); ``"auto"`` picks the reference's for the
#: optimiser (:func:`resolve_schedule`).
SCHEDULES = ("auto", "step", "cosine", "constant")
#: BatchNorm during :func:`fit_on_data`: batch statistics (``"train"``) or running ones.
BN_MODES = ("train", "eval")
#: The reference's learning rate per optimiser: 2 with SGD on CIFAR (``main`` branch,
#: ``run.sh``), 1e-3 with AdamW (journal branch).
REFERENCE_LR = {"sgd": 2.0, "adamw": 1e-3}
#: Fraction of the fit spent on the linear warmup of the cosine schedule (journal branch).
WARMUP_FRACTION = 0.2


def learnable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad``, in ``state_dict`` order.

    Buffers (e.g. BatchNorm running statistics) and frozen parameters are excluded.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [name for name in model.state_dict() if name in trainable]


def flatten(state: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """Concatenate the named tensors of ``state`` into one float32 vector (a new tensor)."""
    if not names:
        raise ValueError("no tensors to flatten")
    return torch.cat([state[name].detach().reshape(-1).to(torch.float32) for name in names])


def unflatten(vector: Tensor, like: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten`: split ``vector`` into new tensors shaped like ``like``.

    Parameters
    ----------
    vector : torch.Tensor
        1-D, as long as the named tensors together.
    like : mapping from name to tensor
        Gives each name's shape, dtype and device.
    names : sequence of str
        Order of the pieces in ``vector``.

    Returns
    -------
    dict
        Name -> tensor, for ``names`` only; nothing aliases ``vector``.
    """
    sizes = [like[name].numel() for name in names]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"vector of shape {tuple(vector.shape)} for {sum(sizes)} values")
    return {name: piece.reshape(like[name].shape).to(like[name].device, like[name].dtype,
                                                      copy=True)
            for name, piece in zip(names, vector.detach().split(sizes))}


def _check_blocks(blocks: Sequence[Block], size: int) -> list[Block]:
    # Blocks must tile [0, D) in order: otherwise some coordinates would silently stay at the
    # centre (gap) or move twice (overlap), and it would no longer be a layer-wise version of
    # the same subspace.
    blocks = [(int(s), int(e)) for s, e in blocks]
    ends = [0] + [e for _, e in blocks]
    if not blocks or any(s != prev or e <= s for (s, e), prev in zip(blocks, ends)) \
            or ends[-1] != size:
        raise ValueError(f"blocks must tile [0, {size}) in order, got {blocks}")
    return blocks


@dataclass(eq=False)
class Subspace:
    """Affine subspace ``{c + sum_b P[:, b]^T x_b}`` of weight space.

    With an uncentred basis (:meth:`from_candidates`) ``c`` lies in ``span(P)`` and the set
    is the linear span of the candidates; with a centred one, their affine hull.

    Attributes
    ----------
    centre : torch.Tensor
        ``c``, shape ``[D]``: the mean of the candidates (the SWA point).
    basis : torch.Tensor
        ``P``, shape ``[k, D]`` with orthonormal rows.
    blocks : list of (int, int)
        ``[start, end)`` of each coefficient block, tiling ``[0, D)``; ``[(0, D)]`` when the
        coefficients are shared by all coordinates.
    """

    centre: Tensor
    basis: Tensor
    blocks: list[Block]

    def __post_init__(self) -> None:
        if self.centre.dim() != 1 or self.basis.dim() != 2 \
                or self.basis.shape[1] != self.centre.numel():
            raise ValueError(f"centre {tuple(self.centre.shape)} and basis "
                             f"{tuple(self.basis.shape)} do not fit together")
        self.blocks = _check_blocks(self.blocks, self.centre.numel())

    @classmethod
    def from_candidates(
        cls,
        candidates: Sequence[Tensor],
        blocks: Sequence[Block] | None = None,
        tol: float = 1e-6,
        *,
        basis: str = "uncentred",
    ) -> Subspace:
        """Centre and orthonormal basis of the span (or affine hull) of flattened checkpoints.

        Parameters
        ----------
        candidates : sequence of torch.Tensor
            ``n`` vectors of length ``D`` (see :func:`flatten`).
        blocks : sequence of (int, int), optional
            Coefficient blocks (see :func:`layer_blocks`); one block ``[0, D)`` by default.
        tol : float, optional
            Directions whose singular value is at most ``tol`` times the largest are dropped
            as rank deficiency (duplicate or dependent candidates).
        basis : {"uncentred", "centred"}, optional
            ``"uncentred"`` (default, the conference version's ``main`` branch, which
            orthonormalises the checkpoints themselves): ``P`` spans ``{w_i}``, whose span
            contains the centre. ``"centred"`` (the journal's centring): ``P`` spans
            ``{w_i - c}``, the affine hull. See the module docstring for why fedwa defaults to
            the first.

        Returns
        -------
        Subspace
            Centre ``c = mean_i w_i`` in both cases. ``k`` is the rank of the candidates
            (``<= n``) when uncentred, of the centred candidates (``<= n - 1``; 0 for one
            candidate) when centred.

        Notes
        -----
        Computed in float64, stored in float32. A thin QR ``Q R`` of the ``D x n`` matrix of
        (centred) candidates is followed by an SVD of the small ``n x n`` factor
        ``R = U S V^T``; the basis is ``(Q U)`` restricted to singular values above the
        tolerance. Testing ``|R_jj|`` alone would not do without column pivoting: once a
        candidate in the middle is dependent, its column of ``Q`` is an arbitrary direction
        that later candidates still have components along, so dropping it loses part of
        their span. The reference's Gram-Schmidt gives another orthonormal basis of the same
        span; with shared coefficients the trajectory in weight space does not depend on
        which one (only the projector ``P^T P`` and isometric images of ``x`` enter).
        """
        if not candidates:
            raise ValueError("no candidates")
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        weights = torch.stack([w.detach().reshape(-1).to(torch.float64) for w in candidates])
        centre = weights.mean(dim=0)
        q, r = torch.linalg.qr((weights - centre if basis == "centred" else weights).T)
        u, s, _ = torch.linalg.svd(r)
        keep = s > tol * s.max()
        directions = (q @ u[:, :s.numel()][:, keep]).T
        size = centre.numel()
        return cls(centre.float(), directions.float().contiguous(),
                   list(blocks) if blocks is not None else [(0, size)])

    @property
    def dim(self) -> int:
        """``k``, the number of basis directions."""
        return self.basis.shape[0]

    def zeros(self) -> Tensor:
        """Coefficients of the centre: zeros of shape ``[L, k]``."""
        return self.basis.new_zeros(len(self.blocks), self.dim)

    def point(self, coefficients: Tensor) -> Tensor:
        """Weights ``c + sum_b P[:, b]^T x_b`` for coefficients of shape ``[L, k]``."""
        if tuple(coefficients.shape) != (len(self.blocks), self.dim):
            raise ValueError(f"coefficients of shape {tuple(coefficients.shape)}, expected "
                             f"{(len(self.blocks), self.dim)}")
        weights = self.centre.clone()
        for (start, end), x in zip(self.blocks, coefficients.to(self.basis)):
            weights[start:end] += x @ self.basis[:, start:end]
        return weights

    def project(self, gradient: Tensor) -> Tensor:
        """Gradient with respect to the coefficients, ``P[:, b] g[b]`` per block: ``[L, k]``."""
        if tuple(gradient.shape) != tuple(self.centre.shape):
            raise ValueError(f"gradient of shape {tuple(gradient.shape)}, expected "
                             f"{tuple(self.centre.shape)}")
        gradient = gradient.to(self.basis)
        return torch.stack([self.basis[:, start:end] @ gradient[start:end]
                            for start, end in self.blocks])

    def nbytes(self) -> int:
        """Memory held by centre and basis, ``4 * (D + k * D)`` bytes in float32."""
        return sum(t.numel() * t.element_size() for t in (self.centre, self.basis))

    def to(self, device: torch.device | str) -> Subspace:
        """The same subspace with centre and basis on ``device`` (shared when already there)."""
        return Subspace(self.centre.to(device), self.basis.to(device), list(self.blocks))

    def state_dict(self) -> dict[str, Tensor]:
        """``centre``, ``basis`` and ``blocks`` (an int64 ``[L, 2]`` tensor), for checkpoints."""
        return {"centre": self.centre, "basis": self.basis,
                "blocks": torch.tensor(self.blocks, dtype=torch.int64).reshape(-1, 2)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace centre, basis and blocks by those of a :meth:`state_dict`."""
        loaded = Subspace(state["centre"].clone(), state["basis"].clone(),
                          [(int(s), int(e)) for s, e in state["blocks"].tolist()])
        self.centre, self.basis, self.blocks = loaded.centre, loaded.basis, loaded.blocks


def layer_blocks(model: nn.Module, names: Sequence[str], by: str = "layer") -> list[Block]:
    """Coefficient blocks over the flattened ``names`` of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        Gives the size of each named tensor.
    names : sequence of str
        The flattening order (e.g. :func:`learnable_names`).
    by : {"layer", "parameter"}, optional
        ``"parameter"``: one block per tensor. ``"layer"``: one block per run of consecutive
        names sharing the module prefix (the name up to its last dot), e.g. a layer's
        weight and bias.

    Returns
    -------
    list of (int, int)
        ``[start, end)`` per block, tiling ``[0, D)``.
    """
    if by not in ("layer", "parameter"):
        raise ValueError(f"by must be 'layer' or 'parameter', got {by!r}")
    state = model.state_dict()
    blocks: list[Block] = []
    start = 0
    key = (lambda name: name) if by == "parameter" else (lambda name: name.rpartition(".")[0])
    for _, group in itertools.groupby(names, key=key):
        end = start + sum(state[name].numel() for name in group)
        blocks.append((start, end))
        start = end
    return blocks


def resolve_schedule(schedule: str, optimizer: str) -> str:
    """The schedule ``"auto"`` stands for: the reference's for ``optimizer``.

    ``"step"`` for ``"sgd"`` (``main`` branch's MultiStepLR), ``"cosine"`` for ``"adamw"``
    (journal branch); any other schedule is returned as it is.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule != "auto":
        return schedule
    return "step" if optimizer == "sgd" else "cosine"


def step_milestones(epochs: int) -> tuple[int, int]:
    """Epochs at which the step schedule multiplies the learning rate by 0.1.

    ``main`` branch's ``[int(0.5 E), int(0.75 E + 0.9)]`` (``[5, 8]`` for its ``E = 10``), the
    first held at >= 1 so that a one-epoch fit does not run entirely at a tenth of the rate.
    """
    first = max(1, int(0.5 * epochs))
    return first, max(first, int(0.75 * epochs + 0.9))


def lr_factor(schedule: str, step: int, total_steps: int, steps_per_epoch: int = 1) -> float:
    """Multiplier of the base learning rate for fit step ``step`` (0-based).

    Parameters
    ----------
    schedule : {"step", "cosine", "constant"}
        ``"step"`` (``main`` branch): 1, then 0.1 from epoch ``m1``, 0.01 from epoch ``m2``
        (:func:`step_milestones`); it changes at epoch boundaries, as the reference's
        MultiStepLR stepped once per epoch. ``"cosine"`` (journal branch): linear warmup over
        the first ``W = int(0.2 T)`` steps, ``(t + 1) / W`` (the first step already moves,
        at ``1 / W``), then ``(1 + cos(pi (t - W) / (T - W))) / 2``, from 1 down towards 0
        over the remaining steps. ``"constant"``: 1.
    step : int
        ``t`` in ``[0, T)``; later steps get the last step's factor.
    total_steps : int
        ``T``, the steps of the whole fit (for TWA-t: the gradient rounds).
    steps_per_epoch : int, optional
        Batches per epoch; ``T`` must be a multiple. 1 when every step is an epoch (TWA-t:
        every gradient round is one pass over the clients' data).

    Returns
    -------
    float
        In ``(0, 1]``.
    """
    if total_steps < 1 or steps_per_epoch < 1 or total_steps % steps_per_epoch:
        raise ValueError(f"need total_steps a positive multiple of steps_per_epoch, got "
                         f"{total_steps} and {steps_per_epoch}")
    t = min(max(int(step), 0), total_steps - 1)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        first, second = step_milestones(total_steps // steps_per_epoch)
        epoch = t // steps_per_epoch
        return 0.1 ** ((epoch >= first) + (epoch >= second))
    if schedule == "cosine":
        warmup = int(WARMUP_FRACTION * total_steps)
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (total_steps - warmup)))
    raise ValueError(f"schedule must be step, cosine or constant, got {schedule!r}")


class SubspaceOptimizer:
    """SGD with momentum or AdamW on the subspace coefficients, with a learning-rate schedule.

    ``"sgd"`` (``main`` branch, default): the update of :class:`torch.optim.SGD` (no
    dampening, no Nesterov) with coupled L2 weight decay on the *weights*:
    ``d = P (g + wd * w(x))``, ``v <- momentum * v + d``, ``x <- x - lr_t * v``. The reference
    lets torch's SGD add ``wd * w`` to the projected gradient ``P^T P g`` of the full weights;
    with the uncentred basis ``w`` is in ``span(P)``, so that is the same step. ``d`` is the
    exact gradient of ``loss + wd/2 ||w(x)||^2`` with respect to ``x`` for either basis. An L2
    penalty on ``x`` instead would pull towards the SWA point, which is not what weight decay
    means.

    ``"adamw"`` (journal branch): :class:`torch.optim.AdamW`'s update on the coefficients,
    with the gradient ``P g`` and decoupled decay ``x <- (1 - lr_t * wd) x`` of the
    coefficients (towards the SWA point). The journal uses no decay; at its learning rate
    ``1e-3`` the default ``wd = 1e-5`` shrinks ``x`` by a factor ``1 - 1e-8`` per step, i.e.
    not at all in practice.

    ``lr_t = lr * lr_factor(schedule, t, total_steps, steps_per_epoch)`` at step ``t``.

    Parameters
    ----------
    subspace : Subspace
        Where the coefficients live.
    lr : float
        Base step size (> 0); :data:`REFERENCE_LR` gives the reference's per optimiser.
    momentum : float, optional
        In ``[0, 1)``; SGD only.
    optimizer : {"sgd", "adamw"}, optional
        The update rule.
    weight_decay : float, optional
        ``>= 0``; coupled L2 on ``w`` for SGD, decoupled on ``x`` for AdamW. 0 by default
        here (a plain optimiser); the strategies and :func:`fit_on_data` pass the
        reference's ``1e-5``.
    schedule : {"constant", "step", "cosine", "auto"}, optional
        See :func:`lr_factor`; ``"auto"`` as in :func:`resolve_schedule`.
    total_steps : int, optional
        Steps of the whole fit; required unless the schedule is constant.
    steps_per_epoch : int, optional
        Batches per epoch, for the step schedule's epoch milestones.
    betas, eps : optional
        AdamW's moment decay rates and denominator term, torch's defaults.

    Attributes
    ----------
    coefficients : torch.Tensor
        Current ``x``, shape ``[L, k]``; starts at zero, the SWA point.
    velocity : torch.Tensor
        SGD's momentum buffer, same shape (SGD only).
    exp_avg, exp_avg_sq : torch.Tensor
        AdamW's first and second moments, same shape (AdamW only).
    steps : int
        Updates taken so far; selects the scheduled learning rate and AdamW's bias
        correction, and is checkpointed with the buffers.
    """

    def __init__(self, subspace: Subspace, lr: float, momentum: float = 0.9, *,
                 optimizer: str = "sgd", weight_decay: float = 0.0, schedule: str = "constant",
                 total_steps: int | None = None, steps_per_epoch: int = 1,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got {lr} and {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"need weight_decay >= 0, got {weight_decay}")
        self.schedule = resolve_schedule(schedule, optimizer)
        if self.schedule != "constant":
            if total_steps is None:
                raise ValueError(f"the {self.schedule} schedule needs total_steps")
            lr_factor(self.schedule, 0, total_steps, steps_per_epoch)  # validates them
        self.subspace = subspace
        self.optimizer = optimizer
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.betas, self.eps = betas, eps
        self.steps = 0
        self.coefficients = subspace.zeros()
        if optimizer == "sgd":
            self.velocity = subspace.zeros()
        else:
            self.exp_avg, self.exp_avg_sq = subspace.zeros(), subspace.zeros()

    def _buffers(self) -> tuple[str, ...]:
        return ("velocity",) if self.optimizer == "sgd" else ("exp_avg", "exp_avg_sq")

    def current_lr(self) -> float:
        """The learning rate of the next step, ``lr * lr_factor(...)``."""
        if self.schedule == "constant":
            return self.lr  # exactly, not lr * 1.0 through the schedule
        assert self.total_steps is not None
        return self.lr * lr_factor(self.schedule, self.steps, self.total_steps,
                                   self.steps_per_epoch)

    def step(self, gradient: Tensor) -> Tensor:
        """One update from a full-space gradient ``g`` of shape ``[D]``; returns ``w(x)``.

        ``g`` is the loss gradient at the current ``w(x)``, weight decay not included.
        """
        lr = self.current_lr()
        if self.optimizer == "sgd":
            if self.weight_decay:
                gradient = gradient.to(self.subspace.basis) \
                    + self.weight_decay * self.subspace.point(self.coefficients)
            self.velocity.mul_(self.momentum).add_(self.subspace.project(gradient))
            self.coefficients.add_(self.velocity, alpha=-lr)
        else:
            grad = self.subspace.project(gradient)
            beta1, beta2 = self.betas
            t = self.steps + 1
            self.coefficients.mul_(1 - lr * self.weight_decay)
            self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (self.exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(self.eps)
            self.coefficients.addcdiv_(self.exp_avg, denominator, value=-lr / (1 - beta1 ** t))
        self.steps += 1
        return self.subspace.point(self.coefficients)

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of ``coefficients``, the optimiser's buffers and ``step`` (int64 scalar).

        Learning rate, schedule and the other settings are constructor arguments.
        """
        return {"coefficients": self.coefficients.clone(),
                **{name: getattr(self, name).clone() for name in self._buffers()},
                "step": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore coefficients, buffers and step count from a :meth:`state_dict`.

        A state without ``step`` (written before the schedules existed) resumes at step 0.
        """
        names = ("coefficients",) + self._buffers()
        missing = [name for name in names if name not in state]
        if missing:
            raise ValueError(f"state lacks {missing}: not one of a {self.optimizer} optimiser")
        for name in names:
            if state[name].shape != self.coefficients.shape:
                raise ValueError(f"{name} of shape {tuple(state[name].shape)}, expected "
                                 f"{tuple(self.coefficients.shape)}")
        for name in names:
            setattr(self, name, state[name].to(self.coefficients, copy=True))
        self.steps = int(state["step"]) if "step" in state else 0


@torch.no_grad()
def _load(params: Mapping[str, nn.Parameter], names: Sequence[str], weights: Tensor) -> None:
    for name, value in unflatten(weights, params, names).items():
        params[name].copy_(value)


def _batches(size: int, batch_size: int, merge_single: bool) -> list[tuple[int, int]]:
    bounds = [(start, min(start + batch_size, size)) for start in range(0, size, batch_size)]
    # BatchNorm in train mode cannot normalise a batch of one example (zero variance): a last
    # batch of one joins the one before.
    if merge_single and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], size)]
    return bounds


def fit_on_data(
    model: nn.Module,
    subspace: Subspace,
    names: Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: str = "sgd",
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    schedule: str = "auto",
    bn_mode: str = "train",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Train the subspace coefficients on labelled data with cross-entropy.

    TWA-v when ``(x, y)`` is a held-out validation split (journal), the conference version
    when it is the training data. The defaults are the ``main`` branch's (10 epochs, batch
    128, SGD with lr 2, momentum 0.9, weight decay 1e-5, step schedule, BatchNorm in train
    mode).

    Parameters
    ----------
    model : torch.nn.Module
        Architecture of the candidates; moved to ``device``. Its parameters ``names`` are
        overwritten; on return they hold ``w(x_final)``.
    subspace : Subspace
        Built from candidates flattened in the order ``names``.
    names : sequence of str
        Parameter names of ``model`` covered by the subspace (:func:`learnable_names`).
    x, y : torch.Tensor
        Examples and integer labels.
    epochs, batch_size : int, optional
        Passes over the data (reshuffled each epoch) and examples per step.
    optimizer : {"sgd", "adamw"}, optional
        See :class:`SubspaceOptimizer`.
    lr : float, optional
        Base learning rate; None: the reference's for ``optimizer`` (:data:`REFERENCE_LR`).
    momentum, weight_decay : float, optional
        Of :class:`SubspaceOptimizer`.
    schedule : {"auto", "step", "cosine", "constant"}, optional
        Over the ``epochs * batches`` steps of the fit (:func:`lr_factor`).
    bn_mode : {"train", "eval"}, optional
        ``"train"`` (both of the authors' branches): BatchNorm normalises with each batch's
        statistics, the loss that training minimised; the forward passes also update the
        running statistics, which are left in ``model`` (recompute them before evaluating,
        :mod:`fedwa.core.bn`, as the reference's final ``bn_update`` does). A trailing batch of a
        single example joins the previous batch. ``"eval"``: BatchNorm uses the running
        statistics ``model`` holds, so the loss is a function of the weights alone, not of
        the batch composition, and the buffers stay as they are.
    seed : int, optional
        Seeds the batch order.
    device : torch.device or str, optional
        Where to train.

    Returns
    -------
    torch.Tensor
        Final coefficients ``[L, k]`` on the CPU.

    Notes
    -----
    The module training flags are restored on return. With ``optimizer="sgd"``,
    ``schedule="constant"``, ``weight_decay=0`` and ``bn_mode="eval"`` this is fedwa's
    earlier fit, step for step.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    device = torch.device(device)
    model.to(device)
    subspace = subspace.to(device)
    params = dict(model.named_parameters())
    if sum(params[name].numel() for name in names) != subspace.centre.numel():
        raise ValueError("names do not cover the subspace's coordinates")
    bounds = _batches(len(x), batch_size, merge_single=bn_mode == "train")
    optimiser = SubspaceOptimizer(
        subspace, REFERENCE_LR[optimizer] if lr is None else lr, momentum, optimizer=optimizer,
        weight_decay=weight_decay, schedule=schedule, total_steps=epochs * len(bounds),
        steps_per_epoch=len(bounds))
    generator = torch.Generator().manual_seed(seed)
    x_dev, y_dev = x.to(device), y.to(device)
    weights = subspace.point(optimiser.coefficients)
    flags = {module: module.training for module in model.modules()}
    try:
        model.train(bn_mode == "train")
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator).to(device)
            for start, end in bounds:
                idx = order[start:end]
                _load(params, names, weights)
                model.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x_dev[idx]), y_dev[idx]).backward()
                # A parameter the loss does not reach has no gradient; it has zero slope.
                gradient = torch.cat([
                    (params[n].grad if params[n].grad is not None
                     else torch.zeros_like(params[n])).reshape(-1).float() for n in names])
                weights = optimiser.step(gradient)
        _load(params, names, weights)
    finally:
        model.zero_grad(set_to_none=True)
        for module, flag in flags.items():
            module.training = flag
    return optimiser.coefficients.cpu()
