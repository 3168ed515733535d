"""Helpers the tests that run real servers share: a free loopback port, and polling a
condition that a real process makes true (never a bare sleep). Importable by name: pytest puts
``tests/`` (home of the root conftest) on ``sys.path``."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0,
             interval: float = 0.05) -> Any:
    """``check()``'s first truthy value, polled every ``interval`` s.

    Raises:
        AssertionError: nothing truthy within ``timeout`` s (names ``what``).
    """
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return value
