"""The server's Prometheus metrics: one private registry per app, read at scrape time.

:func:`make_registry` returns a ``CollectorRegistry`` of its own (never prometheus-client's
global one, so two apps in one process never mix) holding one collector. Each scrape reads
the database for the fleet gauges and the app's MQTT runtime for the ingest counters; nothing
is counted on a hot path for it:

=====================================  =======  ==============================================
metric                                 type     labels: what
=====================================  =======  ==============================================
edgefleet_devices                      gauge    state: online, offline (live devices), revoked
edgefleet_model_version_devices        gauge    model, version: live devices reporting they run
                                                it
edgefleet_rollouts                     gauge    status: rollouts in each status
edgefleet_alerts                       gauge    state: pending, firing
edgefleet_alert_firing                 gauge    rule_id, model, kind: 1 per firing alert
edgefleet_alert_webhooks               gauge    status: deliveries pending, delivered, failed
edgefleet_ingest_messages_total        counter  kind: device messages handled (reported,
                                                status, telemetry, drift, rejected)
edgefleet_ingest_records_total         counter  stream, outcome (stored, duplicate): records
edgefleet_ingest_rejected_total        counter  reason: oversized, malformed, forged,
                                                unknown_device
edgefleet_acks_sent_total              counter  acks published to devices
edgefleet_ingest_parse_restarts_total  counter  parse processes replaced (died or hung)
edgefleet_ingest_parse_reparsed_messages_total  counter  messages re-parsed in-thread for them
edgefleet_records_pruned_total         counter  stream: device records deleted by retention
edgefleet_retention_runs_total         counter  retention runs (also those deleting nothing)
edgefleet_retention_last_run_timestamp_seconds    gauge  server time of the last run
edgefleet_retention_last_prune_timestamp_seconds  gauge  ... of the last run that deleted rows
=====================================  =======  ==============================================

The counters start at 0 with the server process (``serve``); without an MQTT runtime (an
app serving only the API) they are absent. The retention metrics
(:class:`~fleet_server.monitoring.retention.PruneCounters`) are absent too while retention is
off (``record_retention_days`` 0), and each timestamp until its first run.

``GET /metrics`` serves it with a reader-scope bearer token (Prometheus: ``authorization:
{type: Bearer, credentials_file: ...}`` in the scrape config).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from fleet_server.db import tables
from fleet_server.db.engine import reading
from fleet_server.fleet import Fleet
from fleet_server.ingest import IngestCounters
from fleet_server.monitoring.retention import STREAMS, RecordRetention
from fleet_server.monitoring.views import running_models
from fleet_server.rollout.state import STATUSES

__all__ = ["NAMESPACE", "FleetCollector", "make_registry"]

NAMESPACE: Final = "edgefleet"
_WEBHOOK_STATES: Final = ("pending", "delivered", "failed")
_REJECT_CLASSES: Final = ("oversized", "malformed", "forged", "unknown_device")


class FleetCollector(Collector):
    """Reads the fleet and the ingest counters at each scrape (module docstring).

    Args:
        fleet: the app's open Fleet, or None (outside its lifespan: nothing to read).
        counters: the ingest counters of the app's MQTT runtime, or None.
        retention: the record retention of the app's MQTT runtime, or None.
    """

    def __init__(self, fleet: Callable[[], Fleet | None],
                 counters: Callable[[], IngestCounters | None],
                 retention: Callable[[], RecordRetention | None] | None = None) -> None:
        self._fleet = fleet
        self._counters = counters
        self._retention = retention

    def collect(self) -> Iterator[Metric]:
        """Raises: StoreError: the database failed (the scrape fails, visibly)."""
        fleet = self._fleet()
        if fleet is not None:
            yield from self._fleet_gauges(fleet)
        counters = self._counters()
        if counters is not None:
            yield from self._ingest_counters(counters.snapshot())
        retention = self._retention() if self._retention is not None else None
        if retention is not None and retention.keep_s > 0:
            yield from self._retention_metrics(retention.counters.snapshot())

    def _fleet_gauges(self, fleet: Fleet) -> Iterator[Metric]:
        d, r, a, w = (tables.devices.c, tables.rollouts.c, tables.alerts.c,
                      tables.alert_webhooks.c)
        with reading(fleet.engine) as conn:
            devices = conn.execute(select(d.online, d.revoked_at, d.reported)).all()
            rollouts: dict[str, int] = dict(conn.execute(
                select(r.status, func.count()).group_by(r.status)).all())
            firing = conn.execute(select(a.rule_id, a.model, a.kind).where(
                a.state == "firing").order_by(a.rule_id)).all()
            pending = conn.execute(select(func.count()).select_from(tables.alerts).where(
                a.state == "pending")).scalar_one()
            hooks: dict[str, int] = dict(conn.execute(
                select(w.status, func.count()).group_by(w.status)).all())
        live = [row for row in devices if row.revoked_at is None]
        online = sum(1 for row in live if row.online)
        g = GaugeMetricFamily(f"{NAMESPACE}_devices", "Provisioned devices by state.",
                              labels=["state"])
        for state, n in (("online", online), ("offline", len(live) - online),
                         ("revoked", len(devices) - len(live))):
            g.add_metric([state], n)
        yield g
        running: dict[tuple[str, str], int] = {}
        for row in live:
            for key in running_models(row.reported):
                running[key] = running.get(key, 0) + 1
        g = GaugeMetricFamily(f"{NAMESPACE}_model_version_devices",
                              "Live devices that report running a model version.",
                              labels=["model", "version"])
        for (model, version), n in sorted(running.items()):
            g.add_metric([model, version], n)
        yield g
        g = GaugeMetricFamily(f"{NAMESPACE}_rollouts", "Rollouts by status.", labels=["status"])
        for status in STATUSES:
            g.add_metric([status], int(rollouts.get(status, 0)))
        yield g
        g = GaugeMetricFamily(f"{NAMESPACE}_alerts", "Open alerts by state.", labels=["state"])
        g.add_metric(["pending"], int(pending))
        g.add_metric(["firing"], len(firing))
        yield g
        g = GaugeMetricFamily(f"{NAMESPACE}_alert_firing", "1 for each firing alert.",
                              labels=["rule_id", "model", "kind"])
        for row in firing:
            g.add_metric([str(row.rule_id), row.model, row.kind], 1)
        yield g
        g = GaugeMetricFamily(f"{NAMESPACE}_alert_webhooks", "Alert webhook deliveries by "
                              "status.", labels=["status"])
        for status in _WEBHOOK_STATES:
            g.add_metric([status], int(hooks.get(status, 0)))
        yield g

    def _ingest_counters(self, snap: dict[str, Any]) -> Iterator[Metric]:
        c = CounterMetricFamily(f"{NAMESPACE}_ingest_messages", "Device messages handled by "
                                "ingest, by kind.", labels=["kind"])
        for kind in ("reported", "status", "telemetry", "drift", "rejected"):
            c.add_metric([kind], snap["messages"].get(kind, 0))
        yield c
        c = CounterMetricFamily(f"{NAMESPACE}_ingest_records", "Telemetry and drift records "
                                "received: stored, or duplicates of stored ones.",
                                labels=["stream", "outcome"])
        for stream in ("telemetry", "drift"):
            c.add_metric([stream, "stored"], snap["stored"].get(stream, 0))
            c.add_metric([stream, "duplicate"], snap["duplicates"].get(stream, 0))
        yield c
        c = CounterMetricFamily(f"{NAMESPACE}_ingest_rejected", "Device messages dropped, by "
                                "reason.", labels=["reason"])
        for reason in sorted({*_REJECT_CLASSES, *snap["rejected"]}):
            c.add_metric([reason], snap["rejected"].get(reason, 0))
        yield c
        yield CounterMetricFamily(f"{NAMESPACE}_acks_sent", "Acks published to devices.",
                                  value=snap["acks"])
        yield CounterMetricFamily(f"{NAMESPACE}_ingest_parse_restarts", "Parse processes "
                                  "replaced after dying or hanging.",
                                  value=snap["parse_restarts"])
        yield CounterMetricFamily(f"{NAMESPACE}_ingest_parse_reparsed_messages", "Messages "
                                  "re-parsed on the ingest thread for a replaced parse "
                                  "process.", value=snap["parse_reparsed"])


    def _retention_metrics(self, snap: dict[str, Any]) -> Iterator[Metric]:
        c = CounterMetricFamily(f"{NAMESPACE}_records_pruned", "Device records deleted by the "
                                "record retention, by stream.", labels=["stream"])
        for stream in sorted({*STREAMS, *snap["pruned"]}):
            c.add_metric([stream], snap["pruned"].get(stream, 0))
        yield c
        yield CounterMetricFamily(f"{NAMESPACE}_retention_runs", "Record retention runs, "
                                  "also those that found nothing to delete.",
                                  value=snap["runs"])
        if snap["last_run_at"] is not None:
            yield GaugeMetricFamily(f"{NAMESPACE}_retention_last_run_timestamp_seconds",
                                    "Server time of the last record retention run.",
                                    value=snap["last_run_at"])
        if snap["last_prune_at"] is not None:
            yield GaugeMetricFamily(f"{NAMESPACE}_retention_last_prune_timestamp_seconds",
                                    "Server time of the last record retention run that "
                                    "deleted records.", value=snap["last_prune_at"])


def make_registry(fleet: Callable[[], Fleet | None],
                  counters: Callable[[], IngestCounters | None],
                  retention: Callable[[], RecordRetention | None] | None = None,
                  ) -> CollectorRegistry:
    """A private registry holding one :class:`FleetCollector` over ``fleet``, ``counters``
    and ``retention`` (read at each scrape)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet, counters, retention))
    return registry
