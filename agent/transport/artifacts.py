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

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from agent.errors import ArtifactError, TransportError
from agent.protocol.provisioning import Provisioning
from agent.updater.runner import TargetRequest

__all__ = ["ArtifactFetcher", "AuthFetcher"]


class AuthFetcher(FetcherInterface):
    """urllib3 fetcher that sends the device's bearer token; no proxies from the environment."""

    def __init__(self, token: str, *, timeout_s: float = 30.0, chunk: int = 256 << 10,
                 ca_file: str | None = None) -> None:
        self._chunk = chunk
        self._timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        kwargs: dict[str, Any] = {"ca_certs": ca_file} if ca_file else {}
        self._pool = urllib3.PoolManager(
            headers={"Authorization": f"Bearer {token}", "User-Agent": "edgefleet-agent"},
            retries=False, **kwargs)

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._pool.request("GET", url, preload_content=False,
                                          timeout=self._timeout)
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_exc.SlowRetrievalError from exc
        if response.status >= 400:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
        return self._chunks(response)

    def _chunks(self, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from response.stream(self._chunk)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise tuf_exc.SlowRetrievalError from exc
        finally:
            response.release_conn()


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
            ArtifactError: metadata or a target failed verification, an unknown target, or one
                that is not the file the desired state named (fatal).
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
        digest = info.hashes.get("sha256")
        if target.expect_sha256 is not None and digest != target.expect_sha256:
            raise ArtifactError(f"TUF target {target.path!r}: sha256 {digest}, the desired "
                                f"state says {target.expect_sha256}")
        local = self._dl_dir / target.path.replace("/", "__")
        cached = updater.find_cached_target(info, str(local))
        return Path(cached or updater.download_target(info, str(local)))
