"""Request and response bodies of the admin API (pydantic).

Request bodies (``*In``/``*Create``) forbid unknown fields: a typo is a 422, never silently
ignored. Response models describe what the registry/deploy functions return; they exist for the
OpenAPI schema and to filter output, not to carry logic.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from agent.protocol.topics import DEVICE_ID_PATTERN
from fleet_server.registry.devices import TAG_PATTERN

__all__ = [
    "AlertDeviceOut",
    "AlertOut",
    "AlertRuleCreate",
    "AlertRuleOut",
    "ArtifactOut",
    "AuditEntryOut",
    "AuditPage",
    "DeploymentCreate",
    "DeploymentCreated",
    "DeploymentOut",
    "DesiredOut",
    "DeviceCreate",
    "DeviceMonitoringOut",
    "DeviceOut",
    "DeviceRolloutOut",
    "DeviceSummary",
    "DistributionOut",
    "DriftOut",
    "ErrorOut",
    "FleetMonitoringOut",
    "HealthOut",
    "ModelMonitoringOut",
    "ModelSummary",
    "ModelVersionOut",
    "Page",
    "ProvisionOut",
    "RolloutCommandIn",
    "RolloutDeviceOut",
    "RolloutGateOut",
    "RolloutGatesIn",
    "RolloutIn",
    "RolloutOut",
    "RolloutSummaryOut",
    "RolloutWaveOut",
    "SelectorIn",
    "SelectorOut",
    "TokenCreate",
    "TokenOut",
    "error_responses",
]

T = TypeVar("T")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorOut(BaseModel):
    """Every error response: the exception class name and a message naming the problem."""

    error: str = Field(examples=["NotFound"])
    detail: str = Field(examples=["device 'pi-7' not found"])


class HealthOut(BaseModel):
    status: Literal["ok"]


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int = Field(description="items matching the query, over all pages")
    limit: int
    offset: int


# ------------------------------------------------------------------------------------ tokens
class TokenCreate(_In):
    name: str = Field(min_length=1, max_length=200, examples=["ci-publisher"])
    scope: Literal["admin", "publisher", "reader"] = Field(
        description="admin ⊇ publisher ⊇ reader; device tokens come with provisioning")


class TokenOut(BaseModel):
    id: str
    name: str
    scope: str
    token: str = Field(description="the secret, shown only in this response")


# ----------------------------------------------------------------------------------- devices
class DeviceCreate(_In):
    id: str = Field(pattern=f"^{DEVICE_ID_PATTERN}$", examples=["pi-kitchen-1"],
                    description="lower-case letters, digits and '-', starting with a letter or "
                                "digit; never reused")
    profile: str = Field(min_length=1, max_length=100, examples=["rpi4"],
                         description="a device profile known to the server")
    tags: list[Annotated[str, Field(pattern=TAG_PATTERN)]] = Field(
        default_factory=list, max_length=100, examples=[["lab", "site:berlin"]])


class DesiredOut(BaseModel):
    sequence: int
    models: list[dict[str, Any]]
    issued_at: int
    expires_at: int
    published: bool


class DeviceSummary(BaseModel):
    id: str
    profile: str
    tags: list[str]
    created_at: int
    revoked: bool
    revoked_at: int | None
    online: bool
    last_seen_at: int | None
    reported: dict[str, Any] | None
    reported_at: int | None


class DeviceRolloutOut(BaseModel):
    """The device in one rollout that moved it."""

    rollout_id: int
    model: str
    version: str
    status: str = Field(description="the rollout's status")
    wave: int
    outcome: str = Field(description="pending | committed | failed | reverted")
    reason: str | None = Field(description="why it is not committed (e.g. it rolled back by "
                                           "itself, and the device's error)")
    desired_version: str | None
    previous_version: str | None


class DeviceOut(DeviceSummary):
    desired: DesiredOut | None = Field(description="the last signed desired state, if any")
    rollouts: list[DeviceRolloutOut] = Field(
        default_factory=list, description="the rollouts that moved this device, newest first")


class ProvisionOut(BaseModel):
    device: DeviceOut
    provisioning: dict[str, Any] = Field(
        description="the device's provisioning file (holds secrets; shown only here)")


# ------------------------------------------------------------------------------------ models
class ModelSummary(BaseModel):
    name: str
    version: str
    profiles: list[str]
    created_at: int


class ArtifactOut(BaseModel):
    profile: str
    runtime: str
    precision: str
    sha256: str
    length: int
    target_path: str
    manifest_target: str
    created_at: int
    validation: Any = None
    lineage: Any = None
    candidates: Any = None
    task: Any = None


class ModelVersionOut(BaseModel):
    name: str
    version: str
    artifacts: list[ArtifactOut]


# ------------------------------------------------------------------------------- deployments
class SelectorIn(_In):
    """Every criterion set must hold (ids AND all tags AND profile); ``all`` matches every
    live device."""

    devices: list[str] = Field(default_factory=list, max_length=10000)
    tags: list[str] = Field(default_factory=list, max_length=100)
    profiles: list[str] = Field(default_factory=list, max_length=100)
    all: bool = False


class SelectorOut(BaseModel):
    devices: list[str]
    tags: list[str]
    profiles: list[str]
    all: bool = False


class RolloutGatesIn(_In):
    """When a wave passes or fails; fractions are of the wave's devices. Unset fields take
    their defaults. A health gate judges committed devices with ``min_samples`` requests
    (drift: predictions); the worst device decides, and it passes only once
    ``min_reporting`` of the wave's committed devices are judged (it waits until then, or
    until ``report_timeout_s`` after a device committed: see ``on_report_timeout``)."""

    min_committed: float | None = Field(None, description="passes at this committed "
                                        "fraction, 0..1 (default 1)")
    max_failed: float | None = Field(None, description="fails above this failed fraction, "
                                     "0..1 (default 0)")
    bake_s: int | None = Field(None, description="seconds after the wave's last assignment "
                               "or device commit, the later, before it passes (default 0)")
    max_error_rate: float | None = Field(None, description="errors / requests per device, "
                                         "0..1 (default: off)")
    max_p95_ms: float | None = Field(None, description="p95 latency per device, ms (default: "
                                     "each device's profile latency budget)")
    max_psi: float | None = Field(None, description="largest input-feature PSI per device "
                                  "(default: off)")
    min_samples: int | None = Field(None, description="requests (drift: predictions) before "
                                    "a device's health counts (default 100)")
    offline_grace_s: int | None = Field(None, description="an offline device that has not "
                                        "applied its state this long after its assignment "
                                        "fails (default 3600)")
    latency_gate: bool | None = Field(None, description="judge p95 latency at all "
                                      "(default true)")
    min_reporting: float | None = Field(None, description="fraction, (0, 1], of the wave's "
                                        "committed devices that must have min_samples before "
                                        "a health gate passes (default 1: all of them)")
    report_timeout_s: StrictInt | None = Field(None, description="seconds after a device of "
                                               "the wave committed by which a health gate must "
                                               "be able to judge it (default: no deadline, it "
                                               "waits)")
    on_report_timeout: str | None = Field(None, examples=["fail", "exclude"],
                                          description="a device that missed report_timeout_s "
                                          "'fail's the gate once the quorum is out of reach, "
                                          "or is 'exclude'd from the quorum (default fail)")


class RolloutIn(_In):
    """Roll the deployment out in cumulative waves instead of all at once."""

    waves: str | list[str | int | dict[str, int | float]] = Field(
        examples=["5%,25%,100%", ["1", "10%", "all"], [{"size": 2}, {"fraction": 1.0}]],
        description="cumulative waves: counts first, then percentages; the last one is "
                    "100% or 'all'")
    gates: RolloutGatesIn | None = Field(None, description="default: every gate's default")
    on_failure: str = Field("pause", examples=["pause", "rollback"],
                            description="what a failed gate does: 'pause' the rollout, or "
                                        "'rollback' every device it moved")


class DeploymentCreate(_In):
    model: str = Field(min_length=1, max_length=200, examples=["digits-mlp"])
    version: str = Field(min_length=1, max_length=100, examples=["1.0.0"])
    selector: SelectorIn = Field(examples=[{"tags": ["lab"]}, {"all": True}])
    rollout: RolloutIn | None = Field(None, description="waves and gates; without it every "
                                                        "selected device is told at once")


class DeploymentOut(BaseModel):
    id: int
    model: str
    version: str
    selector: SelectorOut
    status: Literal["active", "superseded", "cancelled"]
    created_at: int
    rollout_id: int | None = Field(None, description="its rollout (same id), if it has waves")
    rollout_status: str | None = Field(None, description="running | paused | completed | "
                                       "rolled_back | cancelled | superseded")


class RolloutWaveOut(BaseModel):
    """Counts are of devices still selected."""

    index: int
    target: str | None = Field(description="the wave's cumulative size: '5%', '2' or 'all'")
    assigned: int
    committed: int
    failed: int
    pending: int
    reverted: int


class RolloutGateOut(BaseModel):
    wave: int
    gate: str = Field(description="failed | committed | bake | error_rate | p95_ms | psi")
    value: float | None
    limit: float | None
    ok: bool | None = Field(description="true passed, false failed, null waiting")
    detail: str


class RolloutDeviceOut(BaseModel):
    device_id: str
    wave: int
    active: bool = Field(description="false once the deployment no longer selects it")
    outcome: str = Field(description="pending | committed | failed | reverted")
    reason: str | None
    desired_version: str | None = Field(description="what the rollout wants it to run")
    running_version: str | None = Field(description="what it reports it runs")
    previous_version: str | None
    last_result: str | None
    last_error: str | None
    online: bool
    desired_sequence: int | None = Field(description="the signed desired state that carried "
                                         "the version to it")
    applied_sequence: int | None


class RolloutSummaryOut(BaseModel):
    id: int
    deployment_id: int
    model: str
    version: str
    selector: SelectorOut
    status: str = Field(description="running | paused | completed | rolled_back | cancelled "
                                    "| superseded")
    reason: str | None = Field(description="why it is paused, rolled back, cancelled or "
                                           "superseded")
    wave: int = Field(description="the current wave (0-based)")
    wave_count: int
    waves_text: str
    on_failure: str
    spec: dict[str, Any]
    deployment_status: str
    created_at: int
    wave_started_at: int | None
    updated_at: int | None
    waves: list[RolloutWaveOut]
    gates: list[RolloutGateOut] = Field(description="the latest evaluation")


class RolloutOut(RolloutSummaryOut):
    devices: list[RolloutDeviceOut] = Field(description="every device it moved")


class RolloutCommandIn(_In):
    reason: str | None = Field(None, max_length=500, description="shown in the status")


class DeploymentCreated(DeploymentOut):
    devices: list[str] = Field(description="the live devices the selector matched")
    desired_changed: list[str] = Field(description="devices that got a newly signed state")
    superseded_rollouts: list[int] = Field(
        default_factory=list, description="rollouts of the model this deployment superseded")
    rollout: RolloutOut | None = Field(None, description="its rollout, after the first step")


# ------------------------------------------------------------------------------------- audit
class AuditEntryOut(BaseModel):
    id: int
    at: int
    actor: str
    action: str
    target: str
    before: Any
    after: Any
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditEntryOut]
    chain_intact: bool
    first_broken_id: int | None = Field(
        description="the first row whose hash does not chain (edited or deleted rows)")


# -------------------------------------------------------------------------------- monitoring
class StatsOut(BaseModel):
    """What the devices' summaries say about a set of records (see fleet_server.monitoring)."""

    requests: int
    errors: int
    error_rate: float | None = Field(description="errors / requests; null without requests")
    errors_by_kind: dict[str, int] = Field(description="4xx | 5xx | runtime")
    p50_ms: float | None = Field(description="latency of successful requests, from the "
                                 "merged histograms (the worst device estimate when they do "
                                 "not merge)")
    p95_ms: float | None
    p99_ms: float | None
    max_psi: float | None = Field(description="largest input-feature PSI of any drift window")
    drift_windows: int
    predictions: int = Field(description="predictions the drift windows cover")


