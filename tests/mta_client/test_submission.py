"""What ``mta-client enqueue`` accepts: addresses (RFC 5321 §4.1.2, RFC 6531) and messages."""

from __future__ import annotations

import contextlib
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta_client.errors import MtaClientError
from mta_client.submission import (
    SubmissionError,
    check_address,
    check_message,
    check_sender,
    header_value,
    message_id,
)

# -- addresses -------------------------------------------------------------------

LONG_DOMAIN = ".".join(["b" * 63] * 3) + "." + "c" * 59

GOOD_ADDRESSES = [
    ("bob@example.com", "bob@example.com"),
    ("Bob.Smith@Example.COM", "Bob.Smith@example.com"),  # local part keeps its case
    ("a@b", "a@b"),  # a single-label domain is a Domain
    ("user+tag@sub.example.co.uk", "user+tag@sub.example.co.uk"),
    ("!#$%&'*+-/=?^_`{|}~@example.com", "!#$%&'*+-/=?^_`{|}~@example.com"),
    ('"a@b"@example.com', '"a@b"@example.com'),
    ('"a..b"@example.com', '"a..b"@example.com'),
    ('"a\\"b"@example.com', '"a\\"b"@example.com'),
    ("bob@123.example", "bob@123.example"),
    ("bob@xn--bcher-kva.de", "bob@xn--bcher-kva.de"),
    ("bob@XN--BCHER-KVA.DE", "bob@xn--bcher-kva.de"),
    ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
    ("bob@[IPv6:2001:DB8::1]", "bob@[IPv6:2001:db8::1]"),
    ("bob@[ipv6:2001:db8:0:0:0:0:0:1]", "bob@[IPv6:2001:db8::1]"),
    # SMTPUTF8 (RFC 6531): non-ASCII local parts and U-label domains.
    ("pelé@example.com", "pelé@example.com"),
    ("用户@例子.广告", "用户@例子.广告"),
    ("bob@Bücher.DE", "bob@bücher.de"),
    ("bob@\uff22\uff35\uff23\uff28\uff25\uff32.de", "bob@bucher.de"),  # full-width: ASCII
    ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
    # The longest address: 254 octets (RFC 5321 section 4.5.3.1.3), domain 251.
    ("ab@" + LONG_DOMAIN, "ab@" + LONG_DOMAIN),
]

BAD_ADDRESSES = [
    ("", "empty address"),
    ("bob", "no '@'"),
    ("bob@", "no domain"),
    ("@example.com", "empty local part"),
    ("bob smith@example.com", "contains ' '"),
    ('"bob smith"@example.com', "contains ' '"),  # unsendable: spaces end the path
    ("bob\t@example.com", "contains '\\t'"),
    ("bob\r\nRCPT TO:<x@y>@example.com", "contains '\\r'"),
    ("bob\x00@example.com", "contains '\\x00'"),
    ("bob@exa\u200bmple.com", "contains '\\u200b'"),
    ("<bob@example.com>", "angle brackets"),
    ("bob\udcff@example.com", "not valid UTF-8"),
    (".bob@example.com", "empty atom"),
    ("bob.@example.com", "empty atom"),
    ("bo..b@example.com", "empty atom"),
    ("bob@smith@example.com", "has '@', which is only allowed inside quotes"),
    ("bo,b@example.com", "has ','"),
    ("bo(b)@example.com", "has '('"),
    ('bo"b@example.com', "has a quote but is not a quoted string"),
    ('"bob@example.com', "unterminated quoted string"),
    ('"bob"x@example.com', "text after its closing quote"),
    ('"bob\\"@example.com', "unterminated quoted string"),
    ("a" * 65 + "@example.com", "local part is 65 octets"),
    ("é" * 33 + "@example.com", "local part is 66 octets"),  # octets, not characters
    ("bob@example..com", "empty label"),
    ("bob@.example.com", "empty label"),
    ("bob@example.com.", "ends with a dot"),
    ("bob@-example.com", "starts or ends with a hyphen"),
    ("bob@example-.com", "starts or ends with a hyphen"),
    ("bob@exa_mple.com", "has '_'"),
    ("bob@exa!mple.com", "has '!'"),
    ("bob@" + "a" * 64 + ".com", "is 64 octets; the limit is 63"),
    ("bob@" + ".".join(["b" * 63] * 4), "domain is 255 characters"),
    ("bob@" + ".".join(["b" * 63] * 3) + "." + "c" * 62, "domain is 254 characters"),
    ("b" * 64 + "@" + ".".join(["c" * 63] * 3) + ".dd", "is 259 octets"),
    ("bob@192.0.2.1", "address literal, [192.0.2.1]"),
    ("bob@[192.0.2.1", "no closing ']'"),
    ("bob@[192.0.2]", "not an IPv4 address literal"),
    ("bob@[192.0.2.256]", "not an IPv4 address literal"),
    ("bob@[2001:db8::1]", "needs the tag, [IPv6:2001:db8::1]"),
    ("bob@[IPv6:2001:db8::g]", "not an IPv6 address literal"),
    ("bob@[IPv6:fe80::1%eth0]", "zone index"),
    ("bob@[x400:foo]", "only IPv4 and IPv6: literals"),
    ("bob@xn--zz.com", "not a valid A-label"),
    ("bob@☃.net", "not a valid IDNA label"),
]


