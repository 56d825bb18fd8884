"""The in-process backend: Flower's Grid contract, node identity and state, failures, and the
Flower internals it leans on (these tests are what fails first on a flwr upgrade)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import flwr
import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fedwa.flower.local_backend import InProcessGrid, run_in_process

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_installed_flwr_is_inside_the_pinned_range() -> None:
    # The backend uses Flower internals (TaskIdentity, Run.create_empty): pyproject pins the
    # versions they were checked with; this fails on an install outside the pin.
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("flwr"))
    low, high = re.search(r">=([\d.]+),<([\d.]+)", pin).groups()
    assert version_tuple(low) <= version_tuple(flwr.__version__) < version_tuple(high)


def echo_app() -> ClientApp:
    """Replies with its partition id, a count kept in node state, and its input doubled."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        count = int(context.state["seen"]["n"]) + 1 if "seen" in context.state else 1
        context.state["seen"] = MetricRecord({"n": count})
        x = message.content["arrays"]["x"].numpy()
        message.content["arrays"]["x"] = Array(x * 0)  # tries to vandalise the input
        return Message(RecordDict({
            "arrays": ArrayRecord({"y": Array(2 * x)}),
            "metrics": MetricRecord({"pid": int(context.node_config["partition-id"]),
                                     "seen": count})}), reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        raise RuntimeError("query is broken on purpose")

    return app


@pytest.fixture
def identity():  # noqa: ANN201
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def train_messages(grid: Grid, value: float = 3.0) -> list[Message]:
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.full(2, value, np.float32))})})
    return [grid.create_message(content, MessageType.TRAIN, node, "r1")
            for node in grid.get_node_ids()]


def test_nodes_get_distinct_ids_and_partitions_in_order(identity) -> None:  # noqa: ANN001
    grid = InProcessGrid(echo_app(), 5, seed=3)
    ids = grid.get_node_ids()
    assert len(set(ids)) == 5 and SUPERLINK_NODE_ID not in ids
    assert [grid.contexts[n].node_config["partition-id"] for n in ids] == [0, 1, 2, 3, 4]
    assert {grid.contexts[n].node_config["num-partitions"] for n in ids} == {5}
    assert InProcessGrid(echo_app(), 5, seed=3).get_node_ids() == ids  # seeded


def test_replies_come_from_each_node_and_state_persists(identity) -> None:  # noqa: ANN001
    grid = InProcessGrid(echo_app(), 3)
    for round_ in (1, 2):
        replies = list(grid.send_and_receive(train_messages(grid)))
        assert sorted(r.metadata.src_node_id for r in replies) == sorted(grid.get_node_ids())
        assert sorted(int(r.content["metrics"]["pid"]) for r in replies) == [0, 1, 2]
        assert {int(r.content["metrics"]["seen"]) for r in replies} == {round_}
        for reply in replies:
            assert not reply.has_error()
            np.testing.assert_array_equal(reply.content["arrays"]["y"].numpy(), [6.0, 6.0])


def test_push_then_pull_returns_each_reply_once(identity) -> None:  # noqa: ANN001
    grid = InProcessGrid(echo_app(), 2)
    ids = list(grid.push_messages(train_messages(grid)))
    assert len(set(ids)) == 2
    first = list(grid.pull_messages(ids))
    assert len(first) == 2 and list(grid.pull_messages(ids)) == []
    assert {r.metadata.reply_to_message_id for r in first} == set(ids)


def test_a_client_cannot_change_what_the_server_sent(identity) -> None:  # noqa: ANN001
    grid = InProcessGrid(echo_app(), 3)
    messages = train_messages(grid)  # one RecordDict shared by all three, as strategies do
    replies = list(grid.send_and_receive(messages))
    # Every node saw 3.0, although each one zeroed its copy after reading it.
    assert all(r.content["arrays"]["y"].numpy().tolist() == [6.0, 6.0] for r in replies)
    assert messages[0].content["arrays"]["x"].numpy().tolist() == [3.0, 3.0]


