"""The agent's downloads: ONE TUF metadata refresh per update, every check still made.

A real :class:`~fleet_server.tuf_repo.TufRepository` is served over real HTTP on loopback by a
server that counts every request and wants the device's bearer token; the agent side is the
real ``TargetsFetcher(ArtifactFetcher(...))`` the daemon wires, over the real ``AuthFetcher``.
ngclient judges expiry by the wall clock, so the repository is created at the real time.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions as tuf_exc

from agent.errors import ArtifactError
from agent.protocol.messages import DesiredModel
from agent.protocol.provisioning import Provisioning
from agent.transport.artifacts import ArtifactFetcher, AuthFetcher
from agent.updater.runner import TargetRequest, TargetsFetcher
from fleet_server.tuf_repo import TufRepository

TOKEN = "ef_device_test-token"


class _Handler(SimpleHTTPRequestHandler):
    """Serves the repository's public directory; records each request; 401 without the token."""

    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Repo:
    def __init__(self, tmp_path: Path) -> None:
        self.now = datetime.now(UTC)
        self.repo = TufRepository.create(tmp_path / "repo", now=self.now)
        self.requests: list[str] = []
        self.sources = tmp_path / "sources"
        self.sources.mkdir()
        handler = type("Handler", (_Handler,), {"requests": self.requests})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
            handler, directory=str(self.repo.public_dir)))
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def push(self, version: str, model: bytes) -> DesiredModel:
        """A model file and its manifest as targets; the desired entry naming them."""
        base = f"models/digits/{version}/rpi4"
        for name, data in (("model.onnx", model), ("manifest.json", b'{"v": "%s"}' % (
                version.encode()))):
            src = self.sources / f"{version}-{name}"
            src.write_bytes(data)
            self.repo.add_target(f"{base}/{name}", src, now=self.now)
        return DesiredModel(name="digits", version=version, profile="rpi4",
                            sha256=hashlib.sha256(model).hexdigest(), length=len(model),
                            target_path=f"{base}/model.onnx",
                            manifest_target=f"{base}/manifest.json")

    def provisioning(self) -> Provisioning:
        return Provisioning(
            device_id="pi-1", profile="rpi4", mqtt_url="mqtt://127.0.0.1:1883",
            mqtt_username="pi-1", mqtt_password="unused", http_url=self.base,
            http_token=TOKEN, tuf_metadata_url=f"{self.base}/metadata/",
            tuf_targets_url=f"{self.base}/targets/", tuf_root=self.repo.root_bytes(1),
            director_keys_pem=())

    def take(self) -> list[str]:
        out = list(self.requests)
        self.requests.clear()
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    r = Repo(tmp_path)
    yield r
    r.close()


def _kinds(requests: list[str]) -> list[str]:
    """``/metadata/3.snapshot.json`` -> ``snapshot``; ``/targets/...`` -> the file name."""
    out = []
    for path in requests:
        name = path.rsplit("/", 1)[1]
        if path.startswith("/metadata/"):
            out.append(name.removesuffix(".json").split(".")[-1])
        else:
            out.append(name.split(".", 1)[1])  # drop the hash prefix
    return out


def test_an_update_refreshes_metadata_once_then_downloads_both_targets(
        repo: Repo, tmp_path: Path) -> None:
    fetcher = TargetsFetcher(ArtifactFetcher(repo.provisioning(), tmp_path / "dev",
                                             max_bytes=1 << 20))
    model = b"onnx-bytes-1" * 100
    got = fetcher.fetch(repo.push("1.0.0", model))
    assert got.model_file.read_bytes() == model
    assert got.manifest_file.read_bytes() == b'{"v": "1.0.0"}'
    # one refresh: the next root (not there), timestamp, snapshot, targets; then the targets
    assert _kinds(repo.take()) == ["root", "timestamp", "snapshot", "targets",
                                   "model.onnx", "manifest.json"]
    fetcher.discard(got)

    got = fetcher.fetch(repo.push("1.1.0", b"onnx-bytes-2" * 100))  # the next update
    assert got.model_file.read_bytes() == b"onnx-bytes-2" * 100
    assert _kinds(repo.take()) == ["root", "timestamp", "snapshot", "targets",
                                   "model.onnx", "manifest.json"]