@pytest.mark.parametrize(("address", "normalised"), GOOD_ADDRESSES)
def test_valid_addresses_are_accepted_with_the_domain_lower_cased(
    address: str, normalised: str
) -> None:
    assert check_address(address, what="recipient") == normalised


@pytest.mark.parametrize(("address", "fragment"), BAD_ADDRESSES)
def test_invalid_addresses_are_refused_saying_what_is_wrong(address: str, fragment: str) -> None:
    with pytest.raises(SubmissionError) as info:
        check_address(address, what="recipient")
    message = str(info.value)
    assert message.startswith(f"recipient {address!r}: ")
    assert fragment in message


def test_the_brief_example_message_is_exact() -> None:
    with pytest.raises(SubmissionError, match=r"^recipient 'bob@': no domain$"):
        check_address("bob@", what="recipient")


def test_errors_name_the_role_of_the_address() -> None:
    with pytest.raises(SubmissionError, match=r"^sender 'x': no '@'"):
        check_address("x", what="sender")


def test_submission_errors_are_mta_client_errors_and_value_errors() -> None:
    with pytest.raises(SubmissionError) as info:
        check_address("x", what="recipient")
    assert isinstance(info.value, MtaClientError)
    assert isinstance(info.value, ValueError)


def test_the_null_sender_is_allowed_as_an_empty_string() -> None:
    assert check_sender("") == ""


def test_the_null_sender_written_with_brackets_gets_a_hint() -> None:
    with pytest.raises(SubmissionError, match="empty string"):
        check_sender("<>")


def test_a_sender_is_checked_and_normalised_like_an_address() -> None:
    assert check_sender("Bob@EXAMPLE.com") == "Bob@example.com"
    with pytest.raises(SubmissionError, match=r"^sender 'bob@': no domain$"):
        check_sender("bob@")


_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
_LET_DIG = string.ascii_letters + string.digits
atoms = st.text(_ATEXT, min_size=1, max_size=10)
labels = st.builds(
    lambda first, middle, last: first + middle + last if middle or last else first,
    st.sampled_from(_LET_DIG),
    st.text(_LET_DIG + "-", max_size=8),
    st.text(_LET_DIG, min_size=1, max_size=1),
)


@given(
    st.lists(atoms, min_size=1, max_size=4).map(".".join),
    st.lists(labels, min_size=1, max_size=4).map(".".join),
)
def test_any_dot_string_at_an_ldh_domain_is_accepted(local: str, domain: str) -> None:
    if domain.replace(".", "").isdigit():
        return  # all-numeric names can read as IP addresses; covered by the table
    address = f"{local}@{domain}"
    assert check_address(address, what="recipient") == f"{local}@{domain.lower()}"


