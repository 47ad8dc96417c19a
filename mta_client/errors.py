"""The error hierarchy of mta_client.

One root, :class:`MtaClientError`. SMTP replies split by class: 4xx is
:class:`TransientSmtpError` (retry later), 5xx :class:`PermanentSmtpError`
(bounce); retry logic dispatches on the class, never on numbers. A 421 or an
unexpected end of the connection is :class:`ConnectionLostError`: the
session is over, and the message should be retried.

Protocol errors split into local (our misuse of a state machine) and remote
(the peer sent something the protocol forbids), as in kumoproxy.
"""

from __future__ import annotations

from dataclasses import dataclass


class MtaClientError(Exception):
    """Root of every error mta_client raises on purpose."""


class ProtocolError(MtaClientError):
    """A wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried something the protocol state does not allow (a bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes the protocol forbids."""


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """A complete (possibly multi-line) SMTP reply (RFC 5321 §4.2).

    ``enhanced`` is the RFC 3463 status code ("5.1.1") when the server sent
    one, and ``lines`` the text of each line without code or separator.
    """

    code: int
    lines: tuple[str, ...]
    enhanced: str | None = None

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        enhanced = f" {self.enhanced}" if self.enhanced else ""
        return f"{self.code}{enhanced} {self.text}"


class SmtpError(MtaClientError):
    """The server answered with a negative reply."""

    def __init__(self, reply: SmtpReply, *, phase: str = "") -> None:
        self.reply = reply
        self.phase = phase
        where = f" at {phase}" if phase else ""
        super().__init__(f"{reply}{where}")


class TransientSmtpError(SmtpError):
    """4xx: try again later (RFC 5321 §4.2.1)."""


class PermanentSmtpError(SmtpError):
    """5xx: do not retry this recipient or message as is."""


class ConnectionLostError(MtaClientError, ConnectionError):
    """421, EOF or a reset mid-session: the connection is gone; retry."""


class SmtpTimeoutError(MtaClientError, TimeoutError):
    """A phase deadline of RFC 5321 §4.5.3.2 passed."""


class EgressError(MtaClientError, OSError):
    """The path to the destination could not be opened."""


class ProxyUnreachableError(EgressError):
    """The proxy itself could not be reached (refused, unreachable, timed out)."""


class SourceRefusedError(EgressError):
    """The proxy refused or could not bind the source IP (not plumbed, not allowed).

    A problem with *this source*, not with the destination: move traffic to
    another source.
    """

    def __init__(self, message: str, *, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class DestinationError(EgressError):
    """The proxy could not reach the destination; ``reply`` is the SOCKS5 REP."""

    def __init__(self, message: str, *, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply
