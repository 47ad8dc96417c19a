"""Tests for the relay's socket path: splice(2) through pooled pipes, and its fallbacks.

Every test wires ``client app <-> relay <-> server app`` over real TCP
connections on 127.0.0.1 (splice needs real sockets). Payloads are large
enough that reads fill :data:`RECEIVE_SIZE`, which is what moves a direction
to splice. Real time, bounded by :data:`HANG_GUARD`; nothing sleeps.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing
import trustme

from kumoproxy.relay import (
    RECEIVE_SIZE,
    SPLICE_AVAILABLE,
    Direction,
    PipePool,
    RelayEnd,
    RelayResult,
    receive_some,
    relay,
    send_all,
)

pytestmark = pytest.mark.skipif(not SPLICE_AVAILABLE, reason="splice(2) is Linux-only")

#: Real-time bound: these finish in well under a second; a hang must fail.
HANG_GUARD = 20

#: Several full reads in each direction, and not a multiple of any buffer.
UP_SIZE = 5_000_003
DOWN_SIZE = 3_000_017


class Sockets:
    """Loopback TCP pairs, all closed at teardown."""

    def __init__(self) -> None:
        self.streams: list[trio.abc.Stream] = []

    async def pair(self) -> tuple[trio.SocketStream, trio.SocketStream]:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listener:
            near = await trio.testing.open_stream_to_socket_listener(listener)
            far = await listener.accept()
        self.streams += (near, far)
        return near, far

    async def aclose(self) -> None:
        for stream in self.streams:
            with trio.CancelScope(shield=True):
                await stream.aclose()


@pytest.fixture
async def sockets() -> AsyncIterator[Sockets]:
    made = Sockets()
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
def pool() -> Iterator[PipePool]:
    made = PipePool()
    try:
        yield made
    finally:
        made.close()


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


async def exchange(
    client_app: trio.abc.HalfCloseableStream | trio.SSLStream[trio.SocketStream],
    server_app: trio.abc.HalfCloseableStream,
    run_relay: Callable[[], Awaitable[RelayResult]],
    up: bytes,
    down: bytes,
) -> tuple[bytes, bytes, RelayResult]:
    """Both apps send their payload then EOF while reading all; returns what each got."""
    got: dict[str, bytes] = {}
    results: list[RelayResult] = []

    async def talk(stream: trio.abc.Stream, payload: bytes, name: str) -> None:
        async def send() -> None:
            await stream.send_all(payload)
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got[name] = await receive_all(stream)

    async def relay_task() -> None:
        results.append(await run_relay())

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay_task)
            nursery.start_soon(talk, client_app, up, "client")
            nursery.start_soon(talk, server_app, down, "server")
    return got["server"], got["client"], results[0]


# ---------------------------------------------------------------------------
# Bytes, exactly
# ---------------------------------------------------------------------------


async def test_spliced_relay_moves_megabytes_both_ways_exactly(
    sockets: Sockets, pool: PipePool
) -> None:
    client_app, relay_client = await sockets.pair()
    relay_upstream, server_app = await sockets.pair()
    rng = random.Random(1928)
    up, down = rng.randbytes(UP_SIZE), rng.randbytes(DOWN_SIZE)
    counted = {Direction.UP: 0, Direction.DOWN: 0}

    def count(direction: Direction, size: int) -> None:
        counted[direction] += size

    at_server, at_client, result = await exchange(
        client_app,
        server_app,
        lambda: relay(relay_client, relay_upstream, idle_timeout=3600, on_bytes=count, pipes=pool),
        up,
        down,
    )

    assert at_server == up
    assert at_client == down
    assert result == RelayResult(len(up), len(down), RelayEnd.DONE)
    assert counted == {Direction.UP: len(up), Direction.DOWN: len(down)}
    # Most of it went through the pipes, not through Python.
    assert result.spliced > (len(up) + len(down)) // 2
    assert pool.lent == 0


async def test_without_a_pool_the_socket_path_copies_every_byte_itself(
    sockets: Sockets,
) -> None:
    client_app, relay_client = await sockets.pair()
    relay_upstream, server_app = await sockets.pair()
    rng = random.Random(1929)
    up, down = rng.randbytes(UP_SIZE), rng.randbytes(DOWN_SIZE)

    at_server, at_client, result = await exchange(
        client_app,
        server_app,
        lambda: relay(relay_client, relay_upstream, idle_timeout=3600),
        up,
        down,
    )

    assert (at_server, at_client) == (up, down)
    assert result == RelayResult(len(up), len(down), RelayEnd.DONE)
    assert result.spliced == 0


async def test_when_the_pool_lends_no_pipe_bulk_takes_buffered_copies(sockets: Sockets) -> None:
    client_app, relay_client = await sockets.pair()
    relay_upstream, server_app = await sockets.pair()
    exhausted = PipePool(limit=0)
    rng = random.Random(1930)
    up, down = rng.randbytes(UP_SIZE), rng.randbytes(DOWN_SIZE)

    at_server, at_client, result = await exchange(
        client_app,
        server_app,
        lambda: relay(relay_client, relay_upstream, idle_timeout=3600, pipes=exhausted),
        up,
        down,
    )

    assert (at_server, at_client) == (up, down)
    assert result.spliced == 0
    assert exhausted.lent == 0


async def test_pipelined_bytes_go_first_on_the_socket_path(
    sockets: Sockets, pool: PipePool
) -> None:
    client_app, relay_client = await sockets.pair()
    relay_upstream, server_app = await sockets.pair()
    pipelined = b"EHLO pipelined\r\n"
    body = random.Random(1931).randbytes(RECEIVE_SIZE * 3)

    at_server, at_client, result = await exchange(
        client_app,
        server_app,
        lambda: relay(
            relay_client, relay_upstream, idle_timeout=3600, pipelined=pipelined, pipes=pool
        ),
        body,
        b"250 ok\r\n",
    )

    assert at_server == pipelined + body
    assert at_client == b"250 ok\r\n"
    assert result.bytes_up == len(pipelined) + len(body)


# ---------------------------------------------------------------------------
# Half-close
# ---------------------------------------------------------------------------


async def test_half_closed_client_gets_a_large_spliced_answer_after_its_eof(
    sockets: Sockets, pool: PipePool
) -> None:
    client_app, relay_client = await sockets.pair()
    relay_upstream, server_app = await sockets.pair()
    rng = random.Random(1932)
    request = rng.randbytes(2_000_000)
    answer = rng.randbytes(4_000_000)  # sent only after the server saw EOF
    got: dict[str, bytes] = {}
    results: list[RelayResult] = []

    async def client() -> None:
        await client_app.send_all(request)
        await client_app.send_eof()
        got["client"] = await receive_all(client_app)

    async def server() -> None:
        got["server"] = await receive_all(server_app)  # returns only once EOF arrived
        await server_app.send_all(answer)
        await server_app.send_eof()

    async def run_relay() -> None:
        results.append(await relay(relay_client, relay_upstream, idle_timeout=3600, pipes=pool))

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            nursery.start_soon(server)
            nursery.start_soon(run_relay)

    assert got == {"server": request, "client": answer}
    assert results == [RelayResult(len(request), len(answer), RelayEnd.DONE)]
    assert results[0].spliced > 0
    assert pool.lent == 0


# ---------------------------------------------------------------------------
# Pipes are held only while bytes flow
# ---------------------------------------------------------------------------


async def test_a_paused_bulk_transfer_holds_no_pipe(sockets: Sockets, pool: PipePool) -> None:
    client_app, relay_client = await sockets.pair()
    relay_upstream, server_app = await sockets.pair()
    burst = random.Random(1933).randbytes(RECEIVE_SIZE * 8)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: relay(relay_client, relay_upstream, idle_timeout=3600, pipes=pool)
            )
            nursery.start_soon(client_app.send_all, burst)  # more than the socket buffers hold
            received = b""
            while len(received) < len(burst):
                received += await server_app.receive_some()
            await trio.testing.wait_all_tasks_blocked()
            # The relay is still running, waiting for more: the pipe went back.
            assert pool.lent == 0
            assert received == burst
            nursery.cancel_scope.cancel()


async def test_a_given_back_pipe_is_reused_not_remade(pool: PipePool) -> None:
    first = pool.acquire()
    assert first is not None
    pool.release(first)
    again = pool.acquire()
    assert again == first
    assert pool.lent == 1
    pool.release(again)


async def test_the_pool_lends_at_most_its_limit() -> None:
    pool = PipePool(limit=2, spare=0)
    lent = [pool.acquire(), pool.acquire()]
    assert None not in lent
    assert pool.acquire() is None
    for pipe in lent:
        assert pipe is not None
        pool.discard(pipe)
    assert pool.lent == 0


# ---------------------------------------------------------------------------
# Resets
# ---------------------------------------------------------------------------


def abort(stream: trio.SocketStream) -> None:
    """Close with RST instead of FIN (SO_LINGER with a zero timeout)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def test_destination_reset_during_a_spliced_transfer_ends_with_reset(
    sockets: Sockets, pool: PipePool
) -> None:
    client_app, relay_client = await sockets.pair()
    relay_upstream, server_app = await sockets.pair()
    results: list[RelayResult] = []

    async def run_relay() -> None:
        results.append(await relay(relay_client, relay_upstream, idle_timeout=3600, pipes=pool))

    async def flood() -> None:
        chunk = b"x" * RECEIVE_SIZE
        while True:
            await client_app.send_all(chunk)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            async with trio.open_nursery() as relaying:
                relaying.start_soon(run_relay)
                seen = 0
                while seen < RECEIVE_SIZE * 4:  # splicing by now
                    seen += len(await server_app.receive_some())
                abort(server_app)
            nursery.cancel_scope.cancel()  # the flood has nowhere to go now

    assert results[0].end is RelayEnd.RESET
    assert pool.lent == 0  # the pipe that may have held bytes was closed, not lent on


