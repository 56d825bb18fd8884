"""Partial model averaging: each synchronisation averages only one group of layers.

Following Lee, Sahu, He, Avestimehr ("Partial Model Averaging in Federated Learning:
Performance Guarantees and Benefits", arXiv 2201.03789), the model's parameters are split into
``tau`` disjoint groups ``G_0 .. G_(tau-1)`` and synchronisation step ``t`` averages only
``G_(t mod tau)``; the other groups keep drifting locally until their turn. Every entry is thus
averaged once every ``tau`` steps, while each step communicates about ``1/tau`` of the model.

Groups are made of whole layers. A layer is a module prefix (a state-dict name up to its last
dot), and all of its entries -- weight, bias and BatchNorm buffers ``running_mean``,
``running_var`` and ``num_batches_tracked`` -- always land in the same group, because a BN
layer's affine parameters and statistics only make sense together.

Example
-------
>>> import torch
>>> state = {"a.weight": torch.zeros(3), "a.bias": torch.zeros(1), "b.weight": torch.zeros(4)}
>>> partition_groups(state, 2)
[['a.weight', 'a.bias'], ['b.weight']]
>>> group_for_round(3, 2)
0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

RULES = ("balanced", "round-robin")


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
    state: Mapping[str, Tensor], tau: int, rule: str = "balanced"
) -> list[list[str]]:
    """Split the state's entries into ``tau`` disjoint groups of whole layers.

    Parameters
    ----------
    state : mapping from name to tensor
        A state dict; its order defines the layer order.
    tau : int
        Number of groups, ``1 <= tau <=`` number of layers (the period of partial averaging,
        arXiv 2201.03789).
    rule : {"balanced", "round-robin"}, optional
        ``"balanced"``: consecutive layers, cut where the groups' element counts are as equal as
        possible, meaning the sum of squared group sizes (equivalently their variance, since the
        total and ``tau`` are fixed) is minimal. Solved exactly by dynamic programming over the
        cut points rather than greedily: a greedy cut at ``total / tau`` can leave the last
        group far off when one layer is large. ``"round-robin"``: layer ``i`` goes to group
        ``i mod tau``.

    Returns
    -------
    list of list of str
        ``tau`` non-empty groups of entry names, each in state-dict order; every entry is in
        exactly one group and every layer's entries are in the same group.

    Raises
    ------
    ValueError
        If ``rule`` is unknown, ``tau < 1`` or ``tau`` exceeds the number of layers.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    layers = layers_of(state)
    if tau < 1 or tau > len(layers):
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
    """The entries ``names`` of ``state``, in the order of ``names``.

    The tensors are the state's own (no copy): selecting is for sending or averaging, which do
    not write into them. Raises ``KeyError`` for a name not in ``state``.
    """
    return {n: state[n] for n in names}


def merge(base: Mapping[str, Tensor], update: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``base`` with the entries of ``update`` replaced, as a new dict.

    Parameters
    ----------
    base : mapping from name to tensor
        The full state; its key order is kept. Neither it nor its tensors are modified.
    update : mapping from name to tensor
        New values of some of ``base``'s entries (e.g. one averaged group).

    Returns
    -------
    dict
        Replaced entries are fresh copies of ``update``'s tensors, cast to the dtype and device
        of the entry they replace (so writing into the result never touches ``update``); the
        other entries are ``base``'s own tensors.

    Raises
    ------
    KeyError
        If ``update`` names an entry that ``base`` lacks (a partial update must not grow the
        model).
    ValueError
        If a replacement's shape differs from the entry it replaces.
    """
    unknown = [n for n in update if n not in base]
    if unknown:
        raise KeyError(f"update has entries not in the base state: {unknown}")
    merged = dict(base)
    for name, value in update.items():
        old = base[name]
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(
                f"entry {name!r}: update has shape {tuple(value.shape)}, base {tuple(old.shape)}"
            )
        merged[name] = value.detach().to(device=old.device, dtype=old.dtype, copy=True)
    return merged


def group_bytes(state: Mapping[str, Tensor], names: Sequence[str]) -> int:
    """Bytes of the entries ``names``: ``sum(numel * element_size)``, the payload of one group."""
    return sum(state[n].numel() * state[n].element_size() for n in names)

