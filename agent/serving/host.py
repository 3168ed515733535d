"""ModelHost: the models this agent serves, swapped atomically, run inline or in a pool.

One :class:`ModelHost` holds the active :class:`~agent.serving.runtime.LoadedModel` of each model
name, with its version and (optionally) its bundle manifest. The HTTP server asks it to run a
request; the updater calls :meth:`ModelHost.swap` when a new version passed its health check.

Swap semantics (what "serving never stops during a swap" means here):

- :meth:`~ModelHost.swap` replaces the name's slot under a lock, so every request that starts
  after it returns runs on the new model;
- a request holds a lease on the slot it started with and finishes on that model, whatever
  happens meanwhile;
- the replaced model is closed exactly once, when its last lease is released (at once, in the
  caller's thread, when it has none; else in the thread that releases the last one).

Where a request runs (decode, ``run``, encode): **inline** on the event loop's thread, or in the
host's pool of ``workers`` threads (default 2). The pool keeps the loop free for other clients
while a model computes, but each request then crosses threads twice (loop -> pool -> loop),
and each wake-up costs 30-50 us on a busy 2-core VM, more on a Pi: more than a small model's
whole run. So the host measures every successful request's service time (decode + run +
encode, in whichever thread ran it) and decides per model, adaptively:

- every :data:`WINDOW` successful requests it takes the median of their service times;
- a model whose median is at most ``inline_max_s`` (default :data:`INLINE_MAX_S`, 200 us)
  runs inline from then on; an inline model goes back to the pool when its median passes
  twice that (hysteresis, so a model near the line does not flip every window);
- a request whose body is over ``inline_max_bytes`` (default :data:`INLINE_MAX_BYTES`) always
  goes to the pool: a big batch or a long JSON body is slow whatever the model;
- so does a request the caller marks ``contended`` (the server does while other requests are
  in the pool or arrived in the same loop iteration): with several clients at once a second
  core can decode and run while the loop reads and answers the others, and the loop stays
  free for them. Inline pays off for one client at a time (digits MLP on a 2-core VM: 0.1 ms
  sooner per predict, ``bench/serving.py``); under 8 connections all-inline used ~10 % less
  CPU per request but served fewer requests/s than the pool (median 2.9k against 3.3k and
  3.8k for two identical pool servers, on a loaded VM), and this rule served as many as the
  pool;
- a new model (each :meth:`~ModelHost.swap`) starts in the pool until its first window;
- refused requests are not measured (a flood of malformed requests answers fast and must not
  make a slow model inline); ``inline_max_s=0`` turns inline running off.

So a model whose typical request takes longer than ``2 * inline_max_s`` holds the loop for at
most one window of requests, and a microsecond model answers without any thread hop. The median
ignores outliers: a single slow request of an inline model (a model whose cost depends on the
input) still runs inline; the body-size cap bounds the usual cause.

The pool is a ``queue.SimpleQueue`` feeding plain threads, and a finished request comes back
to the loop with one ``loop.call_soon_threadsafe`` call: the same thing ``loop.run_in_executor``
does, without its two futures and chained callbacks per request. ``swap``, ``remove``, ``get``,
``list`` and ``runs_inline`` are thread-safe and callable from any thread;
:meth:`~ModelHost.submit` and :meth:`~ModelHost.run` must be called on the event loop's thread.

Per-request observer: ``on_request(name, version, latency_ms, ok, error_kind, inputs,
outputs)`` is called once for every request that reached a model (not for an unknown model),
in the thread that ran it (the loop's, for an inline model), after the model ran and before
the response is sent. It must be cheap and thread-safe (append to a queue; aggregate
elsewhere). ``error_kind`` is ``None`` when ``ok``, else ``"input"`` (:class:`InputRejected`),
``"runtime"`` (:class:`RuntimeLoadError`) or ``"internal"`` (a bug); ``inputs`` is ``None`` when
the body could not be decoded, ``outputs`` when the model did not answer. An exception in the
observer is logged and never fails the request.

Errors: :class:`UnknownModel` (an :class:`InputRejected`: the caller asked for a model this
agent does not serve; HTTP 404), plus whatever the model's ``run`` raises
(:class:`InputRejected`, :class:`RuntimeLoadError`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import numpy as np

from agent.errors import InputRejected, RuntimeLoadError
from agent.protocol.manifest import Manifest, TensorSpec
from agent.serving.runtime import LoadedModel

__all__ = ["INLINE_MAX_BYTES", "INLINE_MAX_S", "WINDOW", "ModelHost", "ModelInfo",
           "RequestObserver", "UnknownModel"]

log = logging.getLogger(__name__)

#: default median service time (seconds) at or under which a model runs inline on the loop
INLINE_MAX_S: Final = 200e-6
#: default request body size (bytes) over which a request always runs in the pool
INLINE_MAX_BYTES: Final = 16 * 1024
#: successful requests per placement decision (inline or pool), per served model
WINDOW: Final = 16

T = TypeVar("T")
Feeds = Mapping[str, np.ndarray]
#: called on the loop thread with (result, None) or (None, error)
Done = Callable[[T | None, BaseException | None], None]


class UnknownModel(InputRejected):
    """The request names a model this agent does not serve (HTTP 404)."""


class RequestObserver(Protocol):
    """The per-request hook: metrics and drift are fed from here (see the module docstring)."""

    def __call__(self, name: str, version: str, latency_ms: float, ok: bool,
                 error_kind: str | None, inputs: Feeds | None,
                 outputs: Mapping[str, np.ndarray] | None) -> None: ...


@dataclass(frozen=True)
class ModelInfo:
    """What is served under a name: version, tensor specs (the runtime's) and the manifest."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    manifest: Manifest | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{name, version, inputs, outputs}`` as plain JSON data (``GET /v1/models``)."""
        return {"name": self.name, "version": self.version,
                "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}


@dataclass(frozen=True, slots=True)
class _Job(Generic[T]):
    slot: _Slot
    decode: Callable[[ModelInfo], Feeds]
    encode: Callable[[ModelInfo, dict[str, np.ndarray]], T]
    done: Done[T]
    loop: asyncio.AbstractEventLoop
    t0: float


class _Inbox:
    """Answers waiting for one event loop; guarded by the host's lock."""

    __slots__ = ("answers", "scheduled")

    def __init__(self) -> None:
        self.answers: list[tuple[Done[Any], Any, BaseException | None]] = []
        self.scheduled = False


class _Slot:
    """One loaded version, its lease count and its placement; guarded by the host's lock."""

    __slots__ = ("closed", "inflight", "info", "inline", "model", "retired", "samples")

    def __init__(self, info: ModelInfo, model: LoadedModel) -> None:
        self.info = info
        self.model = model
        self.inflight = 0
        self.retired = False
        self.closed = False
        self.inline = False  # run requests on the loop's thread (see the module docstring)
        self.samples: list[float] = []  # service times (s) of this window's successes


class ModelHost:
    """The served models by name; see the module docstring for swap and threading rules."""

    def __init__(self, *, workers: int = 2, on_request: RequestObserver | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 inline_max_s: float = INLINE_MAX_S,
                 inline_max_bytes: int = INLINE_MAX_BYTES) -> None:
        """Create an empty host with its inference thread pool.

        Args:
            workers: inference threads (requests running at once in the pool); >= 1.
            on_request: the per-request observer, or ``None``; may be set later.
            clock: monotonic seconds, for request latency and service times.
            inline_max_s: a model whose median service time is at most this runs inline on
                the event loop (see the module docstring); 0 never runs inline.
            inline_max_bytes: request bodies over this always run in the pool.

        Raises:
            ValueError: ``workers`` < 1, or a negative or non-finite inline limit.
        """
        if workers < 1:
            raise ValueError(f"workers: expected >= 1, got {workers}")
        if not 0 <= inline_max_s < float("inf") or inline_max_bytes < 0:
            raise ValueError(f"inline_max_s, inline_max_bytes: expected a finite time >= 0 and "
                             f"a size >= 0, got {inline_max_s!r}, {inline_max_bytes!r}")
        self.workers = workers
        self.on_request = on_request
        self.inline_max_s = inline_max_s
        self.inline_max_bytes = inline_max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}
        self._closed = False
        self._observer_failures = 0
        self._threads = [threading.Thread(target=self._worker, name=f"edgefleet-infer-{i}",
                                          daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    # -- what is served ---------------------------------------------------------------------

    def swap(self, name: str, version: str, loaded: LoadedModel, *,
             manifest: Manifest | None = None) -> ModelInfo | None:
        """Serve ``loaded`` as ``name`` from now on; retire the model it replaces.

        Requests already running finish on the old model, which is closed when the last of them
        is done (at once if none is running). Safe from any thread.

        Args:
            name: model name, as in ``/v1/models/{name}/predict``.
            version: the version ``loaded`` is, reported with every response.
            loaded: the model, already loaded (and health-checked) by the caller; the host owns
                it from now on and closes it when it is replaced or removed.
            manifest: its bundle manifest, if any.

        Returns:
            What was served under ``name`` before, or ``None``.

        Raises:
            ValueError: ``name`` or ``version`` empty.
        """
        if not name or not version:
            raise ValueError(f"swap: expected a name and a version, got {name!r}, {version!r}")
        info = ModelInfo(name, version, tuple(loaded.inputs), tuple(loaded.outputs), manifest)
        with self._lock:
            old = self._slots.get(name)
            self._slots[name] = _Slot(info, loaded)
            close_old = old is not None and self._retire(old)
        if old is not None and close_old:
            self._close(old)
        log.info("serving %s version %s%s", name, version,
                 f" (was {old.info.version})" if old is not None else "")
        return old.info if old is not None else None

    def remove(self, name: str) -> ModelInfo | None:
        """Stop serving ``name``; its model is closed once its running requests are done.

        Returns:
            What was served under ``name``, or ``None`` if nothing was.
        """
        with self._lock:
            old = self._slots.pop(name, None)
            close_old = old is not None and self._retire(old)
        if old is not None and close_old:
            self._close(old)
        return old.info if old is not None else None

    def get(self, name: str) -> ModelInfo | None:
        """What is served under ``name`` now, or ``None``."""
        with self._lock:
            slot = self._slots.get(name)
        return slot.info if slot is not None else None

    def list(self) -> tuple[ModelInfo, ...]:
        """Everything served now, by name."""
        with self._lock:
            slots = sorted(self._slots.items())
        return tuple(slot.info for _, slot in slots)

    def __len__(self) -> int:
        return len(self._slots)

    def runs_inline(self, name: str) -> bool:
        """Whether requests to ``name`` run inline on the event loop now (False if unserved)."""
        with self._lock:
            slot = self._slots.get(name)
            return slot is not None and slot.inline

    def close(self) -> None:
        """Stop serving everything, finish queued requests, close every model.

        Blocks until the inference threads are done; call it last (from a thread or at exit).
        Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots = list(self._slots.values())
            self._slots.clear()
            idle = [s for s in slots if self._retire(s)]
        for slot in idle:
            self._close(slot)
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    # -- running requests -------------------------------------------------------------------

    def submit(self, name: str, decode: Callable[[ModelInfo], Feeds],
               encode: Callable[[ModelInfo, dict[str, np.ndarray]], T], done: Done[T], *,
               size: int = 0, contended: bool = False) -> bool:
        """Run one request on ``name``'s current model; ``done`` gets the answer.

        ``feeds = decode(info)``, ``outputs = model.run(feeds)``, ``result = encode(info,
        outputs)``; then ``done(result, None)``, or ``done(None, exc)`` with what any step
        raised, is called on the event loop's thread: before this call returns when the model
        runs inline, else later, once a pool thread ran it (see the module docstring). The
        lease is taken here, so a swap after this call does not change the model this request
        runs on. Call it on the event loop's thread. If the loop is closed before a pooled
        answer, ``done`` is not called.

        Args:
            size: the request body's size in bytes; over ``inline_max_bytes`` it runs in the
                pool whatever the model's placement.
            contended: other clients are waiting on the loop: run in the pool whatever the
                model's placement.

        Returns:
            True when it ran inline (``done`` was already called), False when it was queued.

        Raises:
            UnknownModel: nothing is served under ``name`` (raised here; ``done`` is not
                called).
            RuntimeError: no running event loop in this thread, or the host is closed.
        """
        loop = asyncio.get_running_loop()
        t0 = self._clock()
        with self._lock:
            if self._closed:
                raise RuntimeError("ModelHost is closed")
            slot = self._slots.get(name)
            if slot is None:
                raise UnknownModel(f"model {name!r} is not served here; served: "
                                   f"{sorted(self._slots) or 'none'}")
            slot.inflight += 1
            inline = slot.inline and size <= self.inline_max_bytes and not contended
        if not inline:
            self._jobs.put(_Job(slot, decode, encode, done, loop, t0))
            return False
        result, exc = self._work(slot, decode, encode, t0)
        self._call(done, result, exc)
        return True

    async def run(self, name: str, decode: Callable[[ModelInfo], Feeds],
                  encode: Callable[[ModelInfo, dict[str, np.ndarray]], T], *,
                  size: int = 0) -> T:
        """:meth:`submit` as a coroutine: what ``encode`` returned, or what a step raised.

        Raises:
            UnknownModel: nothing is served under ``name``.
            InputRejected: ``decode`` or the model refused the request.
            RuntimeLoadError: the engine failed.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def settle(result: T | None, exc: BaseException | None) -> None:
            if future.cancelled():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)  # type: ignore[arg-type]  # None only with exc

        self.submit(name, decode, encode, settle, size=size)
        return await future

    async def predict(self, name: str, feeds: Feeds) -> tuple[ModelInfo, dict[str, np.ndarray]]:
        """Run ``feeds`` on ``name``'s current model (for in-process callers).

        Returns:
            The model info the request ran on, and its outputs.

        Raises:
            UnknownModel: nothing is served under ``name``.
            InputRejected: the feeds do not fit the model.
            RuntimeLoadError: the engine failed.
        """
        return await self.run(name, lambda _info: feeds, lambda info, out: (info, out),
                              size=sum(int(np.asarray(a).nbytes) for a in feeds.values()))

    def _worker(self) -> None:
        while (job := self._jobs.get()) is not None:
            result, exc = self._work(job.slot, job.decode, job.encode, job.t0)
            self._answer(job, result, exc)
            del job, result, exc

    def _answer(self, job: _Job[Any], result: Any, exc: BaseException | None) -> None:
        """Queue the answer for the job's loop; wake the loop only if no wake-up is pending.

        Under load, answers that finish while the loop is busy share one wake-up (one write
        to the loop's self-pipe) instead of one each.
        """
        with self._lock:
            inbox = self._inboxes.get(job.loop)
            if inbox is None:
                inbox = self._inboxes[job.loop] = _Inbox()
            inbox.answers.append((job.done, result, exc))
            wake = not inbox.scheduled
            inbox.scheduled = True
        if wake:
            try:
                job.loop.call_soon_threadsafe(self._deliver, job.loop)
            except RuntimeError:  # the loop was closed under a running request: nobody waits
                with self._lock:
                    self._inboxes.pop(job.loop, None)
                log.debug("answer for %s dropped: event loop closed", job.slot.info.name)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop: hand every queued answer to its ``done`` callback."""
        with self._lock:
            inbox = self._inboxes[loop]
            answers, inbox.answers = inbox.answers, []
            inbox.scheduled = False
        for done, result, exc in answers:
            self._call(done, result, exc)

    @staticmethod
    def _call(done: Done[Any], result: Any, exc: BaseException | None) -> None:
        try:
            done(result, exc)
        except Exception:  # one caller's bug must not strand the other answers (or the loop)
            log.exception("a predict's done callback failed")

    def _work(self, slot: _Slot, decode: Callable[[ModelInfo], Feeds],
              encode: Callable[[ModelInfo, dict[str, np.ndarray]], T], t0: float
              ) -> tuple[T | None, BaseException | None]:
        """Decode, run, encode; release the lease, measure, tell the observer."""
        feeds: Feeds | None = None
        outputs: dict[str, np.ndarray] | None = None
        kind: str | None = "internal"
        start = self._clock()
        try:
            feeds = decode(slot.info)
            outputs = slot.model.run(feeds)
            result = encode(slot.info, outputs)
            kind = None
            return result, None
        except InputRejected as exc:
            kind = "input"
            return None, exc
        except RuntimeLoadError as exc:
            kind = "runtime"
            return None, exc
        except Exception as exc:  # noqa: BLE001  # a bug in decode/encode/the adapter: it
            # must reach the waiting caller (who answers 500 and logs it), not die here
            return None, exc
        finally:
            end = self._clock()
            self._release(slot, end - start if kind is None else None)
            observer = self.on_request
            if observer is not None:
                self._observe(observer, slot.info, (end - t0) * 1e3, kind, feeds, outputs)

    def _observe(self, observer: RequestObserver, info: ModelInfo, latency_ms: float,
                 kind: str | None, feeds: Feeds | None,
                 outputs: Mapping[str, np.ndarray] | None) -> None:
        try:
            observer(info.name, info.version, latency_ms, kind is None, kind, feeds, outputs)
        except Exception:  # the hook is the daemon's code: it must never fail a request
            self._observer_failures += 1
            if self._observer_failures == 1 or self._observer_failures % 1000 == 0:
                log.exception("on_request observer failed (%d failures so far); the request "
                              "is answered anyway", self._observer_failures)

    # -- leases -----------------------------------------------------------------------------

    @staticmethod
    def _retire(slot: _Slot) -> bool:
        """Mark replaced; True when the caller must close it now. Call under the lock."""
        slot.retired = True
        if slot.inflight == 0 and not slot.closed:
            slot.closed = True
            return True
        return False

    def _release(self, slot: _Slot, service_s: float | None) -> None:
        """Drop one lease; count a success's service time toward the slot's placement."""
        with self._lock:
            slot.inflight -= 1
            if service_s is not None and self.inline_max_s > 0:
                samples = slot.samples
                samples.append(service_s)
                if len(samples) >= WINDOW:
                    median = sorted(samples)[WINDOW // 2]
                    samples.clear()
                    was = slot.inline
                    slot.inline = median <= self.inline_max_s * (2 if was else 1)
                    if slot.inline != was:
                        log.debug("%s %s now runs %s (median service time %.0f us)",
                                  slot.info.name, slot.info.version,
                                  "inline" if slot.inline else "in the pool", median * 1e6)
            close = slot.retired and slot.inflight == 0 and not slot.closed
            if close:
                slot.closed = True
        if close:
            self._close(slot)

    @staticmethod
    def _close(slot: _Slot) -> None:
        try:
            slot.model.close()
        except Exception:  # the seam's close must not take a request or a swap down with it
            log.exception("closing %s version %s failed", slot.info.name, slot.info.version)
        else:
            log.debug("closed %s version %s", slot.info.name, slot.info.version)
