"""Drift monitoring on the device: pure statistics over binned numbers.

See :mod:`agent.drift.stats` for the binning rule shared with ``model_tools.baseline``.
"""

from agent.drift.stats import (
    DEFAULT_EPS,
    PSI_ALERT,
    PSI_WARN,
    FeatureDrift,
    StreamingHistogram,
    bin_counts,
    bin_index,
    compare,
    histograms_for,
    js_divergence,
    psi,
    validate_edges,
)

__all__ = [
    "DEFAULT_EPS",
    "PSI_ALERT",
    "PSI_WARN",
    "FeatureDrift",
    "StreamingHistogram",
    "bin_counts",
    "bin_index",
    "compare",
    "histograms_for",
    "js_divergence",
    "psi",
    "validate_edges",
]
