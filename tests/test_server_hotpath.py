"""Tests for per-session savings in the service: what left the hot path must still hold.

* keepalive is set once on the listening socket, and accepted sessions
  inherit it (Linux);
* the peer address comes from accept(), not getpeername();
* metric children are looked up once and are the ones prometheus_client has;
* a bulk session through the whole service is relayed and counted exactly.
"""

from __future__ import annotations

import gc
import ipaddress
import random
import socket

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, Counter

from kumoproxy.egress import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL
from kumoproxy.proto import socks5
from kumoproxy.server import OPTIONS_INHERITED, freeze_startup_objects, open_listeners
from kumoproxy.session import MetricChildren, Outcome
from tests.netkit import (
    connect,
    make_config,
    read_replies,
    read_to_eof,
    read_until,
    running_service,
    socks5_bind_connect_bytes,
    target_server,
)

HANG_GUARD = 20


def keepalive_of(sock: trio.socket.SocketType) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


@pytest.mark.skipif(not OPTIONS_INHERITED, reason="only Linux copies options to accepted sockets")
async def test_accepted_client_sockets_inherit_bounded_keepalive_from_the_listener() -> None:
    bound = await open_listeners(make_config())
    try:
        listener = bound.listeners[0].listener
        expected = (1, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        assert keepalive_of(listener.socket) == expected
        client = await trio.testing.open_stream_to_socket_listener(listener)
        accepted = await listener.accept()
        async with client, accepted:
            assert keepalive_of(accepted.socket) == expected
            assert accepted.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await bound.aclose()


async def test_the_record_names_the_client_as_accept_reported_it() -> None:
    async with running_service(make_config()) as svc:
        for family in (4, 6):
            stream = await connect(svc.address("socks5", family))
            local_host, local_port = stream.socket.getsockname()[:2]
            await stream.aclose()  # closed before asking anything
            record = await svc.next_record()
            assert record.client_ip == ipaddress.ip_address(local_host)
            host = f"[{local_host}]" if family == 6 else local_host
            assert record.client == f"{host}:{local_port}"


def test_metric_children_are_looked_up_once_and_labelled_by_str() -> None:
    registry = CollectorRegistry()
    counter = Counter("hotpath_things", "Things.", ["source", "result"], registry=registry)
    children = MetricChildren()
    source = ipaddress.ip_address("192.0.2.7")
    first = children(counter, source, Outcome.OK)
    assert children(counter, source, Outcome.OK) is first
    assert first is counter.labels("192.0.2.7", "ok")
    first.inc(3)
    assert (
        registry.get_sample_value("hotpath_things_total", {"source": "192.0.2.7", "result": "ok"})
        == 3
    )


async def test_a_bulk_session_through_the_service_is_relayed_and_counted_exactly() -> None:
    payload = random.Random(5).randbytes(3_000_001)  # many full reads: the splice path
    async with running_service(make_config()) as svc, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            ipaddress.ip_address("127.0.0.2"),
            socks5.Endpoint(target.address[0], target.address[1]),
        )
        stream = await connect(svc.address("socks5"))
        with trio.fail_after(HANG_GUARD):
            await stream.send_all(data)
            events = await read_replies(stream, client, 3)
            assert isinstance(events[-1], socks5.ReplyEvent)
            assert events[-1].reply is socks5.Reply.SUCCEEDED
            banner = await read_until(stream, b"\r\n", client.trailing_data)
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(payload)
                    await stream.send_eof()

                nursery.start_soon(send)
                echoed = await read_to_eof(stream, banner)
            record = await svc.next_record()
        await stream.aclose()

    bye = f"BYE {len(payload)}\r\n".encode()
    hello, _, rest = echoed.partition(b"\r\n")
    assert hello.startswith(b"HELLO 127.0.0.2 ")
    assert rest == payload + bye
    assert record.outcome is Outcome.OK
    assert record.end == "done"
    assert record.bytes_up == len(payload)
    assert record.bytes_down == len(echoed)


def test_startup_objects_are_frozen_out_of_garbage_collection() -> None:
    gc.unfreeze()
    before = len(gc.get_objects())
    try:
        freeze_startup_objects()
        frozen = gc.get_freeze_count()
        tracked = len(gc.get_objects())
    finally:
        gc.unfreeze()
    # What the collector still walks is what was made after the freeze.
    assert frozen >= before * 0.9
    assert tracked < before * 0.1
