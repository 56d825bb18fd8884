"""TWA-t and TWA-v strategies: candidates, the subspace's centre, gradient rounds, config checks.

Client replies are the run's real MLP (digits) with a few entries moved, so the candidates'
difference lies along ``classifier.bias`` only and every step can be worked out by hand.
Tests of those hand-worked steps run fedwa's earlier settings (``EARLIER``: centred basis, lr
0.05, constant schedule, no weight decay), spelled out; the reference defaults have tests of
their own.
"""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

import fedwa.data.task
from fedwa.run.config import resolve_config
from fedwa.common.errors import ConfigError
from fedwa.core.twa import flatten
from strategies import TWAt, TWAv, build_strategy
from strategies.twa import GRADIENT_ACTION

BASE_CONFIG = {"strategy": "twa-t", "dataset": "digits", "model": "mlp",
               "num-server-rounds": 4, "twa-rounds": 3}
# fedwa's TWA before the reference defaults: the affine hull, projected momentum SGD at a
# constant 0.05, no weight decay.
EARLIER = {"twa-optimizer": "sgd", "twa-basis": "centred", "twa-lr": 0.05,
           "twa-schedule": "constant", "twa-weight-decay": 0.0}
# The authors' main branch (conference version): SGD at lr 2 with the step schedule, weight
# decay 1e-5 on the weights, the uncentred basis. The strategies default to the journal's.
MAIN = {"twa-optimizer": "sgd", "twa-basis": "uncentred", "twa-weight-decay": 1e-5}


@pytest.fixture(scope="module")
def data():
    return fedwa.data.task.federated_data(resolve_config(BASE_CONFIG))


@pytest.fixture(autouse=True)
def cached_data(monkeypatch, data):
    """The strategy builds the model to learn parameter names; load the digits only once.

    Every config here uses the same dataset, so the cached data gives the same shapes.
    """
    monkeypatch.setattr(fedwa.data.task, "federated_data", lambda config: data)


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def twa_t(**overrides) -> TWAt:
    strategy = build_strategy(resolve_config({**BASE_CONFIG, **overrides}))
    assert type(strategy) is TWAt
    return strategy


def base_state(data, model: str = "mlp") -> dict[str, torch.Tensor]:
    config = resolve_config({**BASE_CONFIG, "model": model})
    return {k: v.detach().clone() for k, v in fedwa.data.task.make_model(config, data)
            .state_dict().items()}


def moved(base, changes) -> ArrayRecord:
    """``base`` with ``changes[name]`` added (or, for integer entries, set)."""
    state = {k: v.clone() for k, v in base.items()}
    for name, change in changes.items():
        if torch.is_floating_point(state[name]):
            state[name] += change
        else:
            state[name] = torch.as_tensor(change, dtype=state[name].dtype)
    return ArrayRecord(state)


def reply_to(instruction: Message, arrays: ArrayRecord, examples: int, pid: int) -> Message:
    metrics = MetricRecord({"num-examples": examples, "train-loss": 0.5, "partition-id": pid})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=instruction)


def instruction(node_id: int, arrays: ArrayRecord, server_round: int,
                action: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict({"arrays": arrays,
                               "config": ConfigRecord({"server-round": server_round})}),
                   node_id, action)


# Round r: clients A and B (one example each) send base + s_r +- 0.125 on classifier.bias, so
# the aggregate moves classifier.bias by s_r. From round 3 on, both also add 0.5 to fc2.bias[0].
SHIFTS = {1: 0.3, 2: -0.2, 3: 0.25, 4: -0.05}


def train_round(strategy, base, server_round: int) -> ArrayRecord:
    sent = ArrayRecord(base)
    strategy.sent_arrays = sent  # what configure_train records
    common = {}
    if server_round >= 3:
        common["fc2.bias"] = torch.zeros(128)
        common["fc2.bias"][0] = 0.5
    s = SHIFTS[server_round]
    a = moved(base, {**common, "classifier.bias": s + 0.125})
    b = moved(base, {**common, "classifier.bias": s - 0.125})
    arrays, _ = strategy.aggregate_train(server_round, [
        reply_to(instruction(1, sent, server_round), a, examples=1, pid=0),
        reply_to(instruction(2, sent, server_round), b, examples=1, pid=1)])
    return arrays


