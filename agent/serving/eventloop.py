"""Which event loop the agent's daemon runs on: uvloop when it is installed, else asyncio's.

The local inference API (:mod:`agent.serving.server`) spends most of a small model's request
in the event loop's own machinery: the readiness wait, the socket read and write, calling the
protocol. uvloop does that in C (libuv): on the digits MLP (``bench/serving.py``, 2-core VM)
the server spent less CPU per request and answered a single client sooner than on asyncio's
selector loop, which also allocates a fresh 256 KiB buffer per socket read. The server speaks
only the ``asyncio.Protocol`` interface, so it runs unchanged on either loop.

uvloop is optional: it has no wheel for 32-bit Raspberry Pi OS (armv7l) or Windows, so the
agent falls back to asyncio's loop when it is not importable, and ``EDGEFLEET_EVENT_LOOP=
asyncio`` forces the fallback (to rule the loop out when chasing a bug). Nothing in the agent
depends on which loop runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Final

__all__ = ["ENV_VAR", "LOOPS", "loop_factory"]

#: the environment variable that picks the loop: ``auto`` (default), ``uvloop``, ``asyncio``
ENV_VAR: Final = "EDGEFLEET_EVENT_LOOP"
#: the values :func:`loop_factory` accepts
LOOPS: Final = ("auto", "uvloop", "asyncio")


def loop_factory(kind: str | None = None, environ: Mapping[str, str] | None = None
                 ) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop to run the daemon on, and its name (``"uvloop"`` or ``"asyncio"``).

    Use it as ``asyncio.Runner(loop_factory=factory)``.

    Args:
        kind: ``auto`` (uvloop if importable, else asyncio), ``uvloop`` (required) or
            ``asyncio``; ``None`` reads :data:`ENV_VAR` from ``environ`` (default ``auto``).
        environ: the environment (default ``os.environ``).

    Raises:
        ValueError: ``kind`` (or the variable) is not one of :data:`LOOPS`.
        RuntimeError: ``uvloop`` was asked for and is not installed.
    """
    if kind is None:
        kind = (os.environ if environ is None else environ).get(ENV_VAR, "auto") or "auto"
    if kind not in LOOPS:
        raise ValueError(f"{ENV_VAR}: expected one of {', '.join(LOOPS)}, got {kind!r}")
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if kind == "uvloop":
                raise RuntimeError(f"{ENV_VAR}=uvloop, but uvloop is not installed") from exc
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop

