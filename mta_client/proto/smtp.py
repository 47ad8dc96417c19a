"""SMTP, client role (RFC 5321), sans-IO, with the extensions an MTA needs.

Extensions: PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
SMTPUTF8 (RFC 6531), STARTTLS (RFC 3207) and enhanced status codes
(RFC 3463/2034). CHUNKING, DSN and AUTH are recorded in :class:`Capabilities`
but not spoken.

:class:`SmtpClient` does no I/O. Turn commands (:class:`Ehlo`,
:class:`MailFrom`, ...) into bytes with ``send``; feed what the server sends
with ``receive_data`` (``b""`` means EOF); pull :class:`ServerReply` events
with ``next_event`` (``NEED_DATA`` while a reply is incomplete). Each reply is
tagged with the :class:`Command` it answers: the machine keeps a FIFO of the
replies it is owed, so with PIPELINING the shell may send ``MAIL``, ``RCPT``...
and ``DATA`` in one write and read the answers in order. Whether a reply is a
success is the shell's call (``ServerReply.raise_for_status`` maps 4xx/5xx/421
to the error classes); the machine only follows the replies that decide what
may be sent next.

Client states
-------------
::

    AWAIT_GREETING --greeting not 220 (554)--> REFUSED --QUIT--> AWAIT_QUIT
        | 220
        v
    GREETED <--------------+
        | EHLO or HELO     | EHLO/HELO refused (e.g. 502: send HELO next)
        v                  |
    AWAIT_HELLO -----------+
        | 2xx (capabilities parsed; HELO: none)
        v
    READY <-------------------------------------------------------------+
        | \\--STARTTLS--> AWAIT_STARTTLS --not 220--> READY            |
        |                   | 220                                      |
        |                   v                                          |
        |                 TLS_PENDING --reset_after_tls()--> GREETED   |
        | MAIL                                                         |
        v                                                              |
    MAIL --RCPT--> RCPT --RCPT--> RCPT                                 |
                     | DATA                                            |
                     v                                                 |
                   AWAIT_DATA --354--> DATA_OPEN --MessageContent------+
                     | not 354                     (DATA-END reply owed)
                     v
                   ABORTED --RSET--> READY

    READY, MAIL, RCPT --RSET--> READY (the transaction is dropped)
    GREETED, READY, MAIL, RCPT, ABORTED --NOOP--> (same state)
    GREETED, REFUSED, READY, MAIL, RCPT, ABORTED --QUIT--> AWAIT_QUIT --reply--> CLOSED
    any state but CLOSED/ERROR --421 reply, or EOF while a reply is owed--> CLOSED
    any state --(our misuse: LocalProtocolError,
                 peer violation: RemoteProtocolError)--> ERROR (absorbing)

States move when a command is *sent* (so a pipelined group can be sent at
once), and when the reply to a command that ends a pipelined group arrives
(greeting, EHLO, HELO, STARTTLS, DATA, QUIT): only those decide what may be
sent next. Replies to MAIL, RCPT, RSET and NOOP never change the state; a
refused MAIL leaves the machine in MAIL, and the shell sends RSET (pipelined
with the next MAIL when it can) before the next transaction, since only after
RSET does the client know the server has no transaction open. After DATA is
refused (ABORTED) the same holds: a server that accepted MAIL but no RCPT
still has the transaction open (a new MAIL would be a "nested MAIL" error).

A 421 reply is yielded like any other; then the state is CLOSED and every
further ``next_event`` raises :class:`ConnectionLostError`, as does EOF while
a reply is owed. A normal close (any reply to QUIT) leaves CLOSED quietly.
"""

from __future__ import annotations

import collections
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, NoReturn, assert_never

from kumoproxy.proto.common import NEED_DATA, BufferedReceiver, NeedData
from mta_client.errors import (
    ConnectionLostError,
    LocalProtocolError,
    PermanentSmtpError,
    RemoteProtocolError,
    SmtpReply,
    TransientSmtpError,
)
from mta_client.proto.message import is_prepared

__all__ = [
    "DATA_BLOCK_TIMEOUT",
    "LAST_IN_GROUP",
    "MAX_ADDRESS_PATH",
    "MAX_DOMAIN",
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "NEED_DATA",
    "REPLY_TIMEOUTS",
    "RFC_REPLY_LINE",
    "Capabilities",
    "ClientCommand",
    "ClientState",
    "Command",
    "Data",
    "Ehlo",
    "Helo",
    "MailFrom",
    "MessageContent",
    "NeedData",
    "Noop",
    "Quit",
    "RcptTo",
    "Rset",
    "ServerReply",
    "SmtpClient",
    "StartTls",
    "UnsendableCommandError",
]

# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

RFC_REPLY_LINE: Final = 512
"""RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including CRLF."""

MAX_REPLY_LINE: Final = 2048
"""The reply line cap we enforce (octets, including CRLF): 4 x RFC_REPLY_LINE.

RFC 5321 §4.5.3.1 asks implementations to accept objects beyond these limits
"to the maximum extent possible", and real servers exceed 512 with long
rejection texts and URLs. 2048 keeps such replies while still bounding what a
hostile server can make us buffer before we decide."""

