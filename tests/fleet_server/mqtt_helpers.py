"""Shared by the broker and link tests (imported by name: pytest puts this folder on sys.path).

Not a test module: a credential store over a dict, and an event loop on a thread for the
embedded broker.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
WAIT = 5.0  # seconds: the bound on every wait (they normally end in milliseconds)


class DictStore:
    """A CredentialStore over a dict (username -> $7$ hash)."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self.hashes = dict(hashes)

    def lookup(self, username: str) -> str | None:
        return self.hashes.get(username)


class LoopThread:
    """An asyncio event loop on a background thread, where the embedded broker runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT * 2)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        self.loop.close()
