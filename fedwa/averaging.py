"""Averaging of state dicts: the one weighted mean every strategy builds on.

Floating-point entries are averaged with fused ``_foreach`` kernels (one pass over all tensors
instead of one Python loop per tensor). Integer entries, such as BatchNorm's
``num_batches_tracked``, are never averaged as floats: they take the maximum over models, which
is the count of the model that trained longest.

BatchNorm caveat: averaging running means and variances of different models does not give the
statistics of the averaged model. Strategies that evaluate an average of models that trained
apart (SWA, EMA, HWA, TWA) recompute them on data after averaging.

Example
-------
>>> import torch
>>> a = {"w": torch.tensor([0.0, 2.0])}
>>> b = {"w": torch.tensor([4.0, 6.0])}
>>> weighted_average([a, b], [1, 3])["w"]
tensor([3., 5.])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Return ``weights`` scaled to sum to 1 (uniform when ``None``)."""
    if count == 0:
        raise ValueError("cannot average zero models")
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} models")
    total = float(sum(weights))
    if not total > 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def weighted_average(
    state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts with identical keys and shapes.

    Parameters
    ----------
    state_dicts : sequence of mappings from name to tensor
        The models to average; the first one fixes the key order.
    weights : sequence of float, optional
        Non-negative weights, normalised here (e.g. example counts). Uniform when omitted.

    Returns
    -------
    dict
        New tensors; the inputs are not modified.
    """
    coefficients = normalise_weights(weights, len(state_dicts))
    names = list(state_dicts[0])
    float_names = [n for n in names if torch.is_floating_point(state_dicts[0][n])]
    result: dict[str, torch.Tensor] = {}
    if float_names:
        acc = torch._foreach_mul([state_dicts[0][n] for n in float_names], coefficients[0])
        for sd, c in zip(state_dicts[1:], coefficients[1:]):
            torch._foreach_add_(acc, [sd[n] for n in float_names], alpha=c)
        result.update(zip(float_names, acc))
    for n in names:
        if n not in result:
            result[n] = torch.stack([sd[n] for sd in state_dicts]).amax(dim=0)
    return {n: result[n] for n in names}


def is_finite_state(state_dict: StateDict) -> bool:
    """True when no floating-point entry holds NaN or inf."""
    return all(
        bool(torch.isfinite(t).all()) for t in state_dict.values() if torch.is_floating_point(t)
    )
