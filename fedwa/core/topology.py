"""Communication graphs and mixing matrices for the decentralized (DIMAT-style) mode.

In DIMAT (Saadati et al., CVPR 2024, "DIMAT: Decentralized Iterative Merging-And-Training
for Deep Learning Models") every agent merges its own model with its neighbours' models,
weighted by one row of a mixing matrix ``W`` defined over a fixed communication graph. This
module builds those graphs (:func:`neighbours`) and matrices (:func:`mixing_matrix`) and checks
them (:func:`check_mixing`, :func:`is_connected`). It is pure math: no torch, no Flower.

Every matrix built here is symmetric, nonnegative and doubly stochastic (rows and columns sum
to 1), so repeated mixing preserves the average of the agents' models and, on a connected
graph, drives them towards it (gossip averaging).

Config names used in errors: ``topology``, ``mixing-rule``, ``num-clients`` (the number of
nodes) and ``erdos-renyi-p``.

Example
-------
>>> neighbours("ring", 5)[0]
[1, 4]
>>> mixing_matrix(neighbours("ring", 3), "uniform")[0].tolist()  # doctest: +ELLIPSIS
[0.333..., 0.333..., 0.333...]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedwa.common.errors import ConfigError

TOPOLOGIES = ("full", "ring", "torus", "star", "erdos-renyi", "exponential")
MIXING_RULES = ("uniform", "metropolis")


def neighbours(topology: str, n: int, *, p: float = 0.3, seed: int = 0) -> list[list[int]]:
    """Neighbour lists of an undirected communication graph on nodes ``0 .. n-1``.

    Parameters
    ----------
    topology : str
        One of :data:`TOPOLOGIES`:

        ``full``
            Every node is linked to every other node.
        ``ring``
            Node ``i`` is linked to ``i - 1`` and ``i + 1`` (mod ``n``); with ``n = 2`` the two
            nodes are linked once, with ``n = 1`` there are no edges.
        ``torus``
            A ``rows x cols`` grid with wrap-around in both directions, where ``rows`` is the
            largest divisor of ``n`` with ``rows <= sqrt(n)`` (the most square factorisation,
            ``rows <= cols``). Node ``r * cols + c`` is linked to the nodes up, down, left and
            right of it; coinciding neighbours count once. Small grids degrade: a prime ``n``
            gives ``1 x n``, which is the ring; a side of length 2 gives one neighbour along
            that side instead of two (``2 x 2`` is a 4-cycle).
        ``star``
            Node 0 is the hub, linked to every other node; no other edges.
        ``erdos-renyi``
            Each of the ``n (n - 1) / 2`` possible edges is present with probability ``p``,
            drawn from ``numpy.random.default_rng(seed)``. The graph is then made connected
            deterministically: its connected components are ordered by their smallest node,
            and for each consecutive pair of components the two smallest nodes are linked.
            So the result is always connected, and the same ``(n, p, seed)`` give the same
            graph.
        ``exponential``
            Node ``i`` is linked to ``i + 2**k`` and ``i - 2**k`` (mod ``n``) for every ``k``
            with ``2**k < n`` (the static exponential graph of decentralized SGD).
    n : int
        Number of nodes, >= 1.
    p : float, optional
        Edge probability of ``erdos-renyi``, in ``(0, 1]``; ignored (and not checked) by the
        other topologies.
    seed : int, optional
        Seed of ``erdos-renyi``; ignored by the other topologies.

    Returns
    -------
    list of list of int
        ``result[i]`` is the sorted list of the neighbours of node ``i``, never ``i`` itself.
        The relation is symmetric: ``j in result[i]`` iff ``i in result[j]``.

    Raises
    ------
    ConfigError
        If ``topology`` is unknown, ``n < 1``, or ``p`` is outside ``(0, 1]`` for
        ``erdos-renyi``.

    Examples
    --------
    >>> neighbours("exponential", 8)[0]
    [1, 2, 4, 6, 7]
    >>> neighbours("torus", 6)[0]  # a 2 x 3 torus
    [1, 2, 3]
    """
    if topology not in TOPOLOGIES:
        raise ConfigError("topology", topology, "one of " + ", ".join(TOPOLOGIES))
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError("num-clients", n, "an integer >= 1")
    n = int(n)
    sets: list[set[int]] = [set() for _ in range(n)]

    def link(i: int, j: int) -> None:
        if i != j:
            sets[i].add(j)
            sets[j].add(i)

    if topology == "full":
        for i in range(n):
            for j in range(i + 1, n):
                link(i, j)
    elif topology == "ring":
        for i in range(n):
            link(i, (i + 1) % n)
    elif topology == "torus":
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
        cols = n // rows
        for r in range(rows):
            for c in range(cols):
                # Linking to the right and downward neighbours suffices: symmetry adds the rest.
                link(r * cols + c, r * cols + (c + 1) % cols)
                link(r * cols + c, ((r + 1) % rows) * cols + c)
    elif topology == "star":
        for j in range(1, n):
            link(0, j)
    elif topology == "exponential":
        step = 1
        while step < n:
            for i in range(n):
                link(i, (i + step) % n)
            step *= 2
    else:  # erdos-renyi
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ConfigError("erdos-renyi-p", p, "a number in (0, 1]")
        draws = np.random.default_rng(seed).random((n, n))
        for i, j in zip(*np.nonzero(np.triu(draws < p, k=1))):
            link(int(i), int(j))
        components = _components([sorted(s) for s in sets])
        for a, b in zip(components, components[1:]):
            link(a[0], b[0])
    return [sorted(s) for s in sets]


def _components(neighbour_lists: Sequence[Sequence[int]]) -> list[list[int]]:
    """Connected components, each sorted, ordered by their smallest node."""
    seen = [False] * len(neighbour_lists)
    out = []
    for start in range(len(neighbour_lists)):
        if seen[start]:
            continue
        seen[start] = True
        stack, comp = [start], []
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in neighbour_lists[i]:
                if not seen[j]:
                    seen[j] = True
                    stack.append(j)
        out.append(sorted(comp))
    return out


def _check_neighbour_lists(neighbour_lists: Sequence[Sequence[int]]) -> None:
    n = len(neighbour_lists)
    for i, nbrs in enumerate(neighbour_lists):
        for j in nbrs:
            if not 0 <= j < n:
                raise ValueError(f"node {i} has neighbour {j}, outside 0..{n - 1}")
            if j == i:
                raise ValueError(f"node {i} lists itself as a neighbour")
            if i not in neighbour_lists[j]:
                raise ValueError(f"graph is not undirected: {j} is a neighbour of {i}, not back")
        if len(set(nbrs)) != len(nbrs):
            raise ValueError(f"node {i} lists a neighbour twice: {list(nbrs)}")


def is_connected(neighbour_lists: Sequence[Sequence[int]]) -> bool:
    """Whether an undirected graph given by neighbour lists is connected.

    Parameters
    ----------
    neighbour_lists : sequence of sequence of int
        ``neighbour_lists[i]`` are the neighbours of node ``i``.

    Returns
    -------
    bool
        True if every node can reach every other node; a single node is connected, and so,
        vacuously, is the empty graph.
    """
    return len(_components(neighbour_lists)) <= 1


def is_complete(neighbour_lists: Sequence[Sequence[int]]) -> bool:
    """Whether every node is linked to every other node (a complete graph).

    Not only ``topology = "full"``: a ring of 3, any graph on 2 nodes and ``erdos-renyi``
    with ``p = 1`` are complete too. On a complete graph both mixing rules give every entry
    ``1/n``, so every node's row of the mixing matrix is the same.

    Parameters
    ----------
    neighbour_lists : sequence of sequence of int
        ``neighbour_lists[i]`` are the neighbours of node ``i`` (never ``i`` itself).

    Returns
    -------
    bool
        True when ``neighbour_lists[i]`` holds the ``n - 1`` other nodes for every ``i``; a
        single node is complete.

    Examples
    --------
    >>> is_complete(neighbours("ring", 3)), is_complete(neighbours("ring", 4))
    (True, False)
    """
    n = len(neighbour_lists)
    return all(sorted(nbrs) == [j for j in range(n) if j != i]
               for i, nbrs in enumerate(neighbour_lists))


def mixing_matrix(neighbour_lists: Sequence[Sequence[int]], rule: str) -> np.ndarray:
    """Symmetric, doubly stochastic mixing matrix over a graph.

    Parameters
    ----------
    neighbour_lists : sequence of sequence of int
        An undirected graph without self-loops, as returned by :func:`neighbours`.
    rule : str
        One of :data:`MIXING_RULES`; ``d_i`` is the degree of node ``i`` and ``d_max`` the
        largest degree:

        ``uniform``
            ``W_ij = 1 / (d_max + 1)`` on every edge, ``W_ii = 1 - d_i / (d_max + 1)``. On a
            regular graph (full, ring, torus, exponential) that is ``1 / (d + 1)`` on the node
            itself and on each neighbour: DIMAT's "ring: 1/3 self + 2 neighbours" and "fully
            connected: 1/N". The plain row rule ``1 / (d_i + 1)`` is not symmetric, hence not
            doubly stochastic, on irregular graphs (star, Erdos-Renyi); with the shared edge
            weight ``1 / (d_max + 1)`` it is, and low-degree nodes keep the remainder
            themselves.
        ``metropolis``
            Metropolis-Hastings weights: ``W_ij = 1 / (1 + max(d_i, d_j))`` on every edge,
            ``W_ii = 1 - sum_{j != i} W_ij``.

    Returns
    -------
    numpy.ndarray
        ``float64`` array of shape ``(n, n)``; zero wherever there is no edge.

    Raises
    ------
    ConfigError
        If ``rule`` is unknown.
    ValueError
        If the neighbour lists are not an undirected graph without self-loops.

    Examples
    --------
    >>> mixing_matrix(neighbours("star", 3), "metropolis").tolist()  # doctest: +ELLIPSIS
    [[0.333..., 0.333..., 0.333...], [0.333..., 0.666..., 0.0], [0.333..., 0.0, 0.666...]]
    """
    if rule not in MIXING_RULES:
        raise ConfigError("mixing-rule", rule, "one of " + ", ".join(MIXING_RULES))
    _check_neighbour_lists(neighbour_lists)
    n = len(neighbour_lists)
    degree = [len(nbrs) for nbrs in neighbour_lists]
    d_max = max(degree, default=0)
    w = np.zeros((n, n), dtype=np.float64)
    for i, nbrs in enumerate(neighbour_lists):
        for j in nbrs:
            if rule == "uniform":
                w[i, j] = 1.0 / (d_max + 1)
            else:
                w[i, j] = 1.0 / (1 + max(degree[i], degree[j]))
    # Edge weights are symmetric by construction, so once the diagonal makes rows sum to 1
    # the columns do too.
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def check_mixing(w: np.ndarray, *, atol: float = 1e-10) -> None:
    """Check that ``w`` is a valid mixing matrix.

    Parameters
    ----------
    w : numpy.ndarray
        Candidate matrix.
    atol : float, optional
        Absolute tolerance of the symmetry and sum checks.

    Raises
    ------
    ValueError
        Naming the first property that fails, checked in this order: square 2-D shape, finite
        entries, nonnegative entries, rows summing to 1, columns summing to 1, symmetry.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"mixing matrix must be square and 2-D, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("mixing matrix has non-finite entries")
    if np.any(w < -atol):
        raise ValueError(f"mixing matrix has negative entries (min {w.min():.3g})")
    rows, cols = w.sum(axis=1), w.sum(axis=0)
    if not np.allclose(rows, 1.0, rtol=0.0, atol=atol):
        raise ValueError(f"mixing matrix rows do not sum to 1: {rows.tolist()}")
    if not np.allclose(cols, 1.0, rtol=0.0, atol=atol):
        raise ValueError(f"mixing matrix columns do not sum to 1: {cols.tolist()}")
    # Checked last: a doubly stochastic matrix can still be asymmetric (a cyclic shift).
    if not np.allclose(w, w.T, rtol=0.0, atol=atol):
        raise ValueError("mixing matrix is not symmetric")
