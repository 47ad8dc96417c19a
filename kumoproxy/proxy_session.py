"""PROXY protocol (v1/v2) sessions: the header names the source and the destination.

There is no reply channel: any refusal or failure closes the connection at
once (wire.md §2), and the session's log line says why.
"""

from __future__ import annotations

import ipaddress

import trio

from kumoproxy.errors import EgressError, RemoteProtocolError
from kumoproxy.policy import Refusal, RefusalReason, select_source
from kumoproxy.proto import proxy_protocol
from kumoproxy.proto.common import format_endpoint
from kumoproxy.relay import receive_some
from kumoproxy.session import (
    HANDSHAKE_READ_SIZE,
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
)


async def _read_proxy_header(
    stream: trio.abc.Stream,
) -> tuple[proxy_protocol.ProxyHeader, bytes]:
    buffer = bytearray()
    while (parsed := proxy_protocol.maybe_parse(buffer)) is None:
        data = await receive_some(stream, HANDSHAKE_READ_SIZE)
        if not data:
            raise RemoteProtocolError(
                f"connection closed after {len(buffer)} bytes of an incomplete PROXY header"
            )
        buffer += data
    header, consumed = parsed
    return header, bytes(buffer[consumed:])


async def run_proxy(
    ctx: SessionContext,
    record: SessionRecord,
    stream: trio.abc.HalfCloseableStream,
    *,
    over_limit: Refusal | None = None,
) -> None:
    """Serve one PROXY-protocol client, filling ``record``. Never raises.

    There is no reply channel: any refusal or failure closes at once, and
    so does a session accepted beyond ``max_sessions`` or ``per_client``.
    """
    try:
        if over_limit is not None:
            raise refuse(record, over_limit)
        with handshake_phase(ctx, record) as phase:
            header, pipelined = await _read_proxy_header(stream)
        if not phase.completed:
            return
        if header.command is proxy_protocol.Command.LOCAL:
            record.outcome = Outcome.HEALTH_CHECK
            return
        endpoints = header.tcp_endpoints
        if endpoints is None:
            raise refuse(
                record,
                Refusal(
                    RefusalReason.PROTOCOL,
                    f"PROXY v{header.version} header names no TCP destination "
                    f"({header.family.name}/{header.transport.name})",
                ),
            )
        (source_ip, _ignored_port), (dest_ip, dest_port) = endpoints
        record.source = str(source_ip)
        record.destination = format_endpoint(dest_ip, dest_port)
        choice = select_source(ctx.config, requested=source_ip, user=None)
        if isinstance(choice, Refusal):
            raise refuse(record, choice)
        record.source_ip = choice
        async with open_upstream(
            ctx, record, host=dest_ip, port=dest_port, source=choice, bound=None
        ) as upstream:
            local_host, local_port = upstream.socket.getsockname()[:2]
            record.source = format_endpoint(ipaddress.ip_address(local_host), local_port)
            await relay_session(ctx, record, stream, upstream, pipelined)
    except RemoteProtocolError as exc:
        protocol_failed(record, exc)
    except EgressError as exc:
        egress_failed(record, exc)
    except Refused:
        pass
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        record.detail = f"client connection lost: {exc}"
