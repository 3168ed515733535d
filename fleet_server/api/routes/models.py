"""Models: list and read versions (reader), push a bundle (publisher).

``POST /v1/models`` takes the bundle tar (or tar.gz) as the raw request body. It is streamed to
a temporary file under ``<data_dir>/uploads/`` and refused with 413 as soon as it passes
``max_upload_bytes`` plus room for the manifest and tar headers (also up front, from
``Content-Length``), so a large or hostile upload never sits in memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from fleet_server.api.deps import FleetDep, PageDep, PublisherDep, ReaderDep
from fleet_server.api.schemas import ModelSummary, ModelVersionOut, Page, error_responses
from fleet_server.auth import Principal
from fleet_server.db import atomic
from fleet_server.deploy.service import publish_pending
from fleet_server.errors import InvalidInput, PayloadTooLarge
from fleet_server.fleet import Fleet
from fleet_server.registry import models
from fleet_server.registry.models import MAX_MANIFEST_BYTES

router = APIRouter(prefix="/v1/models", tags=["models"])

#: request Content-Types accepted for a bundle upload (a missing one means octet-stream)
BUNDLE_TYPES = ("application/x-tar", "application/gzip", "application/x-gzip",
                "application/octet-stream")
#: allowance over ``max_upload_bytes`` (which bounds the model file) for the manifest and tar
UPLOAD_SLACK = MAX_MANIFEST_BYTES + (64 << 10)
_WRITE_BLOCK = 1 << 20

_BUNDLE_BODY = {"requestBody": {
    "required": True,
    "description": "the bundle directory (manifest.json + the model file) as tar or tar.gz",
    "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in BUNDLE_TYPES},
}}


def upload_limit(fleet: Fleet) -> int:
    """The largest request body accepted by ``POST /v1/models``, in bytes."""
    return fleet.settings.max_upload_bytes + UPLOAD_SLACK


def _check_headers(request: Request, limit: int) -> None:
    """Raises: InvalidInput (content type, bad Content-Length), PayloadTooLarge."""
    ctype = request.headers.get("content-type", "application/octet-stream")
    media = ctype.split(";", 1)[0].strip().lower()
    if media not in BUNDLE_TYPES:
        raise InvalidInput(f"Content-Type: expected one of {', '.join(BUNDLE_TYPES)}, got "
                           f"{media!r}")
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise InvalidInput(f"Content-Length: expected an integer, got {declared!r}") from None
    if length > limit:
        raise PayloadTooLarge(f"bundle upload is {length} bytes, over the server's limit of "
                              f"{limit} (max_upload_bytes {limit - UPLOAD_SLACK} for the model "
                              "file, plus room for the manifest)")


def _new_upload(fleet: Fleet) -> Path:
    directory = fleet.settings.data_dir / "uploads"
    directory.mkdir(mode=0o700, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix="bundle-", suffix=".tar")
    os.close(fd)
    return Path(name)


async def _receive(request: Request, path: Path, limit: int) -> None:
    """Stream the body to ``path``; raises PayloadTooLarge past ``limit`` bytes."""
    received = 0
    buffer = bytearray()
    with path.open("wb") as out:
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"bundle upload passed the server's limit of {limit} "
                                          f"bytes (max_upload_bytes {limit - UPLOAD_SLACK} for "
                                          "the model file, plus room for the manifest)")
                buffer += chunk
                if len(buffer) >= _WRITE_BLOCK:
                    await run_in_threadpool(out.write, buffer)
                    buffer.clear()
        except ClientDisconnect as exc:
            raise InvalidInput(f"bundle upload interrupted after {received} bytes: the "
                               "client disconnected") from exc
        if buffer:
            await run_in_threadpool(out.write, buffer)


def _push(fleet: Fleet, path: Path, caller: Principal) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        out = models.push_bundle(fleet, conn, path, actor=caller)
    publish_pending(fleet)  # devices whose profile's artifact just arrived
    return out


@router.get("", response_model=Page[ModelSummary], responses=error_responses(403),
            summary="List model versions (one item per name and version)")
def list_models(caller: ReaderDep, fleet: FleetDep, page: PageDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        items, total = models.list_models(conn, limit=page.limit, offset=page.offset)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.post("", status_code=201, response_model=ModelVersionOut,
             responses=error_responses(403, 409, 413), openapi_extra=_BUNDLE_BODY,
             summary="Push a bundle (raw tar or tar.gz body) for one profile")
async def push_model(request: Request, caller: PublisherDep, fleet: FleetDep) -> dict[str, Any]:
    limit = upload_limit(fleet)
    _check_headers(request, limit)
    path = await run_in_threadpool(_new_upload, fleet)
    try:
        await _receive(request, path, limit)
        return await run_in_threadpool(_push, fleet, path, caller)
    finally:
        path.unlink(missing_ok=True)


@router.get("/{name}/versions/{version}", response_model=ModelVersionOut,
            responses=error_responses(403, 404),
            summary="A model version: every profile's artifact, validation and lineage")
def get_version(name: Annotated[str, PathParam(max_length=200)],
                version: Annotated[str, PathParam(max_length=100)],
                caller: ReaderDep, fleet: FleetDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        return models.get_version(conn, name, version)
