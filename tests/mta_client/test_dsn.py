"""RFC 3464 bounces: structure, fields, sanitising, read back with Python's ``email``."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta_client.proto import dsn
from mta_client.proto.dsn import (
    LOCAL_DIAGNOSTIC_TYPE,
    MAX_DIAGNOSTIC,
    MAX_RETURNED_HEADERS,
    SUBJECT_DELAYED,
    SUBJECT_FAILED,
    FailedRecipient,
    build_bounce,
    is_bounce,
    smtp_diagnostic,
    status_for,
)

NOW = 1709294600.5  # 2024-03-01T12:03:20.5Z
ARRIVAL = 1709294400.0  # 2024-03-01T12:00:00Z
LAST = 1709294500.0  # 2024-03-01T12:01:40Z

ORIGINAL = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"The body, which a bounce never returns.\r\n"
)

BOB = FailedRecipient(
    recipient="bob@example.com",
    action="failed",
    status="5.1.1",
    diagnostic="smtp; 550 5.1.1 <bob@example.com>: no such user",
    remote_mta="mx1.example.com",
    last_attempt=LAST,
)


def bounce(**overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "original_sender": "alice@example.org",
        "original_headers": ORIGINAL,
        "original_message_id": "<m1@example.org>",
        "spool_id": "0123abcd",
        "recipients": [BOB],
        "reporting_mta": "mta1.example.org",
        "arrival": ARRIVAL,
        "now": NOW,
        "postmaster": "postmaster@example.org",
    }
    arguments.update(overrides)
    return build_bounce(**arguments)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _messages(payload: object) -> list[EmailMessage]:
    assert isinstance(payload, list)
    assert all(isinstance(item, EmailMessage) for item in payload)
    return [item for item in payload if isinstance(item, EmailMessage)]


def parts(message: EmailMessage) -> list[EmailMessage]:
    return _messages(message.get_payload())


def status_blocks(message: EmailMessage) -> list[EmailMessage]:
    """The per-message block, then one block per recipient."""
    report = parts(message)[1]
    assert report.get_content_type() == "message/delivery-status"
    return _messages(report.get_payload())


def assert_wire_clean(data: bytes) -> None:
    """CRLF line endings only, every line within RFC 5322's 998 octets."""
    assert data.endswith(b"\r\n")
    assert data.count(b"\r") == data.count(b"\r\n") == data.count(b"\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_bounce_is_a_multipart_report_of_text_status_and_headers() -> None:
    message = parse(bounce())
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message.defects == []


def test_top_level_fields_address_the_original_sender_from_postmaster() -> None:
    message = parse(bounce())
    assert message["From"] == "Mail Delivery System <postmaster@example.org>"
    assert message["From"].addresses[0].addr_spec == "postmaster@example.org"
    assert message["To"].addresses[0].addr_spec == "alice@example.org"
    assert message["Subject"] == SUBJECT_FAILED == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["In-Reply-To"] == "<m1@example.org>"
    assert message["References"] == "<m1@example.org>"


def test_date_is_now_in_utc_with_a_numeric_zone() -> None:
    data = bounce()
    assert re.search(rb"^Date: Fri, 01 Mar 2024 12:03:20 \+0000\r$", data, re.MULTILINE)
    assert parsedate_to_datetime(parse(data)["Date"]) == datetime(2024, 3, 1, 12, 3, 20, tzinfo=UTC)


def test_message_id_is_predictable_from_spool_id_and_now() -> None:
    message = parse(bounce())
    assert message["Message-ID"] == "<bounce.0123abcd.1709294600500@mta1.example.org>"
    assert bounce() == bounce()  # same inputs, same bytes
    assert parse(bounce(now=NOW + 1))["Message-ID"] != message["Message-ID"]


def test_message_id_hashes_a_spool_id_that_is_not_a_safe_atom() -> None:
    message_id = parse(bounce(spool_id="a b<c>@d"))["Message-ID"]
    assert re.fullmatch(r"<bounce\.[0-9a-f]{32}\.1709294600500@mta1\.example\.org>", message_id)


def test_per_message_fields_name_the_reporting_mta_and_arrival() -> None:
    per_message = status_blocks(parse(bounce()))[0]
    assert per_message["Reporting-MTA"] == "dns; mta1.example.org"
    assert per_message["Arrival-Date"] == "Fri, 01 Mar 2024 12:00:00 +0000"
    assert per_message["X-Mta-Client-Queue-ID"] == "0123abcd"


def test_per_recipient_fields_carry_each_value() -> None:
    blocks = status_blocks(parse(bounce()))
    assert len(blocks) == 2
    rcpt = blocks[1]
    assert rcpt["Final-Recipient"] == "rfc822; bob@example.com"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx1.example.com"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.com>: no such user"
    assert rcpt["Last-Attempt-Date"] == "Fri, 01 Mar 2024 12:01:40 +0000"


def test_one_block_per_recipient_in_order() -> None:
    carol = FailedRecipient("carol@example.net", "failed", "5.2.2", "smtp; 552 mailbox full")
    blocks = status_blocks(parse(bounce(recipients=[BOB, carol])))
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@example.com",
        "rfc822; carol@example.net",
    ]
    assert blocks[2]["Status"] == "5.2.2"