MAX_REPLY_LINES: Final = 100
"""Lines in one reply. A large EHLO reply or banner is a few dozen lines; with
MAX_REPLY_LINE this bounds one reply to 200 KiB."""

MAX_ADDRESS_PATH: Final = 256
"""RFC 5321 §4.5.3.1.3: a reverse- or forward-path, with its angle brackets,
is at most 256 octets."""

MAX_DOMAIN: Final = 255
"""RFC 5321 §4.5.3.1.2: a domain name is at most 255 octets."""

CRLF: Final = b"\r\n"

# ---------------------------------------------------------------------------
# Commands and their replies
# ---------------------------------------------------------------------------


class Command(enum.StrEnum):
    """What a :class:`ServerReply` answers; the value names it in logs and errors."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"  # the 354 (or refusal) to the DATA command
    DATA_END = "DATA-END"  # the final reply after the message content
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


LAST_IN_GROUP: Final = frozenset(
    {
        Command.GREETING,  # RFC 5321 §3.1: the client waits for the greeting
        Command.EHLO,  # RFC 2920 §3.1
        Command.HELO,  # changes the session state like EHLO
        Command.STARTTLS,  # RFC 3207 §4
        Command.DATA,  # RFC 2920 §3.1
        Command.NOOP,  # RFC 2920 §3.1
        Command.QUIT,  # RFC 2920 §3.1
    }
)
"""Commands whose reply must arrive before anything else is sent, even with
PIPELINING. The message content is "explicitly allowed to be the first
command in a group" (RFC 2920 §3.1), so MAIL, RSET or QUIT may follow it
before the DATA-END reply."""

_MINUTE: Final = 60.0

REPLY_TIMEOUTS: Final[Mapping[Command, float]] = MappingProxyType(
    {
        Command.GREETING: 5 * _MINUTE,  # §4.5.3.2.1 initial 220 message
        Command.MAIL: 5 * _MINUTE,  # §4.5.3.2.2
        Command.RCPT: 5 * _MINUTE,  # §4.5.3.2.3
        Command.DATA: 2 * _MINUTE,  # §4.5.3.2.4 DATA initiation
        Command.DATA_END: 10 * _MINUTE,  # §4.5.3.2.6 DATA termination
        # Not named in §4.5.3.2; five minutes, as for MAIL and RCPT.
        Command.EHLO: 5 * _MINUTE,
        Command.HELO: 5 * _MINUTE,
        Command.STARTTLS: 5 * _MINUTE,
        Command.RSET: 5 * _MINUTE,
        Command.NOOP: 5 * _MINUTE,
        Command.QUIT: 5 * _MINUTE,
    }
)
"""Seconds to wait for the reply to each command: RFC 5321 §4.5.3.2's
recommended minimums. The shell applies them; the machine has no clock."""

DATA_BLOCK_TIMEOUT: Final = 3 * _MINUTE
"""RFC 5321 §4.5.3.2.5: seconds allowed for each write of message content."""


@dataclass(frozen=True, slots=True)
class ServerReply:
    """A complete server reply, and the command it answers."""

    command: Command
    reply: SmtpReply

    def raise_for_status(self) -> None:
        """Raise if the reply is negative; do nothing for 2xx and 3xx.

        421 raises :class:`ConnectionLostError` (the server is closing: retry),
        other 4xx :class:`TransientSmtpError`, 5xx :class:`PermanentSmtpError`,
        each naming the command as the phase.
        """
        reply = self.reply
        if reply.code == 421:
            raise ConnectionLostError(
                f"server closing the session: {reply} at {self.command}", reply=reply
            )
        if reply.is_transient:
            raise TransientSmtpError(reply, phase=self.command.value)
        if reply.is_permanent:
            raise PermanentSmtpError(reply, phase=self.command.value)


# Commands the shell sends (events in).


@dataclass(frozen=True, slots=True)
class Ehlo:
    """``EHLO <domain>`` (RFC 5321 §4.1.1.1). ``domain`` is our name, ASCII
    (an A-label) or an address literal such as ``[192.0.2.1]``."""

    domain: str


@dataclass(frozen=True, slots=True)
class Helo:
    """``HELO <domain>``: the fallback when EHLO is refused (RFC 5321 §4.1.1.1)."""

    domain: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """``STARTTLS`` (RFC 3207); only when the server advertised it."""


@dataclass(frozen=True, slots=True)
class MailFrom:
    """``MAIL FROM:<address>`` with optional parameters (RFC 5321 §4.1.1.2).

    ``address`` may be ``""`` (the null reverse-path of a bounce).
    ``size`` adds ``SIZE=n`` (RFC 1870) when the server advertised SIZE and is
    silently left out otherwise. ``body_8bitmime`` adds ``BODY=8BITMIME``
    (RFC 6152) and ``smtputf8`` adds ``SMTPUTF8`` (RFC 6531); both require the
    server to have advertised them, because the message cannot be sent as is
    otherwise.
    """

    address: str
    size: int | None = field(default=None, kw_only=True)
    body_8bitmime: bool = field(default=False, kw_only=True)
    smtputf8: bool = field(default=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class RcptTo:
    """``RCPT TO:<address>`` (RFC 5321 §4.1.1.3)."""

    address: str


@dataclass(frozen=True, slots=True)
class Data:
    """``DATA`` (RFC 5321 §4.1.1.4); the content follows only after a 354."""


@dataclass(frozen=True, slots=True)
class MessageContent:
    """The message content after a 354: ``prepared`` comes from
    :func:`mta_client.proto.message.prepare_data` (terminator included).

    Kept out of ``repr``: it can be megabytes.
    """

    prepared: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Rset:
    """``RSET`` (RFC 5321 §4.1.1.5): drop the current transaction."""


@dataclass(frozen=True, slots=True)
class Noop:
    """``NOOP`` (RFC 5321 §4.1.1.9): e.g. to check a pooled connection."""


@dataclass(frozen=True, slots=True)
class Quit:
    """``QUIT`` (RFC 5321 §4.1.1.10)."""


ClientCommand = (
    Ehlo | Helo | StartTls | MailFrom | RcptTo | Data | MessageContent | Rset | Noop | Quit
)
"""Everything :meth:`SmtpClient.send` accepts."""


class UnsendableCommandError(LocalProtocolError):
    """This command cannot go to this server as given; nothing was sent.

    Raised for a bad address or domain (CR, LF, space, angle brackets or
    control characters: the command injection guard; too long), an envelope
    that needs SMTPUTF8, 8BITMIME or STARTTLS the server did not advertise,
    or a SIZE over the server's limit. Unlike other LocalProtocolErrors it
    leaves the machine as it was, so the shell can fail that one message (or
    recipient) and carry on with the session.
    """


# ---------------------------------------------------------------------------
# Capabilities (RFC 5321 §4.1.1.1, the EHLO reply)
# ---------------------------------------------------------------------------

# RFC 5321 §4.1.1.1: ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
_EHLO_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_SIZE_VALUE: Final = re.compile(r"[0-9]{1,20}")


def _empty_raw() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the server's EHLO reply advertised. After HELO: all off.

    ``size`` is None when SIZE was not advertised, 0 when it was without a
    usable limit (RFC 1870 §4: 0 means no fixed maximum; a malformed value is
    read as 0 too), else the limit in octets. ``auth`` lists the SASL
    mechanisms, upper-cased, from ``AUTH`` and old-style ``AUTH=`` lines.
    ``raw`` maps every well-formed keyword (upper-cased) to its parameters
    joined by single spaces; the first line of a repeated keyword wins.
    """

    pipelining: bool = False
    size: int | None = None
    eight_bit_mime: bool = False
    smtputf8: bool = False
    starttls: bool = False
    enhanced_status_codes: bool = False
    chunking: bool = False
    dsn: bool = False
    auth: tuple[str, ...] = ()
    raw: Mapping[str, str] = field(default_factory=_empty_raw, hash=False)

    @classmethod
    def from_ehlo(cls, reply: SmtpReply) -> Capabilities:
        """Parse the lines of a positive EHLO reply.

        The first line is the server's name and greeting, not a keyword.
        Lines that are not ``keyword *(SP param)`` are skipped rather than
        refused: a server's odd extension must not stop delivery.
        """
        raw: dict[str, str] = {}
        auth: list[str] = []
        for line in reply.lines[1:]:
            words = line.split()
            if not words:
                continue
            keyword, params = words[0].upper(), [word.upper() for word in words[1:]]
            if keyword.startswith("AUTH="):
                # Pre-RFC 4954 servers (and Postfix's broken_sasl_auth_clients).
                auth.extend([keyword.removeprefix("AUTH="), *params])
                continue
            if not _EHLO_KEYWORD.fullmatch(keyword):
                continue
            raw.setdefault(keyword, " ".join(words[1:]))
            if keyword == "AUTH":
                auth.extend(params)
        size: int | None = None
        if "SIZE" in raw:
            value = raw["SIZE"]
            size = int(value) if _SIZE_VALUE.fullmatch(value) else 0
        return cls(
            pipelining="PIPELINING" in raw,
            size=size,
            eight_bit_mime="8BITMIME" in raw,
            smtputf8="SMTPUTF8" in raw,
            starttls="STARTTLS" in raw,
            enhanced_status_codes="ENHANCEDSTATUSCODES" in raw,
            chunking="CHUNKING" in raw,
            dsn="DSN" in raw,
            auth=tuple(dict.fromkeys(mechanism for mechanism in auth if mechanism)),
            raw=MappingProxyType(raw),
        )


