"""An SMTP sink that records *when*: connections per source IP, and message arrivals.

The shaping tests ask questions about time and concurrency at the receiving
end, which is where a provider counts: how many connections from one source
IP were open at once, how many messages arrived in a window, whether anyone
connected after a "slow down" reply. :class:`RecordingSink` answers them. It
wraps :class:`~tests.mta_client.smtpserver.SmtpTestServer` (which speaks the
SMTP and keeps the transcript) and adds, per connection, the client's source
IP, its open and close times and each message's arrival time, all on trio's
clock (``trio.current_time()``).

It can refuse MAIL FROM with a configured reply (:class:`Refusal`), e.g.
``421 4.7.0 rate limited, slow down``: for every transaction from one source,
or for the first ``count`` transactions after ``skip`` accepted ones.

Times: a connection is open from the accept to the end of its session (the
client's QUIT answered, or its EOF); a message arrives when its DATA content
is complete, just before the final reply. Intervals are half-open, so a
connection that closes at the very instant another opens does not overlap it.

Usage::

    slow_down = Refusal("421 4.7.0 rate limited", skip=30, count=1)
    async with recording_sink(refusals=[slow_down]) as sink:
        ...  # point senders at sink.address
        await sink.wait_until(lambda: sink.message_count() >= 100)
        assert sink.max_concurrent(source="127.0.0.2") <= 2
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from tests.mta_client.smtpserver import Connection, Received, ServerConfig, SmtpTestServer

__all__ = [
    "RecordingSink",
    "Refusal",
    "SinkConnection",
    "max_overlap",
    "recording_sink",
    "serve_recording_sink",
]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Answer MAIL FROM with ``reply`` instead of 250, for matching transactions.

    A transaction matches when it comes from ``source`` (any source when
    ``None``). The first ``skip`` matching transactions are let through; the
    next ``count`` are refused (all the rest when ``None``). Rules are tried
    in order and the first that refuses wins; every rule whose source
    matches counts the transaction.
    """

    reply: str
    source: str | None = None
    skip: int = 0
    count: int | None = None

    def __post_init__(self) -> None:
        if not 400 <= int(self.reply[:3]) <= 599:
            raise ValueError(f"a refusal is a 4xx or 5xx reply, got {self.reply!r}")
        if self.skip < 0 or (self.count is not None and self.count < 1):
            raise ValueError("skip must be >= 0 and count >= 1")

    def refuses(self, seen: int) -> bool:
        """Whether the matching transaction numbered ``seen`` (from 0) is refused."""
        return seen >= self.skip and (self.count is None or seen < self.skip + self.count)


@dataclass
class SinkConnection:
    """One connection as the sink saw it; :attr:`record` is the SMTP transcript."""

    source: str
    opened: float
    closed: float | None = None
    #: trio time of each accepted message, in order (one per ``record.messages``).
    arrivals: list[float] = field(default_factory=list)
    #: (trio time, reply) of each refused MAIL FROM.
    refusals: list[tuple[float, str]] = field(default_factory=list)
    #: The serving SmtpTestServer's ``connections``: it appends this
    #: session's record before its first checkpoint.
    records: list[Connection] = field(default_factory=list, repr=False)

    @property
    def record(self) -> Connection:
        """The SMTP transcript so far (commands, messages, how it ended)."""
        return self.records[0]

    @property
    def ehlo(self) -> str | None:
        """The name the client gave in its last EHLO/HELO, if any."""
        for line in reversed(self.record.commands):
            verb, _, argument = line.partition(" ")
            if verb.upper() in ("EHLO", "HELO"):
                return argument.strip()
        return None

    @property
    def messages(self) -> list[Received]:
        return self.record.messages

    def interval(self) -> tuple[float, float]:
        """``[opened, closed)``; a connection still open runs to infinity."""
        return (self.opened, math.inf if self.closed is None else self.closed)


class _MailVerdicts(Mapping[str, str]):
    """``ServerConfig.mail_replies`` for one connection, decided at each MAIL FROM.

    The server looks a sender up with ``mail_replies.get(sender, "250 ...")``;
    this mapping answers every lookup by asking the sink's :class:`Refusal`
    rules first, then the configured ``mail_replies``, and has no entry
    (``KeyError``: the server's default 250) when neither has one. It lists
    only the configured keys: whom the rules refuse is decided per lookup.
    """

    def __init__(
        self, sink: RecordingSink, connection: SinkConnection, configured: Mapping[str, str]
    ) -> None:
        self._sink = sink
        self._connection = connection
        self._configured = configured

    def __getitem__(self, sender: str) -> str:
        reply = self._sink._mail_verdict(self._connection)
        if reply is None:
            return self._configured[sender]
        return reply

    def __iter__(self) -> Iterator[str]:
        return iter(self._configured)

    def __len__(self) -> int:
        return len(self._configured)


