"""Device messages turned into insert-ready values, in the ingest thread or in parse processes.

:func:`check_message` is everything ingest does to a message that needs no database: size,
strict parse (:func:`agent.protocol.messages.parse_device_rows`), direction, and the values the
columns cannot hold. It returns a :data:`Checked` value, ready for
:func:`fleet_server.ingest.store_checked`: a :class:`Refused` message (why, and its reason
class), a device state change (:class:`ReportedState`, :class:`StatusChange`), or a
:class:`RecordBatch` holding its ``device_records`` rows as the insert takes them. Pure and
picklable, and this module imports only the standard library, :mod:`agent.protocol` and, when
installed, orjson, so a parse process starts light.

Telemetry is read with orjson when it is installed (the ``server`` extra): :data:`ORJSON`, the
:class:`agent.protocol.messages.JSONCodec` handed to ``parse_device_rows`` (whose docstring
gives the proof that keeps the rows those of the reference path). orjson writes every string,
key order and integer as ``canonical_json`` does, and every float too but those from 1e-5 to
1e-4 (``0.00001`` for ``1e-05``) and those with a one-digit negative exponent (``1e-7`` for
``1e-07``): a payload holding either form (which Python never writes) takes the standard-library
read. orjson reads integers past 64 bits as floats, and refuses lone surrogates and nesting past
254 levels on the way out: those payloads do not rebuild, and fall back the same way.

Why processes: parsing and checking a telemetry record (about 20 us of CPU with the standard
library's ``json``, about 6 with orjson, most of it decoding and re-encoding the body in C) is
half to two thirds of the ingest thread's work, and the GIL keeps every thread of the server on
one core. :class:`ParsePool` runs
:func:`check_message` in ``N`` spawned processes; the ingest thread then only runs SQL and
queues acks. Its guarantees:

- **Order.** A group of messages is cut into one contiguous chunk per worker and put back
  together in arrival order, and groups are collected in the order they were submitted: what
  is stored is in arrival order, per device and overall, as without the pool.
- **Nothing lost.** A worker that dies (killed, crashed) or does not answer within
  ``reply_timeout`` seconds is killed and replaced; every chunk it had not answered is
  re-parsed in the calling thread, logged and counted (:attr:`ParsePool.restarts`,
  :attr:`ParsePool.reparsed`). A message is never dropped for a worker's sake, and acks
  still follow the commit (the store step is the caller's).
- **Lazy, and never waited for.** Processes start on the first :meth:`ParsePool.submit` and
  take about a second to import; until a worker says it is ready, :meth:`submit` declines
  (returns None) and the caller parses in its own thread. A server that never falls behind,
  and the tests, pay for no process.
- **Shutdown.** :meth:`ParsePool.close` asks each worker to exit, waits a little, then kills;
  the caller collects what it submitted first.

Spawn, not fork: the server has threads (paho, asyncio, ingest) whose locks a forked child
would inherit held.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import re
import signal
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.protocol.messages import (
    MAX_MESSAGE_BYTES,
    Ack,
    JSONCodec,
    MessageError,
    RecordRows,
    Reported,
    Status,
    canonical_json,
    parse_device_rows,
)
from agent.protocol.topics import TopicError

__all__ = ["MAX_BIGINT", "MAX_KIND", "ORJSON", "Checked", "ParsePool", "RecordBatch", "Refused",
           "ReportedState", "StatusChange", "check_message", "default_workers", "storage_body"]

log = logging.getLogger(__name__)

#: what the record columns hold (BIGINT seq and at, ``kind`` a String(60)): a record beyond
#: them is refused before the transaction, since the driver's failure would fail its group
MAX_BIGINT = 2**63 - 1
MAX_KIND = 60

#: float forms orjson writes and Python's json never does (module docstring): ``0.0000``
#: starting a number, and a one-digit negative exponent
_ORJSON_ONLY = re.compile(rb"(?<![0-9.])0\.0000|e-[0-9](?![0-9])")


def _orjson_unsure(raw: bytes) -> bool:
    """Whether ``raw`` may hold a float that orjson writes otherwise than ``canonical_json``
    (two substring tests first: the regular expression is the slow part)."""
    return (b"0.0000" in raw or b"e-" in raw) and _ORJSON_ONLY.search(raw) is not None


#: floats whose text orjson must write as Python's json does (beyond what ``_orjson_unsure``
#: flags): orjson before 3.12 wrote ``1e16`` where Python writes ``1e+16``
_PROBE_FLOATS = (1e16, 1e22, 1.2345678901234568e17, 2.5e250, 5e-324, 1e-10, 0.1, -0.0, 100000.0,
                 1.7976931348623157e308, 0.0001, 123456.789)


def _orjson_codec() -> JSONCodec | None:
    """orjson as a codec, if it is installed and writes the probe floats as Python does (else
    None, logged: the standard library's read then runs alone)."""
    try:
        import orjson
    except ImportError:
        return None
    differs = [x for x in _PROBE_FLOATS if orjson.dumps(x) != canonical_json(x)]
    if differs:
        log.warning("orjson %s writes %s otherwise than Python's json: telemetry is read with "
                    "the standard library (install orjson >= 3.12)", orjson.__version__,
                    ", ".join(repr(x) for x in differs))
        return None
    return JSONCodec(name=f"orjson {orjson.__version__}", loads=orjson.loads,
                     dumps=functools.partial(orjson.dumps, option=orjson.OPT_SORT_KEYS),
                     errors=(orjson.JSONDecodeError, orjson.JSONEncodeError),
                     unsure=_orjson_unsure)


#: orjson as a codec for the one-pass read of telemetry; None: not installed (the standard
#: library's read then runs alone, slower, to the same rows)
ORJSON = _orjson_codec()


@dataclass(frozen=True)
class Refused:
    """A message dropped without storing anything: why, and its reason class."""

    topic: str
    size: int
    reason: str
    kind: str  # oversized | malformed | forged | unknown_device


@dataclass(frozen=True)
class ReportedState:
    """A device's ``reported`` message, as the ``devices.reported`` column stores it."""

    topic: str
    size: int
    device_id: str
    text: str  # canonical JSON


@dataclass(frozen=True)
class StatusChange:
    """A device's ``status`` message: online or not."""

    topic: str
    size: int
    device_id: str
    online: bool


@dataclass(frozen=True)
class RecordBatch:
    """A telemetry or drift batch as ``device_records`` rows: ``(device_id, stream, seq, kind,
    at, body, received_at)`` each, seqs strictly increasing; ``floor`` and ``from_seq`` are the
    batch's hints (None: absent or not an integer)."""

    topic: str
    size: int
    device_id: str
    stream: str
    rows: list[tuple[str, str, int, str, int, str, int]]
    floor: int | None
    from_seq: int | None


Checked = Refused | ReportedState | StatusChange | RecordBatch


def storage_body(text: str) -> str:
    """The ``device_records.body`` text of a body given as canonical JSON: the same, with
    non-ASCII escaped (``ensure_ascii``), as monitoring's substring filters expect. Canonical
    text that is ASCII without DEL (the escaping differs only there) is already that."""
    if text.isascii() and "\x7f" not in text:
        return text
    import json

    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def _hint(value: object) -> int | None:
    return value if type(value) is int else None


def check_message(topic: str, payload: bytes, now: int, *,
                  codec: JSONCodec | None = ORJSON) -> Checked:
    """Every check that needs no database, for one message that arrived at ``now`` (unix s);
    ``codec``: the JSON library for the one-pass read of telemetry (None: the standard
    library's; the rows are the same).

    Never raises on device input: what it refuses comes back as :class:`Refused`. A
    ``reported`` state is stored re-encoded, and canonical JSON can be longer than what the
    device sent (``1E5`` is ``100000.0``): one that grows past the size limit is refused too.
    """
    size = len(payload)
    if size > MAX_MESSAGE_BYTES:
        return Refused(topic, size, f"payload of {size} bytes, over {MAX_MESSAGE_BYTES}",
                       "oversized")
    try:
        msg = parse_device_rows(topic, payload, codec=codec)
        if isinstance(msg, Reported):
            return ReportedState(topic, size, msg.device_id, msg.to_bytes().decode("utf-8"))
    except (TopicError, MessageError) as exc:
        return Refused(topic, size, str(exc), "malformed")
    if isinstance(msg, Ack):
        return Refused(topic, size, "acks flow server -> device only", "forged")
    if isinstance(msg, Status):
        return StatusChange(topic, size, msg.device_id, msg.online)
    return _record_batch(topic, size, msg, now)


def _record_batch(topic: str, size: int, msg: RecordRows, now: int) -> RecordBatch | Refused:
    device_id, stream = msg.device_id, msg.stream
    rows = []
    for i, (seq, kind, at, body) in enumerate(msg.rows):
        if seq > MAX_BIGINT or at > MAX_BIGINT:
            return Refused(topic, size, f"records[{i}]: expected seq and at <= {MAX_BIGINT}, "
                           f"got seq {seq}, at {at}", "malformed")
        if len(kind) > MAX_KIND or "\x00" in kind:  # PostgreSQL text holds no NUL
            return Refused(topic, size, f"records[{i}].kind: expected at most {MAX_KIND} "
                           f"characters and no NUL, got {len(kind)} characters", "malformed")
        rows.append((device_id, stream, seq, kind, at, storage_body(body), now))
    return RecordBatch(topic, size, device_id, stream, rows, _hint(msg.unrecognized.get("floor")),
                       _hint(msg.unrecognized.get("from_seq")))


def check_messages(messages: Sequence[tuple[str, bytes]], now: int) -> list[Checked]:
    """:func:`check_message` for each, in order. Total: a message whose check raises (a bug,
    since device input is refused, not raised) is refused alone and logged with its
    traceback, so one message can neither stall ingest nor crash a parse process."""
    out: list[Checked] = []
    for topic, payload in messages:
        try:
            out.append(check_message(topic, payload, now))
        except Exception as exc:
            log.exception("checking a device message on %r failed: refused", topic)
            out.append(Refused(topic, len(payload), f"internal error while checking it: "
                               f"{type(exc).__name__}: {exc}", "malformed"))
    return out


def default_workers() -> int:
    """Parse processes by default: one core stays for the ingest thread, the link and the
    broker; at most 2 (measured on 2 cores: see BENCHMARKS.md)."""
    return max(0, min(2, (os.cpu_count() or 1) - 1))


# ---------------------------------------------------------------------------------------------
# the pool
# ---------------------------------------------------------------------------------------------
_READY = "ready"


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """A parse process: ``(ticket, now, messages)`` in, ``(ticket, checked)`` out, in order,
    until ``None`` or the end of the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the server's to handle
    conn.send(_READY)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if request is None:
            return
        ticket, now, messages = request
        conn.send((ticket, check_messages(messages, now)))


class _Worker:
    """One parse process, the tickets it has not answered (oldest first), and the thread that
    sends it work.

    Why a sender thread: a chunk is megabytes, more than a pipe holds. Sent from the ingest
    thread, it would block until the worker reads it, while the worker blocks sending an
    answer that only that same ingest thread reads: a deadlock. A hung worker would also
    hold the ingest thread in ``send``, past any reply timeout.
    """

    def __init__(self, ctx: Any, index: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True,
                                   name=f"edgefleet-parse-{index}")
        self.process.start()
        child.close()
        self.ready = False
        self.failed = False  # died before it was ready: not restarted (see poll_ready)
        self.outstanding: deque[int] = deque()
        self._outbox: queue.SimpleQueue[tuple[int, int, list[tuple[str, bytes]]] | None] = (
            queue.SimpleQueue())
        self._sender = threading.Thread(target=self._send_all, daemon=True,
                                        name=f"edgefleet-parse-send-{index}")
        self._sender.start()

    def send(self, ticket: int, now: int, chunk: list[tuple[str, bytes]]) -> None:
        """Queue a chunk for the worker (never blocks)."""
        self._outbox.put((ticket, now, chunk))

    def _send_all(self) -> None:
        while True:
            request = self._outbox.get()
            try:
                self.conn.send(request)
            except (OSError, ValueError):  # dead or closed: collect() finds out
                return
            if request is None:
                return

    def poll_ready(self) -> bool:
        """Whether the worker has said it is ready (never blocks). A worker that dies before
        that is marked failed, logged, and left alone: restarting a process that cannot
        start (a broken install) would spawn one per message."""
        if not self.ready and not self.failed:
            try:
                if self.conn.poll(0):
                    self.ready = self.conn.recv() == _READY
            except (EOFError, OSError):
                self.failed = True
                self.process.join(1)
                log.error("ingest parse process %s died while starting (exit code %s): "
                          "parsing in the ingest thread instead", self.process.name,
                          self.process.exitcode)
        return self.ready

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self._outbox.put(None)  # ends the sender, whose send now fails if it is in one
        self._sender.join()
        self.conn.close()

    def stop(self, timeout: float) -> None:
        self._outbox.put(None)  # after what is queued: the worker's request to exit
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._sender.join()
        self.conn.close()


@dataclass
class Submitted:
    """A group handed to the pool: which worker parses which slice, one ticket per chunk."""

    chunks: list[tuple[int, int]]  # (worker index, ticket), in arrival order


class ParsePool:
    """``workers`` spawned parse processes running :func:`check_message` (module docstring).

    Used from ONE thread (the ingest thread); :meth:`close` once that thread is done.

    Args:
        workers: processes, >= 1.
        reply_timeout: seconds a worker may take to answer before it is killed and its
            chunks re-parsed in the calling thread.

    Raises:
        ValueError: ``workers`` < 1 or ``reply_timeout`` <= 0.
    """

    def __init__(self, workers: int, *, reply_timeout: float = 30.0) -> None:
        if workers < 1:
            raise ValueError(f"ParsePool: expected workers >= 1, got {workers}")
        if reply_timeout <= 0:
            raise ValueError(f"ParsePool: expected reply_timeout > 0, got {reply_timeout}")
        self.size = workers
        self.reply_timeout = reply_timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._tickets = 0
        self._sent: dict[int, tuple[list[tuple[str, bytes]], int]] = {}  # unanswered chunks
        self._answers: dict[int, list[Checked]] = {}  # answered before their group is collected
        self._started = False
        self._closed = False
        #: workers replaced after dying or hanging, and messages re-parsed in-thread for them
        self.restarts = 0
        self.reparsed = 0

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids, in worker order (for tests and logs)."""
        return [w.process.pid for w in self._workers]

    @property
    def unanswered(self) -> int:
        """Chunks handed to the workers and not answered yet."""
        return len(self._sent)

    def ready(self) -> int:
        """How many workers are ready (never blocks; the first call starts them)."""
        if self._closed:
            raise RuntimeError("ParsePool: closed")
        if not self._started:
            self._started = True
            for i in range(self.size):
                try:
                    self._workers.append(_Worker(self._ctx, i))
                except OSError as exc:  # memory, process limits: parse in-thread instead
                    log.error("ingest parse process %d cannot start (%s): parsing in the "
                              "ingest thread instead", i, exc)
                    break
            log.info("started %d ingest parse process(es)", len(self._workers))
        return sum(1 for w in self._workers if w.poll_ready())

    def submit(self, messages: list[tuple[str, bytes]], now: int) -> Submitted | None:
        """Hand a group (arrived at ``now``) to the ready workers, one contiguous chunk each;
        None: no worker is ready yet (the first call starts them): parse it in the calling
        thread instead.

        Raises:
            RuntimeError: the pool is closed.
        """
        if not messages or self.ready() == 0:
            return None
        ready = [i for i, w in enumerate(self._workers) if w.ready]
        chunks = []
        per, extra = divmod(len(messages), len(ready))
        start = 0
        for n, index in enumerate(ready):
            end = start + per + (1 if n < extra else 0)
            if end == start:
                break
            self._tickets += 1
            chunk = messages[start:end]
            worker = self._workers[index]
            worker.send(self._tickets, now, chunk)  # if it died, collect() re-parses it here
            self._sent[self._tickets] = (chunk, now)
            worker.outstanding.append(self._tickets)
            chunks.append((index, self._tickets))
            start = end
        return Submitted(chunks)

    def collect(self, submitted: Submitted) -> list[Checked]:
        """The checked messages of a submitted group, in arrival order: waits for the workers,
        and re-parses in this thread what a dead or hung worker did not answer. Collect
        groups in the order they were submitted."""
        out: list[Checked] = []
        for index, ticket in submitted.chunks:
            answer = self._answers.pop(ticket, None)
            out.extend(answer if answer is not None else self._wait(index, ticket))
        return out

    def _wait(self, index: int, ticket: int) -> list[Checked]:
        worker = self._workers[index]
        if ticket not in worker.outstanding:  # never silently wait on a process that lacks it
            raise RuntimeError(f"parse worker {index}: chunk {ticket} is neither answered nor "
                               f"outstanding")
        hung = False
        while True:
            ready = multiprocessing.connection.wait([worker.conn, worker.process.sentinel],
                                                    self.reply_timeout)
            if worker.conn not in ready:
                hung = not ready  # nothing ready: silent past the timeout; else it died
                break
            try:
                got, answer = worker.conn.recv()  # (int, list[Checked]): our own worker's
            except (EOFError, OSError):
                break  # died before or while answering
            if got != worker.outstanding[0]:
                raise RuntimeError(f"parse worker {index}: expected the answer to chunk "
                                   f"{worker.outstanding[0]}, got {got}")
            worker.outstanding.popleft()
            del self._sent[got]
            checked: list[Checked] = answer
            if got == ticket:
                return checked
            self._answers[got] = checked  # an earlier group's would have been collected first
        return self._replace(index, ticket, hung=hung)

    def _replace(self, index: int, ticket: int, *, hung: bool) -> list[Checked]:
        """Kill and replace worker ``index`` (``hung``: it was alive but silent past the
        timeout; else it died); re-parse here every chunk it had not answered: ``ticket``'s
        is returned, later groups' wait in ``_answers``."""
        worker = self._workers[index]
        worker.kill()
        lost = list(worker.outstanding)
        worker.outstanding.clear()
        log.warning("ingest parse process %s (pid %s) %s with %d chunk(s) unanswered: "
                    "re-parsing them in the ingest thread; starting a new one",
                    worker.process.name, worker.process.pid,
                    f"did not answer within {self.reply_timeout:g} s" if hung
                    else f"died (exit code {worker.process.exitcode})", len(lost))
        self.restarts += 1
        try:
            self._workers[index] = _Worker(self._ctx, index)
        except OSError as exc:  # the dead one stays, never used again
            worker.ready, worker.failed = False, True
            log.error("ingest parse process %d cannot start again (%s): one fewer", index, exc)
        answer: list[Checked] = []
        for lost_ticket in lost:
            messages, now = self._sent.pop(lost_ticket)
            checked = check_messages(messages, now)
            self.reparsed += len(messages)
            if lost_ticket == ticket:
                answer = checked
            else:
                self._answers[lost_ticket] = checked
        return answer

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers (asked, then killed after ``timeout`` s). Idempotent."""
        self._closed = True
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop(timeout)
