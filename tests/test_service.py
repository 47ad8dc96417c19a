"""The service over real loopback sockets: the target sees the source the client asked for.

Each test runs a real :class:`kumoproxy.server.Service` in-process on port 0
and a real target server, both on loopback. Tests that involve deadlines use
``autojump_clock``: loopback I/O completes at once, so virtual time only
advances while everything waits for a deadline.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
from pathlib import Path

import pytest
import trio

from kumoproxy.proto import socks5
from kumoproxy.session import Outcome
from tests.netkit import (
    connect,
    make_config,
    peer_closed,
    proxy_header,
    read_exactly,
    read_replies,
    read_to_eof,
    read_until,
    running_service,
    socks5_bind_connect_bytes,
    static_resolver,
    target_server,
)

IP = ipaddress.ip_address


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.3"])
async def test_bind_then_connect_leaves_from_the_requested_source(source: str) -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP(source), socks5.Endpoint(target.address[0], target.port)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            method, bind_reply, connect_reply = await read_replies(stream, client, 3)
            banner = await read_until(stream, b"\r\n", client.trailing_data)
        record = await svc.next_record()

    assert method == socks5.MethodSelection(socks5.Method.NO_AUTH)
    assert isinstance(bind_reply, socks5.ReplyEvent)
    assert bind_reply.reply is socks5.Reply.SUCCEEDED
    assert bind_reply.bound.host == IP(source)
    seen_ip, seen_port = target.peers[0].address
    assert seen_ip == IP(source)
    # The CONNECT reply carries the real local address: what the target saw.
    assert isinstance(connect_reply, socks5.ReplyEvent)
    assert connect_reply.bound == socks5.Endpoint(seen_ip, seen_port)
    assert banner == f"HELLO {source} {seen_port}\r\n".encode()
    assert record.outcome is Outcome.OK
    assert record.source == f"{source}:{seen_port}"


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.3"])
async def test_proxy_header_source_is_the_egress_ip(version: int, source: str) -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        async with await connect(svc.address("proxy")) as stream:
            header = proxy_header(version, IP(source), (target.address[0], target.port))
            await stream.send_all(header + b"EHLO x\r\n")
            banner = await read_until(stream, b"EHLO x\r\n")
        record = await svc.next_record()
    assert target.peers[0].address[0] == IP(source)
    assert banner.startswith(f"HELLO {source} ".encode())
    assert banner.endswith(b"EHLO x\r\n")  # bytes after the header were relayed
    assert record.outcome is Outcome.OK
    assert record.protocol == "proxy"


async def test_ipv6_source_over_socks5_and_proxy_v2() -> None:
    async with running_service(make_config()) as svc, target_server("::1") as target:
        destination = socks5.Endpoint(target.address[0], target.port)
        client, data = socks5_bind_connect_bytes(IP("::1"), destination)
        async with await connect(svc.address("socks5", version=6)) as stream:
            await stream.send_all(data)
            *_, connect_reply = await read_replies(stream, client, 3)
        async with await connect(svc.address("proxy")) as stream:
            await stream.send_all(proxy_header(2, IP("::1"), target.address))
            await read_until(stream, b"\r\n")
    assert [p.address[0] for p in target.peers] == [IP("::1"), IP("::1")]
    assert isinstance(connect_reply, socks5.ReplyEvent)
    assert connect_reply.bound == socks5.Endpoint(*target.peers[0].address)


async def test_unplumbed_source_gets_a_failure_reply_at_once_over_socks5() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("203.0.113.77"), socks5.Endpoint(target.address[0], target.port)
        )
        with trio.fail_after(0.5):  # a real-time bound: no SYN goes anywhere
            async with await connect(svc.address("socks5")) as stream:
                await stream.send_all(data)
                events = await read_replies(stream, client, 3)
                rest = await read_to_eof(stream)
            record = await svc.next_record()
    assert len(events) == 2
    bind_reply = events[1]
    assert isinstance(bind_reply, socks5.ReplyEvent)
    assert bind_reply.reply is socks5.Reply.GENERAL_FAILURE
    assert rest == b""  # and the proxy closed
    assert target.peers == []
    assert record.outcome is Outcome.BIND_FAILED
    assert record.detail is not None
    assert "not plumbed" in record.detail


async def test_unplumbed_source_closes_a_proxy_connection_at_once() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        with trio.fail_after(0.5):
            async with await connect(svc.address("proxy")) as stream:
                await stream.send_all(proxy_header(2, IP("203.0.113.77"), target.address))
                assert await read_to_eof(stream) == b""
            record = await svc.next_record()
    assert target.peers == []
    assert record.outcome is Outcome.BIND_FAILED
    assert record.detail is not None
    assert "203.0.113.77 is not plumbed" in record.detail


async def test_source_outside_sources_is_refused_with_rep_02() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.9"), socks5.Endpoint(target.address[0], target.port)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            events = await read_replies(stream, client, 3)
        record = await svc.next_record()
    assert events[-1] == socks5.ReplyEvent(socks5.Reply.NOT_ALLOWED)
    assert target.peers == []
    assert record.reason == "source"


async def test_pipelined_negotiation_and_payload_lose_no_byte() -> None:
    payload = os.urandom(200_000)
    async with running_service(make_config()) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(target.address[0], target.port), payload=payload
        )
        async with await connect(svc.address("socks5")) as stream, trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, data)  # greeting+BIND+CONNECT+payload, one write
            await read_replies(stream, client, 3)
            banner, _, echoed = (await read_until(stream, b"\r\n", client.trailing_data)).partition(
                b"\r\n"
            )
            echoed = await read_exactly(stream, len(payload), echoed)
    assert banner.startswith(b"HELLO 127.0.0.2 ")
    assert bytes(target.peers[0].received) == payload
    assert echoed == payload


async def test_half_close_client_still_receives_the_whole_answer() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(target.address[0], target.port), payload=b"QUIT\r\n"
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            await read_replies(stream, client, 3)
            await stream.send_eof()  # shut our write side only
            answer = await read_to_eof(stream, client.trailing_data)
        record = await svc.next_record()
    assert answer.startswith(b"HELLO 127.0.0.2 ")
    assert answer.endswith(b"QUIT\r\nBYE 6\r\n")  # the target's reply after our EOF
    assert record.reason == "done"
    assert (record.bytes_up, record.bytes_down) == (6, len(answer))


async def test_connect_without_bind_uses_default_source() -> None:
    config = make_config("default_source: 127.0.0.3\n")
    async with running_service(config) as svc, target_server() as target:
        client = socks5.Socks5Client()
        data = client.send(socks5.Greeting((socks5.Method.NO_AUTH,)))
        data += client.send(
            socks5.Request(socks5.Command.CONNECT, socks5.Endpoint(target.address[0], target.port))
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            _, reply = await read_replies(stream, client, 2)
    assert target.peers[0].address[0] == IP("127.0.0.3")
    assert isinstance(reply, socks5.ReplyEvent)
    assert reply.bound.host == IP("127.0.0.3")


async def test_localhost_resolves_through_the_system_resolver() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint("localhost", target.port)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            *_, reply = await read_replies(stream, client, 3)
        record = await svc.next_record()
    assert isinstance(reply, socks5.ReplyEvent)
    assert reply.reply is socks5.Reply.SUCCEEDED
    assert target.peers[0].address[0] == IP("127.0.0.2")
    assert record.destination == f"127.0.0.1:{target.port}"  # what was checked and used


@pytest.mark.parametrize("source", ["127.0.0.2", "::1"])
async def test_domain_name_resolves_in_the_source_family(source: str) -> None:
    """A dual-stack name reaches the destination over the source's own family."""
    resolver = static_resolver({"mx.example.test": ["::1", "127.0.0.1"]})
    host = "127.0.0.1" if IP(source).version == 4 else "::1"
    async with (
        running_service(make_config(), resolver=resolver) as svc,
        target_server(host) as target,
    ):
        client, data = socks5_bind_connect_bytes(
            IP(source), socks5.Endpoint("mx.example.test", target.port)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            *_, reply = await read_replies(stream, client, 3)
    assert isinstance(reply, socks5.ReplyEvent)
    assert reply.reply is socks5.Reply.SUCCEEDED
    assert target.peers[0].address[0] == IP(source)


async def test_unresolvable_name_gets_host_unreachable() -> None:
    async with running_service(make_config(), resolver=static_resolver({})) as svc:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint("nowhere.example.test", 25)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            events = await read_replies(stream, client, 3)
        record = await svc.next_record()
    assert events[-1] == socks5.ReplyEvent(socks5.Reply.HOST_UNREACHABLE)
    assert record.outcome is Outcome.CONNECT_FAILED


async def test_udp_associate_gets_command_not_supported() -> None:
    async with running_service(make_config()) as svc:
        client = socks5.Socks5Client()
        data = client.send(socks5.Greeting((socks5.Method.NO_AUTH,)))
        data += client.send(
            socks5.Request(socks5.Command.UDP_ASSOCIATE, socks5.Endpoint(IP("0.0.0.0"), 0))
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            events = await read_replies(stream, client, 2)
            assert await read_to_eof(stream) == b""
        record = await svc.next_record()
    assert events[-1] == socks5.ReplyEvent(socks5.Reply.COMMAND_NOT_SUPPORTED)
    assert record.reply == 7


async def test_refused_destination_port_gets_rep_05() -> None:
    async with running_service(make_config()) as svc:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        closed_port = listener.getsockname()[1]
        listener.close()  # nothing listens there now
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(IP("127.0.0.1"), closed_port)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            events = await read_replies(stream, client, 3)
        record = await svc.next_record()
    assert events[-1] == socks5.ReplyEvent(socks5.Reply.CONNECTION_REFUSED)
    assert record.outcome is Outcome.CONNECT_FAILED


async def test_destination_denied_by_policy_gets_rep_02_and_no_connection() -> None:
    config = make_config(
        "",
        base=BASE_NO_DESTINATIONS + "destinations:\n  ports: [25]\n  allow: [127.0.0.0/8]\n",
    )
    async with running_service(config) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(target.address[0], target.port)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            events = await read_replies(stream, client, 3)
        record = await svc.next_record()
    assert events[-1] == socks5.ReplyEvent(socks5.Reply.NOT_ALLOWED)
    assert target.peers == []
    assert record.reason == "destination"
    assert record.detail == f"port {target.port} is not in destinations.ports"


async def test_client_outside_clients_allow_is_closed_before_any_outbound_connection() -> None:
    config = make_config("", base=BASE_NO_CLIENTS + "clients:\n  allow: [10.0.0.0/8]\n")
    async with running_service(config) as svc, target_server() as target:
        async with await connect(svc.address("proxy")) as stream:
            header = proxy_header(2, IP("127.0.0.2"), target.address)
            with contextlib.suppress(trio.BrokenResourceError):  # closed before we wrote
                await stream.send_all(header)
            assert await peer_closed(stream, wait=1.0)
        record = await svc.next_record()
    assert target.peers == []
    assert record.reason == "client"
    assert record.detail == "client 127.0.0.1 is not in clients.allow"


async def test_slow_loris_is_cut_at_the_handshake_deadline(autojump_clock: trio.abc.Clock) -> None:
    async with running_service(make_config("timeouts:\n  handshake: 10s\n")) as svc:
        _client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(IP("127.0.0.1"), 9)
        )
        assert len(data) > 10  # at one byte a second, longer than the deadline
        started = trio.current_time()
        async with await connect(svc.address("socks5")) as stream:
            for byte in data:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(bytes([byte]))
                await trio.sleep(1)
                if await peer_closed(stream):
                    break
            else:
                pytest.fail("the proxy never cut the slow-loris client")
            cut_after = trio.current_time() - started
        record = await svc.next_record()
    assert record.outcome is Outcome.TIMEOUT
    assert record.detail == "handshake not finished within 10s"
    assert 10 <= cut_after <= 11.1


async def test_idle_relay_is_cut_at_the_idle_timeout(autojump_clock: trio.abc.Clock) -> None:
    config = make_config("timeouts:\n  idle: 5m\n")
    async with running_service(config) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(target.address[0], target.port)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            await read_replies(stream, client, 3)
            banner = await read_until(stream, b"\r\n", client.trailing_data)
            established = trio.current_time()
            rest = await read_to_eof(stream)  # silence until the proxy gives up
            cut_after = trio.current_time() - established
        record = await svc.next_record()
    assert banner.startswith(b"HELLO")
    assert rest == b""
    assert 300 <= cut_after <= 301
    assert record.reason == "idle_timeout"


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello
    b"\x04\x01\x00\x19\x7f\x00\x00\x01\x00",  # SOCKS4
    b"\x05\x00",  # SOCKS5 with zero methods
    b"\x05\x01\x00\x05\x01\x00\x07\x00\x00",  # bad ATYP
    b"PROXY TCP4 1.2.3.4\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",  # v2 with an absurd length
    b"\x00" * 5000,
    b"EHLO me\r\n",
]


