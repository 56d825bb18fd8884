"""Resolving a user's own code named in the run config as an import path ``module:attribute``.

``model``, ``dataset`` (and ``strategy``) accept such a path. The module is imported the usual
way, so it must be importable from where fedwa runs: installed, or on ``PYTHONPATH`` (e.g.
``PYTHONPATH=. fedwa run --set model=my_model:make_net``). Every failure is a
:class:`~fedwa.common.errors.ConfigError` naming the key, the value and what is allowed, so the CLI
reports it as one line before any engine starts.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

from fedwa.common.errors import ConfigError

# module.sub:attr.attr, each part a Python identifier; kept in step with fedwa.run.config.
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_import_path(value: str) -> bool:
    """Whether ``value`` has the shape ``module:attribute`` (nothing is imported)."""
    return IMPORT_PATH.fullmatch(value) is not None


def load_callable(key: str, value: str, allowed: str) -> tuple[Callable[..., Any], ModuleType]:
    """Import ``module:attribute`` and return the callable with its module.

    Parameters
    ----------
    key : str
        The run-config key being resolved (named in errors).
    value : str
        ``"module:attribute"``; the attribute may be dotted (``module:Class.method``).
    allowed : str
        What the key allows, for the error message.

    Returns
    -------
    tuple of (callable, module)

    Raises
    ------
    ConfigError
        If ``value`` is not an import path, the module cannot be imported, it lacks the
        attribute, or the attribute is not callable.
    """
    if not is_import_path(value):
        raise ConfigError(key, value, allowed)
    module_name, _, attribute = value.partition(":")
    module = import_module(key, value, allowed, module_name)
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, value, f"{allowed} ({module_name} has no attribute "
                              f"{attribute})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(key, value, f"{allowed} ({value} is a {type(obj).__name__}, not "
                          "callable)")
    return obj, module


def import_module(key: str, value: str, allowed: str, module_name: str) -> ModuleType:
    """Import the module of an import path; every failure is one :class:`ConfigError`.

    Parameters
    ----------
    key, value, allowed : str
        The run-config key, its value and what it allows, for the error message.
    module_name : str
        The module part of ``value``.

    Returns
    -------
    module

    Raises
    ------
    ConfigError
        If the module (or something it imports) is missing, or importing it raises anything
        else: a SyntaxError, or an exception its top level raises. The message names the
        exception and the file and line where it happened: that is what a user needs to fix
        their module, and it is known before any engine starts.
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(key, value, f"{allowed} (cannot import {module_name}: {err}; is its "
                          "folder on PYTHONPATH?)") from None
    except Exception as err:  # noqa: BLE001 - whatever the user's module raises at import
        raise ConfigError(key, value, f"{allowed} (importing {module_name} raised "
                          f"{type(err).__name__}{where(err)}: {one_line(err)[:300]})") from None


def where(err: BaseException) -> str:
    """`` at FILE:LINE`` of a SyntaxError, or of the innermost frame of ``err``'s traceback."""
    if isinstance(err, SyntaxError) and err.filename:
        return f" at {err.filename}:{err.lineno}"
    tb = err.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


def accepts(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Whether ``fn`` can be called with these arguments (by its signature; True if unknown)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # builtins without a signature: let the call itself decide
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def has_parameter(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a parameter called ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def signature_text(fn: Callable[..., Any]) -> str:
    """``name(a, b)`` for messages."""
    try:
        return f"{getattr(fn, '__name__', 'it')}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return getattr(fn, "__name__", repr(fn))


def one_line(text: str) -> str:
    """Collapse whitespace so an exception text fits the CLI's one-line error."""
    return " ".join(str(text).split())
