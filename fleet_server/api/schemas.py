"""Request and response bodies of the admin API (pydantic).

Request bodies (``*In``/``*Create``) forbid unknown fields: a typo is a 422, never silently
ignored. Response models describe what the registry/deploy functions return; they exist for the
OpenAPI schema and to filter output, not to carry logic.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from agent.protocol.topics import DEVICE_ID_PATTERN
from fleet_server.registry.devices import TAG_PATTERN

__all__ = [
    "ArtifactOut",
    "AuditEntryOut",
    "AuditPage",
    "DeploymentCreate",
    "DeploymentCreated",
    "DeploymentOut",
    "DesiredOut",
    "DeviceCreate",
    "DeviceOut",
    "DeviceRolloutOut",
    "DeviceSummary",
    "ErrorOut",
    "HealthOut",
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
    (drift: predictions); the worst device decides."""

    min_committed: float | None = Field(None, description="passes at this committed "
                                        "fraction, 0..1 (default 1)")
    max_failed: float | None = Field(None, description="fails above this failed fraction, "
                                     "0..1 (default 0)")
    bake_s: int | None = Field(None, description="seconds after the wave's last assignment "
                               "before it is judged (default 0)")
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
