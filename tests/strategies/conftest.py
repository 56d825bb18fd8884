"""Strategy tests build Flower messages outside a run, which needs a task identity."""

from __future__ import annotations

import random

import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity():  # noqa: ANN201
    """Set what run_simulation sets before messages are made; restore it afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id = 1234
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture(autouse=True)
def keep_random_state():  # noqa: ANN201
    """Leave the global `random` as it was: fedwa samples with a private generator, but a
    Flower parent that samples its own way runs with the global one seeded for the call."""
    state = random.getstate()
    yield
    random.setstate(state)
