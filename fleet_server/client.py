"""A small client for the fleet server's admin API (httpx): one method per route.

Used by ``fleet_server``'s API commands; usable from scripts too::

    with FleetClient("http://127.0.0.1:8080", token) as api:
        for device in api.list_devices():
            print(device["id"])

Every method returns the decoded JSON body. An error response
``{"error": "<ClassName>", "detail": "<message>"}`` is raised as the
:mod:`fleet_server.errors` class of that name (falling back to the class for its HTTP status),
carrying the server's detail as its message, so callers print what the server said. httpx's
own exceptions never leave this module (STYLE rule 10):

    FleetError                  (fleet_server.errors)
    ├── <the server's class>    the server answered 4xx/5xx; ``status_code`` is the response's
    └── ServerUnreachable       no answer: connection refused, DNS, TLS, timeout
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import IO, Any, Self

import httpx

from fleet_server import errors
from fleet_server.errors import FleetError

__all__ = ["DEFAULT_URL", "FleetClient", "ServerUnreachable", "error_for",
           "rollout_status"]

DEFAULT_URL = "http://127.0.0.1:8080"
#: items asked for per page of a list route (the server caps pages at ``max_page_size``)
_CHUNK = 1 << 20


class ServerUnreachable(FleetError):
    """The server could not be reached or did not answer in time (nothing was decided)."""

    status_code = 503


_BY_STATUS: dict[int, type[FleetError]] = {
    400: errors.RequestError,
    401: errors.Unauthenticated,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    422: errors.InvalidInput,
    503: errors.BrokerError,
}


def _normal(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


_BY_NAME: dict[str, type[FleetError]] = {
    _normal(name): cls for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type) and issubclass(cls, FleetError)
}


def _detail_text(detail: object) -> str:
    """The server's detail as one line; FastAPI's validation list becomes ``loc: msg; ...``."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, Mapping):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return json.dumps(detail, sort_keys=True)


def error_for(status: int, body: bytes, *, method: str = "", url: str = "") -> FleetError:
    """The :mod:`fleet_server.errors` exception for an error response.

    Args:
        status: the HTTP status (>= 400).
        body: the raw response body (``{"error": ..., "detail": ...}`` from this server; any
            other body is shown as it is, shortened).
        method: the request method, for the message when the body says nothing.
        url: the request URL, likewise.

    Returns:
        An instance of the class the server named, else of the class for ``status``, else
        :class:`~fleet_server.errors.FleetError`; its ``status_code`` is ``status``.
    """
    name: str | None = None
    detail: str
    try:
        data = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if isinstance(data, dict) and ("detail" in data or "error" in data):
        raw_name = data.get("error")
        name = raw_name if isinstance(raw_name, str) else None
        detail = _detail_text(data.get("detail", name))
    else:
        text = body.decode("utf-8", "replace").strip()
        detail = text[:300] if text else f"{method} {url}".strip()
    cls = (_BY_NAME.get(_normal(name)) if name else None) or _BY_STATUS.get(status) or (
        errors.RequestError if 400 <= status < 500 else FleetError)
    exc = cls(f"{detail} (HTTP {status})")
    exc.status_code = status
    return exc


def _file_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    while block := fh.read(_CHUNK):
        yield block


