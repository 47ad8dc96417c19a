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

import enum
from dataclasses import dataclass
from typing import Final


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
    """421, EOF or a reset mid-session: the connection is gone; retry.

    ``reply`` is the server's 421 when it said why (throttle feedback reads it).
    """

    def __init__(self, message: str, *, reply: SmtpReply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


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


class ProxyAuthError(EgressError):
    """The proxy refused our credentials, or wants credentials we did not offer.

    A problem with the proxy account, not with the source or the destination:
    no other source or MX will fare better on this proxy.
    """


class TlsRequiredError(TransientSmtpError):
    """TLS was required and cannot be had on this connection: defer the message.

    STARTTLS was not advertised, was refused, or its handshake failed.
    ``reply`` is a synthetic ``454 4.7.4`` (RFC 3207's "TLS not available",
    RFC 3463's "security features not supported") whose text is ``reason``;
    ``server_reply`` is the server's refusal of STARTTLS, if that was the cause.
    """

    def __init__(self, reason: str, *, server_reply: SmtpReply | None = None) -> None:
        super().__init__(SmtpReply(454, (reason,), "4.7.4"), phase="STARTTLS")
        self.reason = reason
        self.server_reply = server_reply


class TlsHandshakeError(ConnectionLostError):
    """The TLS handshake after STARTTLS's 220 failed in opportunistic mode.

    The connection is unusable (the server is waiting for TLS). A caller may
    retry on a new connection with :attr:`TlsMode.DISABLED` for this host, as
    MTAs commonly do for opportunistic TLS.
    """


class MxFailure(enum.Enum):
    """Why a domain could not be resolved; values are stable metric labels."""

    INVALID_DOMAIN = "invalid_domain"
    NXDOMAIN = "nxdomain"
    NULL_MX = "null_mx"
    NO_ADDRESS = "no_address"
    SERVFAIL = "servfail"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"


MX_FAILURE_DESCRIPTIONS: Final = {
    MxFailure.INVALID_DOMAIN: "invalid domain name",
    MxFailure.NXDOMAIN: "NXDOMAIN, the domain does not exist",
    MxFailure.NULL_MX: "null MX, the domain does not accept mail (RFC 7505)",
    MxFailure.NO_ADDRESS: "no address for any mail exchanger",
    MxFailure.SERVFAIL: "SERVFAIL, the nameserver failed",
    MxFailure.TIMEOUT: "timeout, no answer from the nameservers",
    MxFailure.UNREACHABLE: "no nameserver reachable",
}


class MxError(MtaClientError):
    """The domain could not be turned into addresses to deliver to."""

    def __init__(self, domain: str, reason: MxFailure, detail: str = "") -> None:
        self.domain = domain
        self.reason = reason
        self.detail = detail
        suffix = f" [{detail}]" if detail else ""
        super().__init__(f"{domain}: {MX_FAILURE_DESCRIPTIONS[reason]}{suffix}")


class MxPermanentError(MxError):
    """The domain cannot receive mail as published: bounce (NXDOMAIN, null MX, no address)."""


class MxTemporaryError(MxError):
    """DNS failed for now (SERVFAIL, timeout, no nameserver reachable): retry later."""
