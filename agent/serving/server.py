"""The local inference API: a small HTTP/1.1 server on asyncio, standard library only.

No framework: the agent installs without FastAPI or uvicorn, and a predict round trip over
loopback must cost little more than the model itself. One :class:`asyncio.BufferedProtocol` per
connection parses requests (keep-alive, pipelining, ``Expect: 100-continue``) and hands
predicts to :class:`~agent.serving.host.ModelHost`, which decodes, runs and encodes them
inline on the loop when the model is measured to take microseconds, else in its thread pool,
so the loop never blocks on a slow model or a big body (the rule is in its module docstring).

Routes::

    GET  /healthz                      200 {"status": "ok", "models": N}
    GET  /v1/models                    200 [{"name", "version", "inputs", "outputs"}, ...]
    GET  /metrics                      200 Prometheus text exposition (only when the server
                                       was given a ``metrics`` renderer: the daemon's is
                                       agent.serving.prom); rendered in a worker thread
    POST /v1/models/{name}/predict     200 outputs; body forms in agent.serving.wire:
         Content-Type: application/json               {"inputs": {name: nested lists}}
         Content-Type: application/x-edgefleet-tensors (binary framing)
         Accept: application/x-edgefleet-tensors      answers in the binary framing

Errors are JSON ``{"error": kind, "detail": message}``::

    400 bad_request        malformed HTTP, JSON or framing; an input that does not fit the
                           model (the detail names the input, expected against actual)
    404 unknown_model      no model served under that name;  404 not_found: no such route
    405 method_not_allowed (with Allow)
    411 length_required    a POST without Content-Length (chunked bodies are not accepted)
    413 payload_too_large  Content-Length over max_body_bytes, refused before the body is read
    415 unsupported_media_type
    431 headers_too_large
    500 runtime_error      the engine failed (RuntimeLoadError), with its message
    500 internal           a bug; logged with its traceback
    503 unavailable        the host was closed (the daemon is stopping)
    505 http_version_not_supported

Keep-alive is the default on HTTP/1.1 (``Connection: close`` ends it); idle connections are
closed after ``idle_timeout_s``. Errors in the HTTP framing itself (request line, headers,
lengths) and 413 close the connection after the answer; errors about a well-framed request
keep it open.

The server speaks plain HTTP and has no authentication: it is meant for loopback, and says so
loudly in the log when bound to any other address.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from agent.errors import ConfigError, InputRejected, RuntimeLoadError
from agent.serving import wire
from agent.serving.host import ModelHost, ModelInfo, UnknownModel

__all__ = ["InferenceServer", "MetricsRenderer"]

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # request line + headers
_RECV_BYTES = 64 * 1024  # the most one socket read takes
# A keep-alive client sends the same request head every time (same path, headers and length):
# the server keeps the parse of up to _HEAD_MEMO_ENTRIES heads of at most _HEAD_MEMO_BYTES,
# keyed by their exact bytes (a dict lookup instead of about 3 us of parsing per request)
_HEAD_MEMO_ENTRIES = 64
_HEAD_MEMO_BYTES = 1024
_PREDICT_PREFIX = "/v1/models/"
_PREDICT_SUFFIX = "/predict"
_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large",
            415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}
_STATUS = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in _REASONS.items()}
_JSON = b"application/json"
_TENSORS = wire.TENSORS_CONTENT_TYPE.encode()

Encoded = tuple[bytes, bytes]  # (content type, body)
#: renders the metrics for ``GET /metrics``: the request's Accept header -> (type, body)
MetricsRenderer = Callable[[str], Encoded]


class _Date:
    """The Date header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True).encode()
        return self._value


class _Request:
    """A parsed request head; shared by every request with the same head bytes (never
    changed after :func:`_parse_head` builds it)."""

    __slots__ = ("headers", "keep_alive", "length", "method", "path")

    def __init__(self, method: str, path: str, headers: dict[str, str], length: int,
                 keep_alive: bool) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive


