"""Models: push a bundle (validate, publish as TUF targets, record), list and read versions.

A pushed bundle is a tar (optionally gzipped) of a bundle directory: ``manifest.json`` and the
one model file it names, at the top level or inside one directory. It is unpacked with hard
limits (only those two regular files, bounded sizes, no links, no paths), checked against its
manifest, and published as two TUF targets::

    models/<name>/<version>/<profile>/model.onnx|model.tflite
    models/<name>/<version>/<profile>/manifest.json
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, insert, select
from sqlalchemy.exc import IntegrityError

from agent.protocol.manifest import MANIFEST_FILE, MODEL_FILES, Manifest, ManifestError
from fleet_server import audit
from fleet_server.auth import Principal
from fleet_server.db import tables
from fleet_server.errors import BundleRejected, Conflict, NotFound, PayloadTooLarge, TargetError
from fleet_server.fleet import Fleet

__all__ = [
    "MAX_MANIFEST_BYTES",
    "artifact_dict",
    "get_version",
    "list_models",
    "push_bundle",
    "target_names",
]

MAX_MANIFEST_BYTES = 8 << 20


def target_names(manifest: Manifest) -> tuple[str, str]:
    base = f"models/{manifest.name}/{manifest.version}/{manifest.profile}"
    return f"{base}/{manifest.file.path}", f"{base}/{MANIFEST_FILE}"


def _looks_like(runtime: str, head: bytes) -> bool:
    if runtime == "tflite":
        return len(head) >= 8 and head[4:8] == b"TFL3"
    # ONNX ModelProto starts with field 1 (ir_version, varint): tag byte 0x08
    return len(head) >= 2 and head[0] == 0x08


def _open_tar(tar_path: Path) -> tarfile.TarFile:
    """Open a bundle tar for the caller to close (``with _open_tar(p) as tar``).

    Raises:
        BundleRejected: the file is not a (possibly compressed) tar archive.
    """
    try:
        return tarfile.open(tar_path)
    except (tarfile.TarError, OSError) as exc:
        raise BundleRejected(f"bundle is not a tar archive (tar or tar.gz of the bundle "
                             f"directory): {exc}") from exc


def _unpack(tar_path: Path, dest: Path, max_bytes: int) -> tuple[Manifest, Path]:
    with _open_tar(tar_path) as tar:
        found: dict[str, tarfile.TarInfo] = {}
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            raise BundleRejected(f"bundle tar is truncated or corrupt: {exc}") from exc
        for m in members:
            parts = [p for p in posixpath.normpath(m.name).split("/") if p not in ("", ".")]
            if m.isdir():
                continue
            if ".." in parts or m.name.startswith("/") or len(parts) > 2:
                raise BundleRejected(f"bundle member {m.name!r}: expected a plain file name")
            if not m.isfile():
                raise BundleRejected(f"bundle member {m.name!r}: expected a regular file, got "
                                     "a link or device")
            if parts[-1] in found:
                raise BundleRejected(f"bundle holds {parts[-1]!r} twice")
            found[parts[-1]] = m
        if MANIFEST_FILE not in found:
            raise BundleRejected(f"bundle has no {MANIFEST_FILE}; found {sorted(found)}")
        man_member = found[MANIFEST_FILE]
        if man_member.size > MAX_MANIFEST_BYTES:
            raise BundleRejected(f"{MANIFEST_FILE} is {man_member.size} bytes, over "
                                 f"{MAX_MANIFEST_BYTES}")
        fh = tar.extractfile(man_member)
        assert fh is not None
        try:
            manifest = Manifest.from_bytes(fh.read())
        except ManifestError as exc:
            raise BundleRejected(f"invalid manifest: {exc}") from exc
        extra = sorted(set(found) - {MANIFEST_FILE, manifest.file.path})
        if extra:
            raise BundleRejected(f"bundle holds unexpected files {extra}; expected only "
                                 f"{MANIFEST_FILE} and {manifest.file.path}")
        model_member = found.get(manifest.file.path)
        if model_member is None:
            raise BundleRejected(f"bundle has no model file {manifest.file.path!r} (named by "
                                 "its manifest)")
        if model_member.size > max_bytes:
            raise PayloadTooLarge(f"model file is {model_member.size} bytes, over the server's "
                                  f"limit of {max_bytes}")
        src = tar.extractfile(model_member)
        assert src is not None
        out = dest / manifest.file.path
        digest, length = hashlib.sha256(), 0
        head = b""
        with open(out, "wb") as fh_out:
            while block := src.read(1 << 20):
                if not head:
                    head = block[:16]
                digest.update(block)
                length += len(block)
                fh_out.write(block)
    try:
        manifest.verify_model_bytes(length, digest.hexdigest())
    except ManifestError as exc:
        raise BundleRejected(f"model file does not match its manifest: {exc}") from exc
    if not _looks_like(manifest.runtime, head):
        raise BundleRejected(f"{manifest.file.path} is not a {manifest.runtime} model "
                             f"(first bytes {head[:8].hex()})")
    return manifest, out


def push_bundle(fleet: Fleet, conn: Connection, tar_path: Path, *,
                actor: Principal) -> dict[str, Any]:
    """Validate a bundle tar and publish it.

    Raises:
        BundleRejected: malformed bundle, manifest/file mismatch, unknown profile, not a model.
        PayloadTooLarge: the model file is over the server's limit.
        Conflict: this (name, version, profile) was already pushed (artifacts are immutable).
    """
    with tempfile.TemporaryDirectory(prefix="edgefleet-push-") as tmp:
        manifest, model_path = _unpack(Path(tar_path), Path(tmp),
                                       fleet.settings.max_upload_bytes)
        profile = fleet.profiles.get(manifest.profile)
        if profile is None:
            raise BundleRejected(f"manifest profile {manifest.profile!r} is unknown; valid "
                                 f"profiles: {', '.join(sorted(fleet.profiles))}")
        if profile.runtime != manifest.runtime:
            raise BundleRejected(f"manifest runtime {manifest.runtime!r} does not match "
                                 f"profile {profile.name!r} runtime {profile.runtime!r}")
        if manifest.file.length > profile.max_artifact_bytes:
            raise BundleRejected(f"model file is {manifest.file.length} bytes, over profile "
                                 f"{profile.name!r} budget of {profile.max_artifact_bytes}")
        if manifest.file.path != MODEL_FILES[manifest.runtime]:
            raise BundleRejected(f"model file {manifest.file.path!r} for runtime "
                                 f"{manifest.runtime}")
        exists = conn.execute(select(tables.artifacts.c.id).where(
            tables.artifacts.c.name == manifest.name,
            tables.artifacts.c.version == manifest.version,
            tables.artifacts.c.profile == manifest.profile)).first()
        if exists:
            raise Conflict(f"model {manifest.name} {manifest.version} for profile "
                           f"{manifest.profile} was already pushed; versions are immutable: "
                           "push a new version")
        manifest_bytes = manifest.to_bytes()
        (Path(tmp) / MANIFEST_FILE).write_bytes(manifest_bytes)
        model_target, manifest_target = target_names(manifest)
        now = fleet.now()
        try:
            fleet.repo.add_target(model_target, model_path, now=fleet.now_dt())
            fleet.repo.add_target(manifest_target, Path(tmp) / MANIFEST_FILE,
                                  now=fleet.now_dt())
        except TargetError as exc:  # the bundle's fault; key/repository faults stay 500
            raise BundleRejected(f"cannot publish the bundle: {exc}") from exc
        try:
            conn.execute(insert(tables.artifacts).values(
                name=manifest.name, version=manifest.version, profile=manifest.profile,
                runtime=manifest.runtime, precision=manifest.precision,
                sha256=manifest.file.sha256, length=manifest.file.length,
                target_path=model_target, manifest_target=manifest_target,
                manifest=manifest_bytes.decode("utf-8"), created_at=now,
                created_by=actor.token_id))
        except IntegrityError as exc:  # a concurrent push of the same version won the race
            raise Conflict(f"model {manifest.name} {manifest.version} for profile "
                           f"{manifest.profile} was already pushed") from exc
        audit.record(conn, at=now, actor=actor.actor, action="model.push",
                     target=f"model:{manifest.name}/{manifest.version}/{manifest.profile}",
                     after={"sha256": manifest.file.sha256, "length": manifest.file.length,
                            "precision": manifest.precision})
    # a deployment (or a rollout) may already select devices of this profile that had nothing
    # to run
    from fleet_server.deploy.service import advance_rollouts

    advance_rollouts(fleet, conn)
    return get_version(conn, manifest.name, manifest.version)


def artifact_dict(row: Any, *, full: bool = False) -> dict[str, Any]:
    out = {
        "profile": row.profile, "runtime": row.runtime, "precision": row.precision,
        "sha256": row.sha256, "length": row.length, "target_path": row.target_path,
        "manifest_target": row.manifest_target, "created_at": row.created_at,
    }
    if full:
        m = json.loads(row.manifest)
        out["validation"] = m.get("validation")
        out["lineage"] = m.get("lineage")
        out["candidates"] = m.get("candidates")
        out["task"] = m.get("task")
    return out


def list_models(conn: Connection, *, limit: int, offset: int = 0
                ) -> tuple[list[dict[str, Any]], int]:
    rows = conn.execute(select(tables.artifacts).order_by(
        tables.artifacts.c.name, tables.artifacts.c.id)).all()
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        g = grouped.setdefault((r.name, r.version), {"name": r.name, "version": r.version,
                                                      "profiles": [], "created_at": r.created_at})
        g["profiles"].append(r.profile)
    items = list(grouped.values())
    return items[offset:offset + limit], len(items)


def get_version(conn: Connection, name: str, version: str) -> dict[str, Any]:
    """A model version with every profile's artifact, validation report and lineage.

    Raises:
        NotFound: no such model or version.
    """
    rows = conn.execute(select(tables.artifacts).where(
        tables.artifacts.c.name == name, tables.artifacts.c.version == version)
        .order_by(tables.artifacts.c.profile)).all()
    if not rows:
        known = conn.execute(select(func.count()).select_from(tables.artifacts).where(
            tables.artifacts.c.name == name)).scalar()
        what = f"version {version!r} of model {name!r}" if known else f"model {name!r}"
        raise NotFound(f"{what} not found")
    return {"name": name, "version": version,
            "artifacts": [artifact_dict(r, full=True) for r in rows]}
