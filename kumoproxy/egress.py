"""Outbound sockets bound to a chosen source IP (wire.md §3).

``socket() -> IP_BIND_ADDRESS_NO_PORT -> bind((src, 0)) -> connect((dst, port))``

We create, bind and connect the socket ourselves rather than using
``trio.open_tcp_stream(local_address=...)`` because that hides the errno, and
the errno is the whole story: EADDRNOTAVAIL at bind means the source is not
plumbed on this host; EADDRNOTAVAIL at connect means the local ports for that
4-tuple are exhausted. IP_FREEBIND / IP_TRANSPARENT are never set: a bind of
an address we do not own must fail at once, not send SYNs nowhere.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from kumoproxy.config import IPAddress
from kumoproxy.errors import (
    ConnectFailedError,
    PortsExhaustedError,
    ResolveError,
    SourceNotPlumbedError,
)

#: linux/in.h. Defer the port choice from bind() to connect(), so one source
#: IP is not capped at ~28k connections in total (wire.md §3).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

#: Keepalive timing: detect a dead peer on an idle relay in ~2 minutes rather
#: than the kernel's default two hours (idle 60 s, then 6 probes 10 s apart).
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6

#: RFC 1928 §6 reply codes by connect() errno (wire.md §1).
_REPLY_BY_ERRNO = {
    errno.ENETUNREACH: 3,
    errno.EHOSTUNREACH: 4,
    errno.ECONNREFUSED: 5,
    errno.ETIMEDOUT: 6,
}

Endpoint = tuple[IPAddress, int]
#: ``(name, port, family) -> addresses``; family is 0 (any), AF_INET or AF_INET6.
Resolver = Callable[[str, int, int], Awaitable[list[IPAddress]]]


def set_keepalive(sock: trio.socket.SocketType) -> None:
    """TCP keepalive with bounded timings, so half-open peers are found."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _family(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


@dataclass(slots=True)
class BoundSocket:
    """A socket bound to its source, not yet connected (the BIND step)."""

    sock: trio.socket.SocketType
    source: IPAddress

    @property
    def local(self) -> Endpoint:
        host, port = self.sock.getsockname()[:2]
        return ipaddress.ip_address(host), port

    def close(self) -> None:
        self.sock.close()


async def bind_source(source: IPAddress) -> BoundSocket:
    """Create a TCP socket bound to ``source`` with the port chosen at connect.

    Raises :class:`SourceNotPlumbedError` when the host does not own it.
    """
    sock = trio.socket.socket(_family(source), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        await sock.bind((str(source), 0))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            raise SourceNotPlumbedError(
                f"source {source} is not plumbed on this host (bind: EADDRNOTAVAIL)",
                errno=exc.errno,
            ) from exc
        raise SourceNotPlumbedError(
            f"cannot bind source {source}: {exc.strerror}", errno=exc.errno
        ) from exc
    return BoundSocket(sock, source)


def unbound_socket(destination: IPAddress) -> trio.socket.SocketType:
    """A socket for "the kernel chooses the source"."""
    return trio.socket.socket(_family(destination), socket.SOCK_STREAM)


async def connect(sock: trio.socket.SocketType, destination: Endpoint) -> trio.SocketStream:
    """Connect ``sock`` and wrap it; the caller owns the deadline.

    On failure the socket is closed and a precise :class:`EgressError` raised.
    """
    host, port = destination
    try:
        set_keepalive(sock)
        await sock.connect((str(host), port))
    except OSError as exc:
        sock.close()
        code = exc.errno
        if code == errno.EADDRNOTAVAIL:
            raise PortsExhaustedError(
                f"no free local port to {host}:{port} (connect: EADDRNOTAVAIL)", errno=code
            ) from exc
        reason = exc.strerror or str(exc)
        raise ConnectFailedError(
            f"connect to {host}:{port} failed: {reason}",
            errno=code,
            reply=_REPLY_BY_ERRNO.get(code or 0, 1),
        ) from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def system_resolver(name: str, port: int, family: int) -> list[IPAddress]:
    """Resolve through the host's resolver (getaddrinfo), de-duplicated, in order."""
    try:
        infos = await trio.socket.getaddrinfo(name, port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ResolveError(f"cannot resolve {name}: {exc.strerror}", errno=exc.errno) from exc
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in out:
            out.append(address)
    return out


def probe_source(source: IPAddress) -> str | None:
    """Can this host bind ``source`` now? ``None`` if so, else the reason.

    Uses IP_BIND_ADDRESS_NO_PORT, so the probe reserves no port.
    """
    with socket.socket(_family(source), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            sock.bind((str(source), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return "not plumbed on this host (EADDRNOTAVAIL)"
            return exc.strerror or str(exc)
    return None