# ---------------------------------------------------------------------------
# Reply parsing (RFC 5321 §4.2). Every check fires as soon as the bytes it
# looks at are present, in wire order, so the outcome (reply or error) does
# not depend on how the bytes were split.
# ---------------------------------------------------------------------------

_LF: Final = 0x0A
_HYPHEN: Final = 0x2D

# RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39 (no 1yz in SMTP).
_CODE_FIRST: Final = b"2345"
_CODE_SECOND: Final = b"012345"
_CODE_THIRD: Final = b"0123456789"
_SEPARATORS: Final = b" -\r"  # "-" continues; " " or a bare code line ends

# RFC 3463 §2: class "." subject "." detail; subject and detail are 1-3 digits
# without a leading zero. RFC 2034 §4 puts it first in the text, then a space.
_ENHANCED: Final = re.compile(r"([245])\.(?:0|[1-9][0-9]{0,2})\.(?:0|[1-9][0-9]{0,2})(?= |$)")


def _reply_error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"bad SMTP reply: {message}")


def _scan_line(
    buf: bytearray, start: int, code: int | None, number: int
) -> tuple[int, bool, bytes, int] | None:
    """One reply line at ``start``: (code, is_last, text, end) or None for more.

    ``code`` is the code of the reply's earlier lines, ``number`` this line's
    1-based position in the reply.
    """
    available = len(buf) - start
    if available >= 1 and buf[start] not in _CODE_FIRST:
        raise _reply_error(f"reply code starts with {bytes(buf[start : start + 1])!r}, not 2-5")
    if available >= 2 and buf[start + 1] not in _CODE_SECOND:
        raise _reply_error(f"second digit of reply code is {bytes(buf[start + 1 : start + 2])!r}")
    if available >= 3:
        if buf[start + 2] not in _CODE_THIRD:
            raise _reply_error(
                f"third digit of reply code is {bytes(buf[start + 2 : start + 3])!r}"
            )
        line_code = int(buf[start : start + 3])
        if code is not None and line_code != code:
            raise _reply_error(f"multi-line reply changes code from {code} to {line_code}")
        code = line_code
    if available < 4:
        return None
    assert code is not None
    separator = buf[start + 3]
    if separator not in _SEPARATORS:
        raise _reply_error(f"{bytes([separator])!r} after reply code, not space, '-' or CRLF")
    if separator == _HYPHEN and number >= MAX_REPLY_LINES:
        raise _reply_error(f"more than {MAX_REPLY_LINES} lines in one reply")
    window_end = min(len(buf), start + MAX_REPLY_LINE)
    cr = buf.find(b"\r", start + 3, window_end)
    lf = buf.find(b"\n", start + 3, window_end)
    if lf != -1 and (cr == -1 or lf < cr):
        raise _reply_error("bare LF in reply line (RFC 5321 section 2.3.8)")
    if cr == -1:
        if available >= MAX_REPLY_LINE:
            raise _reply_error(f"reply line longer than {MAX_REPLY_LINE} octets")
        return None
    after_cr = cr + 1
    if after_cr - start >= MAX_REPLY_LINE:
        raise _reply_error(f"reply line longer than {MAX_REPLY_LINE} octets")
    if after_cr >= len(buf):
        return None
    if buf[after_cr] != _LF:
        raise _reply_error("bare CR in reply line (RFC 5321 section 2.3.8)")
    text = bytes(buf[start + 4 : cr])
    return code, separator != _HYPHEN, text, after_cr + 1


