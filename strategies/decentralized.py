"""Decentralized training over a topology: DIMAT and plain gossip.

Saadati, Pham, Sarkar et al., "DIMAT: Decentralized Iterative Merging-And-Training for Deep
Learning Models", CVPR 2024 (arXiv 2404.08079). Every node keeps its own model; there is no
global model. Each round every node

1. recomputes the BatchNorm statistics of its own model and of each neighbour's model on its
   own data (``dimat-examples`` of them),
2. aligns each neighbour's hidden units to its own by activation matching on that data
   (:func:`fedwa.alignment.align_to`; residual-joined units share one permutation),
3. merges its own and the aligned models with its row of the mixing matrix,
4. recomputes the merged model's BatchNorm statistics (``merge-bn-recompute``),
5. trains it for the round's local epochs or steps with a fresh optimiser.

Gossip is the same round with steps 1-2 left out. The ServerApp only relays: each round it
sends every node its neighbours' latest models, one message per node (``train.merge``), and
keeps the models the nodes send back for the next round. It also evaluates every node's model
on the balanced test set, which is how the run's results are measured, not part of training.

Unlike the paper, which aligns on the whole training set (data every node would see), nodes
align on their own local data only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from fedwa.config import Key, at_least
from fedwa.errors import ConfigError
from fedwa.topology import MIXING_RULES, TOPOLOGIES, mixing_matrix, neighbours


def _probability(value: float) -> str | None:
    return None if 0 < value <= 1 else "a probability in (0, 1]"


class DecentralizedStrategy:
    """Relay-and-merge over a topology; :class:`DIMAT` aligns neighbours, :class:`Gossip` not.

    Subclasses set :attr:`align`. The round itself runs in :mod:`fedwa.decentralized` (server
    relay) and on the nodes (``train.merge`` in :mod:`fedwa.client_app`).
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
    )

    def __init__(self, *, seed: int = 0, run_config: Mapping[str, Any] | None = None,
                 topology: str = "ring", topology_p: float = 0.3, mixing: str = "metropolis",
                 node_init: str = "shared", num_nodes: int = 1) -> None:
        self.seed = seed
        self.run_config = dict(run_config or {})
        self.topology, self.mixing_rule, self.node_init = topology, mixing, node_init
        self.neighbours = neighbours(topology, num_nodes, p=topology_p, seed=seed)
        self.mixing = mixing_matrix(self.neighbours, mixing)
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
        return cls(seed=int(config["seed"]), run_config=config,
                   topology=str(config["topology"]), topology_p=float(config["topology-p"]),
                   mixing=str(config["mixing"]), node_init=str(config["node-init"]),
                   num_nodes=int(config["num-clients"]))

    def total_rounds(self) -> int:
        return int(self.run_config.get("num-server-rounds", 1))

    def node_seed(self, partition_id: int) -> int:
        """Initialisation seed of a node: the run's (shared) or its own (independent)."""
        if self.node_init == "shared":
            return self.seed
        return self.seed * 1_000_003 + 7919 * (partition_id + 1)

    def round_config(self, server_round: int, partition_id: int) -> dict[str, Any]:
        """What a node needs besides its neighbours' models: its mixing row and the flags."""
        row = self.mixing[partition_id]
        nbrs = self.neighbours[partition_id]
        return {"server-round": server_round, "node-seed": self.node_seed(partition_id),
                "self-weight": float(row[partition_id]),
                "neighbours": [int(j) for j in nbrs],
                "neighbour-weights": [float(row[j]) for j in nbrs],
                "align": self.align,
                "merge-bn-recompute": bool(self.run_config.get("merge-bn-recompute", True)),
                "dimat-examples": int(self.run_config.get("dimat-examples", 512)),
                "evaluate-merged": bool(self.run_config.get("evaluate-merged", True)),
                # The server's per-round subset, also in the last round: N nodes each passing
                # over the whole test set would cost more than the round's training.
                "eval-examples": int(self.run_config.get("node-eval-examples", 2000))}

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
    """DIMAT: align every neighbour to the node by activation matching, then merge."""

    align = True


class Gossip(DecentralizedStrategy):
    """Gossip averaging: merge neighbours with the mixing weights, without alignment."""

    align = False
