import functools
import itertools
import re

import pytest
import torch

from fedwa.models import build_model
from fedwa.core.partial import (
                                group_bytes,
                                group_for_round,
                                layers_of,
                                merge,
                                partition_groups,
                                select,
                                )

CNN_BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


@functools.cache
def _state(name):
    return build_model(name, (1, 8, 8), 3).state_dict()


def _sized_state(sizes):
    # One single-tensor layer per size, named a, b, c, ...
    return {f"{chr(ord('a') + i)}.weight": torch.zeros(s) for i, s in enumerate(sizes)}


def test_layers_of_cnn():
    layers = layers_of(_state("cnn"))
    assert [p for p, _ in layers] == ["conv1", "bn1", "conv2", "bn2", "fc1", "classifier"]
    assert layers[1] == ("bn1", [f"bn1.{e}" for e in CNN_BN])
    assert layers_of({"w": torch.zeros(1), "x.b": torch.zeros(1)}) == [("", ["w"]), ("x", ["x.b"])]


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet20"])
@pytest.mark.parametrize("rule", ["balanced", "round-robin"])
@pytest.mark.parametrize("tau", [1, 2, 3, 4])
def test_groups_cover_every_entry_once_and_keep_layers_whole(model, rule, tau):
    state = _state(model)
    if tau > len(layers_of(state)):  # the mlp has only 3 layers: fc1, fc2, classifier
        with pytest.raises(ValueError, match=f"tau = {tau}"):
            partition_groups(state, tau, rule)
        return
    groups = partition_groups(state, tau, rule)
    assert len(groups) == tau and all(groups)
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(state) and len(flat) == len(set(flat))
    group_of = {n: i for i, g in enumerate(groups) for n in g}
    for _, entries in layers_of(state):
        assert len({group_of[n] for n in entries}) == 1
    for g in groups:  # each group keeps state-dict order
        order = [n for n in state if n in set(g)]
        assert g == order


@pytest.mark.parametrize("rule", ["equal", "balanced", "round-robin"])
def test_tau_one_is_everything(rule):
    state = _state("cnn")
    assert partition_groups(state, 1, rule) == [list(state)]


def test_round_robin_cnn_by_hand():
    # layers 0 conv1, 1 bn1, 2 conv2, 3 bn2, 4 fc1, 5 classifier; tau=2 -> even / odd layers
    groups = partition_groups(_state("cnn"), 2, "round-robin")
    assert groups == [
        ["conv1.weight", "conv2.weight", "fc1.weight", "fc1.bias"],
        [f"bn1.{e}" for e in CNN_BN]
        + [f"bn2.{e}" for e in CNN_BN]
        + ["classifier.weight", "classifier.bias"],
    ]


def test_balanced_by_hand():
    # sizes 10, 10, 10, 30, tau=2; possible cuts: 10|50, 20|40, 30|30 -> the last.
    state = _sized_state([10, 10, 10, 30])
    assert partition_groups(state, 2, "balanced") == [["a.weight", "b.weight", "c.weight"],
                                                      ["d.weight"]]
    # tau=3: 10|10|40 (sum sq 1800), 10|20|30 (1400), 20|10|30 (1400) -> tie, earliest cut wins.
    assert partition_groups(state, 3, "balanced") == [["a.weight"], ["b.weight", "c.weight"],
                                                      ["d.weight"]]
    # tau = number of layers: one layer per group.
    assert partition_groups(state, 4, "balanced") == [[n] for n in state]


def test_balanced_cnn_by_hand():
    # cnn on 1x8x8, 3 classes; element counts per layer:
    # conv1 16*1*9 = 144; bn1 4*16 + 1 = 65; conv2 32*16*9 = 4608; bn2 4*32 + 1 = 129;
    # fc1 32*2*2*64 + 64 = 8256; classifier 64*3 + 3 = 195; total 13397.
    # tau=2 candidate cuts: before fc1 -> 4946 | 8451 (most equal); before bn2 -> 4817 | 8580;
    # before classifier -> 13202 | 195.
    state = _state("cnn")
    first, second = partition_groups(state, 2, "balanced")
    assert sum(state[n].numel() for n in first) == 4946
    assert second == ["fc1.weight", "fc1.bias", "classifier.weight", "classifier.bias"]


def test_balanced_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        sizes = torch.randint(1, 50, (7,), generator=g).tolist()
        state = _sized_state(sizes)
        for tau in (2, 3, 4):
            groups = partition_groups(state, tau, "balanced")
            got = sum(sum(state[n].numel() for n in grp) ** 2 for grp in groups)
            best = min(
                sum(sum(sizes[a:b]) ** 2 for a, b in zip((0, *cuts), (*cuts, len(sizes))))
                for cuts in itertools.combinations(range(1, len(sizes)), tau - 1)
            )
            assert got == best
            # consecutive layers, in order
            assert [n for grp in groups for n in grp] == list(state)