def _make_reply(code: int, raw_lines: list[bytes]) -> SmtpReply:
    """Decode the text and lift the RFC 3463 code off the first line.

    The enhanced code is taken whenever the first line starts with a
    well-formed one whose class matches the reply's first digit, whether or
    not ENHANCEDSTATUSCODES was advertised: greetings and EHLO replies come
    before the capability is known, and servers use them regardless. It is
    removed from every line that repeats it (RFC 2034 §4: each line may carry
    it), so ``SmtpReply.text`` reads as prose.
    """
    # Reply text is ASCII, or UTF-8 after SMTPUTF8 (RFC 6531 §3.7.4); keep
    # anything else visible as escapes rather than dropping it from bounces.
    lines = [line.decode("utf-8", "backslashreplace") for line in raw_lines]
    match = _ENHANCED.match(lines[0])
    if match is None or match.group(1) != str(code)[0]:
        return SmtpReply(code, tuple(lines))
    enhanced = match.group(0)

    def strip(line: str) -> str:
        if line == enhanced:
            return ""
        return line.removeprefix(enhanced + " ")

    return SmtpReply(code, tuple(strip(line) for line in lines), enhanced)


class _ReplyReader:
    """Reads one reply at the start of a buffer, resuming after complete lines.

    Only complete lines are remembered, so a server trickling a reply one
    byte at a time costs at most one MAX_REPLY_LINE scan per byte.
    """

    __slots__ = ("_code", "_lines", "_offset")

    def __init__(self) -> None:
        self._code: int | None = None
        self._lines: list[bytes] = []
        self._offset = 0

    def read(self, buf: bytearray) -> tuple[SmtpReply, int] | None:
        """The reply at the start of ``buf`` and its length, or None for more."""
        while True:
            line = _scan_line(buf, self._offset, self._code, len(self._lines) + 1)
            if line is None:
                return None
            code, last, text, end = line
            self._code = code
            self._lines.append(text)
            self._offset = end
            if last:
                reply = _make_reply(code, self._lines)
                self._code, self._lines, self._offset = None, [], 0
                return reply, end


# ---------------------------------------------------------------------------
# Encoding commands
# ---------------------------------------------------------------------------


