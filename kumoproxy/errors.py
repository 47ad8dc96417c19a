"""The error hierarchy of kumoproxy.

One root, :class:`KumoproxyError`. Protocol errors split into *local* (our own
misuse of a state machine: a bug) and *remote* (the peer sent something the
protocol forbids). A remote error carries ``answer``: the bytes the server
side should write before closing, when the protocol allows an answer at all
(an empty ``answer`` means "just close").

Operational errors also subclass the builtin they mean, so a caller that only
knows ``OSError`` or ``TimeoutError`` still catches them.
"""

from __future__ import annotations


class KumoproxyError(Exception):
    """Root of every error kumoproxy raises on purpose."""


class ProtocolError(KumoproxyError):
    """A wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol state does not allow (a bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes the protocol forbids.

    ``answer`` is what to send before closing (may be empty).
    """

    def __init__(self, message: str, *, answer: bytes = b"") -> None:
        super().__init__(message)
        self.answer = answer


class ConfigError(KumoproxyError):
    """The configuration is invalid. ``path`` is the dotted key path."""

    def __init__(self, path: str, message: str, *, line: int | None = None) -> None:
        self.path = path
        self.message = message
        self.line = line
        where = f" (line {line})" if line is not None else ""
        super().__init__(f"{path or '<root>'}{where}: {message}")


class EgressError(KumoproxyError, OSError):
    """Opening the outbound connection failed.

    ``result`` is the bounded metric/log label for the cause and ``reply``
    the SOCKS5 REP code (RFC 1928 §6) that tells a client what happened.
    """

    result = "connect_failed"
    reply = 1  # general SOCKS server failure

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return self.message


class SourceNotPlumbedError(EgressError):
    """bind() said EADDRNOTAVAIL: the source IP is not on any interface."""

    result = "bind_failed"


class PortsExhaustedError(EgressError):
    """connect() said EADDRNOTAVAIL: no free local port for this 4-tuple."""


class ConnectFailedError(EgressError):
    """The destination refused, was unreachable, or another errno."""

    def __init__(self, message: str, *, errno: int | None = None, reply: int = 1) -> None:
        super().__init__(message, errno=errno)
        self.reply = reply


class ConnectTimeoutError(EgressError, TimeoutError):
    """No answer from the destination within ``timeouts.connect``."""

    result = "timeout"
    reply = 6  # TTL expired: the code clients read as "timed out"


class ResolveError(EgressError):
    """A destination name did not resolve (in the source's family)."""

    reply = 4  # host unreachable