# ---------------------------------------------------------------------------
# TLS takes the buffered stream path
# ---------------------------------------------------------------------------


async def test_a_tls_client_is_relayed_with_buffered_copies_exactly(
    sockets: Sockets, pool: PipePool
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("kumoproxy.test").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    client_tcp, relay_tcp = await sockets.pair()
    relay_upstream, server_app = await sockets.pair()
    client_app = trio.SSLStream(client_tcp, client_context, server_hostname="kumoproxy.test")
    relay_client = trio.SSLStream(relay_tcp, server_context, server_side=True)
    rng = random.Random(1934)
    up, down = rng.randbytes(1_000_003), rng.randbytes(700_001)
    got: dict[str, bytes] = {}
    results: list[RelayResult] = []

    async def client() -> None:
        await client_app.send_all(up)
        data = bytearray()
        while len(data) < len(down):
            data += await client_app.receive_some()
        got["client"] = bytes(data)

    async def server() -> None:
        data = bytearray()
        while len(data) < len(up):
            data += await server_app.receive_some()
        got["server"] = bytes(data)
        await server_app.send_all(down)
        await server_app.send_eof()  # TLS cannot half-close: this ends the relay

    async def run_relay() -> None:
        results.append(await relay(relay_client, relay_upstream, idle_timeout=3600, pipes=pool))

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            nursery.start_soon(server)
            nursery.start_soon(run_relay)

    assert got == {"client": down, "server": up}
    assert results[0].spliced == 0
    assert results[0].bytes_down == len(down)
    assert pool.lent == 0


# ---------------------------------------------------------------------------
# Lifetime shares the idle scope
# ---------------------------------------------------------------------------


async def test_a_busy_relay_ends_at_end_at_with_lifetime(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_app, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, server_app = trio.testing.memory_stream_pair()
    start = trio.current_time()

    async def chatter() -> None:
        while True:
            await client_app.send_all(b".")
            await server_app.receive_some()
            await trio.sleep(1)  # well within the idle timeout

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatter)
        result = await relay(relay_client, relay_upstream, idle_timeout=30, end_at=start + 100)
        nursery.cancel_scope.cancel()

    assert result.end is RelayEnd.LIFETIME
    assert trio.current_time() == start + 100


async def test_idle_before_end_at_still_ends_idle(autojump_clock: trio.testing.MockClock) -> None:
    _client_app, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, _server_app = trio.testing.memory_stream_pair()
    start = trio.current_time()
    result = await relay(relay_client, relay_upstream, idle_timeout=30, end_at=start + 100)
    assert result.end is RelayEnd.IDLE
    assert trio.current_time() == start + 30


# ---------------------------------------------------------------------------
# The handshake's fast receive_some / send_all
# ---------------------------------------------------------------------------


async def test_fast_receive_and_send_carry_bytes_on_a_socket_stream(sockets: Sockets) -> None:
    near, far = await sockets.pair()
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.testing.wait_all_tasks_blocked()
                await send_all(far, b"\x05\x01\x00")

            nursery.start_soon(later)
            assert await receive_some(near, 4096) == b"\x05\x01\x00"  # waited for it
        await send_all(near, b"\x05\x00")
        assert await far.receive_some() == b"\x05\x00"


async def test_fast_send_after_eof_is_a_closed_resource(sockets: Sockets) -> None:
    near, _far = await sockets.pair()
    await near.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await send_all(near, b"late")


async def test_fast_receive_on_a_closed_stream_is_a_closed_resource(sockets: Sockets) -> None:
    near, _far = await sockets.pair()
    near.socket.close()
    with pytest.raises(trio.ClosedResourceError):
        await receive_some(near, 10)


async def test_fast_receive_after_a_peer_reset_is_a_broken_resource(sockets: Sockets) -> None:
    near, far = await sockets.pair()
    await far.send_all(b"x")
    assert await receive_some(near, 10) == b"x"
    abort(far)
    with trio.fail_after(HANG_GUARD), pytest.raises(trio.BrokenResourceError):
        await receive_some(near, 10)


async def test_fast_paths_defer_to_other_streams() -> None:
    near, far = trio.testing.memory_stream_pair()
    await send_all(near, b"hello")
    assert await receive_some(far, 100) == b"hello"