def test_absent_optional_recipient_fields_are_left_out() -> None:
    bare = FailedRecipient("bob@example.com", "failed", "5.0.0", None, None, None)
    rcpt = status_blocks(parse(bounce(recipients=[bare])))[1]
    assert set(rcpt.keys()) == {"Final-Recipient", "Action", "Status"}


def test_text_part_lists_each_recipient_with_its_reason() -> None:
    text = parts(parse(bounce()))[0].get_content()
    assert "<bob@example.com>: failed (from mx1.example.com): 550 5.1.1" in text
    assert "no such user" in text
    assert "mta1.example.org" in text
    assert "0123abcd" in text


@pytest.mark.parametrize(
    ("code", "enhanced", "action", "expected"),
    [
        (550, "5.1.1", "failed", "5.1.1"),
        (550, None, "failed", "5.0.0"),
        (451, None, "delayed", "4.0.0"),
        (451, None, "failed", "4.0.0"),  # an expired 4xx reports the reply's class
        (550, "bogus", "failed", "5.0.0"),
        (None, None, "failed", "5.0.0"),
        (None, None, "delayed", "4.0.0"),
        (250, None, "failed", "5.0.0"),
    ],
)
def test_status_for_synthesises_the_generic_code_of_the_class(
    code: int | None, enhanced: str | None, action: dsn.Action, expected: str
) -> None:
    assert status_for(code, enhanced, action) == expected


def test_a_malformed_status_falls_back_to_the_actions_class() -> None:
    bad = FailedRecipient("bob@example.com", "delayed", "4.x\r\nInjected: 1", None)
    rcpt = status_blocks(parse(bounce(recipients=[bad])))[1]
    assert rcpt["Status"] == "4.0.0"
    assert rcpt["Injected"] is None


def test_smtp_diagnostic_formats_a_reply() -> None:
    assert smtp_diagnostic(550, "no such user", "5.1.1") == "smtp; 550 5.1.1 no such user"
    assert smtp_diagnostic(451, "try later") == "smtp; 451 try later"


def test_cr_lf_in_a_diagnostic_cannot_inject_fields_or_parts() -> None:
    hostile = FailedRecipient(
        "bob@example.com",
        "failed",
        "5.0.0",
        "smtp; 550 no\r\nBcc: victim@example.net\r\n\r\n--x\nInjected: yes\rend",
    )
    data = bounce(recipients=[hostile])
    assert_wire_clean(data)
    message = parse(data)
    rcpt = status_blocks(message)[1]
    assert rcpt["Diagnostic-Code"] == "smtp; 550 no Bcc: victim@example.net --x Injected: yes end"
    assert rcpt["Bcc"] is None
    assert rcpt["Injected"] is None
    assert message["Bcc"] is None
    assert len(status_blocks(message)) == 2
    assert not re.search(rb"^(Bcc|Injected):", data, re.MULTILINE)