class PointOut(BaseModel):
    """One time bucket (server receive time, [start, start + bucket_s))."""

    start: int
    requests: int
    errors: int
    error_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_psi: float | None
    drift_windows: int
    predictions: int
    devices: int = Field(description="devices that sent records in the bucket")
    mean_psi: float | None = Field(description="mean over devices of their largest PSI")


class _Range(BaseModel):
    since: int = Field(description="unix seconds (exclusive), server clock")
    until: int = Field(description="unix seconds (inclusive)")
    bucket_s: int


class DeviceCountsOut(BaseModel):
    total: int = Field(description="every provisioned device, revoked ones included")
    online: int = Field(description="live devices whose last status said online")
    offline: int = Field(description="live devices that are not online")
    revoked: int


class VersionStatsOut(StatsOut):
    version: str
    running_devices: int = Field(description="live devices that report running it")
    reporting_devices: int = Field(description="devices that sent records in the range")


class ModelStatsOut(StatsOut):
    model: str
    running_devices: int
    reporting_devices: int
    versions: list[VersionStatsOut]


class AlertCountsOut(BaseModel):
    pending: int
    firing: int


class FleetMonitoringOut(_Range):
    devices: DeviceCountsOut
    totals: StatsOut
    models: list[ModelStatsOut]
    series: list[PointOut]
    alerts: AlertCountsOut


