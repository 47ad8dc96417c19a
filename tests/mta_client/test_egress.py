"""open_egress over real loopback sockets: a real kumoproxy, a recording target, direct binds.

The wire shape of the SOCKS5 negotiation (one pipelined write, answers read
in order, banner bytes that ride with the CONNECT reply) is pinned against a
small fake proxy that records what it receives; everything else runs against
the in-process kumoproxy of ``tests.netkit`` (wire.md §1-§3).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Literal

import pytest
import trio
import trio.testing
import trustme

from kumoproxy.passwords import hash_password
from mta_client.egress import (
    EgressConnection,
    EgressPath,
    ProxyAuthError,
    ProxyTls,
    open_egress,
)
from mta_client.errors import (
    DestinationError,
    EgressError,
    ProxyUnreachableError,
    SourceRefusedError,
)
from tests.netkit import (
    RunningService,
    Target,
    make_config,
    read_to_eof,
    read_until,
    running_service,
    target_server,
)

IPAddress = IPv4Address | IPv6Address
SOURCE_2 = IPv4Address("127.0.0.2")
SOURCE_3 = IPv4Address("127.0.0.3")
UNPLUMBED = IPv4Address("203.0.113.77")  # in kumoproxy's sources, on no interface
PASSWORD = "pw"


def closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound once, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def endpoint(target: Target) -> tuple[IPAddress, int]:
    return target.address


async def banner_of(conn: EgressConnection) -> bytes:
    with trio.fail_after(5):
        return await read_until(conn.stream, b"\r\n")


# ---------------------------------------------------------------------------
# Through a real kumoproxy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", [SOURCE_2, SOURCE_3])
async def test_socks5_reaches_the_target_from_the_chosen_source(source: IPv4Address) -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        path = EgressPath(source, proxy=svc.address("socks5"))
        conn = await open_egress(path, endpoint(target))
        async with conn.stream:
            banner = await banner_of(conn)
            await conn.stream.send_all(b"EHLO x\r\nCLOSE\r\n")
            rest = await read_to_eof(conn.stream)
    seen = target.peers[0].address
    assert seen[0] == source
    assert conn.local == seen
    assert conn.path is path
    assert banner == f"HELLO {source} {seen[1]}\r\n".encode()
    assert rest == b"EHLO x\r\nCLOSE\r\nBYE 15\r\n"


async def test_socks5_over_ipv6_reaches_the_target_from_the_ipv6_source() -> None:
    source = IPv6Address("::1")
    async with running_service(make_config()) as svc, target_server("::1") as target:
        path = EgressPath(source, proxy=svc.address("socks5", 6))
        conn = await open_egress(path, endpoint(target))
        async with conn.stream:
            banner = await banner_of(conn)
    assert conn.local == target.peers[0].address
    assert banner == f"HELLO ::1 {conn.local[1]}\r\n".encode()


async def test_proxy_protocol_v2_reaches_the_target_from_the_source() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        path = EgressPath(SOURCE_3, proxy=svc.address("proxy"), protocol="proxy")
        conn = await open_egress(path, endpoint(target))
        async with conn.stream:
            banner = await banner_of(conn)
    assert target.peers[0].address[0] == SOURCE_3
    assert conn.local == (SOURCE_3, 0)  # the header has no reply: the port is unknown
    assert banner.startswith(b"HELLO 127.0.0.3 ")


async def test_proxy_protocol_with_an_unplumbed_source_ends_in_eof_before_any_banner() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        path = EgressPath(UNPLUMBED, proxy=svc.address("proxy"), protocol="proxy")
        conn = await open_egress(path, endpoint(target))
        async with conn.stream:
            received = await read_to_eof(conn.stream)
    assert received == b""
    assert target.peers == []


async def test_direct_binds_the_source_locally() -> None:
    async with target_server() as target:
        conn = await open_egress(EgressPath(SOURCE_3), endpoint(target))
        async with conn.stream:
            banner = await banner_of(conn)
    assert target.peers[0].address[0] == SOURCE_3
    assert conn.local == target.peers[0].address
    assert banner == f"HELLO 127.0.0.3 {conn.local[1]}\r\n".encode()


@asynccontextmanager
async def path_for(kind: str, source: IPAddress) -> AsyncIterator[EgressPath]:
    """An EgressPath of ``kind``: through a fresh kumoproxy, or direct."""
    if kind == "direct":
        yield EgressPath(source)
        return
    async with running_service(make_config()) as svc:
        yield EgressPath(source, proxy=svc.address("socks5"))


@pytest.mark.parametrize("kind", ["socks5", "direct"])
async def test_unplumbed_source_is_a_source_refusal_not_a_destination_error(kind: str) -> None:
    async with path_for(kind, UNPLUMBED) as path, target_server() as target:
        with pytest.raises(SourceRefusedError) as caught:
            await open_egress(path, endpoint(target))
    assert caught.value.reply == 1
    assert not isinstance(caught.value, DestinationError)
    assert target.peers == []
    if kind == "direct":
        assert "not plumbed on this host" in str(caught.value)


@pytest.mark.parametrize("kind", ["socks5", "direct"])
async def test_refused_destination_port_is_a_destination_error_with_reply_5(kind: str) -> None:
    async with path_for(kind, SOURCE_2) as path:
        with pytest.raises(DestinationError) as caught:
            await open_egress(path, (IPv4Address("127.0.0.1"), closed_port()))
    assert caught.value.reply == 5
    assert not isinstance(caught.value, SourceRefusedError)


async def test_failed_direct_attempts_leave_no_socket_open() -> None:
    before = open_fds()
    with pytest.raises(SourceRefusedError):
        await open_egress(EgressPath(UNPLUMBED), (IPv4Address("127.0.0.1"), 25))
    with pytest.raises(DestinationError):
        await open_egress(EgressPath(SOURCE_2), (IPv4Address("127.0.0.1"), closed_port()))
    assert open_fds() == before


@pytest.mark.parametrize("protocol", ["socks5", "proxy"])
async def test_proxy_not_listening_is_proxy_unreachable(
    protocol: Literal["socks5", "proxy"],
) -> None:
    path = EgressPath(SOURCE_2, proxy=("127.0.0.1", closed_port()), protocol=protocol)
    with pytest.raises(ProxyUnreachableError, match="cannot connect to proxy"):
        await open_egress(path, (IPv4Address("127.0.0.1"), 25))


async def test_family_mismatch_is_refused_without_any_io() -> None:
    async with fake_proxy(expect=1) as fake:
        path = EgressPath(SOURCE_2, proxy=fake.address)
        with pytest.raises(DestinationError, match="address family"):
            await open_egress(path, (IPv6Address("::1"), 25))
        with pytest.raises(DestinationError, match="address family"):
            await open_egress(EgressPath(IPv6Address("::1")), (IPv4Address("127.0.0.1"), 25))
    assert fake.connections == 0


# --- RFC 1929 credentials --------------------------------------------------


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD.encode(), log2_n=10)


@asynccontextmanager
async def auth_service(password_hash: str) -> AsyncIterator[RunningService]:
    extra = f"""
        auth:
          required: true
          users:
            - name: mta1
              password_hash: "{password_hash}"
        """
    async with running_service(make_config(extra)) as svc:
        yield svc


async def test_right_credentials_reach_the_target(password_hash: str) -> None:
    async with auth_service(password_hash) as svc, target_server() as target:
        path = EgressPath(SOURCE_3, proxy=svc.address("socks5"), username="mta1", password=PASSWORD)
        conn = await open_egress(path, endpoint(target))
        async with conn.stream:
            banner = await banner_of(conn)
    assert conn.local == target.peers[0].address
    assert conn.local[0] == SOURCE_3
    assert banner.startswith(b"HELLO 127.0.0.3 ")


@pytest.mark.parametrize(
    ("username", "password"), [("mta1", "wrong"), ("nobody", PASSWORD), (None, None)]
)
async def test_wrong_or_missing_credentials_raise_proxy_auth_error(
    password_hash: str, username: str | None, password: str | None
) -> None:
    async with auth_service(password_hash) as svc, target_server() as target:
        path = EgressPath(
            SOURCE_2, proxy=svc.address("socks5"), username=username, password=password
        )
        with pytest.raises(ProxyAuthError):
            await open_egress(path, endpoint(target))
    assert target.peers == []


# --- TLS to the proxy --------------------------------------------------------


@dataclass
class TlsProxy:
    ca: trustme.CA
    config_yaml: str

    def context(self, *, trusted: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if trusted:
            self.ca.configure_trust(context)
        return context


@pytest.fixture
def tls_proxy(tmp_path: Path) -> TlsProxy:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    server.private_key_and_cert_chain_pem.write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    return TlsProxy(
        ca,
        f"""
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
    tls:
      certificate: {cert}
      private_key: {key}
