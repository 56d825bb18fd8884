"""Recomputing BatchNorm running statistics after weight averaging.

An average of models that trained apart (SWA, EMA, HWA, TWA) needs BatchNorm statistics of its
own: the averaged running means and variances describe none of the models (Izmailov et al.
2018, "Averaging Weights Leads to Wider Optima and Better Generalization", arXiv 1803.05407,
section 3.2). This module recomputes them by two routes that give the same numbers:

* central -- the server holds data: :func:`recompute_bn`;
* federated -- every client reduces its own data to sufficient statistics
  (:func:`bn_moments`: count, per-channel sum and sum of squares of each BN layer's input), the
  server adds them up (:func:`combine_moments`), turns them into means and variances
  (:func:`moments_to_stats`) and writes them into the model (:func:`set_bn_stats`).
  :func:`federated_recompute_bn` runs that message loop in one process.

How this differs from :func:`torch.optim.swa_utils.update_bn`
-------------------------------------------------------------
``update_bn`` runs the model in *train* mode: every BN layer normalises with the statistics of
the current batch and its running statistics become the average of per-batch estimates (the
per-batch variance is even the unbiased one). Layer l's input then depends on which examples
share a batch with it, through the batch statistics of layers < l, so the result changes with
the batch size, the shuffling and, federated, with how the data is split across clients; an
average of per-batch estimates is not the statistic of the union either.

Here every pass runs in *eval* mode, so an example's activations depend on the weights and the
current running statistics only, never on its batch mates. Each layer's input statistics are
then exact sums that add up across batches and clients, which makes the federated route equal
the central one and both independent of the batch size. With ``passes=0`` the layers are fixed
one after another, each measured while all earlier layers already hold the exact statistics of
their own inputs; at the end every layer normalises with the population mean and variance of
exactly the inputs it sees at test time, which is what eval-mode inference wants.

Example
-------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.BatchNorm1d(2))
>>> _ = recompute_bn(model, torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
>>> model[0].running_mean, model[0].running_var
(tensor([2., 4.]), tensor([1., 4.]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Moments = dict[str, tuple[Tensor, Tensor, Tensor]]
Stats = dict[str, tuple[Tensor, Tensor]]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm layers of ``model`` that keep running statistics, in registration order.

    Parameters
    ----------
    model : torch.nn.Module
        Any module.

    Returns
    -------
    list of (str, _BatchNorm)
        Qualified names and modules. Layers built with ``track_running_stats=False`` are left
        out: they have nothing to recompute and normalise with batch statistics even in eval
        mode.

    Notes
    -----
    The exact route of :func:`recompute_bn` assumes that this order lists every BN layer after
    the BN layers that feed it, i.e. that modules are registered in the order ``forward`` calls
    them; all models of :mod:`fedwa.models` are.
    """
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and module.running_mean is not None]


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` has at least one BatchNorm layer with running statistics."""
    return bool(batchnorm_layers(model))


def _select(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, _BatchNorm]]:
    found = batchnorm_layers(model)
    if layers is None:
        return found
    by_name = dict(found)
    unknown = [name for name in layers if name not in by_name]
    if unknown:
        raise KeyError(f"not BatchNorm layers with running statistics: {unknown}")
    return [(name, by_name[name]) for name in layers]


@torch.no_grad()
def bn_moments(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    layers: Sequence[str] | None = None,
) -> Moments:
    """Sufficient statistics of the inputs BatchNorm layers receive in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
        Moved to ``device``; run in eval mode, every module's training flag is restored after.
    x : torch.Tensor
        Examples, first dimension the batch; may be empty (the moments are then zero).
    batch_size : int, optional
        Examples per forward pass; only memory depends on it, not the result.
    device : torch.device or str, optional
        Where the forward passes run.
    layers : sequence of str, optional
        Names (as in :func:`batchnorm_layers`) of the layers to measure; all when omitted.

    Returns
    -------
    dict
        Layer name -> ``(count, sum, sum_of_squares)`` on the CPU in float64: ``count`` is a
        scalar, the number of values per channel (``N`` for BatchNorm1d on ``[N, C]``,
        ``N*H*W`` for BatchNorm2d); the sums are per channel. They add up across batches and
        clients, see :func:`combine_moments`.

    Raises
    ------
    KeyError
        If a name in ``layers`` is not such a layer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    selected = _select(model, layers)
    # Accumulate on the device in float64: float32 sums of ~1e6 squares would lose the digits
    # that the variance ss/n - mean^2 keeps.
    acc = {name: [torch.zeros((), dtype=torch.float64, device=device),
                  torch.zeros(bn.num_features, dtype=torch.float64, device=device),
                  torch.zeros(bn.num_features, dtype=torch.float64, device=device)]
           for name, bn in selected}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            values = inputs[0].to(torch.float64).transpose(0, 1).reshape(module.num_features, -1)
            acc[name][0] += values.shape[1]
            acc[name][1] += values.sum(dim=1)
            acc[name][2] += values.square().sum(dim=1)
        return record

    flags = {module: module.training for module in model.modules()}
    handles = [bn.register_forward_hook(hook(name)) for name, bn in selected]
    try:
        model.to(device).eval()
        if selected:
            for start in range(0, len(x), batch_size):
                model(x[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
    return {name: (n.cpu(), s.cpu(), ss.cpu()) for name, (n, s, ss) in acc.items()}


def combine_moments(parts: Sequence[Mapping[str, tuple[Tensor, Tensor, Tensor]]]) -> Moments:
    """Add up the moments of disjoint data sets (e.g. one per client).

    Parameters
    ----------
    parts : sequence of mappings
        Outputs of :func:`bn_moments` over the same layers.

    Returns
    -------
    dict
        Layer name -> elementwise sums of ``(count, sum, sum_of_squares)``: the moments of the
        union of the data sets.
    """
    if not parts:
        raise ValueError("no moments to combine")
    names = list(parts[0])
    if any(set(part) != set(names) for part in parts):
        raise ValueError("all parts must cover the same BatchNorm layers")
    return {name: tuple(sum(part[name][i] for part in parts) for i in range(3))  # type: ignore[misc]
            for name in names}


def moments_to_stats(moments: Mapping[str, tuple[Tensor, Tensor, Tensor]]) -> Stats:
    """Per-channel mean and population variance from count, sum and sum of squares.

    Parameters
    ----------
    moments : mapping
        Output of :func:`bn_moments` or :func:`combine_moments`.

    Returns
    -------
    dict
        Layer name -> ``(mean, var)`` in float32 with ``mean = s / n`` and
        ``var = ss / n - mean**2`` clamped at 0 (rounding can push a constant channel's
        variance below 0). The population variance (divisor ``n``) is what BN itself uses
        to normalise, so eval mode then matches train mode on the same full batch.

    Raises
    ------
    ValueError
        If a layer's count is zero.
    """
    stats: Stats = {}
    for name, (n, s, ss) in moments.items():
        if not n > 0:
            raise ValueError(f"no values seen by BatchNorm layer {name!r}")
        mean = s / n
        var = (ss / n - mean.square()).clamp_min(0.0)
        stats[name] = (mean.float(), var.float())
    return stats


@torch.no_grad()
def set_bn_stats(model: nn.Module, stats: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    """Write running means and variances into the named BatchNorm layers of ``model``.

    Values are cast to the dtype and device of the buffers. Layers missing from ``stats`` keep
    theirs; ``num_batches_tracked`` is never touched.

    Raises
    ------
    KeyError
        If a name is not a BatchNorm layer with running statistics.
    """
    for name, bn in _select(model, list(stats)):
        mean, var = stats[name]
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


def recompute_bn(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    passes: int = 0,
    layers: Sequence[str] | None = None,
) -> nn.Module:
    """Recompute all BatchNorm running statistics of ``model`` on data ``x`` (central route).

    Parameters
    ----------
    model : torch.nn.Module
        Updated in place and moved to ``device``; returned unchanged (no forward pass) when it
        has no BatchNorm layer.
    x : torch.Tensor
        Examples (labels are not needed).
    batch_size : int, optional
        Examples per forward pass; the result does not depend on it.
    device : torch.device or str, optional
        Where the forward passes run.
    passes : int, optional
        ``0`` (default): exact, one pass per BN layer in order, each measuring only that layer,
        so that every layer's running mean and (population) variance end equal to those of
        the inputs it receives in eval mode. ``p > 0``: ``p`` passes that each measure all
        layers with the statistics of the previous pass -- exact only for layers that have
        fewer than ``p`` BN layers upstream.
    layers : sequence of str, optional
        Only these BN layers (in forward order), e.g. the BatchNorm copies of one late-phase
        member, the others being unused by the forward pass; all when omitted.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.
    """
    if passes < 0:
        raise ValueError(f"passes must be >= 0, got {passes}")
    if passes == 0:
        # The exact central route is the federated one with a single client.
        return federated_recompute_bn(model, [x], batch_size=batch_size, device=device,
                                      layers=layers)
    if has_batchnorm(model):
        for _ in range(passes):
            set_bn_stats(model, moments_to_stats(
                bn_moments(model, x, batch_size=batch_size, device=device, layers=layers)))
    return model


def federated_recompute_bn(
    model: nn.Module,
    client_data: Sequence[Tensor],
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    layers: Sequence[str] | None = None,
) -> nn.Module:
    """Simulate the federated exact recomputation in one process.

    For each BN layer in order, every client measures only that layer on its data with the
    current model, the server adds the moments up and writes the statistics, then sends the
    model again. The result equals ``recompute_bn(model, torch.cat(client_data))`` up to the
    order of float64 additions.

    Parameters
    ----------
    model : torch.nn.Module
        Updated in place and moved to ``device``.
    client_data : sequence of torch.Tensor
        Each client's examples.
    batch_size : int, optional
        Examples per forward pass on a client.
    device : torch.device or str, optional
        Where the forward passes run.
    layers : sequence of str, optional
        Only these BN layers (see :func:`recompute_bn`).

    Returns
    -------
    torch.nn.Module
        ``model`` itself.
    """
    chosen = [name for name, _ in batchnorm_layers(model) if layers is None or name in layers]
    for name in chosen:
        parts = [bn_moments(model, xk, batch_size=batch_size, device=device, layers=[name])
                 for xk in client_data]
        set_bn_stats(model, moments_to_stats(combine_moments(parts)))
    return model
