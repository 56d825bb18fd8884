"""Averaging of state dicts: the one weighted mean every strategy builds on.

:func:`weighted_average` computes ``sum_k c_k * w_k`` over ``K`` models block by block: the
floating-point entries are cut into blocks of about 4 MiB, and for each block the running sum
stays in cache while every model's part of the block streams through it once (``_foreach``
kernels, one call per model and block). Memory traffic is then ``K * P`` reads and ``P``
writes. The straightforward order -- the whole accumulator, then the next model, which
:func:`reference_weighted_average` keeps -- reads and writes the whole accumulator once per
model: about three times that traffic once the accumulator (``P`` floats) no longer fits in
the last-level cache; on a CPU whose cache holds it, both run at the same speed
(``simulations/bench_aggregation.py``). Both give the same numbers: the same operations per
element, in the same order.

Integer entries, such as BatchNorm's ``num_batches_tracked``, are never averaged as floats:
they take the maximum over models, which is the count of the model that trained longest.

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


# Elements per block of the fused average. The block's accumulator must stay in cache while
# the K models' parts stream past it; within that, longer is better: every block restarts K
# memory streams, and short ones (64K elements) ran slower here than the unblocked reference.
# A multiple of 64, so blocks cut inside a tensor keep the vector kernels' alignment and the
# tensor's own tail elements (hence identical rounding).
_BLOCK_ELEMENTS = 2**20


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
        New tensors; the inputs are not modified. Floating-point entries keep their dtype
        (and are summed in it); integer entries take the elementwise maximum.

    Raises
    ------
    ValueError
        If there are no models, the weights are malformed, or an entry's shape differs
        between models.
    """
    return fused_weighted_average(state_dicts, weights)


def _blocks(sizes: Sequence[int], block: int) -> list[list[tuple[int, int, int]]]:
    """Cut tensors of ``sizes`` elements into blocks of about ``block`` elements.

    A block is a list of ``(tensor, start, stop)`` pieces; ``start == -1`` marks a whole
    tensor (used as it is, no view needed). Small tensors are packed whole into a block;
    a tensor larger than ``block`` is cut into pieces of ``block`` elements.
    """
    blocks: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    filled = 0
    for i, size in enumerate(sizes):
        if size <= block:
            if filled + size > block and current:
                blocks.append(current)
                current, filled = [], 0
            current.append((i, -1, size))
            filled += size
            continue
        for start in range(0, size, block):
            stop = min(start + block, size)
            if filled + stop - start > block and current:
                blocks.append(current)
                current, filled = [], 0
            current.append((i, start, stop))
            filled += stop - start
    if current:
        blocks.append(current)
    return blocks


def _blocked_sum(state_dicts: Sequence[StateDict], float_names: list[str],
                 coefficients: list[float], plan: list[list[tuple[int, int, int]]]
                 ) -> list[torch.Tensor]:
    """``sum_k c_k * state_dicts[k][n]`` for every name, block after block of ``plan``."""
    first = state_dicts[0]
    outputs: list[torch.Tensor | None] = [None] * len(float_names)
    # Tensors cut into pieces get their output allocated up front and are addressed through
    # flat views; whole tensors are used as they are (no views to build).
    cut = sorted({i for block in plan for i, start, _ in block if start >= 0})
    for i in cut:
        t = first[float_names[i]]
        outputs[i] = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    flat_out = {i: outputs[i].view(-1) for i in cut}
    flat_in = [{i: sd[float_names[i]].reshape(-1) for i in cut} for sd in state_dicts]
    whole_in = [[sd[n] for n in float_names] for sd in state_dicts]
    for block in plan:
        whole = [i for i, start, _ in block if start < 0]
        pieces = [(i, start, stop) for i, start, stop in block if start >= 0]
        # acc = c_0 * w_0: new tensors for whole entries, written in place for pieces.
        if whole:
            products = torch._foreach_mul([whole_in[0][i] for i in whole], coefficients[0])
            for i, tensor in zip(whole, products):
                outputs[i] = tensor
        for i, start, stop in pieces:
            torch.mul(flat_in[0][i][start:stop], coefficients[0], out=flat_out[i][start:stop])
        acc = [outputs[i] for i in whole] + [flat_out[i][start:stop] for i, start, stop in pieces]
        for k in range(1, len(state_dicts)):
            src = [whole_in[k][i] for i in whole] + [flat_in[k][i][start:stop]
                                                     for i, start, stop in pieces]
            torch._foreach_add_(acc, src, alpha=coefficients[k])
    return outputs  # type: ignore[return-value]


