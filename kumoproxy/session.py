"""One client session: negotiate, choose the source, connect, relay.

This is the trio shell around the sans-IO codecs in :mod:`kumoproxy.proto`
and the decisions in :mod:`kumoproxy.policy`. It never slices bytes by
protocol knowledge. Every session ends in exactly one :class:`SessionRecord`,
which the server logs as one line (product.md, "observability").

Phases and their deadlines (all from ``timeouts``):

* handshake: the whole SOCKS5 negotiation up to the CONNECT request, or the
  whole PROXY header, under one deadline (not per read), so a slow-loris
  client cannot keep a slot by trickling bytes;
* connect: name resolution plus the outbound TCP connect;
* relay: an idle deadline that moves with byte progress.
"""

from __future__ import annotations

import contextlib
import enum
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from prometheus_client.metrics import MetricWrapperBase

from kumoproxy import egress
from kumoproxy.config import Config, IPAddress
from kumoproxy.errors import (
    ConnectFailedError,
    ConnectTimeoutError,
    EgressError,
    RemoteProtocolError,
    ResolveError,
)
from kumoproxy.handshakes import HandshakeTracker
from kumoproxy.limits import Limiter, LimitKind
from kumoproxy.metrics import OTHER_SOURCE, Metrics
from kumoproxy.passwords import PasswordVerifier
from kumoproxy.policy import (
    Refusal,
    RefusalReason,
    check_destination,
    family_matches,
)
from kumoproxy.proto import socks5
from kumoproxy.proto.common import format_endpoint
from kumoproxy.relay import Direction, PipePool, RelayEnd, relay
from kumoproxy.throttle import AuthThrottle

#: Bytes per handshake read. Clients pipeline the whole negotiation and the
#: first payload bytes into one segment; whatever follows the handshake is
#: forwarded as relay data, so over-reading is harmless.
HANDSHAKE_READ_SIZE = 4096

#: The ``end`` of a session cut by ``timeouts.session``.
SESSION_LIFETIME_END = str(RelayEnd.LIFETIME)

#: Deadline for writing a failure reply before we close anyway: a peer that
#: does not read must not hold the session open.
REFUSAL_WRITE_TIMEOUT = 1.0


class Outcome(enum.StrEnum):
    """How a session ended; also the ``result`` label per source IP."""

    OK = "ok"
    REFUSED = "refused"
    BIND_FAILED = "bind_failed"
    CONNECT_FAILED = "connect_failed"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol_error"
    HEALTH_CHECK = "health_check"  # PROXY v2 LOCAL: read, then close cleanly
    CLOSED = "closed"  # the client went away before asking for anything