class VersionSeriesOut(VersionStatsOut):
    series: list[PointOut]


class ModelDeviceOut(StatsOut):
    device: str
    version: str
    profile: str
    online: bool
    revoked: bool
    running: bool = Field(description="the device still reports running this version")
    latency_budget_ms: float | None = Field(description="its profile's latency budget")
    last_at: int | None = Field(description="when its latest record in the range arrived")


class ModelMonitoringOut(_Range):
    model: str
    totals: StatsOut
    versions: list[VersionSeriesOut]
    devices: list[ModelDeviceOut] = Field(description="per device and version; devices that "
                                          "run the model but sent nothing show 0 requests")
    series: list[PointOut]


class RunningOut(BaseModel):
    model: str
    version: str


class DeviceModelOut(StatsOut):
    model: str
    version: str
    running: bool
    last_at: int
    series: list[PointOut]


class DeviceMonitoringOut(_Range):
    device: str
    profile: str
    online: bool
    revoked: bool
    last_seen_at: int | None
    latency_budget_ms: float | None
    running: list[RunningOut]
    totals: StatsOut
    models: list[DeviceModelOut]


class DriftFeatureOut(BaseModel):
    input: str
    feature: int
    psi_max: float | None = Field(description="largest over devices of each device's "
                                  "largest PSI in the bucket")
    psi_mean: float | None = Field(description="mean over devices of the same")
    js_max: float | None
    js_mean: float | None
    samples: int
    devices: int