def expected_centre(base) -> dict[str, torch.Tensor]:
    # candidates are rounds 3 and 4 only:
    #   classifier.bias: base + (0.25 + (-0.05)) / 2 = base + 0.1
    #   fc2.bias[0]:     base + (0.5 + 0.5) / 2      = base + 0.5
    #   everything else: exactly base
    centre = {k: v.clone() for k, v in base.items()}
    centre["classifier.bias"] += 0.1
    centre["fc2.bias"][0] += 0.5
    return centre


def assert_arrays_close(arrays: ArrayRecord, expected, atol: float) -> None:
    state = arrays.to_torch_state_dict()
    assert list(state) == list(expected)  # the model's names, in its order
    for name, value in expected.items():
        assert state[name].dtype == value.dtype, name
        torch.testing.assert_close(state[name], value, rtol=0, atol=atol, msg=name)


def gradient(base, scale: float) -> dict[str, torch.Tensor]:
    """``scale`` everywhere, ``scale * [0, 1, ..., 9]`` on classifier.bias."""
    grads = {k: torch.full_like(v, scale) for k, v in base.items()}
    grads["classifier.bias"] = scale * torch.arange(10, dtype=torch.float32)
    return grads


def gradient_round(strategy, server_round: int, point: ArrayRecord, base) -> ArrayRecord:
    messages = list(strategy.configure_train(server_round, point, ConfigRecord({}),
                                             FakeGrid(range(1, 11))))
    # A sends g, B sends 3 g, equal example counts: the mean gradient is 2 g, i.e. 2 everywhere
    # and [0, 2, ..., 18] on classifier.bias.
    replies = [reply_to(messages[0], ArrayRecord(gradient(base, 1.0)), examples=5, pid=0),
               reply_to(messages[1], ArrayRecord(gradient(base, 3.0)), examples=5, pid=1)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays


# --- rounds and candidates ---------------------------------------------------------------------


def test_total_rounds_add_the_gradient_rounds():
    assert twa_t().total_rounds() == 7  # 4 training + 3 gradient rounds


def test_candidates_are_the_second_half():
    s = twa_t()
    assert s.start_round == 3  # 4 // 2 + 1
    assert [r for r in range(1, 8) if s.is_candidate(r)] == [3, 4]


@pytest.mark.parametrize("overrides, candidates", [
    # start 8 // 2 + 1 = 5, every 2: 5, 7 (9 is past training)
    ({"num-server-rounds": 8, "twa-every": 2}, [5, 7]),
    # start 2, every 3: 2, 5, 8
    ({"num-server-rounds": 8, "twa-start-round": 2, "twa-every": 3}, [2, 5, 8]),
    # start 1, every 4 of 6: 1, 5
    ({"num-server-rounds": 6, "twa-start-round": 1, "twa-every": 4}, [1, 5]),
])
def test_candidate_rule_with_twa_every(overrides, candidates):
    s = twa_t(**overrides)
    assert [r for r in range(1, 13) if s.is_candidate(r)] == candidates


def test_twa_rounds_are_plain_training_until_the_last_training_round(data):
    s = twa_t()
    base = base_state(data)
    for r in (1, 4):
        messages = list(s.configure_train(r, ArrayRecord(base), ConfigRecord({}),
                                          FakeGrid(range(1, 11))))
        assert len(messages) == 10
        assert {m.metadata.message_type for m in messages} == {MessageType.TRAIN}


# --- subspace and centre -----------------------------------------------------------------------


def test_training_rounds_build_the_subspace_and_return_the_centre(data):
    s = twa_t(**{"twa-basis": "centred"})
    base = base_state(data)
    for r in (1, 2):
        arrays = train_round(s, base, r)
        # plain FedAvg: base + s_r on classifier.bias
        torch.testing.assert_close(arrays.to_torch_state_dict()["classifier.bias"],
                                   base["classifier.bias"] + SHIFTS[r], rtol=0, atol=1e-6)
        assert list(s.models_to_evaluate(r, arrays)) == ["global"]
    arrays = train_round(s, base, 3)
    assert s.subspace is None  # built after the last candidate
    assert list(s.models_to_evaluate(3, arrays)) == ["global"]

    arrays = train_round(s, base, 4)
    assert s.subspace is not None and s.subspace.dim == 1  # two candidates: one direction
    assert s.candidates == []
    # MLP 64-128-128-10: 64*128 + 128 + 128*128 + 128 + 128*10 + 10 = 26122 coordinates
    assert s.subspace.centre.numel() == 26122
    centre = expected_centre(base)
    assert_arrays_close(arrays, centre, atol=1e-6)
    # Entries the candidates agree on are the exact mean, not an approximation.
    state = arrays.to_torch_state_dict()
    assert torch.equal(state["fc1.weight"], base["fc1.weight"])
    assert torch.equal(state["fc2.bias"], centre["fc2.bias"])
    # The basis direction is the difference of the candidates: only classifier.bias moves.
    direction = s.subspace.basis[0]
    assert torch.count_nonzero(direction.abs() > 1e-6) == 10
    torch.testing.assert_close(direction[-10:].abs(), torch.full((10,), 10 ** -0.5),
                               rtol=0, atol=1e-5)

    models = s.models_to_evaluate(4, arrays)
    assert list(models) == ["swa"]
    assert_arrays_close(models["swa"], centre, atol=1e-6)


# --- gradient rounds ---------------------------------------------------------------------------


def trained_through_round_4(data, **overrides):
    s = twa_t(**{**EARLIER, **overrides})
    base = base_state(data)
    point = None
    for r in (1, 2, 3, 4):
        point = train_round(s, base, r)
    return s, base, point


def test_gradient_rounds_send_gradient_messages(data):
    s, base, point = trained_through_round_4(data)
    messages = list(s.configure_train(5, point, ConfigRecord({}), FakeGrid(range(1, 11))))
    assert len(messages) == 10
    assert GRADIENT_ACTION == "train.gradient"
    for m in messages:
        assert m.metadata.message_type == "train.gradient"
        assert m.content["config"]["server-round"] == 5
        sent = m.content["arrays"].to_torch_state_dict()
        for name, value in point.to_torch_state_dict().items():
            assert torch.equal(sent[name], value), name
    assert sorted(m.metadata.dst_node_id for m in messages) == list(range(1, 11))


def test_first_gradient_step_is_the_projected_step(data):
    s, base, point = trained_through_round_4(data)
    arrays = gradient_round(s, 5, point, base)
    # Basis u = +-(1/sqrt(10)) on the 10 entries of classifier.bias, 0 elsewhere; mean g as in
    # gradient_round. First heavy-ball step from x = 0: v = P g, x = -lr v, so
    #   w = c - lr P^T P g,  P^T P g = u (u . g) = mean of g over classifier.bias on those entries
    #   = (0 + 2 + ... + 18) / 10 = 9, and 0 on every other entry.
    # lr = twa-lr = 0.05: classifier.bias moves by -0.05 * 9 = -0.45; nothing else moves
    # (an unprojected step would move every other entry by -0.05 * 2 = -0.1).
    expected = expected_centre(base)
    expected["classifier.bias"] -= 0.45
    assert_arrays_close(arrays, expected, atol=1e-5)
    # Between gradient rounds only the TWA point is evaluated (the centre does not move); the
    # last round (4 + 3 = 7) reports the centre beside it.
    assert list(s.models_to_evaluate(5, arrays)) == ["twa"]
    models = s.models_to_evaluate(7, arrays)
    assert list(models) == ["twa", "swa"]
    assert models["twa"] is arrays
    assert_arrays_close(models["swa"], expected_centre(base), atol=1e-6)
    assert s.point is arrays


def test_second_gradient_step_uses_momentum(data):
    s, base, point = trained_through_round_4(data)
    point = gradient_round(s, 5, point, base)
    arrays = gradient_round(s, 6, point, base)
    # v2 = 0.9 v1 + P g = 1.9 P g; x2 = x1 - lr v2 = -0.05 (1 + 1.9) P g
    #   -> classifier.bias moves by -0.05 * 2.9 * 9 = -1.305 from the centre
    expected = expected_centre(base)
    expected["classifier.bias"] -= 1.305
    assert_arrays_close(arrays, expected, atol=1e-5)


def test_state_dict_round_trip_continues_identically(data):
    s, base, point = trained_through_round_4(data)
    point = gradient_round(s, 5, point, base)
    restored = twa_t(**EARLIER)
    restored.load_state_dict(s.state_dict())
    assert restored.subspace.dim == 1
    for strategy in (s, restored):
        arrays = gradient_round(strategy, 6, point, base)
        expected = expected_centre(base)
        expected["classifier.bias"] -= 1.305  # as in test_second_gradient_step_uses_momentum
        assert_arrays_close(arrays, expected, atol=1e-5)


# --- buffers come from the last global model -----------------------------------------------------


def test_centre_takes_buffers_from_the_last_global(data):
    s = twa_t(model="cnn", **{"twa-basis": "centred"})
    base = base_state(data, "cnn")
    assert "bn1.running_mean" in base and "bn1.num_batches_tracked" in base
    sent = ArrayRecord(base)
    for r, (shift, mean_shift, count) in {3: (0.25, 1.0, 30), 4: (-0.05, 2.0, 40)}.items():
        s.sent_arrays = sent
        changes = {"bn1.running_mean": mean_shift, "bn1.num_batches_tracked": count}
        a = moved(base, {**changes, "classifier.bias": shift})
        b = moved(base, {**changes, "classifier.bias": shift})
        arrays, _ = s.aggregate_train(r, [
            reply_to(instruction(1, sent, r), a, examples=1, pid=0),
            reply_to(instruction(2, sent, r), b, examples=1, pid=1)])
    # learnable: classifier.bias = base + (0.25 - 0.05) / 2 = base + 0.1
    # buffers: the round-4 aggregate's (running_mean + 2, 40 batches), not their mean (+1.5, 35)
    expected = {k: v.clone() for k, v in base.items()}
    expected["classifier.bias"] += 0.1
    expected["bn1.running_mean"] += 2.0
    expected["bn1.num_batches_tracked"] = torch.tensor(40)
    assert s.subspace is not None and s.subspace.dim == 1
    assert "bn1.running_mean" not in s.names
    assert_arrays_close(arrays, expected, atol=1e-6)


# --- TWA-v ---------------------------------------------------------------------------------------


def test_twa_v_needs_a_server_validation_split():
    with pytest.raises(ConfigError, match="server-val-fraction") as info:
        build_strategy(resolve_config({"strategy": "twa-v", "dataset": "digits",
                                       "model": "mlp", "num-server-rounds": 4}))
    assert info.value.key == "server-val-fraction"
    strategy = build_strategy(resolve_config({"strategy": "twa-v", "dataset": "digits",
                                              "model": "mlp", "server-val-fraction": 0.2}))
    assert type(strategy) is TWAv
    assert strategy.total_rounds() == 10  # no extra rounds: it fits on the server


def test_recompute_bn_names():
    assert TWAt.recompute_bn == TWAv.recompute_bn == {"twa", "swa"}


def test_gradient_replies_are_averaged_by_example_count(data):
    s, base, point = trained_through_round_4(data)
    messages = list(s.configure_train(5, point, ConfigRecord({}), FakeGrid(range(1, 11))))
    # weights 3 and 1: (3 * g + 1 * 5 g) / 4 = 2 g, the same mean as gradient_round
    replies = [reply_to(messages[0], ArrayRecord(gradient(base, 1.0)), examples=3, pid=0),
               reply_to(messages[1], ArrayRecord(gradient(base, 5.0)), examples=1, pid=1)]
    arrays, metrics = s.aggregate_train(5, replies)
    expected = expected_centre(base)
    expected["classifier.bias"] -= 0.45
    assert_arrays_close(arrays, expected, atol=1e-5)
    assert metrics["num-examples"] == 4
    assert np.isclose(metrics["train-loss"], 0.5)


@pytest.mark.parametrize("strategy", ["twa-t", "twa-v"])
def test_start_round_after_training_is_a_config_error(strategy):
    # 4 training rounds, first candidate round 5: no round is ever a candidate.
    config = resolve_config({"strategy": strategy, "dataset": "digits", "model": "mlp",
                             "num-server-rounds": 4, "twa-start-round": 5,
                             "server-val-fraction": 0.2})
    with pytest.raises(ConfigError, match="twa-start-round") as info:
        build_strategy(config)
    assert info.value.key == "twa-start-round"


# --- the reference defaults ----------------------------------------------------------------------


def round_changes(server_round: int) -> dict[str, torch.Tensor]:
    """What the aggregate of ``train_round`` adds to the base in that round (3 or 4)."""
    fc2 = torch.zeros(128)
    fc2[0] = 0.5
    return {"classifier.bias": SHIFTS[server_round], "fc2.bias": fc2}


STATE_NAMES = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "classifier.weight",
               "classifier.bias"]  # the MLP's learnable parameters, in flattening order


