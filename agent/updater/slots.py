"""The model store: installer phases over version directories and two symlinks (adapter).

Layout (``agent.config`` lists it with every other on-disk file)::

    <data_dir>/models/<name>/<version>/{manifest.json, model.onnx | model.tflite}
    <data_dir>/models/<name>/current   -> <version>   what is served (relative symlink)
    <data_dir>/models/<name>/previous  -> <version>   kept on disk for instant rollback
    <data_dir>/models/<name>/.stage-*, .trash-*, .link-*   temporaries; removed by cleanup

The installer vocabulary is mender's (``PayloadUpdatePerformer``); every phase can be run
again after a crash at any point and ends in the same place:

=========  ====================================================================================
stage      copy model file and manifest into a temporary directory, fsync, check the copy's
           sha256, ``os.replace`` it into ``<version>/``. A complete copy already there is kept
activate   ``previous`` := old ``current``; then ``current`` := ``<version>``; each pointer is a
           temporary symlink renamed over the old one (atomic). No-op when already current.
           Then the ``on_activate`` hook, where serving loads the version and swaps atomically
commit     check that ``current`` is complete and make the pointers durable (the model file is
           hashed again unless this process staged it and its stat identity is unchanged)
rollback   ``current`` := ``previous`` (or no model, when there is none), only while
           ``current`` is the version being rolled back; then the hook
cleanup    remove every version that is neither ``current``, ``previous`` nor kept, and
           temporaries
=========  ====================================================================================

``supports_rollback`` is true and ``needs_restart`` false: a swap never restarts the agent and
serving never stops (the hook swaps a loaded model in; requests in flight finish on the old).
``OSError`` is translated into :class:`InstallError` here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from agent.errors import ArtifactError, InstallError
from agent.protocol.manifest import MANIFEST_FILE, Manifest, ManifestError, is_plain_name

__all__ = ["CURRENT", "MODELS_DIR", "PREVIOUS", "ModelStore", "OnActivate"]

log = logging.getLogger(__name__)

MODELS_DIR = "models"
CURRENT = "current"
PREVIOUS = "previous"

#: ``on_activate(name, version, version_dir)``: serving should now run this version (load it,
#: swap it in atomically). ``version``/``version_dir`` are ``None`` when no version is left
#: (rollback of a first install): stop serving ``name``. Must be idempotent.
OnActivate = Callable[[str, str | None, Path | None], None]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_hashed(src: Path, dst: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    digest = hashlib.sha256()
    length = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            digest.update(block)
            length += len(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    return length, digest.hexdigest()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What the store's manifest and hash caches check: a replaced file, or one rewritten to
    another size or at a later timestamp tick (mtime or ctime; ctime cannot be set back from
    user space), never matches. A same-size rewrite within one timestamp tick (4 ms here,
    coarser on kernels before 6.13's fine-grained timestamps) can: nothing in the agent
    rewrites a staged file in place."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_file(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    digest = hashlib.sha256()
    length = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            length += len(block)
    return length, digest.hexdigest()


class ModelStore:
    """Installed model versions under ``<data_dir>/models``; see the module docstring."""

    supports_rollback = True
    needs_restart = False

    def __init__(self, data_dir: str | Path, *, on_activate: OnActivate | None = None) -> None:
        self.root = Path(data_dir) / MODELS_DIR
        self.on_activate = on_activate
        # parsed manifests by path, with the stat identity they were parsed from: an update
        # asks for the same manifest ~9 times (health check, activation, serving, reports),
        # and parsing one costs ~3 ms on the build host, far more on a Pi. `stage` seeds it
        # with the parse the runner's Verifying made, so an update parses its manifest once
        self._manifests: dict[Path, tuple[tuple[int, ...], Manifest]] = {}
        # (length, sha256) of model files this process wrote (stage hashes while it copies)
        # or hashed, by path, with the stat identity they had: commit's completeness check
        # reads a file staged a moment ago only if it was replaced or rewritten since (a
        # read-back right after the fsync'd write comes from the page cache anyway). A new
        # process starts empty, so after a restart every check is a full hash
        self._hashes: dict[Path, tuple[tuple[int, ...], tuple[int, str]]] = {}

    # -- paths and queries ------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        """``<data_dir>/models/<name>``.

        Raises:
            ValueError: ``name`` is not a plain name.
        """
        if not is_plain_name(name):
            raise ValueError(f"model name {name!r} is not a plain name")
        return self.root / name

    def version_dir(self, name: str, version: str) -> Path:
        """``<data_dir>/models/<name>/<version>``.

        Raises:
            ValueError: ``name`` or ``version`` is not a plain name, or is a pointer's name.
        """
        if not is_plain_name(version) or version in (CURRENT, PREVIOUS):
            raise ValueError(f"model version {version!r} is not a plain, unreserved name")
        return self.model_dir(name) / version

    def _pointer(self, name: str, which: str) -> str | None:
        try:
            target = os.readlink(self.model_dir(name) / which)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InstallError(f"cannot read {which} of model {name}: {exc}") from exc
        return os.path.basename(target.rstrip("/"))

    def current(self, name: str) -> str | None:
        """The version ``current`` points to, or ``None``.

        Raises:
            InstallError: the pointer exists but cannot be read.
        """
        return self._pointer(name, CURRENT)

    def previous(self, name: str) -> str | None:
        """The version ``previous`` points to, or ``None``.

        Raises:
            InstallError: the pointer exists but cannot be read.
        """
        return self._pointer(name, PREVIOUS)

    def versions(self, name: str) -> list[str]:
        """Every version directory of ``name``, sorted (temporaries excluded)."""
        d = self.model_dir(name)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir()
                      if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))

    def manifest(self, name: str, version: str) -> Manifest:
        """The installed manifest of ``name`` ``version``.

        Raises:
            InstallError: it is missing or unreadable on disk.
        """
        path = self.version_dir(name, version) / MANIFEST_FILE
        try:
            cached = self._manifests.get(path)
            if cached is not None and cached[0] == _identity(path.stat()):
                return cached[1]
            self._remember(path, Manifest.from_bytes(path.read_bytes()))
        except (OSError, ManifestError) as exc:
            self._manifests.pop(path, None)
            raise InstallError(f"installed manifest {path} cannot be read: {exc}") from exc
        return self._manifests[path][1]

    def model_path(self, name: str, version: str) -> Path:
        """The installed model file of ``name`` ``version``.

        Raises:
            InstallError: its manifest is missing or unreadable.
        """
        return self.version_dir(name, version) / self.manifest(name, version).file.path

    def is_complete(self, name: str, version: str) -> bool:
        """True when the version's manifest parses and its model file matches it (full hash,
        unless this process wrote or hashed that very file: same path and stat identity)."""
        try:
            manifest = self.manifest(name, version)
            length, digest = self._file_hash(self.version_dir(name, version)
                                             / manifest.file.path)
        except (InstallError, OSError):
            return False
        return (length, digest) == (manifest.file.length, manifest.file.sha256)

    def _file_hash(self, path: Path) -> tuple[int, str]:
        """``(length, sha256)`` of ``path``, from :attr:`_hashes` while its identity holds.

        Raises:
            OSError: it cannot be stat'ed or read.
        """
        try:
            identity = _identity(path.stat())
        except OSError:
            self._hashes.pop(path, None)
            raise
        cached = self._hashes.get(path)
        if cached is not None and cached[0] == identity:
            return cached[1]
        got = _hash_file(path)
        self._hashes[path] = (identity, got)
        return got

    # -- phases -----------------------------------------------------------------------------
    def stage(self, name: str, version: str, model_file: str | Path, manifest_bytes: bytes,
              manifest: Manifest | None = None) -> Path:
        """Install ``model_file`` and ``manifest_bytes`` as ``<name>/<version>/``, not active.

        Args:
            manifest: ``Manifest.from_bytes(manifest_bytes)`` when the caller already has it
                (the runner's Verifying parsed it); parsed here otherwise. It also becomes the
                cached answer of :meth:`manifest` for the staged file.

        Returns:
            The version directory.

        Raises:
            ArtifactError: ``manifest_bytes`` is not a manifest for ``name`` ``version``.
            InstallError: copying failed, the copy does not match the manifest, or that
                version is installed with other content and is current or previous.
        """
        if manifest is None:
            try:
                manifest = Manifest.from_bytes(manifest_bytes)
            except ManifestError as exc:
                raise ArtifactError(f"staging {name} {version}: invalid manifest: "
                                    f"{exc}") from exc
        if (manifest.name, manifest.version) != (name, version):
            raise ArtifactError(f"staging {name} {version}: the manifest is for "
                                f"{manifest.name} {manifest.version}")
        dest = self.version_dir(name, version)
        parent = dest.parent
        if dest.exists():
            same = (self.is_complete(name, version)
                    and (dest / MANIFEST_FILE).read_bytes() == manifest_bytes)
            if same:
                return dest
            if version in (self.current(name), self.previous(name)):
                raise InstallError(f"staging {name} {version}: that version is installed with "
                                   f"other content and in use; refusing to replace it in place")
            self._discard(dest)
        tmp = parent / f".stage-{version}-{uuid.uuid4().hex[:8]}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            length, digest = _copy_hashed(Path(model_file), tmp / manifest.file.path)
            if (length, digest) != (manifest.file.length, manifest.file.sha256):
                raise InstallError(f"staging {name} {version}: the copy is {length} bytes with "
                                   f"sha256 {digest}, the manifest says {manifest.file.length} "
                                   f"bytes with sha256 {manifest.file.sha256}")
            with open(tmp / MANIFEST_FILE, "wb") as fh:
                fh.write(manifest_bytes)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            os.replace(tmp, dest)
            _fsync_dir(parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InstallError(f"staging {name} {version} into {dest} failed: {exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):  # only caches: a miss reads the file
            self._remember(dest / MANIFEST_FILE, manifest)
            model = dest / manifest.file.path
            self._hashes[model] = (_identity(model.stat()), (length, digest))
        return dest

    def activate(self, name: str, version: str) -> Path:
        """Make ``version`` current (the old current becomes previous), then call the hook.

        Returns:
            The version directory.

        Raises:
            InstallError: the version is not staged, or a pointer cannot be swapped.
        """
        path = self.version_dir(name, version)
        manifest = self.manifest(name, version)  # staged, with a readable manifest
        if not (path / manifest.file.path).is_file():
            raise InstallError(f"activating {name} {version}: {manifest.file.path} is missing")
        old = self.current(name)
        if old != version:
            if old is not None:
                self._point(name, PREVIOUS, old)
            self._point(name, CURRENT, version)
            log.info("model %s: current %s -> %s", name, old, version)
        self._notify(name, version)
        return path

    def commit(self, name: str) -> str:
        """Make the current version final: it must be complete; the pointers are fsynced.

        Returns:
            The committed version.

        Raises:
            InstallError: there is no current version, or it is incomplete.
        """
        version = self.current(name)
        if version is None:
            raise InstallError(f"committing {name}: no current version")
        if not self.is_complete(name, version):
            raise InstallError(f"committing {name} {version}: the installed files do not match "
                               "its manifest")
        try:
            _fsync_dir(self.model_dir(name))
        except OSError as exc:
            raise InstallError(f"committing {name} {version}: {exc}") from exc
        return version

    def rollback(self, name: str, from_version: str | None = None) -> str | None:
        """Point ``current`` back at ``previous``, then call the hook.

        Args:
            name: the model.
            from_version: roll back only while ``current`` is this version (idempotent: once
                rolled back, or if it never became current, nothing happens). ``None``: roll
                back whatever is current, unless it already equals ``previous``.

        Returns:
            The version current afterwards (``None``: no model left).

        Raises:
            InstallError: a pointer cannot be swapped or removed.
        """
        cur, prev = self.current(name), self.previous(name)
        if cur is None or (from_version is not None and cur != from_version) or cur == prev:
            return cur
        if prev is None:
            try:
                (self.model_dir(name) / CURRENT).unlink()
                _fsync_dir(self.model_dir(name))
            except OSError as exc:
                raise InstallError(f"rolling back {name} {cur}: cannot remove current: "
                                   f"{exc}") from exc
        else:
            self._point(name, CURRENT, prev)
        log.info("model %s: rolled back current %s -> %s", name, cur, prev)
        self._notify(name, prev)
        return prev

    def cleanup(self, name: str, keep: Collection[str] = ()) -> list[str]:
        """Remove versions other than current, previous and ``keep``; remove temporaries.

        Returns:
            The names removed, sorted.

        Raises:
            InstallError: something could not be removed (the rest still is).
        """
        d = self.model_dir(name)
        if not d.is_dir():
            return []
        spare = {CURRENT, PREVIOUS, *keep, self.current(name), self.previous(name)}
        removed, failed = [], []
        for entry in sorted(d.iterdir()):
            if entry.name in spare:
                continue
            try:
                if entry.is_symlink() or entry.is_file():
                    entry.unlink()
                else:
                    shutil.rmtree(entry)
                removed.append(entry.name)
            except OSError as exc:
                failed.append(f"{entry.name}: {exc}")
        if failed:
            raise InstallError(f"cleanup of model {name}: cannot remove {'; '.join(failed)}")
        return removed

    # -- internals --------------------------------------------------------------------------
    def _remember(self, path: Path, manifest: Manifest) -> None:
        """Cache ``manifest`` as the parse of ``path`` as it is on disk now.

        Raises:
            OSError: ``path`` cannot be stat'ed.
        """
        self._manifests[path] = (_identity(path.stat()), manifest)

    def _point(self, name: str, which: str, version: str) -> None:
        """Atomically make ``which`` a symlink to ``version`` (temp symlink + rename)."""
        d = self.model_dir(name)
        tmp = d / f".link-{which}-{uuid.uuid4().hex[:8]}"
        try:
            os.symlink(version, tmp)
            os.replace(tmp, d / which)
            _fsync_dir(d)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise InstallError(f"cannot point {which} of model {name} at {version}: "
                               f"{exc}") from exc

    def _discard(self, path: Path) -> None:
        trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, trash)
            shutil.rmtree(trash)
        except OSError as exc:
            raise InstallError(f"cannot replace the incomplete {path}: {exc}") from exc

    def _notify(self, name: str, version: str | None) -> None:
        if self.on_activate is not None:
            path = None if version is None else self.version_dir(name, version)
            self.on_activate(name, version, path)
