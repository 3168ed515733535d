"""Who should run what: a pure function of devices, deployments and artifacts.

No I/O and no clock reads: the service layer loads rows, calls these functions, and persists
and publishes what they return.

Rules:
- A selector matches a device when every criterion it sets holds: id in ``devices``, ALL of
  ``tags`` on the device, profile in ``profiles``. ``all=True`` matches every device.
- For each model name, the newest active deployment whose selector matches a device decides
  the version that device runs (a later deployment supersedes an earlier one per device, not
  wholesale: devices outside the new selector keep the old version).
- A rollout-backed deployment (``DeploymentView.rollout`` set: the per-device map of
  :func:`fleet_server.rollout.desired`) decides only for the devices its map names, with the
  version the map gives (the rollout's, or the previous one for a reverted device); its
  selector is not consulted. A device it does not name, or names with None (reverted to "no
  version of this model"), keeps what older deployments say.
- The artifact is always the one built for the device's own profile; a deployment that would
  leave a targeted device without one is refused before it is stored.
- A device gets a new signed state (sequence + 1) when its model list changes, or when the
  stored one is within ``refresh_margin`` of expiry. A device with no state yet and nothing
  assigned gets none (no signed "run nothing" before its first deployment).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.protocol.messages import DesiredModel

__all__ = [
    "ArtifactView",
    "DeploymentView",
    "DeviceView",
    "Selector",
    "StoredDesired",
    "compute_desired",
    "matches",
    "missing_artifacts",
    "needs_new_state",
    "targeted",
]


@dataclass(frozen=True)
class Selector:
    devices: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    all: bool = False

    def __post_init__(self) -> None:
        if not (self.all or self.devices or self.tags or self.profiles):
            raise ValueError("an empty selector: set devices, tags or profiles, or all=True")

    def to_dict(self) -> dict[str, object]:
        return {"devices": list(self.devices), "tags": list(self.tags),
                "profiles": list(self.profiles), "all": self.all}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Selector:
        def strs(key: str) -> tuple[str, ...]:
            value = d.get(key) or []
            if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
                raise ValueError(f"selector.{key}: expected a list of strings, got {value!r}")
            return tuple(value)
        return cls(devices=strs("devices"), tags=strs("tags"), profiles=strs("profiles"),
                   all=bool(d.get("all", False)))


@dataclass(frozen=True)
class DeviceView:
    id: str
    profile: str
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DeploymentView:
    id: int  # increasing: a higher id is newer
    model: str
    version: str
    selector: Selector
    #: for a rollout-backed deployment: device id -> the version the rollout wants there
    #: (:func:`fleet_server.rollout.desired`); None: a plain deployment (its selector decides)
    rollout: Mapping[str, str | None] | None = field(default=None, compare=False)

    def version_for(self, device: DeviceView) -> str | None:
        """The version this deployment gives ``device``, or None when it has no say."""
        if self.rollout is not None:
            return self.rollout.get(device.id)
        return self.version if matches(self.selector, device) else None


@dataclass(frozen=True)
class ArtifactView:
    name: str
    version: str
    profile: str
    sha256: str
    length: int
    target_path: str
    manifest_target: str

    def desired(self) -> DesiredModel:
        return DesiredModel(name=self.name, version=self.version, target_path=self.target_path,
                            manifest_target=self.manifest_target, sha256=self.sha256,
                            length=self.length, profile=self.profile)


@dataclass(frozen=True)
class StoredDesired:
    sequence: int
    models: tuple[DesiredModel, ...]
    expires_at: int
    extra: Mapping[str, object] = field(default_factory=dict)


def matches(selector: Selector, device: DeviceView) -> bool:
    if selector.all:
        return True
    if selector.devices and device.id not in selector.devices:
        return False
    if selector.tags and not set(selector.tags) <= device.tags:
        return False
    return not (selector.profiles and device.profile not in selector.profiles)


def targeted(selector: Selector, devices: Iterable[DeviceView]) -> list[DeviceView]:
    return [d for d in devices if matches(selector, d)]


ArtifactKey = tuple[str, str, str]  # (name, version, profile)


def missing_artifacts(model: str, version: str, devices: Iterable[DeviceView],
                      artifacts: Mapping[ArtifactKey, ArtifactView]) -> dict[str, list[str]]:
    """profile -> device ids that would get nothing, for a deploy of ``model`` ``version``."""
    out: dict[str, list[str]] = {}
    for d in devices:
        if (model, version, d.profile) not in artifacts:
            out.setdefault(d.profile, []).append(d.id)
    return out


def compute_desired(devices: Sequence[DeviceView], deployments: Sequence[DeploymentView],
                    artifacts: Mapping[ArtifactKey, ArtifactView]
                    ) -> dict[str, tuple[DesiredModel, ...]]:
    """Each device's desired models, sorted by name. Pure.

    A (model, version) without an artifact for a device's profile is skipped for that device
    (the deploy-time check makes this rare: it happens only for devices provisioned later), and
    older deployments decide instead.
    """
    newest_first = sorted(deployments, key=lambda dep: dep.id, reverse=True)
    out: dict[str, tuple[DesiredModel, ...]] = {}
    for device in devices:
        chosen: dict[str, DesiredModel] = {}
        for dep in newest_first:
            if dep.model in chosen:
                continue
            version = dep.version_for(device)
            if version is None:
                continue
            art = artifacts.get((dep.model, version, device.profile))
            if art is not None:
                chosen[dep.model] = art.desired()
        out[device.id] = tuple(chosen[k] for k in sorted(chosen))
    return out


def needs_new_state(stored: StoredDesired | None, models: tuple[DesiredModel, ...], now: int,
                    refresh_margin: int) -> bool:
    """True when a device must get a newly signed state. Pure.

    A device that never had a state and is assigned nothing gets none: its first signed state
    (sequence 1) is its first real assignment.
    """
    if stored is None:
        return bool(models)
    if stored.models != models:
        return True
    return stored.expires_at - now <= refresh_margin
