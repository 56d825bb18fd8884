"""Faulty clients: each test builds a ClientApp that misbehaves on chosen partitions and runs
the real ServerApp against it in process. A bad reply must be rejected, logged, counted in the
round's record and never averaged; a slow or crashing client is dropped for the round; too few
usable replies retry the round or stop the run with a clear error."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

import fedwa.apps.client_app as real
from fedwa.run.config import resolve_config
from fedwa.common.errors import TooFewRepliesError
from fedwa.flower.local_backend import run_in_process
from fedwa.callbacks.results import read_rounds
from fedwa.apps.server_app import build_server_app

SMALL = {"dataset": "digits", "model": "mlp", "num-clients": 3, "num-server-rounds": 2,
         "local-steps": 5, "imbalance-ratio": 1.0}

Corrupt = Callable[[Message, Context], Message]


def faulty_app(corrupt: Corrupt, partitions: set[int],
               attempts: set[int] | None = None) -> ClientApp:
    """fedwa's ClientApp, except that ``train`` replies of ``partitions`` go through
    ``corrupt`` (only on the n-th train message of a node for n in ``attempts``, if given)."""
    app = ClientApp()
    seen: dict[int, int] = {}

    @app.train()
    def train(message: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        seen[pid] = seen.get(pid, 0) + 1
        if pid in partitions and (attempts is None or seen[pid] in attempts):
            return corrupt(message, context)
        return real.train(message, context)

    app.query()(real.query)
    app.evaluate()(real.evaluate)
    return app


def run(tmp_path: Path, app: ClientApp, **overrides: object) -> tuple[list[dict], Path]:
    config = resolve_config({**SMALL, "output-dir": str(tmp_path), **overrides})
    run_dir = tmp_path / "run"
    run_in_process(build_server_app(config, run_dir, plot=False), app,
                   int(config["num-clients"]), seed=int(config["seed"]))
    return read_rounds(run_dir), run_dir


def _reply(reply: Message, content: RecordDict) -> Message:
    reply.__dict__["_content"] = content  # same metadata: still the answer to its instruction
    return reply


def changed(edit: Callable[[dict[str, np.ndarray]], None]) -> Corrupt:
    """A client that trains honestly, then edits its arrays before replying."""
    def corrupt(message: Message, context: Context) -> Message:
        reply = real.train(message, context)
        arrays = {k: np.array(v.numpy()) for k, v in reply.content["arrays"].items()}
        edit(arrays)
        return _reply(reply, RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in
                                                                arrays.items()}),
                                         "metrics": reply.content["metrics"]}))
    return corrupt


def first_weight(arrays: dict[str, np.ndarray]) -> str:
    return next(k for k, v in arrays.items() if v.ndim == 2)


def put_nan(arrays: dict[str, np.ndarray]) -> None:
    arrays[first_weight(arrays)][0, 0] = np.nan


def put_inf(arrays: dict[str, np.ndarray]) -> None:
    arrays[first_weight(arrays)][0, 0] = np.inf


def wrong_shape(arrays: dict[str, np.ndarray]) -> None:
    name = first_weight(arrays)
    arrays[name] = arrays[name][:, :-1].copy()


def wrong_dtype(arrays: dict[str, np.ndarray]) -> None:
    name = first_weight(arrays)
    arrays[name] = arrays[name].astype(np.float64)


def missing_array(arrays: dict[str, np.ndarray]) -> None:
    del arrays[first_weight(arrays)]


def no_arrays(message: Message, context: Context) -> Message:
    reply = real.train(message, context)
    return _reply(reply, RecordDict({"metrics": reply.content["metrics"]}))


def crashes(message: Message, context: Context) -> Message:
    raise RuntimeError("the node's disk is full")


@pytest.mark.parametrize(("corrupt", "reason"), [
    (changed(put_nan), "NaN or inf"),
    (changed(put_inf), "NaN or inf"),
    (changed(wrong_shape), "has shape"),
    (changed(wrong_dtype), "has dtype float64, expected float32"),
    (changed(missing_array), "array names differ"),
    (no_arrays, "lacks 'arrays'"),
], ids=["nan", "inf", "shape", "dtype", "missing-array", "missing-record"])
def test_a_bad_reply_is_rejected_counted_and_never_averaged(
        tmp_path: Path, corrupt: Corrupt, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    bad, _ = run(tmp_path / "bad", faulty_app(corrupt, {1}))
    # The same run without node 1's reply at all: what the global model must equal.
    dropped, _ = run(tmp_path / "dropped", faulty_app(crashes, {1}))
    for record in bad[1:]:
        assert record["clients_sampled"] == 3
        assert record["clients_ok"] == 2 and record["clients_rejected"] == 1
        assert record["clients_error"] == 0 and record["clients_missing"] == 0
        assert record["clients_failed"] == 1
        (rejected,) = record["rejected"]
        assert reason in rejected["reason"]
        assert rejected["node"] != 0  # the node id, logged and recorded
    assert [r["loss"] for r in bad] == [r["loss"] for r in dropped]
    assert f"node {bad[1]['rejected'][0]['node']} left out" in caplog.text


def test_a_crashing_client_is_dropped_and_counted_as_an_error(tmp_path: Path) -> None:
    rounds, _ = run(tmp_path, faulty_app(crashes, {0}))
    assert [(r["clients_ok"], r["clients_error"], r["clients_rejected"]) for r in rounds[1:]] \
        == [(2, 1, 0), (2, 1, 0)]
    assert "disk is full" in rounds[1]["rejected"][0]["reason"]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


def sleeps(seconds: float) -> Corrupt:
    def corrupt(message: Message, context: Context) -> Message:
        time.sleep(seconds)
        return real.train(message, context)
    return corrupt


def test_a_client_that_times_out_is_dropped_and_the_round_goes_on(tmp_path: Path) -> None:
    # The timeout leaves room for a process's first training step (torch warms up for ~1 s).
    started = time.perf_counter()
    rounds, _ = run(tmp_path, faulty_app(sleeps(30.0), {2}), **{"round-timeout": 4.0})
    # Partition 2 is the last of the round: it is cut off, not waited for.
    assert time.perf_counter() - started < 2 * 30.0
    assert [(r["clients_ok"], r["clients_missing"], r["clients_failed"]) for r in rounds[1:]] \
        == [(2, 1, 1), (2, 1, 1)]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


def test_a_round_with_fewer_usable_replies_than_the_minimum_stops_the_run(
        tmp_path: Path) -> None:
    with pytest.raises(TooFewRepliesError, match="round 1: only 1 of the 3 sampled clients "
                       r"returned a usable model; min-available-clients is 2"):
        run(tmp_path, faulty_app(changed(put_nan), {0, 2}), **{"min-available-clients": 2})
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"status": "failed"' in summary and "min-available-clients is 2" in summary


def test_a_short_round_is_retried_and_then_goes_on(tmp_path: Path) -> None:
    # Nodes 0 and 2 fail on their first train message only: round 1's retry succeeds.
    app = faulty_app(crashes, {0, 2}, attempts={1})
    rounds, run_dir = run(tmp_path, app, **{"min-available-clients": 2, "round-retries": 1})
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["clients_ok"] for r in rounds[1:]] == [3, 3]
    no_retry = tmp_path / "no-retry"
    with pytest.raises(TooFewRepliesError):
        run(no_retry, faulty_app(crashes, {0, 2}, attempts={1}),
            **{"min-available-clients": 2})


def test_min_available_clients_cannot_exceed_the_clients() -> None:
    from fedwa.common.errors import ConfigError

    with pytest.raises(ConfigError, match="'min-available-clients' = 4 .* at most num-clients"):
        resolve_config({**SMALL, "min-available-clients": 4})


def test_a_reply_record_without_metrics_is_rejected(tmp_path: Path) -> None:
    def no_metrics(message: Message, context: Context) -> Message:
        reply = real.train(message, context)
        return _reply(reply, RecordDict({"arrays": reply.content["arrays"]}))

    rounds, _ = run(tmp_path, faulty_app(no_metrics, {1}), **{"num-server-rounds": 1})
    assert rounds[1]["clients_rejected"] == 1
    assert "lacks 'arrays' or 'metrics'" in rounds[1]["rejected"][0]["reason"]
    assert isinstance(rounds[1]["accuracy"], float)


def test_off_the_main_thread_a_slow_client_is_abandoned_on_a_worker(tmp_path: Path) -> None:
    # Timer signals reach only the main thread: elsewhere the backend abandons a worker.
    import threading

    found: dict = {}

    def body() -> None:
        found["rounds"], _ = run(tmp_path, faulty_app(sleeps(8.0), {1}),
                                 **{"round-timeout": 4.0, "num-server-rounds": 1})

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(120)
    assert [(r["clients_ok"], r["clients_missing"]) for r in found["rounds"][1:]] == [(2, 1)]