@pytest.mark.parametrize("protocol", ["socks5", "proxy"])
async def test_garbage_never_crashes_and_the_next_client_is_served(
    protocol: str, autojump_clock: trio.abc.Clock
) -> None:
    rng = random.Random(1928)
    garbage = GARBAGE + [rng.randbytes(rng.randint(1, 600)) for _ in range(60)]
    async with running_service(make_config()) as svc, target_server() as target:
        for blob in garbage:
            async with await connect(svc.address(protocol)) as stream:
                try:
                    await stream.send_all(blob)
                    await read_to_eof(stream)  # the proxy must close (at worst at the deadline)
                except trio.BrokenResourceError:
                    pass  # reset by the proxy: also a close
        records = [await svc.next_record() for _ in garbage]
        # Still serving: a well-formed client goes through.
        async with await connect(svc.address("proxy")) as stream:
            await stream.send_all(proxy_header(1, IP("127.0.0.3"), target.address))
            assert (await read_until(stream, b"\r\n")).startswith(b"HELLO 127.0.0.3 ")
    assert all(r.outcome is not Outcome.OK for r in records)
    assert not any("internal error" in (r.detail or "") for r in records)
    assert len(target.peers) == 1  # garbage never produced an outbound connection


async def test_drain_stops_accepting_and_lets_open_sessions_finish() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(target.address[0], target.port)
        )
        address = svc.address("socks5")
        async with await connect(address) as stream:
            await stream.send_all(data)
            await read_replies(stream, client, 3)
            svc.service.drain()
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(OSError, match="connect"):  # the listening socket is gone
                await connect(address)
            await stream.send_all(b"still here\r\n")
            echoed = await read_until(stream, b"still here\r\n", client.trailing_data)
            await stream.send_eof()
            rest = await read_to_eof(stream)
        record = await svc.next_record()
    assert echoed.endswith(b"still here\r\n")
    assert rest == b"BYE 12\r\n"
    assert record.outcome is Outcome.OK
    assert record.reason == "done"


