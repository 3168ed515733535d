"""Fleet monitoring: what devices send back, as views, alerts and Prometheus metrics.

Computed from the devices' own summaries (``metrics.requests`` and ``drift.summary`` records,
never raw data), on read, with the rollout gates' aggregation
(:mod:`fleet_server.rollout.health`), so a gate, a view and an alert never disagree about a
device. The admin API (``/v1/monitoring/...``, ``/v1/alert-rules``, ``/v1/alerts``,
``/metrics``) and the dashboard call these same functions. Every view takes the open
:class:`~fleet_server.fleet.Fleet` and a :class:`TimeRange` (server-clock unix seconds,
``(since, until]``, bucket size), and returns plain dicts::

    rng = TimeRange.make(fleet.now(), since=None, until=None, bucket_s=None)  # last hour

    fleet_view(fleet, rng) -> {since, until, bucket_s, devices: {total, online, offline,
        revoked}, totals: STATS, models: [{model, running_devices, reporting_devices,
        **STATS, versions: [{version, running_devices, reporting_devices, **STATS}]}],
        series: [POINT], alerts: {pending, firing}}
    model_view(fleet, model, rng) -> {model, since, until, bucket_s, totals: STATS,
        versions: [{version, running_devices, reporting_devices, **STATS, series: [POINT]}],
        devices: [{device, version, profile, online, revoked, running, latency_budget_ms,
                   last_at, **STATS}], series: [POINT]}
    device_view(fleet, device_id, rng) -> {device, since, until, bucket_s, profile, online,
        revoked, last_seen_at, latency_budget_ms, running: [{model, version}], totals: STATS,
        models: [{model, version, running, last_at, **STATS, series: [POINT]}]}
    drift_view(fleet, model, rng, *, version=None, device=None, input_name=None,
               feature=None) -> {model, version, device, input, feature, since, until,
        bucket_s, buckets: [{start, max_psi, mean_psi, windows, predictions,
                             devices: [{device, max_psi, windows}],
                             features: [{input, feature, psi_max, psi_mean, js_max, js_mean,
                                         samples, devices}]}],
        devices: [{device, versions, windows, predictions, first_max_psi, latest_max_psi,
                   peak_max_psi, latest_at, trend, series: [max_psi | None per bucket],
                   top_features: [{input, feature, psi, js}]}]}
    distribution_view(fleet, model, rng, *, version, input_name=None, feature=0,
                      profile=None, device=None) -> {model, version, device, input,
        feature, kind, profile, profiles, since, until, bucket_s, edges, reference,
        live_counts, live, samples, windows, windows_without_counts, devices, psi, js}

    STATS = {requests, errors, error_rate, errors_by_kind, p50_ms, p95_ms, p99_ms, max_psi,
             drift_windows, predictions}
    POINT = {start, requests, errors, error_rate, p50_ms, p95_ms, p99_ms, max_psi,
             drift_windows, predictions, devices, mean_psi}

Alerts (:mod:`fleet_server.monitoring.rules` says what a rule means)::

    with atomic(fleet.engine) as conn:  # fleet_server.db.engine.reading for the lists
        create_rule(conn, AlertRule(0, model, kind, threshold, ...), actor=principal,
                    now=fleet.now()) -> RULE
        list_rules(conn, limit=100, offset=0) -> ([RULE], total)
        delete_rule(conn, rule_id, actor=principal, now=fleet.now()) -> RULE
        list_alerts(conn, state=None, model=None, limit=100, offset=0) -> ([ALERT], total)
    evaluate_alerts(fleet, now=fleet.now()) -> [Transition]  # the maintenance pass

    RULE = {id, model, version, kind, threshold, min_devices, for_s, window_s, min_samples,
            webhook_url, created_at, created_by}
    ALERT = {id, rule_id, rule, model, kind, state, started_at, fired_at, resolved_at,
             updated_at, devices: [{device, value, limit, samples}], value, summary}

:class:`WebhookSender` delivers alert webhooks from its own thread, and
:func:`make_registry` builds an app's Prometheus registry. Errors: ``NotFound`` (unknown
device, model, version or rule), ``InvalidInput`` (a bad range, input, feature or rule field),
``StoreError`` (the database failed).

Records are kept ``record_retention_days`` (:class:`RecordRetention`, run by the maintenance
pass, counted in :class:`~fleet_server.monitoring.retention.PruneCounters` for ``/metrics``);
webhook URLs are limited by ``webhook_allow`` (:class:`WebhookAllowList`), by name when a rule
is made and by name and resolved address before each POST
(:mod:`fleet_server.monitoring.webhook_target`).
"""

from fleet_server.monitoring.alerting import (
    Transition,
    alert_dict,
    create_rule,
    delete_rule,
    evaluate_alerts,
    list_alerts,
    list_rules,
)
from fleet_server.monitoring.allowlist import WebhookAllowList
from fleet_server.monitoring.prometheus import make_registry
from fleet_server.monitoring.retention import PruneReport, RecordRetention
from fleet_server.monitoring.rules import KINDS, STATES, AlertRule, Breach
from fleet_server.monitoring.timerange import TimeRange
from fleet_server.monitoring.views import (
    device_view,
    distribution_view,
    drift_view,
    fleet_view,
    model_view,
)
from fleet_server.monitoring.webhooks import WebhookSender

__all__ = [
    "KINDS",
    "STATES",
    "AlertRule",
    "Breach",
    "PruneReport",
    "RecordRetention",
    "TimeRange",
    "Transition",
    "WebhookAllowList",
    "WebhookSender",
    "alert_dict",
    "create_rule",
    "delete_rule",
    "device_view",
    "distribution_view",
    "drift_view",
    "evaluate_alerts",
    "fleet_view",
    "list_alerts",
    "list_rules",
    "make_registry",
    "model_view",
]
