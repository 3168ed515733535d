"""Where a webhook POST connects: resolve once, check every address, connect to that one.

Checking a URL's *name* against ``webhook_allow`` (:mod:`fleet_server.monitoring.allowlist`)
says nothing about where the name leads: ``hooks.example.com`` may resolve to ``127.0.0.1``,
``169.254.169.254`` or a private address, and a name whose DNS answer changes between a check
and the connection (DNS rebinding) would pass a check made on the first answer and connect
to the second. So, when a list is set, the sender calls :func:`pin` right before each POST:

1. the host is resolved once, through the injected :data:`Resolver` (default
   :func:`system_resolver`, ``getaddrinfo``); an IP address in the URL is used as it is;
2. every address is checked with :meth:`WebhookAllowList.address_refusal`: one internal
   address the list does not name refuses the delivery (:class:`WebhookTargetError`, fatal:
   ``failed`` at once, no request);
3. the request goes to the checked addresses in the resolver's order (the next one only when
   the connection to one fails, as ``socket.create_connection`` does), each as a URL with
   that address as its host, while the ``Host`` header keeps the name and port, and for
   https the TLS server name (SNI) and the certificate check keep the name (httpx's
   ``sni_hostname`` request extension). Nothing resolves the name a second time.

A name that does not resolve is a transient error (:class:`WebhookTargetError`, ``transient``
True): DNS may be back at the next attempt. The sender turns off connection reuse for pinned
requests, so a TLS connection made for one name never carries a POST for another that
resolved to the same address. No proxy is used (``trust_env=False`` in the sender): a proxy
would resolve the name itself.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from fleet_server.monitoring.allowlist import WebhookAllowList

__all__ = ["Resolver", "Target", "WebhookTargetError", "pin", "system_resolver"]

#: ``(host, port) -> addresses`` (IP address strings, in the order to try); raises
#: ``OSError`` when the name does not resolve
Resolver = Callable[[str, int], Sequence[str]]


class WebhookTargetError(Exception):
    """A delivery cannot go to its URL: refused (``transient`` False: an internal address the
    list does not name) or not resolvable now (``transient`` True)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Target:
    """Where to send: ``url`` with the checked ``address`` as its host, and what keeps the
    name (``host_header``; ``sni_hostname`` for https, else None)."""

    url: str
    address: str
    host_header: str
    sni_hostname: str | None

    def extensions(self) -> dict[str, str]:
        """httpx request extensions (TLS server name and certificate check on the name)."""
        return {} if self.sni_hostname is None else {"sni_hostname": self.sni_hostname}


def system_resolver(host: str, port: int) -> list[str]:
    """The system's answer for ``host`` (``getaddrinfo``, TCP), each address once, in order.

    Raises:
        OSError: the name does not resolve (``socket.gaierror``).
    """
    seen: list[str] = []
    for _family, _type, _proto, _name, sockaddr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM):
        address = str(sockaddr[0]).split("%", 1)[0]  # no IPv6 zone index
        if address not in seen:
            seen.append(address)
    return seen


def pin(url: str, allow: WebhookAllowList, resolve: Resolver) -> list[Target]:
    """Resolve ``url``'s host once, check every address against ``allow``, and return one
    target per address, in the order to try (module docstring). ``url`` must already be
    allowed by name (:meth:`WebhookAllowList.allows`).

    Raises:
        WebhookTargetError: an address is refused (``transient`` False), or the name does
            not resolve to any address (``transient`` True).
        ValueError: ``url`` is not an http(s) URL with a host.
    """
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"webhook URL: expected http(s)://host/..., got {url!r}")
    host = parsed.raw_host.decode("ascii")  # IDNA-encoded, as DNS and SNI want it
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if _is_address(host):
        addresses: Sequence[str] = [host]
    else:
        try:
            addresses = list(resolve(host, port))
        except OSError as exc:
            raise WebhookTargetError(f"not sent: {host} does not resolve ({exc})",
                                     transient=True) from exc
        if not addresses:
            raise WebhookTargetError(f"not sent: {host} resolves to no address",
                                     transient=True)
    for address in addresses:
        try:
            refusal = allow.address_refusal(address)
        except ValueError as exc:
            raise WebhookTargetError(f"not sent: {host} resolves to {address!r}, not an IP "
                                     f"address", transient=False) from exc
        if refusal is not None:
            shown = "" if address == host else f"{host} resolves to {address}: "
            raise WebhookTargetError(f"not sent: {shown}{refusal}", transient=False)
    return [Target(url=str(parsed.copy_with(host=address)), address=address,
                   host_header=parsed.netloc.decode("ascii"),
                   sni_hostname=host if parsed.scheme == "https" else None)
            for address in addresses]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
