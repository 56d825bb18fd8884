"""End-to-end: one malicious client among honest ones, through the real ServerApp in process.

Each test runs fedwa's ClientApp on digits, except that one partition corrupts one kind of
reply (training, handshake, BatchNorm moments, federated evaluation, TWA-t gradients, merges).
The run must complete with finite weights, the bad replies left out, logged and counted
with their node, and, where the honest alternative is well defined, the run must equal the
one where the malicious client's replies are simply missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedwa.apps.client_app as real
from fedwa.flower.arrays import new_array
from fedwa.run.config import resolve_config
from fedwa.flower.local_backend import run_in_process
from fedwa.callbacks.results import read_rounds
from fedwa.apps.server_app import build_server_app

pytestmark = pytest.mark.e2e

SMALL = {"dataset": "digits", "model": "mlp", "num-clients": 4, "num-server-rounds": 2,
         "local-steps": 5, "imbalance-ratio": 1.0}
BAD = 1  # the malicious partition

Handler = Callable[[Message, Context], Message]
#: fedwa's ClientApp handlers, by the (kind, action) they are registered under.
HANDLERS: dict[tuple[str, str | None], Handler] = {
    ("train", None): real.train, ("evaluate", None): real.evaluate,
    ("evaluate", "held_out"): real.evaluate_held_out, ("train", "merge"): real.merge,
    ("query", None): real.query, ("train", "gradient"): real.gradient,
    ("query", "bn_moments"): real.batchnorm_moments,
    ("query", "restore_local_model"): real.restore_local_model,
    ("query", "local_model"): real.local_model,
}


def malicious_app(**corrupt: Callable[[Message, Context], Message]) -> ClientApp:
    """fedwa's ClientApp whose partition :data:`BAD` answers ``kind_action`` messages (e.g.
    ``train``, ``query_bn_moments``) through ``corrupt[...]`` instead."""
    app = ClientApp()
    for (kind, action), handler in HANDLERS.items():
        bad = corrupt.get(f"{kind}_{action}" if action else kind)

        def handle(message: Message, context: Context, handler: Handler = handler,
                   bad: Handler | None = bad) -> Message:
            if bad is not None and int(context.node_config["partition-id"]) == BAD:
                return bad(message, context)
            return handler(message, context)

        register = getattr(app, kind)
        (register(action) if action else register())(handle)
    return app


def run(tmp_path: Path, name: str, app: ClientApp, **overrides: object
        ) -> tuple[list[dict], Path]:
    config = resolve_config({**SMALL, "output-dir": str(tmp_path), **overrides})
    run_dir = tmp_path / name
    run_in_process(build_server_app(config, run_dir, plot=False), app,
                   int(config["num-clients"]), seed=int(config["seed"]))
    return read_rounds(run_dir), run_dir


def with_content(reply: Message, content: RecordDict) -> Message:
    reply.__dict__["_content"] = content  # same metadata: still the answer to its message
    return reply


def crashes(message: Message, context: Context) -> Message:
    raise RuntimeError("this node is down")


def assert_completed_and_finite(run_dir: Path) -> None:
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    saved = torch.load(run_dir / "model.pt")
    assert all(torch.isfinite(v.float()).all() for v in saved.values())


# --- training replies ---------------------------------------------------------------------------


def claims_examples(count: float) -> Handler:
    def corrupt(message: Message, context: Context) -> Message:
        reply = real.train(message, context)
        metrics = MetricRecord({**dict(reply.content["metrics"]), "num-examples": count})
        return with_content(reply, RecordDict({"arrays": reply.content["arrays"],
                                                "metrics": metrics}))
    return corrupt


def garbage_payload(message: Message, context: Context) -> Message:
    """Honest fields, garbage bytes: the declared dtype and shape of the model sent."""
    reply = real.train(message, context)
    arrays = dict(reply.content["arrays"].items())
    name = next(iter(arrays))
    a = arrays[name]
    arrays[name] = new_array(a.dtype, tuple(a.shape), a.stype, b"\x93NUMPY garbage")
    return with_content(reply, RecordDict({"arrays": ArrayRecord(arrays),
                                           "metrics": reply.content["metrics"]}))


def scaled(factor: float) -> Handler:
    """A finite but wrong model: the honest update scaled by ``factor``."""
    def corrupt(message: Message, context: Context) -> Message:
        reply = real.train(message, context)
        arrays = {k: Array(np.asarray(v.numpy() * factor, dtype=v.numpy().dtype))
                  for k, v in reply.content["arrays"].items()}
        return with_content(reply, RecordDict({"arrays": ArrayRecord(arrays),
                                               "metrics": reply.content["metrics"]}))
    return corrupt


@pytest.fixture(scope="module")
def dropped(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The run in which partition BAD's training replies never arrive (it crashes)."""
    rounds, _ = run(tmp_path_factory.mktemp("dropped"), "dropped", malicious_app(train=crashes))
    return rounds


