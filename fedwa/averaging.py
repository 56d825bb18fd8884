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


def _split(state: StateDict) -> tuple[list[str], list[str]]:
    floats = [n for n, t in state.items() if torch.is_floating_point(t)]
    others = [n for n in state if n not in set(floats)]
    return floats, others


def clone_state(state: StateDict) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in state.items()}


class RunningAverage:
    """Uniform average of every state it is given (SWA: Izmailov et al., UAI 2018).

    ``mean_n = mean_{n-1} + (w_n - mean_{n-1}) / n``; integer buffers keep the latest value.
    State is ``count`` and ``average``, saved by :meth:`state_dict`.
    """

    def __init__(self) -> None:
        self.count = 0
        self.average: dict[str, torch.Tensor] | None = None

    def update(self, state: StateDict) -> None:
        if self.average is None:
            self.average, self.count = clone_state(state), 1
            return
        self.count += 1
        floats, others = _split(self.average)
        current = [self.average[n] for n in floats]
        delta = torch._foreach_sub([state[n] for n in floats], current)
        torch._foreach_add_(current, delta, alpha=1.0 / self.count)
        for n in others:
            self.average[n] = state[n].detach().clone()

    def state_dict(self) -> dict:
        return {"count": self.count, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.average = None if state["average"] is None else clone_state(state["average"])


class ExponentialAverage:
    """EMA ``v <- decay * v + (1 - decay) * w``, started at the first state it is given.

    After updates with w_1..w_n: ``v_n = decay^(n-1) w_1 + (1-decay) sum_{i=2..n}
    decay^(n-i) w_i``. Integer buffers keep the latest value.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.count = 0
        self.average: dict[str, torch.Tensor] | None = None

    def update(self, state: StateDict) -> None:
        self.count += 1
        if self.average is None:
            self.average = clone_state(state)
            return
        floats, others = _split(self.average)
        current = [self.average[n] for n in floats]
        # v + (1 - d) * (w - v) = d * v + (1 - d) * w, fused over all tensors.
        delta = torch._foreach_sub([state[n] for n in floats], current)
        torch._foreach_add_(current, delta, alpha=1.0 - self.decay)
        for n in others:
            self.average[n] = state[n].detach().clone()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "count": self.count, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.count = float(state["decay"]), int(state["count"])
        self.average = None if state["average"] is None else clone_state(state["average"])


class WindowAverage:
    """Uniform average of the last ``size`` states (HWA's offline average)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self.states: list[dict[str, torch.Tensor]] = []

    def update(self, state: StateDict) -> None:
        self.states.append(clone_state(state))
        del self.states[: max(0, len(self.states) - self.size)]

    @property
    def average(self) -> dict[str, torch.Tensor] | None:
        if not self.states:
            return None
        averaged = weighted_average(self.states)
        # Integer buffers: the newest, like the other running averages (not the max).
        _, others = _split(averaged)
        averaged.update({n: self.states[-1][n].clone() for n in others})
        return averaged

    def state_dict(self) -> dict:
        return {"size": self.size, "states": self.states}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        self.states = [clone_state(s) for s in state["states"]]
