"""A minimal blocking client for the local inference API (``edgefleet-agent predict``).

Standard library :mod:`http.client` over one keep-alive connection, reopened once when the
server closed an idle one. Not thread-safe: one client per thread.

Errors (the agent's tree; HTTP statuses mapped once, here)::

    UnknownModel       404 unknown_model: no model served under that name
    InputRejected      400, 413, 415: the request does not fit the model or the server
    RuntimeLoadError   500: the engine failed on the device
    TransportError     cannot connect, connection lost, timeout, or an answer this client does
                       not understand (another status, a body that is not the API's)
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from typing import Any, Self

import numpy as np

from agent.errors import InputRejected, RuntimeLoadError, TransportError
from agent.serving import wire
from agent.serving.host import UnknownModel
from agent.serving.wire import Prediction

__all__ = ["AgentClient", "Prediction"]


class AgentClient:
    """Talk to one agent's local inference API."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8500, *,
                 timeout: float = 30.0) -> None:
        """Nothing connects until the first call.

        Args:
            host: the agent's ``http_host``.
            port: the agent's ``http_port``.
            timeout: seconds to wait for connect and for each read.
        """
        self.host = host
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok", "models": N}``.

        Raises:
            TransportError: the agent cannot be reached or answered something else.
        """
        _, body = self._request("GET", "/healthz", None, {})
        doc = _json(body)
        if not isinstance(doc, dict):
            raise TransportError(f"GET /healthz: expected a JSON object, got {body[:80]!r}")
        return doc

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: ``[{"name", "version", "inputs", "outputs"}, ...]``.

        Raises:
            TransportError: the agent cannot be reached or answered something else.
        """
        _, body = self._request("GET", "/v1/models", None, {})
        doc = _json(body)
        if not isinstance(doc, list):
            raise TransportError(f"GET /v1/models: expected a JSON list, got {body[:80]!r}")
        return doc

    def predict(self, name: str, inputs: Mapping[str, Any], *,
                binary: bool | None = None) -> Prediction:
        """Run ``inputs`` on model ``name``.

        Args:
            name: the model name.
            inputs: one value per input name: numpy arrays (sent with their own dtype, which
                must be the model's) or nested lists (sent as JSON, cast by the agent).
            binary: use the binary tensor framing both ways; default: when every input is a
                numpy array. JSON outputs come back as numpy infers them (float64, int64).

        Raises:
            UnknownModel: the agent serves no model ``name``.
            InputRejected: the inputs do not fit the model, or the body is over the limit.
            RuntimeLoadError: the engine failed.
            TransportError: the agent cannot be reached or answered something else.
        """
        if binary is None:
            binary = all(isinstance(v, np.ndarray) for v in inputs.values())
        path = f"/v1/models/{name}/predict"
        if binary:
            body = wire.encode_tensors({k: np.asarray(v) for k, v in inputs.items()})
            headers = {"Content-Type": wire.TENSORS_CONTENT_TYPE,
                       "Accept": wire.TENSORS_CONTENT_TYPE}
        else:
            body = wire.encode_json_inputs(inputs)
            headers = {"Content-Type": wire.JSON_CONTENT_TYPE}
        ctype, answer = self._request("POST", path, body, headers)
        try:
            if ctype == wire.TENSORS_CONTENT_TYPE:
                frame = wire.decode_tensors(answer)
                model, version = frame.meta.get("model"), frame.meta.get("version")
                if not isinstance(model, str) or not isinstance(version, str):
                    raise InputRejected("the frame's header has no model and version")
                return Prediction(model, version, frame.tensors)
            return wire.decode_json_prediction(answer)
        except InputRejected as exc:
            raise TransportError(f"POST {path}: the answer is not a prediction: {exc}") from exc

    # -- one request ------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None,
                 headers: Mapping[str, str]) -> tuple[str, bytes]:
        """Send, read; retry once on a fresh connection if a reused one was closed."""
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=dict(headers))
                response = self._conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                self.close()
                if reused and attempt == 0:  # the server closed an idle keep-alive connection
                    continue
                raise TransportError(f"{method} {path} on {self.host}:{self.port}: connection "
                                     f"lost: {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:  # refused, timeout, garbage
                self.close()
                raise TransportError(f"{method} {path} on {self.host}:{self.port}: "
                                     f"{type(exc).__name__}: {exc}") from exc
            if response.will_close:
                self.close()
            ctype = (response.getheader("Content-Type") or "").split(";", 1)[0].strip()
            if response.status == 200:
                return ctype, data
            raise _status_error(method, path, response.status, data)
        raise AssertionError("unreachable")  # pragma: no cover


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise TransportError(f"expected a JSON answer, got {body[:80]!r}") from exc


def _status_error(method: str, path: str, status: int, body: bytes) -> Exception:
    try:
        doc = json.loads(body)
        kind, detail = str(doc["error"]), str(doc["detail"])
    except (ValueError, TypeError, KeyError):
        kind, detail = "", body[:200].decode("utf-8", "replace")
    if status == 404 and kind == "unknown_model":
        return UnknownModel(detail)
    if status in (400, 413, 415):
        return InputRejected(detail)
    if status == 500 and kind == "runtime_error":
        return RuntimeLoadError(detail)
    return TransportError(f"{method} {path}: HTTP {status} {kind}: {detail}".rstrip(": "))
