"""Argument checks for the public entry points: each failure a ``CircuitlabError`` that
names the argument, the value it got and what to pass instead."""

from __future__ import annotations

import math
import numbers

from .errors import CircuitlabError


def integer(name: str, value, minimum: int = 1, *, none: bool = False) -> int | None:
    """``value`` as an int of at least ``minimum`` (``None`` passes if ``none``)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if none else "")
        raise CircuitlabError(f"{name}={value!r} is not allowed; pass {allowed}.")
    return int(value)


def number(name: str, value, low: float = -math.inf, high: float = math.inf, *,
           low_open: bool = False, none: bool = False) -> float | None:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if value is None and none:
        return None
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        bounds = (f" in {'(' if low_open else '['}{low}, {high}]" if high < math.inf
                  else f" {'>' if low_open else '>='} {low:g}" if low > -math.inf else "")
        raise CircuitlabError(f"{name}={value!r} is not allowed; pass a finite number{bounds}"
                              + (" or None." if none else "."))
    return float(value)


def one_of(name: str, value, allowed) -> object:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise CircuitlabError(f"{name}={value!r} is not allowed; use one of {list(allowed)}.")
    return value


def text(name: str, value) -> str:
    """``value`` if it is a string that can be encoded as UTF-8."""
    if not isinstance(value, str):
        raise CircuitlabError(f"{name} must be text (a str), not {type(value).__name__}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CircuitlabError(
            f"{name} holds a character that is not valid Unicode text ({err.reason} at "
            f"{err.start}); remove it or decode the text with errors='replace'.") from None
    return value
