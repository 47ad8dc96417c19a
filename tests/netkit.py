"""Real-socket test kit: a recording target server, SOCKS5/PROXY clients, a running service.

Everything here talks over real loopback sockets. The SOCKS5 client side is
built on our own client codec (:class:`kumoproxy.proto.socks5.Socks5Client`),
whose wire format is pinned byte-for-byte in ``tests/proto``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from kumoproxy import egress
from kumoproxy.config import Config, IPAddress, parse_config
from kumoproxy.errors import ResolveError
from kumoproxy.proto import proxy_protocol, socks5
from kumoproxy.server import Bound, BoundListener, Service
from kumoproxy.session import SessionRecord

BASE_CONFIG = """
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
  - listen: "127.0.0.1:0"
    protocol: proxy
  - listen: "[::1]:0"
    protocol: socks5
admin:
  listen: "127.0.0.1:0"
sources: [127.0.0.2, 127.0.0.3, "::1", 203.0.113.77]
clients:
  allow: [127.0.0.0/8, "::1/128"]
destinations:
  ports: any
  allow: [127.0.0.0/8, "::1/128"]
"""


def make_config(extra: str = "", base: str = BASE_CONFIG) -> Config:
    """The test config plus ``extra`` YAML (top-level keys appended)."""
    return parse_config(base + textwrap.dedent(extra))


@dataclass
class Peer:
    """One connection as the target server saw it."""

    address: tuple[IPAddress, int]
    received: bytearray = field(default_factory=bytearray)
    eof: trio.Event = field(default_factory=trio.Event)


@dataclass
class Target:
    """A TCP server that greets with the peer it sees, echoes, and says bye at EOF.

    Protocol: on accept it sends ``b"HELLO <ip> <port>\\r\\n"``; every byte
    received is echoed back; at the client's EOF, or once it has received
    ``b"CLOSE\\r\\n"``, it sends ``b"BYE <n>\\r\\n"`` (``n`` = bytes
    received) and closes.
    """

    address: tuple[IPAddress, int]
    peers: list[Peer]
    connected: trio.Event

    @property
    def port(self) -> int:
        return self.address[1]


async def _serve_target(
    host: str, peers: list[Peer], *, task_status: trio.TaskStatus[Target]
) -> None:
    listeners = await trio.open_tcp_listeners(0, host=host)
    sockname = listeners[0].socket.getsockname()
    target = Target((ipaddress.ip_address(sockname[0]), sockname[1]), peers, trio.Event())

    async def handle(stream: trio.SocketStream) -> None:
        host_, port_ = stream.socket.getpeername()[:2]
        peer = Peer((ipaddress.ip_address(host_), port_))
        peers.append(peer)
        target.connected.set()
        async with stream:
            try:
                await stream.send_all(f"HELLO {host_} {port_}\r\n".encode())
                while data := await stream.receive_some(65536):
                    peer.received += data
                    await stream.send_all(data)
                    if peer.received.endswith(b"CLOSE\r\n"):
                        break
                else:
                    peer.eof.set()
                await stream.send_all(f"BYE {len(peer.received)}\r\n".encode())
            except trio.BrokenResourceError:
                pass

    task_status.started(target)
    await trio.serve_listeners(handle, listeners)


@asynccontextmanager
async def target_server(host: str = "127.0.0.1") -> AsyncIterator[Target]:
    async with trio.open_nursery() as nursery:
        target: Target = await nursery.start(_serve_target, host, [])
        yield target
        nursery.cancel_scope.cancel()


class SessionLog:
    """A session observer that keeps every record and lets tests wait for the next."""

    def __init__(self) -> None:
        self.records: list[SessionRecord] = []
        self._ended = trio.Event()
        self._read = 0

    def __call__(self, record: SessionRecord) -> None:
        self.records.append(record)
        self._ended.set()
        self._ended = trio.Event()

    async def next_record(self) -> SessionRecord:
        """The oldest record not yet returned, waiting for it if need be."""
        while len(self.records) <= self._read:
            await self._ended.wait()
        self._read += 1
        return self.records[self._read - 1]


@dataclass
class RunningService:
    service: Service
    bound: Bound
    log: SessionLog

    @property
    def listeners(self) -> list[BoundListener]:
        return self.bound.listeners

    @property
    def admin_address(self) -> tuple[str, int]:
        address = self.bound.admin_address
        assert address is not None, "this test config has no admin listener"
        return str(address[0]), address[1]

    def address(self, protocol: str, version: int = 4) -> tuple[str, int]:
        for b in self.listeners:
            host, port = b.address
            if b.config.protocol == protocol and host.version == version:
                return str(host), port
        raise LookupError(f"no {protocol} listener for IPv{version}")

    async def next_record(self) -> SessionRecord:
        return await self.log.next_record()


@asynccontextmanager
async def running_service(
    config: Config, *, resolver: egress.Resolver = egress.system_resolver
) -> AsyncIterator[RunningService]:
    log = SessionLog()
    service = Service(config, resolver=resolver, observers=(log,))
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(service.serve)
        yield RunningService(service, bound, log)
        nursery.cancel_scope.cancel()


async def connect(address: tuple[str, int]) -> trio.SocketStream:
    return await trio.open_tcp_stream(*address)


def socks5_bind_connect_bytes(
    source: IPAddress, destination: socks5.Endpoint, *, payload: bytes = b""
) -> tuple[socks5.Socks5Client, bytes]:
    """KumoMTA's whole negotiation as one pipelined write (wire.md §1)."""
    client = socks5.Socks5Client()
    data = client.send(socks5.Greeting((socks5.Method.NO_AUTH,)))
    data += client.send(socks5.Request(socks5.Command.BIND, socks5.Endpoint(source, 0)))
    data += client.send(socks5.Request(socks5.Command.CONNECT, destination))
    return client, data + payload


