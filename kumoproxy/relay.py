"""Relay bytes both ways between the client and the destination.

Both directions run concurrently. When one side sends EOF, the other side's
write half is shut (TCP half-close), and the opposite direction carries on
until it ends too: an SMTP client may shut its write side and still expect
the server's last reply. The idle deadline moves with byte progress in
*either* direction, so a long transfer is never cut, but a stuck one is.

How the bytes move:

* plain TCP on both sides, the usual case: the relay drives the file
  descriptors itself with ``trio.lowlevel.wait_readable``/``wait_writable``.
  Small chunks (SMTP commands and replies) take one ``read`` and one
  ``write`` without trio's per-call scheduling. A read that fills the whole
  :data:`RECEIVE_SIZE` buffer marks a bulk transfer (a message body): given
  a :class:`PipePool` (Linux), the direction then moves to ``splice(2)``
  through a pipe, so the payload stays in the kernel. Whenever the source
  runs dry, the (empty) pipe goes back to the pool until data flows again:
  sessions that are idle, or only talk SMTP, hold no pipe;
* anything else (a TLS client, the in-memory streams of tests): buffered
  copies through the trio stream interface.

One direction is pumped by the caller's task and the other by one child
task: an idle session holds one extra task, not two.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

#: Bytes asked for per buffered read. Large enough that bulk transfers need
#: few syscalls, small enough that 10k idle sessions do not pin much memory
#: (a receive buffer is only allocated while a read is in progress). A read
#: that fills it marks a bulk transfer, which then moves to ``splice``.
RECEIVE_SIZE = 65536

#: ``splice(2)`` is Linux-only (``os.splice``, Python 3.10+).
SPLICE_AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")

#: Pipe capacity asked for with F_SETPIPE_SZ. Measured on loopback
#: (docs/performance.md): 256 KiB relayed 1.7-1.8 GB/s against 1.0-1.5 with
#: the default 64 KiB, and 1 MiB gained nothing more.
PIPE_SIZE = 256 * 1024

#: Bytes asked for per ``splice`` into the pipe: the kernel moves at most
#: what the pipe holds, so asking for more is harmless.
SPLICE_SIZE = 1 << 20

#: Pipes a pool lends at once; beyond it, bulk transfers take buffered
#: copies. An unprivileged user's pipes may hold fs.pipe-user-pages-soft
#: pages (16384 by default) in total, which 256 pipes of 256 KiB fill; past
#: it the kernel refuses F_SETPIPE_SZ and hands out 8 KiB pipes (slower,
#: still correct).
MAX_PIPES = 256

#: Pipes a pool keeps for reuse once they are given back.
SPARE_PIPES = 32

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if SPLICE_AVAILABLE else 0

#: errnos that mean "this socket was already closed" rather than "broken".
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


class RelayEnd(enum.StrEnum):
    """Why a relay ended (the ``reason`` field of the session log line)."""

    DONE = "done"  # both sides sent EOF
    IDLE = "idle_timeout"
    RESET = "reset"  # a side broke the connection
    LIFETIME = "lifetime"  # reached ``end_at`` (timeouts.session)


class Direction(enum.StrEnum):
    UP = "up"  # client -> destination
    DOWN = "down"  # destination -> client


#: Called with each chunk's direction and size as it is forwarded (metrics).
ByteCounter = Callable[[Direction, int], None]

#: A pipe as ``(read end, write end)``.
Pipe = tuple[int, int]


@dataclass(slots=True)
class RelayResult:
    bytes_up: int = 0
    bytes_down: int = 0
    end: RelayEnd = RelayEnd.DONE
    #: Of the bytes above, how many went through ``splice`` (diagnostics,
    #: left out of equality: it depends on how the kernel batched the reads).
    spliced: int = field(default=0, compare=False)


class PipePool:
    """Pipes for ``splice``, lent to bulk transfers and reused.

    Making a pipe costs four system calls (``pipe2``, ``F_SETPIPE_SZ``, and
    two ``close`` later); a bulk transfer that pauses gives its pipe back
    and takes one again when data flows. Pipes that exist (lent or spare)
    never outnumber ``limit``. Only empty pipes come back to the
    pool: a pipe that may still hold bytes (the transfer failed midway) is
    closed instead.
    """

    def __init__(self, *, limit: int = MAX_PIPES, spare: int = SPARE_PIPES) -> None:
        if not SPLICE_AVAILABLE:
            raise RuntimeError("splice(2) is not available on this platform")
        self.limit = limit
        self.spare = spare
        self.lent = 0
        self._idle: list[Pipe] = []

    def acquire(self) -> Pipe | None:
        """An empty pipe, or ``None`` when ``limit`` are lent already (or none can be made)."""
        if self.lent >= self.limit:
            return None
        if self._idle:
            pipe = self._idle.pop()
        else:
            try:
                read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return None  # out of descriptors: a buffered copy still works
            # EPERM past the user's pipe quota: the default size still works.
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            pipe = (read_end, write_end)
        self.lent += 1
        return pipe

    def release(self, pipe: Pipe) -> None:
        """Give back a pipe that is empty."""
        self.lent -= 1
        if len(self._idle) < self.spare:
            self._idle.append(pipe)
        else:
            _close_pipe(pipe)

    def discard(self, pipe: Pipe) -> None:
        """Give back a pipe that may hold bytes: it is closed, never reused."""
        self.lent -= 1
        _close_pipe(pipe)

    def close(self) -> None:
        """Close the spare pipes (lent ones are closed as they come back)."""
        while self._idle:
            _close_pipe(self._idle.pop())
        self.spare = 0


def _close_pipe(pipe: Pipe) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


async def relay(
    client: trio.abc.Stream,
    upstream: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float,
    end_at: float = math.inf,
    pipelined: bytes = b"",
    on_bytes: ByteCounter | None = None,
    pipes: PipePool | None = None,
) -> RelayResult:
    """Pump until both directions end, a side resets, nothing moves for ``idle_timeout``,
    or the clock reaches ``end_at``.

    ``pipelined``: bytes the client sent after its handshake, forwarded
    first. A client stream that cannot half-close (TLS) ends the session
    when the destination finishes. ``pipes``: where bulk transfers between
    two plain TCP streams borrow pipes to ``splice`` through; without it,
    every byte takes a buffered copy.

    ``end_at`` (the session lifetime) shares the idle deadline's cancel
    scope rather than wrapping the relay in a second one: each scope costs
    an idle session about 300 bytes.
    """
    pumps = _Pumps(idle_timeout, end_at, on_bytes, pipes)
    # The nursery's own scope carries the deadlines: no scope of our own.
    async with trio.open_nursery() as nursery:
        pumps.scope = nursery.cancel_scope
        pumps.scope.deadline = min(trio.current_time() + idle_timeout, end_at)
        # trio.SocketStream is final: a TLS stream over a socket is not one,
        # and takes the stream path.
        if isinstance(client, trio.SocketStream) and isinstance(upstream, trio.SocketStream):
            nursery.start_soon(
                pumps.pump_socket, upstream.socket, client.socket, Direction.DOWN, b""
            )
            await pumps.pump_socket(client.socket, upstream.socket, Direction.UP, pipelined)
        else:
            nursery.start_soon(pumps.pump_stream, upstream, client, Direction.DOWN, b"")
            await pumps.pump_stream(client, upstream, Direction.UP, pipelined)
    result = pumps.result
    if pumps.ended is not None:
        result.end = pumps.ended
    elif nursery.cancel_scope.cancelled_caught:
        result.end = RelayEnd.LIFETIME if trio.current_time() >= end_at else RelayEnd.IDLE
    return result


class _Pumps:
    """The state both directions of one relay share."""

    __slots__ = ("end_at", "ended", "idle_timeout", "on_bytes", "pipes", "result", "scope")

    def __init__(
        self,
        idle_timeout: float,
        end_at: float,
        on_bytes: ByteCounter | None,
        pipes: PipePool | None,
    ) -> None:
        self.result = RelayResult()
        self.idle_timeout = idle_timeout
        self.end_at = end_at
        self.on_bytes = on_bytes
        self.pipes = pipes
        self.scope = trio.CancelScope()  # replaced by the nursery's scope
        self.ended: RelayEnd | None = None

    def end(self, reason: RelayEnd) -> None:
        self.ended = reason
        self.scope.cancel()

    def forwarded(self, direction: Direction, size: int) -> None:
        self.scope.deadline = min(trio.current_time() + self.idle_timeout, self.end_at)
        if direction is Direction.UP:
            self.result.bytes_up += size
        else:
            self.result.bytes_down += size
        if self.on_bytes is not None:
            self.on_bytes(direction, size)

    # -- trio streams (TLS, memory) ----------------------------------------

    async def pump_stream(
        self, source: trio.abc.Stream, sink: trio.abc.Stream, direction: Direction, first: bytes
    ) -> None:
        try:
            if first:
                await sink.send_all(first)
                self.forwarded(direction, len(first))
            while data := await source.receive_some(RECEIVE_SIZE):
                await sink.send_all(data)
                self.forwarded(direction, len(data))
            if isinstance(sink, trio.abc.HalfCloseableStream):
                await sink.send_eof()
            else:
                self.end(RelayEnd.DONE)  # TLS has no half-close: this direction ends it all
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # One side reset: the other direction has nowhere to go either.
            self.end(RelayEnd.RESET)

    # -- TCP sockets ----------------------------------------------------------

    async def pump_socket(
        self,
        source: trio.socket.SocketType,
        sink: trio.socket.SocketType,
        direction: Direction,
        first: bytes,
    ) -> None:
        """Buffered copies until a full read, then ``splice`` (see the module docstring)."""
        try:
            if first:
                await write_all(sink, first)
                self.forwarded(direction, len(first))
            # Read before waiting, like trio does. Measured (strace -c, conn
            # workload): waiting first saved no read (the client's first
            # bytes and the echo were already there) and cost two epoll_ctl
            # calls per session.
            waited = True
            splicing = False
            while True:
                if splicing:
                    assert self.pipes is not None
                    spliced = await self._splice(self.pipes, source, sink, direction)
                    if spliced is _Spliced.EOF:
                        break
                    if spliced is _Spliced.DRY:
                        await trio.lowlevel.wait_readable(source)
                        continue
                    # NO_PIPE: every pipe is lent; this chunk takes a buffered copy.
                try:
                    # fileno() every time: it is -1 once the socket is closed,
                    # so a number reused by a newer socket is never read.
                    data: bytes | None = os.read(source.fileno(), RECEIVE_SIZE)
                except BlockingIOError:
                    data = None
                if data is None:
                    # Waiting outside the except block: a handled exception
                    # stays referenced (with its traceback) until the block
                    # ends, about 600 bytes per idle session and direction.
                    await trio.lowlevel.wait_readable(source)
                    waited = True
                    continue
                if not data:
                    break
                await write_all(sink, data)
                self.forwarded(direction, len(data))
                if len(data) == RECEIVE_SIZE and self.pipes is not None:
                    splicing = True  # a full read: a bulk transfer
                if not waited:  # data keeps coming: let the other tasks run
                    await trio.lowlevel.checkpoint()
                waited = False
            sink.shutdown(socket.SHUT_WR)  # pass the EOF on (TCP half-close)
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
            # A reset (ECONNRESET, EPIPE), or the stream closed under us.
            self.end(RelayEnd.RESET)

    async def _splice(
        self,
        pipes: PipePool,
        source: trio.socket.SocketType,
        sink: trio.socket.SocketType,
        direction: Direction,
    ) -> _Spliced:
        """Socket -> pipe -> socket in the kernel, while the source has data.

        The pipe is held only while bytes flow: it goes back to the pool
        (empty) as soon as the source has nothing to read, so a transfer
        that pauses, or a session gone idle after its message, holds none.
        """
        pipe = pipes.acquire()
        if pipe is None:
            return _Spliced.NO_PIPE
        pipe_out, pipe_in = pipe
        drained = False
        try:
            while True:
                try:
                    pending = os.splice(source.fileno(), pipe_in, SPLICE_SIZE, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    drained = True  # nothing was read: the pipe is empty
                    return _Spliced.DRY
                if not pending:
                    drained = True
                    return _Spliced.EOF
                # Empty the pipe before reading again: it is never full when
                # we splice into it, so EAGAIN there can only mean "no data".
                waited = False
                while pending:
                    try:
                        moved = os.splice(pipe_out, sink.fileno(), pending, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        moved = -1
                    if moved < 0:
                        await trio.lowlevel.wait_writable(sink)
                        waited = True
                        continue
                    pending -= moved
                    self.result.spliced += moved
                    self.forwarded(direction, moved)
                if not waited:  # data keeps coming: let the other tasks run
                    await trio.lowlevel.checkpoint()
        finally:
            if drained:
                pipes.release(pipe)
            else:
                pipes.discard(pipe)  # cut midway: it may still hold bytes


class _Spliced(enum.Enum):
    """Why :meth:`_Pumps._splice` returned."""

    EOF = enum.auto()
    DRY = enum.auto()  # nothing to read now; the pipe went back to the pool
    NO_PIPE = enum.auto()  # the pool lends no more pipes


# --------------------------------------------------------------------------
# Fast paths for the handshake, shared with the session code


async def write_all(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking socket, waiting only when it is full.

    Raises ``OSError`` as the system call does (EBADF once closed).
    """
    view: bytes | memoryview = data
    while True:
        try:
            sent = os.write(sock.fileno(), view)
        except BlockingIOError:
            sent = -1
        if sent < 0:
            await trio.lowlevel.wait_writable(sock)  # outside the except block, see pump_socket
            continue
        if sent == len(view):
            return
        view = memoryview(view)[sent:]


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def receive_some(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes | bytearray:
    """``stream.receive_some(max_bytes)``, cheaper on a plain TCP stream.

    A handshake is a few tiny reads; trio's socket calls add two scheduler
    round trips to each (a checkpoint before, a yield after). Here a read
    that has data returns at once, and one that has none waits for the
    socket like trio does (cancellable). Errors are trio's stream errors.
    """
    if not isinstance(stream, trio.SocketStream):
        return await stream.receive_some(max_bytes)
    sock = stream.socket
    while True:
        try:
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from exc
        await trio.lowlevel.wait_readable(sock)  # outside the except block, see pump_socket


async def send_all(stream: trio.abc.SendStream, data: bytes) -> None:
    """``stream.send_all(data)``, cheaper on a plain TCP stream (see :func:`receive_some`)."""
    if not isinstance(stream, trio.SocketStream):
        await stream.send_all(data)
        return
    sock = stream.socket
    if sock.did_shutdown_SHUT_WR:
        raise trio.ClosedResourceError("can't send data after sending EOF")
    try:
        await write_all(sock, data)
    except OSError as exc:
        raise _stream_error(exc) from exc
