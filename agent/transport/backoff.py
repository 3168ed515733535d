"""Reconnect and retry delays: a pure function of the attempt number and injected randomness."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, *, base: float, cap: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry ``attempt`` (0 = first retry): "full jitter" exponential.

    Uniform in ``[0, min(cap, base * 2**attempt)]``, so a fleet that lost its broker at the
    same moment does not come back at the same moment.

    Raises:
        ValueError: negative attempt, or base/cap not positive.
    """
    if attempt < 0 or base <= 0 or cap <= 0:
        raise ValueError(f"backoff_delay: attempt >= 0 and base, cap > 0; got {attempt}, "
                         f"{base}, {cap}")
    ceiling = min(cap, base * (2.0 ** min(attempt, 62)))  # float power, same value as 2**k
    return ceiling * rand()
