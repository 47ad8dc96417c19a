"""Bounce messages: RFC 3464 delivery status notifications in RFC 6522 reports.

When a message cannot be delivered (or, for a delay notice, not yet), the
sender returns a notification to the envelope sender. :func:`build_bounce`
makes the whole message, bytes ready for the spool::

    Date, From (postmaster), To (original sender), Subject, Message-ID,
    Auto-Submitted: auto-replied, MIME-Version, Content-Type:
    multipart/report; report-type=delivery-status           (RFC 6522 §3)
      ├─ text/plain                human-readable explanation
      ├─ message/delivery-status   per-message fields      (RFC 3464 §2.2)
      │                            per-recipient fields    (RFC 3464 §2.3)
      └─ text/rfc822-headers       the original header section (RFC 6522 §4)

The original body is never returned: it may be large, and returning it to a
forged sender would make us a reflector (RFC 3464 §6.2 lets an MTA return
headers only).

Everything that came from elsewhere is sanitised before it reaches a header
field: a diagnostic the remote server wrote can hold CR or LF (header
injection), non-ASCII (RFC 3464 §2.1: delivery-status fields are US-ASCII)
or be arbitrarily long (RFC 5322 §2.1.1: lines are at most 998 octets).
Control characters become spaces, non-ASCII characters RFC 6533's
``\\x{HEX}`` notation, and long fields are folded. The original header
section, which may hold 8-bit bytes or over-long lines, is sent
quoted-printable when it is not clean 7-bit text, as RFC 6522 §4 allows.

Addresses are the exception: they are ours (from the spool, accepted by
SMTP), so a control character in one is an error (:class:`ValueError`), not
something to paper over. A non-ASCII (SMTPUTF8) address is written as
RFC 6533's ``utf-8`` address type in the delivery-status part and as UTF-8
in the ``To`` field (RFC 6532), so such a bounce needs SMTPUTF8 to travel.

The rule that stops bounce loops is :func:`is_bounce`. Pure: no I/O, no
clock; the caller passes ``now``.
"""

from __future__ import annotations

import hashlib
import quopri
import re
import textwrap
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Final, Literal

from mta_client.proto.message import normalise_crlf

__all__ = [
    "MAX_DIAGNOSTIC",
    "MAX_RETURNED_HEADERS",
    "FailedRecipient",
    "build_bounce",
    "is_bounce",
    "smtp_diagnostic",
    "status_for",
]

Action = Literal["failed", "delayed"]

CRLF: Final = b"\r\n"

#: A diagnostic's length cap, in characters after sanitising. An SMTP
#: reply is at most a few lines of 512 octets (RFC 5321 §4.5.3.1.5); the
#: cap keeps a hostile multi-line reply from bloating every bounce.
MAX_DIAGNOSTIC: Final = 2048

#: How much of the original header section a bounce returns. Enough for any
#: real header section (Postfix's default header_size_limit is 100 KiB);
#: the cap stops a bounce being larger than needed to identify the message.
MAX_RETURNED_HEADERS: Final = 64 * 1024

#: RFC 5322 §2.1.1: lines SHOULD be at most 78 characters, MUST be at most 998.
_FOLD_AT: Final = 78
_MAX_LINE: Final = 998
# A word longer than this is cut so that " " + piece fits in one line.
_MAX_WORD: Final = _MAX_LINE - 1

#: The diagnostic type (RFC 3464 §2.3.6) for a diagnostic given without one:
#: our own reasons (DNS, expiry) rather than a remote SMTP reply.
LOCAL_DIAGNOSTIC_TYPE: Final = "X-mta-client"

SUBJECT_FAILED: Final = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED: Final = "Delayed Mail (still being retried)"