def test_nothing_new_means_no_snapshot_or_targets_download(repo: Repo, tmp_path: Path) -> None:
    fetcher = ArtifactFetcher(repo.provisioning(), tmp_path / "dev", max_bytes=1 << 20)
    desired = repo.push("1.0.0", b"m" * 64)
    fetcher.fetch_all([TargetRequest(desired.manifest_target)])
    repo.take()
    # unchanged repository, file already downloaded: only the freshness checks go out
    (path,) = fetcher.fetch_all([TargetRequest(desired.manifest_target)])
    assert path.read_bytes() == b'{"v": "1.0.0"}'
    assert _kinds(repo.take()) == ["root", "timestamp"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("sha256", "0" * 64, "sha256"), ("length", 1, "length")], ids=["sha256", "length"])
def test_a_target_that_is_not_the_desired_file_is_refused_before_downloading(
        repo: Repo, tmp_path: Path, field: str, value: object, message: str) -> None:
    desired = repo.push("1.0.0", b"m" * 64)
    wrong = DesiredModel(**{**desired.to_dict(), field: value})
    fetcher = TargetsFetcher(ArtifactFetcher(repo.provisioning(), tmp_path / "dev",
                                             max_bytes=1 << 20))
    with pytest.raises(ArtifactError, match=message):
        fetcher.fetch(wrong)
    assert _kinds(repo.take()) == ["root", "timestamp", "snapshot", "targets"]


def test_a_refused_token_is_an_artifact_error_naming_the_target(repo: Repo,
                                                                tmp_path: Path) -> None:
    desired = repo.push("1.0.0", b"m" * 64)
    prov = repo.provisioning()
    bad = Provisioning(**{**prov.__dict__, "http_token": "ef_device_wrong"})
    with pytest.raises(ArtifactError, match=r"models/digits/1\.0\.0/rpi4/model\.onnx.*401"):
        TargetsFetcher(ArtifactFetcher(bad, tmp_path / "dev", max_bytes=1 << 20)).fetch(desired)


