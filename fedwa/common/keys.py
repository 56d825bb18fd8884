"""A run-config key and the checks keys share: the bottom layer of the configuration.

:class:`Key` is how the core (:mod:`fedwa.run.config`) and every strategy (``config_keys`` on the
class) declare a key: its default, type and allowed values. It lives apart from
:mod:`fedwa.run.config` so that strategies can declare keys without importing the module that
looks strategies up by name: the import graph stays a tree (``tests/test_layers.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedwa.common.errors import ConfigError

Scalar = str | int | float | bool
Check = Callable[[Any], str | None]

#: Bounds of every whole-number key: Flower's ConfigRecord carries integers as 64-bit, and
#: torch and numpy turn larger ones into overflow errors deep inside a run.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
#: Seeds are below 2**32: numpy's legacy generators take no more, and the per-client and
#: per-round seeds derived from the run seed (seed * 1_000_003 + ...) must stay below 2**63
#: for torch.Generator.manual_seed.
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Key:
    """One run-config key.

    Parameters
    ----------
    name : str
        The key as users write it (kebab-case).
    default : str | int | float | bool
        The default; its type is the key's type (an int is accepted where a float is expected).
    help : str
        One line for the README table.
    choices : tuple of str, optional
        The allowed values of a string key.
    check : callable, optional
        Returns ``None`` when the value is fine, else a phrase saying what is allowed.
    """

    name: str
    default: Scalar
    help: str
    choices: tuple[str, ...] | None = None
    check: Check | None = None

    def coerce(self, value: Any) -> Scalar:
        """Return ``value`` as this key's type, or raise :class:`ConfigError`."""
        kind = type(self.default)
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ConfigError(self.name, value, "true or false")
        if kind is int:
            whole = _whole_number(value)
            if whole is None:
                raise ConfigError(self.name, value, "a whole number")
            if not INT_MIN <= whole <= INT_MAX:
                # The key's own range, when it excludes the value, says more (seed: 2**32).
                problem = self.check(whole) if self.check is not None else None
                raise ConfigError(self.name, value, problem or f"a whole number in [{INT_MIN}, "
                                  f"{INT_MAX}] (64-bit)")
            return whole
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ConfigError(self.name, value, "a number")
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(self.name, value, "a number") from None
            except OverflowError:  # an int of hundreds of digits has no float
                raise ConfigError(self.name, value, "a finite number") from None
            if not math.isfinite(number):
                raise ConfigError(self.name, value, "a finite number")
            return number
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `--set run-name=2024` parses as a number; the user meant text
        if not isinstance(value, str):
            raise ConfigError(self.name, value, "a string")
        if "\0" in value:
            # Every string key ends up in a path, an import or a file name, where the OS
            # refuses NUL with a ValueError deep inside the run.
            raise ConfigError(self.name, value, "text without NUL characters")
        return value

    def validate(self, value: Any) -> Scalar:
        """Coerce and check ``value``; return it or raise :class:`ConfigError`."""
        value = self.coerce(value)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(self.name, value, "one of " + ", ".join(self.choices))
        if self.check is not None:
            problem = self.check(value)
            if problem is not None:
                raise ConfigError(self.name, value, problem)
        return value


def _whole_number(value: Any) -> int | None:
    """``value`` as an exact int (an int, a whole float, or the text of either), else None.

    Ints are taken as they are, not through float, so a 400-digit number is not an
    OverflowError and 2**53 + 1 stays exact.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            value = float(value)
        except (ValueError, OverflowError):
            return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None  # is_integer: False for inf, nan
    return None


# --- reusable checks -------------------------------------------------------------------------


def positive(value: float) -> str | None:
    return None if value > 0 else "a number > 0"


def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"a number >= {low:g}"


def unit_fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "a fraction in (0, 1]"


def half_open_fraction(value: float) -> str | None:
    return None if 0 <= value < 1 else "a fraction in [0, 1)"


def closed_fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "a fraction in [0, 1]"


def seed_range(value: int) -> str | None:
    return None if 0 <= value <= SEED_MAX else f"a whole number in [0, {SEED_MAX}] (2**32 - 1)"
