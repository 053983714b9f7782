"""How a metric value is written in tables, cards and pages: four decimals, an en dash when missing or not finite."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_value"]


def format_value(value: Any) -> str:
    """``0.6406`` for a number, ``–`` for None/NaN/inf, ``str(value)`` for anything that is not a number."""
    if value is None:
        return "–"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not math.isfinite(value) else f"{value:.4f}"
