"""Relay bytes both ways between the client and the destination.

Both directions run concurrently. When one side sends EOF, the other side's
write half is shut (TCP half-close), and the opposite direction carries on
until it ends too: an SMTP client may shut its write side and still expect
the server's last reply. The idle deadline moves with byte progress in
*either* direction, so a long transfer is never cut, but a stuck one is.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import trio

#: Bytes asked for per receive. Large enough that bulk transfers need few
#: syscalls, small enough that 10k idle sessions do not pin much memory
#: (a receive buffer is only allocated while a read is in progress).
RECEIVE_SIZE = 65536


class RelayEnd(enum.StrEnum):
    """Why a relay ended (the ``reason`` field of the session log line)."""

    DONE = "done"  # both sides sent EOF
    IDLE = "idle_timeout"
    RESET = "reset"  # a side broke the connection


class Direction(enum.StrEnum):
    UP = "up"  # client -> destination
    DOWN = "down"  # destination -> client


#: Called with each chunk's direction and size as it is forwarded (metrics).
ByteCounter = Callable[[Direction, int], None]


@dataclass(slots=True)
class RelayResult:
    bytes_up: int = 0
    bytes_down: int = 0
    end: RelayEnd = RelayEnd.DONE


async def relay(
    client: trio.abc.Stream,
    upstream: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float,
    on_bytes: ByteCounter | None = None,
) -> RelayResult:
    """Pump until both directions end, a side resets, or nothing moves for ``idle_timeout``.

    Bytes the client pipelined after its handshake must already have been
    written to ``upstream`` by the caller. A client stream that cannot
    half-close (TLS) ends the session when the destination finishes.
    """
    result = RelayResult()
    ended: RelayEnd | None = None

    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time() + idle_timeout

        def end(reason: RelayEnd) -> None:
            nonlocal ended
            ended = reason
            scope.cancel()

        async def pump(
            source: trio.abc.Stream, sink: trio.abc.Stream, direction: Direction
        ) -> None:
            try:
                while data := await source.receive_some(RECEIVE_SIZE):
                    await sink.send_all(data)
                    scope.deadline = trio.current_time() + idle_timeout
                    if direction is Direction.UP:
                        result.bytes_up += len(data)
                    else:
                        result.bytes_down += len(data)
                    if on_bytes is not None:
                        on_bytes(direction, len(data))
                if isinstance(sink, trio.abc.HalfCloseableStream):
                    await sink.send_eof()
                else:
                    end(RelayEnd.DONE)  # TLS has no half-close: this direction ends it all
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # One side reset: the other direction has nowhere to go either.
                end(RelayEnd.RESET)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, Direction.UP)
            nursery.start_soon(pump, upstream, client, Direction.DOWN)
    if ended is not None:
        result.end = ended
    elif scope.cancelled_caught:
        result.end = RelayEnd.IDLE
    return result