def flatten_state(arrays: ArrayRecord) -> torch.Tensor:
    return flatten(arrays.to_torch_state_dict(), STATE_NAMES)


def test_defaults_are_the_reference():
    # TWA-v/TWA-t are the journal's variants: its centred basis, AdamW at lr 1e-3 with the
    # cosine schedule and no weight decay; TWA-v: 10 epochs of batches of 128 with BatchNorm
    # in train mode.
    t = twa_t()
    v = build_strategy(resolve_config({"strategy": "twa-v", "dataset": "digits",
                                       "model": "mlp", "server-val-fraction": 0.2}))
    for s in (t, v):
        assert (s.basis, s.optimizer_name, s.lr, s.weight_decay, s.schedule) == (
            "centred", "adamw", 1e-3, 0.0, "cosine")
    assert (v.epochs, v.batch_size, v.bn_mode) == (10, 128, "train")
    # The main branch's optimiser: SGD at lr 2, momentum 0.9, the step schedule; an explicit
    # rate wins.
    sgd = twa_t(**{"twa-optimizer": "sgd"})
    assert (sgd.lr, sgd.momentum, sgd.schedule) == (2.0, 0.9, "step")
    assert twa_t(**{"twa-optimizer": "adamw", "twa-lr": 0.3}).lr == 0.3
    assert twa_t(**{"twa-schedule": "constant"}).schedule == "constant"


