"""One SMTP client session over any trio stream: the shell around the sans-IO machine.

Specs: RFC 5321 (SMTP), RFC 2920 (PIPELINING), RFC 3207 (STARTTLS),
RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8), RFC 3463
(enhanced status codes).

:class:`SmtpSession` moves bytes between a ``trio.abc.Stream`` and
:class:`mta_client.proto.smtp.SmtpClient`; every protocol decision (what may
be sent, how a reply is framed, which reply answers which command) is the
machine's. The message bytes are what :func:`~mta_client.proto.message.prepare_data`
makes of them and are never re-serialised, so a DKIM signature survives.

One session::

    start(stream)
      greeting ──not 220──> 421: ConnectionLostError, 4xx: TransientSmtpError,
        │                   5xx: PermanentSmtpError (QUIT sent first)
      EHLO ──5xx──> HELO (RFC 5321 §4.1.4, §3.2)
        │
      STARTTLS? (TlsMode)
        │  disabled: never
        │  opportunistic: when advertised; refused -> go on in the clear
        │  required: not advertised / refused / handshake failed -> TlsRequiredError
        │  220 -> TLS handshake -> reset_after_tls() -> EHLO again (RFC 3207 §4.2)
        v
    deliver(envelope) ... deliver(envelope)      (RSET first when the last one failed)
        │  with PIPELINING: [RSET] MAIL RCPT... DATA in one write, replies in order
        │  without: one command, one reply
        │  354 -> message content -> DATA-END reply
        v
    quit()  (QUIT, then close)

Outcomes of a transaction are per recipient (:class:`RecipientResult`):
``delivered`` after a 2xx to the DATA-END, ``deferred`` on 4xx, ``bounced``
on 5xx. A refusal of MAIL applies to every recipient; a refusal of DATA or
of the DATA-END to every recipient the server had accepted. Some refusals
are decided here without sending anything, with a synthetic reply: a message
over the advertised SIZE (552 5.3.4), a non-ASCII address to a server without
SMTPUTF8 (553 5.6.7), an address the machine will not encode (553 5.1.7 for
the sender, 553 5.1.3 for a recipient).

Errors that end the session are raised, and leave the stream closed:
:class:`ConnectionLostError` (421, EOF, reset), :class:`SmtpTimeoutError` (a
phase deadline of RFC 5321 §4.5.3.2 passed), ``RemoteProtocolError`` (the
server sent garbage), and cancellation. The caller treats the recipients of
an interrupted transaction as deferred.

8-bit bodies: ``BODY=8BITMIME`` is declared when the message has a byte
>= 0x80 and the server advertised 8BITMIME. When it did not, the message is
sent as is anyway: most servers accept 8-bit data regardless, and the
alternative (re-encoding to 7 bit, RFC 6152 §3) would break DKIM signatures.
"""

from __future__ import annotations

import contextlib
import enum
import math
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

import trio

from mta_client.errors import (
    ConnectionLostError,
    MtaClientError,
    PermanentSmtpError,
    SmtpReply,
    SmtpTimeoutError,
    TransientSmtpError,
)
from mta_client.errors import TlsHandshakeError as TlsHandshakeError
from mta_client.errors import TlsRequiredError as TlsRequiredError
from mta_client.proto.message import TERMINATOR, prepare_data
from mta_client.proto.smtp import (
    DATA_BLOCK_TIMEOUT,
    REPLY_TIMEOUTS,
    Capabilities,
    ClientCommand,
    ClientState,
    Command,
    Data,
    Ehlo,
    Helo,
    MailFrom,
    MessageContent,
    NeedData,
    Quit,
    RcptTo,
    Rset,
    ServerReply,
    SmtpClient,
    StartTls,
    UnsendableCommandError,
)

__all__ = [
    "DATA_BLOCK",
    "DATA_BLOCK_SIZE",
    "RECEIVE_SIZE",
    "DeliveryResult",
    "Envelope",
    "RecipientResult",
    "RecipientStatus",
    "SmtpSession",
    "TlsHandshakeError",
    "TlsMode",
    "TlsRequiredError",
]

DATA_BLOCK: Final = "data-block"
"""The ``timeouts`` key for each block of message content written
(RFC 5321 §4.5.3.2.5); the other keys are :class:`Command` values."""

