"""A Grid wrapper that gives every strategy, built-in or the user's, the same plumbing.

:class:`FedwaGrid` sits between a strategy and Flower's Grid (simulation or deployment) and:

- attaches the resolved run config to every outgoing message, so ClientApps read the exact
  config the server validated, whatever the runtime (``flwr run``, the Python API, SuperNodes);
- learns each node's ``partition-id`` once (a ``query`` message) and lists node ids in partition
  order, so seeded client sampling picks the same clients in every run although Flower draws
  random node ids; a handshake that fails :func:`fedwa.flower.replies.handshake_problem` leaves its
  node out of the run (:attr:`FedwaGrid.rejected_nodes`);
- trusts only the nodes it expects: more nodes than ``num-clients``, or two nodes claiming one
  partition id, stop the run with :class:`~fedwa.common.errors.UntrustedNodesError` naming them;
- knows how many examples each node holds (:meth:`FedwaGrid.example_limit`), the cap on the
  counts of its later replies;
- counts the array bytes that go down and come up, and keeps the round's client replies, for the
  per-round results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedwa.common.errors import FedwaError, TooFewRepliesError, UntrustedNodesError
from fedwa.flower.replies import handshake_problem, rejection_detail, screen

log = logging.getLogger("fedwa")

RUN_CONFIG_KEY = "fedwa-run-config"


def array_bytes(content: RecordDict) -> int:
    """Bytes of the serialised arrays in a message's content (what Flower ships)."""
    # Not ``content.array_records``: that view is rebuilt, with checks, on every access.
    return sum(len(array.data) for record in content.values() if isinstance(record, ArrayRecord)
               for array in record.values())


@dataclass
class RoundTraffic:
    """What crossed the grid since the last :meth:`FedwaGrid.take_traffic`."""

    bytes_down: int = 0
    bytes_up: int = 0
    replies: list[Message] = field(default_factory=list)
    #: Replies other than training ones that the server left out (BatchNorm moments,
    #: federated-evaluation counts, handshakes): ``{"what", "node", "reason"}`` each.
    rejected: list[dict[str, Any]] = field(default_factory=list)