@pytest.mark.parametrize("key, value, allowed", [
    ("twa-optimizer", "adam", "one of sgd, adamw"),
    ("twa-lr", -1.0, "0 (the reference's rate) or a number > 0"),
    ("twa-basis", "affine", "one of uncentred, centred"),
    ("twa-schedule", "linear", "one of auto, step, cosine, constant"),
    ("twa-weight-decay", -0.1, "a number >= 0"),
])
def test_bad_twa_settings_are_config_errors(key, value, allowed):
    with pytest.raises(ConfigError) as info:
        resolve_config({**BASE_CONFIG, key: value})
    assert info.value.key == key and str(info.value).endswith(f"not allowed: {allowed}")


def test_bn_mode_is_a_twa_v_key():
    # TWA-t's clients compute their gradients in the ClientApp, BatchNorm in train mode.
    resolve_config({"strategy": "twa-v", "twa-bn-mode": "eval", "server-val-fraction": 0.2})
    with pytest.raises(ConfigError, match="twa-bn-mode belongs to another one"):
        resolve_config({**BASE_CONFIG, "twa-bn-mode": "eval"})


def test_uncentred_subspace_of_two_candidates_has_two_directions(data):
    s = twa_t(**MAIN)
    base = base_state(data)
    for r in (1, 2, 3, 4):
        arrays = train_round(s, base, r)
    # Rounds 3 and 4 are linearly independent: their span has 2 directions (the affine hull
    # 1), and it holds both candidates and the same centre.
    assert s.subspace.dim == 2
    assert_arrays_close(arrays, expected_centre(base), atol=1e-6)
    p = s.subspace.basis
    for candidate in (s.subspace.centre, flatten_state(moved(base, round_changes(3))),
                      flatten_state(moved(base, round_changes(4)))):
        torch.testing.assert_close(p.T @ (p @ candidate), candidate, rtol=0, atol=1e-5)