async def read_replies(
    stream: trio.abc.ReceiveStream, client: socks5.Socks5Client, count: int
) -> list[socks5.MethodSelection | socks5.AuthResult | socks5.ReplyEvent]:
    """Read until ``count`` server events (or EOF: then what arrived so far)."""
    events: list[socks5.MethodSelection | socks5.AuthResult | socks5.ReplyEvent] = []
    while len(events) < count:
        event = client.next_event()
        if isinstance(event, socks5.NeedData):
            data = await stream.receive_some(65536)
            if not data:
                return events
            client.receive_data(bytes(data))
            continue
        events.append(event)
        if client.state is socks5.ClientState.CLOSED:
            break
    return events


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes, prefix: bytes = b"") -> bytes:
    """Receive until ``marker`` appears (or EOF); returns everything read."""
    buffer = bytearray(prefix)
    while marker not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            break
        buffer += data
    return bytes(buffer)


async def read_to_eof(stream: trio.abc.ReceiveStream, prefix: bytes = b"") -> bytes:
    buffer = bytearray(prefix)
    while data := await stream.receive_some(65536):
        buffer += data
    return bytes(buffer)


def proxy_header(version: int, source: IPAddress, destination: tuple[IPAddress, int]) -> bytes:
    """The header KumoMTA's ha_proxy_* sends: source port 0, destination = the MX."""
    family = proxy_protocol.Family.INET if source.version == 4 else proxy_protocol.Family.INET6
    header = proxy_protocol.ProxyHeader(
        version=version,
        command=proxy_protocol.Command.PROXY,
        family=family,
        transport=proxy_protocol.Transport.STREAM,
        source=(source, 0),
        destination=destination,
    )
    if version == 1:
        return proxy_protocol.encode_v1(header)
    return proxy_protocol.encode_v2(header)


def static_resolver(table: dict[str, list[str]]) -> egress.Resolver:
    """A fake DNS: names map to addresses, filtered by the family asked for."""

    async def resolve(name: str, port: int, family: int) -> list[IPAddress]:
        await trio.lowlevel.checkpoint()
        if name not in table:
            raise ResolveError(f"cannot resolve {name}: not in the test table")
        wanted = {0: (4, 6), socket.AF_INET: (4,), socket.AF_INET6: (6,)}[family]
        return [a for a in map(ipaddress.ip_address, table[name]) if a.version in wanted]

    return resolve


async def peer_closed(stream: trio.abc.ReceiveStream, *, wait: float = 0.01) -> bool:
    """Has the peer closed? Reads (and discards) what is pending for up to ``wait``.

    EOF or a reset means closed; a read that would still block means open.
    """
    with trio.move_on_after(wait):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            return True
        return True
    return False


async def read_exactly(stream: trio.abc.ReceiveStream, size: int, prefix: bytes = b"") -> bytes:
    """Receive until ``size`` bytes (including ``prefix``) have arrived; EOF before is an error."""
    buffer = bytearray(prefix)
    while len(buffer) < size:
        data = await stream.receive_some(size - len(buffer))
        if not data:
            raise EOFError(f"EOF after {len(buffer)} of {size} bytes")
        buffer += data
    return bytes(buffer)


@dataclass
class HttpTarget:
    """An HTTP/1.0 server whose response body is the client address it saw."""

    port: int
    peers: list[IPAddress]


async def _serve_http(host: str, *, task_status: trio.TaskStatus[HttpTarget]) -> None:
    listeners = await trio.open_tcp_listeners(0, host=host)
    target = HttpTarget(listeners[0].socket.getsockname()[1], [])

    async def handle(stream: trio.SocketStream) -> None:
        peer = ipaddress.ip_address(stream.socket.getpeername()[0])
        target.peers.append(peer)
        async with stream:
            with trio.move_on_after(10):
                await read_until(stream, b"\r\n\r\n")
                body = str(peer).encode()
                head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(head + body)

    task_status.started(target)
    await trio.serve_listeners(handle, listeners)


@asynccontextmanager
async def http_server(host: str = "127.0.0.1") -> AsyncIterator[HttpTarget]:
    async with trio.open_nursery() as nursery:
        target: HttpTarget = await nursery.start(_serve_http, host)
        yield target
        nursery.cancel_scope.cancel()
