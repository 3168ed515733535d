"""Model downloads through TUF (adapter around ``tuf.ngclient``).

The root is pinned at provisioning: on first use ``<data_dir>/tuf/root.json`` is seeded from the
provisioning file, and from then on python-tuf updates it through the signed chain of roots.
That gives rollback, freeze, mix-and-match, endless-data and arbitrary-file protection from a
library the field already trusts. Targets download to ``<data_dir>/downloads`` (ngclient writes
to a temporary file and renames only a verified one, so a partial file is never installed; an
interrupted download simply restarts). The device token is sent on every request.

One update refreshes the metadata once (:meth:`ArtifactFetcher.fetch_all`: root, timestamp,
and snapshot and targets only when the timestamp names new versions), then downloads each of
its targets against that one verified view: the model file and its manifest are checked against
the same ``targets`` version, and a device asks the server for six files per update, not eight.

python-tuf exceptions are translated here: signature, hash, length and expiry problems become
:class:`ArtifactError` (fatal, reported); network problems become :class:`TransportError`
(transient, retried).
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from tuf.api import exceptions as tuf_exc
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from agent.errors import ArtifactError, TransportError
from agent.protocol.provisioning import Provisioning
from agent.updater.runner import TargetRequest

__all__ = ["ArtifactFetcher", "AuthFetcher"]


class AuthFetcher(FetcherInterface):
    """Keep-alive HTTP(S) GETs with the device's bearer token (``http.client``; no proxies from
    the environment, no redirects followed).

    ngclient only needs ``_fetch(url) -> chunks``; the base class bounds the length and spools
    to a temporary file. One update makes six requests to one server, so connections are kept
    open between requests (per scheme, host and port; a connection is reused only once its
    response was read to the end). A kept connection the server has closed meanwhile (an idle
    timeout) fails on its next request before any response arrives: that request is sent once
    more on a new connection (a GET has no side effects). ``http.client`` is what urllib3 runs
    on, without its pool and retry layers: about a third less client CPU per request on
    loopback (0.95 -> 0.6-0.67 ms with the base class's spooling; BENCHMARKS.md).

    Raises (from :meth:`fetch`): ``DownloadHTTPError`` for any status but 200,
    ``SlowRetrievalError`` for a timeout, ``DownloadError`` for the rest (the base wraps them).
    """

    def __init__(self, token: str, *, timeout_s: float = 30.0, chunk: int = 256 << 10,
                 ca_file: str | None = None) -> None:
        self._chunk = chunk
        self._timeout = timeout_s
        self._ca_file = ca_file
        self._tls: ssl.SSLContext | None = None
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": "edgefleet-agent"}
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "http":
            return http.client.HTTPConnection(netloc, timeout=self._timeout)
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=self._ca_file)
        return http.client.HTTPSConnection(netloc, timeout=self._timeout, context=self._tls)

    def _checkout(self, key: tuple[str, str]) -> tuple[http.client.HTTPConnection, bool]:
        """A kept connection to ``key`` (and True), or a new one (and False)."""
        with self._lock:
            kept = self._idle.get(key)
            if kept:
                return kept.pop(), True
        return self._connect(*key), False

    def _checkin(self, key: tuple[str, str], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(conn)

    def close(self) -> None:
        """Close every kept connection (a later request opens a new one)."""
        with self._lock:
            kept = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for conn in kept:
            conn.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise tuf_exc.DownloadError(f"expected an http(s) URL, got {url!r}")
        key = (parts.scheme, parts.netloc)
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        while True:
            conn, reused = self._checkout(key)
            try:
                conn.request("GET", target, headers=self._headers)
                response = conn.getresponse()
                break
            except TimeoutError as exc:
                conn.close()
                raise tuf_exc.SlowRetrievalError(f"no answer from {url} in "
                                                 f"{self._timeout:g} s") from exc
            except (http.client.RemoteDisconnected, ConnectionError) as exc:
                conn.close()
                if not reused:  # a kept connection the server closed: once more on a new one
                    raise tuf_exc.DownloadError(f"GET {url}: {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise tuf_exc.DownloadError(f"GET {url}: {exc}") from exc
        if response.status != 200:
            conn.close()
            raise tuf_exc.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
        return self._chunks(key, conn, response, url)

    def _chunks(self, key: tuple[str, str], conn: http.client.HTTPConnection,
                response: http.client.HTTPResponse, url: str) -> Iterator[bytes]:
        done = False
        try:
            while chunk := response.read(self._chunk):
                yield chunk
            if response.length:  # read() answers b"" when the peer closes early: bytes owed
                raise tuf_exc.DownloadError(f"GET {url}: the connection closed with "
                                            f"{response.length} bytes of the body missing")
            done = True
        except TimeoutError as exc:
            raise tuf_exc.SlowRetrievalError(f"{url}: no data for {self._timeout:g} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise tuf_exc.DownloadError(f"GET {url}: {exc}") from exc
        finally:  # read to the end and not to be closed: keep it; else (abandoned too) close it
            if done and not response.will_close:
                self._checkin(key, conn)
            else:
                conn.close()


class ArtifactFetcher:
    """Refresh TUF metadata and download verified targets (the runner's ``TargetFetcher``)."""

    def __init__(self, prov: Provisioning, data_dir: Path, *, max_bytes: int,
                 fetcher: FetcherInterface | None = None) -> None:
        self._prov = prov
        self._meta_dir = data_dir / "tuf"
        self._dl_dir = data_dir / "downloads"
        self._max_bytes = max_bytes
        self._fetcher = fetcher or AuthFetcher(prov.http_token)

    def _seed(self) -> None:
        self._meta_dir.mkdir(parents=True, exist_ok=True)
        self._dl_dir.mkdir(parents=True, exist_ok=True)
        root = self._meta_dir / "root.json"
        if not root.exists():
            tmp = root.with_suffix(".tmp")
            tmp.write_bytes(self._prov.tuf_root)
            os.replace(tmp, root)

    def fetch_all(self, targets: Sequence[TargetRequest]) -> list[Path]:
        """Refresh metadata once, then download and verify each target; return the local files
        in order (a target already downloaded and still valid is not fetched again).

        Raises:
            ArtifactError: metadata or a target failed verification, an unknown target, one
                that is not the file the desired state named, or one longer than ``max_bytes``
                (fatal; checked against the signed length before downloading).
            TransportError: the server could not be reached or a download broke (retry).
        """
        self._seed()
        config = UpdaterConfig(targets_max_length=self._max_bytes,
                               prefix_targets_with_hash=True)
        current = targets[0].path if targets else ""
        try:
            updater = Updater(metadata_dir=str(self._meta_dir),
                              metadata_base_url=self._prov.tuf_metadata_url,
                              target_dir=str(self._dl_dir),
                              target_base_url=self._prov.tuf_targets_url,
                              fetcher=self._fetcher, config=config, bootstrap=None)
            updater.refresh()
            out = []
            for target in targets:
                current = target.path
                out.append(self._download(updater, target))
            return out
        except ArtifactError:
            raise
        except tuf_exc.DownloadHTTPError as exc:
            if exc.status_code in (401, 403, 404):
                raise ArtifactError(f"server refused {current!r}: HTTP "
                                    f"{exc.status_code}") from exc
            raise TransportError(f"download of {current!r} failed: {exc}") from exc
        except (tuf_exc.SlowRetrievalError, tuf_exc.DownloadError, OSError) as exc:
            if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
                raise ArtifactError(f"{current!r}: {exc}") from exc
            raise TransportError(f"download of {current!r} failed: {exc}") from exc
        except tuf_exc.RepositoryError as exc:
            raise ArtifactError(f"TUF refused {current!r}: {type(exc).__name__}: "
                                f"{exc}") from exc

    def _download(self, updater: Updater, target: TargetRequest) -> Path:
        info = updater.get_targetinfo(target.path)
        if info is None:
            raise ArtifactError(f"TUF target {target.path!r} is not in the signed targets")
        if target.expect_length is not None and info.length != target.expect_length:
            raise ArtifactError(f"TUF target {target.path!r}: length {info.length}, the "
                                f"desired state says {target.expect_length}")
        if info.length > self._max_bytes:
            raise ArtifactError(f"TUF target {target.path!r}: length {info.length} is over this "
                                f"agent's max_download_bytes {self._max_bytes}")
        digest = info.hashes.get("sha256")
        if target.expect_sha256 is not None and digest != target.expect_sha256:
            raise ArtifactError(f"TUF target {target.path!r}: sha256 {digest}, the desired "
                                f"state says {target.expect_sha256}")
        local = self._dl_dir / target.path.replace("/", "__")
        cached = updater.find_cached_target(info, str(local))
        return Path(cached or updater.download_target(info, str(local)))