DATA_BLOCK_SIZE: Final = 64 * 1024
"""Octets of message content per write, each bounded by the data-block timeout:
RFC 5321 §4.5.3.2.5 times each send, not the whole message, so a slow but
moving connection may carry a large message."""

RECEIVE_SIZE: Final = 64 * 1024
"""Octets asked of the stream per read. The machine bounds what one reply may
hold; this only sizes the reads."""

RecipientStatus = Literal["delivered", "deferred", "bounced"]


class TlsMode(enum.StrEnum):
    """When to use STARTTLS (RFC 3207)."""

    OPPORTUNISTIC = "opportunistic"
    """Use it when the server advertises it; otherwise, or when the server
    refuses it, go on in the clear."""
    REQUIRED = "required"
    """Use it or defer (:class:`TlsRequiredError`)."""
    DISABLED = "disabled"
    """Never use it."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message and its SMTP envelope.

    ``message`` is the raw message (header and body) as spooled; line endings
    may be LF or CRLF. It is sent exactly as :func:`prepare_data` makes it
    (CRLF line endings, dot-stuffing, terminator). ``sender`` may be ``""``
    (the null reverse-path of a bounce). Non-ASCII addresses make the
    transaction use SMTPUTF8.
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.recipients:
            raise ValueError("an envelope needs at least one recipient")

    @property
    def needs_smtputf8(self) -> bool:
        """Whether an address is non-ASCII (RFC 6531)."""
        return not (self.sender.isascii() and all(r.isascii() for r in self.recipients))


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What became of one recipient, and the reply that decided it."""

    recipient: str
    reply: SmtpReply
    status: RecipientStatus


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome of one transaction, one result per recipient in envelope order.

    ``data_reply`` is the server's last word on the message: the reply to
    the DATA-END, or the refusal of the DATA command; None when the
    transaction ended before DATA.
    """

    envelope: Envelope
    recipients: tuple[RecipientResult, ...]
    data_reply: SmtpReply | None

    def with_status(self, status: RecipientStatus) -> tuple[str, ...]:
        """The recipients that ended with ``status``."""
        return tuple(r.recipient for r in self.recipients if r.status == status)


def _local_reply(code: int, enhanced: str, text: str) -> SmtpReply:
    """A reply decided here, not by the server (nothing was sent)."""
    return SmtpReply(code, (text,), enhanced)


def _refusal_status(reply: SmtpReply) -> RecipientStatus:
    """A refusal: 5xx bounces; 4xx, and any reply that makes no sense here, defers."""
    return "bounced" if reply.is_permanent else "deferred"


def _final_status(reply: SmtpReply) -> RecipientStatus:
    """The DATA-END reply: 2xx delivered, 5xx bounced, anything else deferred."""
    return "delivered" if _is_2xx(reply) else _refusal_status(reply)


def _is_2xx(reply: SmtpReply) -> bool:
    return 200 <= reply.code < 300


def _message_size(prepared: bytes) -> int:
    """The SIZE value (RFC 1870 §4): octets with CRLF pairs, without the
    terminating ``.`` line or the dots added by stuffing.

    ``prepared`` is prepare_data's output: the stuffed lines are exactly the
    ones that start with ``..`` (a line that starts with ``.`` got one more).
    """
    stuffed = prepared.count(b"\r\n..") + prepared.startswith(b"..")
    return len(prepared) - len(TERMINATOR) - stuffed


@contextlib.contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """``trio.fail_after``, raising SmtpTimeoutError that names the phase."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError as exc:
        raise SmtpTimeoutError(
            f"{what}: not done within {seconds:g} s (RFC 5321 section 4.5.3.2)"
        ) from exc


def _parse_timeouts(overrides: Mapping[str, float] | None) -> tuple[Mapping[Command, float], float]:
    replies = dict(REPLY_TIMEOUTS)
    block = DATA_BLOCK_TIMEOUT
    for key, value in (overrides or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"timeouts[{key!r}]: {value!r} is not a number of seconds")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"timeouts[{key!r}]: {value!r} must be positive seconds")
        if key == DATA_BLOCK:
            block = float(value)
            continue
        try:
            command = Command(key)
        except ValueError:
            known = ", ".join([*(repr(c.value) for c in Command), repr(DATA_BLOCK)])
            raise ValueError(f"timeouts: unknown key {key!r}; expected one of {known}") from None
        replies[command] = float(value)
    return MappingProxyType(replies), block


