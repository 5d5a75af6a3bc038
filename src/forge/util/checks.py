"""The value checks every Forge config uses: one wording for one kind of mistake.

Each raises ``ValueError`` naming ``where`` (a dotted config path or an option name), the
value given and what would be valid. ``bool`` is never accepted as a number.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(where: str, value: Any, minimum: int | None = None) -> int:
    """An ``int`` (not a bool), ``>= minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{where} must be an int{bound}, got {value!r}")
    return value


def check_number(where: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number inside the given bounds (closed unless ``*_open``)."""
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high}")
        raise ValueError(f"{where} must be a number {' and '.join(bounds) or '(finite)'}, got {value!r}")
    return float(value)


def check_positive(where: str, value: Any) -> float:
    """A number ``> 0``."""
    return check_number(where, value, 0, low_open=True)


def check_seconds(where: str, value: Any) -> float:
    """A duration: a number of seconds ``> 0``."""
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{where} must be a positive number of seconds, got {value!r}")
    return float(value)


def check_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be True or False, got {value!r}")
    return value


def check_choice(where: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")
    return value
