"""Partial model averaging: each synchronisation averages only one group of the parameters.

Following Lee, Sahu, He, Avestimehr ("Partial Model Averaging in Federated Learning:
Performance Guarantees and Benefits", arXiv 2201.03789), the model's parameters are split into
``tau`` disjoint groups ``G_0 .. G_(tau-1)`` and synchronisation step ``t`` averages only
``G_(t mod tau)``; the other groups keep drifting locally until their turn. Every entry is thus
averaged once every ``tau`` steps, while each step communicates about ``1/tau`` of the model.

Three rules make the groups (:data:`RULES`):

- ``"equal"`` (the default): groups of equal bytes. The model is read as one sequence of
  indivisible *units* in state-dict order and cut into ``tau`` consecutive runs, each cut at
  the unit boundary nearest to ``k/tau`` of the model's bytes. A tensor of two or more
  dimensions (a conv or linear weight) is one unit per output row (``tensor[i]``, dim 0), so a
  large tensor may be shared by two or more groups; a 1-D or 0-D tensor (a bias) is one unit,
  and so is a whole BatchNorm layer (weight, bias, running statistics and counter together).
  A group therefore differs from ``total / tau`` by less than one unit: see
  :func:`largest_unit_bytes`.
- ``"balanced"``: whole layers, consecutive, with the most equal element counts.
- ``"round-robin"``: whole layers, layer ``i`` in group ``i mod tau``.

A layer is a module prefix (a state-dict name up to its last dot). With the two layer rules
all of a layer's entries land in the same group.

A group is a list of *piece names*. A piece is a whole entry, under its own name
(``"fc1.bias"``), or the rows ``a`` to ``b - 1`` of one, named ``"<entry>[a:b]"``
(``"fc1.weight[0:21]"`` is ``state["fc1.weight"][0:21]``). A tensor lying entirely in one
group is always named whole. The same names key the arrays of Flower's ``ArrayRecord``: a
piece travels as its own array of shape ``(b - a, *shape[1:])``. :func:`select` cuts pieces
out of a state, :func:`merge` writes them back, so whoever receives a group replaces exactly
those rows and keeps the rest.

Example
-------
>>> import torch
>>> state = {"a.weight": torch.zeros(4, 2), "a.bias": torch.zeros(2)}
>>> partition_groups(state, 2)
[['a.weight[0:2]'], ['a.weight[2:4]', 'a.bias']]
>>> partition_groups(state, 1)
[['a.weight', 'a.bias']]
>>> group_for_round(3, 2)
0
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

RULES = ("equal", "balanced", "round-robin")

#: Entries that mark a BatchNorm layer; such a layer is kept whole by every rule.
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

_PIECE = re.compile(r"^(?P<entry>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def piece_name(entry: str, start: int, stop: int) -> str:
    """The name of rows ``start`` to ``stop - 1`` (dim 0) of ``entry``: ``"entry[start:stop]"``."""
    return f"{entry}[{start}:{stop}]"


def parse_piece(name: str, state: Mapping[str, Tensor]) -> tuple[str, slice | None]:
    """``(entry, rows)`` of a piece name; ``rows`` is ``None`` for a whole entry.

    A name that is itself an entry of ``state`` is whole, even if it looks like a piece.

    Raises
    ------
    KeyError
        If the entry is not in ``state``.
    ValueError
        If the rows are empty or out of the entry's range, or the entry has no dim 0.
    """
    if name in state:
        return name, None
    match = _PIECE.match(name)
    if match is None or match["entry"] not in state:
        raise KeyError(f"{name!r} names no entry of the state")
    entry, start, stop = match["entry"], int(match["start"]), int(match["stop"])
    tensor = state[entry]
    if tensor.dim() == 0 or not 0 <= start < stop <= tensor.shape[0]:
        raise ValueError(f"piece {name!r}: rows {start}:{stop} are not within entry {entry!r} "
                         f"of shape {tuple(tensor.shape)}")
    return entry, slice(start, stop)


def layers_of(state: Mapping[str, Tensor]) -> list[tuple[str, list[str]]]:
    """Group state-dict entries by layer.

    Parameters
    ----------
    state : mapping from name to tensor
        A state dict.

    Returns
    -------
    list of (str, list of str)
        ``(prefix, entry names)`` per layer, layers in order of first appearance and entries in
        state-dict order. The prefix is the name up to its last dot (``"layer1.0.bn1"`` for
        ``"layer1.0.bn1.running_var"``), ``""`` for a name without a dot.
    """
    layers: dict[str, list[str]] = {}
    for name in state:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    return list(layers.items())


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def units_of(state: Mapping[str, Tensor]) -> list[tuple[list[str], int, int]]:
    """The model as runs of indivisible units, in state-dict order, for the ``"equal"`` rule.

    Returns
    -------
    list of (entry names, rows, bytes per unit)
        A run of ``rows`` units of ``bytes per unit`` each. A tensor of two or more dimensions
        (and at least one element) outside a BatchNorm layer is a run of one unit per row; a
        BatchNorm layer (all entries of a layer holding any of :data:`BN_BUFFERS`) or any
        other tensor is a single unit (``rows = 1``).
    """
    bn_layers = {prefix for prefix, entries in layers_of(state)
                 if any(n.rpartition(".")[2] in BN_BUFFERS for n in entries)}
    runs: list[tuple[list[str], int, int]] = []
    seen_bn: set[str] = set()
    for prefix, entries in layers_of(state):
        if prefix in bn_layers:
            if prefix not in seen_bn:
                seen_bn.add(prefix)
                runs.append((list(entries), 1, sum(_nbytes(state[n]) for n in entries)))
            continue
        for name in entries:
            tensor = state[name]
            if tensor.dim() >= 2 and tensor.numel() > 0:
                runs.append(([name], tensor.shape[0], _nbytes(tensor) // tensor.shape[0]))
            else:
                runs.append(([name], 1, _nbytes(tensor)))
    return runs


def largest_unit_bytes(state: Mapping[str, Tensor]) -> int:
    """The bytes of the largest indivisible unit of the ``"equal"`` rule.

    Each cut lies within half a unit of its target, so an ``"equal"`` group's raw bytes
    differ from ``total / tau`` by less than this (for ``tau`` not above the number of units
    and units small against ``total / tau``). It is the fixed overhead of equal grouping: one
    row of a split weight, or one tensor kept whole (a bias, a BatchNorm layer's five entries).
    """
    return max((size for _, _, size in units_of(state)), default=0)


def _equal_groups(state: Mapping[str, Tensor], tau: int) -> list[list[str]]:
    runs = units_of(state)
    count = sum(rows for _, rows, _ in runs)
    if tau > count:
        raise ValueError(f"tau = {tau} groups need 1 <= tau <= the number of units ({count})")
    sizes = np.repeat(np.array([size for _, _, size in runs], dtype=np.int64),
                      [rows for _, rows, _ in runs])
    ends = np.concatenate(([0], np.cumsum(sizes)))  # ends[j]: bytes of the first j units
    total = int(ends[-1])
    cuts = [0]
    for k in range(1, tau):
        # The boundary nearest to k/tau of the bytes (ties: the earlier one), kept strictly
        # after the previous cut and early enough to leave one unit per group still to come.
        j = int(np.searchsorted(ends, total * k / tau))
        if j > 0 and (j > count or total * k / tau - ends[j - 1] <= ends[j] - total * k / tau):
            j -= 1
        cuts.append(min(max(j, cuts[-1] + 1), count - (tau - k)))
    cuts.append(count)
    groups: list[list[str]] = [[] for _ in range(tau)]
    start = 0  # index of the run's first unit
    for entries, rows, _ in runs:
        for g in range(tau):
            a, b = max(cuts[g] - start, 0), min(cuts[g + 1] - start, rows)
            if a >= b:
                continue
            if a == 0 and b == rows:  # the whole run: its entries under their own names
                groups[g].extend(entries)
            else:
                groups[g].append(piece_name(entries[0], a, b))
        start += rows
    return groups


def _balanced_cuts(sizes: Sequence[int], tau: int) -> list[int]:
    """Start indices of ``tau`` consecutive non-empty blocks minimising sum(block size^2).

    Exact dynamic programme over cut points, O(tau * L^2) for L layers: ``best[k][j]`` is the
    least cost of splitting the first ``j`` layers into ``k`` blocks. Integer costs make the
    comparisons exact; on ties the earliest cut is kept, so the result is deterministic.
    """
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(tau + 1)]
    back = [[0] * (n + 1) for _ in range(tau + 1)]
    best[0][0] = 0
    for k in range(1, tau + 1):
        # The first j layers into k non-empty blocks needs j >= k, and leaves tau - k blocks
        # for the remaining n - j layers, so j <= n - (tau - k).
        for j in range(k, n - (tau - k) + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (prefix[j] - prefix[i]) ** 2
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    starts, j = [], n
    for k in range(tau, 0, -1):
        j = back[k][j]
        starts.append(j)
    return starts[::-1]


def partition_groups(
    state: Mapping[str, Tensor], tau: int, rule: str = "equal"
) -> list[list[str]]:
    """Split the state's parameters into ``tau`` disjoint groups.

    Parameters
    ----------
    state : mapping from name to tensor
        A state dict; its order defines the layer order.
    tau : int
        Number of groups (the period of partial averaging, arXiv 2201.03789): at least 1, and
        at most the number of units (``"equal"``, see :func:`units_of`) or of layers (the
        other rules).
    rule : {"equal", "balanced", "round-robin"}, optional
        ``"equal"``: consecutive units (weight rows, whole small tensors, whole BatchNorm
        layers), cut at the unit boundary nearest to each ``k/tau`` of the model's bytes, so
        each group holds ``1/tau`` of the bytes to within one unit. ``"balanced"``: consecutive
        whole layers, cut where the groups' element counts are as equal as possible, meaning
        the sum of squared group sizes is minimal (exact dynamic programme over the cut
        points). ``"round-robin"``: layer ``i`` goes to group ``i mod tau``.

    Returns
    -------
    list of list of str
        ``tau`` non-empty groups of piece names (see the module docstring), each in
        state-dict order; every element of every entry is in exactly one group. With the layer
        rules every name is a whole entry and every layer's entries share one group.

    Raises
    ------
    ValueError
        If ``rule`` is unknown or ``tau`` is out of range.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if tau < 1:
        raise ValueError(f"tau = {tau} groups: need tau >= 1")
    if rule == "equal":
        return _equal_groups(state, tau)
    layers = layers_of(state)
    if tau > len(layers):
        raise ValueError(
            f"tau = {tau} groups need 1 <= tau <= the number of layers ({len(layers)})"
        )
    if rule == "round-robin":
        groups: list[list[str]] = [[] for _ in range(tau)]
        for i, (_, entries) in enumerate(layers):
            groups[i % tau].extend(entries)
        return groups
    sizes = [sum(state[n].numel() for n in entries) for _, entries in layers]
    starts = _balanced_cuts(sizes, tau) + [len(layers)]
    return [
        [n for _, entries in layers[a:b] for n in entries] for a, b in zip(starts, starts[1:])
    ]


def group_for_round(server_round: int, tau: int) -> int:
    """Index of the group averaged in a server round: ``(server_round - 1) mod tau``.

    Flower numbers server rounds from 1, so round 1 averages group 0, round 2 group 1, and
    round ``tau + 1`` group 0 again (step ``t = server_round - 1`` of arXiv 2201.03789).

    Raises
    ------
    ValueError
        If ``server_round < 1`` or ``tau < 1``.
    """
    if server_round < 1 or tau < 1:
        raise ValueError(f"need server_round >= 1 and tau >= 1, got {server_round} and {tau}")
    return (server_round - 1) % tau


def select(state: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """The pieces ``names`` of ``state``, in the order of ``names``.

    A whole entry is the state's own tensor, a piece ``"entry[a:b]"`` a view of its rows
    ``a:b`` (no copy either way): selecting is for sending or averaging, which do not write
    into them. Raises ``KeyError`` for a name whose entry is not in ``state`` and
    ``ValueError`` for rows out of range.
    """
    out = {}
    for name in names:
        entry, rows = parse_piece(name, state)
        out[name] = state[entry] if rows is None else state[entry][rows]
    return out


def merge(base: Mapping[str, Tensor], update: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``base`` with the pieces of ``update`` written in, as a new dict.

    Parameters
    ----------
    base : mapping from name to tensor
        The full state; its key order is kept. Neither it nor its tensors are modified.
    update : mapping from piece name to tensor
        New values of some of ``base``'s entries or of rows of them (e.g. one averaged group),
        named as :func:`select` names them.

    Returns
    -------
    dict
        A replaced entry is a fresh copy of ``update``'s tensor; an entry with replaced rows is
        a copy of ``base``'s with those rows overwritten. Either way cast to the dtype and
        device of the entry (so writing into the result never touches ``base`` or
        ``update``). The other entries are ``base``'s own tensors.

    Raises
    ------
    KeyError
        If ``update`` names an entry that ``base`` lacks (a partial update must not grow the
        model).
    ValueError
        If a replacement's shape differs from the entry or rows it replaces, or a piece's
        rows are out of range.
    """
    unknown = []
    targets = []
    for name in update:
        try:
            targets.append((name, *parse_piece(name, base)))
        except KeyError:
            unknown.append(name)
    if unknown:
        raise KeyError(f"update has entries not in the base state: {unknown}")
    merged = dict(base)
    copied: set[str] = set()
    for name, entry, rows in targets:
        value, old = update[name], base[entry]
        want = tuple(old.shape) if rows is None else (rows.stop - rows.start, *old.shape[1:])
        if tuple(value.shape) != want:
            raise ValueError(f"entry {name!r}: update has shape {tuple(value.shape)}, "
                             f"base {want}")
        if rows is None:
            merged[entry] = value.detach().to(device=old.device, dtype=old.dtype, copy=True)
            copied.add(entry)
            continue
        if entry not in copied:
            merged[entry] = old.clone()
            copied.add(entry)
        merged[entry][rows] = value.detach().to(device=old.device, dtype=old.dtype)
    return merged


def group_bytes(state: Mapping[str, Tensor], names: Sequence[str]) -> int:
    """Raw bytes of the pieces ``names``: ``sum(numel * element_size)``, one group's payload
    before serialisation (Flower adds a ``.npy`` header of 128 bytes to each array)."""
    return sum(_nbytes(t) for t in select(state, names).values())