# RFC 3463 §2: class "." subject "." detail.
_STATUS: Final = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# RFC 3464 §2.3.6: diagnostic-type ";" *text; the type is an atom.
_TYPED_DIAGNOSTIC: Final = re.compile(r"([A-Za-z][A-Za-z0-9-]*) ?; ?(.*)", re.DOTALL)
# A host name of LDH labels (RFC 1123 §2.1), as a reporting MTA must be.
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_NAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# Spool ids made of these can go into a Message-ID's dot-atom as they are.
# A msg-id worth referring to (RFC 5322 §3.6.4, loosely): anything else is dropped.
_MSG_ID: Final = re.compile(r"<[!-;=?-~]{1,988}>")
_ATOM_SAFE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# RFC 6533 §3 QCHAR: printable ASCII except "+", "=" and "\", which
# utf-8-addr-xtext must escape along with everything non-ASCII.
_QCHAR: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}


def is_bounce(sender: str) -> bool:
    """Whether a message with this envelope sender is itself a notification.

    The rule: never send a bounce (or any notification) for a message whose
    envelope sender is null (``MAIL FROM:<>``): no bounce for a bounce.
    RFC 5321 §6.1 has every non-delivery notification sent with a null
    reverse-path, and §4.5.5 explains why: notifications go to the previous
    message's reverse-path, and the null path is how the loop of two MTAs
    bouncing each other's bounces is cut. The bounces :func:`build_bounce`
    makes must therefore be spooled with the null sender too.
    """
    return sender == ""


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient's part of a notification (RFC 3464 §2.3).

    ``status`` is the RFC 3463 enhanced code ("5.1.1"); use
    :func:`status_for` to get one when the server sent none. ``diagnostic``
    is typed text, e.g. ``"smtp; 550 5.1.1 no such user"`` (see
    :func:`smtp_diagnostic`); text with no type is labelled
    :data:`LOCAL_DIAGNOSTIC_TYPE`. ``remote_mta`` is the MX host name that
    answered, and ``last_attempt`` wall-clock seconds.
    """

    recipient: str
    action: Action
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None
    last_attempt: float | None = None


def status_for(code: int | None, enhanced: str | None, action: Action) -> str:
    """The RFC 3463 status to report: the server's enhanced code if it sent a
    well-formed one, else the generic code of the reply's class ("5.0.0" for
    5xx, "4.0.0" for 4xx, RFC 3463 §3.1), else that of the action."""
    if enhanced is not None and _STATUS.fullmatch(enhanced):
        return enhanced
    if code is not None and 400 <= code < 600:
        return f"{code // 100}.0.0"
    return "5.0.0" if action == "failed" else "4.0.0"


def smtp_diagnostic(code: int, text: str, enhanced: str | None = None) -> str:
    """``"smtp; 550 5.1.1 text"``: an SMTP reply as a Diagnostic-Code (RFC 3464 §2.3.6)."""
    status = f" {enhanced}" if enhanced else ""
    return f"smtp; {code}{status} {text}".rstrip()


def _escape_char(char: str) -> str:
    # RFC 6533 §3 EmbeddedUnicodeChar: \x{HEX}, upper-case, no leading zeros.
    return f"\\x{{{ord(char):02X}}}"


def _clean(text: str, limit: int = MAX_DIAGNOSTIC) -> str:
    """``text`` as one line of printable ASCII: controls (CR and LF among them)
    become spaces, runs of spaces one, non-ASCII ``\\x{HEX}``; then capped."""
    out: list[str] = []
    for char in text:
        if " " <= char <= "~":
            out.append(char)
        elif char < " " or char == "\x7f":
            out.append(" ")
        else:
            out.append(_escape_char(char))
    cleaned = " ".join("".join(out).split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned


def _check_address(address: str, what: str) -> str:
    if not address:
        raise ValueError(f"{what} is empty")
    # C0, DEL and C1 controls, and the Unicode line and paragraph separators:
    # none belongs in an address, and each could end a line somewhere.
    if any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in address):
        raise ValueError(f"{what} {address!r} holds a control character")
    return address


def _address_type(address: str) -> str:
    """``rfc822; addr``, or RFC 6533's ``utf-8; xtext`` for a non-ASCII address."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(c if c in _QCHAR else _escape_char(c) for c in address)


