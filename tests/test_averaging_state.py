"""The stateful averages of fedwa.core.averaging: RunningAverage, ExponentialAverage, WindowAverage.

Every expectation is worked out by hand in the comments; float values are chosen so that the
float32 arithmetic is exact unless a tolerance is given.
"""

import pytest
import torch

from fedwa.core.averaging import ExponentialAverage, RunningAverage, WindowAverage


def state(w, n=0) -> dict[str, torch.Tensor]:
    """A two-entry state: a float tensor ``w`` and an integer counter ``n`` (like BN's)."""
    return {"w": torch.tensor(w, dtype=torch.float32), "n": torch.tensor(n, dtype=torch.int64)}


def assert_state_equal(actual, expected):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


# --- ExponentialAverage ------------------------------------------------------------------------


def test_ema_three_updates_by_hand():
    ema = ExponentialAverage(0.5)
    ema.update(state([0.0, 4.0], 3))
    # v1 = w1 = [0, 4]
    assert_state_equal(ema.average, state([0.0, 4.0], 3))
    ema.update(state([2.0, 0.0], 1))
    # v2 = 0.5 * [0, 4] + 0.5 * [2, 0] = [1, 2]
    assert_state_equal(ema.average, state([1.0, 2.0], 1))
    ema.update(state([4.0, 8.0], 2))
    # v3 = 0.5 * [1, 2] + 0.5 * [4, 8] = [2.5, 5]
    # closed form: d^2 w1 + (1-d) (d w2 + w3) = 0.25*[0, 4] + 0.5*([1, 0] + [4, 8])
    #            = [0, 1] + [2.5, 4] = [2.5, 5]
    # integer counter: the latest (2), not the max (3)
    assert_state_equal(ema.average, state([2.5, 5.0], 2))
    assert ema.count == 3


def test_ema_matches_closed_form_for_random_tensors():
    d, n = 0.9, 7
    gen = torch.Generator().manual_seed(0)
    ws = [{"a": torch.randn(3, 4, generator=gen, dtype=torch.float64),
           "b": torch.randn(5, generator=gen, dtype=torch.float64)} for _ in range(n)]
    ema = ExponentialAverage(d)
    for w in ws:
        ema.update(w)
    for name in ("a", "b"):
        # v_n = d^(n-1) w_1 + (1-d) sum_{i=2..n} d^(n-i) w_i   (1-based i)
        expected = d ** (n - 1) * ws[0][name] + (1 - d) * sum(
            d ** (n - i) * ws[i - 1][name] for i in range(2, n + 1))
        torch.testing.assert_close(ema.average[name], expected, rtol=1e-12, atol=1e-12)
    assert ema.count == 7


def test_ema_closed_form_weights_sum_to_one():
    # Feeding the same constant c every time must give c back: the closed-form weights
    # d^(n-1) + (1-d) (d^(n-2) + ... + 1) = d^(n-1) + 1 - d^(n-1) = 1.
    ema = ExponentialAverage(0.9)
    for _ in range(7):
        ema.update({"w": torch.full((3,), 2.5, dtype=torch.float64)})
    torch.testing.assert_close(ema.average["w"], torch.full((3,), 2.5, dtype=torch.float64))


def test_ema_decay_zero_keeps_the_latest():
    ema = ExponentialAverage(0.0)
    for w in ([1.0, 1.0], [5.0, -3.0], [7.0, 2.0]):
        ema.update(state(w))
    assert_state_equal(ema.average, state([7.0, 2.0]))


def test_ema_does_not_alias_its_input():
    ema = ExponentialAverage(0.5)
    first = state([2.0, 2.0])
    ema.update(first)
    first["w"].add_(100.0)
    ema.update(state([4.0, 0.0]))
    # 0.5 * [2, 2] + 0.5 * [4, 0] = [3, 1]; the +100 on the caller's tensor must not leak in
    assert_state_equal(ema.average, state([3.0, 1.0]))


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1])
def test_ema_rejects_bad_decay(decay):
    with pytest.raises(ValueError, match="decay"):
        ExponentialAverage(decay)


def test_ema_state_dict_round_trip_continues_identically():
    ema = ExponentialAverage(0.5)
    ema.update(state([0.0, 4.0], 3))
    ema.update(state([2.0, 0.0], 1))
    saved = ema.state_dict()
    assert saved["decay"] == 0.5 and saved["count"] == 2

    restored = ExponentialAverage(0.25)  # the decay comes from the state
    restored.load_state_dict(saved)
    assert restored.decay == 0.5 and restored.count == 2
    for avg in (ema, restored):
        avg.update(state([4.0, 8.0], 2))
    # both: 0.5 * [1, 2] + 0.5 * [4, 8] = [2.5, 5]
    assert_state_equal(ema.average, state([2.5, 5.0], 2))
    assert_state_equal(restored.average, state([2.5, 5.0], 2))
    assert restored.count == 3