def _encode_domain(domain: str) -> bytes:
    """EHLO/HELO argument: printable ASCII without space, 1..255 octets."""
    if not domain or not domain.isascii() or not all("!" <= ch <= "~" for ch in domain):
        raise UnsendableCommandError(
            f"EHLO/HELO name {domain!r} must be printable ASCII without spaces "
            "(an IDNA A-label or an address literal)"
        )
    if len(domain) > MAX_DOMAIN:
        raise UnsendableCommandError(f"EHLO/HELO name is {len(domain)} octets; the limit is 255")
    return domain.encode("ascii")


def _encode_path(address: str, *, utf8: bool, what: str) -> bytes:
    """``<address>`` for MAIL FROM or RCPT TO, refusing what could inject.

    Refused: CR, LF and every other control or separator character, space
    (it would end the path and start a parameter), and angle brackets (they
    would end the path early). Non-ASCII only with SMTPUTF8.
    """
    for ch in address:
        if not ch.isprintable() or ch.isspace() or ch in "<>":
            raise UnsendableCommandError(
                f"{what} address {address!r} contains {ch!r}: no spaces, angle brackets "
                "or control characters (command injection guard)"
            )
    if not utf8 and not address.isascii():
        raise UnsendableCommandError(
            f"{what} address {address!r} is not ASCII: it needs SMTPUTF8 (RFC 6531), "
            "which this transaction does not use"
        )
    raw = address.encode("utf-8")
    if len(raw) + 2 > MAX_ADDRESS_PATH:
        raise UnsendableCommandError(
            f"{what} path is {len(raw) + 2} octets; RFC 5321 section 4.5.3.1.3 allows 256"
        )
    return b"<" + raw + b">"


# ---------------------------------------------------------------------------
# The client machine
# ---------------------------------------------------------------------------


class ClientState(enum.Enum):
    """Where the client is; see the module docstring for the diagram."""

    AWAIT_GREETING = enum.auto()
    GREETED = enum.auto()  # 220 received: EHLO (or HELO) next
    REFUSED = enum.auto()  # the greeting was not 220 (e.g. 554): QUIT only
    AWAIT_HELLO = enum.auto()
    READY = enum.auto()  # no transaction: MAIL, STARTTLS, RSET, NOOP, EHLO, QUIT
    AWAIT_STARTTLS = enum.auto()
    TLS_PENDING = enum.auto()  # 220 to STARTTLS: the shell does the TLS handshake
    MAIL = enum.auto()  # MAIL sent
    RCPT = enum.auto()  # at least one RCPT sent
    AWAIT_DATA = enum.auto()  # DATA sent, 354 awaited
    DATA_OPEN = enum.auto()  # 354 received: the message content next
    ABORTED = enum.auto()  # DATA refused: RSET (or QUIT) next
    AWAIT_QUIT = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()  # absorbing


class _Input(enum.Enum):
    """What moves the machine: a command sent, or a deciding reply received."""

    SEND_EHLO = enum.auto()
    SEND_HELO = enum.auto()
    SEND_STARTTLS = enum.auto()
    SEND_MAIL = enum.auto()
    SEND_RCPT = enum.auto()
    SEND_DATA = enum.auto()
    SEND_CONTENT = enum.auto()
    SEND_RSET = enum.auto()
    SEND_NOOP = enum.auto()
    SEND_QUIT = enum.auto()
    GREETING_OK = enum.auto()  # 220
    GREETING_REFUSED = enum.auto()  # anything else but 421
    HELLO_OK = enum.auto()  # 2xx to EHLO/HELO
    HELLO_REFUSED = enum.auto()
    STARTTLS_OK = enum.auto()  # 220
    STARTTLS_REFUSED = enum.auto()
    TLS_DONE = enum.auto()  # reset_after_tls()
    DATA_GO_AHEAD = enum.auto()  # 354
    DATA_REFUSED = enum.auto()
    QUIT_ANSWERED = enum.auto()  # any reply to QUIT
    SERVER_CLOSED = enum.auto()  # a 421 reply, or EOF when a reply is owed


_S = ClientState
_I = _Input

