"""A Grid wrapper that gives every strategy, built-in or the user's, the same plumbing.

:class:`FedwaGrid` sits between a strategy and Flower's Grid (simulation or deployment) and:

- attaches the resolved run config to every outgoing message, so ClientApps read the exact
  config the server validated, whatever the runtime (``flwr run``, the Python API, SuperNodes);
- learns each node's ``partition-id`` once (a ``query`` message) and lists node ids in partition
  order, so seeded client sampling picks the same clients in every run although Flower draws
  random node ids;
- counts the array bytes that go down and come up, and keeps the round's client replies, for the
  per-round results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedwa.errors import FedwaError

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
    """

    def __init__(self, inner: Grid, run_config: Mapping[str, object],
                 timeout: float = 600.0) -> None:
        self.inner = inner
        self.run_config = dict(run_config)
        # Built once: a ConfigRecord checks every entry as it is set, and the run config has
        # about 80 keys, which cost more per message than a small model's training.
        self.run_config_record = ConfigRecord(self.run_config)
        self.timeout = timeout
        self.partition_of: dict[int, int] = {}
        self.node_info: dict[int, dict[str, object]] = {}
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
        new = [n for n in nodes if n not in self.partition_of]
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
        """Ask nodes for their partition id; a node that cannot answer is left out."""
        messages = [
            Message(RecordDict({RUN_CONFIG_KEY: self.run_config_record}), node,
                    MessageType.QUERY, group_id="handshake")
            for node in node_ids
        ]
        failures = []
        for reply in self.inner.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = reply.error.reason.strip().splitlines()
                failures.append(f"node {node}: {reason[-1] if reason else 'no reason'}")
                continue
            info = dict(reply.content["info"])
            self.partition_of[node] = int(info["partition-id"])
            self.node_info[node] = info
        if failures:
            # A node that cannot even load its partition is misconfigured; waiting for it would
            # hang the run, so stop with the node's own reason.
            raise FedwaError(f"{len(failures)} of {len(node_ids)} nodes cannot take part: "
                             + "; ".join(failures[:3]))
