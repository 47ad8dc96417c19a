"""SOCKS5 sessions: RFC 1928/1929 and KumoMTA's BIND-then-CONNECT, over TCP or TLS.

The trio shell around :class:`kumoproxy.proto.socks5.Socks5Server`: it reads
events, asks :mod:`kumoproxy.policy` and answers. Every refusal answers with
the reply the protocol allows at that point, then closes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
from typing import assert_never

import trio

from kumoproxy import egress
from kumoproxy.config import Config, IPAddress, UserConfig
from kumoproxy.errors import EgressError, RemoteProtocolError
from kumoproxy.policy import Refusal, RefusalReason, select_source
from kumoproxy.proto import socks5
from kumoproxy.proto.common import format_endpoint
from kumoproxy.relay import receive_some, send_all
from kumoproxy.session import (
    HANDSHAKE_READ_SIZE,
    REFUSAL_WRITE_TIMEOUT,
    Outcome,
    Refused,
    SessionContext,
    SessionRecord,
    egress_failed,
    handshake_phase,
    open_upstream,
    protocol_failed,
    refuse,
    relay_session,
    send_then_close_quietly,
)


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
            self.machine.receive_data(bytes(await receive_some(self.stream, HANDSHAKE_READ_SIZE)))

    async def send(
        self, event: socks5.MethodSelection | socks5.AuthResult | socks5.ReplyEvent
    ) -> None:
        await send_all(self.stream, self.machine.send(event))


def _choose_method(config: Config, offered: tuple[int, ...]) -> socks5.Method:
    # wire.md §1: pick username/password whenever offered, so credentials a
    # client sends are always checked, even when auth is not required.
    if socks5.Method.USERNAME_PASSWORD in offered and config.auth.users:
        return socks5.Method.USERNAME_PASSWORD
    if socks5.Method.NO_AUTH in offered and not config.auth.required:
        return socks5.Method.NO_AUTH
    return socks5.Method.NO_ACCEPTABLE


async def _socks5_negotiate(
    ctx: SessionContext, record: SessionRecord, conn: _Socks5Conn, over_limit: Refusal | None
) -> tuple[socks5.Request, UserConfig | None, IPAddress | None]:
    """Greeting and authentication; returns the first request and the user."""
    greeting = await conn.next_event()
    assert isinstance(greeting, socks5.Greeting)
    if over_limit is not None:
        # Answer REP 02 at the request without paying for authentication;
        # a client that can only authenticate gets "no acceptable method".
        cheap = socks5.Method.NO_AUTH in greeting.methods
        await conn.send(
            socks5.MethodSelection(socks5.Method.NO_AUTH if cheap else socks5.Method.NO_ACCEPTABLE)
        )
        if cheap:
            await conn.next_event()
        raise refuse(record, over_limit)
    method = _choose_method(ctx.config, greeting.methods)
    await conn.send(socks5.MethodSelection(method))
    if method is socks5.Method.NO_ACCEPTABLE:
        raise refuse(
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
            raise Refused(record.detail or "authentication failed")
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
            refuse(record, Refusal(RefusalReason.AUTH, f"bad source in username: {source_text!r}"))
            return None, None
    user = ctx.config.auth.user(name)
    if user is None or not await ctx.passwords.verify(
        name, credentials.password, user.password_hash
    ):
        refuse(record, Refusal(RefusalReason.AUTH, f"wrong username or password for {name!r}"))
        return None, None
    return user, requested


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
        refused = refuse(record, refusal)
        record.reply = None  # no SOCKS5 reply is possible before TLS is up
        raise refused from exc
    return tls


async def run_socks5(
    ctx: SessionContext,
    record: SessionRecord,
    stream: trio.abc.Stream,
    *,
    tls_context: ssl.SSLContext | None = None,
    over_limit: Refusal | None = None,
) -> None:
    """Serve one SOCKS5 client (over TLS when ``tls_context``), filling ``record``. Never raises.

    ``over_limit``: the session was accepted beyond ``max_sessions`` or
    ``per_client``; it is answered REP 02 as cheaply as the protocol allows.
    """
    bound: egress.BoundSocket | None = None
    conn = _Socks5Conn(stream)
    try:
        with handshake_phase(ctx, record) as phase:
            if tls_context is not None:
                if over_limit is not None:  # not worth a TLS handshake
                    raise refuse(record, over_limit)
                conn.stream = await _tls_handshake(record, stream, tls_context)
            request, user, requested = await _socks5_negotiate(ctx, record, conn, over_limit)
            if request.command is socks5.Command.BIND:
                bound = await _socks5_bind(ctx, record, conn, request, user)
                # The machine allows only CONNECT after BIND (wire.md §1).
                after_bind = await conn.next_event()
                assert isinstance(after_bind, socks5.Request)
                request = after_bind
        if not phase.completed:
            return
        match request.command:
            case socks5.Command.UDP_ASSOCIATE:
                raise refuse(
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
        record.destination = format_endpoint(destination.host, destination.port)
        source: IPAddress | None
        if bound is not None:
            source = bound.source
        else:
            choice = select_source(ctx.config, requested=requested, user=user)
            if isinstance(choice, Refusal):
                raise refuse(record, choice)
            source = record.source_ip = choice
        taken, bound = bound, None  # open_upstream owns the bound socket now
        async with open_upstream(
            ctx, record, host=destination.host, port=destination.port, source=source, bound=taken
        ) as upstream:
            local_host, local_port = upstream.socket.getsockname()[:2]
            local = socks5.Endpoint(ipaddress.ip_address(local_host), local_port)
            record.source = format_endpoint(local.host, local.port)
            record.reply = socks5.Reply.SUCCEEDED
            try:
                await conn.send(socks5.ReplyEvent(socks5.Reply.SUCCEEDED, local))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                record.outcome = Outcome.CLOSED
                record.detail = "client left before the CONNECT reply"
                return
            await relay_session(ctx, record, conn.stream, upstream, conn.machine.trailing_data)
    except RemoteProtocolError as exc:
        protocol_failed(record, exc)
        await send_then_close_quietly(conn.stream, exc.answer)
    except EgressError as exc:
        egress_failed(record, exc)
        await _send_failure_reply(conn, record)
    except Refused:
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
        raise refuse(
            record,
            Refusal(RefusalReason.SOURCE, f"BIND needs a source IP, not a name ({host})", reply=8),
        )
    choice = select_source(ctx.config, requested=host, user=user)
    if isinstance(choice, Refusal):
        record.source = str(host)
        raise refuse(record, choice)
    assert choice is not None
    record.source = str(choice)
    record.source_ip = choice
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
    await send_then_close_quietly(conn.stream, data)
