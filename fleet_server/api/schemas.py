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
    "DeviceSummary",
    "ErrorOut",
    "HealthOut",
    "ModelSummary",
    "ModelVersionOut",
    "Page",
    "ProvisionOut",
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


class DeviceOut(DeviceSummary):
    desired: DesiredOut | None = Field(description="the last signed desired state, if any")


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


class DeploymentCreate(_In):
    model: str = Field(min_length=1, max_length=200, examples=["digits-mlp"])
    version: str = Field(min_length=1, max_length=100, examples=["1.0.0"])
    selector: SelectorIn = Field(examples=[{"tags": ["lab"]}, {"all": True}])


class DeploymentOut(BaseModel):
    id: int
    model: str
    version: str
    selector: SelectorOut
    status: Literal["active", "superseded", "cancelled"]
    created_at: int


class DeploymentCreated(DeploymentOut):
    devices: list[str] = Field(description="the live devices the selector matched")
    desired_changed: list[str] = Field(description="devices that got a newly signed state")


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
