"""What ``mta-client enqueue`` accepts: envelope addresses and message sanity.

Pure checks, no I/O. The spool must only hold what an MTA would accept at
submission, so that a message fails when it is enqueued, with a message
saying exactly what is wrong and where, and not five days later as a bounce.

Addresses follow RFC 5321 §4.1.2 ``Mailbox`` with the SMTPUTF8 extensions of
RFC 6531 §3.3::

    Mailbox     = Local-part "@" ( Domain / address-literal )
    Local-part  = Dot-string / Quoted-string        ; at most 64 octets (§4.5.3.1.1)
    Dot-string  = Atom *("." Atom)                  ; Atom = 1*atext (RFC 5322 §3.2.3)
    Domain      = sub-domain *("." sub-domain)      ; LDH labels, or U-labels (RFC 6531)
    address-literal = "[" IPv4 "]" / "[IPv6:" IPv6 "]"   ; §4.1.3

Two restrictions go beyond the grammar, because such an address could not be
sent anyway (:mod:`mta_client.proto.smtp` refuses them as command injection):
no space, control character or angle bracket anywhere, even inside a quoted
local part. A domain is at most 253 characters, the 255 octets of
RFC 5321 §4.5.3.1.2 in DNS wire form (RFC 1035 §3.1), and the whole address
at most 254 octets (the 256-octet path of §4.5.3.1.3 less its brackets).

A message must be an RFC 5322 message: a header section of ``Name: value``
fields (with folded continuation lines), then optionally an empty line and
the body. Lines end in LF or CRLF; no NUL, no bare CR (the ambiguity SMTP
smuggling exploits), no line over 998 octets (RFC 5322 §2.1.1). The message
is never rewritten: a DKIM signature covers its exact bytes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import Final

import idna

from mta_client.errors import MtaClientError

__all__ = [
    "MAX_MESSAGE_SIZE",
    "SubmissionError",
    "check_address",
    "check_message",
    "check_sender",
    "header_value",
    "message_id",
]

#: Default cap on a message, in octets: 50 MiB, a common MTA ``message_size_limit``.
MAX_MESSAGE_SIZE: Final = 50 * 1024 * 1024
#: RFC 5322 §2.1.1: a line MUST be at most 998 characters, excluding the CRLF.
MAX_LINE: Final = 998
#: RFC 5321 §4.5.3.1.1: a local part is at most 64 octets.
MAX_LOCAL_PART: Final = 64
#: RFC 5321 §4.5.3.1.2: 255 octets in DNS wire form, 253 characters as text.
MAX_DOMAIN: Final = 253
#: RFC 1035 §2.3.4: a label is at most 63 octets.
MAX_LABEL: Final = 63
#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets, 254 without its angle brackets.
MAX_ADDRESS: Final = 254

# RFC 5322 §3.2.3 atext, ASCII part; RFC 6531 §3.3 adds every non-ASCII character.
_ATEXT_ASCII: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
# RFC 1035 §2.3.1 / RFC 5321 §4.1.2 Let-dig and Ldh-str, checked after lower-casing.
_LDH_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# A CR not followed by LF: anywhere in a message, it is refused.
_BARE_CR: Final = re.compile(rb"\r(?!\n)")


class SubmissionError(MtaClientError, ValueError):
    """An address or message that ``mta-client enqueue`` refuses; the text says why and where."""


# -- addresses -------------------------------------------------------------------


def check_address(address: str, *, what: str) -> str:
    """Validate an envelope address; return it normalised.

    ``what`` ("sender" or "recipient") starts every error message, as in
    ``recipient 'bob@': no domain``. The domain is lower-cased (U-labels by
    the UTS #46 mapping, which also applies NFC); the local part is returned
    as written, since RFC 5321 §2.4 lets its owner treat case as significant.
    Raises :class:`SubmissionError`.
    """

    def fail(problem: str) -> SubmissionError:
        return SubmissionError(f"{what} {address!r}: {problem}")

    if not address:
        raise fail("empty address")
    try:
        octets = len(address.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates: what Python makes of undecodable bytes in argv.
        raise fail("not valid UTF-8") from None
    for ch in address:
        if ch in "<>":
            raise fail("angle brackets are not part of the address; give it bare")
        if ch.isspace() or not ch.isprintable():
            raise fail(f"contains {ch!r}: no spaces or control characters")
    local, at, domain = address.rpartition("@")
    if not at:
        raise fail("no '@' (an address is local-part@domain)")
    if not local:
        raise fail("empty local part")
    if not domain:
        raise fail("no domain")
    problem = _local_part_problem(local)
    if problem:
        raise fail(f"local part {problem}")
    try:
        normalised = _normalise_domain(domain)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if octets > MAX_ADDRESS:
        raise fail(f"is {octets} octets; RFC 5321 section 4.5.3.1.3 allows {MAX_ADDRESS}")
    return f"{local}@{normalised}"


def check_sender(address: str) -> str:
    """Validate a reverse-path: like :func:`check_address`, but ``""`` is allowed.

    The empty string is the null reverse-path ``<>`` of RFC 5321 §4.5.5, used
    for bounces and auto-replies so that they cannot cause more bounces.
    """
    if not address:
        return ""
    if address == "<>":
        raise SubmissionError("sender '<>': give the null reverse-path as an empty string")
    return check_address(address, what="sender")


def _local_part_problem(local: str) -> str | None:
    """Why ``local`` is not an RFC 5321 Local-part, or None if it is one."""
    size = len(local.encode("utf-8"))
    if size > MAX_LOCAL_PART:
        return f"is {size} octets; RFC 5321 section 4.5.3.1.1 allows {MAX_LOCAL_PART}"
    if local.startswith('"'):
        return _quoted_string_problem(local)
    for atom in local.split("."):
        if not atom:
            return "has an empty atom (a leading, trailing or double dot); quote it"
        for ch in atom:
            if ch == '"':
                return "has a quote but is not a quoted string"
            if ch.isascii() and ch not in _ATEXT_ASCII:
                return f"has {ch!r}, which is only allowed inside quotes"
    return None


def _quoted_string_problem(local: str) -> str | None:
    """Why ``local`` (starting with a quote) is not an RFC 5321 Quoted-string."""
    i = 1
    while i < len(local):
        ch = local[i]
        if ch == "\\":
            # quoted-pairSMTP = "\" %d32-126; spaces are refused earlier.
            if i + 1 == len(local):
                return "ends inside a quoted pair (a lone backslash)"
            i += 2
            continue
        if ch == '"':
            if i + 1 != len(local):
                return "has text after its closing quote"
            return None
        i += 1
    return "has an unterminated quoted string"


def _normalise_domain(domain: str) -> str:
    """The domain or address literal, normalised; ValueError saying what is wrong."""
    if domain.startswith("["):
        return _address_literal(domain)
    if domain.endswith("."):
        raise ValueError(f"domain {domain!r} ends with a dot")
    try:
        IPv4Address(domain)
    except ValueError:
        pass
    else:
        raise ValueError(
            f"an IP address is written as an address literal, [{domain}] (RFC 5321 section 4.1.3)"
        )
    labels = [_normalise_label(label, domain) for label in domain.split(".")]
    ascii_length = sum(len(a_label) for _, a_label in labels) + len(labels) - 1
    if ascii_length > MAX_DOMAIN:
        raise ValueError(
            f"domain is {ascii_length} characters (as A-labels); the limit is {MAX_DOMAIN} "
            "(RFC 5321 section 4.5.3.1.2)"
        )
    return ".".join(label for label, _ in labels)


def _normalise_label(label: str, domain: str) -> tuple[str, str]:
    """``(label as returned, its A-label)``; ValueError saying what is wrong."""
    if not label:
        raise ValueError(f"domain {domain!r} has an empty label")
    if label.isascii():
        ascii_label = label.lower()
    else:
        # RFC 6531 §3.2: U-labels are allowed with SMTPUTF8. UTS #46 maps them
        # (lower case, NFC), then IDNA 2008 says whether they are valid.
        try:
            mapped = idna.uts46_remap(label, std3_rules=True, transitional=False)
            a_label = idna.alabel(mapped).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"label {label!r} is not a valid IDNA label ({exc})") from None
        if len(a_label) > MAX_LABEL:
            raise ValueError(
                f"label {label!r} is {len(a_label)} octets as an A-label; the limit is {MAX_LABEL}"
            )
        return mapped, a_label
    if len(ascii_label) > MAX_LABEL:
        raise ValueError(
            f"label {label[:20]!r}... is {len(label)} octets; the limit is {MAX_LABEL} "
            "(RFC 1035 section 2.3.4)"
        )
    if not _LDH_LABEL.fullmatch(ascii_label):
        bad = next((ch for ch in ascii_label if not (ch.isalnum() or ch == "-")), None)
        if bad is not None:
            raise ValueError(
                f"label {label!r} has {bad!r}: letters, digits and hyphens only "
                "(RFC 5321 section 4.1.2)"
            )
        raise ValueError(f"label {label!r} starts or ends with a hyphen (RFC 5321 section 4.1.2)")
    if ascii_label.startswith("xn--"):
        try:
            idna.ulabel(ascii_label)
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"label {label!r} is not a valid A-label ({exc})") from None
    return ascii_label, ascii_label


def _address_literal(domain: str) -> str:
    """``[IPv4]`` or ``[IPv6:...]`` (RFC 5321 §4.1.3), normalised; ValueError otherwise."""
    if not domain.endswith("]"):
        raise ValueError(f"address literal {domain!r} has no closing ']'")
    inner = domain[1:-1]
    tag, colon, rest = inner.partition(":")
    if not colon:
        try:
            return f"[{IPv4Address(inner)}]"
        except ValueError:
            raise ValueError(f"{domain!r} is not an IPv4 address literal") from None
    # ABNF strings are case-insensitive (RFC 5234 §2.3): "ipv6:" is the same tag.
    if tag.lower() != "ipv6":
        try:
            IPv6Address(inner)
        except ValueError:
            raise ValueError(
                f"address literal {domain!r}: only IPv4 and IPv6: literals are defined"
            ) from None
        raise ValueError(
            f"address literal {domain!r}: an IPv6 address needs the tag, [IPv6:{inner}] "
            "(RFC 5321 section 4.1.3)"
        )
    try:
        address = IPv6Address(rest)
    except ValueError:
        raise ValueError(f"{domain!r} is not an IPv6 address literal") from None
    if address.scope_id is not None:
        raise ValueError(f"address literal {domain!r}: a zone index is meaningless to others")
    return f"[IPv6:{address}]"


# -- messages --------------------------------------------------------------------


def check_message(body: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """Refuse what an MTA would refuse at submission; return ``body`` unchanged.

    Refused, in this order: an empty message; one over ``max_size`` octets;
    then, at the first line where it happens: a bare CR, a NUL byte, a line
    over 998 octets without its line ending (RFC 5322 §2.1.1), and in the
    header section (which comes first and ends at the first empty line or at
    the end of the message) a line that is neither a ``Name: value`` field
    (name: printable ASCII but ``:``, RFC 5322 §3.6.8) nor a continuation
    starting with a space or tab (§2.2.3). At least one field is required.
    Errors name the line, counting from 1. Raises :class:`SubmissionError`.
    """
    if not body:
        raise SubmissionError("message is empty")
    if len(body) > max_size:
        raise SubmissionError(f"message is {len(body)} octets; the limit is {max_size}")
    lines = body.split(b"\n")
    fields, body_start = 0, len(lines)
    for index in range(len(lines)):
        text = _without_ending(lines, index)
        _check_line(text, index + 1)
        if not text:
            body_start = index + 1
            break
        fields += _check_header_line(text, index + 1, fields)
    if fields == 0:
        raise SubmissionError(
            "line 1: empty line before any header field; a message starts with its "
            "header section (RFC 5322 section 2.1)"
        )
    # The body can be most of 50 MiB: scan it in C first, line by line only
    # to say where a problem is.
    rest = itertools.islice(lines, body_start, None)
    if b"\0" in body or _BARE_CR.search(body) or max(map(len, rest), default=0) > MAX_LINE:
        for index in range(body_start, len(lines)):
            _check_line(_without_ending(lines, index), index + 1)
    return body


def _without_ending(lines: list[bytes], index: int) -> bytes:
    """Line ``index`` of a message split at LF, without its CR if it ended in CRLF.

    The last piece had no LF after it, so a CR at its end is a bare CR and stays.
    """
    line = lines[index]
    if index < len(lines) - 1 and line.endswith(b"\r"):
        return line[:-1]
    return line


def _check_line(text: bytes, number: int) -> None:
    """The checks every line gets, header or body; ``text`` is without its line ending."""
    if b"\r" in text:
        raise SubmissionError(
            f"line {number}: bare CR (a CR must be followed by LF; RFC 5322 section 2.3)"
        )
    if b"\0" in text:
        raise SubmissionError(f"line {number}: NUL byte (RFC 5322 section 2.3)")
    if len(text) > MAX_LINE:
        raise SubmissionError(
            f"line {number}: {len(text)} octets; RFC 5322 section 2.1.1 allows {MAX_LINE} "
            "without the line ending"
        )


def _check_header_line(text: bytes, number: int, fields: int) -> int:
    """Check a non-empty header-section line; 1 if it starts a field, 0 if it continues one."""
    if text[:1] in (b" ", b"\t"):
        if fields == 0:
            raise SubmissionError(f"line {number}: continuation line before any header field")
        return 0
    if number == 1 and text.startswith(b"From "):
        # What mbox files and some MTAs' local delivery put before a message.
        raise SubmissionError("line 1: an mbox 'From ' separator, not a header field; remove it")
    name, colon, _ = text.partition(b":")
    if not colon:
        raise SubmissionError(f"line {number}: header line without a colon")
    if not name:
        raise SubmissionError(f"line {number}: header field with an empty name")
    for byte in name:
        if not 33 <= byte <= 126:
            shown = repr(chr(byte)) if byte < 128 else f"byte 0x{byte:02x}"
            raise SubmissionError(
                f"line {number}: header field name {name.decode('utf-8', 'replace')!r} has "
                f"{shown}; names are printable ASCII without spaces or colons "
                "(RFC 5322 section 3.6.8)"
            )
    return 1


# -- reading header fields ---------------------------------------------------------


def header_value(body: bytes, name: str) -> str | None:
    """The value of the first header field called ``name`` (any case), unfolded.

    Unfolding removes the line breaks of folded lines (RFC 5322 §2.2.3); the
    value is stripped of surrounding whitespace and decoded as UTF-8
    (RFC 6532), with undecodable bytes replaced. None when there is no such
    field. Meant for messages that passed :func:`check_message`; on others,
    lines that are not fields are skipped. Raises :class:`ValueError` for a
    ``name`` that no field can have.
    """
    if not name or not all("!" <= ch <= "~" and ch != ":" for ch in name):
        raise ValueError(f"{name!r} is not a header field name (RFC 5322 section 3.6.8)")
    wanted = name.lower().encode("ascii")
    for field_name, value in _fields(body):
        if field_name.lower() == wanted:
            return value.decode("utf-8", "replace").strip()
    return None


def message_id(body: bytes) -> str | None:
    """The Message-ID field's value, angle brackets included, for event logs.

    None when the message has no Message-ID, or an empty one.
    """
    return header_value(body, "Message-ID") or None


def _fields(body: bytes) -> Iterator[tuple[bytes, bytes]]:
    """``(name, unfolded value)`` for each field of the header section."""
    name: bytes | None = None
    parts: list[bytes] = []
    for line in body.split(b"\n"):
        text = line.removesuffix(b"\r")
        if not text:
            break
        if text[:1] in (b" ", b"\t"):
            if name is not None:
                parts.append(text)
            continue
        if name is not None:
            yield name, b"".join(parts)
        field_name, colon, value = text.partition(b":")
        if colon and field_name and b" " not in field_name and b"\t" not in field_name:
            name, parts = field_name, [value]
        else:
            name, parts = None, []
    if name is not None:
        yield name, b"".join(parts)
