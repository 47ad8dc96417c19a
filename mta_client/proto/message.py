"""The DATA payload of an SMTP transaction (RFC 5321 §4.1.1.4, §4.5.2, §2.3.8).

:func:`prepare_data` turns a message, as the spool holds it, into the exact
bytes that follow the server's 354 reply: line endings normalised to CRLF,
leading dots doubled ("dot-stuffing"), a final CRLF, and the ``.`` line that
ends the data. Nothing else is touched: the message is never parsed or
re-serialised, because a DKIM signature covers the header and body bytes as
the author wrote them (re-folding a header or re-encoding a body would break
it). Lines longer than RFC 5321's 1000 octets (§4.5.3.1.6) are passed through
as they are for the same reason; rewrapping them is the submitter's job.

:func:`unstuff` is the receiving side's inverse, for tests and for the test
SMTP servers. It is strict: bare CR or LF in a payload, or a ``.`` line before
the end, is the kind of ambiguity SMTP smuggling exploits, so it is refused.

Neither function does I/O; both are plain byte transformations.
"""

from __future__ import annotations

import re
from typing import Final

from mta_client.errors import RemoteProtocolError

__all__ = ["TERMINATOR", "is_prepared", "normalise_crlf", "prepare_data", "unstuff"]

CRLF: Final = b"\r\n"
TERMINATOR: Final = b".\r\n"
"""The line that ends the mail data. With the CRLF that ends the last content
line it forms RFC 5321's ``<CRLF>.<CRLF>`` (§4.1.1.4)."""

# CRLF first, so a CRLF pair is one line ending and not a bare CR plus a bare LF.
_LINE_ENDING: Final = re.compile(rb"\r\n|\r|\n")


def normalise_crlf(message: bytes) -> bytes:
    """Every line ending as CRLF: bare LF and bare CR each become one CRLF.

    RFC 5321 §2.3.8: in SMTP only CRLF ends a line, and a client MUST NOT send
    a bare CR or LF. Spooled messages often use Unix LF; a bare CR is rare and
    is made a line ending too rather than passed on, so none of the ambiguous
    terminators SMTP smuggling relies on (``<LF>.<LF>``, ``<LF>.<CR><LF>``,
    ``<CR>.<CR>`` ...) can reach the wire.
    """
    return _LINE_ENDING.sub(CRLF, message)


def prepare_data(message: bytes) -> bytes:
    """The bytes to send after a 354 reply: the message, then the terminator.

    - line endings normalised by :func:`normalise_crlf`;
    - a line starting with ``.`` gets one more ``.`` (RFC 5321 §4.5.2), so no
      content line can be read as the terminator;
    - a final CRLF is added when the message does not end with one;
    - ``.\\r\\n`` ends the data.

    The empty message becomes just ``b".\\r\\n"``: zero lines of data. The CRLF
    after ``DATA`` (and the server's 354 line) already ended the previous
    line, so ``.\\r\\n`` is a complete ``<CRLF>.<CRLF>`` and servers read it
    as empty content. Sending ``b"\\r\\n.\\r\\n"`` instead would deliver one
    empty line, which is not what the spool held. This is also the payload
    RFC 2920 §3.1 asks for when DATA got 354 although no RCPT was accepted.
    8-bit bytes pass through unchanged (whether they may be sent is the
    ``BODY=8BITMIME``/``SMTPUTF8`` negotiation's business, not this one's).
    """
    if not message:
        return TERMINATOR
    data = normalise_crlf(message)
    # After normalisation every line starts at offset 0 or right after a CRLF.
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(CRLF):
        data += CRLF
    return data + TERMINATOR


def is_prepared(payload: bytes) -> bool:
    """Whether ``payload`` is safe to send after a 354, as :func:`prepare_data` makes it.

    Checks what the wire depends on, in a few C-speed passes: it is ``.\r\n``
    or ends with ``\r\n.\r\n`` with no earlier ``<CRLF>.<CRLF>`` and no
    leading ``.\r\n`` line, and it holds no bare CR or LF. It cannot tell
    whether dot-stuffing was done ("..x" may be a stuffed ".x" or a forgotten
    "..x"); only :func:`prepare_data` guarantees that.
    """
    if payload == TERMINATOR:
        return True
    end = len(payload) - len(CRLF + TERMINATOR)
    if end < 0 or payload.find(CRLF + TERMINATOR) != end or payload.startswith(TERMINATOR):
        return False
    crlf = payload.count(CRLF)
    return payload.count(b"\r") == crlf and payload.count(b"\n") == crlf


def unstuff(data: bytes) -> bytes:
    """The mail data a receiver recovers from one DATA payload (inverse of
    :func:`prepare_data` after normalisation).

    ``data`` must be exactly one payload: CRLF-terminated lines ending with the
    ``.`` line. One leading dot is removed from every line that has one, and
    the terminator is dropped; the result keeps its CRLF line endings.

    Raises :class:`RemoteProtocolError` (the sender broke the protocol) for a
    missing terminator, a bare CR or LF (RFC 5321 §2.3.8), or a ``.`` line
    before the end (bytes after the end of data).
    """
    if data == TERMINATOR:
        return b""
    if not data.endswith(CRLF + TERMINATOR):
        raise RemoteProtocolError("DATA payload does not end with <CRLF>.<CRLF>")
    body = data[: -len(TERMINATOR)]
    if body.count(b"\r") != body.count(CRLF) or body.count(b"\n") != body.count(CRLF):
        raise RemoteProtocolError("bare CR or LF in DATA payload (RFC 5321 section 2.3.8)")
    lines = body.split(CRLF)
    lines.pop()  # body ends with CRLF: the last split part is empty
    out: list[bytes] = []
    for number, line in enumerate(lines, start=1):
        if line == b".":
            raise RemoteProtocolError(f"end of data at line {number}, before the payload ends")
        out.append(line[1:] if line.startswith(b".") else line)
    out.append(b"")
    return CRLF.join(out)
