"""The ``local`` simulation backend: Flower's ServerApp and ClientApp in one process, no Ray.

:class:`InProcessGrid` implements Flower's :class:`~flwr.serverapp.Grid` interface. Each
message the strategy pushes is handed to the ClientApp at once, in this process, with that
node's :class:`~flwr.app.Context`; the reply waits to be pulled. The ServerApp, ClientApp and
strategies are the very objects the Ray backend and the Deployment Engine run: only the
transport differs.

Why it exists: Flower's Ray simulation costs about 6 s of start-up (Ray plus actors importing
torch), ~0.3 s per round and 1-2 GiB of RAM on these machines. Sweeps of short runs spend most
of their time there. In one process a run costs what its training costs.

What it emulates, and how
-------------------------
- **Serialisation boundary.** Every instruction's records are copied before the ClientApp sees
  them, as if they had crossed the wire: a ClientApp that mutates its input cannot change the
  server's copy or another node's message.
- **Node identity.** Node ids are drawn from a seeded generator; each node's
  ``node_config`` holds ``partition-id`` and ``num-partitions``, as in Flower's simulation.
- **Node state.** ``Context.state`` lives as long as the grid, one per node, as in Flower.
- **Failures.** An exception in the ClientApp becomes an error reply (code
  ``CLIENT_APP_RAISED_EXCEPTION``), as Flower's simulation engine does; the run goes on.
- **Timeouts.** ``send_and_receive(..., timeout=t)`` gives each client ``t`` seconds of its
  own. Flower's grids give the whole batch ``t`` seconds, but there the clients run in
  parallel; here they run one after another, and one shared deadline would let a hung client
  starve every client after it. A client still running after ``t`` seconds is cut off (a
  ``SIGALRM`` timer in the main thread; elsewhere it runs on a worker thread that is
  abandoned) and its reply and state changes are discarded, like a node that did not answer
  in time.
- **Batched training** (``train_many``, fedwa's ``batch-clients``). The train messages of
  one push may be handed over together to a function that trains them in one computation
  (:func:`fedwa.apps.client_app.train_many`); each node still gets its own reply or error reply,
  and the group shares a deadline of ``timeout`` per message.
- **Not emulated.** Memory: nodes that are not training hold only their ``Context.state``;
  nothing else of theirs is resident.

Flower internals
----------------
Flower's ``Message`` constructor reads the sender's identity from
``flwr.supercore.task_identity.TaskIdentity``, which the Ray simulation sets for the server
process; :func:`run_in_process` sets it the same way. That, ``SUPERLINK_NODE_ID`` and
``Run.create_empty`` are not public API: pyproject pins the flwr versions this was checked
with, and ``tests/test_local_backend.py`` fails loudly if they move.
"""

from __future__ import annotations

import copy
import logging
import random
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Array, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedwa.flower.arrays import new_array