@pytest.mark.parametrize(("corrupt", "reason"), [
    (claims_examples(1e12), "more than the"),
    (claims_examples(float("inf")), "num-examples is inf"),
    (garbage_payload, "payload is not .npy bytes"),
], ids=["1e12-examples", "inf-examples", "garbage-payload"])
def test_a_malicious_training_reply_is_left_out_and_the_run_completes(
        tmp_path: Path, dropped: list[dict], corrupt: Handler, reason: str) -> None:
    # Before: 1e12 examples dictated the average; inf and the garbage bytes ended the run with
    # a traceback (OverflowError in int(); numpy's header parser in aggregation).
    rounds, run_dir = run(tmp_path, "bad", malicious_app(train=corrupt))
    assert_completed_and_finite(run_dir)
    for record in rounds[1:]:
        assert (record["clients_ok"], record["clients_rejected"]) == (3, 1)
        (rejected,) = record["rejected"]
        assert reason in rejected["reason"]
    # Exactly the run without that client.
    assert [r["loss"] for r in rounds] == [r["loss"] for r in dropped]
    assert [r["accuracy"] for r in rounds] == [r["accuracy"] for r in dropped]


# --- the handshake ------------------------------------------------------------------------------


def no_partition_id(message: Message, context: Context) -> Message:
    reply = real.query(message, context)
    info = {k: v for k, v in reply.content["info"].items() if k != "partition-id"}
    return with_content(reply, RecordDict({"info": MetricRecord(info)}))


def test_a_handshake_without_partition_id_leaves_the_node_out(tmp_path: Path) -> None:
    # Before: KeyError('partition-id') in FedwaGrid._handshake ended the run.
    rounds, run_dir = run(tmp_path, "handshake", malicious_app(query=no_partition_id))
    assert_completed_and_finite(run_dir)
    assert [r["clients_sampled"] for r in rounds[1:]] == [3, 3]
    # Counted in round 1's record: the first round asks the nodes for their partition.
    (refused,) = [x for r in rounds for x in r["replies_rejected"] or ()
                  if x["what"] == "handshake"]
    assert refused["reason"] == "handshake lacks 'partition-id'"
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


# --- BatchNorm moments --------------------------------------------------------------------------


def nan_moments(message: Message, context: Context) -> Message:
    reply = real.batchnorm_moments(message, context)
    moments = {k: v.numpy().copy() for k, v in reply.content["moments"].items()}
    moments["sum"][0] = np.nan
    return with_content(reply, RecordDict({
        "moments": ArrayRecord({k: Array(v) for k, v in moments.items()}),
        "metrics": reply.content["metrics"]}))


BN_RUN = {"model": "cnn", "num-clients": 3, "strategy": "swa", "swa-start-round": 1,
          "bn-recompute": "federated"}


def test_nan_batchnorm_moments_are_left_out_and_model_pt_stays_finite(tmp_path: Path) -> None:
    # Before: the run was marked completed with accuracy 0.10 and NaN inside model.pt.
    rounds, run_dir = run(tmp_path, "bn", malicious_app(query_bn_moments=nan_moments), **BN_RUN)
    assert_completed_and_finite(run_dir)
    rejected = [r for r in rounds[-1]["replies_rejected"] if r["what"].startswith("BN")]
    assert rejected and all("moment 'sum' holds NaN or inf" in r["reason"] for r in rejected)
    assert len({r["node"] for r in rejected}) == 1
    # Exactly the run whose node does not answer for its moments; before: 0.10, one class.
    missing, _ = run(tmp_path, "missing", malicious_app(query_bn_moments=crashes), **BN_RUN)
    assert [r["accuracy"] for r in rounds] == [r["accuracy"] for r in missing]
    assert rounds[-1]["accuracy"] > 0.3


# --- federated evaluation counts ----------------------------------------------------------------


def inflated_counts(message: Message, context: Context) -> Message:
    """Claims a thousand times its test split, all classified correctly."""
    reply = real.evaluate_held_out(message, context)
    metrics = dict(reply.content["metrics"])
    total = [t * 1000 for t in metrics["class-total"]]
    return with_content(reply, RecordDict({"metrics": MetricRecord({
        **metrics, "class-total": total, "class-correct": total,
        "num-examples": sum(total), "loss-sum": 0.0})}))