class DriftDeviceValueOut(BaseModel):
    device: str
    max_psi: float | None
    windows: int


class DriftBucketOut(BaseModel):
    start: int
    max_psi: float | None
    mean_psi: float | None
    windows: int
    predictions: int
    devices: list[DriftDeviceValueOut]
    features: list[DriftFeatureOut]


class TopFeatureOut(BaseModel):
    input: str
    feature: int
    psi: float | None
    js: float | None


class DriftDeviceOut(BaseModel):
    device: str
    versions: list[str]
    windows: int
    predictions: int
    first_max_psi: float | None
    latest_max_psi: float | None
    peak_max_psi: float | None
    latest_at: int
    trend: Literal["rising", "falling", "steady"]
    series: list[float | None] = Field(description="its largest PSI per bucket (null: no "
                                       "window)")
    top_features: list[TopFeatureOut] = Field(description="its latest window's largest")


class DriftOut(_Range):
    model: str
    version: str | None
    device: str | None
    input: str | None
    feature: int | None
    buckets: list[DriftBucketOut]
    devices: list[DriftDeviceOut]


class DistributionOut(_Range):
    model: str
    version: str
    input: str
    feature: int
    kind: str = Field(description="the baseline entry's kind: tabular | image | tensor")
    profile: str = Field(description="the artifact whose baseline is the reference")
    profiles: list[str] = Field(description="profiles whose devices count (same bin edges)")
    device: str | None = Field(None, description="only this device's windows (None: every "
                               "device)")
    edges: list[float] = Field(description="interior bin edges; len(edges) + 1 bins")
    reference: list[float] = Field(description="reference frequency per bin")
    live_counts: list[int] | None = Field(description="live values per bin, summed over "
                                          "windows and devices")
    live: list[float] | None = Field(description="live frequency per bin")
    samples: int
    windows: int
    windows_without_counts: int = Field(description="windows from agents that send no bin "
                                        "counts")
    devices: int
    psi: float | None = Field(description="PSI of the pooled live counts")
    js: float | None