def _diagnostic(text: str) -> str:
    cleaned = _clean(text)
    match = _TYPED_DIAGNOSTIC.fullmatch(cleaned)
    if match:
        return f"{match[1]}; {match[2]}"
    return f"{LOCAL_DIAGNOSTIC_TYPE}; {cleaned}"


def _date(timestamp: float) -> str:
    """RFC 5322 §3.3 date-time, in UTC (``+0000``, not the obsolete ``GMT``)."""
    return format_datetime(datetime.fromtimestamp(timestamp, tz=UTC))


def _field(name: str, value: str) -> bytes:
    """One header field, folded at spaces to 78 characters where it can be.

    A fold goes where a space was, so unfolding restores the value (RFC 5322
    §2.2.3). A word too long for any line (over 997 characters: a hostile
    diagnostic, a broken address) is cut, and the fold between its pieces
    reads back as a space; so no line ever exceeds RFC 5322's 998.
    """
    # Extra spaces stay in front of the word that follows them, so no
    # continuation line is only white space (obsolete syntax, RFC 5322 §4.2).
    words: list[str] = []
    pending = ""
    for word in value.split(" "):
        if not word:
            pending += " "
            continue
        word = pending + word
        pending = ""
        if len(word) <= _MAX_WORD:
            words.append(word)
        else:
            word = word.lstrip(" ")
            words.extend(word[i : i + _MAX_WORD] for i in range(0, len(word), _MAX_WORD))
    lines = [f"{name}:"]
    for index, word in enumerate(words):
        candidate = f"{lines[-1]} {word}"
        # The first word joins the name's line if it fits at all.
        if len(candidate) <= (_MAX_LINE if index == 0 else _FOLD_AT):
            lines[-1] = candidate
        else:
            lines.append(f" {word}")
    return "\r\n".join(lines).encode() + CRLF


def _quoted_printable(data: bytes) -> bytes:
    """RFC 2045 §6.7 quoted-printable with CRLF line breaks (lines <= 76)."""
    encoded = quopri.encodestring(data.replace(CRLF, b"\n"), quotetabs=False)
    return encoded.replace(b"\n", CRLF)


def _is_clean_7bit(data: bytes) -> bool:
    """Whether ``data`` (CRLF lines) is valid 7bit content (RFC 2045 §2.7)."""
    if any(len(line) > _MAX_LINE for line in data.split(CRLF)):
        return False
    return not any(byte >= 0x80 or byte == 0 for byte in data)


def _header_section(original_headers: bytes) -> bytes:
    """The original header section only, CRLF-terminated lines, capped."""
    data = normalise_crlf(original_headers)
    if data.startswith(CRLF):
        return b""  # an empty header section: the message started with its body
    end = data.find(CRLF + CRLF)
    if end != -1:
        data = data[: end + len(CRLF)]
    if len(data) > MAX_RETURNED_HEADERS:
        cut = data.rfind(CRLF, 0, MAX_RETURNED_HEADERS)
        data = data[: cut + len(CRLF)] if cut != -1 else b""
    if data and not data.endswith(CRLF):
        data += CRLF
    return data