# States from which QUIT may be sent (see the machine's transition table).
_QUIT_STATES: Final = frozenset(
    {
        ClientState.GREETED,
        ClientState.REFUSED,
        ClientState.READY,
        ClientState.MAIL,
        ClientState.RCPT,
        ClientState.ABORTED,
    }
)
# States in which a transaction may still be open: RSET before the next MAIL.
_RSET_STATES: Final = frozenset({ClientState.MAIL, ClientState.RCPT, ClientState.ABORTED})


class SmtpSession(trio.abc.AsyncResource):
    """One SMTP connection: greet, EHLO (HELO fallback), optional STARTTLS,
    then deliver envelopes, one at a time.

    Make one with :meth:`start`. It owns the stream from then on: any error
    that ends the session closes it, and so do :meth:`quit` and
    :meth:`aclose` (``async with`` calls :meth:`aclose`). A session serves one
    task at a time (``trio.BusyResourceError`` otherwise).

    Reply deadlines are RFC 5321 §4.5.3.2's (:data:`REPLY_TIMEOUTS`), each
    overridable through ``timeouts`` by :class:`Command` value (``"greeting"``,
    ``"MAIL"``, ``"DATA-END"``...), and ``"data-block"`` (:data:`DATA_BLOCK`)
    bounds each write of message content. Writing commands is bounded by the
    deadline of the reply they ask for; the TLS handshake by the STARTTLS one.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        ehlo: str,
        tls: TlsMode,
        tls_context: ssl.SSLContext | None,
        server_hostname: str | None,
        reply_timeouts: Mapping[Command, float],
        data_block_timeout: float,
    ) -> None:
        """Use :meth:`start`, which also validates the arguments and greets."""
        self._stream: trio.abc.Stream = stream
        self._machine = SmtpClient()
        self._ehlo = ehlo
        self._tls_mode = tls
        self._tls_context = tls_context
        self._server_hostname = server_hostname
        self._reply_timeouts = reply_timeouts
        self._data_block_timeout = data_block_timeout
        self._tls_active = False
        self._greeting: SmtpReply | None = None
        self._closed = False
        self._busy = False

    @classmethod
    async def start(
        cls,
        stream: trio.abc.Stream,
        *,
        ehlo: str,
        tls: TlsMode = TlsMode.OPPORTUNISTIC,
        tls_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeouts: Mapping[str, float] | None = None,
    ) -> SmtpSession:
        """Take over ``stream`` (just connected) and bring the session to READY.

        ``ehlo`` is our name for EHLO/HELO (an A-label or an address literal).
        ``tls_context`` defaults to ``ssl.create_default_context()``, which
        verifies the certificate against ``server_hostname`` (then required).
        MTA-to-MTA opportunistic TLS commonly does not verify (RFC 7435: any
        encryption beats none, and MX certificates often do not match): pass
        a context with ``check_hostname = False`` and ``verify_mode =
        ssl.CERT_NONE`` for that. Share one context between sessions: making
        one loads the trust store.

        Raises what the module docstring lists, plus :class:`TlsRequiredError`,
        :class:`TlsHandshakeError`, TransientSmtpError / PermanentSmtpError for
        a refused greeting or EHLO/HELO, and ValueError for bad arguments. On
        any error the stream is closed.
        """
        try:
            reply_timeouts, block = _parse_timeouts(timeouts)
            context = None
            if tls is not TlsMode.DISABLED:
                context = tls_context if tls_context is not None else ssl.create_default_context()
                if context.check_hostname and server_hostname is None:
                    raise ValueError(
                        "the TLS context checks host names: pass server_hostname "
                        "(the MX host name), or a context without check_hostname"
                    )
            session = cls(
                stream,
                ehlo=ehlo,
                tls=tls,
                tls_context=context,
                server_hostname=server_hostname,
                reply_timeouts=reply_timeouts,
                data_block_timeout=block,
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        try:
            await session._open()
        except BaseException:
            await session._abort()
            raise
        return session

    # -- state ----------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """What the server advertised in its last EHLO (all off after HELO)."""
        capabilities = self._machine.capabilities
        return capabilities if capabilities is not None else Capabilities()

    @property
    def tls_active(self) -> bool:
        """Whether the session runs over TLS (after STARTTLS)."""
        return self._tls_active

    @property
    def greeting(self) -> SmtpReply | None:
        """The server's greeting (None until it arrived)."""
        return self._greeting

    @property
    def usable(self) -> bool:
        """Whether :meth:`deliver` may be called: open, idle, and not failed."""
        return (
            not self._closed
            and not self._busy
            and self._machine.state in (ClientState.READY, *_RSET_STATES)
        )

    # -- opening --------------------------------------------------------------

    async def _open(self) -> None:
        greeting = await self._read_reply()
        self._greeting = greeting.reply
        if greeting.reply.code != 220:
            # RFC 5321 §3.1: after a refusing greeting, the client sends QUIT.
            await self._polite_quit()
            reply = greeting.reply
            if reply.is_permanent:
                raise PermanentSmtpError(reply, phase=Command.GREETING.value)
            raise TransientSmtpError(reply, phase=Command.GREETING.value)
        await self._hello()
        if self._tls_mode is not TlsMode.DISABLED:
            await self._starttls()

    async def _hello(self) -> None:
        ehlo = await self._command(Ehlo(self._ehlo))
        if _is_2xx(ehlo.reply):
            return
        if not ehlo.reply.is_permanent:
            ehlo.raise_for_status()
            raise TransientSmtpError(ehlo.reply, phase=Command.EHLO.value)
        # RFC 5321 §4.1.4 and §3.2: a server that does not know EHLO answers
        # 500/502 (or 5xx); the client falls back to HELO, without extensions.
        helo = await self._command(Helo(self._ehlo))
        if _is_2xx(helo.reply):
            return
        helo.raise_for_status()
        raise TransientSmtpError(helo.reply, phase=Command.HELO.value)

    async def _starttls(self) -> None:
        required = self._tls_mode is TlsMode.REQUIRED
        if not self.capabilities.starttls:
            if required:
                await self._polite_quit()
                raise TlsRequiredError("STARTTLS required but not offered by the server")
            return
        answer = await self._command(StartTls())
        if answer.reply.code != 220:
            if required:
                await self._polite_quit()
                raise TlsRequiredError(
                    f"STARTTLS required but refused by the server: {answer.reply}",
                    server_reply=answer.reply,
                )
            return  # RFC 3207 §4: the client may go on in the clear.
        assert self._tls_context is not None  # start() made one unless DISABLED
        tls_stream = trio.SSLStream(
            self._stream, self._tls_context, server_hostname=self._server_hostname
        )
        self._stream = tls_stream
        try:
            with _deadline(self._reply_timeouts[Command.STARTTLS], "the TLS handshake"):
                await tls_stream.do_handshake()
        except trio.BrokenResourceError as exc:
            reason = f"TLS handshake failed: {exc.__cause__ or exc}"
            if required:
                raise TlsRequiredError(f"STARTTLS required but the {reason}") from exc
            raise TlsHandshakeError(reason) from exc
        # RFC 3207 §4.2: forget what was learned in the clear, EHLO again.
        # This also refuses plaintext bytes the server sent after its 220.
        self._machine.reset_after_tls()
        self._tls_active = True
        await self._hello()

    # -- delivering -----------------------------------------------------------

    async def deliver(self, envelope: Envelope) -> DeliveryResult:
        """Run one mail transaction; the outcome is per recipient.

        May be called again on the same session; an RSET goes first when the
        previous transaction did not end cleanly. Refusals are results, not
        exceptions; what ends the session is raised (module docstring), and
        then no recipient of ``envelope`` has a final answer.
        """
        if self._busy:
            raise trio.BusyResourceError("another task is using this SMTP session")
        if not self.usable:
            raise ConnectionLostError("the SMTP session is closed or failed")
        self._busy = True
        try:
            return await self._deliver(envelope)
        except BaseException:
            await self._abort()
            raise
        finally:
            self._busy = False

    async def _deliver(self, envelope: Envelope) -> DeliveryResult:
        capabilities = self.capabilities
        prepared = prepare_data(envelope.message)
        size = _message_size(prepared)
        if capabilities.size and size > capabilities.size:
            return _refuse_all(
                envelope,
                _local_reply(
                    552,
                    "5.3.4",
                    f"message of {size} octets exceeds the server's SIZE limit of "
                    f"{capabilities.size} (RFC 1870)",
                ),
            )
        smtputf8 = envelope.needs_smtputf8
        if smtputf8 and not capabilities.smtputf8:
            return _refuse_all(
                envelope,
                _local_reply(
                    553,
                    "5.6.7",
                    "non-ASCII address needs SMTPUTF8 (RFC 6531), "
                    "which the server did not advertise",
                ),
            )
        mail = MailFrom(
            envelope.sender,
            size=size,
            body_8bitmime=capabilities.eight_bit_mime and not envelope.message.isascii(),
            smtputf8=smtputf8,
        )
        transaction = _Transaction(envelope)
        if capabilities.pipelining:
            await self._pipelined(transaction, mail)
        else:
            await self._lockstep(transaction, mail)
        return await self._finish(transaction, prepared)

    async def _pipelined(self, transaction: _Transaction, mail: MailFrom) -> None:
        """RFC 2920: [RSET] MAIL RCPT... DATA in one write, then every reply."""
        group = bytearray()
        if self._machine.state in _RSET_STATES:
            group += self._machine.send(Rset())
        try:
            group += self._machine.send(mail)
        except UnsendableCommandError as exc:
            if group:  # the RSET is owed: send it and take its reply
                await self._write_commands(group)
                await self._read_owed()
            transaction.refuse_rest(_local_reply(553, "5.1.7", str(exc)))
            return
        for index, recipient in enumerate(transaction.envelope.recipients):
            try:
                group += self._machine.send(RcptTo(recipient))
            except UnsendableCommandError as exc:
                transaction.refuse(index, _local_reply(553, "5.1.3", str(exc)))
                continue
            transaction.sent.append(index)
        if transaction.sent:
            group += self._machine.send(Data())
        await self._write_commands(group)
        for answer in await self._read_owed():
            match answer.command:
                case Command.MAIL:
                    transaction.mail_reply = answer.reply
                case Command.RCPT:
                    transaction.rcpt_replies.append(answer.reply)
                case Command.DATA:
                    transaction.data_reply = answer.reply
                case _:  # RSET: the MAIL reply says whether a transaction could start
                    pass

    async def _lockstep(self, transaction: _Transaction, mail: MailFrom) -> None:
        """One command, one reply; stop at the first decisive refusal."""
        if self._machine.state in _RSET_STATES:
            await self._command(Rset())
        try:
            answer = await self._command(mail)
        except UnsendableCommandError as exc:
            transaction.refuse_rest(_local_reply(553, "5.1.7", str(exc)))
            return
        transaction.mail_reply = answer.reply
        if not _is_2xx(answer.reply):
            return
        for index, recipient in enumerate(transaction.envelope.recipients):
            try:
                answer = await self._command(RcptTo(recipient))
            except UnsendableCommandError as exc:
                transaction.refuse(index, _local_reply(553, "5.1.3", str(exc)))
                continue
            transaction.sent.append(index)
            transaction.rcpt_replies.append(answer.reply)
        if any(_is_2xx(reply) for reply in transaction.rcpt_replies):
            transaction.data_reply = (await self._command(Data())).reply

    async def _finish(self, transaction: _Transaction, prepared: bytes) -> DeliveryResult:
        """Settle every recipient from the replies; send the content after a 354."""
        mail_reply, data_reply = transaction.mail_reply, transaction.data_reply
        if mail_reply is not None and not _is_2xx(mail_reply):
            # The transaction ended at MAIL. A pipelined DATA was answered
            # 503/554 (RFC 2920 §3.1), which says nothing about the message.
            transaction.refuse_rest(mail_reply)
            if data_reply is not None and data_reply.code == 354:
                await self._send_content(prepare_data(b""))
            return transaction.result(None)
        for index, reply in zip(transaction.sent, transaction.rcpt_replies, strict=True):
            if _is_2xx(reply):
                transaction.accepted.append(index)
            else:
                transaction.refuse(index, reply)
        if data_reply is None:
            return transaction.result(None)
        if data_reply.code != 354:
            transaction.refuse_rest(data_reply)
            return transaction.result(data_reply)
        if not transaction.accepted:
            # RFC 2920 §3.1: 354 although no recipient was accepted;
            # end the data with no content. Every recipient is already settled.
            end = await self._send_content(prepare_data(b""))
            return transaction.result(end.reply)
        end = await self._send_content(prepared)
        for index in transaction.accepted:
            transaction.settle(index, end.reply, _final_status(end.reply))
        return transaction.result(end.reply)

    # -- closing --------------------------------------------------------------

    async def quit(self) -> None:
        """Say QUIT (bounded by the QUIT reply deadline), then close.

        Errors on the way out are swallowed: the session is over either way.
        """
        if self._closed:
            return
        polite = await self._polite_quit()
        if polite:
            await self.aclose()
        else:
            await self._abort()

    async def aclose(self) -> None:
        """Close the stream (TLS: send close_notify, do not wait for one)."""
        self._closed = True
        await self._stream.aclose()

    async def _polite_quit(self) -> bool:
        """QUIT when the state allows it; whether it went well."""
        if self._machine.state not in _QUIT_STATES or self._machine.pending:
            return False
        try:
            await self._command(Quit())
        except (MtaClientError, trio.BrokenResourceError):
            return False
        return True

    async def _abort(self) -> None:
        """After a failure the connection is unusable: close at once."""
        self._closed = True
        await trio.aclose_forcefully(self._stream)

    # -- I/O ------------------------------------------------------------------

    async def _command(self, command: ClientCommand) -> ServerReply:
        """Send one command and read its reply."""
        await self._write_commands(self._machine.send(command))
        return await self._read_reply()

    async def _write_commands(self, data: bytes | bytearray) -> None:
        """Write commands, bounded by the deadline of the last reply they ask for."""
        owed = self._machine.pending
        what = "/".join(owed)
        with _deadline(self._reply_timeouts[owed[-1]], f"writing {what}"):
            await self._write(data, what)

    async def _send_content(self, prepared: bytes) -> ServerReply:
        """Write the message content in timed blocks; read the DATA-END reply."""
        data = memoryview(self._machine.send(MessageContent(prepared)))
        for start in range(0, len(data), DATA_BLOCK_SIZE):
            with _deadline(self._data_block_timeout, "writing a block of message content"):
                await self._write(data[start : start + DATA_BLOCK_SIZE], "message content")
        return await self._read_reply()

    async def _write(self, data: bytes | bytearray | memoryview, what: str) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise ConnectionLostError(f"connection lost while sending {what}: {exc}") from exc

    async def _read_owed(self) -> list[ServerReply]:
        """Every reply owed, in order."""
        answers = []
        while self._machine.pending:
            answers.append(await self._read_reply())
        return answers

    async def _read_reply(self) -> ServerReply:
        """The next reply, within its deadline; 421 raises ConnectionLostError."""
        command = self._machine.pending[0]
        try:
            with _deadline(self._reply_timeouts[command], f"awaiting the reply to {command}"):
                event = self._machine.next_event()
                while isinstance(event, NeedData):
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                    self._machine.receive_data(bytes(data))
                    event = self._machine.next_event()
        except trio.BrokenResourceError as exc:
            raise ConnectionLostError(
                f"connection lost awaiting the reply to {command}: {exc}"
            ) from exc
        if event.reply.code == 421 and command is not Command.QUIT:
            # RFC 5321 §3.8: the server is closing the channel.
            raise ConnectionLostError(
                f"server closing the session: {event.reply} at {command}", reply=event.reply
            )
        return event


