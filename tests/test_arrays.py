"""fedwa.flower.arrays reads and writes Flower's serialised arrays exactly as Flower does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedwa.flower.arrays import (array_view, average_records, record_entries, to_array, to_record,
                                 to_state_dict)

TENSORS = {
    "matrix": torch.randn(3, 4),
    "scalar": torch.tensor(5),
    "counter": torch.arange(7, dtype=torch.int64),
    "double": torch.randn(2, 3, 4, 5).double(),
    "empty": torch.zeros(0, 3),
    "transposed": torch.randn(4, 3).t(),  # not C-contiguous: Flower's own path
    "flags": torch.tensor([True, False]),
}


@pytest.mark.parametrize("name", TENSORS)
def test_written_bytes_are_numpy_saves(name: str) -> None:
    tensor = TENSORS[name]
    ours, flowers = to_array(tensor), Array(tensor.detach().numpy())
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == \
        (flowers.data, flowers.dtype, flowers.shape, flowers.stype)


@pytest.mark.parametrize("name", TENSORS)
def test_read_values_equal_flowers(name: str) -> None:
    array = Array(TENSORS[name].detach().numpy())
    view = array_view(array)
    expected = array.numpy()
    assert view.dtype == expected.dtype and view.shape == expected.shape
    np.testing.assert_array_equal(view, expected)


def test_fortran_ordered_payloads_read_right() -> None:
    values = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(array_view(Array(values)), values)


def test_state_dict_round_trip_owns_its_memory() -> None:
    record = to_record(TENSORS)
    state = to_state_dict(record)
    reference = ArrayRecord(TENSORS).to_torch_state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value)
    state["matrix"].add_(1.0)  # writable, and the record is untouched
    assert torch.equal(to_state_dict(record)["matrix"], TENSORS["matrix"])


@pytest.mark.parametrize("name", TENSORS)
def test_fast_constructors_build_what_flowers_do(name: str) -> None:
    # new_array / new_array_record set Flower's fields directly: a flwr upgrade that renames
    # them or adds state must fail here, not in a run.
    tensor = TENSORS[name]
    ours = to_record({name: tensor})
    flowers = ArrayRecord({name: Array(tensor.detach().numpy())})
    assert ours == flowers
    assert ours[name].is_dirty == flowers[name].is_dirty
    assert ours.object_id == flowers.object_id  # what Flower hashes and ships
    assert ours.count_bytes() == flowers.count_bytes()
    np.testing.assert_array_equal(ours[name].numpy(), flowers[name].numpy())
    assert isinstance(ours[name].shape, tuple) and ours[name].dtype == flowers[name].dtype


def test_record_entries_equal_the_mapping_interface() -> None:
    from flwr.app import ConfigRecord, MetricRecord

    for record in (ConfigRecord({"a": 1, "b": "x", "c": [1.5, 2.5], "d": b"raw"}),
                   MetricRecord({"loss": 0.5, "n": 3}), to_record(TENSORS)):
        entries = record_entries(record)
        assert entries == dict(record)
        entries["new"] = 1  # a copy: the record is untouched
        assert "new" not in record


def test_average_records_equals_the_state_dict_average_bit_for_bit() -> None:
    from fedwa.core.averaging import weighted_average

    gen = torch.Generator().manual_seed(0)
    records = [to_record({
        "conv": torch.randn(64, 3, 3, 3, generator=gen), "n": torch.tensor(3 * k),
        "double": torch.randn(301, generator=gen).double(),
        "half": torch.randn(77, generator=gen).half(),  # not flat-safe: the per-entry path
        "scalar": torch.randn((), generator=gen), "empty": torch.randn(0, 4, generator=gen),
        "transposed": torch.randn(129, 65, generator=gen).t()}) for k in range(5)]
    weights = [1.0, 2.0, 0.5, 3.0, 0.0]
    ours = average_records(records, weights)
    reference = weighted_average([to_state_dict(r) for r in records], weights)
    assert list(ours) == list(reference)
    for name, value in reference.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        assert torch.equal(ours[name], value), name
    assert ours["n"].item() == 12
    # Hand-checked: weights 1, 3 -> 0.25, 0.75 of [0, 4] and [4, 8] = [3, 7].
    pair = [to_record({"w": torch.tensor([0.0, 4.0])}), to_record({"w": torch.tensor([4.0, 8.0])})]
    assert torch.equal(average_records(pair, [1, 3])["w"], torch.tensor([3.0, 7.0]))


def test_average_records_refuses_mismatched_models() -> None:
    a = to_record({"w": torch.zeros(3), "v": torch.zeros(2)})
    with pytest.raises(ValueError, match="entry 'w' is float32 \\(4,\\) in model 1"):
        average_records([a, to_record({"w": torch.zeros(4), "v": torch.zeros(2)})])
    with pytest.raises(ValueError, match="model 1 has entries"):
        average_records([a, to_record({"w": torch.zeros(3)})])
    with pytest.raises(ValueError, match="zero models"):
        average_records([])


def test_average_records_streams_big_models_to_the_same_bits() -> None:
    # Over _BLOCK_ELEMENTS (2**20) elements the state-dict average sums block by block; the
    # records' average adds whole rows as it decodes them. Per element both are c_0 * w_0
    # plus c_k * w_k in order, so the bits must agree, odd sizes and a zero weight included.
    from fedwa.core.averaging import _BLOCK_ELEMENTS, weighted_average

    gen = torch.Generator().manual_seed(1)
    records = [to_record({"big": torch.randn(_BLOCK_ELEMENTS + 1001, generator=gen),
                          "small": torch.randn(37, 3, generator=gen),
                          "double": torch.randn(_BLOCK_ELEMENTS // 3, generator=gen).double()})
               for _ in range(4)]
    weights = [3.0, 0.0, 1.5, 7.0]
    ours = average_records(records, weights)
    reference = weighted_average([to_state_dict(r) for r in records], weights)
    for name, value in reference.items():
        assert torch.equal(ours[name], value), name
    uniform = average_records(records)
    for name, value in weighted_average([to_state_dict(r) for r in records]).items():
        assert torch.equal(uniform[name], value), name