def test_tau_out_of_range_and_bad_rule():
    state = _sized_state([10, 10, 10, 30])
    with pytest.raises(ValueError, match=r"tau = 5.*\(4\)"):
        partition_groups(state, 5, "balanced")
    with pytest.raises(ValueError, match="tau = 7"):
        partition_groups(_state("cnn"), 7, "round-robin")  # cnn has 6 layers
    for rule in ("equal", "balanced", "round-robin"):
        with pytest.raises(ValueError):
            partition_groups(state, 0, rule)
    with pytest.raises(ValueError, match="rule"):
        partition_groups(state, 2, "random")


def test_group_for_round():
    assert [group_for_round(r, 2) for r in range(1, 6)] == [0, 1, 0, 1, 0]
    assert [group_for_round(r, 3) for r in range(1, 5)] == [0, 1, 2, 0]
    assert group_for_round(7, 1) == 0
    with pytest.raises(ValueError):
        group_for_round(0, 2)


def test_select_and_merge():
    base = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0]), "c": torch.tensor([4, 5])}
    picked = select(base, ["c", "a"])
    assert list(picked) == ["c", "a"] and picked["a"] is base["a"]
    with pytest.raises(KeyError):
        select(base, ["z"])

    update = {"b": torch.tensor([9.0]), "c": torch.tensor([7.0, 8.0])}
    merged = merge(base, update)
    assert merged is not base and list(merged) == ["a", "b", "c"]
    assert torch.equal(merged["a"], torch.tensor([1.0, 2.0]))
    assert torch.equal(merged["b"], torch.tensor([9.0]))
    assert merged["c"].dtype == torch.int64 and torch.equal(merged["c"], torch.tensor([7, 8]))
    # base untouched; replaced entries share memory with neither base nor update
    assert torch.equal(base["b"], torch.tensor([3.0]))
    merged["b"].add_(1.0)
    assert float(base["b"]) == 3.0 and float(update["b"]) == 9.0
    assert merged["b"].data_ptr() not in (base["b"].data_ptr(), update["b"].data_ptr())

    with pytest.raises(KeyError):
        merge(base, {"z": torch.tensor([0.0])})
    with pytest.raises(ValueError):
        merge(base, {"a": torch.tensor([1.0, 2.0, 3.0])})


def test_partial_round_trip_replaces_only_the_group():
    # Average group 1 of two mlp states: merging the averaged group into model A changes
    # exactly that group's entries.
    a = build_model("mlp", (1, 2, 2), 2, seed=0).state_dict()
    b = build_model("mlp", (1, 2, 2), 2, seed=1).state_dict()
    group = partition_groups(a, 3, "round-robin")[group_for_round(2, 3)]  # round 2 -> group 1
    assert group == ["fc2.weight", "fc2.bias"]
    avg = {n: (a[n] + b[n]) / 2 for n in group}
    new = merge(a, avg)
    for n in a:
        expected = (a[n] + b[n]) / 2 if n in group else a[n]
        assert torch.equal(new[n], expected)


def test_group_bytes_by_hand():
    state = {
        "x.weight": torch.zeros(2, 3),  # 6 * 4 bytes (float32) = 24
        "x.num_batches_tracked": torch.tensor(0),  # 1 * 8 bytes (int64) = 8
        "y.weight": torch.zeros(5, dtype=torch.float64),  # 5 * 8 = 40
    }
    assert group_bytes(state, ["x.weight", "x.num_batches_tracked"]) == 32
    assert group_bytes(state, list(state)) == 72
    assert group_bytes(state, []) == 0
    # cnn conv1 on one channel: 16*1*3*3 = 144 float32 entries = 576 bytes
    assert group_bytes(_state("cnn"), ["conv1.weight"]) == 576


# --- "equal" groups: weights cut by output rows --------------------------------------------

#: The models as the evidence runs them: Fashion-MNIST for cnn and mlp, CIFAR for resnet20.
REAL_SHAPES = {"cnn": ((1, 28, 28), 10), "mlp": ((1, 28, 28), 10), "resnet20": ((3, 32, 32), 10)}


@functools.cache
def _real_state(name):
    shape, classes = REAL_SHAPES[name]
    return build_model(name, shape, classes).state_dict()


def _piece(name, state):
    """(entry, start, stop) of a piece name, parsed here, not by the code under test."""
    if name in state:
        return name, 0, state[name].shape[0] if state[name].dim() else 1
    match = re.fullmatch(r"(.+)\[(\d+):(\d+)\]", name)
    assert match and match[1] in state, name
    return match[1], int(match[2]), int(match[3])


