"""The admin API end to end: TestClient on a fresh data dir, a recording publisher, a fixed clock.

Bundles are real: a tiny ONNX classifier converted by ``model_tools`` for two profiles. The TUF
test runs the app under a real uvicorn server so an independent ``tuf.ngclient.Updater``, seeded
only with the provisioning file's root, can refresh and download over HTTP.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import socket
import sqlite3
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import urllib3
from fastapi.testclient import TestClient
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface, Updater

from agent.protocol.provisioning import Provisioning
from agent.protocol.signed import trusted_keys_from_pem, verify_desired
from fleet_server import auth
from fleet_server.api import create_app
from fleet_server.api.app import JSON_BODY_LIMIT
from fleet_server.api.routes.models import upload_limit
from fleet_server.db import atomic
from fleet_server.fleet import init_data_dir
from fleet_server.settings import Settings

START = 1_795_000_000  # the fixed clock of every app here (but the live server's, see there)
PROFILES = ("rpi4", "x86-generic")


# ------------------------------------------------------------------------------ fakes, helpers
class FixedClock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> float:
        return float(self.t)


@dataclass
class RecordingPublisher:
    """Implements fleet_server.fleet.Publisher; records every publish."""

    desired: list[tuple[str, bytes]] = field(default_factory=list)
    acks: list[tuple[str, bytes]] = field(default_factory=list)

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        self.desired.append((device_id, envelope))

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        self.acks.append((device_id, payload))

    def take(self) -> dict[str, bytes]:
        out = dict(self.desired)
        assert len(out) == len(self.desired), f"two envelopes for one device: {self.desired}"
        self.desired.clear()
        return out


def tar_dir(directory: Path, *, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        tar.add(directory, arcname="bundle")
    return buf.getvalue()


def tar_members(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass(frozen=True)
class Bundle:
    dir: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / "manifest.json").read_text())

    @property
    def model_bytes(self) -> bytes:
        return (self.dir / "model.onnx").read_bytes()

    def tar(self, *, gz: bool = True) -> bytes:
        return tar_dir(self.dir, gz=gz)

    def files(self, manifest: dict[str, Any] | None = None,
              model: bytes | None = None) -> dict[str, bytes]:
        return {"manifest.json": json.dumps(manifest or self.manifest).encode(),
                "model.onnx": self.model_bytes if model is None else model}


def _tiny_onnx(path: Path, seed: int, n_in: int = 4, n_out: int = 3) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((n_out,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("Add", ["h", "B"], ["z"]),
         helper.make_node("Softmax", ["z"], ["probs"], axis=-1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_out])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], Bundle]:
    """(name, version, profile) -> a real bundle made by model_tools convert (fp32, ~0.1 s)."""
    from model_tools.pipeline import ConvertRequest, convert
    from model_tools.profiles import get_profile

    root = tmp_path_factory.mktemp("bundles")
    out: dict[tuple[str, str, str], Bundle] = {}
    plan = [("tiny", "1.0.0", p, 1, 4) for p in PROFILES]
    plan += [("tiny", "2.0.0", p, 2, 4) for p in PROFILES]
    plan += [("other", "1.0.0", "rpi4", 3, 4), ("big", "1.0.0", "rpi4", 4, 256)]
    for name, version, profile, seed, n_in in plan:
        src = _tiny_onnx(root / f"{name}-{version}-{profile}.onnx", seed, n_in)
        result = convert(ConvertRequest(
            model=src, profile=get_profile(profile), out=root / f"{name}-{version}-{profile}",
            name=name, version=version, precision="fp32", latency_runs=5,
            now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)))
        out[(name, version, profile)] = Bundle(result.bundle)
    return out


@dataclass
class Harness:
    client: TestClient
    settings: Settings
    admin: str
    clock: FixedClock
    publisher: RecordingPublisher

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def call(self, method: str, url: str, token: str | None = "admin",
             **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers.update(self.auth(self.admin if token == "admin" else token))
        return self.client.request(method, url, headers=headers, **kw)

    def ok(self, method: str, url: str, status: int = 200, **kw: Any) -> Any:
        r = self.call(method, url, **kw)
        assert r.status_code == status, r.text
        return r.json()

    def token(self, scope: str) -> str:
        return str(self.ok("POST", "/v1/tokens", 201,
                           json={"name": f"t-{scope}", "scope": scope})["token"])

    def provision(self, device_id: str, profile: str, tags: tuple[str, ...] = ()) -> Provisioning:
        out = self.ok("POST", "/v1/devices", 201,
                      json={"id": device_id, "profile": profile, "tags": list(tags)})
        assert out["device"]["id"] == device_id
        return Provisioning.from_dict(out["provisioning"])

    def push(self, body: bytes, token: str | None = "admin",
             content_type: str = "application/gzip") -> httpx.Response:
        return self.call("POST", "/v1/models", token, content=body,
                         headers={"Content-Type": content_type})

    @property
    def db_path(self) -> Path:
        return self.settings.data_dir / "fleet.db"


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    with ExitStack() as stack:
        made = 0

        def make(**overrides: Any) -> Harness:
            nonlocal made
            made += 1
            data_dir = tmp_path / f"data{made}"
            settings = Settings(data_dir=data_dir, **overrides)
            clock = FixedClock(START)
            admin = init_data_dir(settings, clock=clock)
            publisher = RecordingPublisher()
            app = create_app(settings, clock=clock, publisher=publisher)
            client = stack.enter_context(TestClient(app))
            return Harness(client, settings, admin, clock, publisher)
        yield make


@pytest.fixture
def h(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


def _error(r: httpx.Response, status: int, name: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == name, body
    return str(body["detail"])


# ------------------------------------------------------------------------------ bad bundles
def _mutated(b: Bundle, **file_changes: Any) -> bytes:
    manifest = b.manifest
    for key, value in file_changes.items():
        if key == "profile":
            manifest["profile"] = value
        else:
            manifest["file"][key] = value
    return tar_members(b.files(manifest))


def _not_a_model(b: Bundle) -> bytes:
    junk = b"\xffnot an onnx model" * 20
    manifest = b.manifest
    manifest["file"].update(sha256=hashlib.sha256(junk).hexdigest(), length=len(junk))
    return tar_members(b.files(manifest, junk))


BAD_BUNDLES: list[tuple[str, Callable[[Bundle], bytes], int, str, str]] = [
    # (id, make body from the good rpi4 bundle, status, error, words in the detail)
    ("not-a-tar", lambda b: b"this is not a tar archive" * 10, 422, "BundleRejected", "tar"),
    ("empty-body", lambda b: b"", 422, "BundleRejected", "tar"),
    ("no-manifest", lambda b: tar_members({"model.onnx": b.model_bytes}), 422,
     "BundleRejected", "manifest.json"),
    ("hash-mismatch", lambda b: _mutated(b, sha256="0" * 64), 422, "BundleRejected", "sha256"),
    ("length-mismatch", lambda b: _mutated(b, length=b.manifest["file"]["length"] + 1), 422,
     "BundleRejected", "length"),
    ("unknown-profile", lambda b: _mutated(b, profile="toaster-9000"), 422, "BundleRejected",
     "toaster-9000"),
    ("not-a-model-file", _not_a_model, 422, "BundleRejected", "not a onnxruntime model"),
    ("extra-file", lambda b: tar_members({**b.files(), "evil.sh": b"rm -rf /"}), 422,
     "BundleRejected", "evil.sh"),
    ("path-traversal", lambda b: tar_members({"../manifest.json": b.files()["manifest.json"],
                                              "model.onnx": b.model_bytes}), 422,
     "BundleRejected", "plain file name"),
]


@pytest.mark.parametrize(("make_body", "status", "error", "words"),
                         [row[1:] for row in BAD_BUNDLES], ids=[row[0] for row in BAD_BUNDLES])
def test_bad_bundle_is_refused(h: Harness, bundles: dict[tuple[str, str, str], Bundle],
                               make_body: Callable[[Bundle], bytes], status: int, error: str,
                               words: str) -> None:
    body = make_body(bundles[("tiny", "1.0.0", "rpi4")])
    detail = _error(h.push(body, content_type="application/x-tar"), status, error)
    assert words in detail
    assert h.ok("GET", "/v1/models")["total"] == 0
    assert not list((h.settings.data_dir / "uploads").iterdir())  # temp upload cleaned up


def test_duplicate_model_version_is_409(h: Harness,
                                        bundles: dict[tuple[str, str, str], Bundle]) -> None:
    body = bundles[("tiny", "1.0.0", "rpi4")].tar()
    assert h.push(body).status_code == 201
    detail = _error(h.push(body), 409, "Conflict")
    assert "already pushed" in detail


def test_model_file_over_max_upload_bytes_is_413(
        make_harness: Callable[..., Harness],
        bundles: dict[tuple[str, str, str], Bundle]) -> None:
    h = make_harness(max_upload_bytes=1024)
    big = bundles[("big", "1.0.0", "rpi4")]
    assert len(big.model_bytes) > 1024
    detail = _error(h.push(big.tar()), 413, "PayloadTooLarge")
    assert "1024" in detail
    assert h.push(bundles[("tiny", "1.0.0", "rpi4")].tar()).status_code == 201  # small is fine


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_upload_over_the_limit_is_cut_off_with_413(make_harness: Callable[..., Harness],
                                                   declared: bool) -> None:
    h = make_harness(max_upload_bytes=1024)
    limit = upload_limit(h.client.app.state.fleet)  # type: ignore[attr-defined]
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        while sent <= limit + (1 << 20):
            sent += 64 << 10
            yield b"\0" * (64 << 10)

    body: Any = b"\0" * (limit + 1) if declared else chunks()
    _error(h.push(body, content_type="application/octet-stream"), 413, "PayloadTooLarge")
    assert not list((h.settings.data_dir / "uploads").glob("*"))  # partial upload deleted


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversized_json_body_is_413_before_auth(h: Harness, declared: bool) -> None:
    big = b'{"name": "' + b"a" * JSON_BODY_LIMIT + b'", "scope": "reader"}'
    body: Any = big if declared else iter([big[i:i + 65536]
                                           for i in range(0, len(big), 65536)])
    r = h.call("POST", "/v1/tokens", token=None, content=body,
               headers={"Content-Type": "application/json"})
    assert "bundles go to POST /v1/models" in _error(r, 413, "PayloadTooLarge")


def test_wrong_content_type_is_422(h: Harness,
                                   bundles: dict[tuple[str, str, str], Bundle]) -> None:
    detail = _error(h.push(bundles[("tiny", "1.0.0", "rpi4")].tar(), content_type="text/plain"),
                    422, "InvalidInput")
    assert "Content-Type" in detail


# ------------------------------------------------------------------------------ auth, scopes
AUTH_ROWS: list[tuple[str, str, str, str, dict[str, Any] | None, int, str]] = [
    # (id, who, method, url, json, status, error)
    ("missing-token", "none", "GET", "/v1/devices", None, 401, "Unauthenticated"),
    ("invalid-token", "invalid", "GET", "/v1/devices", None, 401, "Unauthenticated"),
    ("revoked-token", "revoked", "GET", "/v1/devices", None, 401, "Unauthenticated"),
    ("missing-token-tuf", "none", "GET", "/tuf/metadata/timestamp.json", None, 401,
     "Unauthenticated"),
    ("reader-deploys", "reader", "POST", "/v1/deployments",
     {"model": "tiny", "version": "1.0.0", "selector": {"all": True}}, 403, "Forbidden"),
    ("reader-creates-token", "reader", "POST", "/v1/tokens", {"name": "x", "scope": "admin"},
     403, "Forbidden"),
    ("publisher-provisions", "publisher", "POST", "/v1/devices",
     {"id": "pi-9", "profile": "rpi4"}, 403, "Forbidden"),
    ("publisher-reads-audit", "publisher", "GET", "/v1/audit", None, 403, "Forbidden"),
    ("device-lists-devices", "device", "GET", "/v1/devices", None, 403, "Forbidden"),
    ("device-pushes", "device", "POST", "/v1/models", None, 403, "Forbidden"),
]


@pytest.mark.parametrize(("who", "method", "url", "body", "status", "error"),
                         [r[1:] for r in AUTH_ROWS], ids=[r[0] for r in AUTH_ROWS])
def test_auth_and_scope(h: Harness, who: str, method: str, url: str,
                        body: dict[str, Any] | None, status: int, error: str) -> None:
    headers = {}
    if who == "invalid":
        headers = h.auth("ef_admin_not-a-real-token")
    elif who == "revoked":
        secret = h.token("admin")
        with atomic(h.client.app.state.fleet.engine) as conn:  # type: ignore[attr-defined]
            auth.revoke_token(conn, auth.authenticate(conn, secret).token_id, START)
        headers = h.auth(secret)
    elif who == "device":
        headers = h.auth(h.provision("pi-1", "rpi4").http_token)
    elif who != "none":
        headers = h.auth(h.token(who))
    r = h.call(method, url, token=None, headers=headers, json=body)
    _error(r, status, error)
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_device_token_reads_tuf_only_until_revoked(h: Harness) -> None:
    prov = h.provision("pi-1", "rpi4")
    assert h.call("GET", "/tuf/metadata/1.root.json", prov.http_token).status_code == 200
    h.ok("POST", "/v1/devices/pi-1/revoke")
    _error(h.call("GET", "/tuf/metadata/1.root.json", prov.http_token), 401, "Unauthenticated")


# ------------------------------------------------------------------------------ 404, 422 rows
NOT_FOUND_ROWS = [
    ("device", "GET", "/v1/devices/nope", None),
    ("revoke-device", "POST", "/v1/devices/nope/revoke", None),
    ("model", "GET", "/v1/models/nope/versions/1.0.0", None),
    ("version", "GET", "/v1/models/tiny/versions/9.9.9", None),
    ("deploy-model", "POST", "/v1/deployments",
     {"model": "nope", "version": "1.0.0", "selector": {"all": True}}),
    ("deploy-version", "POST", "/v1/deployments",
     {"model": "tiny", "version": "9.9.9", "selector": {"all": True}}),
    ("cancel-deployment", "POST", "/v1/deployments/999/cancel", None),
    ("tuf-metadata-name", "GET", "/tuf/metadata/keys.json", None),
    ("tuf-metadata-version", "GET", "/tuf/metadata/99.root.json", None),
    ("tuf-target", "GET", "/tuf/targets/models/nope.onnx", None),
    ("tuf-target-traversal", "GET", "/tuf/targets/..%2F..%2Fdirector%2Fkey.pem", None),
    ("tuf-target-hidden", "GET", "/tuf/targets/.stage.x.tmp", None),
    ("unknown-route", "GET", "/v1/nope", None),
]


@pytest.mark.parametrize(("method", "url", "body"), [r[1:] for r in NOT_FOUND_ROWS],
                         ids=[r[0] for r in NOT_FOUND_ROWS])
def test_unknown_ids_are_404(h: Harness, bundles: dict[tuple[str, str, str], Bundle],
                             method: str, url: str, body: dict[str, Any] | None) -> None:
    h.provision("pi-1", "rpi4")
    assert h.push(bundles[("tiny", "1.0.0", "rpi4")].tar()).status_code == 201
    detail = _error(h.call(method, url, json=body), 404, "NotFound")
    assert "key.pem" not in detail or "not found" in detail


INVALID_ROWS = [
    ("token-extra-field", "POST", "/v1/tokens", {"name": "a", "scope": "reader", "x": 1},
     "body.x"),
    ("token-device-scope", "POST", "/v1/tokens", {"name": "a", "scope": "device"},
     "body.scope"),
    ("device-extra-field", "POST", "/v1/devices", {"id": "pi-2", "profile": "rpi4", "os": "x"},
     "body.os"),
    ("device-bad-id", "POST", "/v1/devices", {"id": "Pi_2", "profile": "rpi4"}, "Pi_2"),
    ("device-unknown-profile", "POST", "/v1/devices", {"id": "pi-2", "profile": "toaster"},
     "toaster"),
    ("device-bad-tag", "POST", "/v1/devices", {"id": "pi-2", "profile": "rpi4", "tags": ["a b"]},
     "a b"),
    ("deploy-extra-field", "POST", "/v1/deployments",
     {"model": "tiny", "version": "1.0.0", "selector": {"all": True}, "canary": 5},
     "body.canary"),
    ("selector-extra-field", "POST", "/v1/deployments",
     {"model": "tiny", "version": "1.0.0", "selector": {"all": True, "regions": ["eu"]}},
     "body.selector.regions"),
    ("selector-empty", "POST", "/v1/deployments",
     {"model": "tiny", "version": "1.0.0", "selector": {}}, "empty selector"),
    ("selector-matches-nothing", "POST", "/v1/deployments",
     {"model": "tiny", "version": "1.0.0", "selector": {"tags": ["nowhere"]}},
     "matches no live device"),
    ("page-over-limit", "GET", "/v1/devices?limit=501", None, "limit"),
    ("page-zero", "GET", "/v1/models?limit=0", None, "query.limit"),
    ("offset-negative", "GET", "/v1/deployments?offset=-1", None, "query.offset"),
    ("query-unknown", "GET", "/v1/devices?tags=lab", None, "query.tags: expected no such"),
    ("query-repeated", "GET", "/v1/devices?tag=a&tag=b", None, "query.tag: expected one value"),
    ("audit-page-over-limit", "GET", "/v1/audit?limit=100000", None, "limit"),
    ("cancel-id-not-int", "POST", "/v1/deployments/abc/cancel", None, "path.deployment_id"),
    ("body-not-json", "POST", "/v1/tokens", "{not json", "body: JSON decode error"),
]


@pytest.mark.parametrize(("method", "url", "body", "words"), [r[1:] for r in INVALID_ROWS],
                         ids=[r[0] for r in INVALID_ROWS])
def test_invalid_input_is_422(h: Harness, bundles: dict[tuple[str, str, str], Bundle],
                              method: str, url: str, body: Any, words: str) -> None:
    h.provision("pi-1", "rpi4")
    assert h.push(bundles[("tiny", "1.0.0", "rpi4")].tar()).status_code == 201
    kw: dict[str, Any] = ({"content": body, "headers": {"Content-Type": "application/json"}}
                          if isinstance(body, str) else {"json": body})
    detail = _error(h.call(method, url, **kw), 422, "InvalidInput")
    assert words in detail


def test_deploy_to_devices_without_an_artifact_is_409_listing_them(
        h: Harness, bundles: dict[tuple[str, str, str], Bundle]) -> None:
    h.provision("pi-1", "rpi4", ("lab",))
    h.provision("nuc-1", "x86-generic", ("lab",))
    h.provision("nuc-2", "x86-generic", ("lab",))
    assert h.push(bundles[("other", "1.0.0", "rpi4")].tar()).status_code == 201
    r = h.call("POST", "/v1/deployments",
               json={"model": "other", "version": "1.0.0", "selector": {"tags": ["lab"]}})
    detail = _error(r, 409, "Conflict")
    assert "profile x86-generic: nuc-1, nuc-2" in detail
    assert "pi-1" not in detail
    assert h.ok("GET", "/v1/deployments")["total"] == 0
    assert h.publisher.desired == []


def test_pagination(h: Harness) -> None:
    for i in range(5):
        h.provision(f"pi-{i}", "rpi4" if i % 2 else "x86-generic", ("even",) if i % 2 == 0
                    else ())
    page = h.ok("GET", "/v1/devices?limit=2&offset=1")
    assert [d["id"] for d in page["items"]] == ["pi-1", "pi-2"]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)
    assert h.ok("GET", "/v1/devices?tag=even")["total"] == 3
    assert h.ok("GET", "/v1/devices?profile=rpi4")["total"] == 2
    assert h.ok("GET", "/v1/devices")["limit"] == 100


def test_healthz_needs_no_token_and_openapi_documents_security(h: Harness) -> None:
    assert h.ok("GET", "/healthz", token=None) == {"status": "ok"}
    schema = h.ok("GET", "/openapi.json", token=None)
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    ops = [(path, method, op) for path, item in schema["paths"].items()
           for method, op in item.items()]
    # 15, the 5 rollout routes, the 5 monitoring views, 4 alert routes and /metrics
    assert len(ops) == 30
    for path, method, op in ops:
        if path == "/healthz":
            assert "security" not in op
        else:
            assert op["security"] == [{"HTTPBearer": []}], (path, method)
            assert "401" in op["responses"], (path, method)
    limit = schema["paths"]["/v1/devices"]["get"]["parameters"]
    assert any(p["name"] == "limit" and p["schema"]["maximum"] == 500 for p in limit)
    assert "application/x-tar" in schema["paths"]["/v1/models"]["post"]["requestBody"]["content"]


# ------------------------------------------------------------------------------ happy path
def _verify(h: Harness, prov: Provisioning, envelope: bytes, last: int) -> Any:
    keys = trusted_keys_from_pem(prov.director_keys_pem)
    return verify_desired(envelope, public_keys=keys, device_id=prov.device_id,
                          last_sequence=last, now=int(h.clock()))


def test_provision_push_deploy_cancel_revoke_and_audit(
        h: Harness, bundles: dict[tuple[str, str, str], Bundle]) -> None:
    devices = {"pi-1": ("rpi4", ("lab",)), "pi-2": ("rpi4", ("lab", "edge")),
               "nuc-1": ("x86-generic", ("lab", "edge"))}
    provs = {d: h.provision(d, p, t) for d, (p, t) in devices.items()}
    assert h.publisher.desired == []  # nothing deployed yet: nothing signed
    for key in [("tiny", "1.0.0", p) for p in PROFILES] + [("tiny", "2.0.0", p)
                                                           for p in PROFILES]:
        r = h.push(bundles[key].tar(gz=key[2] == "rpi4"),
                   content_type="application/gzip" if key[2] == "rpi4" else "application/x-tar")
        assert r.status_code == 201, r.text
    version = h.ok("GET", "/v1/models/tiny/versions/1.0.0")
    assert sorted(a["profile"] for a in version["artifacts"]) == sorted(PROFILES)
    assert h.ok("GET", "/v1/models")["total"] == 2

    # first deployment: every device, each its own profile's artifact, sequence 1
    dep1 = h.ok("POST", "/v1/deployments", 201,
                json={"model": "tiny", "version": "1.0.0", "selector": {"tags": ["lab"]}})
    assert dep1["devices"] == sorted(devices) and dep1["desired_changed"] == sorted(devices)
    sent = h.publisher.take()
    assert sorted(sent) == sorted(devices)
    for device_id, envelope in sent.items():
        state = _verify(h, provs[device_id], envelope, last=0)
        assert state.sequence == 1
        (model,) = state.models
        profile = devices[device_id][0]
        art = bundles[("tiny", "1.0.0", profile)].manifest["file"]
        assert (model.name, model.version, model.profile) == ("tiny", "1.0.0", profile)
        assert (model.sha256, model.length) == (art["sha256"], art["length"])
        assert model.target_path == f"models/tiny/1.0.0/{profile}/model.onnx"
    assert h.ok("GET", "/v1/devices/pi-1")["desired"]["published"] is True

    # second deployment to the "edge" devices: only they move, to sequence 2
    dep2 = h.ok("POST", "/v1/deployments", 201,
                json={"model": "tiny", "version": "2.0.0", "selector": {"tags": ["edge"]}})
    assert dep2["desired_changed"] == ["nuc-1", "pi-2"]
    sent = h.publisher.take()
    assert sorted(sent) == ["nuc-1", "pi-2"]
    for device_id, envelope in sent.items():
        state = _verify(h, provs[device_id], envelope, last=1)
        assert state.sequence == 2 and state.models[0].version == "2.0.0"
    assert h.ok("GET", "/v1/devices/pi-1")["desired"]["sequence"] == 1

    # cancel: the edge devices fall back to 1.0.0 (sequence 3); pi-1 is untouched
    cancelled = h.ok("POST", f"/v1/deployments/{dep2['id']}/cancel")
    assert cancelled["status"] == "cancelled"
    _error(h.call("POST", f"/v1/deployments/{dep2['id']}/cancel"), 409, "Conflict")
    sent = h.publisher.take()
    assert sorted(sent) == ["nuc-1", "pi-2"]
    for device_id, envelope in sent.items():
        state = _verify(h, provs[device_id], envelope, last=2)
        assert state.sequence == 3 and state.models[0].version == "1.0.0"
    listed = h.ok("GET", "/v1/deployments")
    assert [(d["id"], d["status"]) for d in listed["items"]] == [
        (dep2["id"], "cancelled"), (dep1["id"], "active")]

    # a device provisioned later gets the active deployment straight away
    provs["pi-3"] = h.provision("pi-3", "rpi4", ("lab",))
    (envelope,) = h.publisher.take().values()
    assert _verify(h, provs["pi-3"], envelope, last=0).models[0].version == "1.0.0"

    # revoke: the device's token stops working on /tuf
    token = provs["pi-2"].http_token
    assert h.call("GET", "/tuf/metadata/timestamp.json", token).status_code == 200
    assert h.ok("POST", "/v1/devices/pi-2/revoke")["revoked"] is True
    _error(h.call("GET", "/tuf/metadata/timestamp.json", token), 401, "Unauthenticated")
    _error(h.call("POST", "/v1/devices/pi-2/revoke"), 409, "Conflict")

    # the audit log has every mutation, chained
    log = h.ok("GET", "/v1/audit?limit=500")
    assert log["chain_intact"] is True and log["first_broken_id"] is None
    actions = [e["action"] for e in log["items"]]
    assert actions == (["token.create"] + ["device.provision"] * 3 + ["model.push"] * 4
                       + ["deployment.create"] * 2 + ["deployment.cancel", "device.provision",
                                                      "device.revoke"])
    assert all(e["actor"] == "admin:initial-admin" for e in log["items"][1:])
    page = h.ok("GET", f"/v1/audit?after_id={log['items'][3]['id']}&limit=2")
    assert [e["id"] for e in page["items"]] == [e["id"] for e in log["items"][4:6]]

    # tampering with a row directly in SQLite breaks the chain at that row
    victim = log["items"][5]["id"]
    with sqlite3.connect(h.db_path) as db:
        db.execute("UPDATE audit SET actor = 'someone-else' WHERE id = ?", (victim,))
    log = h.ok("GET", "/v1/audit")
    assert log["chain_intact"] is False and log["first_broken_id"] == victim


# ------------------------------------------------------------------------------ TUF over HTTP
class TokenFetcher(FetcherInterface):
    """ngclient fetcher sending the device's bearer token (no proxies: loopback only)."""

    def __init__(self, token: str) -> None:
        self._pool = urllib3.PoolManager(headers={"Authorization": f"Bearer {token}"})
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        response = self._pool.request("GET", url, preload_content=False,
                                      timeout=urllib3.Timeout(10))
        if response.status >= 400:
            response.close()
            raise DownloadHTTPError(f"HTTP error for {url}", response.status)
        return response.stream(1 << 16)


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The app under uvicorn on 127.0.0.1, port chosen by the OS: (base_url, admin token)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections queue until uvicorn accepts: no readiness polling needed
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(data_dir=tmp_path / "data", public_url=base)
    # fixed, but at the real time: tuf.ngclient checks metadata expiry against the system clock
    clock = FixedClock(int(time.time()))
    admin = init_data_dir(settings, clock=clock)
    app = create_app(settings, clock=clock, publisher=RecordingPublisher())
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield base, admin
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_tuf_ngclient_downloads_every_artifact_through_the_api(
        live_server: tuple[str, str], bundles: dict[tuple[str, str, str], Bundle],
        tmp_path: Path) -> None:
    base, admin = live_server
    headers = {"Authorization": f"Bearer {admin}"}
    pushed = [("tiny", "1.0.0", p) for p in PROFILES] + [("tiny", "2.0.0", "rpi4")]
    with httpx.Client(base_url=base, headers=headers, trust_env=False, timeout=30) as http:
        for key in pushed:
            r = http.post("/v1/models", content=bundles[key].tar(),
                          headers={"Content-Type": "application/gzip"})
            assert r.status_code == 201, r.text
        r = http.post("/v1/devices", json={"id": "pi-1", "profile": "rpi4"})
        assert r.status_code == 201, r.text
    prov = Provisioning.from_dict(r.json()["provisioning"])
    assert prov.tuf_metadata_url == f"{base}/tuf/metadata/"

    fetcher = TokenFetcher(prov.http_token)
    (tmp_path / "meta").mkdir()
    (tmp_path / "dl").mkdir()
    updater = Updater(metadata_dir=str(tmp_path / "meta"), metadata_base_url=prov.tuf_metadata_url,
                      target_dir=str(tmp_path / "dl"), target_base_url=prov.tuf_targets_url,
                      fetcher=fetcher, bootstrap=prov.tuf_root)
    updater.refresh()
    for key in pushed:
        bundle = bundles[key]
        name, version, profile = key
        for filename, expected in (("model.onnx", bundle.model_bytes),
                                   ("manifest.json", (bundle.dir / "manifest.json").read_bytes())):
            info = updater.get_targetinfo(f"models/{name}/{version}/{profile}/{filename}")
            assert info is not None, key
            if filename == "model.onnx":
                assert info.hashes["sha256"] == bundle.manifest["file"]["sha256"]
            got = Path(updater.download_target(info)).read_bytes()
            if filename == "model.onnx":
                assert got == expected
                assert hashlib.sha256(got).hexdigest() == bundle.manifest["file"]["sha256"]
            else:  # the server re-serialises the manifest; its content is the same
                assert json.loads(got) == json.loads(expected)
    assert any("/tuf/targets/" in u for u in fetcher.urls)


def test_tuf_targets_never_follow_a_symlink(h: Harness,
                                            bundles: dict[tuple[str, str, str], Bundle]) -> None:
    """A link under the targets directory could lead anywhere: it is never served, even one
    that points back inside; a directory is not a target either."""
    h.provision("pi-1", "rpi4")
    assert h.push(bundles[("tiny", "1.0.0", "rpi4")].tar()).status_code == 201
    targets = h.settings.data_dir / "tuf" / "public" / "targets"
    served = next(targets.rglob("*.manifest.json"))
    assert h.call("GET", f"/tuf/targets/{served.relative_to(targets).as_posix()}"
                  ).status_code == 200
    secret = h.settings.data_dir / "outside.txt"
    secret.write_text("not for devices")
    (targets / "models" / "leak.onnx").symlink_to(secret)
    (targets / "models" / "again.json").symlink_to(served)
    (targets / "linked").symlink_to(served.parent, target_is_directory=True)
    for url in ("models/leak.onnx", "models/again.json", f"linked/{served.name}", "models"):
        detail = _error(h.call("GET", f"/tuf/targets/{url}"), 404, "NotFound")
        assert "not found" in detail