_TRANSITIONS: Final[Mapping[tuple[ClientState, _Input], ClientState]] = MappingProxyType(
    {
        (_S.AWAIT_GREETING, _I.GREETING_OK): _S.GREETED,
        (_S.AWAIT_GREETING, _I.GREETING_REFUSED): _S.REFUSED,
        (_S.GREETED, _I.SEND_EHLO): _S.AWAIT_HELLO,
        (_S.GREETED, _I.SEND_HELO): _S.AWAIT_HELLO,
        (_S.GREETED, _I.SEND_NOOP): _S.GREETED,
        (_S.GREETED, _I.SEND_QUIT): _S.AWAIT_QUIT,
        # RFC 5321 §3.1: after a 554 greeting the server answers only QUIT.
        (_S.REFUSED, _I.SEND_QUIT): _S.AWAIT_QUIT,
        (_S.AWAIT_HELLO, _I.HELLO_OK): _S.READY,
        (_S.AWAIT_HELLO, _I.HELLO_REFUSED): _S.GREETED,
        # RFC 5321 §4.1.4: EHLO may be sent again; it resets the session.
        (_S.READY, _I.SEND_EHLO): _S.AWAIT_HELLO,
        (_S.READY, _I.SEND_STARTTLS): _S.AWAIT_STARTTLS,
        (_S.READY, _I.SEND_MAIL): _S.MAIL,
        (_S.READY, _I.SEND_RSET): _S.READY,
        (_S.READY, _I.SEND_NOOP): _S.READY,
        (_S.READY, _I.SEND_QUIT): _S.AWAIT_QUIT,
        (_S.AWAIT_STARTTLS, _I.STARTTLS_OK): _S.TLS_PENDING,
        # RFC 3207 §4: on 454 the client decides whether to go on in the clear.
        (_S.AWAIT_STARTTLS, _I.STARTTLS_REFUSED): _S.READY,
        # RFC 3207 §4.2: no new greeting after TLS, but a new EHLO.
        (_S.TLS_PENDING, _I.TLS_DONE): _S.GREETED,
        (_S.MAIL, _I.SEND_RCPT): _S.RCPT,
        (_S.MAIL, _I.SEND_RSET): _S.READY,
        (_S.MAIL, _I.SEND_NOOP): _S.MAIL,
        (_S.MAIL, _I.SEND_QUIT): _S.AWAIT_QUIT,
        (_S.RCPT, _I.SEND_RCPT): _S.RCPT,
        (_S.RCPT, _I.SEND_DATA): _S.AWAIT_DATA,
        (_S.RCPT, _I.SEND_RSET): _S.READY,
        (_S.RCPT, _I.SEND_NOOP): _S.RCPT,
        (_S.RCPT, _I.SEND_QUIT): _S.AWAIT_QUIT,
        (_S.AWAIT_DATA, _I.DATA_GO_AHEAD): _S.DATA_OPEN,
        (_S.AWAIT_DATA, _I.DATA_REFUSED): _S.ABORTED,
        (_S.DATA_OPEN, _I.SEND_CONTENT): _S.READY,
        (_S.ABORTED, _I.SEND_RSET): _S.READY,
        (_S.ABORTED, _I.SEND_NOOP): _S.ABORTED,
        (_S.ABORTED, _I.SEND_QUIT): _S.AWAIT_QUIT,
        (_S.AWAIT_QUIT, _I.QUIT_ANSWERED): _S.CLOSED,
        **{
            (state, _I.SERVER_CLOSED): _S.CLOSED
            for state in ClientState
            if state not in (_S.CLOSED, _S.ERROR)
        },
    }
)
"""The client's only transitions. A missing pair is our misuse (-> ERROR)."""

del _S, _I

# The reply each sent command is owed: exactly one per command, and the
# message content is owed the final DATA-END reply.
_OWED: Final[Mapping[_Input, Command]] = MappingProxyType(
    {
        _Input.SEND_EHLO: Command.EHLO,
        _Input.SEND_HELO: Command.HELO,
        _Input.SEND_STARTTLS: Command.STARTTLS,
        _Input.SEND_MAIL: Command.MAIL,
        _Input.SEND_RCPT: Command.RCPT,
        _Input.SEND_DATA: Command.DATA,
        _Input.SEND_CONTENT: Command.DATA_END,
        _Input.SEND_RSET: Command.RSET,
        _Input.SEND_NOOP: Command.NOOP,
        _Input.SEND_QUIT: Command.QUIT,
    }
)


def _input_for(command: ClientCommand) -> _Input:
    match command:
        case Ehlo():
            return _Input.SEND_EHLO
        case Helo():
            return _Input.SEND_HELO
        case StartTls():
            return _Input.SEND_STARTTLS
        case MailFrom():
            return _Input.SEND_MAIL
        case RcptTo():
            return _Input.SEND_RCPT
        case Data():
            return _Input.SEND_DATA
        case MessageContent():
            return _Input.SEND_CONTENT
        case Rset():
            return _Input.SEND_RSET
        case Noop():
            return _Input.SEND_NOOP
        case Quit():
            return _Input.SEND_QUIT
        case _:
            assert_never(command)