def test_main_branch_first_gradient_step_projects_onto_the_span_with_weight_decay(data):
    s = twa_t(**MAIN)
    base = base_state(data)
    point = None
    for r in (1, 2, 3, 4):
        point = train_round(s, base, r)
    assert s.names == STATE_NAMES
    arrays = gradient_round(s, 5, point, base)
    # One SGD step from the centre c at lr 2 with coupled decay 1e-5 (first factor of the step
    # schedule: 1): w1 = c - 2 Proj (g + 1e-5 c), Proj the orthogonal projector onto
    # span{w3, w4}, computed here independently by least squares in float64.
    w3 = flatten_state(moved(base, round_changes(3))).double()
    w4 = flatten_state(moved(base, round_changes(4))).double()
    a = torch.stack([w3, w4], dim=1)
    c = (w3 + w4) / 2
    g = flatten_state(ArrayRecord(gradient(base, 2.0))).double()  # the mean gradient, 2 g
    d = g + 1e-5 * c
    projected = a @ torch.linalg.lstsq(a, d[:, None]).solution[:, 0]
    expected = c - 2.0 * projected
    torch.testing.assert_close(flatten_state(arrays).double(), expected, rtol=0, atol=1e-4)
    # The span holds the scale direction c: unlike the centred step, where nothing but
    # classifier.bias moves, every weight moves along c.
    moved_fc1 = arrays.to_torch_state_dict()["fc1.weight"] - base["fc1.weight"]
    assert moved_fc1.abs().max() > 1e-3