def test_inflated_federated_evaluation_counts_cannot_raise_the_accuracy(tmp_path: Path) -> None:
    rounds, run_dir = run(tmp_path, "inflated", malicious_app(evaluate_held_out=inflated_counts),
                          evaluation="federated")
    missing, _ = run(tmp_path, "missing", malicious_app(evaluate_held_out=crashes),
                     evaluation="federated")
    assert_completed_and_finite(run_dir)
    # The metrics cover the three honest nodes, exactly as when the fourth does not answer.
    assert [r["accuracy"] for r in rounds] == [r["accuracy"] for r in missing]
    assert all(r["evaluated_by"] == 3 for r in rounds)
    assert all("more than the" in x["reason"] for r in rounds for x in r["replies_rejected"]
               if x["what"] == "federated evaluation")


# --- TWA-t gradients and decentralized merges ----------------------------------------------------


def with_lying_first_payload(reply: Message) -> Message:
    """``reply`` with its first array's payload of another shape than its fields declare."""
    arrays = dict(reply.content["arrays"].items())
    name = next(iter(arrays))
    a = arrays[name]
    arrays[name] = new_array(a.dtype, tuple(a.shape), a.stype,
                             Array(np.zeros(3, dtype=a.dtype)).data)
    return with_content(reply, RecordDict({"arrays": ArrayRecord(arrays),
                                           "metrics": reply.content["metrics"]}))


def garbage_gradient(message: Message, context: Context) -> Message:
    return with_lying_first_payload(real.gradient(message, context))


def test_a_lying_gradient_is_left_out_of_twa_t(tmp_path: Path) -> None:
    rounds, run_dir = run(tmp_path, "twa", malicious_app(train_gradient=garbage_gradient),
                          strategy="twa-t", **{"twa-start-round": 1, "twa-rounds": 2})
    assert_completed_and_finite(run_dir)
    gradient_rounds = rounds[3:]
    assert [r["clients_rejected"] for r in rounds[1:3]] == [0, 0]  # training is honest
    assert [r["clients_rejected"] for r in gradient_rounds] == [1, 1]
    assert "payload has shape (3,)" in gradient_rounds[0]["rejected"][0]["reason"]


def list_merged_accuracy(message: Message, context: Context) -> Message:
    reply = real.merge(message, context)
    metrics = {**dict(reply.content["metrics"]), "merged-accuracy": [0.5, 0.5]}
    return with_content(reply, RecordDict({"arrays": reply.content["arrays"],
                                           "metrics": MetricRecord(metrics)}))


def lying_merge(message: Message, context: Context) -> Message:
    """A merged model whose first payload holds another shape than its fields declare."""
    return with_lying_first_payload(real.merge(message, context))


@pytest.mark.parametrize(("corrupt", "reason"), [
    (list_merged_accuracy, "merged-accuracy is [0.5, 0.5], expected a number"),
    (lying_merge, "payload has shape (3,)"),
], ids=["list-merged-accuracy", "lying-payload"])
def test_a_bad_dimat_merge_reply_is_left_out(tmp_path: Path, corrupt: Handler,
                                             reason: str, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    # Before: float([0.5, 0.5]) raised TypeError in the round's record, and the lying payload
    # failed load_state_dict in the evaluation; either ended the run.
    rounds, run_dir = run(tmp_path, "dimat", malicious_app(train_merge=corrupt),
                          strategy="dimat", **{"node-eval-examples": 100, "topology": "full"})
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["clients_failed"] for r in rounds[1:]] == [1, 1]
    assert all(0 <= r["merged_accuracy"] <= 1 for r in rounds[1:])
    assert reason in caplog.text and "left out" in caplog.text
    saved = torch.load(run_dir / "model.pt")
    assert all(torch.isfinite(v.float()).all() for v in saved.values())


# --- robust aggregation ---------------------------------------------------------------------------


def test_fedmedian_bounds_a_finite_but_wrong_client_that_ruins_fedavg(tmp_path: Path) -> None:
    # Scaled weights are well formed: the guard lets them through, the median does not follow.
    app = malicious_app(train=scaled(-50.0))
    fedavg, _ = run(tmp_path, "fedavg", app)
    median, run_dir = run(tmp_path, "fedmedian", malicious_app(train=scaled(-50.0)),
                          strategy="fedmedian")
    assert_completed_and_finite(run_dir)
    assert median[-1]["accuracy"] > fedavg[-1]["accuracy"] + 0.2
    assert median[-1]["accuracy"] > median[0]["accuracy"] + 0.2