log = logging.getLogger("fedwa")


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The ClientApp every node runs.
    num_nodes : int
        Number of nodes; node ``i`` gets ``partition-id = i``.
    seed : int, optional
        Seed of the run id and the node ids (Flower draws them at random too).
    run_config : mapping, optional
        What ``context.run_config`` holds on every node (Flower's simulation passes the app's
        config here; fedwa sends its resolved config with every message instead).
    copy_messages : bool, optional
        Copy each instruction's records before the ClientApp reads it (the default), so nothing
        mutable is shared across the would-be wire.
    node_configs : mapping, optional
        Extra ``node_config`` entries by partition id, as a SuperNode's ``--node-config``
        would give them (e.g. ``{0: {"data-dir": "/data/site-a"}}``).
    train_many : callable, optional
        ``train_many(messages, contexts) -> replies or exceptions``: when given, the train
        messages of one push are handed to it together instead of to the ClientApp one by one
        (fedwa's :func:`fedwa.apps.client_app.train_many`, which trains them batched).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, seed: int = 0,
                 run_config: Mapping[str, Any] | None = None,
                 copy_messages: bool = True,
                 node_configs: Mapping[int, Mapping[str, Any]] | None = None,
                 train_many: Callable[[list[Message], list[Context]], list[Any]] | None = None
                 ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        rng = random.Random(seed)
        self.client_app = client_app
        self.copy_messages = copy_messages
        self.train_many = train_many
        self._run = Run.create_empty(run_id=rng.getrandbits(63))
        self.contexts: dict[int, Context] = {}
        while len(self.contexts) < num_nodes:
            node_id = rng.getrandbits(63)
            if node_id in self.contexts or node_id == SUPERLINK_NODE_ID:
                continue
            pid = len(self.contexts)
            self.contexts[node_id] = Context(
                run_id=self._run.run_id, node_id=node_id,
                node_config={"partition-id": pid, "num-partitions": num_nodes,
                             **dict((node_configs or {}).get(pid, {}))},
                state=RecordDict(), run_config=dict(run_config or {}))
        self._replies: dict[str, Message] = {}
        # Message ids: random like Flower's, without uuid4's system call per id.
        self._ids = random.Random()
        self.messages_handled = 0
        self.messages_timed_out = 0
        # Off the main thread, one worker thread runs the ClientApps when a timeout applies
        # (handing a call to a live thread is cheaper than starting one per message).
        self._worker: ThreadPoolExecutor | None = None

    # --- the Grid interface -------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return self._push(messages, timeout=None)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        # Every reply that will ever exist does once _push returns: nothing to wait for.
        return self.pull_messages(self._push(messages, timeout))

    def close(self) -> None:
        """Let go of the worker thread (an abandoned, still running client is not waited for)."""
        if self._worker is not None:
            self._worker.shutdown(wait=False)
            self._worker = None

    # --- delivery -----------------------------------------------------------------------------

    def _push(self, messages: Iterable[Message], timeout: float | None) -> list[str]:
        ids, single = [], []
        together: list[tuple[str, Message]] = []
        for message in messages:
            message_id = self._new_id()
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            if (self.train_many is not None and message.metadata.message_type == MessageType.TRAIN
                    and message.metadata.dst_node_id in self.contexts):
                together.append((message_id, message))
            else:
                single.append((message_id, message))
        if len(together) == 1:
            single, together = together + single, []
        if together:
            for message_id, reply in zip((i for i, _ in together),
                                         self._deliver_many([m for _, m in together], timeout)):
                if reply is not None:
                    self._replies[message_id] = reply
        for message_id, message in single:
            reply = self._deliver(message, timeout)
            if reply is not None:
                self._replies[message_id] = reply
        return ids

    def _deliver(self, message: Message, timeout: float | None = None) -> Message | None:
        """The node's reply, or None when it did not come within ``timeout`` seconds."""
        node_id = message.metadata.dst_node_id
        context = self.contexts.get(node_id)
        if context is None:
            return self._error(message, ErrorCode.NODE_UNAVAILABLE, f"no node {node_id}")
        delivered = _copy_instruction(message) if self.copy_messages else message
        if timeout is None:
            return self._call(message, delivered, context)
        # The client works on its own copy of the node's state, adopted only if it answers in
        # time: a client cut off mid-round must not leave half an update behind.
        own = _own_context(context)
        reply = self._within(timeout, self._call, message, delivered, own)
        if reply is _TIMED_OUT:
            log.warning("node %d did not answer %s within the round's timeout; its reply "
                        "is discarded", node_id, message.metadata.message_type)
            self.messages_timed_out += 1
            return None
        if not reply.has_error():
            self.contexts[node_id] = own
        return reply

    def _deliver_many(self, messages: list[Message], timeout: float | None
                      ) -> list[Message | None]:
        """Replies to train messages handled together by ``train_many``.

        They share a deadline of ``timeout`` per message (the time they would have had one
        after another); past it every reply of the group is discarded.
        """
        delivered = [_copy_instruction(m) if self.copy_messages else m for m in messages]
        nodes = [m.metadata.dst_node_id for m in messages]
        contexts = [self.contexts[n] if timeout is None else _own_context(self.contexts[n])
                    for n in nodes]
        self.messages_handled += len(messages)
        if timeout is None:
            results = self._train_many(delivered, contexts)
        else:
            results = self._within(timeout * len(messages), self._train_many, delivered,
                                   contexts)
            if results is _TIMED_OUT:
                log.warning("%d nodes trained together did not answer within their timeouts; "
                            "their replies are discarded", len(messages))
                self.messages_timed_out += len(messages)
                return [None] * len(messages)
        replies = []
        for message, node, context, result in zip(messages, nodes, contexts, results):
            if isinstance(result, BaseException):
                log.debug("node %d raised: %r", node, result)
                replies.append(self._error(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                           f"{type(result)}:<'{result}'>"))
                continue
            result.metadata.__dict__["_message_id"] = self._new_id()
            replies.append(result)
            if timeout is not None:
                self.contexts[node] = context
        return replies

    def _train_many(self, messages: list[Message], contexts: list[Context]) -> list[Any]:
        try:
            return list(self.train_many(messages, contexts))
        except Exception as error:  # noqa: BLE001 - every node of the group fails alike
            log.debug("train_many raised:\n%s", traceback.format_exc())
            return [error] * len(messages)

    def _within(self, seconds: float, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)``, or ``_TIMED_OUT`` when it ran past ``seconds``."""
        if threading.current_thread() is threading.main_thread():
            return self._with_alarm(seconds, function, *args)
        return self._on_worker(seconds, function, *args)

    def _with_alarm(self, seconds: float, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` here, cut off by SIGALRM after ``seconds``.

        In the main thread a timer signal interrupts the client between two Python bytecodes
        (or when a blocking call such as a sleep returns EINTR), at the cost of two system
        calls; handing every message to a worker thread cost about 0.3 ms each.
        """
        def expire(signum: int, frame: Any) -> None:
            raise _ClientTimedOut

        previous = signal.signal(signal.SIGALRM, expire)
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                return function(*args)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _ClientTimedOut:  # also when it fires between the call's end and the disarm
            return _TIMED_OUT
        finally:
            signal.signal(signal.SIGALRM, previous)

    def _on_worker(self, seconds: float, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` on the worker thread, abandoned after ``seconds`` (signals reach
        only the main thread). Python cannot stop a thread: an abandoned client runs on, and
        its reply and state changes are discarded."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedwa-client")
        future = self._worker.submit(function, *args)
        try:
            return future.result(timeout=seconds)
        except FutureTimeout:
            # The stuck thread keeps the old worker; later clients get a fresh one.
            self._worker.shutdown(wait=False)
            self._worker = None
            return _TIMED_OUT

    def _call(self, message: Message, delivered: Message, context: Context) -> Message:
        self.messages_handled += 1
        try:
            reply = self.client_app(delivered, context)
        except Exception as error:  # noqa: BLE001 - a node's failure is its reply, as in Flower
            log.debug("node %d raised:\n%s", context.node_id, traceback.format_exc())
            return self._error(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                               f"{type(error)}:<'{error}'>")
        reply.metadata.__dict__["_message_id"] = self._new_id()
        return reply

    def _new_id(self) -> str:
        return f"{self._ids.getrandbits(128):032x}"

    def _error(self, message: Message, code: int, reason: str) -> Message:
        reply = Message(Error(code=code, reason=reason), reply_to=message)
        reply.metadata.__dict__["_message_id"] = self._new_id()
        return reply


_TIMED_OUT = object()  # what _within returns for a call cut off at its deadline


def _own_context(context: Context) -> Context:
    """A copy of ``context`` whose state a client may change without touching the node's."""
    return Context(run_id=context.run_id, node_id=context.node_id,
                   node_config=context.node_config, state=RecordDict(dict(context.state.items())),
                   run_config=context.run_config)


class _ClientTimedOut(BaseException):
    """Raised into a client at its deadline; a BaseException, so that the ClientApp's own
    error handling (``except Exception``) cannot turn it into a reply."""


def _copy_record(record: Any) -> Any:
    """A new record with the same entries, without re-checking every entry's type.

    Flower's records keep their entries in ``__dict__["_data"]``. Each :class:`~flwr.app.Array`
    becomes a new object around the same (immutable) bytes; lists are copied; scalars and
    strings are immutable. A deep copy did the same work at about ten times the cost.
    """
    clone = copy.copy(record)
    entries = dict(record.__dict__["_data"])
    for key, value in entries.items():
        if isinstance(value, Array):
            entries[key] = new_array(value.dtype, value.shape, value.stype, value.data)
        elif isinstance(value, list):
            entries[key] = list(value)
    clone.__dict__["_data"] = entries
    return clone


def _copy_instruction(message: Message) -> Message:
    """The message with fresh records and the same metadata, as if it had crossed the wire.

    Every record and every :class:`~flwr.app.Array` is a new object, so nothing the ClientApp
    changes reaches the sender; the arrays' payloads are ``bytes``, which nobody can change,
    so they are shared rather than copied (a deep copy of every model was most of this
    backend's own cost).
    """
    content = RecordDict()
    for name, record in message.content.items():
        content.__dict__["_data"][name] = _copy_record(record)
    clone = copy.copy(message)
    clone.__dict__["_content"] = content
    return clone


def run_in_process(server_app: ServerApp, client_app: ClientApp, num_nodes: int, *,
                   seed: int = 0, run_config: Mapping[str, Any] | None = None,
                   node_configs: Mapping[int, Mapping[str, Any]] | None = None,
                   train_many: Callable[[list[Message], list[Context]], list[Any]] | None = None
                   ) -> InProcessGrid:
    """Run ``server_app`` against ``num_nodes`` in-process ClientApps; return the grid.

    The caller's ``TaskIdentity`` is restored afterwards, so tests and notebooks can run
    several federations in one process.
    """
    grid = InProcessGrid(client_app, num_nodes, seed=seed, run_config=run_config,
                         node_configs=node_configs, train_many=train_many)
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    # What the Ray simulation sets in the server process before the ServerApp starts.
    TaskIdentity.run_id = grid.run.run_id
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        server_app(grid, Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID,
                                 node_config={}, state=RecordDict(),
                                 run_config=dict(run_config or {})))
    finally:
        grid.close()
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    return grid