def _text_part(
    *,
    recipients: Sequence[FailedRecipient],
    reporting_mta: str,
    postmaster: str,
    spool_id: str,
    arrival: float,
) -> tuple[bytes, bytes]:
    """The human-readable part: (its header fields, its encoded body)."""
    failed = any(r.action == "failed" for r in recipients)
    paragraphs = [f"This is the mail system at host {reporting_mta}."]
    if failed:
        paragraphs.append(
            "Your message could not be delivered to one or more recipients. "
            "The reasons are given below; the headers of your message are attached."
        )
    else:
        paragraphs.append(
            "Delivery of your message to the recipients below has been delayed. "
            "The mail system will keep trying; you do not need to send it again yet."
        )
    for rcpt in recipients:
        what = "failed" if rcpt.action == "failed" else "delayed"
        reason = f"status {status_for(None, rcpt.status, rcpt.action)}"
        if rcpt.diagnostic:
            typed = _TYPED_DIAGNOSTIC.fullmatch(_clean(rcpt.diagnostic))
            reason = typed[2] if typed else _clean(rcpt.diagnostic)
        host = f" (from {_clean(rcpt.remote_mta, 255)})" if rcpt.remote_mta else ""
        paragraphs.append(f"<{rcpt.recipient}>: {what}{host}: {reason}")
    paragraphs.append(
        f"The message (queue id {_clean(spool_id, 255)}) arrived on {_date(arrival)}. "
        f"For help, write to <{postmaster}>."
    )
    text = "\n\n".join(
        textwrap.fill(p, width=76, break_long_words=True, break_on_hyphens=False)
        for p in paragraphs
    )
    body = normalise_crlf(text.encode()) + CRLF
    if body.isascii():
        head = b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
    else:  # an SMTPUTF8 recipient
        head = (
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n"
        )
        body = _quoted_printable(body)
    return head + b"Content-Description: Notification\r\n", body


def _status_part(
    *,
    recipients: Sequence[FailedRecipient],
    reporting_mta: str,
    spool_id: str,
    arrival: float,
) -> bytes:
    """The message/delivery-status body (RFC 3464 §2.1): per-message fields,
    then one block of per-recipient fields for each recipient, blank-line separated."""
    blocks = [
        _field("Reporting-MTA", f"dns; {reporting_mta}")
        + _field("X-Mta-Client-Queue-ID", _clean(spool_id, 255))
        + _field("Arrival-Date", _date(arrival))
    ]
    for rcpt in recipients:
        # A status that is not RFC 3463 syntax would make the report invalid:
        # fall back to the generic code of the action.
        status = status_for(None, rcpt.status, rcpt.action)
        block = (
            _field("Final-Recipient", _address_type(rcpt.recipient))
            + _field("Action", rcpt.action)
            + _field("Status", status)
        )
        if rcpt.remote_mta:
            host = _clean(rcpt.remote_mta, 255).replace(" ", "").rstrip(".")
            block += _field("Remote-MTA", f"dns; {host}")
        if rcpt.diagnostic:
            block += _field("Diagnostic-Code", _diagnostic(rcpt.diagnostic))
        if rcpt.last_attempt is not None:
            block += _field("Last-Attempt-Date", _date(rcpt.last_attempt))
        blocks.append(block)
    return CRLF.join(blocks)


