"""Fixtures for fleet_server tests: a read-only static HTTP server on loopback."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class _QuietHandler(SimpleHTTPRequestHandler):
    """GET/HEAD only (the base class answers 501 to anything else), no access log."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], str]]:
    """Return ``serve(directory) -> base_url``; every server is shut down at teardown.

    Proxy variables are cleared so ngclient's urllib3 fetcher talks to loopback directly.
    """
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    started: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def _serve(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        thread.start()
        started.append((server, thread))
        host, port = server.server_address[:2]
        return f"http://{host!s}:{port}"

    yield _serve
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
