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
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, assert_never

import trio

from kumoproxy import egress
from kumoproxy.config import Config, IPAddress, UserConfig
from kumoproxy.errors import (
    ConnectFailedError,
    ConnectTimeoutError,
    EgressError,
    RemoteProtocolError,
    ResolveError,
)
from kumoproxy.passwords import PasswordVerifier
from kumoproxy.policy import (
    Refusal,
    RefusalReason,
    check_destination,
    family_matches,
    select_source,
)
from kumoproxy.proto import proxy_protocol, socks5
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


class _Refused(Exception):
    """Internal: stop the session with a refusal already recorded."""


def _fmt(host: IPAddress | str, port: int) -> str:
    return f"[{host}]:{port}" if isinstance(host, ipaddress.IPv6Address) else f"{host}:{port}"


def _refuse(record: SessionRecord, refusal: Refusal) -> _Refused:
    record.outcome = Outcome.REFUSED
    record.reason = str(refusal.reason)
    record.detail = refusal.detail
    record.reply = refusal.reply
    return _Refused(refusal.detail)


def _egress_failed(record: SessionRecord, exc: EgressError) -> _Refused:
    record.outcome = Outcome(exc.result)
    record.reply = exc.reply
    record.detail = str(exc)
    return _Refused(str(exc))


async def _send_then_close_quietly(stream: trio.abc.Stream, data: bytes) -> None:
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


