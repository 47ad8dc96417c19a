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