sources: [127.0.0.2]
clients:
  allow: [127.0.0.0/8]
destinations:
  ports: any
  allow: [127.0.0.0/8]
""",
    )


@pytest.mark.parametrize("server_hostname", [None, "localhost"])
async def test_socks5_over_tls_reaches_the_target(
    tls_proxy: TlsProxy, server_hostname: str | None
) -> None:
    config = make_config(base=tls_proxy.config_yaml)
    async with running_service(config) as svc, target_server() as target:
        tls = ProxyTls(tls_proxy.context(), server_hostname=server_hostname)
        path = EgressPath(SOURCE_2, proxy=svc.address("socks5"), tls=tls)
        conn = await open_egress(path, endpoint(target))
        async with conn.stream:
            assert isinstance(conn.stream, trio.SSLStream)
            banner = await banner_of(conn)
            await conn.stream.send_all(b"CLOSE\r\n")
            rest = await read_to_eof(conn.stream)
    assert conn.local == target.peers[0].address
    assert banner == f"HELLO 127.0.0.2 {conn.local[1]}\r\n".encode()
    assert rest == b"CLOSE\r\nBYE 7\r\n"


async def test_untrusted_proxy_certificate_is_proxy_unreachable(tls_proxy: TlsProxy) -> None:
    config = make_config(base=tls_proxy.config_yaml)
    async with running_service(config) as svc, target_server() as target:
        tls = ProxyTls(tls_proxy.context(trusted=False))
        path = EgressPath(SOURCE_2, proxy=svc.address("socks5"), tls=tls)
        with pytest.raises(ProxyUnreachableError, match="TLS handshake"):
            await open_egress(path, endpoint(target))
    assert target.peers == []


# ---------------------------------------------------------------------------
# Wire shape, against a fake proxy that records what it receives
# ---------------------------------------------------------------------------

BANNER = b"220 mx.example.test ESMTP\r\n"
# 05 00: NO_AUTH; 05 00 00 01 127.0.0.2:0 to BIND; 05 00 00 01 127.0.0.2:4242 to CONNECT.
SUCCESS_NO_AUTH = bytes.fromhex("0500 05000001 7f000002 0000 05000001 7f000002 1092")
DESTINATION = (IPv4Address("127.0.0.1"), 2525)
# wire.md §1, pipelined: greeting 05 01 00, BIND 127.0.0.2:0, CONNECT 127.0.0.1:2525.
PIPELINE_NO_AUTH = bytes.fromhex("050100 05020001 7f000002 0000 05010001 7f000001 09dd")
# greeting 05 01 02 (USERNAME_PASSWORD only), then 01 04 "mta1" 02 "pw" (RFC 1929).
PIPELINE_AUTH = bytes.fromhex(
    "050102 0104 6d746131 02 7077 05020001 7f000002 0000 05010001 7f000001 09dd"
)


@dataclass
class FakeProxy:
    """Receives until ``expect`` bytes, answers ``answer`` in one write, then maybe closes."""

    address: tuple[str, int]
    segments: list[bytes] = field(default_factory=list)
    connections: int = 0
    received_all: trio.Event = field(default_factory=trio.Event)
    client_closed: trio.Event = field(default_factory=trio.Event)


@asynccontextmanager
async def fake_proxy(
    *, expect: int, answer: bytes | None = None, close: bool = False
) -> AsyncIterator[FakeProxy]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    fake = FakeProxy(("127.0.0.1", listeners[0].socket.getsockname()[1]))

    async def handle(stream: trio.SocketStream) -> None:
        fake.connections += 1
        async with stream:
            try:
                while sum(map(len, fake.segments)) < expect:
                    data = await stream.receive_some(65536)
                    if not data:
                        fake.client_closed.set()
                        return
                    fake.segments.append(bytes(data))
                fake.received_all.set()
                if answer is not None:
                    await stream.send_all(answer)
                if close:
                    return
                await read_to_eof(stream)
            except trio.BrokenResourceError:
                pass
            fake.client_closed.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        yield fake
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("username", "password", "expected", "answer"),
    [
        (None, None, PIPELINE_NO_AUTH, SUCCESS_NO_AUTH),
        ("mta1", "pw", PIPELINE_AUTH, bytes.fromhex("0502 0100") + SUCCESS_NO_AUTH[2:]),
    ],
    ids=["no-auth", "username-password"],
)
async def test_whole_negotiation_is_one_write_and_the_banner_with_the_reply_is_kept(
    username: str | None, password: str | None, expected: bytes, answer: bytes
) -> None:
    # The fake answers nothing until it has every byte: a client that waited
    # for the method selection before sending BIND would hang here.
    async with fake_proxy(expect=len(expected), answer=answer + BANNER) as fake:
        path = EgressPath(SOURCE_2, proxy=fake.address, username=username, password=password)
        with trio.fail_after(5):
            conn = await open_egress(path, DESTINATION)
            async with conn.stream:
                first = bytes(await conn.stream.receive_some(3))
                rest = await read_until(conn.stream, b"\r\n", first)
    assert fake.segments == [expected]
    assert conn.local == (SOURCE_2, 4242)  # BND of the CONNECT reply, not of the BIND reply
    assert first == BANNER[:3]
    assert rest == BANNER


async def test_stream_after_close_does_not_serve_the_kept_banner() -> None:
    async with fake_proxy(expect=len(PIPELINE_NO_AUTH), answer=SUCCESS_NO_AUTH + BANNER) as fake:
        conn = await open_egress(EgressPath(SOURCE_2, proxy=fake.address), DESTINATION)
        await conn.stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await conn.stream.receive_some()


@pytest.mark.parametrize(
    ("answer", "error", "reply"),
    [
        (bytes.fromhex("05ff"), ProxyAuthError, None),
        (bytes.fromhex("0500 05020001 00000000 0000"), SourceRefusedError, 2),
        (bytes.fromhex("0500 05040001 00000000 0000"), SourceRefusedError, 4),
        (
            bytes.fromhex("0500 05000001 7f000002 0000 05020001 00000000 0000"),
            DestinationError,
            2,  # "not allowed": could be about the source, but REP cannot say so
        ),
        (
            bytes.fromhex("0500 05000001 7f000002 0000 05060001 00000000 0000"),
            DestinationError,
            6,
        ),
    ],
    ids=["method-refused", "bind-rep-02", "bind-rep-04", "connect-rep-02", "connect-rep-06"],
)
async def test_refusals_map_to_the_error_of_the_step_refused(
    answer: bytes, error: type[EgressError], reply: int | None
) -> None:
    async with fake_proxy(expect=len(PIPELINE_NO_AUTH), answer=answer, close=True) as fake:
        with pytest.raises(error) as caught:
            await open_egress(EgressPath(SOURCE_2, proxy=fake.address), DESTINATION)
    assert getattr(caught.value, "reply", None) == reply


@pytest.mark.parametrize(
    "answer",
    [
        b"",  # closed before saying anything
        bytes.fromhex("0500"),  # method chosen, then gone
        bytes.fromhex("0500 05000001 7f00"),  # BIND reply cut short
    ],
    ids=["silent", "after-method", "mid-bind-reply"],
)
async def test_proxy_closing_mid_handshake_is_proxy_unreachable(answer: bytes) -> None:
    async with fake_proxy(expect=len(PIPELINE_NO_AUTH), answer=answer, close=True) as fake:
        with pytest.raises(
            ProxyUnreachableError, match="closed the connection during the handshake"
        ):
            await open_egress(EgressPath(SOURCE_2, proxy=fake.address), DESTINATION)


async def test_proxy_speaking_something_else_is_proxy_unreachable() -> None:
    answer = b"220 this is an SMTP server, not a proxy\r\n"
    async with fake_proxy(expect=len(PIPELINE_NO_AUTH), answer=answer) as fake:
        with pytest.raises(ProxyUnreachableError, match="broke the SOCKS5 protocol"):
            await open_egress(EgressPath(SOURCE_2, proxy=fake.address), DESTINATION)
        with trio.fail_after(5):
            await fake.client_closed.wait()


async def test_proxy_protocol_sends_the_v2_header_as_the_first_bytes() -> None:
    # wire.md §2: kumod's exact form, source port 0, destination = the MX.
    expected = bytes.fromhex("0d0a0d0a000d0a515549540a 21 11 000c 7f000003 7f000001 0000 09dd")
    async with fake_proxy(expect=len(expected)) as fake:
        path = EgressPath(SOURCE_3, proxy=fake.address, protocol="proxy")
        conn = await open_egress(path, DESTINATION)
        with trio.fail_after(5):
            await fake.received_all.wait()
        await conn.stream.aclose()
    assert b"".join(fake.segments) == expected
    assert conn.local == (SOURCE_3, 0)


# ---------------------------------------------------------------------------
# Cancellation closes every socket
# ---------------------------------------------------------------------------


@contextmanager
def full_backlog() -> Iterator[tuple[str, int]]:
    """A listener whose accept queue is full: the next SYN is dropped, connect() hangs.

    Linux drops a SYN when the queue is full (tcp_abort_on_overflow = 0), so
    the connect is pending for seconds without any non-loopback traffic.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address: tuple[str, int] = listener.getsockname()
        with socket.create_connection(address):  # takes the one slot of backlog 0
            yield address