class SmtpClient(BufferedReceiver):
    """The client side of one SMTP session; may pipeline.

    Starts owing the greeting. :meth:`send` refuses (LocalProtocolError,
    machine -> ERROR) a command the state does not allow, and a command sent
    while a reply is owed unless the server advertised PIPELINING and no
    command that must end a group (:data:`LAST_IN_GROUP`) is outstanding. It
    refuses with :class:`UnsendableCommandError` (machine unchanged) a command
    whose content cannot go to this server.

    :meth:`next_event` yields the replies in the order of the commands that
    asked for them. It raises RemoteProtocolError (-> ERROR) for a malformed
    reply, and ConnectionLostError (-> CLOSED) for EOF while a reply is owed,
    and on every call after a 421.
    """

    def __init__(self) -> None:
        self._state = ClientState.AWAIT_GREETING
        self._buffer = bytearray()
        self._eof = False
        self._pending: collections.deque[Command] = collections.deque([Command.GREETING])
        self._reader = _ReplyReader()
        self._capabilities: Capabilities | None = None
        self._tls_done = False
        self._transaction_smtputf8 = False
        self._accepted_recipients = 0
        self._lost: str | None = None

    @property
    def state(self) -> ClientState:
        """The current :class:`ClientState`."""
        return self._state

    @property
    def capabilities(self) -> Capabilities | None:
        """What the last successful EHLO advertised (all off after HELO).

        None before that, and again after :meth:`reset_after_tls`.
        """
        return self._capabilities

    @property
    def pending(self) -> tuple[Command, ...]:
        """The replies owed to us, oldest first."""
        return tuple(self._pending)

    @property
    def accepted_recipients(self) -> int:
        """RCPT commands of the current transaction answered 2xx so far.

        RFC 2920 §3.1: when a pipelined DATA gets 354 although this is 0, send
        the empty content (``prepare_data(b"")``, i.e. ``.\\r\\n``) to end it.
        """
        return self._accepted_recipients

    @property
    def trailing_data(self) -> bytes:
        """Bytes received and not yet returned as a reply."""
        return bytes(self._buffer)

    # -- sending ------------------------------------------------------------

    def send(self, command: ClientCommand) -> bytes:
        """Encode ``command`` and advance the state; returns the bytes to write."""
        if self._state is ClientState.ERROR:
            raise LocalProtocolError("the SMTP client machine is in ERROR")
        action = _input_for(command)
        owed = _OWED[action]
        key = (self._state, action)
        if key not in _TRANSITIONS:
            self._fail(LocalProtocolError(f"cannot send {owed} in state {self._state.name}"))
        if self._pending:
            self._check_pipelining(owed)
        data = self._encode(command)
        self._state = _TRANSITIONS[key]
        self._pending.append(owed)
        if isinstance(command, MailFrom):
            self._transaction_smtputf8 = command.smtputf8
            self._accepted_recipients = 0
        return data

    def _check_pipelining(self, owed: Command) -> None:
        waiting = self._pending[-1]
        if self._capabilities is None or not self._capabilities.pipelining:
            self._fail(
                LocalProtocolError(
                    f"cannot send {owed} while the reply to {waiting} is owed: "
                    "the server did not advertise PIPELINING (RFC 2920)"
                )
            )
        if waiting in LAST_IN_GROUP:
            self._fail(
                LocalProtocolError(
                    f"cannot send {owed} before the reply to {waiting}: {waiting} must be "
                    "the last command of a pipelined group (RFC 2920 section 3.1)"
                )
            )

    def _encode(self, command: ClientCommand) -> bytes:
        match command:
            case Ehlo(domain=domain):
                return b"EHLO " + _encode_domain(domain) + CRLF
            case Helo(domain=domain):
                return b"HELO " + _encode_domain(domain) + CRLF
            case StartTls():
                if self._tls_done:
                    raise UnsendableCommandError("TLS is already in use on this session")
                if not self._advertised().starttls:
                    raise UnsendableCommandError("the server did not advertise STARTTLS")
                return b"STARTTLS" + CRLF
            case MailFrom():
                return self._encode_mail(command)
            case RcptTo(address=address):
                if not address:
                    raise UnsendableCommandError("RCPT TO needs an address; <> is not one")
                utf8 = self._transaction_smtputf8
                return b"RCPT TO:" + _encode_path(address, utf8=utf8, what="RCPT TO") + CRLF
            case Data():
                return b"DATA" + CRLF
            case MessageContent(prepared=prepared):
                if not is_prepared(prepared):
                    self._fail(
                        LocalProtocolError(
                            "message content is not a prepared DATA payload (bare CR/LF, "
                            "early or missing <CRLF>.<CRLF>); use prepare_data()"
                        )
                    )
                return prepared
            case Rset():
                return b"RSET" + CRLF
            case Noop():
                return b"NOOP" + CRLF
            case Quit():
                return b"QUIT" + CRLF
            case _:
                assert_never(command)

    def _advertised(self) -> Capabilities:
        # READY and later states are only reached through a successful EHLO or
        # HELO, and reset_after_tls leaves GREETED; capabilities exist here.
        assert self._capabilities is not None
        return self._capabilities

    def _encode_mail(self, command: MailFrom) -> bytes:
        caps = self._advertised()
        if command.smtputf8 and not caps.smtputf8:
            raise UnsendableCommandError(
                "the message needs SMTPUTF8 (RFC 6531), which the server did not advertise"
            )
        if command.body_8bitmime and not caps.eight_bit_mime:
            raise UnsendableCommandError(
                "the message has an 8-bit body, and the server did not advertise 8BITMIME "
                "(RFC 6152); it cannot be sent without re-encoding"
            )
        path = _encode_path(command.address, utf8=command.smtputf8, what="MAIL FROM")
        params = b""
        if command.size is not None:
            if command.size < 0:
                raise UnsendableCommandError(f"SIZE {command.size} is negative")
            if caps.size is not None:
                if caps.size and command.size > caps.size:
                    raise UnsendableCommandError(
                        f"message of {command.size} octets exceeds the server's SIZE limit "
                        f"of {caps.size} (RFC 1870)"
                    )
                params += b" SIZE=%d" % command.size
        if command.body_8bitmime:
            params += b" BODY=8BITMIME"
        if command.smtputf8:
            params += b" SMTPUTF8"
        return b"MAIL FROM:" + path + params + CRLF

    # -- receiving ----------------------------------------------------------

    def _misuse(self, message: str) -> NoReturn:
        self._fail(LocalProtocolError(message))

    def next_event(self) -> ServerReply | NeedData:
        """The next reply owed to us, or ``NEED_DATA``.

        With no reply owed, bytes are left in the buffer (an unsolicited 421
        is then read as the answer to the next command), up to one reply
        line's worth.
        """
        state = self._state
        if state is ClientState.ERROR:
            raise LocalProtocolError("the SMTP client machine is in ERROR")
        if state is ClientState.CLOSED:
            if self._lost is not None:
                raise ConnectionLostError(self._lost)
            return NEED_DATA
        if state is ClientState.TLS_PENDING:
            self._check_no_injection()
            if self._eof:
                self._lose("server closed the connection before the TLS handshake")
            return NEED_DATA
        if not self._pending:
            if len(self._buffer) > MAX_REPLY_LINE:
                self._fail(RemoteProtocolError(self._unsolicited("unsolicited bytes")))
            if self._eof:
                self._lose(
                    self._unsolicited("server closed the connection while no reply was owed")
                )
            return NEED_DATA
        try:
            parsed = self._reader.read(self._buffer)
        except RemoteProtocolError as exc:
            self._fail(exc)
        if parsed is None:
            if self._eof:
                where = "in the middle of" if self._buffer else "before"
                self._lose(f"server closed the connection {where} its reply to {self._pending[0]}")
            return NEED_DATA
        reply, used = parsed
        del self._buffer[:used]
        command = self._pending.popleft()
        self._on_reply(command, reply)
        if self._state is ClientState.TLS_PENDING:
            self._check_no_injection()
        return ServerReply(command, reply)

    def _on_reply(self, command: Command, reply: SmtpReply) -> None:
        code = reply.code
        if code == 421:
            # RFC 5321 §3.8: 421 means the server is closing the channel.
            self._pending.clear()
            self._lost = f"server closing the session: {reply} (answering {command})"
            self._transition(_Input.SERVER_CLOSED)
            return
        positive = 200 <= code < 300
        match command:
            case Command.GREETING:
                self._transition(_Input.GREETING_OK if code == 220 else _Input.GREETING_REFUSED)
            case Command.EHLO | Command.HELO:
                # A refused EHLO (even a repeated one, RFC 5321 §4.1.4) leaves
                # nothing known about the session: HELO or EHLO must follow.
                self._capabilities = None
                if positive:
                    ehlo = command is Command.EHLO
                    self._capabilities = Capabilities.from_ehlo(reply) if ehlo else Capabilities()
                self._transition(_Input.HELLO_OK if positive else _Input.HELLO_REFUSED)
            case Command.STARTTLS:
                self._transition(_Input.STARTTLS_OK if code == 220 else _Input.STARTTLS_REFUSED)
            case Command.DATA:
                self._transition(_Input.DATA_GO_AHEAD if code == 354 else _Input.DATA_REFUSED)
            case Command.QUIT:
                self._transition(_Input.QUIT_ANSWERED)
            case Command.RCPT:
                if positive:
                    self._accepted_recipients += 1
            case Command.MAIL | Command.DATA_END | Command.RSET | Command.NOOP:
                pass
            case _:
                assert_never(command)

    def reset_after_tls(self) -> None:
        """The TLS handshake after STARTTLS's 220 is done: start over.

        RFC 3207 §4.2: the client MUST discard what it learned before TLS
        (capabilities) and sends EHLO again; the state becomes GREETED. Any
        plaintext byte received after the 220 is refused (RemoteProtocolError):
        it was not protected by TLS and could be an injected reply.
        """
        if self._state is not ClientState.TLS_PENDING:
            self._fail(
                LocalProtocolError(
                    f"reset_after_tls() in state {self._state.name}, not TLS_PENDING"
                )
            )
        self._check_no_injection()
        self._capabilities = None
        self._tls_done = True
        self._transition(_Input.TLS_DONE)

    def _check_no_injection(self) -> None:
        if self._buffer:
            self._fail(
                RemoteProtocolError(
                    f"{len(self._buffer)} plaintext bytes after the 220 to STARTTLS "
                    f"({bytes(self._buffer[:32])!r}): refusing a possible reply injection "
                    "(the CVE-2011-0411 class)"
                )
            )

    def _unsolicited(self, message: str) -> str:
        if not self._buffer:
            return message
        return f"{message} (with unsolicited bytes {bytes(self._buffer[:64])!r})"

    def _transition(self, action: _Input) -> None:
        key = (self._state, action)
        if key not in _TRANSITIONS:  # pragma: no cover - the table covers every reply
            self._fail(LocalProtocolError(f"no transition for {action.name} in {self._state.name}"))
        self._state = _TRANSITIONS[key]

    def _lose(self, message: str) -> NoReturn:
        self._pending.clear()
        self._lost = message
        self._transition(_Input.SERVER_CLOSED)
        raise ConnectionLostError(message)

    def _fail(self, exc: LocalProtocolError | RemoteProtocolError) -> NoReturn:
        self._state = ClientState.ERROR
        raise exc
