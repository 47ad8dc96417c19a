"""Tests for kumoproxy.egress: source binding, connect errors, resolving.

Only loopback traffic. 203.0.113.0/24 (TEST-NET-3) is used as a source that
must fail to bind; nothing ever connects to it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import AsyncIterator
from typing import NoReturn

import pytest
import trio

from kumoproxy.egress import (
    IP_BIND_ADDRESS_NO_PORT,
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    BoundSocket,
    bind_source,
    connect,
    probe_source,
    system_resolver,
    unbound_socket,
)
from kumoproxy.errors import (
    ConnectFailedError,
    EgressError,
    ResolveError,
    SourceNotPlumbedError,
)

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

LOOPBACK = IPv4("127.0.0.1")
NOT_PLUMBED = IPv4("203.0.113.77")


@pytest.fixture
async def listener() -> AsyncIterator[trio.SocketListener]:
    [sock_listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with sock_listener:
        yield sock_listener


def port_of(listener: trio.SocketListener) -> int:
    port = listener.socket.getsockname()[1]
    assert isinstance(port, int)
    return port


# ---------------------------------------------------------------------------
# bind_source / probe_source
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", [IPv4("127.0.0.2"), IPv6("::1")])
async def test_bind_source_binds_the_address_and_defers_the_port(
    source: IPv4 | IPv6,
) -> None:
    bound = await bind_source(source)
    try:
        assert isinstance(bound, BoundSocket)
        assert bound.source == source
        # IP_BIND_ADDRESS_NO_PORT: bind() takes no port; connect() will pick one.
        assert bound.local == (source, 0)
        assert bound.sock.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
    finally:
        bound.close()
    assert bound.sock.fileno() == -1


async def test_bind_source_not_on_this_host_fails_at_once_with_eaddrnotavail() -> None:
    with trio.fail_after(1), pytest.raises(SourceNotPlumbedError) as info:
        await bind_source(NOT_PLUMBED)
    error = info.value
    assert error.errno == errno.EADDRNOTAVAIL
    assert error.result == "bind_failed"
    assert error.reply == 1
    assert isinstance(error, OSError)
    assert "203.0.113.77" in str(error)
    assert "not plumbed" in str(error)


def test_probe_source_on_this_host_is_ok() -> None:
    assert probe_source(IPv4("127.0.0.3")) is None
    assert probe_source(IPv6("::1")) is None


def test_probe_source_not_on_this_host_says_not_plumbed() -> None:
    reason = probe_source(NOT_PLUMBED)
    assert reason is not None
    assert "not plumbed" in reason


# ---------------------------------------------------------------------------
# connect
# ---------------------------------------------------------------------------


async def test_connect_from_bound_source_is_seen_by_the_peer_as_that_source(
    listener: trio.SocketListener,
) -> None:
    bound = await bind_source(IPv4("127.0.0.2"))
    stream = await connect(bound.sock, (LOOPBACK, port_of(listener)))
    async with stream:
        server = await listener.accept()
        async with server:
            peer_host, peer_port = server.socket.getpeername()[:2]
            assert peer_host == "127.0.0.2"
            assert peer_port != 0  # the port was chosen at connect()
            assert stream.socket.getsockname()[:2] == (peer_host, peer_port)
            await stream.send_all(b"EHLO x\r\n")
            assert await server.receive_some(100) == b"EHLO x\r\n"


async def test_connected_stream_has_bounded_tcp_keepalive(listener: trio.SocketListener) -> None:
    bound = await bind_source(IPv4("127.0.0.2"))
    stream = await connect(bound.sock, (LOOPBACK, port_of(listener)))
    async with stream:
        sock = stream.socket
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_COUNT


async def test_connect_with_unbound_socket_lets_the_kernel_choose(
    listener: trio.SocketListener,
) -> None:
    sock = unbound_socket(LOOPBACK)
    assert sock.family == socket.AF_INET
    stream = await connect(sock, (LOOPBACK, port_of(listener)))
    async with stream:
        server = await listener.accept()
        async with server:
            assert server.socket.getpeername()[0] == "127.0.0.1"


async def test_connect_to_closed_port_is_refused_with_reply_5_and_closes_the_socket() -> None:
    # A bound but not listening socket: the port stays ours, and connecting to it
    # is answered with RST (ECONNREFUSED), without racing anyone for a free port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        bound = await bind_source(IPv4("127.0.0.2"))
        with trio.fail_after(5), pytest.raises(ConnectFailedError) as info:
            await connect(bound.sock, (LOOPBACK, closed.getsockname()[1]))
    error = info.value
    assert error.errno == errno.ECONNREFUSED
    assert error.reply == 5
    assert error.result == "connect_failed"
    assert bound.sock.fileno() == -1


# ---------------------------------------------------------------------------
# system_resolver
# ---------------------------------------------------------------------------


async def test_system_resolver_resolves_localhost_within_the_family() -> None:
    assert await system_resolver("localhost", 25, socket.AF_INET) == [LOOPBACK]


class NoSuchHostResolver(trio.abc.HostnameResolver):
    """A resolver that knows no names, as the host's would for ``name.invalid``."""

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> NoReturn:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> NoReturn:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def test_system_resolver_turns_a_resolver_failure_into_resolve_error() -> None:
    # The real `name.invalid` (RFC 6761) is not tried: this host's nsswitch sends
    # it to a DNS server, i.e. off loopback. trio's resolver hook stands in for it.
    trio.socket.set_custom_hostname_resolver(NoSuchHostResolver())
    with pytest.raises(ResolveError) as info:
        await system_resolver("name.invalid", 25, socket.AF_INET)
    error = info.value
    assert isinstance(error, EgressError)
    assert error.errno == socket.EAI_NONAME
    assert error.reply == 4
    assert "name.invalid" in str(error)
