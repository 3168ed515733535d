"""The TUF repository for devices: ``/tuf/metadata/<file>`` and ``/tuf/targets/<path>``.

Any valid token may read (device tokens included: this is all they may do). Only the public
half of the repository (:attr:`TufRepository.public_dir`) is served, and only names that are
TUF metadata or published target files; everything else, including paths that leave the
directory or name hidden staging files, is 404. Devices trust nothing here by transport:
``tuf.ngclient`` verifies every file against the pinned root.

These are the hottest routes (six requests per device per update), so they avoid per-request
work that the other routes can afford: the endpoints and their dependencies are ``async``
(no hop to the thread pool), the token is checked through the server's
:class:`~fleet_server.auth.TokenCache` (the database only on a miss, in a read-only
transaction), and files come from :class:`~fleet_server.tuf_repo.served.ServedFiles` (memory,
re-validated by one ``stat``; disk reads in the thread pool; large targets streamed).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from fleet_server.api.deps import get_fleet
from fleet_server.api.schemas import error_responses
from fleet_server.auth import Principal
from fleet_server.errors import NotFound
from fleet_server.fleet import Fleet

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
    """The file for target URL path ``name``, which must stay inside ``directory``.

    Every component is a plain name (no ``..``, no hidden or staging file) and is checked with
    ``lstat`` on the way down: a symbolic link anywhere under ``directory`` is refused, so the
    path cannot leave it. The repository writes targets as regular files and never links them,
    so this is stricter than resolving the path and checking where it lands, and ~10x cheaper
    (one ``lstat`` per component under ``directory``, not ``realpath``'s one per component of
    the whole path, twice), on the route every device calls twice per update.
    """
    missing = NotFound(f"TUF target {name!r} not found")
    if not name or "\\" in name or "\x00" in name or len(name) > _MAX_PATH:
        raise missing
    norm = posixpath.normpath(name)
    parts = norm.split("/")
    if norm.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise missing
    path = os.fspath(directory)
    try:
        for part in parts:
            path = os.path.join(path, part)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):  # could lead anywhere: never followed
                raise missing
    except OSError as exc:  # missing, or e.g. a name too long for the filesystem
        raise missing from exc
    if not stat.S_ISREG(mode):
        raise missing
    return Path(path)


async def _fleet(request: Request) -> Fleet:
    """The app's Fleet (:func:`get_fleet`, awaited: no thread-pool hop)."""
    return await get_fleet(request)


#: the same scheme as the other routes' (one ``HTTPBearer`` entry in /openapi.json)
_bearer = HTTPBearer(auto_error=False, description="an edgefleet token: `ef_<scope>_...`")


async def _caller(fleet: Annotated[Fleet, Depends(_fleet)],
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                  ) -> Principal:
    """Any valid token (device tokens included), from the token cache when it can.

    Raises:
        Unauthenticated: no bearer token, or an unknown or revoked one.
    """
    secret = credentials.credentials if credentials else None
    cached = fleet.tokens.get(secret) if secret else None
    if cached is not None:
        return cached
    return await run_in_threadpool(fleet.tokens.authenticate, fleet.engine, secret)


FleetDep = Annotated[Fleet, Depends(_fleet)]
AnyTokenDep = Annotated[Principal, Depends(_caller)]


@router.get("/metadata/{filename}", response_class=Response,
            responses={200: {"content": {"application/json": {}},
                             "description": "signed TUF metadata"}, **error_responses(404)},
            summary="TUF metadata (N.root.json, timestamp.json, N.snapshot.json, N.targets.json)")
async def get_metadata(filename: Annotated[str, PathParam(max_length=64)],
                       caller: AnyTokenDep, fleet: FleetDep) -> Response:
    path = _metadata_file(fleet.repo.metadata_dir, filename)
    served = fleet.repo.served
    try:  # read whole: metadata is replaced atomically, a stream could mix two versions
        data = served.cached(path)
        if data is None:
            data = await run_in_threadpool(served.load, path)
    except OSError as exc:  # replaced or removed since it was found
        raise NotFound(f"TUF metadata {filename!r} not found") from exc
    return Response(data, media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get("/targets/{path:path}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "a target file (hash-prefixed name)"},
                       **error_responses(404)},
            summary="A TUF target file (model or manifest)")
async def get_target(path: Annotated[str, PathParam(max_length=_MAX_PATH)],
                     caller: AnyTokenDep, fleet: FleetDep) -> Response:
    file = _target_file(fleet.repo.targets_dir, path)
    served = fleet.repo.served
    try:
        data = served.cached(file)
        if data is None:
            if file.stat().st_size > served.max_file_bytes:  # too large to keep: stream it
                return FileResponse(file, media_type="application/octet-stream")
            data = await run_in_threadpool(served.load, file)
    except OSError as exc:  # removed since it was found
        raise NotFound(f"TUF target {path!r} not found") from exc
    return Response(data, media_type="application/octet-stream")
