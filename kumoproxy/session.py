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
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from kumoproxy import egress
from kumoproxy.config import Config, IPAddress
from kumoproxy.errors import (
    ConnectFailedError,
    ConnectTimeoutError,
    EgressError,
    ResolveError,
)
from kumoproxy.passwords import PasswordVerifier
from kumoproxy.policy import (
    Refusal,
    check_destination,
    family_matches,
)
from kumoproxy.proto import socks5
from kumoproxy.relay import ByteCounter, Direction, RelayEnd, relay
from kumoproxy.throttle import AuthThrottle

#: Bytes per handshake read. Clients pipeline the whole negotiation and the
#: first payload bytes into one segment; whatever follows the handshake is
#: forwarded as relay data, so over-reading is harmless.
HANDSHAKE_READ_SIZE = 4096

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

    _NOT_LOGGED = frozenset({"started_at", "client_ip"})

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


@dataclass(slots=True)
class SessionContext:
    """What a session needs from the service, passed in (never global)."""

    config: Config
    resolver: egress.Resolver
    passwords: PasswordVerifier
    auth_throttle: AuthThrottle
    on_bytes: Callable[[SessionRecord], ByteCounter] | None = None


class Refused(Exception):
    """Internal: stop the session with a refusal already recorded."""


def format_endpoint(host: IPAddress | str, port: int) -> str:
    return f"[{host}]:{port}" if isinstance(host, ipaddress.IPv6Address) else f"{host}:{port}"


def refuse(record: SessionRecord, refusal: Refusal) -> Refused:
    record.outcome = Outcome.REFUSED
    record.reason = str(refusal.reason)
    record.detail = refusal.detail
    record.reply = refusal.reply
    return Refused(refusal.detail)


def egress_failed(record: SessionRecord, exc: EgressError) -> Refused:
    record.outcome = Outcome(exc.result)
    record.reply = exc.reply
    record.detail = str(exc)
    return Refused(str(exc))


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


async def open_upstream(
    ctx: SessionContext,
    record: SessionRecord,
    *,
    host: socks5.Host,
    port: int,
    source: IPAddress | None,
    bound: egress.BoundSocket | None,
) -> trio.SocketStream:
    """Resolve once, check policy on what resolved, connect; all under ``timeouts.connect``.

    The address that passed the policy check is the one we connect to: there
    is no second resolution between check and use.
    """
    started = trio.current_time()
    try:
        with trio.fail_after(ctx.config.timeouts.connect):
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
            record.destination = format_endpoint(allowed[0], port)
            last_error: EgressError | None = None
            for address in allowed:
                record.destination = format_endpoint(address, port)
                sock = bound.sock if bound is not None else None
                bound = None  # a bound socket can only be connected once
                if sock is None:
                    sock = (await egress.bind_source(source)).sock if source else None
                if sock is None:
                    sock = egress.unbound_socket(address)
                try:
                    return await egress.connect(sock, (address, port))
                except ConnectFailedError as exc:
                    last_error = exc  # try the next address, as MTAs do
            assert last_error is not None
            raise last_error
    except trio.TooSlowError:
        raise ConnectTimeoutError(
            f"connect to {host}:{port} timed out after {ctx.config.timeouts.connect:g}s"
        ) from None
    finally:
        record.connect_seconds = trio.current_time() - started
        if bound is not None:
            bound.close()


async def relay_session(
    ctx: SessionContext,
    record: SessionRecord,
    client: trio.abc.Stream,
    upstream: trio.SocketStream,
    pipelined: bytes,
) -> None:
    counter = ctx.on_bytes(record) if ctx.on_bytes is not None else None
    async with upstream:
        try:
            if pipelined:
                await upstream.send_all(pipelined)
                record.bytes_up += len(pipelined)
                if counter is not None:
                    counter(Direction.UP, len(pipelined))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            record.outcome = Outcome.OK
            record.reason = str(RelayEnd.RESET)
            return
        result = await relay(
            client, upstream, idle_timeout=ctx.config.timeouts.idle, on_bytes=counter
        )
    record.outcome = Outcome.OK
    record.reason = str(result.end)
    record.bytes_up += result.bytes_up
    record.bytes_down += result.bytes_down


def handshake_deadline(ctx: SessionContext, record: SessionRecord) -> float:
    """One deadline for the whole negotiation, counted from accept (not per read)."""
    return record.started_at + ctx.config.timeouts.handshake
