"""Tests for kumoproxy.relay: both directions, half-close, idle deadline, resets.

Each test wires ``client app <-> relay <-> server app`` out of two stream
pairs: in-memory pairs (which also run on ``autojump_clock``) or real TCP
connections on 127.0.0.1.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from kumoproxy.relay import RECEIVE_SIZE, Direction, RelayEnd, RelayResult, relay

Stream = trio.abc.HalfCloseableStream
Pair = tuple[Stream, Stream]
MakePair = Callable[[], Awaitable[Pair]]

#: A real-time bound on tests that use the real clock: they finish in
#: milliseconds, but a relay that hangs must fail the test, not the run.
HANG_GUARD = 10


class Pairs:
    """Makes stream pairs and closes every stream it made at teardown."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []

    async def memory(self) -> Pair:
        near, far = trio.testing.memory_stream_pair()
        self.streams += (near, far)
        return near, far

    async def loopback(self) -> tuple[trio.SocketStream, trio.SocketStream]:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listener:
            near = await trio.testing.open_stream_to_socket_listener(listener)
            far = await listener.accept()
        self.streams += (near, far)
        return near, far

    async def aclose(self) -> None:
        for stream in self.streams:
            await stream.aclose()


@pytest.fixture
async def pairs() -> AsyncIterator[Pairs]:
    made = Pairs()
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture(params=["memory", "loopback"])
def make_pair(request: pytest.FixtureRequest, pairs: Pairs) -> MakePair:
    return pairs.memory if request.param == "memory" else pairs.loopback


async def receive_all(stream: Stream) -> bytes:
    """Everything until EOF."""
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


class Tally:
    """An ``on_bytes`` callback that adds up what it is told."""

    def __init__(self) -> None:
        self.totals = {Direction.UP: 0, Direction.DOWN: 0}
        self.calls = 0

    def __call__(self, direction: Direction, size: int) -> None:
        assert 0 < size <= RECEIVE_SIZE
        self.totals[direction] += size
        self.calls += 1


# ---------------------------------------------------------------------------
# Bytes and half-close
# ---------------------------------------------------------------------------


async def test_relay_carries_bytes_both_ways_intact_and_counts_them(make_pair: MakePair) -> None:
    client_app, relay_client = await make_pair()
    relay_upstream, server_app = await make_pair()
    rng = random.Random(1928)
    up = rng.randbytes(300_000)
    down = rng.randbytes(200_001)
    received: dict[str, bytes] = {}
    tally = Tally()
    result = RelayResult()

    async def talk(stream: Stream, payload: bytes, name: str) -> None:
        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            received[name] = await receive_all(stream)

    async def run_relay() -> None:
        nonlocal result
        result = await relay(relay_client, relay_upstream, idle_timeout=3600, on_bytes=tally)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            nursery.start_soon(talk, client_app, up, "client")
            nursery.start_soon(talk, server_app, down, "server")

    assert received == {"server": up, "client": down}
    assert result == RelayResult(bytes_up=len(up), bytes_down=len(down), end=RelayEnd.DONE)
    assert tally.totals == {Direction.UP: len(up), Direction.DOWN: len(down)}
    assert tally.calls >= 2


async def test_half_closed_client_still_receives_the_whole_answer(make_pair: MakePair) -> None:
    client_app, relay_client = await make_pair()
    relay_upstream, server_app = await make_pair()
    request = b"QUIT\r\n"
    answer = b"221 2.0.0 Bye\r\n" * 10_000  # sent only after the server saw EOF

    async def client() -> bytes:
        await client_app.send_all(request)
        await client_app.send_eof()
        return await receive_all(client_app)

    async def server() -> bytes:
        seen = await receive_all(server_app)  # returns only once EOF arrived
        await server_app.send_all(answer)
        await server_app.send_eof()
        return seen

    results: dict[str, bytes | RelayResult] = {}

    async def run(name: str, fn: Callable[[], Awaitable[bytes | RelayResult]]) -> None:
        results[name] = await fn()

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "client", client)
            nursery.start_soon(run, "server", server)
            nursery.start_soon(
                run, "relay", lambda: relay(relay_client, relay_upstream, idle_timeout=3600)
            )

    assert results["server"] == request
    assert results["client"] == answer
    assert results["relay"] == RelayResult(len(request), len(answer), RelayEnd.DONE)


