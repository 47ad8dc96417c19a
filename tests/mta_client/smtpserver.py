"""A real SMTP server on trio, for the session tests: configurable, and it records everything.

It speaks enough RFC 5321 to be a strict sink: EHLO/HELO, STARTTLS (RFC 3207,
with an ``ssl`` server context, e.g. from trustme), MAIL/RCPT/DATA with
dot-unstuffing (:func:`mta_client.proto.message.unstuff`, which refuses bare
CR/LF and early end-of-data), RSET, NOOP, QUIT; 503 for commands out of
sequence, 554 to DATA without an accepted recipient (RFC 2920 §3.1).
Commands are processed one line at a time from the buffer, so pipelined
commands get their replies in order.

Configuration (:class:`ServerConfig`): the banner, what EHLO advertises
(PIPELINING, SIZE n, 8BITMIME, SMTPUTF8, STARTTLS, or 502 to EHLO), verdicts
per sender and per recipient, the DATA-END verdict, and faults by phase: reply
421 and close, close without replying, close after n octets of DATA content,
sleep before replying (``trio.sleep``, so ``autojump_clock`` drives it), or
stop reading after n octets of DATA content (a stalled receiver).
Phases are the client's :class:`~mta_client.proto.smtp.Command` values.

Recorded per connection (:class:`Connection`): the peer address, every chunk
received and every reply sent in order (``log``), every command line, and
each message (:class:`Received`) with its raw payload, the unstuffed data and
whether TLS was on.

Usage::

    async with smtp_server(ServerConfig(rcpt_replies={"x@b.test": "550 5.1.1 no"})) as server:
        stream = await trio.open_tcp_stream(*server.address)
        ...
        assert server.connections[0].messages[0].data == b"..."

:meth:`SmtpTestServer.handle` serves one connection on any trio stream, e.g.
one end of ``trio.testing.memory_stream_pair()``.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final, Literal

import trio

from mta_client.errors import RemoteProtocolError
from mta_client.proto.message import unstuff
from mta_client.proto.smtp import Command

__all__ = [
    "Connection",
    "Received",
    "ServerConfig",
    "SmtpTestServer",
    "serve_smtp",
    "smtp_server",
]

MAX_COMMAND_LINE: Final = 4096
"""Buffered octets without a CRLF before the server gives up on the client
(RFC 5321 §4.5.3.1.4 allows 512 per command line; be lenient, stay bounded)."""

_PATH: Final = re.compile(r"(?i)(FROM|TO):<([^>]*)>(.*)")


@dataclass(frozen=True)
class ServerConfig:
    """How the test server behaves. Reply texts are whole lines without CRLF."""

    banner: str = "220 mx.test ESMTP test server"
    hostname: str = "mx.test"
    ehlo_supported: bool = True  # False: 502 to EHLO (the client must fall back to HELO)
    pipelining: bool = True
    size: int | None = None  # advertise "SIZE n"
    eight_bit_mime: bool = True
    smtputf8: bool = False
    tls_context: ssl.SSLContext | None = None  # advertise and serve STARTTLS
    starttls_reply: str = "220 2.0.0 Ready to start TLS"
    mail_replies: Mapping[str, str] = field(default_factory=dict)  # sender -> reply
    rcpt_replies: Mapping[str, str] = field(default_factory=dict)  # recipient -> reply
    data_end_reply: str = "250 2.0.0 Ok: queued as TEST"
    reply_421_at: Command | None = None  # answer 421 at this phase, then close
    close_at: Command | None = None  # close instead of answering at this phase
    close_after_data_bytes: int | None = None  # close once this much content arrived
    stall_after_data_bytes: int | None = None  # stop reading once this much content arrived
    delays: Mapping[Command, float] = field(default_factory=dict)  # sleep before replying
    # Called with each message's running total before its DATA-END reply
    # (tests wait on it instead of polling the record).
    on_message: Callable[[int], None] | None = None


@dataclass
class Received:
    """One message the server accepted the content of."""

    sender: str
    mail_params: str  # what followed the path on the MAIL line, e.g. " SIZE=12"
    recipients: tuple[str, ...]
    raw: bytes  # the payload as it came, terminator included
    data: bytes  # unstuffed, terminator removed
    tls: bool


@dataclass
class Connection:
    """One connection as the server saw it."""

    peer: tuple[str, int] | None
    log: list[tuple[Literal["recv", "send"], bytes]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    tls: bool = False
    error: str | None = None  # why it ended, if not by QUIT
    closed: trio.Event = field(default_factory=trio.Event)

    @property
    def segments(self) -> list[bytes]:
        """Every chunk ``receive_some`` returned, in order."""
        return [data for direction, data in self.log if direction == "recv"]

    @property
    def verbs(self) -> list[str]:
        """The first word of every command line, upper-cased."""
        return [line.split(" ", 1)[0].upper() for line in self.commands]


class _Hangup(Exception):
    """Close the connection now (a configured fault, or the client's EOF)."""


@dataclass
class _Transaction:
    sender: str
    params: str
    recipients: list[str] = field(default_factory=list)


def _code(line: str) -> int:
    return int(line[:3])


class _ServerSession:
    def __init__(self, config: ServerConfig, stream: trio.abc.Stream, record: Connection) -> None:
        self.config = config
        self.stream = stream
        self.record = record
        self.buffer = bytearray()
        self.greeted = False  # EHLO/HELO done (again after TLS)
        self.transaction: _Transaction | None = None

    async def run(self) -> None:
        refused = _code(self.config.banner) != 220
        await self.reply(Command.GREETING, self.config.banner)
        while True:
            line = await self.read_line()
            text = line.decode("utf-8", "backslashreplace")
            self.record.commands.append(text)
            verb, _, argument = text.partition(" ")
            verb = verb.upper()
            if verb == "QUIT":
                await self.reply(Command.QUIT, "221 2.0.0 Bye")
                return
            if refused:  # RFC 5321 §3.1: after a 554 greeting, only QUIT
                await self.send("503 5.5.1 No service")
                continue
            await self.dispatch(verb, argument)

    async def dispatch(self, verb: str, argument: str) -> None:
        match verb:
            case "EHLO":
                await self.ehlo(argument)
            case "HELO":
                self.greeted, self.transaction = True, None
                await self.reply(Command.HELO, f"250 {self.config.hostname}")
            case "STARTTLS":
                await self.starttls()
            case "MAIL":
                await self.mail(argument)
            case "RCPT":
                await self.rcpt(argument)
            case "DATA":
                await self.data()
            case "RSET":
                self.transaction = None
                await self.reply(Command.RSET, "250 2.0.0 Ok")
            case "NOOP":
                await self.reply(Command.NOOP, "250 2.0.0 Ok")
            case _:
                await self.send("500 5.5.2 Command not recognized")

    async def ehlo(self, argument: str) -> None:
        if not self.config.ehlo_supported:
            await self.reply(Command.EHLO, "502 5.5.2 Command not recognized")
            return
        self.greeted, self.transaction = True, None
        config = self.config
        keywords = ["ENHANCEDSTATUSCODES"]
        if config.pipelining:
            keywords.append("PIPELINING")
        if config.size is not None:
            keywords.append(f"SIZE {config.size}")
        if config.eight_bit_mime:
            keywords.append("8BITMIME")
        if config.smtputf8:
            keywords.append("SMTPUTF8")
        if config.tls_context is not None and not self.record.tls:
            keywords.append("STARTTLS")
        lines = [f"{config.hostname} greets {argument}", *keywords]
        text = "\r\n".join(
            f"250{' ' if n == len(lines) - 1 else '-'}{line}" for n, line in enumerate(lines)
        )
        await self.reply(Command.EHLO, text)

    async def starttls(self) -> None:
        context = self.config.tls_context
        if context is None or self.record.tls:
            await self.send("502 5.5.1 STARTTLS not available")
            return
        reply = self.config.starttls_reply
        await self.reply(Command.STARTTLS, reply)
        if _code(reply) != 220:
            return
        if self.buffer:  # RFC 3207 §5: no pipelining past STARTTLS
            raise RemoteProtocolError(f"client pipelined {bytes(self.buffer)!r} after STARTTLS")
        tls_stream = trio.SSLStream(self.stream, context, server_side=True)
        self.stream = tls_stream
        await tls_stream.do_handshake()
        self.record.tls = True
        self.greeted, self.transaction = False, None  # RFC 3207 §4.2

    async def mail(self, argument: str) -> None:
        match = _PATH.fullmatch(argument)
        if not self.greeted:
            await self.reply(Command.MAIL, "503 5.5.1 Error: send HELO/EHLO first")
        elif self.transaction is not None:
            await self.reply(Command.MAIL, "503 5.5.1 Error: nested MAIL command")
        elif match is None or match.group(1).upper() != "FROM":
            await self.reply(Command.MAIL, "501 5.5.4 Syntax: MAIL FROM:<address>")
        else:
            sender = match.group(2)
            reply = self.config.mail_replies.get(sender, "250 2.1.0 Ok")
            if _code(reply) // 100 == 2:
                self.transaction = _Transaction(sender, match.group(3))
            await self.reply(Command.MAIL, reply)

    async def rcpt(self, argument: str) -> None:
        match = _PATH.fullmatch(argument)
        if self.transaction is None:
            await self.reply(Command.RCPT, "503 5.5.1 Error: need MAIL command")
        elif match is None or match.group(1).upper() != "TO":
            await self.reply(Command.RCPT, "501 5.5.4 Syntax: RCPT TO:<address>")
        else:
            recipient = match.group(2)
            reply = self.config.rcpt_replies.get(recipient, "250 2.1.5 Ok")
            if _code(reply) // 100 == 2:
                self.transaction.recipients.append(recipient)
            await self.reply(Command.RCPT, reply)

    async def data(self) -> None:
        transaction = self.transaction
        if transaction is None:
            await self.reply(Command.DATA, "503 5.5.1 Error: need RCPT command")
            return
        if not transaction.recipients:
            await self.reply(Command.DATA, "554 5.5.1 Error: no valid recipients")
            return
        await self.reply(Command.DATA, "354 End data with <CR><LF>.<CR><LF>")
        raw = await self.read_data()
        self.transaction = None
        self.record.messages.append(
            Received(
                transaction.sender,
                transaction.params,
                tuple(transaction.recipients),
                raw,
                unstuff(raw),
                self.record.tls,
            )
        )
        if self.config.on_message is not None:
            self.config.on_message(len(self.record.messages))
        await self.reply(Command.DATA_END, self.config.data_end_reply)

    # -- I/O ------------------------------------------------------------------

    async def fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise _Hangup("client closed the connection")
        self.record.log.append(("recv", bytes(data)))
        self.buffer += data

    async def read_line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_COMMAND_LINE:
                raise RemoteProtocolError("command line too long")
            await self.fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def read_data(self) -> bytes:
        """One DATA payload: up to and including ``<CRLF>.<CRLF>`` (or a lone ``.`` line)."""
        limit = self.config.close_after_data_bytes
        while True:
            if limit is not None and len(self.buffer) >= limit:
                raise _Hangup(f"closing after {limit} octets of data (configured fault)")
            stall = self.config.stall_after_data_bytes
            if stall is not None and len(self.buffer) >= stall:
                await trio.sleep_forever()
            if self.buffer.startswith(b".\r\n"):
                end = 3
            else:
                found = self.buffer.find(b"\r\n.\r\n")
                end = found + 5 if found >= 0 else -1
            if end >= 0:
                raw = bytes(self.buffer[:end])
                del self.buffer[:end]
                return raw
            await self.fill()

    async def reply(self, phase: Command, text: str) -> None:
        """Answer at ``phase``, applying the configured delay and faults."""
        config = self.config
        delay = config.delays.get(phase)
        if delay is not None:
            await trio.sleep(delay)
        if config.close_at is phase:
            raise _Hangup(f"closing at {phase} (configured fault)")
        if config.reply_421_at is phase:
            await self.send(f"421 4.3.2 {config.hostname} closing at {phase} (configured fault)")
            raise _Hangup(f"421 at {phase}")
        await self.send(text)

    async def send(self, text: str) -> None:
        data = text.encode("utf-8") + b"\r\n"
        self.record.log.append(("send", data))
        await self.stream.send_all(data)


class SmtpTestServer:
    """The server's configuration and what it recorded; ``address`` once listening."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.connections: list[Connection] = []
        self.address: tuple[str, int] = ("", 0)

    async def handle(self, stream: trio.abc.Stream, peer: tuple[str, int] | None = None) -> None:
        """Serve one connection on ``stream``; never raises (errors go to the record)."""
        record = Connection(peer)
        self.connections.append(record)
        session = _ServerSession(self.config, stream, record)
        try:
            await session.run()
        except (_Hangup, RemoteProtocolError, trio.BrokenResourceError) as exc:
            record.error = str(exc) or repr(exc)
        else:
            with trio.move_on_after(5):
                await session.stream.aclose()
        finally:
            await trio.aclose_forcefully(session.stream)
            record.closed.set()

    async def _handle_socket(self, stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        await self.handle(stream, (host, port))


async def serve_smtp(
    server: SmtpTestServer,
    *,
    task_status: trio.TaskStatus[SmtpTestServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on 127.0.0.1, an ephemeral port; started() with ``server``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]
    server.address = (host, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server._handle_socket, listeners)
        task_status.started(server)


@asynccontextmanager
async def smtp_server(config: ServerConfig | None = None) -> AsyncIterator[SmtpTestServer]:
    """A running :class:`SmtpTestServer`, stopped on exit."""
    server = SmtpTestServer(config if config is not None else ServerConfig())
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_smtp, server)
        yield server
        nursery.cancel_scope.cancel()
