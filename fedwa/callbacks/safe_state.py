"""Checkpoint contents as data that ``torch.load(weights_only=True)`` reads, and loading that
never runs code from a file.

``torch.load(weights_only=False)`` unpickles whatever the file names: a 114-byte
``checkpoint.pt`` whose pickle calls ``os.system`` runs that command on ``--resume``. fedwa
therefore loads every file with ``weights_only=True``, whose unpickler builds tensors,
containers (dict, OrderedDict, list, tuple, set), numbers, strings, bytes and None and refuses
any other global. What a checkpoint holds beyond that is converted before it is saved
(:func:`to_plain`) and back after it is loaded (:func:`from_plain`):

- a numpy array becomes a tagged dict holding a tensor of the same dtype (numpy's random
  state, the arrays of Flower strategies' attribute state), or its raw bytes as a ``uint8``
  tensor where torch has no such dtype (strings, big-endian, datetimes); a numpy scalar is
  kept the same way and comes back as a numpy scalar, so arithmetic on it is unchanged;
- a Flower ``ArrayRecord`` (TWA's point) becomes its arrays' dtype, shape, serialisation type
  and bytes, and comes back byte for byte; a ``MetricRecord`` or ``ConfigRecord`` becomes its
  items.

Anything else (an object array, an arbitrary class instance) is not data: :func:`to_plain`
raises :class:`~fedwa.common.errors.UnsavableStateError` naming where it sits, and the checkpointer
turns checkpoints off with one warning instead of writing a file that could not be read back.

Numpy classes are *not* added to torch's allowed globals for new files: converting arrays to
tensors keeps the checkpoint readable by a plain ``torch.load(path, weights_only=True)`` in
any program. Only a checkpoint of the previous format (1, written with pickled numpy RNG
states) is read with ``numpy.ndarray``, ``numpy.dtype`` and numpy's array and scalar
reconstructors allowed, scoped to that one load (:func:`load_data`): those build an array or a
scalar from a dtype, a shape and bytes, and the elements of an object array are themselves
unpickled under the same restrictions, so allowing them runs no code of the file's choosing.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedwa.common.errors import UnsavableStateError
# Re-exported: the loading half lived here before the layers were split (fedwa.safe_state).
from fedwa.common.safe_load import (UnsafeFileError, globals_named,  # noqa: F401
                                    legacy_numpy_names, load_data, one_line)

#: Tags of the converted values (keys no state dict of fedwa's or Flower's uses).
NDARRAY_TAG = "__fedwa_ndarray__"
ARRAY_RECORD_TAG = "__fedwa_array_record__"
RECORD_TAG = "__fedwa_record__"

#: Plain values ``weights_only=True`` reads as they are.
_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.Size)


# --- to and from plain data ---------------------------------------------------------------------


def _bytes_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """``data`` as a ``uint8`` tensor (saved as a storage, not inside the pickle)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else \
        torch.zeros(0, dtype=torch.uint8)


def _plain_ndarray(array: np.ndarray, where: str, scalar: bool = False) -> dict[str, Any]:
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise UnsavableStateError(f"{where} is a numpy array of dtype {array.dtype} (objects "
                                  "or fields), which a checkpoint cannot hold as data")
    entry: dict[str, Any] = {"dtype": array.dtype.str, "shape": list(array.shape),
                             "scalar": scalar}
    contiguous = np.ascontiguousarray(array)
    try:
        # A copy: the state's own array may change after the checkpoint is taken.
        entry["tensor"] = torch.from_numpy(contiguous.copy())
    except (TypeError, ValueError):  # no torch dtype for it: keep the raw bytes
        entry["bytes"] = _bytes_tensor(contiguous.tobytes())
    return {NDARRAY_TAG: entry}


def _plain_array_record(record: ArrayRecord) -> dict[str, Any]:
    return {ARRAY_RECORD_TAG: [
        (name, {"dtype": str(array.dtype), "shape": [int(n) for n in array.shape],
                "stype": str(array.stype), "data": _bytes_tensor(array.data)})
        for name, array in record.items()]}


