"""Operations: metrics per source IP, limits, slot accounting, handshake cap, lifetime.

In-process service on real loopback sockets; /metrics is read over real HTTP
from the admin listener and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json

import trio
from prometheus_client.parser import text_string_to_metric_families

from kumoproxy.config import IPAddress
from kumoproxy.proto import socks5
from kumoproxy.session import Outcome
from tests.netkit import (
    RunningService,
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
    target_server,
)

IP = ipaddress.ip_address
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def http_get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    async with await connect(address) as stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        response = await read_to_eof(stream)
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def scrape(svc: RunningService) -> Samples:
    status, body = await http_get(svc.admin_address, "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def read_banner(stream: trio.SocketStream, prefix: bytes) -> tuple[bytes, bytes]:
    """The target's banner line (with CRLF), and whatever arrived after it."""
    head, _, rest = (await read_until(stream, b"\r\n", prefix)).partition(b"\r\n")
    return head + b"\r\n", rest


async def open_session(
    svc: RunningService, target_address: tuple[IPAddress, int], source: str
) -> tuple[trio.SocketStream, socks5.Socks5Client, list[object]]:
    client, data = socks5_bind_connect_bytes(
        IP(source), socks5.Endpoint(target_address[0], target_address[1])
    )
    stream = await connect(svc.address("socks5"))
    await stream.send_all(data)
    events: list[object] = list(await read_replies(stream, client, 3))
    return stream, client, events


async def test_metrics_follow_real_sessions_per_source() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        a, a_client, _ = await open_session(svc, target.address, "127.0.0.2")
        b, b_client, _ = await open_session(svc, target.address, "127.0.0.3")
        c, _c_client, _ = await open_session(svc, target.address, "127.0.0.3")
        sent = {"127.0.0.2": b"x" * 1000, "127.0.0.3": b"y" * 3000}
        await a.send_all(sent["127.0.0.2"])
        await b.send_all(sent["127.0.0.3"])
        # Wait for the echoes, so the bytes have crossed the proxy both ways.
        banner_a, echo_a = await read_banner(a, a_client.trailing_data)
        await read_exactly(a, 1000, echo_a)
        _, echo_b = await read_banner(b, b_client.trailing_data)
        await read_exactly(b, 3000, echo_b)
        during = await scrape(svc)
        for stream in (a, b, c):  # a clean end: our EOF, then the target's BYE and EOF
            await stream.send_eof()
            await read_to_eof(stream)
            await stream.aclose()
        for _ in range(3):
            await svc.next_record()
        after = await scrape(svc)
        refused, *_ = await open_session(svc, target.address, "127.0.0.9")  # not a source
        await refused.aclose()
        await svc.next_record()
        final = await scrape(svc)

    active = "kumoproxy_source_connections_active"
    assert value(during, active, source="127.0.0.2") == 1
    assert value(during, active, source="127.0.0.3") == 2
    assert value(during, "kumoproxy_sessions_active", listener="127.0.0.1:0") == 3
    # Bytes are counted while the sessions run, not only at their end.
    assert value(during, "kumoproxy_bytes_total", source="127.0.0.2", direction="up") == 1000
    assert value(during, "kumoproxy_bytes_total", source="127.0.0.3", direction="up") == 3000
    down = value(during, "kumoproxy_bytes_total", source="127.0.0.2", direction="down")
    assert down == len(banner_a) + 1000

    assert value(after, active, source="127.0.0.2") == 0
    assert value(after, active, source="127.0.0.3") == 0
    assert value(after, "kumoproxy_sessions_active", listener="127.0.0.1:0") == 0
    total = "kumoproxy_source_connections_total"
    assert value(after, total, source="127.0.0.2", result="ok") == 1
    assert value(after, total, source="127.0.0.3", result="ok") == 2
    assert value(after, "kumoproxy_connect_seconds_count", source="127.0.0.3") == 2
    assert value(after, "kumoproxy_handshake_seconds_count", listener="127.0.0.1:0") == 3
    assert value(after, "kumoproxy_session_ends_total", listener="127.0.0.1:0", end="done") == 3

    # A source that is not configured never becomes a label.
    assert value(final, "kumoproxy_refusals_total", listener="127.0.0.1:0", reason="source") == 1
    assert not any(dict(labels).get("source") == "127.0.0.9" for _, labels in final)


async def test_sources_endpoint_reports_bindable_active_and_totals() -> None:
    async with running_service(make_config()) as svc, target_server() as target:
        stream, *_ = await open_session(svc, target.address, "127.0.0.2")
        status, body = await http_get(svc.admin_address, "/sources")
        await stream.aclose()
        await svc.next_record()
        _, after = await http_get(svc.admin_address, "/sources")
    assert status == 200
    by_source = {entry["source"]: entry for entry in json.loads(body)}
    assert by_source["127.0.0.2"]["bindable"] is True
    assert by_source["127.0.0.2"]["active"] == 1
    assert by_source["203.0.113.77"]["bindable"] is False
    assert "not plumbed" in by_source["203.0.113.77"]["problem"]
    assert {e["source"]: e for e in json.loads(after)}["127.0.0.2"]["totals"] == {"ok": 1}


