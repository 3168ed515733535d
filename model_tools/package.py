"""Write and read bundles on disk.

A bundle directory holds exactly ``manifest.json`` and the model file it names. It appears
atomically: everything is written into a sibling temporary directory that is renamed into
place, so a crash leaves either the old directory or the new one, never a half bundle. A refused
conversion leaves only ``report.json`` (no model, no manifest), which ``inspect`` recognises as
"not a bundle". Bundles may also be read from ``.tar``/``.tar.gz`` files.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.protocol.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    sha256_file,
)
from model_tools.errors import BundleError, OutputDirError

__all__ = [
    "REPORT_FILE",
    "BundleCheck",
    "check_out_dir",
    "read_bundle",
    "write_bundle",
    "write_report_only",
]

REPORT_FILE = "report.json"


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse early (before any work) an output directory we may not replace.

    Raises:
        OutputDirError: ``out`` is a file, or a non-empty directory and ``force`` is false.
    """
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputDirError(f"output directory {str(out)!r} is not empty; choose another "
                             "or pass --force to replace it")


def _publish_dir(out: Path, fill: Callable[[Path], None], force: bool) -> None:
    out = out.absolute()
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous directory back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bundle(out: Path, model_file: Path, manifest: Manifest, *, force: bool) -> None:
    """Publish ``model_file`` + ``manifest.json`` as the bundle directory ``out``.

    Raises:
        OutputDirError: ``out`` may not be replaced.
        BundleError: the model file does not match the manifest (programmer error upstream).
    """
    length, digest = sha256_file(model_file)
    try:
        manifest.verify_model_bytes(length, digest)
    except ManifestError as exc:
        raise BundleError(f"refusing to write an inconsistent bundle: {exc}") from exc

    def fill(tmp: Path) -> None:
        shutil.copyfile(model_file, tmp / manifest.file.path)
        (tmp / MANIFEST_FILE).write_bytes(manifest.to_bytes())

    _publish_dir(out, fill, force)


def write_report_only(out: Path, report: dict[str, Any], *, force: bool) -> Path:
    """Write the report of a refused conversion; return where it went.

    Into ``out/report.json`` (a directory holding nothing else) when ``out`` is absent or empty
    or holds no bundle. When ``out`` already holds a bundle (``--force``), that bundle is kept,
    since a refused artifact must not cost the user a good one, and the report goes beside it
    as ``<out>.rejected.json``.

    Raises:
        OutputDirError: ``out`` may not be replaced.
    """
    text = json.dumps(report, indent=1, sort_keys=True) + "\n"
    if (out / MANIFEST_FILE).is_file():
        target = out.parent / f"{out.name}.rejected.json"
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def fill(tmp: Path) -> None:
        (tmp / REPORT_FILE).write_text(text)

    _publish_dir(out, fill, force)
    return out / REPORT_FILE


@dataclass(frozen=True)
class BundleCheck:
    manifest: Manifest
    model_length: int
    model_sha256: str
    source: str


def read_bundle(path: Path) -> BundleCheck:
    """Read a bundle (directory or tar) and re-verify its model file's sha256 and length.

    Raises:
        BundleError: not a bundle, unreadable manifest, missing model file, or the model file
            does not match the manifest's sha256/length.
    """
    path = Path(path)
    if path.is_dir():
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            hint = ""
            report = path / REPORT_FILE
            if report.is_file():
                try:
                    status = json.loads(report.read_text()).get("status", "?")
                except (OSError, ValueError):
                    status = "unreadable"
                hint = f" (it holds a conversion report, status {status!r}: see {report})"
            raise BundleError(f"{path} is not a bundle: no {MANIFEST_FILE}{hint}")
        with manifest_path.open("rb") as fh:
            manifest = _parse(fh.read(MAX_MANIFEST_BYTES + 1), str(manifest_path))
        model_path = path / manifest.file.path
        if not model_path.is_file():
            raise BundleError(f"{path}: model file {manifest.file.path!r} named by the "
                              "manifest is missing")
        length, digest = sha256_file(model_path)
    elif path.is_file() and tarfile.is_tarfile(path):
        manifest, length, digest = _read_tar(path)
    elif path.exists():
        raise BundleError(f"{path} is not a bundle: expected a directory or a tar file")
    else:
        raise BundleError(f"{path} does not exist")
    try:
        manifest.verify_model_bytes(length, digest)
    except ManifestError as exc:
        raise BundleError(f"{path}: model file does not match its manifest: {exc}") from exc
    return BundleCheck(manifest, length, digest, str(path))


def _parse(raw: bytes, where: str) -> Manifest:
    """``raw`` is at most one byte more than the limit: read no more than that."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: manifest is over {MAX_MANIFEST_BYTES} bytes, expected at "
                          f"most {MAX_MANIFEST_BYTES}")
    try:
        return Manifest.from_bytes(raw)
    except ManifestError as exc:
        raise BundleError(f"{where}: {exc}") from exc


def _read_tar(path: Path) -> tuple[Manifest, int, str]:
    import hashlib

    with tarfile.open(path) as tar:
        # a bundle tar holds the files at its top level, or inside one top-level directory
        top: dict[str, tarfile.TarInfo] = {}
        for member in tar.getmembers():
            if not member.isfile():
                continue
            parts = [p for p in posixpath.normpath(member.name).split("/") if p not in ("", ".")]
            if len(parts) == 2 or len(parts) == 1:
                top.setdefault(parts[-1], member)
        if MANIFEST_FILE not in top:
            raise BundleError(f"{path} is not a bundle: no {MANIFEST_FILE} in the tar")
        fh = tar.extractfile(top[MANIFEST_FILE])
        assert fh is not None
        manifest = _parse(fh.read(MAX_MANIFEST_BYTES + 1), f"{path}:{MANIFEST_FILE}")
        model_member = top.get(manifest.file.path)
        if model_member is None:
            raise BundleError(f"{path}: model file {manifest.file.path!r} is missing from the tar")
        data = tar.extractfile(model_member)
        assert data is not None
        digest = hashlib.sha256()
        length = 0
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
            length += len(block)
        return manifest, length, digest.hexdigest()