def test_non_ascii_in_a_diagnostic_becomes_rfc6533_escapes() -> None:
    rcpt = FailedRecipient(
        "bob@example.com", "failed", "5.1.1", "smtp; 550 adresse inconnue \u00e9"
    )
    message = parse(bounce(recipients=[rcpt]))
    block = status_blocks(message)[1]
    assert block["Diagnostic-Code"] == "smtp; 550 adresse inconnue \\x{E9}"


def test_a_diagnostic_without_a_type_is_labelled_local() -> None:
    rcpt = FailedRecipient("bob@example.com", "failed", "5.1.2", "example.com: NXDOMAIN")
    block = status_blocks(parse(bounce(recipients=[rcpt])))[1]
    assert block["Diagnostic-Code"] == f"{LOCAL_DIAGNOSTIC_TYPE}; example.com: NXDOMAIN"


def test_a_long_diagnostic_is_folded_and_capped() -> None:
    words = " ".join(f"word{i}" for i in range(1000))
    rcpt = FailedRecipient("bob@example.com", "failed", "5.0.0", f"smtp; 550 {words}")
    data = bounce(recipients=[rcpt])
    assert_wire_clean(data)
    section = data.split(b"Diagnostic-Code:", 1)[1].split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in section.split(b"\r\n"))
    value = status_blocks(parse(data))[1]["Diagnostic-Code"]
    assert value.startswith("smtp; 550 word0 word1 word2 ")
    assert value.endswith("...")
    assert len(value) <= MAX_DIAGNOSTIC + len("smtp; ")


def test_a_word_longer_than_a_line_is_cut_to_keep_lines_within_998() -> None:
    rcpt = FailedRecipient("bob@example.com", "failed", "5.0.0", "smtp; 550 " + "x" * 1500)
    data = bounce(recipients=[rcpt])
    assert_wire_clean(data)
    assert "x" * 997 in status_blocks(parse(data))[1]["Diagnostic-Code"]


def test_non_ascii_original_headers_are_returned_quoted_printable() -> None:
    original = b"From: alice@example.org\nSubject: caf\xc3\xa9 \xff\n\nbody\n"
    data = bounce(original_headers=original)
    assert data.isascii()
    assert_wire_clean(data)
    returned = parts(parse(data))[2]
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"
    assert (
        returned.get_payload(decode=True)
        == b"From: alice@example.org\r\nSubject: caf\xc3\xa9 \xff\r\n"
    )


def test_clean_original_headers_are_returned_as_7bit_without_the_body() -> None:
    returned = parts(parse(bounce()))[2]
    assert returned["Content-Transfer-Encoding"] == "7bit"
    assert returned.get_content() == ORIGINAL.split(b"\r\n\r\n")[0].decode() + "\r\n"
    assert b"a bounce never returns" not in bounce()


def test_an_over_long_original_header_line_is_quoted_printable() -> None:
    original = b"X-Long: " + b"y" * 2000 + b"\r\n\r\n"
    data = bounce(original_headers=original)
    assert_wire_clean(data)
    returned = parts(parse(data))[2]
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"
    assert returned.get_payload(decode=True) == original[:-2]


