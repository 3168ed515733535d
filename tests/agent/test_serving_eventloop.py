"""The daemon's event loop: uvloop when installed, asyncio's own loop otherwise or on request."""

from __future__ import annotations

import asyncio
import sys

import pytest

from agent.serving.eventloop import ENV_VAR, loop_factory


def _loop_class(kind: str | None, environ: dict[str, str]) -> tuple[str, str]:
    name, factory = loop_factory(kind, environ)
    loop = factory()
    try:
        return name, type(loop).__module__.split(".")[0]
    finally:
        loop.close()


@pytest.mark.parametrize(("kind", "environ", "expected"), [
    (None, {}, ("uvloop", "uvloop")),
    ("auto", {}, ("uvloop", "uvloop")),
    ("uvloop", {}, ("uvloop", "uvloop")),
    ("asyncio", {}, ("asyncio", "asyncio")),
    (None, {ENV_VAR: "asyncio"}, ("asyncio", "asyncio")),
    (None, {ENV_VAR: ""}, ("uvloop", "uvloop")),
    ("asyncio", {ENV_VAR: "uvloop"}, ("asyncio", "asyncio")),  # the argument wins
], ids=["default", "auto", "uvloop", "asyncio", "env-asyncio", "env-empty", "arg-over-env"])
def test_the_loop_picked(kind: str | None, environ: dict[str, str],
                         expected: tuple[str, str]) -> None:
    assert _loop_class(kind, environ) == expected


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as on armv7l: the import fails
    assert _loop_class(None, {}) == ("asyncio", "asyncio")
    with pytest.raises(RuntimeError, match=f"{ENV_VAR}=uvloop, but uvloop is not installed"):
        loop_factory("uvloop", {})


def test_an_unknown_loop_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match=rf"{ENV_VAR}: expected one of auto, uvloop, "
                                         r"asyncio, got 'trio'"):
        loop_factory(None, {ENV_VAR: "trio"})


def test_the_uvloop_loop_runs_a_coroutine() -> None:
    async def answer() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    with asyncio.Runner(loop_factory=loop_factory("uvloop", {})[1]) as runner:
        assert runner.run(answer()).startswith("uvloop")