@given(st.text(max_size=80))
def test_arbitrary_text_is_accepted_or_refused_with_a_submission_error_only(text: str) -> None:
    try:
        result = check_address(text, what="recipient")
    except SubmissionError:
        return
    # What is accepted is idempotent: normalising it again changes nothing.
    assert check_address(result, what="recipient") == result


# -- messages --------------------------------------------------------------------


def crlf(text: bytes) -> bytes:
    return text.replace(b"\n", b"\r\n")


GOOD_MESSAGE = b"From: a@example.com\nTo: b@example.com\nSubject: hi\n\nHello.\n"


@pytest.mark.parametrize(
    "body",
    [
        GOOD_MESSAGE,
        crlf(GOOD_MESSAGE),
        b"Subject: only a header",
        b"Subject: header and blank line\n\n",
        b"Subject: folded\n\tonto two lines\n  and three\n\nbody\n",
        b"Subject: no trailing newline\n\nbody",
        b"X-Empty:\n\n",
        b"Subject: \xc3\xa4 UTF-8 value (RFC 6532)\n\n\xff\xfe 8-bit body\n",
        b"Subject: x\n\n" + b"a" * 998 + b"\n",
        b"Subject: x\r\n\r\n" + b"a" * 998 + b"\r\n",
        b"Subject: x\n\n" + b"a" * 998,
        b"Subject: x\n\nbody line: with a colon\n\n.\n",
        b"Subject: x\r\nX: mixed endings\n\nbody\r\n",
    ],
)
def test_valid_messages_are_returned_unchanged(body: bytes) -> None:
    assert check_message(body) is body


BAD_MESSAGES = [
    (b"", "message is empty"),
    (b"\nbody\n", "line 1: empty line before any header field"),
    (b"\r\nbody\r\n", "line 1: empty line before any header field"),
    (b" continued\nSubject: x\n\n", "line 1: continuation line before any header field"),
    (b"Subject: x\nno colon here\n\nbody\n", "line 2: header line without a colon"),
    (b"Hello, world\n", "line 1: header line without a colon"),
    (b"Subject: x\n: value\n\n", "line 2: header field with an empty name"),
    (b"Subject : x\n\n", "line 1: header field name 'Subject ' has ' '"),
    (b"Sub\tject: x\n\n", "line 1: header field name 'Sub\\tject' has '\\t'"),
    (b"Subj\xc3\xa9ct: x\n\n", "has byte 0xc3"),
    (b"From a@example.com Mon Jan  1 00:00:00 2024\nSubject: x\n\n", "line 1: an mbox 'From '"),
    (b"Subject: x\rcc: y\n\n", "line 1: bare CR"),
    (b"Subject: x\n\nbody\rmore\n", "line 3: bare CR"),
    (b"Subject: x\n\nbody ends in CR\r", "line 3: bare CR"),
    (b"Subject: x\r\n\r\n\r\r\n", "line 3: bare CR"),
    (b"Subject: a\x00b\n\n", "line 1: NUL byte"),
    (b"Subject: x\n\none\ntwo\nth\x00ree\n", "line 5: NUL byte"),
    (b"Subject: " + b"x" * 990 + b"\n\n", "line 1: 999 octets"),
    (b"Subject: x\n\n" + b"a" * 999 + b"\n", "line 3: 999 octets"),
    (b"Subject: x\r\n\r\nok\r\n" + b"a" * 999 + b"\r\n", "line 4: 999 octets"),
    (b"Subject: x\n\n" + b"a" * 2000, "line 3: 2000 octets"),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_MESSAGES)
def test_invalid_messages_are_refused_naming_the_line(body: bytes, fragment: str) -> None:
    with pytest.raises(SubmissionError) as info:
        check_message(body)
    assert fragment in str(info.value)


def test_the_first_problem_in_line_order_is_reported() -> None:
    body = b"Subject: x\n\nfine\n" + b"a" * 1200 + b"\nnul\x00\n"
    with pytest.raises(SubmissionError, match=r"^line 4: 1200 octets"):
        check_message(body)