def test_a_raising_client_becomes_an_error_reply(identity) -> None:  # noqa: ANN001
    grid = InProcessGrid(echo_app(), 2)
    node = grid.get_node_ids()[0]
    message = grid.create_message(RecordDict({"c": ConfigRecord({})}), MessageType.QUERY,
                                  node, "q")
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "query is broken on purpose" in reply.error.reason
    assert reply.metadata.src_node_id == node


def test_a_message_to_an_unknown_node_gets_an_error_reply(identity) -> None:  # noqa: ANN001
    grid = InProcessGrid(echo_app(), 1)
    message = grid.create_message(RecordDict(), MessageType.TRAIN, 12345, "x")
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE


def test_run_in_process_drives_a_server_app_and_restores_the_identity() -> None:
    seen: dict[str, object] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        seen["run_id"] = TaskIdentity.run_id
        replies = list(grid.send_and_receive(train_messages(grid, 1.5)))
        seen["y"] = sorted(float(r.content["arrays"]["y"].numpy()[0]) for r in replies)

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    grid = run_in_process(server, echo_app(), 4, seed=1)
    assert seen == {"run_id": grid.run.run_id, "y": [3.0] * 4}
    assert grid.messages_handled == 4
    assert (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id) == saved


def test_num_nodes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_nodes must be >= 1"):
        InProcessGrid(echo_app(), 0)


# --- train messages handed over together (batch-clients) --------------------------------------


def doubling_train_many(calls: list[int], fail_pid: int | None = None, sleep: float = 0.0):
    """A ``train_many`` that answers like echo_app's train, failing one partition on purpose."""
    import time

    def train_many(messages: list[Message], contexts: list[Context]) -> list:
        calls.append(len(messages))
        time.sleep(sleep)
        out = []
        for message, context in zip(messages, contexts):
            pid = int(context.node_config["partition-id"])
            if pid == fail_pid:
                out.append(RuntimeError(f"partition {pid} fails on purpose"))
                continue
            context.state["seen"] = MetricRecord({"n": 1})
            x = message.content["arrays"]["x"].numpy()
            out.append(Message(RecordDict({"arrays": ArrayRecord({"y": Array(2 * x)}),
                                           "metrics": MetricRecord({"pid": pid})}),
                               reply_to=message))
        return out

    return train_many


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_train_messages_go_to_train_many_together(identity, timeout) -> None:  # noqa: ANN001
    calls: list[int] = []
    grid = InProcessGrid(echo_app(), 4, train_many=doubling_train_many(calls, fail_pid=2))
    messages = train_messages(grid)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    assert calls == [4]  # one call for the round's four train messages
    assert {r.metadata.reply_to_message_id for r in replies} == \
        {m.metadata.message_id for m in messages}
    failed = [r for r in replies if r.has_error()]
    assert len(failed) == 1 and "partition 2 fails on purpose" in failed[0].error.reason
    assert failed[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert sorted(int(r.content["metrics"]["pid"]) for r in replies if not r.has_error()) == \
        [0, 1, 3]
    # Node state written by train_many is kept (with a timeout: adopted once it answered).
    pid2 = {grid.contexts[n].node_config["partition-id"]: n for n in grid.contexts}[2]
    assert all("seen" in grid.contexts[n].state for n in grid.contexts if n != pid2)
    # Queries still go to the ClientApp, one by one.
    (query,) = grid.send_and_receive([grid.create_message(
        RecordDict(), MessageType.QUERY, grid.get_node_ids()[0], "q")])
    assert "query is broken on purpose" in query.error.reason and calls == [4]


def test_train_many_past_the_groups_deadline_loses_every_reply(identity) -> None:  # noqa: ANN001
    calls: list[int] = []
    grid = InProcessGrid(echo_app(), 2, train_many=doubling_train_many(calls, sleep=0.5))
    replies = list(grid.send_and_receive(train_messages(grid), timeout=0.1))  # 0.2 s for two
    assert replies == [] and grid.messages_timed_out == 2
    assert not any("seen" in c.state for c in grid.contexts.values())