@pytest.mark.parametrize("model", ["cnn", "resnet20", "mlp"])
@pytest.mark.parametrize("tau", [2, 4, 8])
def test_equal_groups_hold_every_element_exactly_once(model, tau):
    state = _real_state(model)
    groups = partition_groups(state, tau, "equal")
    assert len(groups) == tau and all(groups)
    count = {n: torch.zeros(t.shape[0] if t.dim() else 1, dtype=torch.int64)
             for n, t in state.items()}
    for group in groups:
        pieces = [_piece(p, state) for p in group]
        for entry, start, stop in pieces:
            count[entry][start:stop] += 1
            if (start, stop) == (0, len(count[entry])):
                assert entry in group  # a tensor entirely in one group travels whole
        # state-dict order, rows ascending
        order = list(state)
        assert pieces == sorted(pieces, key=lambda p: (order.index(p[0]), p[1]))
    # Every row (so every element) of every entry in exactly one group.
    assert all(bool((c == 1).all()) for c in count.values()), model
    # What is never cut: 1-D / 0-D tensors and BatchNorm layers (their five entries together).
    group_of = {}
    for i, group in enumerate(groups):
        for p in group:
            group_of.setdefault(_piece(p, state)[0], set()).add(i)
    for name, t in state.items():
        if t.dim() < 2:
            assert name in {p for g in groups for p in g}, name
    for _, entries in layers_of(state):
        if any(n.endswith("running_mean") for n in entries):
            assert len(set().union(*(group_of[n] for n in entries))) == 1


def test_equal_groups_split_fc1_across_groups():
    # The cnn's fc1 (64 x 1568 float32, 95% of the bytes) is what "balanced" cannot cut.
    state = _real_state("cnn")
    groups = partition_groups(state, 4, "equal")
    holders = [i for i, g in enumerate(groups) if any(p.startswith("fc1.weight") for p in g)]
    assert holders == [0, 1, 2, 3]
    # Whole layers: fc1 is one group by itself, with over 90% of the bytes.
    layered = partition_groups(state, 4, "balanced")
    assert ["fc1.weight", "fc1.bias"] in layered
    assert group_bytes(state, ["fc1.weight", "fc1.bias"]) > 0.9 * group_bytes(state, list(state))


def test_equal_groups_by_hand():
    # A 4 x 2 float32 weight (4 rows of 8 bytes) and a bias of 2 (8 bytes, one whole unit):
    # 40 bytes, target 20 per group. Unit boundaries at 0, 8, 16, 24, 32, 40 bytes; 16 and 24
    # are equally near 20 and the earlier wins: rows 0-1 in group 0 (16 bytes), rows 2-3 and
    # the bias in group 1 (24 bytes).
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    state = {"fc.weight": w, "fc.bias": torch.tensor([10.0, 20.0])}
    groups = partition_groups(state, 2, "equal")
    assert groups == [["fc.weight[0:2]"], ["fc.weight[2:4]", "fc.bias"]]
    assert [group_bytes(state, g) for g in groups] == [16, 24]
    # The pieces are views of the rows, under their piece names.
    picked = select(state, groups[1])
    assert list(picked) == ["fc.weight[2:4]", "fc.bias"]
    assert torch.equal(picked["fc.weight[2:4]"], w[2:4]) and picked["fc.bias"] is state["fc.bias"]
    # Two clients, 1 and 3 examples; client b = client a + 4 everywhere. Averaging group 0
    # gives (1 * a + 3 * b) / 4 = a + 3 on rows 0-1 only.
    a = state
    b = {n: t + 4 for n, t in a.items()}
    avg0 = {p: (select(a, [p])[p] + 3 * select(b, [p])[p]) / 4 for p in groups[0]}
    assert torch.equal(avg0["fc.weight[0:2]"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    # Client b writes the average into its own model: rows 0-1 replaced, rows 2-3 and the
    # bias its own.
    b1 = merge(b, avg0)
    assert torch.equal(b1["fc.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0], [9.0, 10.0],
                                                      [11.0, 12.0]]))
    assert torch.equal(b1["fc.bias"], torch.tensor([14.0, 20.0 + 4]))
    assert torch.equal(b["fc.weight"], w + 4)  # b itself untouched
    # Group 1 averaged the next round: the server's model is now the full FedAvg, a + 3.
    avg1 = {p: (select(a, [p])[p] + 3 * select(b, [p])[p]) / 4 for p in groups[1]}
    server = merge(merge(a, avg0), avg1)
    assert torch.equal(server["fc.weight"], w + 3)
    assert torch.equal(server["fc.bias"], torch.tensor([13.0, 23.0]))


def test_merge_rows_checks_and_casts():
    base = {"w": torch.zeros(3, 2), "n": torch.tensor(0)}
    merged = merge(base, {"w[1:3]": torch.ones(2, 2, dtype=torch.float64), "n": torch.tensor(5)})
    assert merged["w"].dtype == torch.float32
    assert torch.equal(merged["w"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(base["w"], torch.zeros(3, 2)) and int(merged["n"]) == 5
    with pytest.raises(ValueError):
        merge(base, {"w[1:3]": torch.ones(1, 2)})  # shape differs from the rows it replaces
    with pytest.raises(ValueError):
        merge(base, {"w[2:4]": torch.ones(2, 2)})  # rows beyond the entry
    with pytest.raises(KeyError):
        merge(base, {"z[0:1]": torch.ones(1, 2)})
    with pytest.raises(ValueError):
        select(base, ["w[2:2]"])  # empty rows


def test_equal_tau_out_of_range():
    state = {"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3)}  # 4 units
    assert len(partition_groups(state, 4, "equal")) == 4
    with pytest.raises(ValueError, match="tau = 5"):
        partition_groups(state, 5, "equal")
