"""Partial model averaging.

Lee, Sahu, He, Avestimehr, "Partial Model Averaging in Federated Learning: Performance
Guarantees and Benefits", 2022 (arXiv 2201.03789). The model's parameters are split into
``partial-groups`` (tau) disjoint groups; round r synchronises group ``(r - 1) mod tau``: the
clients train, send that group up, the server averages it, and the average goes down at the
start of round r + 1 (with the next round's instructions), where it replaces the clients'
copies. Clients keep their own full model between rounds, so the other groups stay local; each
parameter is still averaged once every tau rounds, at 1/tau of the traffic per round. Round 1
sends no weights: every client starts from the run's shared, seeded initialisation. With
tau = 1 this is FedAvg exactly.

``partial-grouping`` picks the groups (:func:`fedwa.core.partial.partition_groups`): ``equal`` (the
default) cuts weights by output rows so every group holds 1/tau of the bytes to within one
row or one whole small tensor; ``balanced`` and ``round-robin`` keep layers whole. A group
travels, both ways, as an ``ArrayRecord`` keyed by piece names: a whole entry under its own
name, rows ``a:b`` of a split one as ``"<entry>[a:b]"``. The client writes the pieces it
receives into its kept model (:func:`fedwa.core.partial.merge`) and replies with the pieces named
in ``return-names`` (:func:`fedwa.core.partial.select`).

A client that missed rounds (``fraction-train < 1``) rejoins, by ``partial-rejoin``, from its
own freshest copy of every group (``local``: nothing extra is sent) or from the server's latest
average of every group (``server``: the full model is sent to it, and counted in bytes).

The server keeps the latest average of every group; that model is evaluated. In the last round
(and every ``partial-eval-every`` rounds) the clients also evaluate their own kept models on
the test set (``clients_local_accuracy``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedwa.flower.arrays import average_records, to_record, to_state_dict
from fedwa.common.keys import Key, at_least
from fedwa.common.errors import ConfigError
from fedwa.core.partial import RULES, group_for_round, merge, partition_groups, select
from strategies.base import PROTOCOL_DOC
from strategies.fedavg import FedAvg

log = logging.getLogger("fedwa")


class PartialAveraging(FedAvg):
    """Averages one staggered group of parameters per round; clients keep the rest."""

    #: Clients keep their own full model between rounds: checkpoints fetch it from them.
    keeps_client_models = True

    config_keys = (
        Key("partial-groups", 2, "partial: number of parameter groups tau (1 = FedAvg).",
            check=at_least(1)),
        Key("partial-grouping", "equal", "partial: groups of equal bytes (weights split by "
            "output rows), consecutive whole layers of balanced size, or whole layers dealt "
            "round-robin.", choices=RULES),
        Key("partial-rejoin", "local", "partial: a client that missed rounds continues from "
            "its own groups, or gets the server's full model.", choices=("local", "server")),
        Key("partial-eval-every", 0, "partial: the clients evaluate their own kept models on "
            "the test set every n rounds and in the last (0 = the last round only).",
            check=at_least(0)),
    )

    def __init__(self, *args: Any, partial_groups: int = 2, partial_grouping: str = "equal",
                 partial_rejoin: str = "local", partial_eval_every: int = 0,
                 **kwargs: Any) -> None:
        kwargs["fraction_evaluate"] = 1.0  # every client reports its own model each round
        kwargs["min_evaluate_nodes"] = 1
        super().__init__(*args, **kwargs)
        self.tau, self.rule, self.rejoin = partial_groups, partial_grouping, partial_rejoin
        self.eval_every = partial_eval_every
        self.groups: list[list[str]] | None = None
        self.full: dict | None = None
        # partition id -> last round it trained in; partitions, unlike node ids, survive a
        # deployment restarted to resume
        self.last_round_of: dict[int, int] = {}

    def check_model(self, state: Mapping[str, Any]) -> None:
        """Refuse, before any engine starts, more groups than the model can be split into.

        Called by ``fedwa.cli.check_runnable`` with the run's initial model; otherwise the
        first round's ``configure_train`` would raise inside the ServerApp.

        Raises
        ------
        ConfigError
            Key ``partial-groups``, naming the limit of ``partial-grouping``.
        """
        try:
            partition_groups(state, self.tau, self.rule)
        except ValueError as err:
            # The message of partition_groups names the bound: units (equal) or layers.
            raise ConfigError("partial-groups", self.tau, f"a number of groups the model can "
                              f"be split into with partial-grouping = {self.rule}: "
                              f"{err}") from None

    @classmethod
    def kwargs_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"partial_groups": int(config["partial-groups"]),
                "partial_grouping": str(config["partial-grouping"]),
                "partial_rejoin": str(config["partial-rejoin"]),
                "partial_eval_every": int(config["partial-eval-every"])}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        if self.full is None:
            self.full = to_state_dict(arrays)
            self.groups = partition_groups(self.full, self.tau, self.rule)
        assert self.groups is not None
        up = self.groups[group_for_round(server_round, self.tau)]
        down = self.groups[group_for_round(server_round - 1, self.tau)] if server_round > 1 else []
        if server_round == 1 and self.in_stock_app:
            # A user's ClientApp cannot rebuild the server's initial model on its own (fedwa's
            # does, from the run's seed): round 1 sends it whole, once.
            down = list(self.full)
        config["keep-local-model"] = True
        config["return-names"] = list(up)
        messages = list(super().configure_train(
            server_round, to_record(select(self.full, down)), config, grid))
        # Replies carry the group synchronised this round, not the one that went down: the
        # reply check expects its piece names and shapes.
        self.sent_arrays = to_record(select(self.full, up))
        partition_of = getattr(grid, "partition_of", {})
        keys = [partition_of.get(m.metadata.dst_node_id, m.metadata.dst_node_id)
                for m in messages]
        if self.rejoin == "server":
            messages = [self._rejoin(m, key, server_round, config)
                        for m, key in zip(messages, keys)]
        for key in keys:
            self.last_round_of[key] = server_round
        return messages

    def _rejoin(self, message: Message, key: int, server_round: int,
                config: ConfigRecord) -> Message:
        node = message.metadata.dst_node_id
        last = self.last_round_of.get(key, 0)
        if last in (0, server_round - 1):  # never trained (starts from the shared init) or
            return message                 # trained last round: nothing was missed
        # Whole entries: the client's merge replaces every one of them.
        content = RecordDict({"arrays": to_record(self.full), "config": config})
        return Message(content, node, message.metadata.message_type)

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord:
        average = average_records([r.content["arrays"] for r in replies],
                                  self.client_weights(replies))
        self.full = merge(self.full, average)
        return ArrayRecord(self.full)

    def protocol_hint(self, server_round: int) -> str | None:
        first = ("round 1 sends the whole initial model" if self.in_stock_app
                 else "round 1 sends no weights (start from the run's shared initialisation)")
        return ("Partial averaging needs a ClientApp that keeps its own full model between "
                "rounds (in context.state; config 'keep-local-model' is true): " + first +
                ", later rounds only the group averaged in the round before, as 'arrays' "
                "entries named '<entry>' or '<entry>[a:b]' (rows a to b of a split entry; "
                "fedwa.core.partial.merge writes them into the kept model); the client trains the "
                "merged model, keeps it, and replies with exactly the pieces named in config "
                "'return-names' (fedwa.core.partial.select) and 'num-examples'")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if self.in_stock_app and replies and metrics is None:
            log.warning("partial averaging, round %d: no client evaluated its kept model: with "
                        "config 'evaluate-local-model' true the evaluate handler must evaluate "
                        "the model the client keeps (the message's 'arrays' is empty). See %s.",
                        server_round, PROTOCOL_DOC)
        return metrics

    def evaluate_limit(self, node: int) -> float | None:
        """Clients evaluate their kept model on the run's balanced test set, not on their
        partition: its size caps their counts (None where the server knows no node)."""
        if getattr(self.grid, "example_limit", None) is None or "dataset" not in self.run_config:
            return None
        from fedwa.data.task import federated_data

        return len(federated_data(self.run_config).test_data()[1])

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Any) -> Iterable[Message]:
        last = server_round == self.total_rounds()
        if not last and (self.eval_every == 0 or server_round % self.eval_every):
            # Every client evaluating its model on the whole test set costs as much as the
            # round's training here, so by default only the last round does it.
            self.last_evaluate_metrics = {}
            return []
        config["evaluate-local-model"] = True
        # The clients evaluate their own models; sending the global one would be wasted bytes.
        return super().configure_evaluate(server_round, ArrayRecord(), config, grid)

    def state_dict(self) -> dict[str, Any]:
        return {"full": self.full, "groups": self.groups, "last_round_of": self.last_round_of}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.full, self.groups = state["full"], state["groups"]
        self.last_round_of = dict(state["last_round_of"])