class RecordingSink:
    """Serves SMTP like ``config`` says, refusing per ``refusals``, and records times."""

    def __init__(
        self, config: ServerConfig | None = None, refusals: Sequence[Refusal] = ()
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self.refusals = tuple(refusals)
        self.connections: list[SinkConnection] = []
        self.address: tuple[str, int] = ("", 0)
        self._seen = [0] * len(self.refusals)
        self._changed = trio.Event()

    # -- what tests ask

    def message_count(self, *, source: str | None = None) -> int:
        """Messages accepted so far (from ``source`` only, if given)."""
        return sum(len(c.arrivals) for c in self._from(source))

    def arrivals(self, *, source: str | None = None) -> list[float]:
        """Every message's arrival time, sorted."""
        return sorted(t for c in self._from(source) for t in c.arrivals)

    def refused(self) -> list[tuple[float, str, SinkConnection]]:
        """Every refused MAIL FROM: (time, reply, connection), in time order."""
        found = [(t, reply, c) for c in self.connections for t, reply in c.refusals]
        return sorted(found, key=lambda item: item[0])

    def max_concurrent(
        self,
        *,
        source: str | None = None,
        where: Callable[[SinkConnection], bool] | None = None,
        start: float = -math.inf,
        end: float = math.inf,
    ) -> int:
        """The most connections open at one instant within ``[start, end)``,
        counting those from ``source`` (any, if ``None``) for which ``where`` holds."""
        chosen = [c for c in self._from(source) if where is None or where(c)]
        clipped = []
        for connection in chosen:
            opened, closed = connection.interval()
            low, high = max(opened, start), min(closed, end)
            if low < high:
                clipped.append((low, high))
        return max_overlap(clipped)

    async def changed(self) -> None:
        """Return at the next recorded change (a connection opened or closed,
        a message arrived, a MAIL refused)."""
        await self._changed.wait()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds; it is checked after every change.

        No deadline of its own: callers wrap it in ``trio.fail_after``.
        """
        while not condition():
            await self.changed()

    # -- serving

    async def handle(self, stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        """Serve one connection from ``peer``; never raises (errors go to the record)."""
        connection = SinkConnection(peer[0], trio.current_time())

        configured = self.config.on_message

        def arrived(count: int) -> None:
            connection.arrivals.append(trio.current_time())
            self._notify()
            if configured is not None:
                configured(count)

        # One SmtpTestServer per connection: each gets its own callbacks.
        config = dataclasses.replace(
            self.config,
            mail_replies=_MailVerdicts(self, connection, self.config.mail_replies),
            on_message=arrived,
        )
        server = SmtpTestServer(config)
        connection.records = server.connections
        # handle() records the session before its first checkpoint, so no
        # one sees this connection without its record.
        self.connections.append(connection)
        self._notify()
        try:
            await server.handle(stream, peer)
        finally:
            connection.closed = trio.current_time()
            self._notify()

    async def _handle_socket(self, stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        await self.handle(stream, (host, port))

    def _mail_verdict(self, connection: SinkConnection) -> str | None:
        verdict = None
        for index, rule in enumerate(self.refusals):
            if rule.source is not None and rule.source != connection.source:
                continue
            seen = self._seen[index]
            self._seen[index] += 1
            if verdict is None and rule.refuses(seen):
                verdict = rule.reply
        if verdict is not None:
            connection.refusals.append((trio.current_time(), verdict))
            self._notify()
        return verdict

    def _from(self, source: str | None) -> list[SinkConnection]:
        return [c for c in self.connections if source is None or c.source == source]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most half-open ``[start, end)`` intervals covering one instant."""
    spans = list(intervals)
    # At equal times a close sorts before an open (-1 < +1): [a, b) and [b, c)
    # never overlap.
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


async def serve_recording_sink(
    sink: RecordingSink,
    *,
    task_status: trio.TaskStatus[RecordingSink] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on 127.0.0.1, an ephemeral port; started() with ``sink``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]
    sink.address = (host, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, sink._handle_socket, listeners)
        task_status.started(sink)


@asynccontextmanager
async def recording_sink(
    config: ServerConfig | None = None, *, refusals: Sequence[Refusal] = ()
) -> AsyncIterator[RecordingSink]:
    """A running :class:`RecordingSink`, stopped on exit."""
    sink = RecordingSink(config, refusals)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_recording_sink, sink)
        yield sink
        nursery.cancel_scope.cancel()