def test_step_schedule_runs_over_the_gradient_rounds_and_survives_resume(data):
    # twa-rounds 3, one step each: milestones int(1.5) = 1, int(3.15) = 3, factors 1, 0.1,
    # 0.1. With the EARLIER settings otherwise (lr 0.05, P^T P g = 9 on classifier.bias):
    #   round 5: v1 = Pg,       x1 = -0.05 Pg             -> -0.45
    #   round 6: v2 = 1.9 Pg,   x2 = x1 - 0.005 * 1.9 Pg  -> -0.45 - 0.0855 = -0.5355
    #   round 7: v3 = 2.71 Pg,  x3 = x2 - 0.005 * 2.71 Pg -> -0.5355 - 0.12195 = -0.65745
    s, base, point = trained_through_round_4(data, **{"twa-schedule": "step"})
    point = gradient_round(s, 5, point, base)
    restored = twa_t(**{**EARLIER, "twa-schedule": "step"})
    restored.load_state_dict(s.state_dict())
    assert restored.optimizer.steps == 1
    for strategy in (s, restored):
        current = point
        for r, move in ((6, 0.5355), (7, 0.65745)):
            current = gradient_round(strategy, r, current, base)
            expected = expected_centre(base)
            expected["classifier.bias"] -= move
            assert_arrays_close(current, expected, atol=1e-5)