@dataclass(slots=True)
class SessionRecord:
    """Everything the session's log line says. Filled in as the session runs."""

    session_id: str
    listener: str
    protocol: str
    client: str
    started_at: float
    user: str | None = None
    source: str | None = None  # ip:port actually used (or the requested ip)
    destination: str | None = None
    outcome: Outcome = Outcome.CLOSED
    reply: int | None = None  # SOCKS5 REP sent to the client
    reason: str | None = None  # a RefusalReason, or the relay's end
    detail: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    handshake_seconds: float | None = None
    connect_seconds: float | None = None
    total_seconds: float | None = None
    client_ip: IPAddress | None = None  # for per-client bookkeeping; logged as ``client``
    source_ip: IPAddress | None = None  # the configured source chosen, for per-source metrics

    _NOT_LOGGED = frozenset({"started_at", "client_ip", "source_ip"})

    @property
    def end(self) -> str:
        """How it ended, in one bounded word: the relay's end, or the outcome."""
        if self.outcome is Outcome.OK and self.reason is not None:
            return self.reason
        return str(self.outcome)

    def fields(self) -> dict[str, Any]:
        """The log line's stable keys; ``None`` values are left out."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            if name in self._NOT_LOGGED:
                continue
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, float):
                value = round(value, 6)
            elif isinstance(value, enum.IntEnum):
                value = int(value)
            elif isinstance(value, enum.Enum):
                value = str(value)
            out[name] = value
        return out


M = TypeVar("M", bound=MetricWrapperBase)


class MetricChildren:
    """Labelled metric children, each looked up in prometheus_client once.

    ``metric.labels(...)`` takes a lock and builds tuples on every call; a
    session makes about ten such calls. Label values are bounded (see
    :mod:`kumoproxy.metrics`), and so is this cache. Values are anything
    whose ``str`` is the label (an IP address, a listener, a word).
    """

    __slots__ = ("_children",)

    def __init__(self) -> None:
        self._children: dict[tuple[object, ...], Any] = {}

    def __call__(self, metric: M, *values: object) -> M:
        key = (metric, *values)
        child: M | None = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*map(str, values))
        return child


@dataclass(slots=True)
class SessionContext:
    """What a session needs from the service, passed in (never global).

    Built per session from the service's state at accept, so a SIGHUP
    reload changes what new sessions see while sessions in flight keep the
    configuration they started with.
    """

    config: Config
    resolver: egress.Resolver
    passwords: PasswordVerifier
    auth_throttle: AuthThrottle
    limits: Limiter
    metrics: Metrics
    handshakes: HandshakeTracker
    children: MetricChildren
    pipes: PipePool | None  # for splice; None where the platform has none


def source_label(record: SessionRecord) -> str:
    """The bounded ``source`` label: a configured source IP, else ``other``."""
    return str(record.source_ip) if record.source_ip is not None else OTHER_SOURCE


class Refused(Exception):
    """Internal: stop the session with a refusal already recorded."""


def refuse(record: SessionRecord, refusal: Refusal) -> Refused:
    """Record ``refusal``; returns the exception that ends the session (raise it)."""
    record.outcome = Outcome.REFUSED
    record.reason = str(refusal.reason)
    record.detail = refusal.detail
    record.reply = refusal.reply
    return Refused(refusal.detail)


def protocol_failed(record: SessionRecord, exc: RemoteProtocolError) -> None:
    """Record that the client broke its protocol (the session is already ending)."""
    record.outcome = Outcome.PROTOCOL_ERROR
    record.reason = str(RefusalReason.PROTOCOL)
    record.detail = str(exc)


def egress_failed(record: SessionRecord, exc: EgressError) -> None:
    """Record why the outbound connection failed (the session is already ending)."""
    record.outcome = Outcome(exc.result)
    record.reply = exc.reply
    record.detail = str(exc)


async def send_then_close_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    """Best effort: the peer may already be gone or may never read."""
    if data:
        with (
            trio.move_on_after(REFUSAL_WRITE_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.send_all(data)


# --------------------------------------------------------------------------
# Connecting out


async def _resolve(
    ctx: SessionContext, host: socks5.Host, port: int, source: IPAddress | None
) -> list[IPAddress]:
    if not isinstance(host, str):
        return [host]
    family = 0 if source is None else (socket.AF_INET if source.version == 4 else socket.AF_INET6)
    addresses = await ctx.resolver(host, port, family)
    if not addresses:
        raise ResolveError(f"{host} has no address in the source's family")
    return addresses


class _EgressSlot:
    """One ``per_source``/``per_source_destination`` slot, released exactly once."""

    __slots__ = ("_ctx", "_destination", "_held", "_source")

    def __init__(self, ctx: SessionContext, source: IPAddress, destination: IPAddress) -> None:
        self._ctx, self._source, self._destination = ctx, source, destination
        self._held = True
        ctx.children(ctx.metrics.source_connections_active, source).inc()

    def release(self) -> None:
        if self._held:
            self._held = False
            ctx = self._ctx
            ctx.limits.release_egress(self._source, self._destination)
            ctx.children(ctx.metrics.source_connections_active, self._source).dec()


def open_upstream(
    ctx: SessionContext,
    record: SessionRecord,
    *,
    host: socks5.Host,
    port: int,
    source: IPAddress | None,
    bound: egress.BoundSocket | None,
) -> Upstream:
    """The outbound connection, with its egress slot held until it closes.

    Resolves once, checks policy on what resolved, and connects, all under
    ``timeouts.connect``. The address that passed the policy check is the one
    connected to: there is no second resolution between check and use.
    Use as ``async with open_upstream(...) as stream``.
    """
    return Upstream(ctx, record, host, port, source, bound)


class Upstream:
    """:func:`open_upstream`'s context manager.

    A class rather than an ``@asynccontextmanager``: that one keeps an async
    generator and its frame alive for the whole relay, about 500 bytes per
    idle session.
    """

    __slots__ = ("_bound", "_ctx", "_host", "_port", "_record", "_slot", "_source", "_stream")

    def __init__(
        self,
        ctx: SessionContext,
        record: SessionRecord,
        host: socks5.Host,
        port: int,
        source: IPAddress | None,
        bound: egress.BoundSocket | None,
    ) -> None:
        self._ctx, self._record, self._host, self._port = ctx, record, host, port
        self._source, self._bound = source, bound
        self._stream: trio.SocketStream | None = None
        self._slot: _EgressSlot | None = None

    async def __aenter__(self) -> trio.SocketStream:
        bound, self._bound = self._bound, None  # _connect owns it now
        self._stream, self._slot = await _connect(
            self._ctx,
            self._record,
            host=self._host,
            port=self._port,
            source=self._source,
            bound=bound,
        )
        return self._stream

    async def __aexit__(self, *exc_info: object) -> None:
        # Closing a socket needs no await (and no checkpoint that a
        # cancellation could interrupt before the slot is released).
        if self._stream is not None:
            self._stream.socket.close()
        if self._slot is not None:
            self._slot.release()


async def _connect(
    ctx: SessionContext,
    record: SessionRecord,
    *,
    host: socks5.Host,
    port: int,
    source: IPAddress | None,
    bound: egress.BoundSocket | None,
) -> tuple[trio.SocketStream, _EgressSlot | None]:
    started = trio.current_time()
    try:
        with trio.fail_after(ctx.config.timeouts.connect):
            allowed = await _allowed_addresses(ctx, record, host, port, source)
            last_error: EgressError | None = None
            for address in allowed:
                record.destination = format_endpoint(address, port)
                slot = None
                if source is not None:
                    if (kind := ctx.limits.admit_egress(source, address)) is not None:
                        raise refuse(
                            record, limit_refusal(ctx, kind, f"source {source} to {address}")
                        )
                    slot = _EgressSlot(ctx, source, address)
                try:
                    sock = bound.sock if bound is not None else None
                    bound = None  # a bound socket can only be connected once
                    if sock is None and source is not None:
                        sock = (await egress.bind_source(source)).sock
                    if sock is None:
                        sock = egress.unbound_socket(address)
                    return await egress.connect(sock, (address, port)), slot
                except ConnectFailedError as exc:
                    last_error = exc  # try the next address, as MTAs do
                    if slot is not None:
                        slot.release()
                except BaseException:
                    if slot is not None:
                        slot.release()
                    raise
            assert last_error is not None
            raise last_error
    except trio.TooSlowError:
        raise ConnectTimeoutError(
            f"connect to {host}:{port} timed out after {ctx.config.timeouts.connect:g}s"
        ) from None
    finally:
        record.connect_seconds = trio.current_time() - started
        if record.source_ip is not None:
            ctx.children(ctx.metrics.connect_seconds, record.source_ip).observe(
                record.connect_seconds
            )
        if bound is not None:
            bound.close()


async def _allowed_addresses(
    ctx: SessionContext,
    record: SessionRecord,
    host: socks5.Host,
    port: int,
    source: IPAddress | None,
) -> list[IPAddress]:
    """Resolve (in the source's family) and keep what the destination policy allows."""
    addresses = await _resolve(ctx, host, port, source)
    refusal: Refusal | None = None
    allowed: list[IPAddress] = []
    for address in addresses:
        if not family_matches(source, address):
            continue
        refusal = check_destination(ctx.config, address, port)
        if refusal is None:
            allowed.append(address)
    if not allowed:
        if refusal is None:
            raise ConnectFailedError(
                f"{host} is not reachable from source {source} (address family)", reply=3
            )
        raise refuse(record, refusal)
    return allowed


class _Counter:
    """Counts relayed bytes into the record and ``kumoproxy_bytes_total`` as they move."""

    __slots__ = ("_down", "_record", "_up")

    def __init__(self, ctx: SessionContext, record: SessionRecord) -> None:
        label = source_label(record)
        self._record = record
        self._up = ctx.children(ctx.metrics.bytes, label, Direction.UP)
        self._down = ctx.children(ctx.metrics.bytes, label, Direction.DOWN)

    def __call__(self, direction: Direction, size: int) -> None:
        if direction is Direction.UP:
            self._record.bytes_up += size
            self._up.inc(size)
        else:
            self._record.bytes_down += size
            self._down.inc(size)


async def relay_session(
    ctx: SessionContext,
    record: SessionRecord,
    client: trio.abc.Stream,
    upstream: trio.SocketStream,
    pipelined: bytes,
) -> None:
    """Forward the pipelined bytes, then relay until done, idle, reset, or ``timeouts.session``.

    Bytes are counted as they move (the record and ``kumoproxy_bytes_total``),
    not only when the session ends.
    """
    record.outcome = Outcome.OK
    timeouts = ctx.config.timeouts
    result = await relay(
        client,
        upstream,
        idle_timeout=timeouts.idle,
        end_at=trio.current_time() + timeouts.session,
        pipelined=pipelined,
        on_bytes=_Counter(ctx, record),
        pipes=ctx.pipes,
    )
    record.reason = str(result.end)
    if result.end is RelayEnd.LIFETIME:
        record.detail = f"session reached timeouts.session ({timeouts.session:g}s)"


def handshake_deadline(ctx: SessionContext, record: SessionRecord) -> float:
    """One deadline for the whole negotiation, counted from accept (not per read)."""
    return record.started_at + ctx.config.timeouts.handshake


@dataclass(slots=True)
class HandshakePhase:
    """Set by :func:`handshake_phase`: did the negotiation finish?"""

    completed: bool = False


@contextmanager
def handshake_phase(ctx: SessionContext, record: SessionRecord) -> Iterator[HandshakePhase]:
    """Run the negotiation under its deadline and the handshake cap.

    On leaving, ``phase.completed`` says whether the body ran to its end; if
    it did not, ``record`` already says why (timed out, or evicted by a newer
    connection when ``limits.handshakes`` negotiations were in progress).
    """
    phase = HandshakePhase()
    deadline = handshake_deadline(ctx, record)
    # One cancel scope for both ways to be cut: the tracker's, carrying the
    # deadline too. Cut before the deadline means evicted.
    # Counted here rather than read from the tracker on scrape: a worker's
    # gauge must live in prometheus' multiprocess files to be summed.
    negotiating = ctx.metrics.handshakes_active
    negotiating.inc()
    try:
        with ctx.handshakes.track() as scope:
            scope.deadline = deadline
            yield phase
            phase.completed = True
    finally:
        negotiating.dec()
    now = trio.current_time()
    if phase.completed:
        record.handshake_seconds = now - record.started_at
        ctx.children(ctx.metrics.handshake_seconds, record.listener).observe(
            record.handshake_seconds
        )
    elif now < deadline:
        record.outcome = Outcome.REFUSED
        record.reason = str(RefusalReason.LIMIT)
        record.detail = (
            f"handshake cut: {ctx.handshakes.limit} newer negotiations in progress "
            "(limits.handshakes)"
        )
        ctx.metrics.limit_refusals.labels(str(LimitKind.HANDSHAKES)).inc()
    else:
        record.outcome = Outcome.TIMEOUT
        record.reason = str(RefusalReason.PROTOCOL)
        record.detail = f"handshake not finished within {ctx.config.timeouts.handshake:g}s"


def limit_refusal(ctx: SessionContext, kind: LimitKind, detail: str) -> Refusal:
    """A refusal by a limit, counted by which limit."""
    ctx.metrics.limit_refusals.labels(str(kind)).inc()
    return Refusal(
        RefusalReason.LIMIT, f"{kind} limit ({ctx.limits.limit_value(kind)}) reached: {detail}"
    )