class FleetClient:
    """The admin API at ``base_url``, authenticated with a bearer ``token``.

    Args:
        base_url: the server's URL, e.g. ``http://127.0.0.1:8080``.
        token: an API token (``ef_admin_...``); None sends no Authorization header.
        timeout: seconds per request (connect, read and write each).
        transport: an httpx transport (tests may inject ``httpx.MockTransport``).
    """

    def __init__(self, base_url: str = DEFAULT_URL, token: str | None = None, *,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        # trust_env: proxies, NO_PROXY and SSL_CERT_FILE apply, as with curl
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def __repr__(self) -> str:  # never the token
        return f"FleetClient({self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ----------------------------------------------------------------- transport

    def request(self, method: str, path: str, *, json_body: Any = None,
                content: bytes | Iterable[bytes] | None = None,
                headers: Mapping[str, str] | None = None,
                params: Mapping[str, Any] | None = None) -> Any:
        """Send one request; return the decoded JSON body (None for an empty body).

        Raises:
            FleetError: the server's error (see :func:`error_for`).
            ServerUnreachable: no answer.
        """
        try:
            response = self._http.request(method, path, json=json_body, content=content,
                                          headers=headers, params=params)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"cannot reach the fleet server at {self.base_url}: "
                                    f"{exc or type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise error_for(response.status_code, response.content, method=method,
                            url=str(response.request.url))
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise FleetError(f"{method} {path}: the server answered {response.status_code} "
                             f"with a body that is not JSON") from exc

    def _paged(self, path: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Every item of a list route (``{"items", "total"}``), following ``offset``.

        The page size is left to the server (its default, capped by ``max_page_size``).
        """
        items: list[Any] = []
        while True:
            page = self.request("GET", path, params={**(params or {}), "offset": len(items)})
            batch = page.get("items") if isinstance(page, dict) else None
            if not isinstance(batch, list):
                raise FleetError(f"GET {path}: expected a page {{items, total}} from the "
                                 f"server, got {type(page).__name__}")
            items.extend(batch)
            total = page.get("total")
            if not batch or not isinstance(total, int) or len(items) >= total:
                return items

    # ----------------------------------------------------------------- tokens

    def create_token(self, name: str, scope: str) -> dict[str, Any]:
        """``POST /v1/tokens``: a new API token; its secret is in the answer, once."""
        out: dict[str, Any] = self.request("POST", "/v1/tokens",
                                           json_body={"name": name, "scope": scope})
        return out

    # ----------------------------------------------------------------- devices

    def provision_device(self, device_id: str, profile: str,
                         tags: Iterable[str] = ()) -> dict[str, Any]:
        """``POST /v1/devices``: ``{"device": {...}, "provisioning": {...secrets...}}``."""
        out: dict[str, Any] = self.request("POST", "/v1/devices", json_body={
            "id": device_id, "profile": profile, "tags": list(tags)})
        return out

    def list_devices(self, *, tag: str | None = None,
                     profile: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/devices`` (every page)."""
        params = {k: v for k, v in (("tag", tag), ("profile", profile)) if v}
        return self._paged("/v1/devices", params)

    def get_device(self, device_id: str) -> dict[str, Any]:
        """``GET /v1/devices/{id}``: the device with its desired and reported state."""
        out: dict[str, Any] = self.request("GET", f"/v1/devices/{_seg(device_id)}")
        return out

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        """``POST /v1/devices/{id}/revoke``: its MQTT credentials and token stop working."""
        out: dict[str, Any] = self.request("POST", f"/v1/devices/{_seg(device_id)}/revoke")
        return out

    # ----------------------------------------------------------------- models

    def push_model(self, tar: IO[bytes], length: int) -> dict[str, Any]:
        """``POST /v1/models`` with a bundle tar (or tar.gz) as the raw body, streamed."""
        out: dict[str, Any] = self.request(
            "POST", "/v1/models", content=_file_chunks(tar),
            headers={"Content-Type": "application/x-tar", "Content-Length": str(length)})
        return out

    def list_models(self) -> list[dict[str, Any]]:
        """``GET /v1/models`` (every page): one item per (name, version)."""
        return self._paged("/v1/models")

    def get_model_version(self, name: str, version: str) -> dict[str, Any]:
        """``GET /v1/models/{name}/versions/{version}``: every profile's artifact and report."""
        out: dict[str, Any] = self.request(
            "GET", f"/v1/models/{_seg(name)}/versions/{_seg(version)}")
        return out

    # ----------------------------------------------------------------- deployments

    def deploy(self, model: str, version: str, selector: Mapping[str, Any],
               rollout: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``POST /v1/deployments``: selector ``{"devices", "tags", "profiles", "all"}``;
        ``rollout`` ``{"waves", "gates", "on_failure"}`` to go in waves."""
        body: dict[str, Any] = {"model": model, "version": version, "selector": dict(selector)}
        if rollout is not None:
            body["rollout"] = dict(rollout)
        out: dict[str, Any] = self.request("POST", "/v1/deployments", json_body=body)
        return out

    def list_deployments(self) -> list[dict[str, Any]]:
        """``GET /v1/deployments`` (every page), newest first."""
        return self._paged("/v1/deployments")

    def cancel_deployment(self, deployment_id: int) -> dict[str, Any]:
        """``POST /v1/deployments/{id}/cancel``."""
        out: dict[str, Any] = self.request("POST", f"/v1/deployments/{deployment_id}/cancel")
        return out

    def rollout(self, *, include_inactive: bool = False) -> list[dict[str, Any]]:
        """Deployments with per-device progress: ``GET /v1/deployments`` and ``/v1/devices``,
        and ``GET /v1/rollouts/{id}`` for the deployments that go in waves.

        Devices whose list entry carries no ``desired`` state are read one by one
        (``GET /v1/devices/{id}``). See :func:`rollout_status` for the result.
        """
        deployments = self.list_deployments()
        devices = [d if "desired" in d or d.get("revoked") else self.get_device(d["id"])
                   for d in self.list_devices()]
        shown = [d for d in deployments if include_inactive or d.get("status") == "active"]
        rollouts = {int(d["rollout_id"]): self.get_rollout(int(d["rollout_id"]))
                    for d in shown if d.get("rollout_id") is not None}
        try:
            return rollout_status(shown, devices, rollouts=rollouts,
                                  include_inactive=include_inactive)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FleetError(f"unexpected deployment or device data from the server: "
                             f"{exc!r}") from exc

    # ----------------------------------------------------------------- rollouts

    def list_rollouts(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/rollouts`` (every page), newest first, with per-wave counts."""
        return self._paged("/v1/rollouts", {"status": status} if status else None)

    def get_rollout(self, rollout_id: int) -> dict[str, Any]:
        """``GET /v1/rollouts/{id}``: waves, gates, every moved device."""
        out: dict[str, Any] = self.request("GET", f"/v1/rollouts/{int(rollout_id)}")
        return out

    def command_rollout(self, rollout_id: int, command: str,
                        reason: str | None = None) -> dict[str, Any]:
        """``POST /v1/rollouts/{id}/{command}``: ``pause``, ``resume`` or ``cancel``."""
        if command not in ("pause", "resume", "cancel"):
            raise ValueError(f"command: expected pause, resume or cancel, got {command!r}")
        out: dict[str, Any] = self.request(
            "POST", f"/v1/rollouts/{int(rollout_id)}/{command}",
            json_body={"reason": reason} if reason else None)
        return out

    # ----------------------------------------------------------------- monitoring
    # since, until: unix seconds on the server's clock; bucket: seconds; None: the server's
    # default (the last hour, at most 60 buckets)

    def monitor_fleet(self, *, since: int | None = None, until: int | None = None,
                      bucket: int | None = None) -> dict[str, Any]:
        """``GET /v1/monitoring/fleet``: devices, alerts, every model version's numbers."""
        out: dict[str, Any] = self.request("GET", "/v1/monitoring/fleet", params=_given(
            {"since": since, "until": until, "bucket": bucket}))
        return out

    def monitor_model(self, model: str, *, since: int | None = None, until: int | None = None,
                      bucket: int | None = None) -> dict[str, Any]:
        """``GET /v1/monitoring/models/{model}``: per version and per device."""
        out: dict[str, Any] = self.request(
            "GET", f"/v1/monitoring/models/{_seg(model)}",
            params=_given({"since": since, "until": until, "bucket": bucket}))
        return out

    def monitor_drift(self, model: str, *, version: str | None = None,
                      device: str | None = None, input_name: str | None = None,
                      feature: int | None = None, since: int | None = None,
                      until: int | None = None, bucket: int | None = None) -> dict[str, Any]:
        """``GET /v1/monitoring/models/{model}/drift``: PSI/JS over time, per device."""
        out: dict[str, Any] = self.request(
            "GET", f"/v1/monitoring/models/{_seg(model)}/drift", params=_given({
                "version": version, "device": device, "input": input_name,
                "feature": feature, "since": since, "until": until, "bucket": bucket}))
        return out

    def monitor_distribution(self, model: str, version: str, *,
                             input_name: str | None = None, feature: int = 0,
                             profile: str | None = None, since: int | None = None,
                             until: int | None = None, device: str | None = None
                             ) -> dict[str, Any]:
        """``GET /v1/monitoring/models/{model}/distribution``: reference against live
        (``device``: only that device's windows)."""
        out: dict[str, Any] = self.request(
            "GET", f"/v1/monitoring/models/{_seg(model)}/distribution", params=_given({
                "version": version, "input": input_name, "feature": feature,
                "profile": profile, "since": since, "until": until, "device": device}))
        return out

    def monitor_device(self, device_id: str, *, since: int | None = None,
                       until: int | None = None, bucket: int | None = None
                       ) -> dict[str, Any]:
        """``GET /v1/monitoring/devices/{id}``."""
        out: dict[str, Any] = self.request(
            "GET", f"/v1/monitoring/devices/{_seg(device_id)}",
            params=_given({"since": since, "until": until, "bucket": bucket}))
        return out

    # ----------------------------------------------------------------- alerts

    def list_alert_rules(self) -> list[dict[str, Any]]:
        """``GET /v1/alert-rules`` (every page)."""
        return self._paged("/v1/alert-rules")

    def create_alert_rule(self, rule: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/alert-rules``: ``model``, ``kind``, ``threshold`` and the optional
        ``version``, ``min_devices``, ``for_s``, ``window_s``, ``min_samples``,
        ``webhook_url``."""
        out: dict[str, Any] = self.request("POST", "/v1/alert-rules", json_body=dict(rule))
        return out

    def delete_alert_rule(self, rule_id: int) -> dict[str, Any]:
        """``DELETE /v1/alert-rules/{id}``: its open alert resolves."""
        out: dict[str, Any] = self.request("DELETE", f"/v1/alert-rules/{int(rule_id)}")
        return out

    def list_alerts(self, *, state: str | None = None,
                    model: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/alerts`` (every page), newest first."""
        return self._paged("/v1/alerts", _given({"state": state, "model": model}))

    # ----------------------------------------------------------------- audit

    def audit(self) -> dict[str, Any]:
        """``GET /v1/audit`` (every page, by ``after_id``): ``{"items", "chain_intact",
        "first_broken_id"}``, the chain verdict as of the last page."""
        items: list[Any] = []
        last: dict[str, Any] = {"chain_intact": None, "first_broken_id": None}
        while True:
            after = items[-1]["id"] if items else 0
            page = self.request("GET", "/v1/audit", params={"after_id": after})
            if not isinstance(page, dict) or not isinstance(page.get("items"), list):
                raise FleetError("GET /v1/audit: expected {items, chain_intact} from the "
                                 f"server, got {type(page).__name__}")
            last = page
            if not page["items"]:
                break
            items.extend(page["items"])
        return {**last, "items": items}


def _given(params: Mapping[str, Any]) -> dict[str, Any]:
    """The query parameters that were given (None means: the server's default)."""
    return {k: v for k, v in params.items() if v is not None}


def _seg(value: str) -> str:
    """One URL path segment, percent-encoded (a ``/`` in a name cannot change the route)."""
    from urllib.parse import quote

    return quote(value, safe="")


# --------------------------------------------------------------------------------- rollouts

#: a rollout's device outcome -> the ``state`` of :func:`rollout_status`
_ROLLOUT_STATES = {"committed": "done", "failed": "failed", "pending": "pending",
                   "reverted": "reverted"}


def rollout_status(deployments: Iterable[Mapping[str, Any]],
                   devices: Iterable[Mapping[str, Any]], *,
                   rollouts: Mapping[int, Mapping[str, Any]] | None = None,
                   include_inactive: bool = False) -> list[dict[str, Any]]:
    """Per deployment, per targeted live device: the desired sequence against what it runs.

    Pure: takes the bodies of ``GET /v1/deployments``, ``GET /v1/devices/{id}`` (devices
    carry ``desired`` and ``reported``) and, for deployments that go in waves, ``GET
    /v1/rollouts/{id}`` (by id; the entry then carries it as ``rollout``).

    Each device row has ``state``: ``done`` (runs the version and applied the desired sequence),
    ``pending`` (not there yet), ``failed`` (its last attempt at the current sequence failed,
    rolled back or was refused, or, in a rollout, it failed there; ``error`` says why),
    ``superseded`` (a newer deployment decides this device's version of the model),
    ``not-desired`` (its desired state has no entry for the model: the deployment was
    cancelled, or the device's profile has no artifact), and for a rollout ``waiting`` (no
    wave has taken it yet) or ``reverted`` (back on its previous version after a rollback or
    cancel). Rollout rows also carry their ``wave``.

    Raises:
        ValueError: a deployment's selector is malformed.
    """
    from fleet_server.deploy.plan import DeviceView, Selector, matches

    live = [d for d in devices if not d.get("revoked")]
    out: list[dict[str, Any]] = []
    for dep in deployments:
        if dep.get("status") != "active" and not include_inactive:
            continue
        selector = Selector.from_dict(dep.get("selector") or {})
        rollout_id = dep.get("rollout_id")
        rollout = (rollouts or {}).get(int(rollout_id)) if rollout_id is not None else None
        moved = {r["device_id"]: r for r in (rollout or {}).get("devices") or ()}
        rows = []
        for d in live:
            view = DeviceView(str(d["id"]), str(d.get("profile", "")),
                              frozenset(d.get("tags") or ()))
            if matches(selector, view) or str(d["id"]) in moved:
                row = _device_progress(dep, d)
                if rollout is not None:
                    _rollout_progress(row, moved.get(str(d["id"])))
                rows.append(row)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        out.append({"deployment": dict(dep), "devices": rows, "counts": counts,
                    "rollout": dict(rollout) if rollout is not None else None})
    return out


def _rollout_progress(row: dict[str, Any], moved: Mapping[str, Any] | None) -> None:
    """Overwrite a device row's ``state`` with the rollout's verdict on it."""
    if moved is None:
        row.update(state="waiting", wave=None, error=None)
        return
    state = _ROLLOUT_STATES.get(str(moved.get("outcome")), "pending")
    row.update(state=state, wave=moved.get("wave"),
               error=moved.get("reason") if state in ("failed", "pending") else None)


def _device_progress(dep: Mapping[str, Any], device: Mapping[str, Any]) -> dict[str, Any]:
    model, version = dep.get("model"), dep.get("version")
    desired = device.get("desired") or {}
    reported = device.get("reported") or {}
    wanted = next((m.get("version") for m in desired.get("models") or ()
                   if m.get("name") == model), None)
    running = next((m.get("version") for m in reported.get("running") or ()
                    if m.get("name") == model), None)
    sequence = desired.get("sequence")
    applied = reported.get("applied_sequence")
    error = None
    if wanted is None:
        state = "not-desired"
    elif wanted != version:
        state = "superseded"
    elif running == version and sequence is not None and applied == sequence:
        state = "done"
    elif (sequence is not None and applied == sequence
          and reported.get("last_result") in ("failed", "rolled_back", "refused")):
        state, error = "failed", reported.get("last_error") or reported.get("last_result")
    else:
        state = "pending"
    return {"device": device.get("id"), "online": bool(device.get("online")),
            "desired_sequence": sequence, "desired_version": wanted,
            "applied_sequence": applied, "running_version": running, "state": state,
            "last_result": reported.get("last_result"), "error": error, "wave": None}