async def test_per_source_limit_refuses_the_third_session_and_frees_a_slot_on_close() -> None:
    async with (
        running_service(make_config("limits:\n  per_source: 2\n")) as svc,
        target_server() as target,
    ):
        first, *_ = await open_session(svc, target.address, "127.0.0.2")
        second, *_ = await open_session(svc, target.address, "127.0.0.2")
        third, _, third_events = await open_session(svc, target.address, "127.0.0.2")
        other, _, other_events = await open_session(svc, target.address, "127.0.0.3")
        await third.aclose()
        refused = await svc.next_record()
        await first.aclose()
        await svc.next_record()
        again, _, again_events = await open_session(svc, target.address, "127.0.0.2")
        samples = await scrape(svc)
        for stream in (second, other, again):
            await stream.aclose()
    assert third_events[-1] == socks5.ReplyEvent(socks5.Reply.NOT_ALLOWED)
    assert refused.reason == "limit"
    assert refused.detail == "per_source limit (2) reached: source 127.0.0.2 to 127.0.0.1"
    assert isinstance(other_events[-1], socks5.ReplyEvent)
    assert other_events[-1].reply is socks5.Reply.SUCCEEDED
    assert isinstance(again_events[-1], socks5.ReplyEvent)
    assert again_events[-1].reply is socks5.Reply.SUCCEEDED
    assert value(samples, "kumoproxy_limit_refusals_total", limit="per_source") == 1
    assert [p.address[0] for p in target.peers].count(IP("127.0.0.2")) == 3


async def test_per_source_destination_limit_is_a_hard_cap_per_pair() -> None:
    config = make_config("limits:\n  per_source_destination: 1\n")
    async with running_service(config) as svc, target_server() as target:
        first, *_ = await open_session(svc, target.address, "127.0.0.2")
        second, _, events = await open_session(svc, target.address, "127.0.0.2")
        await second.aclose()
        record = await svc.next_record()
        await first.aclose()
    assert events[-1] == socks5.ReplyEvent(socks5.Reply.NOT_ALLOWED)
    assert record.detail is not None
    assert record.detail.startswith("per_source_destination limit (1) reached")


async def test_per_client_limit_answers_socks5_with_rep_02_and_closes_proxy_at_once() -> None:
    async with (
        running_service(make_config("limits:\n  per_client: 1\n")) as svc,
        target_server() as target,
    ):
        held, *_ = await open_session(svc, target.address, "127.0.0.2")
        refused, client, events = await open_session(svc, target.address, "127.0.0.3")
        await refused.aclose()
        socks_record = await svc.next_record()
        async with await connect(svc.address("proxy")) as stream:
            await stream.send_all(proxy_header(2, IP("127.0.0.3"), target.address))
            assert await read_to_eof(stream) == b""
        proxy_record = await svc.next_record()
        await held.aclose()
    assert events[-1] == socks5.ReplyEvent(socks5.Reply.NOT_ALLOWED)
    assert client.state is socks5.ClientState.CLOSED
    for record in (socks_record, proxy_record):
        assert record.reason == "limit"
        assert record.detail == "per_client limit (1) reached: client 127.0.0.1"
    assert len(target.peers) == 1


async def test_max_sessions_limit_refuses_beyond_the_process_cap() -> None:
    async with (
        running_service(make_config("limits:\n  max_sessions: 1\n")) as svc,
        target_server() as target,
    ):
        held, *_ = await open_session(svc, target.address, "127.0.0.2")
        refused, _, events = await open_session(svc, target.address, "127.0.0.2")
        await refused.aclose()
        record = await svc.next_record()
        await held.aclose()
    assert events[-1] == socks5.ReplyEvent(socks5.Reply.NOT_ALLOWED)
    assert record.detail == "max_sessions limit (1) reached: client 127.0.0.1"


