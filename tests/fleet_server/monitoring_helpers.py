"""Helpers for the monitoring and alert tests: a real fleet on a SQLite file, fed the records
real agent code produces, through the real ingest.

- :class:`Digits` trains the digits MLP once and computes its drift baseline exactly as
  ``model_tools`` does (:func:`model_tools.baseline.compute_baseline`); :meth:`Digits.windows`
  feeds traffic through a real :class:`agent.drift.DriftMonitor` and returns the bodies;
- :func:`metrics_body` is one interval of a real :class:`agent.metrics.RequestMetrics`;
- :class:`Receiver` is a real HTTP server on loopback for webhook deliveries (https with a
  :func:`tls_pair` certificate);
- :class:`Fleetlet` is a data directory with devices and ``digits`` artifacts whose manifests
  carry that baseline, and sends device messages through
  :func:`fleet_server.ingest.handle_message` at a chosen server time.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import ssl
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from agent.drift import DRIFT_SUMMARY_KIND, DriftMonitor
from agent.metrics import METRICS_KIND, RequestMetrics
from agent.protocol.messages import DriftBatch, Record, Reported, RunningModel, TelemetryBatch
from agent.protocol.topics import device_topic
from fleet_server.auth import Principal
from fleet_server.db import atomic, tables
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.ingest import IngestResult, handle_message
from fleet_server.registry import devices
from fleet_server.settings import Settings
from model_tools.baseline import compute_baseline
from model_tools.examples.digits import digits_split, fit_digits_mlp

START = 1_800_000_000  # a multiple of 3600: buckets of up to an hour start here
MODEL = "digits"
ADMIN = Principal("t-admin", "test-admin", "admin")
PUBLISHER = Principal("t-pub", "test-publisher", "publisher")


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


class NullPublisher:
    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        pass

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        pass


class Digits:
    """The digits MLP, its calibration baseline, and drift summaries of real traffic."""

    def __init__(self) -> None:
        x_train, y_train, self.x_cal, _, self.x_eval, _ = digits_split()
        self.clf = fit_digits_mlp(x_train, y_train)
        self.baseline = compute_baseline({"input": self.x_cal}, self.outputs(self.x_cal),
                                         task="classification", source="calibration")

    def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"probabilities": self.clf.predict_proba(x).astype(np.float32),
                "label": self.clf.predict(x).astype(np.int64)}

    def windows(self, x: np.ndarray, *, window: int, version: str = "1.0.0",
                batch: int = 15) -> list[dict[str, Any]]:
        """Serve ``x`` in batches through a drift monitor; the closed windows' bodies."""
        monitor = DriftMonitor(self.baseline, window=window, window_s=1e9, model=MODEL,
                               version=version)
        outputs = self.outputs(x)
        bodies = []
        for i, start in enumerate(range(0, len(x), batch)):
            part = slice(start, start + batch)
            got = monitor.observe({"input": x[part]}, {k: v[part] for k, v in outputs.items()},
                                  START + i)
            if got is not None:
                bodies.append(got.to_body())
        return bodies


@functools.cache
def trained_digits() -> Digits:
    """One :class:`Digits` per test session (training takes seconds)."""
    return Digits()


def metrics_body(latencies_ms: Sequence[float], errors: Mapping[str, int] | None = None, *,
                 version: str = "1.0.0", model: str = MODEL) -> dict[str, Any]:
    """One interval's body from a real RequestMetrics: these successful latencies, and
    ``errors`` failed requests by kind."""
    m = RequestMetrics(start=float(START))
    for ms in latencies_ms:
        m.observe(model, version, ms, True)
    for kind, n in (errors or {}).items():
        for _ in range(n):
            m.observe(model, version, 0.0, False, kind)
    [body] = m.flush(float(START + 10))
    return body


def manifest(baseline: Mapping[str, Any]) -> str:
    return json.dumps({"model": {"name": MODEL}, "drift_baseline": baseline})