def test_a_message_over_the_size_limit_is_refused() -> None:
    body = b"Subject: x\n\n" + b"a\n" * 100
    assert check_message(body, max_size=len(body)) is body
    with pytest.raises(SubmissionError, match=f"message is {len(body)} octets; the limit is 100"):
        check_message(body, max_size=100)


def test_the_default_size_limit_is_fifty_mebibytes() -> None:
    line = b"a" * 998 + b"\n"
    body = b"Subject: x\n\n" + line * (50 * 1024 * 1024 // len(line) + 1)
    assert len(body) > 50 * 1024 * 1024
    with pytest.raises(SubmissionError, match="the limit is 52428800"):
        check_message(body)
    just_fits = body[: 50 * 1024 * 1024]
    assert check_message(just_fits) is just_fits


header_names = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"),
    min_size=1,
    max_size=20,
).filter(lambda name: not name.startswith("From "))
values = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=60).map(
    lambda text: text.encode("utf-8")
)
headers = st.lists(
    st.tuples(header_names, values, st.lists(values.map(lambda v: b"\t" + v), max_size=2)),
    min_size=1,
    max_size=8,
)
body_lines = st.lists(
    st.binary(max_size=200).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    ),
    max_size=10,
)


@given(headers, st.none() | body_lines, st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_any_valid_header_block_and_body_is_accepted_unchanged(
    fields: list[tuple[str, bytes, list[bytes]]],
    body: list[bytes] | None,
    eol: bytes,
    final_eol: bool,
) -> None:
    lines = []
    for name, value, continuations in fields:
        lines.append(name.encode("ascii") + b":" + value)
        lines.extend(continuations)
    if body is not None:
        lines.append(b"")
        lines.extend(body)
    message = eol.join(lines) + (eol if final_eol else b"")
    assert check_message(message) is message
    name, value, continuations = fields[0]
    expected = (value + b"".join(continuations)).decode("utf-8").strip()
    assert header_value(message, name) == expected


@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_accepted_or_refused_with_a_submission_error_only(data: bytes) -> None:
    with contextlib.suppress(SubmissionError):
        assert check_message(data) is data


# -- reading header fields ---------------------------------------------------------

HEADERS = (
    b"Subject: Hello\r\n"
    b"message-id:\r\n"
    b"  <abc.123@example.com>\r\n"
    b"X-Folded: one\r\n"
    b"\ttwo\r\n"
    b"X-Utf8: \xc3\xa4rger\r\n"
    b"Subject: second\r\n"
    b"\r\n"
    b"Message-ID: <in-the-body@example.com>\r\n"
)


def test_message_id_is_the_unfolded_stripped_value_with_brackets() -> None:
    assert message_id(HEADERS) == "<abc.123@example.com>"


def test_message_id_is_none_without_the_field_or_with_an_empty_one() -> None:
    assert message_id(b"Subject: x\n\nMessage-ID: <body@example.com>\n") is None
    assert message_id(b"Message-ID:   \nSubject: x\n\n") is None


def test_header_value_finds_the_first_field_of_that_name_in_any_case() -> None:
    assert header_value(HEADERS, "subject") == "Hello"
    assert header_value(HEADERS, "SUBJECT") == "Hello"


def test_header_value_unfolds_keeping_the_whitespace_of_the_continuation() -> None:
    assert header_value(HEADERS, "X-Folded") == "one\ttwo"


def test_header_value_decodes_utf8() -> None:
    assert header_value(HEADERS, "X-Utf8") == "ärger"


def test_header_value_does_not_read_the_body() -> None:
    assert header_value(b"Subject: x\n\nX-Body: y\n", "X-Body") is None


def test_header_value_works_on_lf_messages() -> None:
    assert header_value(b"A: 1\nB: 2\n 3\n\n", "b") == "2 3"


def test_header_value_refuses_a_name_no_field_can_have() -> None:
    with pytest.raises(ValueError, match="not a header field name"):
        header_value(HEADERS, "Sub ject")
    with pytest.raises(ValueError, match="not a header field name"):
        header_value(HEADERS, "")
