"""Devices: list and read (reader), provision and revoke (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from fleet_server.api.deps import AdminDep, FleetDep, PageDep, ReaderDep
from fleet_server.api.schemas import (
    DeviceCreate,
    DeviceOut,
    DeviceSummary,
    Page,
    ProvisionOut,
    error_responses,
)
from fleet_server.db import atomic
from fleet_server.deploy.service import publish_pending
from fleet_server.registry import devices

router = APIRouter(prefix="/v1/devices", tags=["devices"])

DeviceId = Annotated[str, PathParam(max_length=200, description="the device id")]


@router.get("", response_model=Page[DeviceSummary], responses=error_responses(403),
            summary="List devices, optionally by tag and profile")
def list_devices(caller: ReaderDep, fleet: FleetDep, page: PageDep,
                 tag: Annotated[str | None, Query(max_length=200)] = None,
                 profile: Annotated[str | None, Query(max_length=200)] = None
                 ) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        items, total = devices.list_devices(conn, limit=page.limit, offset=page.offset,
                                            tag=tag, profile=profile)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.post("", status_code=201, response_model=ProvisionOut,
             responses=error_responses(403, 409),
             summary="Provision a device; returns its provisioning file (secrets shown once)")
def provision_device(body: DeviceCreate, caller: AdminDep, fleet: FleetDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        done = devices.provision(fleet, conn, device_id=body.id, profile=body.profile,
                                 tags=body.tags, actor=caller)
    publish_pending(fleet)
    return {"device": done.device, "provisioning": done.provisioning.to_dict()}


@router.get("/{device_id}", response_model=DeviceOut, responses=error_responses(403, 404),
            summary="One device, with its last signed desired state")
def get_device(device_id: DeviceId, caller: ReaderDep, fleet: FleetDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        return devices.get_device(conn, device_id)


@router.post("/{device_id}/revoke", response_model=DeviceOut,
             responses=error_responses(403, 404, 409),
             summary="Revoke a device: its MQTT credentials and token stop working")
def revoke_device(device_id: DeviceId, caller: AdminDep, fleet: FleetDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        out = devices.revoke(fleet, conn, device_id, actor=caller)
    kick = fleet.extra.get("kick")  # the embedded broker drops its live session at once
    if kick is not None:
        kick(device_id)
    publish_pending(fleet)
    return out