# ---------------------------------------------------------------------------
# Idle deadline (virtual time)
# ---------------------------------------------------------------------------

IDLE = 30.0


async def test_relay_with_no_traffic_ends_idle_at_exactly_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _client_app, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, _server_app = trio.testing.memory_stream_pair()
    start = trio.current_time()
    result = await relay(relay_client, relay_upstream, idle_timeout=IDLE)
    assert result == RelayResult(0, 0, RelayEnd.IDLE)
    assert trio.current_time() == start + IDLE


async def test_traffic_every_half_idle_keeps_the_relay_alive_past_three_idles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_app, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, server_app = trio.testing.memory_stream_pair()
    start = trio.current_time()
    beats = 8  # the last at 4 * IDLE, well past 3 * IDLE
    last_beat = start

    async def heartbeat() -> None:
        nonlocal last_beat
        for i in range(beats):
            await trio.sleep(IDLE / 2)
            # alternate directions: progress either way moves the deadline
            await (client_app if i % 2 == 0 else server_app).send_all(b".")
            last_beat = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        result = await relay(relay_client, relay_upstream, idle_timeout=IDLE)

    assert last_beat == start + beats * IDLE / 2 > start + 3 * IDLE
    assert result == RelayResult(beats // 2, beats // 2, RelayEnd.IDLE)
    assert trio.current_time() == last_beat + IDLE  # idle counts from the last byte
    assert await server_app.receive_some() == b"." * (beats // 2)
    assert await client_app.receive_some() == b"." * (beats // 2)


async def test_idle_deadline_applies_after_a_half_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_app, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, _server_app = trio.testing.memory_stream_pair()
    await client_app.send_all(b"QUIT\r\n")
    await client_app.send_eof()  # the server never answers nor closes
    start = trio.current_time()
    result = await relay(relay_client, relay_upstream, idle_timeout=IDLE)
    assert result == RelayResult(6, 0, RelayEnd.IDLE)
    assert trio.current_time() == start + IDLE


# ---------------------------------------------------------------------------
# Resets
# ---------------------------------------------------------------------------


def abort(stream: trio.SocketStream) -> None:
    """Close with RST instead of FIN (SO_LINGER with a zero timeout)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@pytest.mark.parametrize("side", ["client", "server"])
async def test_peer_reset_ends_the_relay_with_reset(side: str, pairs: Pairs) -> None:
    client_app, relay_client = await pairs.loopback()
    relay_upstream, server_app = await pairs.loopback()
    await client_app.send_all(b"EHLO x\r\n")
    result = RelayResult()

    async def run_relay() -> None:
        nonlocal result
        result = await relay(relay_client, relay_upstream, idle_timeout=3600)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            assert await server_app.receive_some() == b"EHLO x\r\n"
            abort(client_app if side == "client" else server_app)

    assert result.end is RelayEnd.RESET
    assert result.bytes_up == 8


async def test_closing_a_relayed_stream_ends_the_relay_at_once_with_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _client_app, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, _server_app = trio.testing.memory_stream_pair()
    start = trio.current_time()
    result = RelayResult()

    async def run_relay() -> None:
        nonlocal result
        result = await relay(relay_client, relay_upstream, idle_timeout=IDLE)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay)
        await trio.testing.wait_all_tasks_blocked()
        await relay_upstream.aclose()  # e.g. the session tearing the upstream down

    assert result.end is RelayEnd.RESET
    assert trio.current_time() == start  # no wait for the idle deadline
