"""Splitting a labelled pool of examples over federated clients."""

from __future__ import annotations

import math
import numbers

import numpy as np

from fedwa.common.errors import ConfigError

PARTITION_NAMES = ("iid", "dirichlet", "shards", "replicas", "classes")
DIRICHLET_MAX_DRAWS = 100
#: Most bytes the ``replicas`` partition may spend on its per-client orders (int64 positions,
#: one full copy per client): the orders are built up front, in every process that needs the
#: data, so an unbounded num-clients would take memory without bound before the first round.
REPLICA_BYTES_MAX = 2**30


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), num_clients)


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, min_size: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(DIRICHLET_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(num_clients, alpha))
            if not np.all(np.isfinite(share)):  # tiny alphas can underflow to 0/0
                break
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
        else:
            clients = [np.concatenate(p) for p in parts]
            if min(len(c) for c in clients) >= min_size:
                return clients
    raise ConfigError(
        "dirichlet-alpha", alpha,
        f"a number > 0; use a larger alpha or fewer clients: with this alpha some client got "
        f"fewer than {min_size} examples in {DIRICHLET_MAX_DRAWS} draws "
        f"({num_clients} clients, {len(labels)} examples)")


def _shards(labels: np.ndarray, num_clients: int, per_client: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    # Shuffling before the stable sort randomises which examples of a class end
    # up in which shard, while keeping shards label-contiguous.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_clients * per_client)
    order = rng.permutation(len(shards))
    return [np.concatenate([shards[s] for s in order[k * per_client:(k + 1) * per_client]])
            for k in range(num_clients)]


def partition_indices(labels: np.ndarray, num_clients: int, scheme: str, seed: int, *,
                      dirichlet_alpha: float = 0.5, shards_per_client: int = 2,
                      min_size: int | None = None) -> list[np.ndarray]:
    """Split the positions of `labels` over clients.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels of the pool, shape ``[N]``.
    num_clients : int
        Number of clients, at least 1 and at most ``N``; for ``replicas`` also at most
        what keeps all clients' orders (``8 * N`` bytes each) within
        :data:`REPLICA_BYTES_MAX`.
    scheme : {"iid", "dirichlet", "shards", "replicas", "classes"}
        ``iid``: a seeded shuffle cut into sizes that differ by at most 1.
        ``dirichlet``: each class is split by proportions drawn from
        ``Dir(alpha * 1)``; redrawn until every client has `min_size` examples.
        ``shards`` (McMahan et al. 2017): examples sorted by label are cut into
        ``num_clients * shards_per_client`` contiguous shards (sizes differ by
        at most 1) and each client gets `shards_per_client` random shards.
        ``replicas``: every client holds all examples, each in its own seeded
        order (the setting of IMWA: same data, different order).
        ``classes``: class-disjoint, class ``c`` goes whole to client ``c mod num_clients``
        (DIMAT's non-IID setting); needs at least as many classes present as clients.
    seed : int
        Seed of ``numpy.random.default_rng``; the same inputs give the same output.
    dirichlet_alpha : float
        Concentration for ``dirichlet``; smaller is more skewed. Must be > 0.
    shards_per_client : int
        Shards per client for ``shards``; at least 1.
    min_size : int or None
        Minimum examples per client for ``dirichlet``; default
        ``min(10, N // num_clients)``.

    Returns
    -------
    list of numpy.ndarray
        One int64 array of positions into `labels` per client. Every position is
        in exactly one client, except for ``replicas``. Positions are sorted for
        all schemes but ``replicas``, whose order is the point.

    Raises
    ------
    ConfigError
        Keys ``partition``, ``num-clients``, ``dirichlet-alpha`` or
        ``shards-per-client`` for values that are invalid or cannot be met.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if scheme not in PARTITION_NAMES:
        raise ConfigError("partition", scheme, f"one of {', '.join(PARTITION_NAMES)}")
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError("num-clients", num_clients, "an integer >= 1")
    if scheme != "replicas" and num_clients > n:
        raise ConfigError("num-clients", num_clients, f"at most {n} (the number of training examples)")
    if scheme == "replicas":
        # Every client holds all n examples, so data is never short; the bound is memory, as
        # the orders are made here for every client at once: no more clients than examples
        # (as the other schemes) and all clients' orders within REPLICA_BYTES_MAX.
        limit = max(1, min(n, REPLICA_BYTES_MAX // (8 * max(n, 1))))
        if num_clients > limit:
            raise ConfigError("num-clients", num_clients, f"at most {limit} with partition = "
                              f"replicas: each client keeps its own order of all {n} training "
                              f"examples (8 bytes each), and fedwa allows at most as many "
                              f"clients as examples and {REPLICA_BYTES_MAX >> 20} MiB of "
                              "such orders")
    rng = np.random.default_rng(seed)

    if scheme == "replicas":
        return [rng.permutation(n).astype(np.int64) for _ in range(num_clients)]
    if scheme == "classes":
        present = np.unique(labels)
        if num_clients > len(present):
            raise ConfigError("num-clients", num_clients, f"at most {len(present)} with the "
                              f"classes partition (one class or more per client)")
        return [np.flatnonzero(np.isin(labels, present[present % num_clients == k]))
                .astype(np.int64) for k in range(num_clients)]
    if scheme == "iid":
        clients = _iid(n, num_clients, rng)
    elif scheme == "dirichlet":
        if not (isinstance(dirichlet_alpha, numbers.Real) and math.isfinite(dirichlet_alpha)
                and dirichlet_alpha > 0):
            raise ConfigError("dirichlet-alpha", dirichlet_alpha, "a number > 0")
        if min_size is None:
            min_size = min(10, n // num_clients)
        clients = _dirichlet(labels, num_clients, float(dirichlet_alpha), min_size, rng)
    else:
        if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1:
            raise ConfigError("shards-per-client", shards_per_client, "an integer >= 1")
        if num_clients * shards_per_client > n:
            raise ConfigError("shards-per-client", shards_per_client,
                              f"at most {n // num_clients} so that {num_clients} clients x shards "
                              f"fit in {n} examples")
        clients = _shards(labels, num_clients, int(shards_per_client), rng)
    return [np.sort(c).astype(np.int64) for c in clients]
