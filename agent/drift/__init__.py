"""Drift monitoring on the device: pure statistics over binned numbers.

See :mod:`agent.drift.stats` for the binning rule shared with ``model_tools.baseline``, and
:mod:`agent.drift.summary` for the windowed summaries sent to the fleet (statistics only).
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
from agent.drift.summary import (
    BASELINE_VERSIONS,
    DRIFT_SUMMARY_KIND,
    MAX_SUMMARY_COUNTS,
    SUMMARY_VERSION,
    DriftMonitor,
    DriftSummary,
    EntryDrift,
)

__all__ = [
    "BASELINE_VERSIONS",
    "DEFAULT_EPS",
    "DRIFT_SUMMARY_KIND",
    "MAX_SUMMARY_COUNTS",
    "PSI_ALERT",
    "PSI_WARN",
    "SUMMARY_VERSION",
    "DriftMonitor",
    "DriftSummary",
    "EntryDrift",
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
