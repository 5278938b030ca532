"""Checks for number flags that typer's `min=`/`max=` cannot state: its bounds are inclusive and let
infinity through, so a timeout or a size that must be positive and finite names one of these as its
callback (click then prints the flag's name with the message)."""

from __future__ import annotations

import math

import typer


def positive(value: float | None) -> float | None:
    """A finite number above 0 (0, inf and nan refused); None when the flag is optional and unset."""
    if value is not None and not 0 < value < math.inf:
        raise typer.BadParameter(f"give a positive number, got {value}")
    return value


def finite(value: float | None) -> float | None:
    """Beside `min=0`, which refuses negatives and nan: inf refused too."""
    if value is not None and math.isinf(value):
        raise typer.BadParameter(f"give a finite number, got {value}")
    return value
