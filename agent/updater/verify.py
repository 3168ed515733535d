"""Check a downloaded artifact against the signed desired state and this device (pure).

Bytes and numbers in, a verified :class:`Manifest` or :class:`ArtifactError` out, like
python-tuf's ``TrustedMetadataSet``. The caller measures the file (length, sha256 while
streaming, e.g. :func:`agent.protocol.manifest.sha256_file`) and reads ``manifest.json``; nothing
here touches the disk or the network.

What must agree, each failure naming expected against actual:

- the manifest parses (strict JSON, known schema version);
- model name and version: desired state == manifest;
- sha256 and length: measured file == desired state == manifest's ``file``;
- profile: desired state == manifest == this device's profile;
- runtime: manifest == the profile's, and available on this device (at ``min_runtime_version``
  when the manifest asks for one and the installed version is known);
- precision: one the profile allows; size within the profile's ``max_artifact_bytes``;
- the version is not a name the model store reserves (``current``, ``previous``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from agent.errors import ArtifactError
from agent.protocol.manifest import Manifest, ManifestError
from agent.protocol.messages import DesiredModel
from agent.protocol.profiles import DeviceProfile

__all__ = [
    "RESERVED_VERSIONS",
    "ArtifactVerifier",
    "check_compatible",
    "check_download",
    "parse_manifest",
    "verify_artifact",
]

#: version names the model store uses for its pointers
RESERVED_VERSIONS = frozenset({"current", "previous"})


def parse_manifest(raw: bytes) -> Manifest:
    """Parse ``manifest.json`` bytes.

    Raises:
        ArtifactError: not a valid manifest (the message names the field).
    """
    try:
        return Manifest.from_bytes(raw)
    except ManifestError as exc:
        raise ArtifactError(f"invalid manifest: {exc}") from exc


def check_download(desired: DesiredModel, manifest: Manifest, *, length: int,
                   sha256: str) -> None:
    """The downloaded model file is the one the desired state and the manifest name.

    Raises:
        ArtifactError: name, version, length or sha256 differ anywhere.
    """
    what = f"model {desired.name} {desired.version}"
    for label, want, got in (("model name", desired.name, manifest.name),
                             ("model version", desired.version, manifest.version)):
        if want != got:
            raise ArtifactError(f"{what}: manifest {label} is {got!r}, the desired state says "
                                f"{want!r}")
    if manifest.file.length != desired.length:
        raise ArtifactError(f"{what}: manifest file length is {manifest.file.length} bytes, the "
                            f"desired state says {desired.length}")
    if manifest.file.sha256 != desired.sha256:
        raise ArtifactError(f"{what}: manifest file sha256 is {manifest.file.sha256}, the "
                            f"desired state says {desired.sha256}")
    if length != desired.length:
        raise ArtifactError(f"{what}: downloaded file is {length} bytes, expected "
                            f"{desired.length}")
    if sha256 != desired.sha256:
        raise ArtifactError(f"{what}: downloaded file has sha256 {sha256}, expected "
                            f"{desired.sha256}")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:4])


def check_compatible(manifest: Manifest, profile: DeviceProfile, *,
                     runtimes: Collection[str] = ("onnxruntime",),
                     runtime_versions: Mapping[str, str] | None = None,
                     desired_profile: str | None = None) -> None:
    """The artifact was built for this device's profile and can run here.

    Args:
        manifest: the artifact's manifest.
        profile: this device's profile.
        runtimes: the runtimes this device has (``agent.serving.runtime.runtime_for`` names).
        runtime_versions: installed runtime versions, when known, for ``min_runtime_version``.
        desired_profile: the profile the desired state names, if any.

    Raises:
        ArtifactError: profile, runtime, precision, size or version name do not fit.
    """
    what = f"model {manifest.name} {manifest.version}"
    if manifest.version in RESERVED_VERSIONS:
        raise ArtifactError(f"{what}: version {manifest.version!r} is reserved on the device "
                            f"(one of {sorted(RESERVED_VERSIONS)})")
    if desired_profile is not None and desired_profile != profile.name:
        raise ArtifactError(f"{what}: the desired state is for profile {desired_profile!r}, "
                            f"this device is {profile.name!r}")
    if manifest.profile != profile.name:
        raise ArtifactError(f"{what}: built for profile {manifest.profile!r}, this device is "
                            f"{profile.name!r}")
    if manifest.runtime != profile.runtime:
        raise ArtifactError(f"{what}: runtime {manifest.runtime!r}, profile {profile.name!r} "
                            f"uses {profile.runtime!r}")
    if manifest.runtime not in runtimes:
        raise ArtifactError(f"{what}: runtime {manifest.runtime!r} is not available on this "
                            f"device (available: {', '.join(sorted(runtimes)) or 'none'})")
    if manifest.precision not in profile.candidates:
        raise ArtifactError(f"{what}: precision {manifest.precision!r}, profile "
                            f"{profile.name!r} allows {', '.join(profile.candidates)}")
    if manifest.file.length > profile.max_artifact_bytes:
        raise ArtifactError(f"{what}: {manifest.file.length} bytes, profile {profile.name!r} "
                            f"allows at most {profile.max_artifact_bytes}")
    installed = (runtime_versions or {}).get(manifest.runtime)
    if (manifest.min_runtime_version and installed
            and _version_tuple(installed) < _version_tuple(manifest.min_runtime_version)):
        raise ArtifactError(f"{what}: needs {manifest.runtime} >= "
                            f"{manifest.min_runtime_version}, this device has {installed}")


def verify_artifact(desired: DesiredModel, manifest_bytes: bytes, *, length: int, sha256: str,
                    profile: DeviceProfile, runtimes: Collection[str] = ("onnxruntime",),
                    runtime_versions: Mapping[str, str] | None = None) -> Manifest:
    """Every check of this module, in order; the verified manifest.

    Raises:
        ArtifactError: the first check that fails (see the module docstring).
    """
    manifest = parse_manifest(manifest_bytes)
    check_download(desired, manifest, length=length, sha256=sha256)
    check_compatible(manifest, profile, runtimes=runtimes, runtime_versions=runtime_versions,
                     desired_profile=desired.profile)
    return manifest


@dataclass(frozen=True)
class ArtifactVerifier:
    """The runner's ``Verifier`` seam: :func:`verify_artifact` bound to this device."""

    profile: DeviceProfile
    runtimes: Collection[str] = ("onnxruntime",)
    runtime_versions: Mapping[str, str] = field(default_factory=dict)

    def verify(self, desired: DesiredModel, manifest_bytes: bytes, *, length: int,
               sha256: str) -> Manifest:
        """See :func:`verify_artifact`.

        Raises:
            ArtifactError: the artifact does not fit the desired state or this device.
        """
        return verify_artifact(desired, manifest_bytes, length=length, sha256=sha256,
                               profile=self.profile, runtimes=self.runtimes,
                               runtime_versions=self.runtime_versions)