class _HttpError(Exception):
    """A response to send instead of handling the request; ``close`` drops the connection."""

    def __init__(self, status: int, kind: str, detail: str, *, close: bool = False,
                 allow: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.close, self.allow = (status, kind, detail,
                                                                       close, allow)


def _error_body(kind: str, detail: str) -> bytes:
    return json.dumps({"error": kind, "detail": detail}).encode()


def _parse_head(raw: bytes) -> _Request:
    """Request line and headers (without the blank line) -> :class:`_Request`."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _HttpError(400, "bad_request", f"malformed request line {lines[0][:80]!r}",
                         close=True)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise _HttpError(505, "http_version_not_supported",
                             f"expected HTTP/1.1 or HTTP/1.0, got {version[:20]}", close=True)
        raise _HttpError(400, "bad_request", f"malformed request line {lines[0][:80]!r}",
                         close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise _HttpError(400, "bad_request", f"malformed header line {line[:80]!r}",
                             close=True)
        key = name.lower()
        value = value.strip()
        if key in headers:
            if key == "content-length" and headers[key] != value:
                raise _HttpError(400, "bad_request", "conflicting Content-Length headers",
                                 close=True)
            headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value
    if "transfer-encoding" in headers:
        raise _HttpError(411, "length_required", "chunked or encoded request bodies are not "
                         "accepted; send Content-Length", close=True)
    length = 0
    raw_length = headers.get("content-length")
    if raw_length is not None:
        raw_length = raw_length.split(",")[0].strip()
        if not raw_length.isdigit() or len(raw_length) > 18:
            raise _HttpError(400, "bad_request", f"malformed Content-Length {raw_length!r}",
                             close=True)
        length = int(raw_length)
    connection = headers.get("connection", "").lower()
    keep_alive = ("close" not in connection if version == "HTTP/1.1"
                  else "keep-alive" in connection)
    path = target.split("?", 1)[0]
    return _Request(method, path, headers, length, keep_alive)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: parse, dispatch, answer in order.

    A buffered protocol: the transport reads into the server's receive buffer
    (:meth:`get_buffer`) and the bytes are appended to this connection's own buffer at once
    (:meth:`buffer_updated`). asyncio's selector loop would otherwise allocate a fresh 256 KiB
    ``bytes`` for every read (an mmap and munmap per request); both loops call the two methods
    back to back on the loop's thread, so one receive buffer serves every connection.
    """

    def __init__(self, server: InferenceServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._request: _Request | None = None  # head parsed, body still arriving
        self._pending: _Request | None = None  # a predict in the host's pool
        self._write_paused = False
        self._read_paused = False
        self._eof = False  # the client sends nothing more: answer what is complete, close
        self._discard = -1  # >= 0: refused a body; drop this many more bytes, then close
        self.last_active = self._loop.time()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (create_server); uvloop's does not subclass asyncio.Transport
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self)
        self._server._arm_sweep(self._loop)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._server._recv_view

    def buffer_updated(self, nbytes: int) -> None:
        self._received(self._server._recv_view[:nbytes])

    def _received(self, data: memoryview) -> None:
        self.last_active = self._loop.time()
        if self._discard >= 0:
            self._discard -= len(data)
            if self._discard <= 0:
                self.close()
            return
        self._buf += data
        if self._pending is None:
            self._process()
        elif len(self._buf) > self._server._max_buffer and not self._read_paused:
            assert self._transport is not None
            self._transport.pause_reading()
            self._read_paused = True

    def eof_received(self) -> bool:
        self._eof = True
        # idle: every complete request was answered already, so close; busy: keep the
        # transport open to answer, and close from _process once the buffer holds no request
        return self._pending is not None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._pending is None:
            self._process()

    # -- parsing ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._pending is not None

    @property
    def closed(self) -> bool:
        """Closed by this side (or lost): nothing more is read or answered."""
        return self._transport is None

    def close(self) -> None:
        """Close after the buffered output is written; nothing more is read or answered."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _process(self) -> None:
        """Handle every complete request in the buffer, in order, until one goes async."""
        while (self._pending is None and not self._write_paused and self._transport is not None
               and self._discard < 0):
            if self._request is None:
                end = self._buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
                if end < 0:
                    if len(self._buf) >= MAX_HEAD_BYTES + 4:
                        self._fail(_HttpError(431, "headers_too_large", "request line and "
                                              f"headers over {MAX_HEAD_BYTES} bytes",
                                              close=True))
                    elif self._eof:
                        self.close()
                    return
                raw = bytes(self._buf[:end])
                heads = self._server._heads
                request = heads.get(raw)
                if request is None:
                    try:
                        request = _parse_head(raw)
                    except _HttpError as err:
                        self._fail(err)
                        return
                    if end <= _HEAD_MEMO_BYTES:
                        if len(heads) >= _HEAD_MEMO_ENTRIES:
                            heads.clear()
                        heads[raw] = request
                del self._buf[:end + 4]
                if request.length > self._server.max_body_bytes:
                    self._refuse_body(request)
                    return
                if (request.length > len(self._buf)
                        and request.headers.get("expect", "").lower() == "100-continue"):
                    self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._request = request
            request = self._request
            if len(self._buf) < request.length:
                if self._eof:
                    self.close()
                return
            if request.length == len(self._buf):
                body = bytes(self._buf)
                self._buf.clear()
            else:
                body = bytes(self._buf[:request.length])
                del self._buf[:request.length]
            self._request = None
            self._dispatch(request, body)

    def _refuse_body(self, request: _Request) -> None:
        """413 from the header alone; drop what of the body arrives, then close."""
        limit = self._server.max_body_bytes
        self._send_error(request, _HttpError(
            413, "payload_too_large", f"request body of {request.length} bytes is over the "
            f"limit of {limit} bytes (max_body_bytes)", close=True), linger=True)
        transport = self._transport
        self._discard = max(0, request.length - len(self._buf))
        self._buf.clear()
        if transport is None or self._discard == 0 or self._eof:
            self.close()
            return
        # half-close so the client reads the 413 now, and drain what it still sends: closing
        # with unread data would reset the connection and lose the answer. Give up after
        # linger_s.
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(self._server.linger_s, self.close)

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, request: _Request, body: bytes) -> None:
        path, method = request.path, request.method
        try:
            if path == "/metrics" and self._server.metrics is not None:
                if method not in ("GET", "HEAD"):
                    raise _HttpError(405, "method_not_allowed",
                                     f"{path} accepts GET, got {method}", allow="GET, HEAD")
                self._scrape(request, self._server.metrics)
                return
            if path == "/healthz" or path == "/v1/models":
                if method not in ("GET", "HEAD"):
                    raise _HttpError(405, "method_not_allowed",
                                     f"{path} accepts GET, got {method}", allow="GET, HEAD")
                if path == "/healthz":
                    data: Any = {"status": "ok", "models": len(self._server.host)}
                else:
                    data = [info.to_dict() for info in self._server.host.list()]
                self._send(request, 200, _JSON, json.dumps(data).encode())
                return
            if path.startswith(_PREDICT_PREFIX) and path.endswith(_PREDICT_SUFFIX):
                name = path[len(_PREDICT_PREFIX):-len(_PREDICT_SUFFIX)]
                if name and "/" not in name:
                    if method != "POST":
                        raise _HttpError(405, "method_not_allowed",
                                         f"predict accepts POST, got {method}", allow="POST")
                    self._predict(request, name, body)
                    return
            raise _HttpError(404, "not_found", f"no route {method} {path[:200]}; routes: GET "
                             "/healthz, GET /v1/models, POST /v1/models/{name}/predict"
                             + (", GET /metrics" if self._server.metrics is not None else ""))
        except _HttpError as err:
            self._send_error(request, err)

    def _predict(self, request: _Request, name: str, body: bytes) -> None:
        if "content-length" not in request.headers:
            raise _HttpError(411, "length_required", "predict needs a Content-Length header")
        ctype = request.headers.get("content-type", wire.JSON_CONTENT_TYPE)
        ctype = ctype.split(";", 1)[0].strip().lower()
        decode: Callable[[ModelInfo], dict[str, np.ndarray]]
        if ctype == wire.JSON_CONTENT_TYPE:
            def decode(info: ModelInfo) -> dict[str, np.ndarray]:
                return wire.decode_json_inputs(body, info.inputs)
        elif ctype == wire.TENSORS_CONTENT_TYPE:
            def decode(info: ModelInfo) -> dict[str, np.ndarray]:
                return wire.decode_tensors(body).tensors
        else:
            raise _HttpError(415, "unsupported_media_type", "expected Content-Type "
                             f"{wire.JSON_CONTENT_TYPE} or {wire.TENSORS_CONTENT_TYPE}, got "
                             f"{ctype[:80]!r}")
        encode = (_encode_tensors if wire.TENSORS_CONTENT_TYPE in request.headers.get("accept", "")
                  else _encode_json)
        server = self._server
        # set before submit: an inline model answers (self._answer) before submit returns
        self._pending = request
        try:
            queued = not server.host.submit(name, decode, encode, self._answer,
                                            size=len(body), contended=server._contended())
        except UnknownModel as exc:
            self._pending = None
            raise _HttpError(404, "unknown_model", str(exc)) from exc
        except RuntimeError as exc:  # the host was closed under us: the daemon is stopping
            self._pending = None
            raise _HttpError(503, "unavailable", f"not serving: {exc}", close=True) from exc
        if queued:
            server._busy_changed(self, True)

    def _scrape(self, request: _Request, render: MetricsRenderer) -> None:
        """Render the metrics in the loop's default executor (they may read SQLite)."""
        try:
            future = self._loop.run_in_executor(None, render, request.headers.get("accept", ""))
        except RuntimeError as exc:  # the executor was shut down: the daemon is stopping
            raise _HttpError(503, "unavailable", f"not serving: {exc}", close=True) from exc
        self._pending = request
        self._server._busy_changed(self, True)

        def done(fut: asyncio.Future[Encoded]) -> None:
            if fut.cancelled():
                self._answer(None, RuntimeError("metrics rendering was cancelled"))
            else:
                exc = fut.exception()
                self._answer(fut.result() if exc is None else None, exc)

        future.add_done_callback(done)

    def _answer(self, result: Encoded | None, exc: BaseException | None) -> None:
        """The answer to the pending request: inline (within submit) or from a thread."""
        request = self._pending
        self._pending = None
        queued = self in self._server._busy
        if queued:
            self._server._busy_changed(self, False)
        if self._transport is None or request is None:
            return
        if exc is None:
            assert result is not None
            self._send(request, 200, *result)
        elif isinstance(exc, InputRejected):
            self._send_error(request, _HttpError(400, "bad_request", str(exc)))
        elif isinstance(exc, RuntimeLoadError):
            self._send_error(request, _HttpError(500, "runtime_error", str(exc)))
        else:
            log.error("%s %s failed with an unexpected error", request.method, request.path,
                      exc_info=exc)
            self._send_error(request, _HttpError(500, "internal", f"{type(exc).__name__}: "
                                                 f"{exc}"))
        if not queued:  # inline: _process, further up this stack, goes on with the buffer
            return
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
        self._process()

    # -- responses --------------------------------------------------------------------------

    def _fail(self, err: _HttpError) -> None:
        """Answer a request whose head could not be used, then close."""
        self._send(None, err.status, _JSON, _error_body(err.kind, err.detail), close=True)

    def _send_error(self, request: _Request, err: _HttpError, *, linger: bool = False) -> None:
        extra = f"Allow: {err.allow}\r\n".encode() if err.allow else b""
        self._send(request, err.status, _JSON, _error_body(err.kind, err.detail),
                   close=err.close, extra=extra, linger=linger)

    def _send(self, request: _Request | None, status: int, ctype: bytes, body: bytes, *,
              close: bool = False, extra: bytes = b"", linger: bool = False) -> None:
        """Write one response; unless it keeps the connection alive, close (or linger)."""
        transport = self._transport
        if transport is None:
            return
        keep = (request is not None and request.keep_alive and not close
                and not self._server._stopping)
        head = b"".join([
            _STATUS[status], b"Date: ", self._server._date.now(), b"\r\nContent-Type: ", ctype,
            b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n", extra,
            b"" if keep else b"Connection: close\r\n", b"\r\n"])
        if request is not None and request.method == "HEAD":
            body = b""
        if len(body) < 65536:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        self.last_active = self._loop.time()
        if not keep and not linger:
            self.close()


def _encode_json(info: ModelInfo, outputs: dict[str, np.ndarray]) -> Encoded:
    return _JSON, wire.encode_json_prediction(info.name, info.version, outputs)


def _encode_tensors(info: ModelInfo, outputs: dict[str, np.ndarray]) -> Encoded:
    return _TENSORS, wire.encode_tensors(outputs, {"model": info.name, "version": info.version})


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class InferenceServer:
    """The local inference API over a :class:`ModelHost` (routes in the module docstring)."""

    def __init__(self, host: ModelHost, *, bind_host: str = "127.0.0.1", port: int = 8500,
                 max_body_bytes: int = 8 << 20, idle_timeout_s: float = 30.0,
                 linger_s: float = 2.0, metrics: MetricsRenderer | None = None) -> None:
        """Configure; nothing listens until :meth:`start`.

        Args:
            host: the models to serve.
            bind_host: address to listen on; loopback unless you mean it (``AgentConfig
                .http_host``).
            port: TCP port; 0 picks a free one (read :attr:`port` after start).
            max_body_bytes: request bodies over this are refused with 413.
            idle_timeout_s: keep-alive connections idle this long are closed.
            linger_s: after a 413, how long to drain the refused body before closing.
            metrics: serves ``GET /metrics`` when given; called in a worker thread with the
                request's Accept header (:meth:`agent.serving.prom.AgentMetrics.render`).

        Raises:
            ValueError: a size or time out of range.
        """
        if max_body_bytes < 0 or not 0 <= port <= 65535 or idle_timeout_s <= 0 or linger_s < 0:
            raise ValueError("InferenceServer: expected max_body_bytes >= 0, port 0..65535, "
                             f"idle_timeout_s > 0, linger_s >= 0; got {max_body_bytes}, {port}, "
                             f"{idle_timeout_s}, {linger_s}")
        self.host = host
        self.bind_host = bind_host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.linger_s = linger_s
        self.metrics = metrics
        self._max_buffer = MAX_HEAD_BYTES + max_body_bytes
        self._date = _Date()
        self._recv_view = memoryview(bytearray(_RECV_BYTES))  # see _Connection
        self._heads: dict[bytes, _Request] = {}  # head bytes -> parse (see _HEAD_MEMO_ENTRIES)
        self._connections: set[_Connection] = set()
        self._idle: asyncio.Event | None = None  # set when no predict is running (stop())
        self._busy: set[_Connection] = set()
        self._predicted = False  # a predict was dispatched in this loop iteration
        self._server: asyncio.Server | None = None
        # armed only while a connection is open (see _sweep): an agent nobody calls keeps no
        # timer for its local API
        self._sweeper: asyncio.TimerHandle | None = None
        self._stopping = False

    async def start(self) -> None:
        """Listen. With port 0, :attr:`port` is the port picked.

        Raises:
            ConfigError: the address cannot be resolved or the port cannot be bound.
            RuntimeError: already started.
        """
        if self._server is not None:
            raise RuntimeError("InferenceServer.start: already started")
        loop = asyncio.get_running_loop()
        self._stopping = False
        try:
            infos = await loop.getaddrinfo(self.bind_host, self.port,
                                                 type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)
            # port 0 on a name with several addresses would get a different port on each
            hosts = ([str(infos[0][4][0])] if self.port == 0
                     else sorted({str(info[4][0]) for info in infos}))
            self._server = await loop.create_server(
                lambda: _Connection(self, loop), hosts, self.port, reuse_address=True, backlog=512)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.bind_host}:{self.port} (http_host, "
                              f"http_port): {exc}") from exc
        addresses = [sock.getsockname() for sock in self._server.sockets]
        self.port = int(addresses[0][1])
        shown = ", ".join(f"{a[0]}:{a[1]}" for a in addresses)
        public = [a[0] for a in addresses if not _is_loopback(str(a[0]))]
        if public:
            log.warning("LOCAL INFERENCE API IS NOT ON LOOPBACK: listening on %s. Anyone who "
                        "can reach %s can run and list models: there is no authentication "
                        "and no TLS. Set http_host = \"127.0.0.1\" unless this is intended.",
                        shown, ", ".join(public))
        else:
            log.info("local inference API listening on http://%s", shown)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop listening, let running predicts answer (up to ``grace_s``), close everything.

        The host and its models are left alone: the caller owns them.
        """
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._connections):
            if not conn.busy:
                conn.close()
        if self._busy:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except TimeoutError:
                log.warning("stopping with %d predicts still running after %.1f s",
                            len(self._busy), grace_s)
        for conn in list(self._connections):
            conn.close()
        await self._server.wait_closed()
        self._server = None

    def _contended(self) -> bool:
        """Whether a predict arriving now competes with others (then the host uses its pool).

        It does when another request is running in the pool (or a scrape in the executor), or
        when another predict was already dispatched in this iteration of the loop (requests
        from several connections, or pipelined, arrived together). One client sending one
        request at a time, on one connection or a new one each time, never is.
        """
        if self._predicted:
            return True
        self._predicted = True
        asyncio.get_running_loop().call_soon(self._end_iteration)
        return bool(self._busy)

    def _end_iteration(self) -> None:
        self._predicted = False

    def _busy_changed(self, conn: _Connection, busy: bool) -> None:
        if busy:
            self._busy.add(conn)
            return
        self._busy.discard(conn)
        if not self._busy and self._idle is not None:
            self._idle.set()

    def _arm_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make sure a sweep is due (a connection opened); nothing while stopping."""
        if self._sweeper is None and not self._stopping:
            self._sweeper = loop.call_later(min(5.0, self.idle_timeout_s / 2), self._sweep,
                                            loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close keep-alive connections idle for longer than ``idle_timeout_s``; sweep again
        later only while a connection is still open (the next one to open re-arms it).

        A connection idle for ``idle_timeout_s`` is closed within ``idle_timeout_s`` plus one
        sweep interval (``min(5 s, idle_timeout_s / 2)``).
        """
        self._sweeper = None
        deadline = loop.time() - self.idle_timeout_s
        for conn in list(self._connections):
            if not conn.busy and conn.last_active < deadline:
                conn.close()
        if any(not conn.closed for conn in self._connections):
            self._arm_sweep(loop)
