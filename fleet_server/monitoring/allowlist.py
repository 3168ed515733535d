"""Where alert webhooks may go: the ``webhook_allow`` setting (pure).

An alert rule's ``webhook_url`` makes the server POST to it from inside its network, so a
token that may add rules could otherwise aim the server at an internal address (a cloud
metadata endpoint, an admin port on localhost) and read the answer's status from the
delivery log. ``webhook_allow`` lists where webhooks may go; each entry is one of:

=================================  ===================================================
entry                              allows
=================================  ===================================================
``hooks.example.com``              that host, exactly (http or https, any port)
``*.example.com``                  any host under ``example.com`` (not itself)
``10.0.0.7`` / ``[fd00::7]``       that IP address
``10.20.0.0/16`` / ``fd00::/8``    the addresses of that network (CIDR)
``https://hooks.example.com/ef/``  URLs with that scheme, host and port whose path is
                                   the prefix's path or below it (``/ef/...``)
=================================  ===================================================

Hosts compare case-insensitively, and a URL's host is what :func:`urllib.parse.urlsplit`
finds, so ``https://hooks.example.com@evil.example/`` is ``evil.example``. A prefix entry
matches at a path-segment boundary (``https://h/ef`` allows ``/ef`` and ``/ef/x``, never
``/efx``), and a URL whose path holds a ``.`` or ``..`` segment (also percent-encoded) never
matches one.

Names are only half of it: a permitted name may resolve to an internal address (by mistake,
or because whoever controls its DNS wants it to). So the sender resolves the name once, right
before each POST, checks every address with :meth:`WebhookAllowList.address_refusal`, and
connects to the address it checked (:mod:`fleet_server.monitoring.webhook_target`): an
unspecified, loopback, link-local, multicast, private, reserved or otherwise non-global
address is refused unless the list *names* it, as an IP address (also as the host of a URL
prefix) or inside a CIDR network. An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is
judged as the IPv4 address it carries.

Unset (``None``), every http(s) URL is allowed, to whatever address its name resolves, and
``serve`` says so at start. That is the
default because the tokens that may add rules (publisher, admin) may already deploy models
to every device, and a webhook to an arbitrary receiver (Slack, PagerDuty, a lab's own
endpoint) is what most first setups need; an empty list allows none. Production setups
should set it, as AWS IoT asks a rule's HTTP destination to be confirmed before use.

The list is checked when a rule is created (the request is refused with 422, naming the
list), when a delivery is queued, and again by the sender right before each POST (the list
may have been narrowed since: such a delivery fails without a request).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

from fleet_server.errors import InvalidInput

__all__ = ["WebhookAllowList", "check_webhook_url"]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _special(ip: _Address) -> str | None:
    """What makes ``ip`` an internal address (``"loopback"``, ...), or None if it is global."""
    for name, flag in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if flag:
            return name
    return None if ip.is_global else "non-global"


def _host(text: str) -> str | None:
    """A lower-case host name or IP address (without IPv6 brackets), or None if not one."""
    host = text.lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > 253 or not all(
            0 < len(label) <= 63 and all(ch.isalnum() or ch == "-" for ch in label)
            and label.isascii() for label in labels):
        return None
    return host


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    host: str
    port: int
    path: str  # "" or "/..." without a trailing slash


def _port(scheme: str, port: int | None) -> int:
    return _DEFAULT_PORTS[scheme] if port is None else port


def _has_dot_segment(path: str) -> bool:
    return any(seg in (".", "..") for seg in unquote(path).split("/"))


@dataclass(frozen=True)
class WebhookAllowList:
    """A parsed ``webhook_allow`` list (module docstring): :meth:`parse`, :meth:`allows`."""

    entries: tuple[str, ...]
    hosts: frozenset[str]
    suffixes: tuple[str, ...]  # ".example.com" for "*.example.com"
    prefixes: tuple[_Prefix, ...]
    networks: tuple[_Network, ...]  # IP entries (as /32 or /128) and CIDR entries
    prefix_addresses: tuple[_Network, ...] = ()  # IP hosts of URL prefixes: addresses only

    @classmethod
    def parse(cls, entries: Iterable[str]) -> WebhookAllowList:
        """Raises: ValueError: an entry is neither a host, ``*.domain``, an IP address, a
        CIDR network nor an http(s) URL prefix without user, query or fragment (the message
        names it)."""
        given = tuple(entries)
        hosts: set[str] = set()
        suffixes: list[str] = []
        prefixes: list[_Prefix] = []
        networks: list[_Network] = []
        prefix_addresses: list[_Network] = []
        for entry in given:
            def bad(expected: str, entry: str = entry) -> ValueError:
                return ValueError(f"webhook_allow entry {entry!r}: expected {expected}")

            if not isinstance(entry, str) or not entry.strip() or entry != entry.strip():
                raise bad("a host, *.domain, IP address or http(s):// URL prefix")
            if "://" in entry:
                parts = urlsplit(entry)
                if parts.scheme not in _DEFAULT_PORTS:
                    raise bad("an http:// or https:// URL prefix")
                try:
                    port = parts.port
                except ValueError as exc:
                    raise bad(f"a valid port ({exc})") from exc
                host = _host(parts.hostname or "")
                if host is None or parts.username is not None or parts.password is not None \
                        or parts.query or parts.fragment:
                    raise bad("scheme://host[:port][/path] without user, query or fragment")
                if _has_dot_segment(parts.path):
                    raise bad("a path without '.' or '..' segments")
                prefixes.append(_Prefix(parts.scheme, host, _port(parts.scheme, port),
                                        parts.path.rstrip("/")))
                prefix_addresses.extend(_as_network(host))
            elif "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=True))
                except ValueError as exc:
                    raise bad(f"a CIDR network such as 10.20.0.0/16 or an http(s):// URL "
                              f"prefix ({exc})") from exc
            elif entry.startswith("*."):
                domain = _host(entry[2:])
                if domain is None or "." not in domain:
                    raise bad("*.domain with a domain of at least two labels")
                suffixes.append("." + domain)
            else:
                host = _host(entry)
                if host is None:
                    raise bad("a host name, *.domain, IP address or http(s):// URL prefix")
                hosts.add(host)
                networks.extend(_as_network(host))
        return cls(given, frozenset(hosts), tuple(suffixes), tuple(prefixes), tuple(networks),
                   tuple(prefix_addresses))

    def allows(self, url: str) -> bool:
        """Whether a webhook may POST to ``url`` (never raises: a URL that does not parse is
        not allowed)."""
        try:
            parts = urlsplit(url)
            port = _port(parts.scheme, parts.port) if parts.scheme in _DEFAULT_PORTS else 0
        except ValueError:
            return False
        host = _host(parts.hostname or "")
        if host is None or port == 0:
            return False
        if host in self.hosts or any(host.endswith(s) for s in self.suffixes):
            return True
        ip = _as_address(host)
        if ip is not None and any(ip in n for n in self.networks):
            return True
        if _has_dot_segment(parts.path):
            return False
        path = parts.path
        return any(p.scheme == parts.scheme and p.host == host and p.port == port and (
            path == p.path or path.startswith(p.path + "/")) for p in self.prefixes)

    def address_refusal(self, address: str) -> str | None:
        """Why a webhook may not connect to ``address``, or None if it may: an internal
        address (loopback, private, ...: module docstring) the list does not name.

        Raises:
            ValueError: ``address`` is not an IP address.
        """
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in n for n in (*self.networks, *self.prefix_addresses)):
            return None
        kind = _special(ip)
        if kind is None:
            return None
        article = "an" if kind[0] in "aeiou" else "a"
        return (f"{address} is {article} {kind} address, and the server's webhook_allow list "
                f"[{', '.join(self.entries)}] names neither it nor a network holding it")


def _as_address(host: str) -> _Address | None:
    """``host`` as an IP address (IPv4-mapped IPv6 as IPv4), or None if it is a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _as_network(host: str) -> list[_Network]:
    """``[host/32]`` (or ``/128``) if ``host`` is an IP address, else ``[]``."""
    ip = _as_address(host)
    return [] if ip is None else [ipaddress.ip_network(ip)]


def check_webhook_url(allow: WebhookAllowList | None, url: str | None) -> None:
    """Refuse ``url`` unless ``allow`` allows it (``allow`` None: no list, any URL).

    Raises:
        InvalidInput: the URL is outside the list (the message shows the list).
    """
    if url is None or allow is None or allow.allows(url):
        return
    shown = ", ".join(allow.entries) if allow.entries else "(empty: no webhooks)"
    raise InvalidInput(f"webhook_url: expected a URL allowed by the server's webhook_allow "
                       f"list [{shown}], got {url!r}")