def _message_id(spool_id: str, now: float, reporting_mta: str) -> str:
    """Deterministic, so tests can predict it: ``<bounce.ID.MILLIS@reporting_mta>``.

    ``ID`` is the spool id when it is a safe atom, else a hash of it; with
    the time in milliseconds it is unique for one MTA's bounces.
    """
    if _ATOM_SAFE.fullmatch(spool_id):
        token = spool_id
    else:
        token = hashlib.sha256(spool_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"<bounce.{token}.{int(now * 1000)}@{reporting_mta}>"


def _boundary(spool_id: str, now: float, parts: Sequence[bytes]) -> str:
    """A boundary that occurs in no part (RFC 2046 §5.1.1).

    ``=_`` cannot occur in quoted-printable text; the loop covers the 7bit
    parts, where a hostile diagnostic could hold anything.
    """
    seed = f"{spool_id}\0{now!r}".encode("utf-8", "surrogatepass")
    for attempt in range(1000):
        digest = hashlib.sha256(seed + attempt.to_bytes(4, "big")).hexdigest()[:32]
        boundary = f"=_report_{digest}"
        if not any(boundary.encode() in part for part in parts):
            return boundary
    raise AssertionError("no free MIME boundary in 1000 tries")  # pragma: no cover


def build_bounce(
    *,
    original_sender: str,
    original_headers: bytes,
    original_message_id: str | None,
    spool_id: str,
    recipients: Sequence[FailedRecipient],
    reporting_mta: str,
    arrival: float,
    now: float,
    postmaster: str,
) -> bytes:
    """A complete RFC 5322 notification message, CRLF line endings, lines <= 998.

    ``original_headers`` is the returned message's header section (a whole
    message is cut at its first blank line). ``original_message_id`` goes
    into ``In-Reply-To``/``References`` so mail clients thread the bounce
    with what the user sent. ``reporting_mta`` is our host name, and
    ``postmaster`` the address in ``From``. ``arrival`` and ``now`` are
    wall-clock seconds; the Message-ID is derived from ``spool_id`` and
    ``now`` (see :func:`_message_id`).

    Raises :class:`ValueError` for a null ``original_sender`` (see
    :func:`is_bounce`), no recipients, an invalid ``reporting_mta``, or an
    address holding a control character.
    """
    if is_bounce(original_sender):
        raise ValueError("never bounce a message with a null sender (RFC 5321 section 6.1)")
    _check_address(original_sender, "original_sender")
    _check_address(postmaster, "postmaster")
    if any(c in postmaster for c in " <>"):
        raise ValueError(f"postmaster {postmaster!r} is not a bare address")
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    for rcpt in recipients:
        _check_address(rcpt.recipient, "recipient")
    reporting_mta = reporting_mta.rstrip(".")
    if not _HOST_NAME.fullmatch(reporting_mta) or len(reporting_mta) > 253:
        raise ValueError(f"reporting_mta {reporting_mta!r} is not a host name")

    text_head, text_body = _text_part(
        recipients=recipients,
        reporting_mta=reporting_mta,
        postmaster=postmaster,
        spool_id=spool_id,
        arrival=arrival,
    )
    status_body = _status_part(
        recipients=recipients, reporting_mta=reporting_mta, spool_id=spool_id, arrival=arrival
    )
    headers_body = _header_section(original_headers)
    if _is_clean_7bit(headers_body):
        headers_head = b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit\r\n"
    else:
        # RFC 6522 §4: broken (8-bit, over-long) headers may be sent quoted-
        # printable. RFC 6532 says 8-bit header text is UTF-8; say so.
        charset = "" if headers_body.isascii() else "; charset=utf-8"
        headers_head = (
            f"Content-Type: text/rfc822-headers{charset}\r\n".encode()
            + b"Content-Transfer-Encoding: quoted-printable\r\n"
        )
        headers_body = _quoted_printable(headers_body)
    headers_head += b"Content-Description: Undelivered Message Headers\r\n"

    parts = [
        text_head + CRLF + text_body,
        b"Content-Type: message/delivery-status\r\n"
        b"Content-Description: Delivery report\r\n" + CRLF + status_body,
        headers_head + CRLF + headers_body,
    ]
    boundary = _boundary(spool_id, now, parts)
    failed = any(r.action == "failed" for r in recipients)

    head = (
        _field("Date", _date(now))
        + _field("From", f"Mail Delivery System <{postmaster}>")
        + _field("To", f"<{original_sender}>")
        + _field("Subject", SUBJECT_FAILED if failed else SUBJECT_DELAYED)
        + _field("Message-ID", _message_id(spool_id, now, reporting_mta))
    )
    if original_message_id and _MSG_ID.fullmatch(original_message_id.strip()):
        # RFC 5322 §3.6.4: lets mail clients thread the bounce with what was sent.
        reference = original_message_id.strip()
        head += _field("In-Reply-To", reference) + _field("References", reference)
    head += (
        # RFC 3834 §5: an automatic response to a message.
        _field("Auto-Submitted", "auto-replied")
        + _field("MIME-Version", "1.0")
        + _field(
            "Content-Type",
            f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
        )
    )
    delimiter = f"--{boundary}".encode()
    body = b"This is a MIME-encapsulated message." + CRLF
    for part in parts:
        body += CRLF + delimiter + CRLF + part
        if not part.endswith(CRLF):
            body += CRLF
    body += CRLF + delimiter + b"--" + CRLF
    return head + CRLF + body