class FedwaGrid(Grid):
    """Delegates to ``inner`` and adds run config, node order and traffic counts.

    Parameters
    ----------
    inner : Grid
        Flower's grid.
    run_config : mapping
        The validated run config; sent as a ``ConfigRecord`` with every message.
    timeout : float
        Seconds to wait for the partition-id handshake.
    partition_sizes : sequence of int, optional
        The size of each partition as the server built it (simulation: the server splits the
        data). A node training on its partition may not claim more examples than that.
    num_classes : int, optional
        The dataset's classes: a handshake's ``class-counts`` must have one entry each (the
        server adds them up across nodes).
    """

    def __init__(self, inner: Grid, run_config: Mapping[str, object],
                 timeout: float = 600.0,
                 partition_sizes: Sequence[int] | None = None,
                 num_classes: int | None = None) -> None:
        self.inner = inner
        self.run_config = dict(run_config)
        # Built once: a ConfigRecord checks every entry as it is set, and the run config has
        # about 80 keys, which cost more per message than a small model's training.
        self.run_config_record = ConfigRecord(self.run_config)
        self.timeout = timeout
        self.partition_of: dict[int, int] = {}
        self.node_info: dict[int, dict[str, object]] = {}
        #: Nodes whose handshake was unusable, with the reason: never sampled.
        self.rejected_nodes: dict[int, str] = {}
        self.partition_sizes = list(partition_sizes) if partition_sizes is not None else None
        self.num_classes = num_classes
        self.traffic = RoundTraffic()

    # --- the Grid interface -------------------------------------------------------------------

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        """Node ids ordered by partition id (unknown nodes are asked first)."""
        nodes = list(self.inner.get_node_ids())
        num_clients = int(self.run_config.get("num-clients", len(nodes)))
        if len(nodes) > num_clients:
            raise UntrustedNodesError(
                f"{len(nodes)} nodes are connected and num-clients is {num_clients}: a node "
                f"this run does not expect joined (node ids {', '.join(map(str, sorted(nodes)))})"
                "; stop the extra SuperNode, or set num-clients to the number of nodes")
        new = [n for n in nodes if n not in self.partition_of and n not in self.rejected_nodes]
        if new:
            self._handshake(new)
        return sorted((n for n in nodes if n in self.partition_of),
                      key=lambda n: (self.partition_of[n], n))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._outgoing(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._incoming(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.inner.send_and_receive(self._outgoing(messages), timeout=timeout))
        self._incoming(replies)
        return replies

    # --- fedwa's additions --------------------------------------------------------------------

    def example_limit(self, node: int) -> int | None:
        """Most examples ``node`` may claim in a reply: the training examples it reported at
        the handshake (None for a node this grid never heard of)."""
        info = self.node_info.get(node)
        return int(info["num-examples"]) if info is not None else None

    def test_limit(self, node: int) -> int | None:
        """Most test examples ``node`` may count in federated evaluation: what it reported at
        the handshake (None when it reported no test split)."""
        info = self.node_info.get(node)
        if info is None or "test-examples" not in info:
            return None
        return int(info["test-examples"])

    def _partition_size(self, pid: int) -> int | None:
        sizes = self.partition_sizes
        return int(sizes[pid]) if sizes is not None and 0 <= pid < len(sizes) else None

    def take_traffic(self) -> RoundTraffic:
        """Return the traffic since the last call and start counting afresh."""
        traffic, self.traffic = self.traffic, RoundTraffic()
        return traffic

    def _outgoing(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:
            # Strategies often share one RecordDict between all messages of a round; setting the
            # same record again is harmless.
            message.content[RUN_CONFIG_KEY] = self.run_config_record
            self.traffic.bytes_down += array_bytes(message.content)
        return messages

    def _incoming(self, replies: list[Message]) -> None:
        for reply in replies:
            if not reply.has_error():
                self.traffic.bytes_up += array_bytes(reply.content)
            if reply.metadata.message_type.startswith(MessageType.TRAIN):
                self.traffic.replies.append(reply)

    def _handshake(self, node_ids: list[int]) -> None:
        """Ask nodes for their partition id and what they hold.

        A node whose ClientApp raises stops the run with its reason (it cannot load its data:
        misconfigured, and waiting for it would hang the run). A node whose answer is unusable
        (:func:`fedwa.flower.replies.handshake_problem`) is left out for the whole run, logged and
        counted; too few usable nodes left for ``min-available-clients`` raise
        :class:`~fedwa.common.errors.TooFewRepliesError`. Two nodes claiming one partition id stop
        the run (:class:`~fedwa.common.errors.UntrustedNodesError`, naming them): one of them is not
        the node the operator started, and which one cannot be told here.
        """
        messages = [
            Message(RecordDict({RUN_CONFIG_KEY: self.run_config_record}), node,
                    MessageType.QUERY, group_id="handshake")
            for node in node_ids
        ]
        replies = list(self.inner.send_and_receive(messages, timeout=self.timeout))
        failures = []
        for reply in replies:
            if reply.has_error():
                reason = reply.error.reason.strip().splitlines()
                failures.append(f"node {reply.metadata.src_node_id}: "
                                f"{reason[-1] if reason else 'no reason'}")
        if failures:
            # A node that cannot even load its partition is misconfigured; waiting for it would
            # hang the run, so stop with the node's own reason.
            raise FedwaError(f"{len(failures)} of {len(node_ids)} nodes cannot take part: "
                             + "; ".join(failures[:3]))
        num_clients = int(self.run_config.get("num-clients", len(node_ids)))

        def check(reply: Message) -> str | None:
            return handshake_problem(reply, num_clients, self.num_classes,
                                     partition_size=self._partition_size)

        replies.sort(key=lambda r: r.metadata.src_node_id)
        usable, rejected = screen(replies, check, "handshake", self.traffic.rejected)
        claims: dict[int, list[int]] = {}
        for node, pid in self.partition_of.items():
            claims.setdefault(pid, []).append(node)
        for reply in usable:
            pid = int(reply.content["info"]["partition-id"])
            claims.setdefault(pid, []).append(reply.metadata.src_node_id)
        shared = {pid: nodes for pid, nodes in claims.items() if len(nodes) > 1}
        if shared:
            # Which claimant is the real node cannot be told from here (a rogue node can
            # claim any id); keeping either could average a stranger's model in.
            raise UntrustedNodesError("; ".join(
                f"nodes {', '.join(map(str, sorted(nodes)))} all claim partition-id {pid}"
                for pid, nodes in sorted(shared.items()))
                + ": two SuperNodes cannot hold one partition; stop the one you did not start")
        for node, reason in rejected:
            self.rejected_nodes[node] = reason
        for reply in usable:
            info = dict(reply.content["info"])
            self.partition_of[reply.metadata.src_node_id] = int(info["partition-id"])
            self.node_info[reply.metadata.src_node_id] = info
        needed = max(int(self.run_config.get("min-available-clients", 1)), 1)
        if rejected and len(self.partition_of) < needed:
            raise TooFewRepliesError(
                f"handshake: only {len(self.partition_of)} of {len(node_ids)} nodes sent a "
                f"usable handshake; min-available-clients is {needed} "
                f"({rejection_detail(rejected)})")
