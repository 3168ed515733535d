"""The agent's downloads: ONE TUF metadata refresh per update, every check still made.

A real :class:`~fleet_server.tuf_repo.TufRepository` is served over real HTTP on loopback by a
server that counts every request and wants the device's bearer token; the agent side is the
real ``TargetsFetcher(ArtifactFetcher(...))`` the daemon wires, over the real ``AuthFetcher``.
ngclient judges expiry by the wall clock, so the repository is created at the real time.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ArtifactError
from agent.protocol.messages import DesiredModel
from agent.protocol.provisioning import Provisioning
from agent.transport.artifacts import ArtifactFetcher
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