async def test_no_slot_leaks_whatever_ends_a_session(autojump_clock: trio.abc.Clock) -> None:
    config = make_config("timeouts:\n  handshake: 5s\n  idle: 30s\n")
    async with running_service(config) as svc, target_server() as target:
        # ended by the client closing, by the idle timeout, by a refused
        # connect, by an unplumbed source, by a handshake timeout, and by a
        # reset while relaying
        done, *_ = await open_session(svc, target.address, "127.0.0.2")
        await done.send_eof()
        await read_to_eof(done)
        await done.aclose()
        idle, *_ = await open_session(svc, target.address, "127.0.0.3")
        closed_port_listener = trio.socket.socket()
        await closed_port_listener.bind(("127.0.0.1", 0))
        closed_port = closed_port_listener.getsockname()[1]
        closed_port_listener.close()
        refused, *_ = await open_session(svc, (IP("127.0.0.1"), closed_port), "127.0.0.2")
        unplumbed, *_ = await open_session(svc, target.address, "203.0.113.77")
        slow = await connect(svc.address("socks5"))
        await slow.send_all(b"\x05")
        reset, *_ = await open_session(svc, target.address, "127.0.0.2")
        reset.socket.setsockopt(
            trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        await reset.aclose()  # RST, not FIN
        records = [await svc.next_record() for _ in range(6)]
        for stream in (idle, refused, unplumbed, slow):
            await stream.aclose()
        samples = await scrape(svc)
        service = svc.service
        assert service.limits.sessions == 0
        assert service.limits.source_connections(IP("127.0.0.2")) == 0
        assert service.limits.source_connections(IP("127.0.0.3")) == 0
        assert len(service.handshakes) == 0
    assert sorted(r.end for r in records) == [
        "bind_failed",
        "connect_failed",
        "done",
        "idle_timeout",
        "reset",
        "timeout",
    ]
    for source in ("127.0.0.2", "127.0.0.3"):
        assert value(samples, "kumoproxy_source_connections_active", source=source) == 0
    assert value(samples, "kumoproxy_sessions_active", listener="127.0.0.1:0") == 0


async def test_no_slot_leaks_when_sessions_are_cancelled_at_drain(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = make_config("timeouts:\n  drain: 5s\n  idle: 1h\n")
    async with running_service(config) as svc, target_server() as target:
        streams = [(await open_session(svc, target.address, "127.0.0.2"))[0] for _ in range(3)]
        svc.service.drain()
        records = [await svc.next_record() for _ in range(3)]
        for stream in streams:
            await stream.aclose()
        assert svc.service.limits.sessions == 0
        assert svc.service.limits.source_connections(IP("127.0.0.2")) == 0
    assert {r.detail for r in records} == {"closed at shutdown (drain time over)"}


async def test_500_slow_loris_connections_do_not_stop_a_real_client() -> None:
    # The flood holds for up to a minute; a real client must not wait for that.
    config = make_config("timeouts:\n  handshake: 60s\n")
    async with running_service(config) as svc, target_server() as target:
        loris = []
        for _ in range(500):
            stream = await connect(svc.address("socks5"))
            await stream.send_all(b"\x05\x01")  # half a greeting, then nothing
            loris.append(stream)
        with trio.fail_after(15):  # real time, far below the flood's 60 s hold
            stream, client, events = await open_session(svc, target.address, "127.0.0.2")
            banner = await read_until(stream, b"\r\n", client.trailing_data)
        await stream.aclose()
        assert len(svc.service.handshakes) == 500
        for stream in loris:
            await stream.aclose()
    assert isinstance(events[-1], socks5.ReplyEvent)
    assert events[-1].reply is socks5.Reply.SUCCEEDED
    assert banner.startswith(b"HELLO 127.0.0.2 ")


async def test_handshake_cap_evicts_the_oldest_negotiation_not_the_newcomer() -> None:
    config = make_config("limits:\n  handshakes: 10\n")
    async with running_service(config) as svc, target_server() as target:
        loris = []
        for _ in range(25):
            stream = await connect(svc.address("socks5"))
            await stream.send_all(b"\x05\x01")
            loris.append(stream)
        # Wait until the service has seen all 25 and evicted the 15 oldest.
        evicted = [await svc.next_record() for _ in range(15)]
        stream, _, events = await open_session(svc, target.address, "127.0.0.2")
        await stream.aclose()
        assert await peer_closed(loris[0], wait=1.0)  # the oldest was cut
        samples = await scrape(svc)
        for s in loris:
            await s.aclose()
    assert isinstance(events[-1], socks5.ReplyEvent)
    assert events[-1].reply is socks5.Reply.SUCCEEDED
    assert {r.reason for r in evicted} == {"limit"}
    assert evicted[0].detail == (
        "handshake cut: 10 newer negotiations in progress (limits.handshakes)"
    )
    assert value(samples, "kumoproxy_limit_refusals_total", limit="handshakes") >= 16


async def test_session_lifetime_cuts_a_busy_session(autojump_clock: trio.abc.Clock) -> None:
    config = make_config("timeouts:\n  idle: 1m\n  session: 10m\n")
    async with running_service(config) as svc, target_server() as target:
        stream, _client, _ = await open_session(svc, target.address, "127.0.0.2")
        started = trio.current_time()
        with contextlib.suppress(trio.BrokenResourceError):
            while True:  # busy: never idle for a minute
                await stream.send_all(b"ping\r\n")
                await trio.sleep(30)
                if await peer_closed(stream):
                    break
        lasted = trio.current_time() - started
        record = await svc.next_record()
        await stream.aclose()
    assert 600 <= lasted <= 631
    assert record.outcome is Outcome.OK
    assert record.end == "lifetime"
    assert record.detail == "session reached timeouts.session (600s)"