class Fleetlet:
    """A fleet on a real SQLite file: ``devices`` (id -> profile), artifacts of ``digits``
    1.0.0 and 2.0.0 for each of their profiles carrying ``baseline``."""

    def __init__(self, tmp_path: Path, device_profiles: Mapping[str, str],
                 baseline: Mapping[str, Any], *, publisher: Any = None) -> None:
        self.clock = Clock(START)
        self.settings = Settings(data_dir=tmp_path / "data")
        self.admin_token = init_data_dir(self.settings, clock=self.clock)
        self.fleet: Fleet = open_fleet(self.settings, clock=self.clock,
                                       publisher=publisher or NullPublisher())
        self._seq: dict[tuple[str, str], int] = {}
        with atomic(self.fleet.engine) as conn:
            for device_id, profile in device_profiles.items():
                devices.provision(self.fleet, conn, device_id=device_id, profile=profile,
                                  tags=["lab"], actor=ADMIN)
            for version in ("1.0.0", "2.0.0"):
                for profile in sorted(set(device_profiles.values())):
                    conn.execute(tables.artifacts.insert().values(
                        name=MODEL, version=version, profile=profile, runtime="onnxruntime",
                        precision="fp32", sha256="a" * 64, length=10,
                        target_path=f"models/{MODEL}/{version}/{profile}/model.onnx",
                        manifest_target=f"models/{MODEL}/{version}/{profile}/manifest.json",
                        manifest=manifest(baseline), created_at=START, created_by="t"))

    def _records(self, device_id: str, stream: str, kind: str,
                 bodies: Iterable[Mapping[str, Any]]) -> tuple[Record, ...]:
        out = []
        for body in bodies:
            seq = self._seq[(device_id, stream)] = self._seq.get((device_id, stream), 0) + 1
            out.append(Record(seq=seq, kind=kind, at=self.clock.now, body=dict(body)))
        return tuple(out)

    def metrics(self, device_id: str, bodies: Iterable[Mapping[str, Any]], *, at: int
                ) -> IngestResult:
        """Send ``bodies`` as ``metrics.requests`` records, received at ``at``."""
        batch = TelemetryBatch(device_id=device_id, records=self._records(
            device_id, "telemetry", METRICS_KIND, bodies))
        return self.receive(device_topic(device_id, "telemetry"), batch.to_bytes(), at)

    def drift(self, device_id: str, bodies: Iterable[Mapping[str, Any]], *, at: int
              ) -> IngestResult:
        """Send ``bodies`` as ``drift.summary`` records, received at ``at``."""
        batch = DriftBatch(device_id=device_id, records=self._records(
            device_id, "drift", DRIFT_SUMMARY_KIND, bodies))
        return self.receive(device_topic(device_id, "drift"), batch.to_bytes(), at)

    def running(self, device_id: str, version: str, *, at: int, applied: int = 0
                ) -> IngestResult:
        """The device reports it runs ``digits`` ``version``."""
        rep = Reported(device_id=device_id, applied_sequence=applied,
                       running=(RunningModel(MODEL, version, "a" * 64),), state="Committed",
                       last_result="ok", last_error=None, agent_version="test",
                       reported_at=at)
        return self.receive(device_topic(device_id, "reported"), rep.to_bytes(), at)

    def receive(self, topic: str, payload: bytes, at: int) -> IngestResult:
        result = handle_message(self.fleet, topic, payload, now=at)
        assert result.rejected is None, result.rejected
        return result

    def close(self) -> None:
        self.fleet.engine.dispose()


class Receiver:
    """A real HTTP server on loopback answering each POST with the next scripted status (200
    once the script runs out); ``received`` holds (status, body, headers, path) per POST."""

    def __init__(self, statuses: list[int], tls: ssl.SSLContext | None = None) -> None:
        self.statuses = statuses
        self.received: list[tuple[int, dict[str, Any], dict[str, str], str]] = []
        self.answered = threading.Semaphore(0)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.received.append((status, body, dict(self.headers), self.path))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no")
                receiver.answered.release()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.url = (f"{'http' if tls is None else 'https'}://127.0.0.1:{self.port}"
                    f"/hooks/edgefleet")
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def paths(self) -> list[str]:
        """The path of each POST, in order."""
        return [r[3] for r in self.received]

    def wait(self, n: int) -> None:
        for _ in range(n):
            assert self.answered.acquire(timeout=30), f"got {len(self.received)} requests"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tls_pair(host: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for ``host``: (the server's context, a client context that
    trusts only it and checks the name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with tempfile.TemporaryDirectory() as tmp:  # load_cert_chain reads files only
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(pem)
        key_file.write_bytes(key_pem)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=pem.decode("ascii"))
    return server, client
