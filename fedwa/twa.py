"""Trainable Weight Averaging: optimise the weights inside the span of checkpoints.

TWA (Li et al., "Trainable Weight Averaging: Efficient Training by Optimizing Historical
Solutions", ICLR 2023, arXiv 2205.13104) replaces the fixed uniform average of SWA by weights
trained within the low-dimensional subspace of candidate checkpoints ``w_1 .. w_n``. Here the
subspace is their affine hull, centred at the SWA point ``c = mean_i w_i``:

    w(x) = c + P^T x,        P: [k, D] orthonormal rows spanning {w_i - c},  k <= n - 1,

so ``x = 0`` is SWA and every ``x`` is an affine combination of the candidates. Gradient
descent on ``x`` uses the projected gradient ``P g`` (``g`` the gradient in weight space),
which is exactly ``d loss / d x``: training costs one extra ``k x D`` product per step, and only
``k`` numbers per block have to be communicated or stored besides ``c`` and ``P``.

Layer-wise coefficients (the extended version of the paper) split the ``D`` coordinates into
``L`` blocks (per parameter tensor or per layer) with a coefficient vector each:
``w = c + sum_b P[:, b]^T x_b``. The rows of ``P[:, b]`` are not orthonormal, but ``P[:, b]
g[b]`` is still the exact gradient with respect to ``x_b``, so the update is a valid gradient
step in the enlarged ``L x k`` coefficient space (which contains the shared-``x`` one as the
case of equal rows).

Example
-------
>>> import torch
>>> s = Subspace.from_candidates([torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.0])])
>>> s.dim, s.point(s.zeros())
(1, tensor([1., 0.]))
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Block = tuple[int, int]


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
    ) -> Subspace:
        """Centre and orthonormal basis of the affine hull of flattened checkpoints.

        Parameters
        ----------
        candidates : sequence of torch.Tensor
            ``n`` vectors of length ``D`` (see :func:`flatten`).
        blocks : sequence of (int, int), optional
            Coefficient blocks (see :func:`layer_blocks`); one block ``[0, D)`` by default.
        tol : float, optional
            Directions whose singular value is at most ``tol`` times the largest are dropped
            as rank deficiency (duplicate or affinely dependent candidates).

        Returns
        -------
        Subspace
            ``k`` is the rank of the centred candidates (``<= n - 1``; 0 for one candidate).

        Notes
        -----
        Computed in float64, stored in float32. A thin QR ``Q R`` of the ``D x n`` matrix of
        centred candidates is followed by an SVD of the small ``n x n`` factor ``R = U S V^T``;
        the basis is ``(Q U)`` restricted to singular values above the tolerance. Testing
        ``|R_jj|`` alone would not do without column pivoting: once a candidate in the
        middle is dependent, its column of ``Q`` is an arbitrary direction that later
        candidates still have components along, so dropping it loses part of their span.
        """
        if not candidates:
            raise ValueError("no candidates")
        weights = torch.stack([w.detach().reshape(-1).to(torch.float64) for w in candidates])
        centre = weights.mean(dim=0)
        q, r = torch.linalg.qr((weights - centre).T)
        u, s, _ = torch.linalg.svd(r)
        keep = s > tol * s.max()
        basis = (q @ u[:, :s.numel()][:, keep]).T
        size = centre.numel()
        return cls(centre.float(), basis.float().contiguous(),
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


class SubspaceOptimizer:
    """SGD with heavy-ball momentum on the subspace coefficients.

    Same update as :class:`torch.optim.SGD` (no dampening, no Nesterov):
    ``v <- momentum * v + P g``, ``x <- x - lr * v``. No weight decay: an L2 penalty on
    ``x`` would pull towards the SWA point rather than towards zero weights, which is not
    what weight decay means.

    Parameters
    ----------
    subspace : Subspace
        Where the coefficients live.
    lr : float
        Step size (> 0).
    momentum : float, optional
        In ``[0, 1)``.

    Attributes
    ----------
    coefficients : torch.Tensor
        Current ``x``, shape ``[L, k]``; starts at zero, the SWA point.
    velocity : torch.Tensor
        Momentum buffer, same shape.
    """

    def __init__(self, subspace: Subspace, lr: float, momentum: float = 0.9) -> None:
        if not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got {lr} and {momentum}")
        self.subspace = subspace
        self.lr = lr
        self.momentum = momentum
        self.coefficients = subspace.zeros()
        self.velocity = subspace.zeros()

    def step(self, gradient: Tensor) -> Tensor:
        """One update from a full-space gradient ``g`` of shape ``[D]``; returns ``w(x)``."""
        self.velocity.mul_(self.momentum).add_(self.subspace.project(gradient))
        self.coefficients.add_(self.velocity, alpha=-self.lr)
        return self.subspace.point(self.coefficients)

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of ``coefficients`` and ``velocity`` (lr and momentum are constructor args)."""
        return {"coefficients": self.coefficients.clone(), "velocity": self.velocity.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore ``coefficients`` and ``velocity`` from a :meth:`state_dict`."""
        for name in ("coefficients", "velocity"):
            if state[name].shape != self.coefficients.shape:
                raise ValueError(f"{name} of shape {tuple(state[name].shape)}, expected "
                                 f"{tuple(self.coefficients.shape)}")
        self.coefficients = state["coefficients"].to(self.coefficients, copy=True)
        self.velocity = state["velocity"].to(self.velocity, copy=True)


@torch.no_grad()
def _load(params: Mapping[str, nn.Parameter], names: Sequence[str], weights: Tensor) -> None:
    for name, value in unflatten(weights, params, names).items():
        params[name].copy_(value)


def fit_on_data(
    model: nn.Module,
    subspace: Subspace,
    names: Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 0.01,
    momentum: float = 0.9,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Train the subspace coefficients on labelled data with cross-entropy.

    TWA-v when ``(x, y)`` is a held-out validation split, TWA-t on the training data.

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
    lr, momentum : float, optional
        Of :class:`SubspaceOptimizer`.
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
    The model runs in eval mode (training flags restored after): BatchNorm then normalises
    with its running statistics, so the loss is a function of the weights alone, not of the
    batch composition; the statistics are recomputed after fitting anyway (:mod:`fedwa.bn`).
    """
    device = torch.device(device)
    model.to(device)
    subspace = subspace.to(device)
    params = dict(model.named_parameters())
    if sum(params[name].numel() for name in names) != subspace.centre.numel():
        raise ValueError("names do not cover the subspace's coordinates")
    optimiser = SubspaceOptimizer(subspace, lr, momentum)
    generator = torch.Generator().manual_seed(seed)
    x_dev, y_dev = x.to(device), y.to(device)
    weights = subspace.point(optimiser.coefficients)
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator).to(device)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
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
