"""The induction filter's threshold: a head takes part for one prompt when its attention mass on the k
demonstration labels, seen from the last position, exceeds T = k / (k + ln n_tokens)."""

from __future__ import annotations

import math

__all__ = ["induction_threshold"]


def induction_threshold(k: int, n_tokens: int) -> float:
    """The induction-filter threshold T = k / (k + ln n_tokens).

    ``k`` is the number of demonstrations, ``n_tokens`` the prompt length in tokens. The paper writes
    ``log`` without a base; this uses the natural log (**open** choice): T ≈ 0.49 / 0.45 / 0.42 at
    n_tokens = 64 / 128 / 256 for k = 4. With n_tokens = 1 the threshold is 1 and no head can pass.
    """
    if k < 1:
        raise ValueError(f"k={k}: the filter needs at least one demonstration (k >= 1)")
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens}: a prompt has at least one token (n_tokens >= 1)")
    return k / (k + math.log(n_tokens))
