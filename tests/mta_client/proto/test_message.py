"""Tests for mta_client.proto.message: CRLF normalisation and dot-stuffing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta_client.errors import RemoteProtocolError
from mta_client.proto.message import (
    TERMINATOR,
    is_prepared,
    normalise_crlf,
    prepare_data,
    unstuff,
)

EXAMPLES = settings(max_examples=300, deadline=None)

# Bytes that matter to line endings and stuffing, mixed with arbitrary bytes.
_PIECES = [b"\r", b"\n", b"\r\n", b".", b"..", b"\r\n.\r\n", b"\n.\n", b"a", b"\xff", b"\x00"]
messages = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join),
)


def reference_lines(data: bytes) -> list[bytes]:
    """The lines of ``data``, each of CR, LF and CRLF ending one (written
    independently of the module's regex)."""
    lines: list[bytes] = []
    current = bytearray()
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == 0x0D:
            lines.append(bytes(current))
            current.clear()
            i += 2 if data[i + 1 : i + 2] == b"\n" else 1
            continue
        if byte == 0x0A:
            lines.append(bytes(current))
            current.clear()
        else:
            current.append(byte)
        i += 1
    if current:
        lines.append(bytes(current))
    return lines


# ---------------------------------------------------------------------------
# Byte-exact cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        pytest.param(b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n", id="crlf-kept"),
        pytest.param(b"a\nb\n", b"a\r\nb\r\n.\r\n", id="bare-lf-to-crlf"),
        pytest.param(b"a\rb\r", b"a\r\nb\r\n.\r\n", id="bare-cr-to-crlf"),
        pytest.param(b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n", id="bare-cr-then-crlf"),
        pytest.param(b"a\n\rb", b"a\r\n\r\nb\r\n.\r\n", id="lf-then-cr-are-two-endings"),
        pytest.param(b"no newline", b"no newline\r\n.\r\n", id="final-crlf-added"),
        pytest.param(b"\n", b"\r\n.\r\n", id="one-empty-line"),
        pytest.param(b".\n", b"..\r\n.\r\n", id="dot-line-doubled"),
        pytest.param(b".", b"..\r\n.\r\n", id="lone-dot-without-newline"),
        pytest.param(b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n", id="inner-dot-line"),
        pytest.param(b"..x\n", b"...x\r\n.\r\n", id="one-more-dot-on-dotted-line"),
        pytest.param(b"x.y\n.z", b"x.y\r\n..z\r\n.\r\n", id="dot-inside-line-untouched"),
        pytest.param(b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n", id="early-terminator-stuffed"),
        pytest.param(b"a\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n", id="smuggling-lf-dot-crlf"),
        pytest.param(b"a\r.\rb", b"a\r\n..\r\nb\r\n.\r\n", id="smuggling-cr-dot-cr"),
        pytest.param(b"\xc3\xa9\xff\x00\x80\n", b"\xc3\xa9\xff\x00\x80\r\n.\r\n", id="8-bit"),
    ],
)
def test_prepare_data_is_byte_exact(raw: bytes, wire: bytes) -> None:
    assert prepare_data(raw) == wire


def test_empty_message_is_just_the_terminator() -> None:
    # Zero lines of data: the CRLF of "DATA" already ended the previous line,
    # so ".\r\n" completes <CRLF>.<CRLF>. b"\r\n.\r\n" would add an empty line.
    assert prepare_data(b"") == b".\r\n" == TERMINATOR
    assert unstuff(b".\r\n") == b""


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (b"", b""),
        (b"a", b"a"),
        (b"\r\n\r\n", b"\r\n\r\n"),
        (b"\n\n", b"\r\n\r\n"),
        (b"\r\r", b"\r\n\r\n"),
        (b"\r\n\n\r", b"\r\n\r\n\r\n"),
    ],
)
def test_normalise_crlf_turns_every_bare_cr_and_lf_into_one_crlf(
    raw: bytes, normalised: bytes
) -> None:
    assert normalise_crlf(raw) == normalised


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@EXAMPLES
@given(raw=messages)
def test_unstuff_inverts_prepare_data_up_to_normalisation(raw: bytes) -> None:
    lines = reference_lines(raw)
    expected = b"".join(line + b"\r\n" for line in lines)
    assert normalise_crlf(raw) + (b"" if not raw or raw.endswith((b"\r", b"\n")) else b"\r\n") == (
        expected
    )
    assert unstuff(prepare_data(raw)) == expected


@EXAMPLES
@given(raw=messages)
def test_prepared_payload_ends_exactly_once_and_has_only_crlf(raw: bytes) -> None:
    wire = prepare_data(raw)
    assert wire.endswith(TERMINATOR)
    if raw:
        assert wire.find(b"\r\n.\r\n") == len(wire) - 5
        assert not wire.startswith(b".\r\n")
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    assert is_prepared(wire)


@EXAMPLES
@given(raw=messages)
def test_prepared_lines_starting_with_dot_get_one_more_dot(raw: bytes) -> None:
    wire_lines = prepare_data(raw).split(b"\r\n")
    assert wire_lines[-2:] == [b".", b""]
    original = reference_lines(raw)
    assert len(wire_lines) - 2 == len(original)
    for sent, line in zip(wire_lines, original, strict=False):
        assert sent == (b"." + line if line.startswith(b".") else line)


@EXAMPLES
@given(raw=messages)
def test_normalise_crlf_is_idempotent_and_keeps_other_bytes(raw: bytes) -> None:
    once = normalise_crlf(raw)
    assert normalise_crlf(once) == once
    assert once.replace(b"\r\n", b"") == raw.replace(b"\r", b"").replace(b"\n", b"")


# ---------------------------------------------------------------------------
# The receiver side is strict
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"a\r\n", id="no-terminator"),
        pytest.param(b"a.\r\n", id="terminator-not-on-own-line"),
        pytest.param(b"a\nb\r\n.\r\n", id="bare-lf"),
        pytest.param(b"a\rb\r\n.\r\n", id="bare-cr"),
        pytest.param(b"a\r\n.\r\nb\r\n.\r\n", id="early-end-of-data"),
        pytest.param(b".\r\nb\r\n.\r\n", id="end-of-data-first"),
    ],
)
def test_unstuff_refuses_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        unstuff(payload)
    assert not is_prepared(payload)


def test_unstuff_removes_exactly_one_leading_dot() -> None:
    assert unstuff(b"..\r\n...x\r\n.y\r\nz.\r\n.\r\n") == b".\r\n..x\r\ny\r\nz.\r\n"


@pytest.mark.parametrize(
    "payload",
    [b".\r\n", b"\r\n.\r\n", b"a\r\n.\r\n", b"..\r\n.\r\n"],
)
def test_is_prepared_accepts_well_formed_payloads(payload: bytes) -> None:
    assert is_prepared(payload)