# -- AuthFetcher: keep-alive connections, and a kept connection the server closed -------------
class _KeepAlive(SimpleHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; ``drop_after`` > 0: close the connection silently after that
    many requests on it (no ``Connection: close``: the server's idle timeout, as the client
    sees it)."""

    protocol_version = "HTTP/1.1"
    connections: list[int]
    drop_after = 0

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)
        self.served = 0

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401)
            return
        if self.path == "/cut.bin":  # promises 1,000 bytes, sends 500, then the server dies
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"c" * 500)
            self.close_connection = True
            return
        super().do_GET()
        self.served += 1
        if self.drop_after and self.served >= self.drop_after:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[str, list[int], type[_KeepAlive]]]:
    (tmp_path / "a.json").write_bytes(b"a" * 1000)
    (tmp_path / "big.bin").write_bytes(b"b" * 100_000)
    handler: type[_KeepAlive] = type("Handler", (_KeepAlive,), {"connections": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.connections, handler
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_requests_share_one_kept_connection(files: tuple[str, list[int], type[_KeepAlive]]
                                            ) -> None:
    base, connections, _ = files
    fetcher = AuthFetcher(TOKEN)
    for _ in range(3):
        assert fetcher.download_bytes(f"{base}/a.json", 2000) == b"a" * 1000
    assert fetcher.download_bytes(f"{base}/big.bin", 200_000) == b"b" * 100_000
    assert len(connections) == 1
    fetcher.close()
    assert fetcher.download_bytes(f"{base}/a.json", 2000) == b"a" * 1000
    assert len(connections) == 2


def test_a_kept_connection_the_server_closed_is_replaced_once(
        files: tuple[str, list[int], type[_KeepAlive]]) -> None:
    base, connections, handler = files
    handler.drop_after = 1  # every connection serves one request, then closes silently
    fetcher = AuthFetcher(TOKEN)
    for _ in range(3):
        assert fetcher.download_bytes(f"{base}/a.json", 2000) == b"a" * 1000
    assert len(connections) == 3


def test_an_abandoned_download_does_not_leave_its_connection_for_the_next(
        files: tuple[str, list[int], type[_KeepAlive]]) -> None:
    base, connections, _ = files
    fetcher = AuthFetcher(TOKEN, chunk=1000)
    with pytest.raises(tuf_exc.DownloadLengthMismatchError):
        fetcher.download_bytes(f"{base}/big.bin", 5000)  # the base stops reading at 5,000
    assert fetcher.download_bytes(f"{base}/a.json", 2000) == b"a" * 1000
    assert len(connections) == 2  # the half-read one was closed, not reused


def test_a_body_cut_short_is_a_download_error_not_a_short_file(
        files: tuple[str, list[int], type[_KeepAlive]]) -> None:
    """http.client's read() answers b"" when the connection closes early: taken as the end,
    TUF would see a short file and fail its hash (fatal) instead of a retry (transient)."""
    base, connections, _ = files
    fetcher = AuthFetcher(TOKEN, chunk=100)
    with pytest.raises(tuf_exc.DownloadError, match="closed with 500 bytes of the body missing"
                       ) as caught:
        fetcher.download_bytes(f"{base}/cut.bin", 2000)
    assert not isinstance(caught.value, tuf_exc.DownloadLengthMismatchError)
    assert fetcher.download_bytes(f"{base}/a.json", 2000) == b"a" * 1000
    assert len(connections) == 2  # the cut connection was not kept


@pytest.mark.parametrize(("token", "path", "status"), [
    (TOKEN, "/missing.json", 404), ("ef_device_wrong", "/a.json", 401)],
    ids=["not-found", "unauthorized"])
def test_an_http_error_status_is_a_download_http_error_with_that_status(
        files: tuple[str, list[int], type[_KeepAlive]], token: str, path: str,
        status: int) -> None:
    base, _, _ = files
    with pytest.raises(tuf_exc.DownloadHTTPError) as caught:
        AuthFetcher(token).download_bytes(f"{base}{path}", 2000)
    assert caught.value.status_code == status
    assert path in str(caught.value)


def test_a_server_that_does_not_answer_is_a_slow_retrieval(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    try:
        fetcher = AuthFetcher(TOKEN, timeout_s=0.2)
        with pytest.raises(tuf_exc.SlowRetrievalError):
            fetcher.download_bytes(f"http://127.0.0.1:{listener.getsockname()[1]}/a", 10)
    finally:
        listener.close()


def test_a_url_that_is_not_http_is_refused_naming_it() -> None:
    with pytest.raises(tuf_exc.DownloadError, match=r"expected an http\(s\) URL, got "
                                                   r"'ftp://example\.org/a'"):
        AuthFetcher(TOKEN).download_bytes("ftp://example.org/a", 10)


def test_a_target_over_max_bytes_is_refused_before_downloading(repo: Repo,
                                                               tmp_path: Path) -> None:
    desired = repo.push("1.0.0", b"m" * 5000)
    fetcher = TargetsFetcher(ArtifactFetcher(repo.provisioning(), tmp_path / "dev",
                                             max_bytes=4096))
    with pytest.raises(ArtifactError, match=r"model\.onnx'?: length 5000 is over this agent's "
                                            r"max_download_bytes 4096"):
        fetcher.fetch(desired)
    assert _kinds(repo.take()) == ["root", "timestamp", "snapshot", "targets"]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files), for a TLS server on loopback."""
    import ipaddress
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_with_the_pinned_ca_reuses_its_connection_and_refuses_an_unknown_ca(
        files: tuple[str, list[int], type[_KeepAlive]], tmp_path: Path) -> None:
    import ssl

    _, _, handler = files
    cert_file, key_file = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        handler, directory=str(tmp_path)))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                              daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/a.json"
        before = len(handler.connections)
        fetcher = AuthFetcher(TOKEN, ca_file=str(cert_file))
        for _ in range(2):
            assert fetcher.download_bytes(url, 2000) == b"a" * 1000
        assert len(handler.connections) - before == 1
        with pytest.raises(tuf_exc.DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
            AuthFetcher(TOKEN).download_bytes(url, 2000)  # the system CAs do not know it
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
