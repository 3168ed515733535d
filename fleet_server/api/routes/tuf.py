"""The TUF repository for devices: ``/tuf/metadata/<file>`` and ``/tuf/targets/<path>``.

Any valid token may read (device tokens included: this is all they may do). Only the public
half of the repository (:attr:`TufRepository.public_dir`) is served, and only names that are
TUF metadata or published target files; everything else, including paths that leave the
directory or name hidden staging files, is 404. Devices trust nothing here by transport:
``tuf.ngclient`` verifies every file against the pinned root.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from fleet_server.api.deps import AnyTokenDep, FleetDep
from fleet_server.api.schemas import error_responses
from fleet_server.errors import NotFound

router = APIRouter(prefix="/tuf", tags=["tuf"])

#: versioned root/snapshot/targets (consistent snapshots) and the unversioned timestamp
METADATA_NAME = re.compile(r"(?:[1-9][0-9]{0,9}\.(?:root|snapshot|targets)|timestamp)\.json")
_MAX_PATH = 1024


def _metadata_file(directory: Path, filename: str) -> Path:
    if not METADATA_NAME.fullmatch(filename):
        raise NotFound(f"TUF metadata {filename!r} not found: expected N.root.json, "
                       "timestamp.json, N.snapshot.json or N.targets.json")
    path = directory / filename
    if not path.is_file():
        raise NotFound(f"TUF metadata {filename!r} not found")
    return path


def _target_file(directory: Path, name: str) -> Path:
    """The file for target URL path ``name``, which must stay inside ``directory``."""
    missing = NotFound(f"TUF target {name!r} not found")
    if not name or "\\" in name or "\x00" in name or len(name) > _MAX_PATH:
        raise missing
    norm = posixpath.normpath(name)
    parts = norm.split("/")
    if norm.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise missing
    try:
        root = directory.resolve()
        path = (root / norm).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise missing
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise missing from exc
    return path


@router.get("/metadata/{filename}", response_class=Response,
            responses={200: {"content": {"application/json": {}},
                             "description": "signed TUF metadata"}, **error_responses(404)},
            summary="TUF metadata (N.root.json, timestamp.json, N.snapshot.json, N.targets.json)")
def get_metadata(filename: Annotated[str, PathParam(max_length=64)], caller: AnyTokenDep,
                 fleet: FleetDep) -> Response:
    path = _metadata_file(fleet.repo.metadata_dir, filename)
    # read whole: metadata is small and replaced atomically (a streamed file could change
    # between its stat and its read)
    return Response(path.read_bytes(), media_type="application/json",
                    headers={"Cache-Control": "no-store"})


@router.get("/targets/{path:path}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "a target file (hash-prefixed name)"},
                       **error_responses(404)},
            summary="A TUF target file (model or manifest), streamed")
def get_target(path: Annotated[str, PathParam(max_length=_MAX_PATH)], caller: AnyTokenDep,
               fleet: FleetDep) -> FileResponse:
    return FileResponse(_target_file(fleet.repo.targets_dir, path),
                        media_type="application/octet-stream")