def fused_weighted_average(
    state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None, *,
    block_elements: int = _BLOCK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """:func:`weighted_average`, block by block: one pass over the models' memory.

    For each block of about ``block_elements`` elements the accumulator is set to
    ``c_0 * w_0`` and then ``c_k * w_k`` is added for ``k = 1..K-1``; per element these are
    the operations of :func:`reference_weighted_average`, in its order, so the results are
    identical. A state smaller than one block is a single block: exactly the reference. Unlike
    the reference, entries whose shapes differ between models are an error (an in-place add
    would broadcast them silently).

    Parameters
    ----------
    state_dicts, weights
        As :func:`weighted_average`.
    block_elements : int, optional
        Elements per block. The default (4 MiB of float32) stays in any recent CPU's last-level
        cache while being long enough for the hardware prefetcher to stream each model's part.
        With a multiple of 64 the results equal the reference bit for bit; other values may
        differ in the last bit (elements move between vectorised and scalar loops).

    Returns
    -------
    dict
        As :func:`weighted_average`.
    """
    coefficients = normalise_weights(weights, len(state_dicts))
    first = state_dicts[0]
    names = list(first)
    shapes = [first[n].shape for n in names]
    for k, sd in enumerate(state_dicts[1:], start=1):
        if [sd[n].shape for n in names] != shapes:
            n = next(n for n, shape in zip(names, shapes) if sd[n].shape != shape)
            raise ValueError(f"entry {n!r} has shape {tuple(sd[n].shape)} in model {k} "
                             f"but {tuple(first[n].shape)} in model 0")
    float_names = [n for n in names if torch.is_floating_point(first[n])]
    plan = _blocks([first[n].numel() for n in float_names], block_elements)
    if len(plan) > 1 or any(start >= 0 for block in plan for _, start, _ in block):
        with torch.no_grad():  # results are written through views: no autograd history
            outputs = _blocked_sum(state_dicts, float_names, coefficients, plan)
    else:
        # At most one block of whole tensors (a small model): the reference's own calls,
        # without the bookkeeping of pieces (and outside no_grad, which made these very calls
        # ~20% slower here).
        outputs = []
        if float_names:
            outputs = torch._foreach_mul([first[n] for n in float_names], coefficients[0])
            for sd, c in zip(state_dicts[1:], coefficients[1:]):
                torch._foreach_add_(outputs, [sd[n] for n in float_names], alpha=c)
    result = dict(zip(float_names, outputs))
    for n in names:
        if n not in result:
            result[n] = torch.stack([sd[n] for sd in state_dicts]).amax(dim=0)
    return {n: result[n] for n in names}


def flat_weighted_average(rows: torch.Tensor | Sequence[torch.Tensor],
                          weights: Sequence[float] | None = None, *,
                          block_elements: int = _BLOCK_ELEMENTS) -> torch.Tensor:
    """Weighted mean of models held as flat 1-d buffers (rows of a ``K x P`` tensor, or a
    list of ``K`` tensors of ``P`` elements).

    The same operations per element, in the same order, as :func:`weighted_average` on the
    models' state dicts, so for float32 and float64 the result is the same bit for bit (their
    kernels round alike wherever an element falls in a vectorised loop; float16 does not, see
    ``tests/test_averaging.py``). What differs is the cost on small models: ``K`` kernel
    calls in all, where a state dict takes ``K`` per tensor, plus the Python that walks them.
    :func:`fedwa.flower.arrays.average_records` decodes clients' replies straight into such rows.

    Example
    -------
    >>> import torch
    >>> flat_weighted_average(torch.tensor([[0.0, 2.0], [4.0, 6.0]]), [1, 3])
    tensor([3., 5.])
    """
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 2:
            raise ValueError(f"flat_weighted_average takes a K x P tensor, got shape "
                             f"{tuple(rows.shape)}")
        rows = rows.unbind(0)
    coefficients = normalise_weights(weights, len(rows))
    size = rows[0].numel()
    if any(row.dim() != 1 or row.numel() != size for row in rows):
        raise ValueError("flat_weighted_average takes 1-d rows of one length")
    if size <= block_elements:
        total = torch.mul(rows[0], coefficients[0])
        for row, c in zip(rows[1:], coefficients[1:]):
            total.add_(row, alpha=c)
        return total
    models = [{"flat": row} for row in rows]
    with torch.no_grad():
        (total,) = _blocked_sum(models, ["flat"], coefficients, _blocks([size], block_elements))
    return total


def reference_weighted_average(
    state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """:func:`weighted_average` in the straightforward order, the definition tests check.

    ``acc = c_0 * w_0`` over all tensors, then ``acc += c_k * w_k`` model by model (fused
    ``_foreach`` kernels across tensors): the accumulator is read and written once per model.

    Parameters
    ----------
    state_dicts, weights
        As :func:`weighted_average`.

    Returns
    -------
    dict
        As :func:`weighted_average`.
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