async def cancel_when_blocked(path: EgressPath, destination: tuple[IPAddress, int]) -> None:
    """Start open_egress, cancel it once it is blocked on the network."""
    before = open_fds()
    outcome: list[EgressConnection] = []

    async def attempt() -> None:
        outcome.append(await open_egress(path, destination))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempt)
        await trio.testing.wait_all_tasks_blocked()
        assert open_fds() == before + 1  # mid-connect: its socket exists
        nursery.cancel_scope.cancel()
    assert outcome == []
    assert open_fds() == before


async def test_cancelling_the_tcp_connect_to_the_proxy_closes_the_socket() -> None:
    with full_backlog() as address:
        await cancel_when_blocked(EgressPath(SOURCE_2, proxy=address), DESTINATION)


async def test_cancelling_a_direct_connect_closes_the_socket() -> None:
    with full_backlog() as (host, port):
        await cancel_when_blocked(EgressPath(SOURCE_2), (ip_address(host), port))


async def test_cancelling_while_waiting_for_the_proxy_closes_the_connection() -> None:
    async with fake_proxy(expect=len(PIPELINE_NO_AUTH)) as fake:  # never answers
        before = open_fds()
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    open_egress, EgressPath(SOURCE_2, proxy=fake.address), DESTINATION
                )
                await fake.received_all.wait()
                nursery.cancel_scope.cancel()
            await fake.client_closed.wait()  # the proxy sees our side close
        assert not scope.cancelled_caught
        assert open_fds() == before


# ---------------------------------------------------------------------------
# EgressPath validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"username": "mta1"},  # password missing
        {"proxy": ("127.0.0.1", 1080), "username": "", "password": "pw"},
        {"proxy": ("127.0.0.1", 1080), "username": "u" * 256, "password": "pw"},
        {"username": "mta1", "password": "pw"},  # direct: no proxy to log in to
        {"proxy": ("127.0.0.1", 1080), "protocol": "proxy", "username": "u", "password": "p"},
        {"proxy": ("127.0.0.1", 1080), "protocol": "http"},
    ],
)
def test_inconsistent_paths_are_refused_at_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"."):
        EgressPath(SOURCE_2, **kwargs)  # type: ignore[arg-type]


def test_password_stays_out_of_repr() -> None:
    path = EgressPath(SOURCE_2, proxy=("127.0.0.1", 1080), username="mta1", password="s3cret")
    assert "s3cret" not in repr(path)