def test_adamw_gradient_rounds_move_lr_per_round_and_resume(data):
    # AdamW on the single coefficient; the projected mean gradient is u . g = +-90 / sqrt(10)
    # every round. With a constant gradient every bias-corrected step is lr * sign, so the
    # coefficient moves by -0.05 sign(u . g) per round and classifier.bias (u = +-1/sqrt(10)
    # on its entries) by -0.05 / sqrt(10) = -0.0158114 per round, round 6 included after a
    # resume: that needs the step count (with step 1 again the bias correction would give
    # 1.9 / sqrt(1.999) = 1.34 times the move).
    settings = {"twa-optimizer": "adamw"}
    s, base, point = trained_through_round_4(data, **settings)
    point = gradient_round(s, 5, point, base)
    expected = expected_centre(base)
    expected["classifier.bias"] -= 0.05 / math.sqrt(10)
    assert_arrays_close(point, expected, atol=1e-6)
    restored = twa_t(**{**EARLIER, **settings})
    restored.load_state_dict(s.state_dict())
    assert restored.optimizer.steps == 1
    for strategy in (s, restored):
        arrays = gradient_round(strategy, 6, point, base)
        expected = expected_centre(base)
        expected["classifier.bias"] -= 2 * 0.05 / math.sqrt(10)
        assert_arrays_close(arrays, expected, atol=1e-6)


@pytest.fixture(scope="module")
def val_data():
    return fedwa.data.task.federated_data(resolve_config(
        {"strategy": "twa-v", "dataset": "digits", "model": "cnn",
         "server-val-fraction": 0.2}))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_twa_v_fit_uses_the_settings_and_recomputes_bn_first_only_in_eval_mode(
        monkeypatch, val_data, mode):
    import fedwa.core.bn
    import fedwa.core.twa

    monkeypatch.setattr(fedwa.data.task, "federated_data", lambda config: val_data)
    fits, recomputed = [], []
    real_fit, real_recompute = fedwa.core.twa.fit_on_data, fedwa.core.bn.recompute_bn

    def spy_fit(*args, **kwargs):
        fits.append(kwargs)
        return real_fit(*args, **kwargs)

    def spy_recompute(model, x, **kwargs):
        recomputed.append(len(x))
        return real_recompute(model, x, **kwargs)

    monkeypatch.setattr(fedwa.core.twa, "fit_on_data", spy_fit)
    monkeypatch.setattr(fedwa.core.bn, "recompute_bn", spy_recompute)
    s = build_strategy(resolve_config({
        "strategy": "twa-v", "dataset": "digits", "model": "cnn", "num-server-rounds": 4,
        "server-val-fraction": 0.2, "twa-epochs": 2, "twa-bn-mode": mode, **MAIN}))
    base = base_state(val_data, "cnn")
    sent = ArrayRecord(base)
    for r, shift in ((1, 0.0), (2, 0.0), (3, 0.25), (4, -0.05)):
        s.sent_arrays = sent
        replies = [reply_to(instruction(node, sent, r),
                            moved(base, {"classifier.bias": shift + sign * 0.125}),
                            examples=1, pid=node - 1) for node, sign in ((1, 1), (2, -1))]
        arrays, _ = s.aggregate_train(r, replies)
    assert len(fits) == 1
    assert {k: fits[0][k] for k in ("epochs", "batch_size", "optimizer", "lr", "momentum",
                                    "weight_decay", "schedule", "bn_mode")} == {
        "epochs": 2, "batch_size": 128, "optimizer": "sgd", "lr": 2.0, "momentum": 0.9,
        "weight_decay": 1e-5, "schedule": "step", "bn_mode": mode}
    # The pre-fit recomputation at the centre only matters when the fit reads the running
    # statistics.
    assert recomputed == ([len(val_data.server_val()[0])] if mode == "eval" else [])
    models = s.models_to_evaluate(4, arrays)
    assert list(models) == ["twa", "swa", "global"]
    assert {"twa", "swa"} <= s.recompute_bn  # the server recomputes BN before evaluating
    twa_state = models["twa"].to_torch_state_dict()
    # Buffers: the last global model's, not what the fit left behind.
    assert torch.equal(twa_state["bn1.running_mean"], base["bn1.running_mean"])
    assert not torch.equal(twa_state["classifier.bias"],
                           models["swa"].to_torch_state_dict()["classifier.bias"])
