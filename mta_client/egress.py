"""Egress: a trio stream to an MX from a chosen source IP, through kumoproxy or directly.

Specs: ``wire.md`` §1 (KumoMTA's SOCKS5 dialect: BIND the source, then
CONNECT), §2 (PROXY protocol v2 ingress), §3 (binding a source on Linux);
RFC 1928 (SOCKS5), RFC 1929 (username/password).

One :func:`open_egress` call, by :class:`EgressPath`::

    destination family != source family ─────────────> DestinationError (no I/O)

    socks5: TCP connect to the proxy ──────────fails──> ProxyUnreachableError
              [TLS handshake] ─────────────────fails──> ProxyUnreachableError
            ONE write: greeting(NO_AUTH | USERNAME_PASSWORD) [+ credentials]
                       + BIND <source>:0 + CONNECT <mx>:<port>
            read the answers in order:
              method selection  05 ff ─────────────────> ProxyAuthError
              auth result       01 01 ─────────────────> ProxyAuthError
              BIND reply        REP != 0 ──────────────> SourceRefusedError(reply=REP)
              CONNECT reply     REP != 0 ──────────────> DestinationError(reply=REP)
              EOF / reset / garbage before the end ────> ProxyUnreachableError
              CONNECT 00 ─> stream (banner bytes that came with the reply put back
                            in front), local = BND of the CONNECT reply

    proxy:  TCP connect to the proxy ──────────fails──> ProxyUnreachableError
            write the v2 header (source:0 -> mx:port) ─> stream at once,
            local = (source, 0). There is no reply channel: a refusal is an
            EOF before the banner, which the SMTP layer reports.

    direct: socket, IP_BIND_ADDRESS_NO_PORT, bind(source, 0)
              EADDRNOTAVAIL ───────────────────────────> SourceRefusedError(reply=1)
            connect(mx, port)
              ECONNREFUSED 5, ENETUNREACH 3, EHOSTUNREACH 4, ETIMEDOUT 6,
              anything else 1 ─────────────────────────> DestinationError(reply=…)
            local = getsockname()

A CONNECT answered REP 02 ("not allowed by ruleset") is reported as
:class:`~mta_client.errors.DestinationError` even though kumoproxy's ruleset
may be refusing this source for that destination rather than the destination
itself: the reply does not say which, and kumod reads it the same way.

There are no timeout parameters: callers bound each attempt with
``trio.fail_after`` / ``trio.move_on_after``. Every socket opened here is
closed again on any error and on cancellation.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final, Literal, assert_never

import trio

from kumoproxy.errors import RemoteProtocolError as ProxyProtocolViolation
from kumoproxy.proto import proxy_protocol, socks5
from kumoproxy.proto.common import format_endpoint
from mta_client.errors import (
    DestinationError,
    ProxyUnreachableError,
    SourceRefusedError,
)
from mta_client.errors import ProxyAuthError as ProxyAuthError

__all__ = [
    "EgressConnection",
    "EgressPath",
    "ProxyAuthError",
    "ProxyTls",
    "open_egress",
]

IPAddress = IPv4Address | IPv6Address

#: linux/in.h: defer the port choice from bind() to connect(), so one source
#: IP is capped per (src, dst, dport) rather than at ~28k ports in total
#: (wire.md §3).
IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

#: Read size while negotiating. Every SOCKS5 answer is at most
#: ``socks5.MAX_REPLY`` bytes, and the pipelined answers with a typical banner
#: fit well within one read. A larger read would only move more SMTP bytes
#: into the prefix we hand back; the machine's buffer stays bounded because
#: each parser decides within ``MAX_REPLY`` bytes.
_HANDSHAKE_READ: Final = 4096

#: RFC 1928 §6 reply codes by connect() errno, as kumoproxy answers them
#: (wire.md §1), so a direct attempt fails with the code a proxied one would.
_REPLY_BY_ERRNO: Final = {
    errno.ENETUNREACH: socks5.Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: socks5.Reply.HOST_UNREACHABLE,
    errno.ECONNREFUSED: socks5.Reply.CONNECTION_REFUSED,
    errno.ETIMEDOUT: socks5.Reply.TTL_EXPIRED,
}

_PROTOCOLS: Final = ("socks5", "proxy")


@dataclass(frozen=True, slots=True)
class ProxyTls:
    """TLS to the proxy itself (kumoproxy socks5 listeners with ``tls``).

    ``context`` is a client context (``ssl.create_default_context()`` plus the
    proxy's CA and, for mutual TLS, our certificate). ``server_hostname`` is
    what the certificate is checked against and sent as SNI; ``None`` means
    the proxy host exactly as written in :attr:`EgressPath.proxy`.
    """

    context: ssl.SSLContext
    server_hostname: str | None = None


@dataclass(frozen=True, slots=True)
class EgressPath:
    """How to reach destinations from one source IP.

    ``proxy=None`` connects directly, binding ``source`` on this host.
    Otherwise ``proxy`` is the kumoproxy listener's (host, port) and
    ``protocol`` how to speak to it: ``"socks5"`` (KumoMTA's BIND-then-CONNECT
    dialect, optionally with RFC 1929 credentials and TLS) or ``"proxy"``
    (a PROXY protocol v2 header). Inconsistent combinations raise ValueError.
    """

    source: IPAddress
    proxy: tuple[str, int] | None = None
    protocol: Literal["socks5", "proxy"] = "socks5"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ProxyTls | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, IPv4Address | IPv6Address):
            raise TypeError(f"source must be an IPv4Address or IPv6Address, not {self.source!r}")
        if isinstance(self.source, IPv6Address) and self.source.ipv4_mapped is not None:
            raise ValueError(
                f"source {self.source} is IPv4-mapped; use {self.source.ipv4_mapped} instead"
            )
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"protocol must be 'socks5' or 'proxy', not {self.protocol!r}")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together (RFC 1929)")
        socks5_only = self.username is not None or self.tls is not None
        if socks5_only and (self.proxy is None or self.protocol != "socks5"):
            raise ValueError("credentials and tls apply to a socks5 proxy only")
        for name, value in (("username", self.username), ("password", self.password)):
            if value is not None and not 1 <= len(value.encode()) <= 255:
                raise ValueError(f"{name} must be 1..255 bytes in UTF-8 (RFC 1929)")


@dataclass(frozen=True, slots=True)
class EgressConnection:
    """An open path to the destination, ready for SMTP.

    ``stream`` starts with the server's banner: bytes that arrived together
    with the proxy's CONNECT reply are served first. ``local`` is the source
    ip:port the destination sees (for the PROXY protocol only the ip is known,
    and the port is 0). Closing ``stream`` is the caller's job.
    """

    stream: trio.abc.Stream
    local: tuple[IPAddress, int]
    path: EgressPath


async def open_egress(path: EgressPath, destination: tuple[IPAddress, int]) -> EgressConnection:
    """Open a stream to ``destination`` from ``path.source``; see the module docstring.

    Raises :class:`ProxyUnreachableError`, :class:`ProxyAuthError`,
    :class:`SourceRefusedError` or :class:`DestinationError` (all
    :class:`EgressError`, hence ``OSError``). Bound it with ``trio.fail_after``.
    """
    _check_destination(path.source, destination)
    stream: trio.abc.Stream
    if path.proxy is None:
        stream, local = await _open_direct(path.source, destination)
        return EgressConnection(stream, local, path)
    match path.protocol:
        case "socks5":
            stream, local = await _open_socks5(path, path.proxy, destination)
        case "proxy":
            stream, local = await _open_proxy_protocol(path, path.proxy, destination)
        case _:
            assert_never(path.protocol)
    return EgressConnection(stream, local, path)


def _check_destination(source: IPAddress, destination: tuple[IPAddress, int]) -> None:
    """Refuse, without I/O, a destination no path from ``source`` can reach."""
    address, port = destination
    if address.version != source.version:
        raise DestinationError(
            f"destination {address} is IPv{address.version} but source {source} is "
            f"IPv{source.version}: the address family must match"
        )
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        raise DestinationError(f"destination {address} is IPv4-mapped: wrong address family")
    if not 1 <= port <= 0xFFFF:
        raise DestinationError(f"destination port {port} is not in 1..65535")


def _os_reason(exc: OSError) -> str:
    """The most specific text for a connect failure (trio wraps one per attempt)."""
    cause = exc.__cause__
    if isinstance(cause, ExceptionGroup) and len(cause.exceptions) == 1:
        inner = cause.exceptions[0]
        if isinstance(inner, OSError):
            return inner.strerror or str(inner)
    return exc.strerror or str(exc)


# ---------------------------------------------------------------------------
# Direct: bind the source on this host (wire.md §3)
# ---------------------------------------------------------------------------


async def _open_direct(
    source: IPAddress, destination: tuple[IPAddress, int]
) -> tuple[trio.SocketStream, tuple[IPAddress, int]]:
    # Created by hand, not with trio.open_tcp_stream(local_address=...), which
    # hides the errno that tells "source not plumbed" from "ports exhausted".
    host, port = destination
    family = socket.AF_INET if source.version == 4 else socket.AF_INET6
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            await sock.bind((str(source), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise SourceRefusedError(
                    f"source {source} not plumbed on this host (bind: EADDRNOTAVAIL)",
                    reply=socks5.Reply.GENERAL_FAILURE,
                ) from exc
            raise SourceRefusedError(
                f"cannot bind source {source}: {exc.strerror or exc}",
                reply=socks5.Reply.GENERAL_FAILURE,
            ) from exc
        try:
            await sock.connect((str(host), port))
        except OSError as exc:
            where = f"{source} -> {format_endpoint(host, port)}"
            if exc.errno == errno.EADDRNOTAVAIL:
                # Bind deferred the port to connect (IP_BIND_ADDRESS_NO_PORT): here
                # EADDRNOTAVAIL means every local port to this (dst, dport) is taken.
                # kumoproxy answers the same condition REP 01 at CONNECT.
                raise DestinationError(
                    f"no free local port for {where} (connect: EADDRNOTAVAIL)",
                    reply=socks5.Reply.GENERAL_FAILURE,
                ) from exc
            reply = _REPLY_BY_ERRNO.get(exc.errno or 0, socks5.Reply.GENERAL_FAILURE)
            raise DestinationError(
                f"connect {where} failed: {exc.strerror or exc}", reply=reply
            ) from exc
        local_host, local_port = sock.getsockname()[:2]
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock), (ip_address(local_host), local_port)


# ---------------------------------------------------------------------------
# Through kumoproxy
# ---------------------------------------------------------------------------


async def _connect_proxy(proxy: tuple[str, int], tls: ProxyTls | None) -> trio.abc.Stream:
    """TCP (and TLS) to the proxy; any failure is ProxyUnreachableError."""
    host, port = proxy
    try:
        raw = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ProxyUnreachableError(
            f"cannot connect to proxy {format_endpoint(host, port)}: {_os_reason(exc)}"
        ) from exc
    if tls is None:
        return raw
    stream: trio.abc.Stream = raw
    try:
        stream = trio.SSLStream(raw, tls.context, server_hostname=tls.server_hostname or host)
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        reason = exc.__cause__ or exc
        raise ProxyUnreachableError(
            f"TLS handshake with proxy {format_endpoint(host, port)} failed: {reason}"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _open_socks5(
    path: EgressPath, proxy: tuple[str, int], destination: tuple[IPAddress, int]
) -> tuple[trio.abc.Stream, tuple[IPAddress, int]]:
    stream = await _connect_proxy(proxy, path.tls)
    try:
        bound, early = await _negotiate_socks5(stream, path, proxy, destination)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    if early:
        return _PrefixedStream(stream, early), bound
    return stream, bound


def _socks5_pipeline(
    path: EgressPath, destination: tuple[IPAddress, int]
) -> tuple[socks5.Socks5Client, bytes]:
    """The whole negotiation as one write (wire.md §1: a client may pipeline).

    Offering a single method is what makes pipelining legal: the credentials
    and requests do not depend on an answer we have not seen.
    """
    client = socks5.Socks5Client()
    if path.username is not None and path.password is not None:
        data = client.send(socks5.Greeting((socks5.Method.USERNAME_PASSWORD,)))
        data += client.send(socks5.Credentials(path.username.encode(), path.password.encode()))
    else:
        data = client.send(socks5.Greeting((socks5.Method.NO_AUTH,)))
    data += client.send(socks5.Request(socks5.Command.BIND, socks5.Endpoint(path.source, 0)))
    data += client.send(socks5.Request(socks5.Command.CONNECT, socks5.Endpoint(*destination)))
    return client, data


async def _negotiate_socks5(
    stream: trio.abc.Stream,
    path: EgressPath,
    proxy: tuple[str, int],
    destination: tuple[IPAddress, int],
) -> tuple[tuple[IPAddress, int], bytes]:
    """Send the pipeline, read the answers in order; returns (BND, early bytes)."""
    where = f"proxy {format_endpoint(*proxy)}"
    route = f"{path.source} -> {format_endpoint(*destination)}"
    client, data = _socks5_pipeline(path, destination)
    bind_answered = False
    eof = False
    try:
        await stream.send_all(data)
        while True:
            try:
                event = client.next_event()
            except ProxyProtocolViolation as exc:
                if eof:
                    raise ProxyUnreachableError(
                        f"{where} closed the connection during the handshake ({exc})"
                    ) from exc
                raise ProxyUnreachableError(f"{where} broke the SOCKS5 protocol: {exc}") from exc
            match event:
                case socks5.NeedData():
                    chunk = await stream.receive_some(_HANDSHAKE_READ)
                    eof = not chunk
                    client.receive_data(bytes(chunk))
                case socks5.MethodSelection(method=socks5.Method.NO_ACCEPTABLE):
                    wanted = "credentials" if path.username is None else "other credentials"
                    raise ProxyAuthError(f"{where} refused the method offered: it wants {wanted}")
                case socks5.MethodSelection():
                    pass
                case socks5.AuthResult(success=False):
                    raise ProxyAuthError(f"{where} refused the credentials of {path.username!r}")
                case socks5.AuthResult():
                    pass
                case socks5.ReplyEvent(reply=reply) if not bind_answered:
                    bind_answered = True
                    if reply is not socks5.Reply.SUCCEEDED:
                        # kumod reads any non-zero REP to BIND as "source not
                        # plumbed on the proxy" (wire.md §1).
                        raise SourceRefusedError(
                            f"{where} refused source {path.source}: BIND answered "
                            f"REP {reply:02x} ({reply.name})",
                            reply=reply,
                        )
                case socks5.ReplyEvent(reply=reply, bound=bound):
                    if reply is not socks5.Reply.SUCCEEDED:
                        raise DestinationError(
                            f"{where} could not connect {route}: CONNECT answered "
                            f"REP {reply:02x} ({reply.name})",
                            reply=reply,
                        )
                    return _bound_address(bound, where), client.trailing_data
                case _:
                    assert_never(event)
    except trio.BrokenResourceError as exc:
        raise ProxyUnreachableError(
            f"connection to {where} lost during the handshake: {exc.__cause__ or exc}"
        ) from exc


def _bound_address(bound: socks5.Endpoint, where: str) -> tuple[IPAddress, int]:
    """BND of the CONNECT reply: the source ip:port the destination sees."""
    host = bound.host
    if isinstance(host, str):
        raise ProxyUnreachableError(
            f"{where} broke the SOCKS5 protocol: BND is a name ({host!r}), not an address"
        )
    if isinstance(host, IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped  # a dual-stack socket's spelling of an IPv4 source
    return host, bound.port


async def _open_proxy_protocol(
    path: EgressPath, proxy: tuple[str, int], destination: tuple[IPAddress, int]
) -> tuple[trio.abc.Stream, tuple[IPAddress, int]]:
    family = proxy_protocol.Family.INET if path.source.version == 4 else proxy_protocol.Family.INET6
    header = proxy_protocol.encode_v2(
        proxy_protocol.ProxyHeader(
            version=2,
            command=proxy_protocol.Command.PROXY,
            family=family,
            transport=proxy_protocol.Transport.STREAM,
            # wire.md §2: source port 0, the proxy's kernel picks it at connect.
            source=(path.source, 0),
            destination=destination,
        )
    )
    stream = await _connect_proxy(proxy, None)
    try:
        await stream.send_all(header)
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        raise ProxyUnreachableError(
            f"connection to proxy {format_endpoint(*proxy)} lost sending the PROXY header: "
            f"{exc.__cause__ or exc}"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, (path.source, 0)


class _PrefixedStream(trio.abc.Stream):
    """A stream that first serves ``prefix``: server bytes read during the handshake.

    The proxy may send the CONNECT reply and the MX banner in one segment; the
    banner's bytes end up in the SOCKS5 machine's ``trailing_data`` and must
    not be lost.
    """

    def __init__(self, transport: trio.abc.Stream, prefix: bytes) -> None:
        self.transport = transport
        self._prefix = prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._prefix:
            return await self.transport.receive_some(max_bytes)
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await trio.lowlevel.checkpoint()
        size = len(self._prefix) if max_bytes is None else max_bytes
        chunk, self._prefix = self._prefix[:size], self._prefix[size:]
        return chunk

    async def aclose(self) -> None:
        self._prefix = b""
        await self.transport.aclose()