def test_ema_empty_state_round_trip():
    restored = ExponentialAverage(0.3)
    restored.load_state_dict(ExponentialAverage(0.7).state_dict())
    assert restored.average is None and restored.count == 0 and restored.decay == 0.7
    restored.update(state([1.0, 2.0]))
    assert_state_equal(restored.average, state([1.0, 2.0]))


# --- RunningAverage ----------------------------------------------------------------------------


def test_running_average_is_the_arithmetic_mean():
    avg = RunningAverage()
    assert avg.average is None and avg.count == 0
    avg.update(state([1.0, 2.0], 5))
    assert_state_equal(avg.average, state([1.0, 2.0], 5))
    avg.update(state([3.0, 6.0], 9))
    # ([1, 2] + [3, 6]) / 2 = [2, 4]
    assert_state_equal(avg.average, state([2.0, 4.0], 9))
    avg.update(state([8.0, 1.0], 7))
    # ([1, 2] + [3, 6] + [8, 1]) / 3 = [12, 9] / 3 = [4, 3]; counter: the latest (7), not 9
    assert_state_equal(avg.average, state([4.0, 3.0], 7))
    assert avg.count == 3


def test_running_average_does_not_alias_its_input():
    avg = RunningAverage()
    first = state([2.0, 2.0])
    avg.update(first)
    first["w"].mul_(0.0)
    avg.update(state([4.0, 0.0]))
    # ([2, 2] + [4, 0]) / 2 = [3, 1]
    assert_state_equal(avg.average, state([3.0, 1.0]))


def test_running_average_state_dict_round_trip_continues_identically():
    avg = RunningAverage()
    avg.update(state([1.0, 2.0], 5))
    avg.update(state([3.0, 6.0], 9))
    restored = RunningAverage()
    restored.load_state_dict(avg.state_dict())
    assert restored.count == 2
    for a in (avg, restored):
        a.update(state([8.0, 1.0], 7))
    # the third update weighs 1/3 in both: [2, 4] + ([8, 1] - [2, 4]) / 3 = [4, 3]
    assert_state_equal(avg.average, state([4.0, 3.0], 7))
    assert_state_equal(restored.average, state([4.0, 3.0], 7))
    assert restored.count == 3


def test_running_average_load_copies_the_tensors():
    avg = RunningAverage()
    avg.update(state([1.0, 2.0]))
    saved = avg.state_dict()
    restored = RunningAverage()
    restored.load_state_dict(saved)
    restored.update(state([3.0, 4.0]))  # in-place update of the restored copy only
    assert_state_equal(saved["average"], state([1.0, 2.0]))
    assert_state_equal(restored.average, state([2.0, 3.0]))


def test_running_average_empty_round_trip():
    restored = RunningAverage()
    restored.load_state_dict(RunningAverage().state_dict())
    assert restored.average is None and restored.count == 0


# --- WindowAverage -----------------------------------------------------------------------------


def test_window_average_over_1_2_4_8_with_size_2():
    win = WindowAverage(2)
    assert win.average is None
    seen = []
    for value in (1.0, 2.0, 4.0, 8.0):
        win.update({"w": torch.tensor([value])})
        seen.append(win.average["w"].item())
    # [1] -> 1; [1, 2] -> 1.5; [2, 4] -> 3; [4, 8] -> 6
    assert seen == [1.0, 1.5, 3.0, 6.0]
    assert len(win.states) == 2


def test_window_average_integers_take_the_newest():
    win = WindowAverage(2)
    for w, n in (([1.0], 5), ([2.0], 9), ([4.0], 3)):
        win.update(state(w, n))
    # window holds rounds 2 and 3: w = (2 + 4) / 2 = 3; n = newest (3), not the max (9)
    assert_state_equal(win.average, state([3.0], 3))


def test_window_average_of_size_one_is_the_latest():
    win = WindowAverage(1)
    for w in ([1.0, 2.0], [3.0, -1.0]):
        win.update(state(w))
    assert_state_equal(win.average, state([3.0, -1.0]))


@pytest.mark.parametrize("size", [0, -2])
def test_window_rejects_bad_size(size):
    with pytest.raises(ValueError, match="window size"):
        WindowAverage(size)


def test_window_state_dict_round_trip_continues_identically():
    win = WindowAverage(2)
    for value in (1.0, 2.0, 4.0):
        win.update({"w": torch.tensor([value])})
    restored = WindowAverage(5)  # size comes from the state
    restored.load_state_dict(win.state_dict())
    assert restored.size == 2
    assert restored.average["w"].item() == 3.0  # (2 + 4) / 2
    for w in (win, restored):
        w.update({"w": torch.tensor([8.0])})
    # (4 + 8) / 2 = 6 in both
    assert win.average["w"].item() == 6.0
    assert restored.average["w"].item() == 6.0


def test_window_average_does_not_alias_its_input():
    win = WindowAverage(3)
    first = {"w": torch.tensor([2.0])}
    win.update(first)
    first["w"].add_(10.0)
    win.update({"w": torch.tensor([4.0])})
    assert win.average["w"].item() == 3.0  # (2 + 4) / 2