# ------------------------------------------------------------------------------------ alerts
class AlertRuleCreate(_In):
    """A condition on one model's devices; see ``kind``."""

    model: str = Field(min_length=1, max_length=200, examples=["digits"])
    version: str | None = Field(None, min_length=1, max_length=100,
                                description="one version (default: all of them)")
    kind: Literal["drift_psi", "error_rate", "p95_latency"] = Field(
        description="drift_psi: a device's largest input-feature PSI > threshold; "
                    "error_rate: errors/requests > threshold; p95_latency: p95 > threshold "
                    "ms (null: the device profile's latency budget)")
    threshold: float | None = Field(None, allow_inf_nan=False, examples=[0.25])
    min_devices: int = Field(1, ge=1, le=1_000_000,
                             description="devices over the threshold for the rule to hold")
    for_s: int = Field(0, ge=0, le=30 * 86400,
                       description="seconds it must hold before the alert fires")
    window_s: int = Field(300, ge=10, le=7 * 86400,
                          description="each device is judged on this much history")
    min_samples: int = Field(100, ge=1, le=1 << 40, description="requests (drift: "
                             "predictions) a device needs in the window to be judged")
    webhook_url: str | None = Field(None, max_length=2000, description="POSTed a JSON "
                                    "payload when the alert fires and when it resolves")


class AlertRuleOut(BaseModel):
    id: int
    model: str
    version: str | None
    kind: str
    threshold: float | None
    min_devices: int
    for_s: int
    window_s: int
    min_samples: int
    webhook_url: str | None
    created_at: int
    created_by: str


class AlertDeviceOut(BaseModel):
    device: str
    value: float
    limit: float
    samples: int


class AlertOut(BaseModel):
    id: int
    rule_id: int
    rule: dict[str, Any] = Field(description="the rule as it was when the alert began")
    model: str
    kind: str
    state: Literal["pending", "firing", "resolved"]
    started_at: int = Field(description="when the condition began to hold")
    fired_at: int | None
    resolved_at: int | None
    updated_at: int
    devices: list[AlertDeviceOut] = Field(description="the devices over the threshold at the "
                                          "last evaluation that held")
    value: float | None = Field(description="the worst of their values")
    summary: str


_ERROR_TEXT = {
    401: "no token, or an unknown or revoked one",
    403: "the token's scope does not allow this",
    404: "no such thing",
    409: "conflicts with what is stored",
    413: "upload over the server's limit",
    422: "invalid input (names the field, expected against actual)",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route may answer (401 and 422 always)."""
    return {code: {"model": ErrorOut, "description": _ERROR_TEXT[code]}
            for code in sorted({401, 422, *codes})}