def _plain_key(key: Any, where: str) -> Any:
    if isinstance(key, np.generic):  # equal and hashing alike, so lookups still work
        key = key.item()
    if isinstance(key, tuple):
        return tuple(_plain_key(k, where) for k in key)
    if key is None or isinstance(key, (bool, int, float, str, bytes)):
        return key
    raise UnsavableStateError(f"{where} has a key of type {type(key).__qualname__}, which a "
                              "checkpoint cannot hold as data")


def to_plain(value: Any, where: str = "state") -> Any:
    """``value`` with everything ``torch.load(weights_only=True)`` cannot read converted.

    Parameters
    ----------
    value : object
        Tensors, numpy arrays and scalars, Flower records, numbers, strings, bytes, None, and
        dicts, lists and tuples of those, nested.
    where : str
        Where ``value`` sits, for the error message.

    Returns
    -------
    object
        The same structure; tensors are the same objects (they are serialised at once).

    Raises
    ------
    UnsavableStateError
        When ``value`` holds anything else, naming where.
    """
    if isinstance(value, np.generic):  # first: np.float64 and np.str_ subclass float, str
        return _plain_ndarray(np.asarray(value), where, scalar=True)
    if isinstance(value, _ATOMS):
        return value
    if isinstance(value, torch.Tensor):
        # A Parameter or a tensor that requires grad would be saved with autograd metadata.
        return value.detach() if type(value) is not torch.Tensor or value.requires_grad \
            else value
    if isinstance(value, np.ndarray):
        return _plain_ndarray(value, where)
    if isinstance(value, ArrayRecord):
        return _plain_array_record(value)
    if isinstance(value, (MetricRecord, ConfigRecord)):
        return {RECORD_TAG: type(value).__name__,
                "items": to_plain(dict(value), f"{where}.items")}
    if isinstance(value, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        kind = OrderedDict if isinstance(value, OrderedDict) else dict
        return kind((_plain_key(k, where), to_plain(v, f"{where}[{k!r}]"))
                    for k, v in value.items())
    raise UnsavableStateError(f"{where} is a {type(value).__module__}."
                              f"{type(value).__qualname__}, which a checkpoint cannot hold as "
                              "data")


def _array_from(entry: dict[str, Any]) -> np.ndarray | np.generic:
    dtype = np.dtype(str(entry["dtype"]))
    if dtype.hasobject:  # never written by to_plain; a crafted file gets no object arrays
        raise ValueError(f"a checkpointed numpy array of dtype {dtype}")
    shape = tuple(int(n) for n in entry["shape"])
    if "tensor" in entry:
        array = entry["tensor"].numpy().astype(dtype, copy=False).reshape(shape)
    else:
        array = np.frombuffer(entry["bytes"].numpy().tobytes(), dtype=dtype).reshape(shape)
        array = array.copy()  # writable, like the array that was saved
    return array[()] if entry.get("scalar") else array


def from_plain(value: Any) -> Any:
    """Undo :func:`to_plain`: numpy arrays and scalars, Flower records back in place.

    Raises
    ------
    ValueError
        When a tagged entry is malformed (the caller reports the file as unreadable).
    """
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(from_plain(v) for v in value)
    if not isinstance(value, dict):
        return value
    if NDARRAY_TAG in value:
        return _array_from(value[NDARRAY_TAG])
    if ARRAY_RECORD_TAG in value:
        return ArrayRecord({str(name): Array(dtype=str(a["dtype"]),
                                             shape=tuple(int(n) for n in a["shape"]),
                                             stype=str(a["stype"]),
                                             data=a["data"].numpy().tobytes())
                            for name, a in value[ARRAY_RECORD_TAG]})
    if RECORD_TAG in value:
        kind = MetricRecord if value[RECORD_TAG] == "MetricRecord" else ConfigRecord
        return kind(from_plain(value["items"]))
    kind = OrderedDict if isinstance(value, OrderedDict) else dict
    return kind((k, from_plain(v)) for k, v in value.items())


