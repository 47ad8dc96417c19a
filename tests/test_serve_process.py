"""The real ``kumoproxy serve`` process, end to end over loopback.

These pin what an operator sees: the target sees the source IP the MTA asked
for, bad sources fail at once with a log line that says why, garbage does not
take the process down, and SIGTERM drains.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import signal
from pathlib import Path

import pytest
import trio

from kumoproxy.proto import socks5
from tests.netkit import (
    connect,
    peer_closed,
    proxy_header,
    read_replies,
    read_to_eof,
    read_until,
    socks5_bind_connect_bytes,
    target_server,
)
from tests.process import serve_process

IP = ipaddress.ip_address

CONFIG = """
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
  - listen: "127.0.0.1:0"
    protocol: proxy
  - listen: "[::1]:0"
    protocol: socks5
sources: [127.0.0.2, 127.0.0.3, "::1", 203.0.113.77]
clients:
  allow: [127.0.0.0/8, "::1/128"]
destinations:
  ports: any
  allow: [127.0.0.0/8, "::1/128"]
timeouts:
  handshake: 2s
  drain: 10s
"""


async def test_target_sees_each_requested_source(tmp_path: Path) -> None:
    async with serve_process(CONFIG, tmp_path) as proxy, target_server() as target:
        replies = []
        for source in ("127.0.0.2", "127.0.0.3"):
            client, data = socks5_bind_connect_bytes(
                IP(source), socks5.Endpoint(target.address[0], target.port)
            )
            async with await connect(proxy.listeners["socks5"]) as stream:
                await stream.send_all(data)
                *_, reply = await read_replies(stream, client, 3)
                await read_until(stream, b"\r\n", client.trailing_data)
            replies.append(reply)
        for version, source in ((1, "127.0.0.2"), (2, "127.0.0.3")):
            async with await connect(proxy.listeners["proxy"]) as stream:
                await stream.send_all(proxy_header(version, IP(source), target.address))
                await read_until(stream, b"\r\n")
        sessions = [await proxy.next_event("session") for _ in range(4)]
    seen = [peer.address for peer in target.peers]
    assert [ip for ip, _ in seen] == [IP(s) for s in ("127.0.0.2", "127.0.0.3") * 2]
    assert replies == [
        socks5.ReplyEvent(socks5.Reply.SUCCEEDED, socks5.Endpoint(*a)) for a in seen[:2]
    ]
    assert [s["outcome"] for s in sessions] == ["ok"] * 4
    assert sorted(s["source"] for s in sessions) == sorted(f"{ip}:{port}" for ip, port in seen)


async def test_ipv6_source(tmp_path: Path) -> None:
    async with serve_process(CONFIG, tmp_path) as proxy, target_server("::1") as target:
        client, data = socks5_bind_connect_bytes(
            IP("::1"), socks5.Endpoint(target.address[0], target.port)
        )
        async with await connect(proxy.listeners["socks5-v6"]) as stream:
            await stream.send_all(data)
            *_, reply = await read_replies(stream, client, 3)
    assert target.peers[0].address[0] == IP("::1")
    assert reply == socks5.ReplyEvent(
        socks5.Reply.SUCCEEDED, socks5.Endpoint(*target.peers[0].address)
    )


async def test_unplumbed_source_fails_fast_and_the_log_says_why(tmp_path: Path) -> None:
    async with serve_process(CONFIG, tmp_path) as proxy, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("203.0.113.77"), socks5.Endpoint(target.address[0], target.port)
        )
        with trio.fail_after(0.5):  # "well under a second", measured on the real clock
            async with await connect(proxy.listeners["socks5"]) as stream:
                await stream.send_all(data)
                events = await read_replies(stream, client, 3)
                assert await read_to_eof(stream) == b""
        with trio.fail_after(0.5):
            async with await connect(proxy.listeners["proxy"]) as stream:
                await stream.send_all(proxy_header(2, IP("203.0.113.77"), target.address))
                assert await read_to_eof(stream) == b""
        socks_line = await proxy.next_event("session")
        proxy_line = await proxy.next_event("session")
    assert len(events) == 2
    bind_reply = events[1]
    assert isinstance(bind_reply, socks5.ReplyEvent)
    assert bind_reply.reply is not socks5.Reply.SUCCEEDED
    assert target.peers == []
    for line in (socks_line, proxy_line):
        assert line["outcome"] == "bind_failed"
        assert "203.0.113.77 is not plumbed on this host" in line["detail"]
        assert line["level"] == "warning"


async def test_garbage_never_takes_the_process_down(tmp_path: Path) -> None:
    rng = random.Random(1929)
    async with serve_process(CONFIG, tmp_path) as proxy, target_server() as target:
        for listener in ("socks5", "proxy"):
            for _ in range(25):
                async with await connect(proxy.listeners[listener]) as stream:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(rng.randbytes(rng.randint(1, 400)))
                    assert await peer_closed(stream, wait=5.0)  # within the handshake deadline
        async with await connect(proxy.listeners["proxy"]) as stream:
            await stream.send_all(proxy_header(1, IP("127.0.0.2"), target.address))
            assert (await read_until(stream, b"\r\n")).startswith(b"HELLO 127.0.0.2 ")
        lines = [await proxy.next_event("session") for _ in range(51)]
        assert proxy.process.returncode is None
    assert {line["outcome"] for line in lines[:50]} <= {"protocol_error", "timeout", "refused"}
    assert lines[50]["outcome"] == "ok"
    assert len(target.peers) == 1


async def test_sigterm_drains_an_open_session_and_exits_zero(tmp_path: Path) -> None:
    async with serve_process(CONFIG, tmp_path) as proxy, target_server() as target:
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(target.address[0], target.port)
        )
        address = proxy.listeners["socks5"]
        async with await connect(address) as stream:
            await stream.send_all(data)
            await read_replies(stream, client, 3)
            proxy.signal(signal.SIGTERM)
            draining = await proxy.next_event("draining")
            with pytest.raises(OSError, match="connect"):
                await connect(address)  # no longer accepting
            await stream.send_all(b"x" * 100_000)
            await stream.send_eof()
            answer = await read_to_eof(stream, client.trailing_data)
        with trio.fail_after(5):
            returncode = await proxy.process.wait()
        session = await proxy.next_event("session")
    assert draining["active_sessions"] == 1
    assert answer.endswith(b"BYE 100000\r\n")  # the transfer finished in full
    assert session["bytes_up"] == 100_000
    assert session["reason"] == "done"
    assert returncode == 0
