"""Checks of the public functions' own arguments: one clear :class:`AbftLensError` instead of a deep TypeError or
a silently wrong result (``evaluate(k="4")``, ``evaluate(n_test=2.5)``, ``load_model(123)``, ``device="banana"``).

    from abft_lens.arguments import check_count

    check_count("k", 4)                     # returns 4
    check_count("n_test", None, optional=True)
"""

from __future__ import annotations

import re

from abft_lens.errors import AbftLensError

__all__ = ["check_count", "check_device", "check_text"]

DEVICE = re.compile(r"(cpu|cuda(:\d+)?|mps|meta)")


def check_count(name: str, value, *, optional: bool = False, minimum: int = 1):
    """``value`` is an int >= ``minimum`` (bools are not counts), or None when ``optional``; returned as is."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise AbftLensError(f"{name}={value!r} must be {wanted}.", f"pass {name} as {wanted}, e.g. {name}={max(minimum, 4)}.")
    return value


def check_text(name: str, value, example: str) -> str:
    """``value`` is a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise AbftLensError(f"{name}={value!r} must be a non-empty string.", f"pass e.g. {name}={example!r}.")
    return value


def check_device(device) -> str:
    """A torch device name: cpu, cuda, cuda:N (mps, meta)."""
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise AbftLensError(f"device={device!r} is not a device name.", "pass device='cpu' or 'cuda' (or 'cuda:0').")
    return device