async def _open_upstream(
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
                raise _refuse(record, refusal)
            record.destination = _fmt(allowed[0], port)
            last_error: EgressError | None = None
            for address in allowed:
                record.destination = _fmt(address, port)
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


async def _relay(
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


# --------------------------------------------------------------------------
# SOCKS5


class _Socks5Conn:
    """Pairs a stream with the server machine; reads until an event is ready."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream: trio.abc.Stream = stream  # replaced by the TLS stream after its handshake
        self.machine = socks5.Socks5Server()

    async def next_event(self) -> socks5.Greeting | socks5.Credentials | socks5.Request:
        while True:
            event = self.machine.next_event()
            if not isinstance(event, socks5.NeedData):
                return event
            self.machine.receive_data(bytes(await self.stream.receive_some(HANDSHAKE_READ_SIZE)))

    async def send(
        self, event: socks5.MethodSelection | socks5.AuthResult | socks5.ReplyEvent
    ) -> None:
        await self.stream.send_all(self.machine.send(event))


def _choose_method(config: Config, offered: tuple[int, ...]) -> socks5.Method:
    # wire.md §1: pick username/password whenever offered, so credentials a
    # client sends are always checked, even when auth is not required.
    if socks5.Method.USERNAME_PASSWORD in offered and config.auth.users:
        return socks5.Method.USERNAME_PASSWORD
    if socks5.Method.NO_AUTH in offered and not config.auth.required:
        return socks5.Method.NO_AUTH
    return socks5.Method.NO_ACCEPTABLE


async def _socks5_negotiate(
    ctx: SessionContext, record: SessionRecord, conn: _Socks5Conn
) -> tuple[socks5.Request, UserConfig | None, IPAddress | None]:
    """Greeting and authentication; returns the first request and the user."""
    greeting = await conn.next_event()
    assert isinstance(greeting, socks5.Greeting)
    method = _choose_method(ctx.config, greeting.methods)
    await conn.send(socks5.MethodSelection(method))
    if method is socks5.Method.NO_ACCEPTABLE:
        raise _refuse(
            record,
            Refusal(RefusalReason.AUTH, "no acceptable authentication method offered", reply=0xFF),
        )
    user: UserConfig | None = None
    requested: IPAddress | None = None
    if method is socks5.Method.USERNAME_PASSWORD:
        credentials = await conn.next_event()
        assert isinstance(credentials, socks5.Credentials)
        user, requested = await _authenticate(ctx, record, credentials)
        if user is None:
            await _slow_down_failure(ctx, record)
            await conn.send(socks5.AuthResult(False))
            raise _Refused(record.detail or "authentication failed")
        if record.client_ip is not None:
            ctx.auth_throttle.record_success(record.client_ip)
        await conn.send(socks5.AuthResult(True))
    request = await conn.next_event()
    assert isinstance(request, socks5.Request)
    return request, user, requested


async def _slow_down_failure(ctx: SessionContext, record: SessionRecord) -> None:
    """Repeated failures from one address wait longer and longer (bounded)."""
    if record.client_ip is None:
        return
    delay = ctx.auth_throttle.record_failure(record.client_ip, trio.current_time())
    record.detail = f"{record.detail}; failure reply delayed {delay:g}s"
    await trio.sleep(delay)


async def _authenticate(
    ctx: SessionContext, record: SessionRecord, credentials: socks5.Credentials
) -> tuple[UserConfig | None, IPAddress | None]:
    """Check RFC 1929 credentials; ``name+<ip>`` also names a source."""
    raw = credentials.username.decode("utf-8", "replace")
    name, plus, source_text = raw.partition("+")
    record.user = name
    requested: IPAddress | None = None
    if plus:
        try:
            requested = ipaddress.ip_address(source_text)
        except ValueError:
            _refuse(record, Refusal(RefusalReason.AUTH, f"bad source in username: {source_text!r}"))
            return None, None
    user = ctx.config.auth.user(name)
    if user is None or not await ctx.passwords.verify(
        name, credentials.password, user.password_hash
    ):
        _refuse(record, Refusal(RefusalReason.AUTH, f"wrong username or password for {name!r}"))
        return None, None
    return user, requested


def handshake_deadline(ctx: SessionContext, record: SessionRecord) -> float:
    """One deadline for the whole negotiation, counted from accept (not per read)."""
    return record.started_at + ctx.config.timeouts.handshake


async def _tls_handshake(
    record: SessionRecord, stream: trio.abc.Stream, context: ssl.SSLContext
) -> trio.SSLStream[trio.abc.Stream]:
    """Wrap the client in TLS; a missing or untrusted client certificate is an auth refusal."""
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        reason = getattr(cause, "reason", None) or str(cause or exc)
        certificate_problem = isinstance(cause, ssl.SSLError) and "CERTIFICATE" in str(reason)
        refusal = Refusal(
            RefusalReason.AUTH if certificate_problem else RefusalReason.PROTOCOL,
            f"TLS handshake failed: {reason}",
        )
        refused = _refuse(record, refusal)
        record.reply = None  # no SOCKS5 reply is possible before TLS is up
        raise refused from exc
    return tls


async def run_socks5(
    ctx: SessionContext,
    record: SessionRecord,
    stream: trio.abc.Stream,
    *,
    tls_context: ssl.SSLContext | None = None,
) -> None:
    """Serve one SOCKS5 client (over TLS when ``tls_context``), filling ``record``. Never raises."""
    bound: egress.BoundSocket | None = None
    conn = _Socks5Conn(stream)
    try:
        try:
            with trio.fail_at(handshake_deadline(ctx, record)):
                if tls_context is not None:
                    conn.stream = await _tls_handshake(record, stream, tls_context)
                request, user, requested = await _socks5_negotiate(ctx, record, conn)
                if request.command is socks5.Command.BIND:
                    bound = await _socks5_bind(ctx, record, conn, request, user)
                    # The machine allows only CONNECT after BIND (wire.md §1).
                    after_bind = await conn.next_event()
                    assert isinstance(after_bind, socks5.Request)
                    request = after_bind
            record.handshake_seconds = trio.current_time() - record.started_at
        except trio.TooSlowError:
            record.outcome = Outcome.TIMEOUT
            record.reason = str(RefusalReason.PROTOCOL)
            record.detail = f"handshake not finished within {ctx.config.timeouts.handshake:g}s"
            return
        match request.command:
            case socks5.Command.UDP_ASSOCIATE:
                raise _refuse(
                    record,
                    Refusal(RefusalReason.PROTOCOL, "UDP ASSOCIATE is not supported", reply=7),
                )
            case socks5.Command.BIND:
                raise AssertionError("the SOCKS5 machine only allows CONNECT after BIND")
            case socks5.Command.CONNECT:
                pass
            case _ as unreachable:
                assert_never(unreachable)
        destination = request.destination
        record.destination = _fmt(destination.host, destination.port)
        source: IPAddress | None
        if bound is not None:
            source = bound.source
        else:
            choice = select_source(ctx.config, requested=requested, user=user)
            if isinstance(choice, Refusal):
                raise _refuse(record, choice)
            source = choice
        upstream = await _open_upstream(
            ctx, record, host=destination.host, port=destination.port, source=source, bound=bound
        )
        bound = None
        local_host, local_port = upstream.socket.getsockname()[:2]
        local = socks5.Endpoint(ipaddress.ip_address(local_host), local_port)
        record.source = _fmt(local.host, local.port)
        record.reply = socks5.Reply.SUCCEEDED
        try:
            await conn.send(socks5.ReplyEvent(socks5.Reply.SUCCEEDED, local))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await upstream.aclose()
            record.outcome = Outcome.CLOSED
            return
        await _relay(ctx, record, conn.stream, upstream, conn.machine.trailing_data)
    except RemoteProtocolError as exc:
        record.outcome = Outcome.PROTOCOL_ERROR
        record.reason = str(RefusalReason.PROTOCOL)
        record.detail = str(exc)
        await _send_then_close_quietly(conn.stream, exc.answer)
    except EgressError as exc:
        _egress_failed(record, exc)
        await _send_failure_reply(conn, record)
    except _Refused:
        await _send_failure_reply(conn, record)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        record.detail = f"client connection lost: {exc}"
    finally:
        if bound is not None:
            bound.close()
        if conn.stream is not stream:  # TLS: say close_notify, within a bound
            with trio.move_on_after(REFUSAL_WRITE_TIMEOUT) as cleanup:
                cleanup.shield = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await conn.stream.aclose()


async def _socks5_bind(
    ctx: SessionContext,
    record: SessionRecord,
    conn: _Socks5Conn,
    request: socks5.Request,
    user: UserConfig | None,
) -> egress.BoundSocket:
    """KumoMTA's BIND: bind a socket to the requested source, reply with it."""
    host = request.destination.host
    if isinstance(host, str):
        raise _refuse(
            record,
            Refusal(RefusalReason.SOURCE, f"BIND needs a source IP, not a name ({host})", reply=8),
        )
    choice = select_source(ctx.config, requested=host, user=user)
    if isinstance(choice, Refusal):
        record.source = str(host)
        raise _refuse(record, choice)
    assert choice is not None
    record.source = str(choice)
    bound = await egress.bind_source(choice)
    try:
        await conn.send(socks5.ReplyEvent(socks5.Reply.SUCCEEDED, socks5.Endpoint(*bound.local)))
    except BaseException:
        bound.close()
        raise
    return bound


async def _send_failure_reply(conn: _Socks5Conn, record: SessionRecord) -> None:
    """Answer a refused or failed request where the protocol allows an answer."""
    machine = conn.machine
    if machine.state is not socks5.ServerState.SEND_REPLY or record.reply is None:
        return
    data = machine.send(socks5.ReplyEvent(socks5.Reply(record.reply)))
    await _send_then_close_quietly(conn.stream, data)


# --------------------------------------------------------------------------
# PROXY protocol


async def _read_proxy_header(
    stream: trio.abc.Stream,
) -> tuple[proxy_protocol.ProxyHeader, bytes]:
    buffer = bytearray()
    while (parsed := proxy_protocol.maybe_parse(buffer)) is None:
        data = await stream.receive_some(HANDSHAKE_READ_SIZE)
        if not data:
            raise RemoteProtocolError(
                f"connection closed after {len(buffer)} bytes of an incomplete PROXY header"
            )
        buffer += data
    header, consumed = parsed
    return header, bytes(buffer[consumed:])


async def run_proxy(
    ctx: SessionContext, record: SessionRecord, stream: trio.abc.HalfCloseableStream
) -> None:
    """Serve one PROXY-protocol client, filling ``record``. Never raises.

    There is no reply channel: any refusal or failure closes at once.
    """
    try:
        try:
            with trio.fail_at(handshake_deadline(ctx, record)):
                header, pipelined = await _read_proxy_header(stream)
            record.handshake_seconds = trio.current_time() - record.started_at
        except trio.TooSlowError:
            record.outcome = Outcome.TIMEOUT
            record.reason = str(RefusalReason.PROTOCOL)
            record.detail = f"PROXY header not complete within {ctx.config.timeouts.handshake:g}s"
            return
        if header.command is proxy_protocol.Command.LOCAL:
            record.outcome = Outcome.HEALTH_CHECK
            return
        endpoints = header.tcp_endpoints
        if endpoints is None:
            raise _refuse(
                record,
                Refusal(
                    RefusalReason.PROTOCOL,
                    f"PROXY v{header.version} header names no TCP destination "
                    f"({header.family.name}/{header.transport.name})",
                ),
            )
        (source_ip, _ignored_port), (dest_ip, dest_port) = endpoints
        record.source = str(source_ip)
        record.destination = _fmt(dest_ip, dest_port)
        choice = select_source(ctx.config, requested=source_ip, user=None)
        if isinstance(choice, Refusal):
            raise _refuse(record, choice)
        upstream = await _open_upstream(
            ctx, record, host=dest_ip, port=dest_port, source=choice, bound=None
        )
        local_host, local_port = upstream.socket.getsockname()[:2]
        record.source = _fmt(ipaddress.ip_address(local_host), local_port)
        await _relay(ctx, record, stream, upstream, pipelined)
    except RemoteProtocolError as exc:
        record.outcome = Outcome.PROTOCOL_ERROR
        record.reason = str(RefusalReason.PROTOCOL)
        record.detail = str(exc)
    except EgressError as exc:
        _egress_failed(record, exc)
    except _Refused:
        pass
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        record.detail = f"client connection lost: {exc}"
