"""Monitoring (reader): fleet, model, device, drift and distribution views; Prometheus.

The routes parse the range and call :mod:`fleet_server.monitoring` (the dashboard calls the
same functions). Every view takes ``since`` and ``until`` (unix seconds, server clock;
default: the last hour) and ``bucket`` (seconds; default: at most 60 buckets).

``GET /metrics`` is the Prometheus exposition (text format 0.0.4) of the app's own registry
(:func:`fleet_server.monitoring.make_registry`), behind a reader-scope bearer token like every
route::

    scrape_configs:
      - job_name: edgefleet
        authorization: {type: Bearer, credentials_file: /etc/prometheus/edgefleet.token}
        static_configs: [{targets: ["fleet.example.com:8080"]}]
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from fleet_server.api.deps import MAX_INT64, FleetDep, ReaderDep
from fleet_server.api.schemas import (
    DeviceMonitoringOut,
    DistributionOut,
    DriftOut,
    FleetMonitoringOut,
    ModelMonitoringOut,
    error_responses,
)
from fleet_server.fleet import Fleet
from fleet_server.monitoring import (
    TimeRange,
    device_view,
    distribution_view,
    drift_view,
    fleet_view,
    model_view,
)

__all__ = ["metrics_router", "router"]

router = APIRouter(prefix="/v1/monitoring", tags=["monitoring"])
metrics_router = APIRouter(tags=["monitoring"])

Since = Annotated[int | None, Query(ge=0, le=MAX_INT64, description="unix seconds, "
                                    "exclusive (default: an hour before until)")]
Until = Annotated[int | None, Query(ge=0, le=MAX_INT64, description="unix seconds, "
                                    "inclusive (default: now)")]
Bucket = Annotated[int | None, Query(ge=1, le=MAX_INT64, description="bucket size in "
                                     "seconds (default: at most 60 buckets; at most 1000)")]
ModelName = Annotated[str, PathParam(max_length=200, description="the model's name")]
Version = Annotated[str | None, Query(max_length=100, description="one version (default: "
                                      "every version)")]
InputName = Annotated[str | None, Query(max_length=200, description="an input name (default: "
                                        "every input; the only one for a distribution)")]


def _range(fleet: Fleet, since: int | None, until: int | None, bucket: int | None
           ) -> TimeRange:
    return TimeRange.make(fleet.now(), since=since, until=until, bucket_s=bucket)


@router.get("/fleet", response_model=FleetMonitoringOut, responses=error_responses(403),
            summary="Devices by state, every model version's requests, errors, latency and "
                    "drift, fleet-wide series, open alerts")
def monitor_fleet(caller: ReaderDep, fleet: FleetDep, since: Since = None,
                  until: Until = None, bucket: Bucket = None) -> dict[str, Any]:
    return fleet_view(fleet, _range(fleet, since, until, bucket))


@router.get("/models/{model}", response_model=ModelMonitoringOut,
            responses=error_responses(403, 404),
            summary="One model: per version and per device requests, errors, latency "
                    "percentiles and drift, with series")
def monitor_model(model: ModelName, caller: ReaderDep, fleet: FleetDep, since: Since = None,
                  until: Until = None, bucket: Bucket = None) -> dict[str, Any]:
    return model_view(fleet, model, _range(fleet, since, until, bucket))


@router.get("/models/{model}/drift", response_model=DriftOut,
            responses=error_responses(403, 404),
            summary="Input drift over time: per bucket the max and mean PSI over devices and "
                    "PSI/JS per feature; per device its trend")
def monitor_drift(model: ModelName, caller: ReaderDep, fleet: FleetDep,
                  version: Version = None,
                  device: Annotated[str | None, Query(max_length=200, description="one "
                                                      "device (default: every device)")]
                  = None,
                  input: InputName = None,
                  feature: Annotated[int | None, Query(ge=0, le=1 << 31, description="one "
                                                       "feature index (default: all)")] = None,
                  since: Since = None, until: Until = None, bucket: Bucket = None
                  ) -> dict[str, Any]:
    return drift_view(fleet, model, _range(fleet, since, until, bucket), version=version,
                      device=device, input_name=input, feature=feature)


@router.get("/models/{model}/distribution", response_model=DistributionOut,
            responses=error_responses(403, 404),
            summary="One input feature's reference distribution (the artifact's drift "
                    "baseline) against the live one, pooled over windows and devices (or "
                    "one device's)")
def monitor_distribution(model: ModelName, caller: ReaderDep, fleet: FleetDep,
                         version: Annotated[str, Query(min_length=1, max_length=100,
                                                       description="the model version")],
                         input: InputName = None,
                         feature: Annotated[int, Query(ge=0, le=1 << 31, description="the "
                                                       "feature index (0 for an image or "
                                                       "tensor input)")] = 0,
                         profile: Annotated[str | None, Query(
                             max_length=100, description="whose artifact is the reference "
                             "(default: the first profile by name)")] = None,
                         device: Annotated[str | None, Query(
                             max_length=200, description="only this device's windows "
                             "(default: every device); the reference is then its "
                             "profile's")] = None,
                         since: Since = None, until: Until = None) -> dict[str, Any]:
    return distribution_view(fleet, model, _range(fleet, since, until, None), version=version,
                             input_name=input, feature=feature, profile=profile,
                             device=device)


@router.get("/devices/{device_id}", response_model=DeviceMonitoringOut,
            responses=error_responses(403, 404),
            summary="One device: per model version it served, requests, errors, latency and "
                    "drift, with series")
def monitor_device(device_id: Annotated[str, PathParam(max_length=200)], caller: ReaderDep,
                   fleet: FleetDep, since: Since = None, until: Until = None,
                   bucket: Bucket = None) -> dict[str, Any]:
    return device_view(fleet, device_id, _range(fleet, since, until, bucket))


@metrics_router.get(
    "/metrics", response_class=Response,
    responses={200: {"description": "Prometheus text exposition format 0.0.4",
                     "content": {"text/plain": {"schema": {"type": "string"}}}},
               **error_responses(403)},
    summary="Prometheus metrics: fleet gauges, ingest counters, rollouts, alerts (reader "
            "token)")
def metrics(request: Request, caller: ReaderDep) -> Response:
    return Response(generate_latest(request.app.state.prometheus),
                    media_type=CONTENT_TYPE_PLAIN_0_0_4)