async def test_drain_timeout_closes_sessions_that_do_not_finish(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = make_config("timeouts:\n  drain: 30s\n  idle: 1h\n")
    async with running_service(config) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(target.address[0], target.port)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            await read_replies(stream, client, 3)
            await read_until(stream, b"\r\n", client.trailing_data)
            started = trio.current_time()
            svc.service.drain()
            await read_to_eof(stream)
            closed_after = trio.current_time() - started
        record = await svc.next_record()
    assert 30 <= closed_after <= 31
    assert record.detail == "closed at shutdown (drain time over)"
    assert record.end == "drain"


BASE_NO_DESTINATIONS = """
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
sources: [127.0.0.2, 127.0.0.3]
clients:
  allow: [127.0.0.0/8]
"""

BASE_NO_CLIENTS = """
listeners:
  - listen: "127.0.0.1:0"
    protocol: proxy
sources: [127.0.0.2]
destinations:
  ports: any
  allow: [127.0.0.0/8]
"""


def _vectors(*verdicts: str) -> list[tuple[str, bytes]]:
    path = Path(__file__).parent / "proto" / "proxy_protocol_vectors.json"
    vectors = json.loads(path.read_text())["vectors"]
    return [(v["id"], bytes.fromhex(v["hex"])) for v in vectors if v["verdict"] in verdicts]


@pytest.mark.parametrize(
    ("vector_id", "header"),
    _vectors("valid-local", "valid-refuse"),
    ids=[vid for vid, _ in _vectors("valid-local", "valid-refuse")],
)
async def test_proxy_headers_without_a_tcp_destination_never_connect_anywhere(
    vector_id: str, header: bytes
) -> None:
    """LOCAL is a health check (closed cleanly); UNKNOWN/UNSPEC/UDP/UNIX are refused."""
    async with running_service(make_config()) as svc:
        async with await connect(svc.address("proxy")) as stream:
            await stream.send_all(header)
            assert await peer_closed(stream, wait=1.0)
        record = await svc.next_record()
    assert record.connect_seconds is None  # no outbound connection was even attempted
    assert record.source is None
    if vector_id.startswith("V2-OK-local"):
        assert record.outcome is Outcome.HEALTH_CHECK
    else:
        assert record.outcome is Outcome.REFUSED
        assert record.reason == "protocol"
        assert record.detail is not None
        assert "names no TCP destination" in record.detail
