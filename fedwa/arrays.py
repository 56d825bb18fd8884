"""Fast reads of Flower's serialised arrays.

Flower ships every array as ``.npy`` bytes and :meth:`flwr.app.Array.numpy` parses the text
header of each one (``ast.literal_eval``) on every read. A model has tens of arrays and a
round reads each several times (reply checks, dtype matching, aggregation, loading on the
client), so with a small model the parsing costs more than the arithmetic. A model's arrays
have a handful of distinct headers: parse each once, then view the bytes directly.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

_MAGIC = b"\x93NUMPY"


@lru_cache(maxsize=4096)
def _layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool] | None:
    """dtype, shape and Fortran order of one ``.npy`` header (version 1.0 prefix included)."""
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]))
    return None if dtype.hasobject else (dtype, tuple(shape), bool(fortran))


def array_view(array: Array) -> np.ndarray:
    """The array's values as a read-only numpy view of its bytes (no copy).

    Falls back to :meth:`Array.numpy` for anything but a version 1.0 ``.npy`` payload, so the
    result always equals what Flower would return.
    """
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != _MAGIC or data[6:8] != b"\x01\x00":
        return array.numpy()
    offset = 10 + int.from_bytes(data[8:10], "little")
    layout = _layout(bytes(data[:offset]))
    if layout is None:
        return array.numpy()
    dtype, shape, fortran = layout
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """:meth:`ArrayRecord.to_torch_state_dict`, without re-parsing headers; the tensors own
    their memory (writable, independent of the record)."""
    return OrderedDict((name, torch.from_numpy(np.array(array_view(array), copy=True)))
                       for name, array in record.items())


@lru_cache(maxsize=4096)
def _header_for(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` version 1.0 header ``numpy.save`` writes for a C-ordered array."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def to_array(tensor: torch.Tensor) -> Array:
    """:meth:`Array.from_torch_tensor` with the header built once per dtype and shape; the
    bytes are the same as ``numpy.save`` writes."""
    values = tensor.detach().cpu().numpy()
    if not values.flags.c_contiguous or values.dtype.hasobject:
        return Array(values)
    descr = np.lib.format.dtype_to_descr(values.dtype)
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray",
                 data=_header_for(descr, tuple(values.shape)) + values.tobytes())


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """:meth:`ArrayRecord.from_torch_state_dict` through :func:`to_array`."""
    return ArrayRecord({name: to_array(tensor) for name, tensor in state.items()})
