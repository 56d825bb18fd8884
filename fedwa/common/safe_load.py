"""Loading files without running code from them.

``torch.load(weights_only=False)`` unpickles whatever the file names: a 114-byte
``checkpoint.pt`` whose pickle calls ``os.system`` runs that command on ``--resume``.
:func:`load_data` is ``torch.load(weights_only=True)``, whose unpickler builds tensors,
containers, numbers, strings, bytes and None and refuses any other global; a refused file is
named in one line by the globals it names, read from its opcodes without building anything
(:func:`globals_named`).

Only a checkpoint of the previous format (1, written with pickled numpy RNG states) is read with
``numpy.ndarray``, ``numpy.dtype`` and numpy's array and scalar reconstructors allowed, scoped to
that one load: those build an array or a scalar from a dtype, a shape and bytes, and the
elements of an object array are themselves unpickled under the same restrictions, so allowing
them runs no code of the file's choosing. CIFAR's pickled batches are read with the same
allow-list (:func:`legacy_numpy_names`, :mod:`fedwa.data.datasets`).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _legacy_numpy_globals() -> list[Any]:
    """The numpy reconstructors a format-1 checkpoint's pickled RNG state names, and the
    dtype classes its dtypes are built as (numpy 2 sets their state on a ``DType`` subclass
    instance); object dtypes are left out."""
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 moved it, numpy 1 has core
    dtypes = getattr(np, "dtypes", None)
    classes = [getattr(dtypes, n) for n in getattr(dtypes, "__all__", ())
               if n.endswith("DType") and n != "ObjectDType"] if dtypes else []
    return [multiarray.multiarray._reconstruct, multiarray.multiarray.scalar, np.ndarray,
            np.dtype, *classes]



# --- loading files -----------------------------------------------------------------------------


class UnsafeFileError(Exception):
    """A file names globals outside what :func:`load_data` reads: it was not loaded.

    ``names`` holds them, read from the pickle's opcodes (nothing was built).
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__(", ".join(names[:3]) + (" ..." if len(names) > 3 else ""))


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global a pickle names, in order, read without running it.

    ``GLOBAL`` carries the name; protocol 4's ``STACK_GLOBAL`` takes the two strings pushed
    before it (how :mod:`pickle` writes them)."""
    import pickletools

    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - a torn pickle: what was read so far
        pass
    return list(dict.fromkeys(names))


def globals_named(path: str | Path) -> list[str]:
    """The globals a file names that ``weights_only`` does not allow by default: from a
    ``torch.save`` zip file's pickle, or every global of a bare pickle; read, never run."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip file: maybe a bare pickle
        pass
    try:
        return _pickle_globals(Path(path).read_bytes())
    except OSError:
        return []


def one_line(err: BaseException) -> str:
    """An exception's message as one line: its first non-empty line, shortened."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def load_data(path: str | Path, *, legacy_numpy: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; nothing in the file is executed.

    Parameters
    ----------
    path : str or Path
        A file written with ``torch.save``.
    legacy_numpy : bool
        Also allow numpy's array and scalar reconstructors (format-1 checkpoints), for this
        load only.

    Raises
    ------
    UnsafeFileError
        The file names a global (a class or function) that data never needs; the message is
        one line naming it.
    Exception
        Whatever torch raises for a file it cannot read (torn, not a torch file).
    """
    try:
        # torch warns about a bare pickle's protocol on stderr: the refusal is the one line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if legacy_numpy:
                with torch.serialization.safe_globals(_legacy_numpy_globals()):
                    return torch.load(path, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message is many lines and, for a bare pickle, may only name an opcode:
        # name the globals themselves.
        names = globals_named(path)
        if legacy_numpy:
            names = [n for n in names if n not in legacy_numpy_names()]
        if names:
            raise UnsafeFileError(names) from None
        raise


def legacy_numpy_names() -> set[str]:
    """``module.name`` of the globals :func:`load_data` allows with ``legacy_numpy``."""
    return {f"{g.__module__}.{g.__qualname__}" for g in _legacy_numpy_globals()}
