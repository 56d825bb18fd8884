"""Fast reads of Flower's serialised arrays.

Flower ships every array as ``.npy`` bytes and :meth:`flwr.app.Array.numpy` parses the text
header of each one (``ast.literal_eval``) on every read. A model has tens of arrays and a
round reads each several times (reply checks, dtype matching, aggregation, loading on the
client), so with a small model the parsing costs more than the arithmetic. A model's arrays
have a handful of distinct headers: parse each once, then view the bytes directly.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

_MAGIC = b"\x93NUMPY"


#: ``Array.stype`` of the payloads fedwa reads: ``.npy`` bytes (what Flower writes for numpy
#: arrays and torch tensors).
NUMPY_STYPE = "numpy.ndarray"

#: Dtype kinds a model, gradient or statistic may hold: bool, integers, floats, complex.
#: Strings, structured (void) and datetime payloads are nothing fedwa averages.
NUMERIC_KINDS = frozenset("biufc")


class PayloadError(ValueError):
    """An :class:`~flwr.app.Array` whose bytes are not the array its fields declare."""


@lru_cache(maxsize=4096)
def _layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool] | None:
    """dtype, shape and Fortran order of one ``.npy`` header (magic and version included).

    None for an object dtype (its bytes are pickles, never read here).
    """
    stream = io.BytesIO(header[8:])
    read = (np.lib.format.read_array_header_1_0 if header[6:8] == b"\x01\x00"
            else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(stream)
    return None if dtype.hasobject else (dtype, tuple(shape), bool(fortran))


def _header_end(data: bytes) -> int | None:
    """Where the values start in ``.npy`` version 1.0 or 2.0 bytes; None for anything else."""
    if data[:6] != _MAGIC:
        return None
    if data[6:8] == b"\x01\x00":
        return 10 + int.from_bytes(data[8:10], "little")
    if data[6:8] == b"\x02\x00":
        return 12 + int.from_bytes(data[8:12], "little")
    return None


def _view(data: bytes, offset: int, dtype: np.dtype, shape: tuple[int, ...],
          fortran: bool) -> np.ndarray:
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def array_view(array: Array) -> np.ndarray:
    """The array's values as a read-only numpy view of its bytes (no copy).

    Falls back to :meth:`Array.numpy` for anything but a version 1.0 ``.npy`` payload, so the
    result always equals what Flower would return. It trusts the payload's own header: replies
    from clients go through :func:`checked_view` (:mod:`fedwa.flower.replies`) first.

    Raises
    ------
    PayloadError
        The payload is shorter than its header declares.
    """
    data = array.data
    if array.stype != NUMPY_STYPE or data[:6] != _MAGIC or data[6:8] != b"\x01\x00":
        return array.numpy()
    offset = 10 + int.from_bytes(data[8:10], "little")
    layout = _layout(bytes(data[:offset]))
    if layout is None:
        return array.numpy()
    dtype, shape, fortran = layout
    if len(data) < offset + math.prod(shape) * dtype.itemsize:
        # np.frombuffer would raise its own ValueError; say what is wrong instead.
        raise PayloadError(f"payload holds {len(data) - offset} value bytes, its header "
                           f"declares {math.prod(shape) * dtype.itemsize}")
    return _view(data, offset, dtype, shape, fortran)


@lru_cache(maxsize=4096)
def _declared_layout(header: bytes, declared_dtype: str, declared_shape: tuple[int, ...]
                     ) -> tuple[np.dtype, tuple[int, ...], bool, int] | str:
    """The layout of a ``.npy`` header checked against an array's declared fields: dtype,
    shape, Fortran order and value bytes, or why they disagree (for :func:`checked_view`)."""
    try:
        layout = _layout(header)
    except Exception as err:  # noqa: BLE001 - numpy's parser raises many kinds on bad text
        return f"unreadable .npy header ({type(err).__name__})"
    if layout is None:
        return "payload holds Python objects (object dtype)"
    dtype, shape, fortran = layout
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None:
        return f"payload dtype {dtype} is not numeric"
    if shape != declared_shape:
        return f"payload has shape {shape}, its header field says {declared_shape}"
    if str(dtype) != declared_dtype:
        return f"payload has dtype {dtype}, its header field says {declared_dtype}"
    return dtype, shape, fortran, math.prod(shape) * dtype.itemsize


def checked_view(array: Array) -> np.ndarray:
    """:func:`array_view` of an array a client sent, after checking that the bytes are what
    the array's fields declare.

    Flower's :class:`~flwr.app.Array` carries ``dtype``, ``shape`` and ``stype`` beside the
    bytes, and nothing ties them together: checks of the declared fields alone let through a
    payload of another shape or dtype, a truncated one, or bytes that are no array at all.

    Raises
    ------
    PayloadError
        ``stype`` is not ``numpy.ndarray``; the bytes are not ``.npy`` version 1.0/2.0; the
        header cannot be read or names an object or non-numeric dtype; its dtype or shape
        differs from the declared ``dtype`` / ``shape``; or the value bytes are too few or
        too many.
    """
    if array.stype != NUMPY_STYPE:
        raise PayloadError(f"serialisation type {array.stype!r}, expected {NUMPY_STYPE!r}")
    data = array.data
    if not isinstance(data, bytes):
        raise PayloadError(f"payload is {type(data).__name__}, expected bytes")
    offset = _header_end(data)
    if offset is None:
        raise PayloadError("payload is not .npy bytes (version 1.0 or 2.0)")
    if len(data) < offset:
        raise PayloadError("payload ends inside its .npy header")
    declared = array.shape
    if type(declared) is not tuple or not all(type(d) is int for d in declared):
        try:
            declared = tuple(int(d) for d in declared)
        except (TypeError, ValueError):
            raise PayloadError(f"declared shape {array.shape!r} is not a tuple of ints") from None
    # A model's arrays have a handful of distinct headers: check each (header, declared
    # fields) pair once; str(dtype) alone costs more than a small array's finiteness check.
    layout = _declared_layout(bytes(data[:offset]), str(array.dtype), declared)
    if isinstance(layout, str):
        raise PayloadError(layout)
    dtype, shape, fortran, size = layout
    if len(data) - offset != size:
        raise PayloadError(f"payload holds {len(data) - offset} value bytes, its shape and "
                           f"dtype need {size}")
    return _view(data, offset, dtype, shape, fortran)


def to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """:meth:`ArrayRecord.to_torch_state_dict`, without re-parsing headers; the tensors own
    their memory (writable, independent of the record)."""
    return OrderedDict((name, _owned_tensor(array_view(array)))
                       for name, array in record.items())


@lru_cache(maxsize=4096)
def _header_for(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` version 1.0 header ``numpy.save`` writes for a C-ordered array."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def new_array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    """``Array(dtype=..., shape=..., stype=..., data=...)`` for fields known to be right.

    Flower's constructor sorts out which of its three signatures was meant and type-checks
    each field, which costs ~4 us an array: on a small model more than its bytes take to copy.
    The fields are set straight into the instance dict, where ``Array.__setattr__`` puts them
    (``tests/test_arrays.py`` checks the result against Flower's own constructor, so a flwr
    upgrade that moves them fails there).
    """
    array = Array.__new__(Array)
    array.__dict__.update(dtype=dtype, shape=shape, stype=stype, data=data)
    return array


def new_array_record(arrays: Mapping[str, Array]) -> ArrayRecord:
    """``ArrayRecord(arrays)`` that keeps the given :class:`~flwr.app.Array` objects.

    Flower's constructor rebuilds every Array through the checked constructor (~7 us each);
    the callers here made them a moment ago and hand them over.
    """
    record = ArrayRecord()
    record.__dict__["_data"].update(arrays)
    return record


RecordT = TypeVar("RecordT", ArrayRecord, ConfigRecord, MetricRecord)


def record_named(content: RecordDict, name: str, kind: type[RecordT]) -> RecordT | None:
    """``content[name]`` when it is a record of ``kind``, else None.

    Instead of ``name in content.array_records`` and the like: Flower's ``array_records``,
    ``config_records`` and ``metric_records`` build a new, type-checked mapping of the
    message's records on every access, once per message and check on a hot path.
    """
    record = content.get(name)
    return record if isinstance(record, kind) else None


def _owned_tensor(values: np.ndarray) -> torch.Tensor:
    """A tensor with its own, writable copy of ``values`` (a read-only view of the bytes)."""
    return torch.from_numpy(np.array(values, copy=True))


def record_entries(record: Any) -> dict[str, Any]:
    """``dict(record)`` for any Flower record, read straight from its storage.

    Going through the record's mapping interface calls a typed ``__getitem__`` per key; the
    run config that travels with every message has about 80 (same Flower internals as
    :func:`new_array_record`, tested in ``tests/test_arrays.py``).
    """
    return dict(record.__dict__["_data"])


def to_array(tensor: torch.Tensor) -> Array:
    """:meth:`Array.from_torch_tensor` with the header built once per dtype and shape; the
    bytes are the same as ``numpy.save`` writes."""
    values = tensor.detach().cpu().numpy()
    if not values.flags.c_contiguous or values.dtype.hasobject:
        return Array(values)
    shape = values.shape
    header = _header_for(values.dtype.str, shape)
    # One copy of the values: straight into the joined bytes (``header + tobytes()`` made two).
    return new_array(values.dtype.name, shape, "numpy.ndarray",
                     b"".join((header, values.data)))


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """:meth:`ArrayRecord.from_torch_state_dict` through :func:`to_array`."""
    return new_array_record({name: to_array(tensor) for name, tensor in state.items()})


#: Dtypes decoded into flat rows by :func:`average_records` (see
#: :func:`fedwa.core.averaging.flat_weighted_average` for why only these).
_FLAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def average_records(records: Sequence[ArrayRecord], weights: Sequence[float] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The weighted average of models as Flower ships them, one model's row at a time.

    Equal bit for bit to ``weighted_average([to_state_dict(r) for r in records], weights)``,
    and decoding costs the same copy as :func:`to_state_dict`, but every model's float32
    (float64) entries land back to back in one row, so the average is ``K`` kernel calls
    rather than ``K`` per entry (:func:`fedwa.core.averaging.flat_weighted_average`'s sum). The
    rows are added up as they are decoded: beyond the replies, memory is two rows per dtype,
    whatever ``K``. Other
    entries (float16, integer counters) go through :func:`~fedwa.core.averaging.weighted_average`.
    The float results are views into one new buffer per dtype.

    Raises
    ------
    ValueError
        If there are no records, or their names, shapes or dtypes differ from the first's.
    """
    from fedwa.core.averaging import normalise_weights, weighted_average

    if not records:
        raise ValueError("cannot average zero models")
    names = list(records[0].keys())
    views = []
    for k, record in enumerate(records):
        if list(record.keys()) != names:
            raise ValueError(f"model {k} has entries {sorted(record.keys())[:5]}..., model 0 "
                             f"{sorted(names)[:5]}...")
        views.append([array_view(record[n]) for n in names])
    layout = [(v.shape, v.dtype) for v in views[0]]
    for k, model in enumerate(views[1:], start=1):
        for name, v, (shape, dtype) in zip(names, model, layout):
            if v.shape != shape or v.dtype != dtype:
                raise ValueError(f"entry {name!r} is {v.dtype} {v.shape} in model {k} but "
                                 f"{dtype} {shape} in model 0")
    result: dict[str, torch.Tensor] = {}
    coefficients = normalise_weights(weights, len(records))
    for dtype in _FLAT_DTYPES:
        group = [i for i, (_, d) in enumerate(layout) if d == dtype]
        if not group:
            continue
        sizes = [math.prod(layout[i][0]) for i in group]
        # One model's row at a time, added to the running sum as it is decoded: the sum
        # flat_weighted_average computes (c_0 * w_0, then + c_k * w_k in reply order, the same
        # kernels on the same 1-d layout, so the same bits), without its K x P buffer, which
        # at 10,000 clients was as large as all the replies together.
        row = np.empty(sum(sizes), dtype=dtype)
        row_tensor = torch.from_numpy(row)
        average: torch.Tensor | None = None
        for c, model in zip(coefficients, views):
            offset = 0
            for i, size in zip(group, sizes):
                row[offset:offset + size] = model[i].reshape(-1)
                offset += size
            if average is None:
                average = torch.mul(row_tensor, c)
            else:
                average.add_(row_tensor, alpha=c)
        assert average is not None  # records is not empty
        for i, piece in zip(group, average.split(sizes)):
            result[names[i]] = piece.view(layout[i][0])
    rest = [i for i in range(len(names)) if names[i] not in result]
    if rest:
        states = [{names[i]: _owned_tensor(model[i]) for i in rest}
                  for model in views]
        result.update(weighted_average(states, weights))
    return {n: result[n] for n in names}