def test_returned_headers_are_capped_at_a_line_boundary() -> None:
    line = b"X-Filler: " + b"z" * 90 + b"\r\n"
    original = line * (2 * MAX_RETURNED_HEADERS // len(line))
    returned = parts(parse(bounce(original_headers=original)))[2]
    content = returned.get_payload(decode=True)
    assert isinstance(content, bytes)
    assert len(content) <= MAX_RETURNED_HEADERS
    assert content.endswith(line)
    assert len(content) > MAX_RETURNED_HEADERS - len(line)


def test_non_ascii_recipient_uses_the_utf8_address_type() -> None:
    rcpt = FailedRecipient("j\u00f6rg+x@b\u00fccher.example", "failed", "5.1.1", None)
    data = bounce(recipients=[rcpt])
    block = status_blocks(parse(data))[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}x@b\\x{FC}cher.example"
    text = parts(parse(data))[0]
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "j\u00f6rg+x@b\u00fccher.example" in text.get_content()
    assert data.isascii()


def test_delay_notice_has_its_own_subject_and_action() -> None:
    later = FailedRecipient("bob@example.com", "delayed", "4.2.2", "smtp; 452 4.2.2 full")
    message = parse(bounce(recipients=[later]))
    assert message["Subject"] == SUBJECT_DELAYED
    assert status_blocks(message)[1]["Action"] == "delayed"


def test_boundary_moves_when_a_part_contains_it() -> None:
    first = parse(bounce()).get_boundary()
    assert first is not None
    hostile = FailedRecipient("bob@example.com", "failed", "5.0.0", f"smtp; 550 --{first}--")
    message = parse(bounce(recipients=[hostile]))
    assert message.get_boundary() != first
    assert len(parts(message)) == 3
    assert status_blocks(message)[1]["Diagnostic-Code"] == f"smtp; 550 --{first}--"


def test_is_bounce_is_true_only_for_the_null_sender() -> None:
    assert is_bounce("")
    assert not is_bounce("alice@example.org")
    assert not is_bounce("<>")  # the spool holds the path without brackets


def test_a_null_sender_is_never_bounced() -> None:
    with pytest.raises(ValueError, match="null sender"):
        bounce(original_sender="")


def test_a_report_needs_a_recipient() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        bounce(recipients=[])


@pytest.mark.parametrize(
    "overrides",
    [
        {"original_sender": "alice@example.org\r\nBcc: x@example.net"},
        {"postmaster": "postmaster@example.org\nX: y"},
        {"postmaster": "Postmaster <postmaster@example.org>"},
        {"recipients": [FailedRecipient("bob@example.com\r\nX: y", "failed", "5.0.0")]},
        {"recipients": [FailedRecipient("bob\u2028@example.com", "failed", "5.0.0")]},
        {"reporting_mta": "mta1.example.org\r\nX: y"},
        {"reporting_mta": "not a host"},
    ],
)
def test_control_characters_in_our_own_inputs_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"control character|not a bare address|not a host"):
        bounce(**overrides)


_no_controls = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=80
)


@given(
    diagnostic=st.text(max_size=3000),
    remote_mta=st.text(max_size=300),
    headers=st.binary(max_size=3000),
    recipient=_no_controls,
    sender=_no_controls,
    status=st.text(max_size=10),
    message_id=st.text(max_size=100),
)
def test_any_input_yields_a_parseable_report_with_clean_lines(
    diagnostic: str,
    remote_mta: str,
    headers: bytes,
    recipient: str,
    sender: str,
    status: str,
    message_id: str,
) -> None:
    rcpt = FailedRecipient(recipient, "failed", status, diagnostic, remote_mta, LAST)
    data = bounce(
        original_sender=sender,
        original_headers=headers,
        original_message_id=message_id,
        recipients=[rcpt, BOB],
    )
    assert_wire_clean(data)
    message = parse(data)
    assert message.defects == []
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    blocks = status_blocks(message)
    assert len(blocks) == 3
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", blocks[1]["Status"])
    assert blocks[2]["Final-Recipient"] == "rfc822; bob@example.com"
    # The delivery-status part is US-ASCII (RFC 3464 §2.1), whatever came in.
    report = data.split(b"Content-Type: message/delivery-status", 1)[1]
    assert report.split(b"Content-Type: text/rfc822-headers", 1)[0].isascii()
