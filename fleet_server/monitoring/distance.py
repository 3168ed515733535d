"""PSI and Jensen-Shannon divergence over binned counts, in plain Python (pure).

The device computes both with numpy (:mod:`agent.drift.stats`); the server has no numpy, yet
needs them once it has pooled the live bin counts of many windows and devices. These are the
same formulas with the same smoothing (a test checks they agree with the device's):

- :func:`psi`: ``sum((q - p) * ln(q / p))`` over bins of the two distributions scaled to sum
  to 1, each frequency raised to at least ``eps`` (1e-4);
- :func:`js_divergence`: ``0.5 KL(p || m) + 0.5 KL(q || m)`` in bits, ``m = (p + q) / 2``,
  empty bins contributing nothing; in ``[0, 1]``.

Misuse (lengths differ, negative or non-finite values, a zero total) raises ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

__all__ = ["DEFAULT_EPS", "frequencies", "js_divergence", "psi"]

#: frequency standing in for an empty bin in :func:`psi` (``agent.drift.stats.DEFAULT_EPS``)
DEFAULT_EPS: Final = 1e-4


def frequencies(values: Sequence[float], what: str = "counts") -> list[float]:
    """``values`` scaled to sum to 1.

    Raises:
        ValueError: a value is negative or not finite, or the total is not positive.
    """
    for i, v in enumerate(values):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}: expected finite counts >= 0, got {v} in bin {i}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(f"{what}: expected a positive total, got {total}")
    return [v / total for v in values]


def _pair(ref: Sequence[float], live: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(ref) != len(live):
        raise ValueError(f"live: expected {len(ref)} bins like the reference, got {len(live)}")
    return frequencies(ref, "reference"), frequencies(live, "live")


def psi(ref: Sequence[float], live: Sequence[float], eps: float = DEFAULT_EPS) -> float:
    """Population stability index of ``live`` against ``ref`` (counts or frequencies).

    Raises:
        ValueError: see the module docstring; or ``eps`` outside ``(0, 1)``.
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps: expected a value in (0, 1), got {eps}")
    p, q = _pair(ref, live)
    return math.fsum((max(b, eps) - max(a, eps)) * math.log(max(b, eps) / max(a, eps))
                     for a, b in zip(p, q, strict=True))


def js_divergence(ref: Sequence[float], live: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits between two binned distributions, in ``[0, 1]``.

    Raises:
        ValueError: see the module docstring.
    """
    p, q = _pair(ref, live)
    total = 0.0
    for a, b in zip(p, q, strict=True):
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log2(a / m)
        if b > 0:
            total += 0.5 * b * math.log2(b / m)
    return min(1.0, max(0.0, total))
