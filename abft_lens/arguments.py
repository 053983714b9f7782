"""Checks of the public functions' own arguments: one clear :class:`AbftLensError` instead of a deep TypeError or
a silently wrong result (``evaluate(k="4")``, ``evaluate(n_test=2.5)``, ``load_model(123)``, ``device="banana"``).

    from abft_lens.arguments import check_count

    check_count("k", 4)                     # returns 4
    check_count("n_test", None, optional=True)
"""

from __future__ import annotations

import re

from abft_lens.errors import AbftLensError

__all__ = ["check_count", "check_device", "check_text", "resolve_device"]

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


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch  # the foundation stays light: torch only where a device is resolved

    if name == "cuda" and not torch.cuda.is_available():
        raise AbftLensError("device='cuda' was asked for, but torch sees no CUDA device "
                            f"(torch {torch.__version__}).", "use device='cpu', or a CUDA build of torch on a GPU "
                            "machine.", names=("device",))
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
