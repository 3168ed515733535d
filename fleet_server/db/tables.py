"""Index of every persisted table (cf. mender's dbkeys.go): name, purpose, since which version.

| table             | since | what                                                               |
|-------------------|-------|--------------------------------------------------------------------|
| schema_migrations | 1     | one row per applied named migration                               |
| tokens            | 1     | API tokens: sha256 of the secret only, scope, revocation          |
| devices           | 1     | registry: profile, tags, MQTT credential hash, last report/status |
| artifacts         | 1     | one converted model per (name, version, profile), TUF target names |
| deployments       | 1     | model version -> selector; newest active deployment per model wins |
| desired_states    | 1     | last signed desired state per device: sequence, expiry, envelope  |
| device_records    | 1     | telemetry/drift records, unique on (device, stream, seq): dedupe  |
| stream_acks       | 1     | per (device, stream): highest contiguous seq stored (what we ack)  |
| ingest_rejects    | 1     | malformed/oversized/forged device messages: counted, never stored |
| audit             | 1     | append-only, hash-chained log of every mutation                    |
| rollouts          | 2     | one per rollout-backed deployment (same id): spec, planner state  |
| rollout_devices   | 2     | per (rollout, device) assigned: when, and the desired-state       |
|                   |       | sequence that first carried the rollout's version to it           |
| alert_rules       | 3     | per model: drift_psi / error_rate / p95_latency condition, how    |
|                   |       | many devices for how long, optional webhook URL                   |
| alerts            | 3     | one per episode of a rule's condition: pending -> firing ->       |
|                   |       | resolved, with the devices and values that triggered it           |
| alert_webhooks    | 3     | one delivery per fired/resolved alert and webhook: payload, state |
|                   |       | (pending | delivered | failed), attempts, when to retry           |
| webhook_attempts  | 3     | every delivery attempt: when, HTTP status or error                |

Migration ``0002_rollouts`` also adds the index ``ix_device_records_health`` on
``device_records (device_id, kind, received_at)`` (rollout health gates read it).

``0001_initial`` creates every table of :data:`METADATA`, so that object is frozen at version
1: tables introduced later live in their own ``MetaData`` (:data:`METADATA_0002`,
:data:`METADATA_0003`), created by their migration, and :data:`ALL_METADATA` lists them all.

Monitoring (:mod:`fleet_server.monitoring`) computes its views on read from ``device_records``
(through ``ix_device_records_health``): migration ``0003_monitoring`` adds no rollup table, so
ingest writes exactly what it wrote before.

JSON columns are TEXT holding canonical JSON, so SQLite and PostgreSQL behave alike. Times are
integer unix seconds (UTC), taken once per operation from the injected clock.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = [
    "ALL_METADATA",
    "METADATA",
    "METADATA_0002",
    "METADATA_0003",
    "alert_rules",
    "alert_webhooks",
    "alerts",
    "artifacts",
    "audit",
    "deployments",
    "desired_states",
    "device_records",
    "devices",
    "ingest_rejects",
    "rollout_devices",
    "rollouts",
    "schema_migrations",
    "stream_acks",
    "tokens",
    "webhook_attempts",
]

#: the tables of ``0001_initial`` (which runs ``METADATA.create_all``): never add to it
METADATA = MetaData()
#: the tables of ``0002_rollouts``
METADATA_0002 = MetaData()
#: the tables of ``0003_monitoring``
METADATA_0003 = MetaData()

schema_migrations = Table(
    "schema_migrations", METADATA,
    Column("name", String(100), primary_key=True),
    Column("applied_at", BigInteger, nullable=False),
)

tokens = Table(
    "tokens", METADATA,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("scope", String(20), nullable=False),  # admin | publisher | reader | device
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("device_id", String(63), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

devices = Table(
    "devices", METADATA,
    Column("id", String(63), primary_key=True),
    Column("profile", String(100), nullable=False),
    Column("tags", Text, nullable=False),  # JSON list of strings
    Column("mqtt_password_hash", Text, nullable=False),  # mosquitto $7$ PBKDF2-SHA512
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
    Column("online", Boolean, nullable=False, default=False),
    Column("last_seen_at", BigInteger, nullable=True),
    Column("reported", Text, nullable=True),  # last Reported message, canonical JSON
    Column("reported_at", BigInteger, nullable=True),
)

artifacts = Table(
    "artifacts", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("version", String(100), nullable=False),
    Column("profile", String(100), nullable=False),
    Column("runtime", String(40), nullable=False),
    Column("precision", String(40), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("length", BigInteger, nullable=False),
    Column("target_path", Text, nullable=False),
    Column("manifest_target", Text, nullable=False),
    Column("manifest", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("created_by", String(32), nullable=False),
    UniqueConstraint("name", "version", "profile", name="uq_artifact"),
)

deployments = Table(
    "deployments", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False),
    Column("version", String(100), nullable=False),
    Column("selector", Text, nullable=False),  # JSON {"devices": [], "tags": [], "profiles": []}
    Column("status", String(20), nullable=False),  # active | superseded | cancelled
    Column("created_at", BigInteger, nullable=False),
    Column("created_by", String(32), nullable=False),
)

desired_states = Table(
    "desired_states", METADATA,
    Column("device_id", String(63), primary_key=True),
    Column("sequence", BigInteger, nullable=False),
    Column("models", Text, nullable=False),  # JSON list of DesiredModel dicts (what was signed)
    Column("issued_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("envelope", Text, nullable=False),  # the signed bytes published, retained
    Column("published", Boolean, nullable=False, default=False),
)

device_records = Table(
    "device_records", METADATA,
    Column("device_id", String(63), primary_key=True),
    Column("stream", String(20), primary_key=True),  # telemetry | drift
    Column("seq", BigInteger, primary_key=True),
    Column("kind", String(60), nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
    Column("received_at", BigInteger, nullable=False),
)

stream_acks = Table(
    "stream_acks", METADATA,
    Column("device_id", String(63), primary_key=True),
    Column("stream", String(20), primary_key=True),
    Column("upto_seq", BigInteger, nullable=False),
)

ingest_rejects = Table(
    "ingest_rejects", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", BigInteger, nullable=False),
    Column("topic", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("size", Integer, nullable=False),
)

audit = Table(
    "audit", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", BigInteger, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(60), nullable=False),
    Column("target", Text, nullable=False),
    Column("before", Text, nullable=True),
    Column("after", Text, nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)


# ------------------------------------------------------------------------ 0002_rollouts
rollouts = Table(
    "rollouts", METADATA_0002,
    Column("id", Integer, primary_key=True, autoincrement=False),  # = deployments.id
    Column("model", String(200), nullable=False),
    Column("version", String(100), nullable=False),
    Column("spec", Text, nullable=False),  # RolloutSpec.to_dict(), canonical JSON
    Column("state", Text, nullable=False),  # RolloutState.to_dict() (carries state_version)
    Column("status", String(20), nullable=False),  # RolloutState.status, for queries
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)
Index("ix_rollouts_status", rollouts.c.status)

rollout_devices = Table(
    "rollout_devices", METADATA_0002,
    Column("rollout_id", Integer, primary_key=True, autoincrement=False),
    Column("device_id", String(63), primary_key=True),
    Column("assigned_at", BigInteger, nullable=False),
    # the desired-state sequence that first carried the rollout's version to the device after
    # its assignment (None until it is signed); DeviceReport.desired_sequence
    Column("desired_sequence", BigInteger, nullable=True),
)
Index("ix_rollout_devices_device", rollout_devices.c.device_id)

# ------------------------------------------------------------------------ 0003_monitoring
alert_rules = Table(
    "alert_rules", METADATA_0003,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False),
    Column("version", String(100), nullable=True),  # None: every version of the model
    Column("kind", String(20), nullable=False),  # drift_psi | error_rate | p95_latency
    # drift_psi: PSI; error_rate: errors/requests; p95_latency: ms (None: profile budget)
    Column("threshold", Float, nullable=True),
    Column("min_devices", Integer, nullable=False),  # devices over the threshold to count
    Column("for_s", Integer, nullable=False),  # pending this long before firing
    Column("window_s", Integer, nullable=False),  # each device judged on this much history
    Column("min_samples", Integer, nullable=False),  # requests (drift: predictions) to judge
    Column("webhook_url", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("created_by", String(200), nullable=False),
)
Index("ix_alert_rules_model", alert_rules.c.model)

alerts = Table(
    "alerts", METADATA_0003,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rule_id", Integer, nullable=False),  # no foreign key: alerts outlive their rule
    Column("rule", Text, nullable=False),  # the rule as it was (canonical JSON)
    Column("model", String(200), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("state", String(10), nullable=False),  # pending | firing | resolved
    Column("started_at", BigInteger, nullable=False),  # the condition first held
    Column("fired_at", BigInteger, nullable=True),
    Column("resolved_at", BigInteger, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
    # the devices over the threshold at the last evaluation that held: JSON list of
    # {"device", "version", "value", "limit", "samples"}; kept when the alert resolves
    Column("devices", Text, nullable=False),
    Column("value", Float, nullable=True),  # the worst of their values
    Column("summary", Text, nullable=False),  # one line: what holds, since when
)
Index("ix_alerts_state", alerts.c.state)
Index("ix_alerts_rule", alerts.c.rule_id, alerts.c.state)

alert_webhooks = Table(
    "alert_webhooks", METADATA_0003,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alert_id", Integer, nullable=False),
    Column("event", String(10), nullable=False),  # firing | resolved
    Column("url", Text, nullable=False),
    Column("payload", Text, nullable=False),  # the JSON body POSTed, canonical
    Column("status", String(10), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False),
    Column("next_at", BigInteger, nullable=False),  # when a pending one is tried next
    Column("last_error", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("done_at", BigInteger, nullable=True),
)
Index("ix_alert_webhooks_due", alert_webhooks.c.status, alert_webhooks.c.next_at)

webhook_attempts = Table(
    "webhook_attempts", METADATA_0003,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("webhook_id", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),  # 1, 2, ...
    Column("at", BigInteger, nullable=False),
    Column("status_code", Integer, nullable=True),  # None: no HTTP answer
    Column("error", Text, nullable=True),  # None: delivered
)
Index("ix_webhook_attempts_webhook", webhook_attempts.c.webhook_id)

#: every table, whichever migration made it
ALL_METADATA = (METADATA, METADATA_0002, METADATA_0003)
