"""Decentralized training over a topology: DIMAT and plain gossip.

Saadati, Pham, Sarkar et al., "DIMAT: Decentralized Iterative Merging-And-Training for Deep
Learning Models", CVPR 2024 (arXiv 2404.08079). Every node keeps its own model; there is no
global model. Optionally every node first trains on its own data for ``node-pretrain-epochs``
without merging (the authors merge models pre-trained on their partitions). Then each round
every node

1. recomputes the BatchNorm statistics of its own model and of each neighbour's model on the
   alignment data (``dimat-examples`` of them),
2. aligns each neighbour's hidden units to a basis by activation matching on that data
   (:func:`fedwa.core.alignment.align_to`; residual-joined units share one permutation),
3. merges its own and the aligned models with its row of the mixing matrix,
4. recomputes the merged model's BatchNorm statistics (``merge-bn-recompute``),
5. trains it for the round's local epochs or steps with a fresh optimiser (``optimizer``).

Gossip is the same round with steps 1-2 left out. The ServerApp only relays: each round it
sends every node its neighbours' latest models, one message per node (``train.merge``), and
keeps the models the nodes send back for the next round. It also evaluates every node's model
on the balanced test set, which is how the run's results are measured, not part of training.

The basis (``dimat-basis``)
---------------------------
``single`` (the default on a complete graph, as the authors' code runs it): on a complete
graph every row of the mixing matrix is ``1/N``, so all nodes would compute the same merge,
up to the alignment data. The authors compute it once, in agent 0's basis, and give it to
every agent, so the agents reach consensus after every merge. fedwa does the same in two
message exchanges: the round's merger (node ``(round - 1) mod N``; rotating, so that with
local alignment data no single node's skew decides every matching) receives every other
model, aligns them to its own, merges and recomputes BatchNorm, and sends the merged model
back without training; then every node receives that one merged model and trains it. Traffic
per round: N - 1 models to the merger and 1 back, then N models down and N up.

``own`` (the default on sparse graphs, as the authors' code runs it on rings and the like):
every node aligns its neighbours to its own model. Nodes that are not neighbours never align
to each other, so the nodes drift into unrelated bases and the plain average of all nodes
(``consensus_accuracy``) means little.

``anchor`` (an option for sparse graphs): every node aligns its own model *and* its
neighbours' to the round's anchor, node ``(round - 1) mod N``, whose model the relay sends to
every node (one extra model down for the nodes that are not its neighbours), and merges them
with its own mixing row (the anchor weighs 0 unless it is a neighbour). After one round every
node is in the anchor's basis, up to matching errors on different data; a later anchor is
itself in that basis, so its matchings are close to the identity and the shared basis
persists while training goes on. The previous round's consensus cannot serve as the basis:
the plain average of models in different bases is not a model of any of them (it sits near
chance). The anchor rotates so that every node pays the extra relay in turn and no node's
data decides every matching. Aligning the node's own model is a permutation, so it does not
change what the node computes.

The alignment data (``dimat-align-data``)
-----------------------------------------
``local`` (default): each node's own training data, the honest decentralized setting. ``proxy``:
the server validation split (``server-val-fraction`` > 0), held out from every node's
training data and shared by all nodes, as the authors' code aligns and recomputes BatchNorm
on the whole training set; every node draws the same ``dimat-examples`` from it per round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from fedwa.common.keys import Key, at_least
from fedwa.common.errors import ConfigError
from fedwa.core.topology import MIXING_RULES, TOPOLOGIES, is_complete, mixing_matrix, neighbours

BASES = ("auto", "own", "single", "anchor")
ALIGN_DATA = ("local", "proxy")


def _probability(value: float) -> str | None:
    return None if 0 < value <= 1 else "a probability in (0, 1]"


class DecentralizedStrategy:
    """Relay-and-merge over a topology; :class:`DIMAT` aligns neighbours, :class:`Gossip` not.

    Subclasses set :attr:`align`. The round itself runs in :mod:`fedwa.apps.decentralized` (server
    relay) and on the nodes (``train.merge`` in :mod:`fedwa.apps.client_app`).
    """

    decentralized: ClassVar[bool] = True
    #: Align neighbours to the node (DIMAT) before merging, or merge as they are (gossip).
    align: ClassVar[bool] = False

    config_keys: ClassVar[tuple[Key, ...]] = (
        Key("topology", "ring", "decentralized: who merges with whom.", choices=TOPOLOGIES),
        Key("topology-p", 0.3, "decentralized: edge probability of the erdos-renyi topology "
            "(seeded, made connected).", check=_probability),
        Key("mixing", "metropolis", "decentralized: mixing weights, uniform over neighbours "
            "plus self, or Metropolis-Hastings.", choices=MIXING_RULES),
        Key("node-init", "shared", "decentralized: every node starts from the run's "
            "initialisation, or from its own seed (as in the DIMAT paper).",
            choices=("shared", "independent")),
        Key("dimat-examples", 512, "decentralized: local examples each node uses to recompute "
            "BatchNorm statistics and to match activations.", check=at_least(1)),
        Key("merge-bn-recompute", True, "decentralized: recompute the merged model's BatchNorm "
            "statistics on local data before training."),
        Key("node-eval-examples", 2000, "decentralized: test examples (stratified) each node's "
            "model is evaluated on per round; the last round uses the whole test set (0 = "
            "always the whole set).", check=at_least(0)),
        Key("evaluate-merged", True, "decentralized: nodes also evaluate their merged model "
            "before local training (merged_accuracy), on the per-round test subset."),
        Key("node-pretrain-epochs", 0, "decentralized: local epochs every node trains on its "
            "own data before the first merge, without merging (the DIMAT authors merge "
            "pre-trained models); round 0 then records the pre-trained nodes.",
            check=at_least(0)),
    )

    def __init__(self, *, seed: int = 0, run_config: Mapping[str, Any] | None = None,
                 topology: str = "ring", topology_p: float = 0.3, mixing: str = "metropolis",
                 node_init: str = "shared", num_nodes: int = 1, basis: str = "auto",
                 align_data: str = "local") -> None:
        self.seed = seed
        self.run_config = dict(run_config or {})
        self.topology, self.mixing_rule, self.node_init = topology, mixing, node_init
        self.neighbours = neighbours(topology, num_nodes, p=topology_p, seed=seed)
        self.mixing = mixing_matrix(self.neighbours, mixing)
        self.num_nodes = num_nodes
        self.complete = is_complete(self.neighbours)
        if basis not in BASES:
            raise ConfigError("dimat-basis", basis, "one of " + ", ".join(BASES))
        if not self.align:
            basis = "own"  # gossip merges raw weights: there is no basis to choose
        elif basis == "auto":
            basis = "single" if self.complete and num_nodes > 1 else "own"
        elif basis == "single" and not self.complete:
            raise ConfigError("dimat-basis", "single", f"own, anchor or auto with topology "
                              f"{topology!r} on {num_nodes} nodes: one merge for every node "
                              "needs a complete graph (every mixing row the same)")
        #: The resolved basis: ``single``, ``own`` or ``anchor`` (see the module docstring).
        self.basis = basis
        if align_data not in ALIGN_DATA:
            raise ConfigError("dimat-align-data", align_data, "one of " + ", ".join(ALIGN_DATA))
        self.align_data = align_data if self.align else "local"
        #: The relay's copy of every node's latest model (partition id -> state dict).
        self.models: dict[int, dict] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DecentralizedStrategy:
        for key, off in (("late-phase-k", 1), ("was-layers", ""), ("fraction-train", 1.0)):
            if config[key] != off:
                raise ConfigError(key, config[key], f"{off!r} with the decentralized strategy "
                                  f"{config['strategy']!r}: every node trains every round and "
                                  "the aligner knows only the plain models")
        if config["evaluation"] != "central":
            raise ConfigError("evaluation", config["evaluation"], "central with the "
                              f"decentralized strategy {config['strategy']!r}: the server "
                              "evaluates every node's own model on the test set")
        align_data = str(config.get("dimat-align-data", "local"))
        if align_data == "proxy" and float(config["server-val-fraction"]) <= 0:
            raise ConfigError("dimat-align-data", "proxy", "local when server-val-fraction is "
                              "0: the proxy set is the server validation split, held out from "
                              "every node's training data")
        return cls(seed=int(config["seed"]), run_config=config,
                   topology=str(config["topology"]), topology_p=float(config["topology-p"]),
                   mixing=str(config["mixing"]), node_init=str(config["node-init"]),
                   num_nodes=int(config["num-clients"]),
                   basis=str(config.get("dimat-basis", "auto")), align_data=align_data)

    def total_rounds(self) -> int:
        return int(self.run_config.get("num-server-rounds", 1))

    def start(self, grid: Any = None, initial_arrays: Any = None, num_rounds: int = 3,
              *args: Any, **kwargs: Any) -> Any:
        """Refuse to run in a user's own ServerApp, saying what the strategy needs instead.

        A decentralized run has no global model for Flower's round loop to track: fedwa's
        ServerApp relays every node's neighbours' models (one ``train.merge`` message per node)
        and fedwa's ClientApp merges and trains them.

        Raises
        ------
        ClientProtocolError
            Always.
        """
        from strategies.base import PROTOCOL_DOC, ClientProtocolError

        name = type(self).__name__
        raise ClientProtocolError(
            f"{name} cannot run through Flower's Strategy.start: it has no global model, every "
            "node keeps its own. Its rounds are relayed by fedwa's ServerApp "
            "(fedwa.apps.server_app.build_server_app, or `flwr run .` / `fedwa run` with "
            f"strategy='{name.lower()}') to fedwa's ClientApp (fedwa.apps.client_app.app), whose "
            "'train.merge' handler merges the neighbours' models sent as 'node-<partition-id>' "
            "ArrayRecords with the weights in config 'neighbours', 'neighbour-weights' and "
            f"'self-weight', then trains. See {PROTOCOL_DOC}.")

    def node_seed(self, partition_id: int) -> int:
        """Initialisation seed of a node: the run's (shared) or its own (independent)."""
        if self.node_init == "shared":
            return self.seed
        return self.seed * 1_000_003 + 7919 * (partition_id + 1)

    def pretrain_epochs(self) -> int:
        """Local epochs of the pre-training before the first merge (0 = none)."""
        return int(self.run_config.get("node-pretrain-epochs", 0))

    def merger(self, server_round: int) -> int:
        """The node that computes the round's one merge (``single``) or whose model is the
        round's basis (``anchor``): ``(round - 1) mod N``, rotating."""
        return (server_round - 1) % self.num_nodes

    def _common(self, server_round: int, partition_id: int) -> dict[str, Any]:
        config = {"server-round": server_round, "node-seed": self.node_seed(partition_id),
                  "merge-bn-recompute": bool(self.run_config.get("merge-bn-recompute", True)),
                  "dimat-examples": int(self.run_config.get("dimat-examples", 512)),
                  "evaluate-merged": bool(self.run_config.get("evaluate-merged", True)),
                  # The server's per-round subset, also in the last round: N nodes each
                  # passing over the whole test set would cost more than the round's training.
                  "eval-examples": int(self.run_config.get("node-eval-examples", 2000))}
        if self.align_data == "proxy":
            # Every node draws the same examples of the shared proxy set this round.
            config.update({"align-data": "proxy",
                           "probe-seed": (self.seed * 1_000_003 + server_round) % (2**63 - 1)})
        return config

    def round_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        """What a node needs besides its neighbours' models: its mixing row and the flags.

        With ``anchor``, a round's anchor that is not a neighbour is listed too, with weight
        0 (it only sets the basis), and ``align-to`` names it (-1: the node's own basis).
        """
        row = self.mixing[partition_id]
        nbrs = [int(j) for j in self.neighbours[partition_id]]
        weights = [float(row[j]) for j in nbrs]
        config = {**self._common(server_round, partition_id),
                  "self-weight": float(row[partition_id]),
                  "neighbours": nbrs, "neighbour-weights": weights, "align": self.align}
        if self.basis == "anchor":
            anchor = self.merger(server_round)
            if anchor != partition_id and anchor not in nbrs:
                config["neighbours"], config["neighbour-weights"] = nbrs + [anchor], weights + [0.0]
            config["align-to"] = anchor if anchor != partition_id else -1
        return config

    def senders(self, server_round: int, partition_id: int) -> list[int]:
        """Whose models the relay sends the node in a round: its neighbours, and with
        ``anchor`` the round's anchor when it is neither the node nor a neighbour."""
        nbrs = [int(j) for j in self.neighbours[partition_id]]
        if self.basis == "anchor":
            anchor = self.merger(server_round)
            if anchor != partition_id and anchor not in nbrs:
                nbrs.append(anchor)
        return nbrs

    def merger_config(self, server_round: int, merger: int | None = None) -> dict[str, Any]:
        """``single``, first exchange: the merger (default :meth:`merger`) aligns every other
        node's model to its own and merges them with its mixing row (1/N each); it replies
        without training."""
        merger = self.merger(server_round) if merger is None else merger
        return {**self.round_config(server_round, merger), "train": False}

    def given_config(self, server_round: int, partition_id: int,
                     merger: int | None = None) -> dict[str, Any]:
        """``single``, second exchange: the node takes the round's one merged model (sent as
        the merger's, weight 1, its own weight 0) as it is and trains it."""
        merger = self.merger(server_round) if merger is None else merger
        return {**self._common(server_round, partition_id), "self-weight": 0.0,
                "neighbours": [merger], "neighbour-weights": [1.0],
                "align": False, "merge-bn-recompute": False, "evaluate-merged": False}

    def pretrain_config(self, partition_id: int) -> dict[str, Any]:
        """Pre-training (round 0): no neighbours, no alignment, no merge; ``node-pretrain-
        epochs`` local epochs at the run's base learning rate (progress 0)."""
        return {**self._common(0, partition_id), "self-weight": 1.0, "neighbours": [],
                "neighbour-weights": [], "align": False, "merge-bn-recompute": False,
                "evaluate-merged": False, "local-epochs": self.pretrain_epochs(),
                "local-steps": 0, "progress-start": 0.0, "progress-end": 0.0}

    def after_round(self, server_round: int, replies: list[Any]) -> None:
        """Called with the round's usable replies (partition order) once the relay holds the
        nodes' new models; override to log or inspect them."""

    def state_dict(self) -> dict[str, Any]:
        return {"models": self.models}

    def client_models(self) -> dict[int, dict]:
        """What each node keeps between rounds: its own model, which the relay also holds
        (a resumed run sends it back to the node)."""
        return self.models

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.models = dict(state["models"])


class DIMAT(DecentralizedStrategy):
    """DIMAT: align every neighbour to a basis by activation matching, then merge."""

    align = True
    config_keys: ClassVar[tuple[Key, ...]] = DecentralizedStrategy.config_keys + (
        Key("dimat-basis", "auto", "DIMAT: the units the merge aligns to. single = one node "
            "merges every model in its own basis and every node trains that one merge "
            "(complete graphs only; the authors' code); own = every node aligns its "
            "neighbours to itself (the authors' code on sparse graphs); anchor = every node "
            "aligns its own and its neighbours' models to a rotating anchor node, relayed to "
            "all, so sparse graphs keep one shared basis; auto = single on a complete graph, "
            "else own.", choices=BASES),
        Key("dimat-align-data", "local", "DIMAT: data for BatchNorm statistics and activation "
            "matching: each node's own (local) or the server validation split, held out from "
            "training and shared by every node (proxy, the authors' setting; needs "
            "server-val-fraction > 0).", choices=ALIGN_DATA),
    )


class Gossip(DecentralizedStrategy):
    """Gossip averaging: merge neighbours with the mixing weights, without alignment."""

    align = False