class _Transaction:
    """The bookkeeping of one deliver(): replies as they come, results as decided."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.sent: list[int] = []  # indexes of recipients whose RCPT was sent
        self.accepted: list[int] = []  # ... and answered 2xx
        self.mail_reply: SmtpReply | None = None
        self.rcpt_replies: list[SmtpReply] = []
        self.data_reply: SmtpReply | None = None
        self._results: dict[int, RecipientResult] = {}

    def settle(self, index: int, reply: SmtpReply, status: RecipientStatus) -> None:
        self._results[index] = RecipientResult(self.envelope.recipients[index], reply, status)

    def refuse(self, index: int, reply: SmtpReply) -> None:
        self.settle(index, reply, _refusal_status(reply))

    def refuse_rest(self, reply: SmtpReply) -> None:
        """Every recipient not settled yet is refused with ``reply``."""
        for index in range(len(self.envelope.recipients)):
            if index not in self._results:
                self.refuse(index, reply)

    def result(self, data_reply: SmtpReply | None) -> DeliveryResult:
        results = self._results
        assert len(results) == len(self.envelope.recipients), "a recipient was left unsettled"
        ordered = tuple(results[index] for index in range(len(results)))
        return DeliveryResult(self.envelope, ordered, data_reply)


def _refuse_all(envelope: Envelope, reply: SmtpReply) -> DeliveryResult:
    transaction = _Transaction(envelope)
    transaction.refuse_rest(reply)
    return transaction.result(None)
