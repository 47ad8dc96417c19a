"""The PROXY protocol codec: spec vectors, fragmentation, early rejection, round trips."""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoproxy.errors import LocalProtocolError, RemoteProtocolError
from kumoproxy.proto.crc32c import crc32c
from kumoproxy.proto.proxy_protocol import (
    V1_MAX_LENGTH,
    V2_DEFAULT_MAX_LENGTH,
    V2_SIGNATURE,
    Command,
    Family,
    IPAddress,
    ProxyHeader,
    Tlv,
    TlvType,
    Transport,
    encode_v1,
    encode_v2,
    maybe_parse,
)

VECTOR_FILE = Path(__file__).with_name("proxy_protocol_vectors.json")

Endpoint = tuple[IPAddress, int]


@dataclass(frozen=True)
class Vector:
    """One entry of proxy_protocol_vectors.json, decoded."""

    id: str
    verdict: str
    data: bytes
    note: str
    endpoints: tuple[Endpoint, Endpoint] | None
    tlvs: dict[int, bytes] | None
    trailing: bytes

    @property
    def header(self) -> bytes:
        """The bytes that make up the header (``data`` without ``trailing``)."""
        return self.data[: len(self.data) - len(self.trailing)]


def _load_vectors() -> list[Vector]:
    raw = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
    vectors = []
    for entry in raw["vectors"]:
        endpoints = None
        if "src" in entry:
            endpoints = (
                (ipaddress.ip_address(entry["src"]), int(entry["src_port"])),
                (ipaddress.ip_address(entry["dst"]), int(entry["dst_port"])),
            )
        tlvs = None
        if "tlvs" in entry:
            tlvs = {int(key, 16): bytes.fromhex(value) for key, value in entry["tlvs"].items()}
        vectors.append(
            Vector(
                id=entry["id"],
                verdict=entry["verdict"],
                data=bytes.fromhex(entry["hex"]),
                note=entry["note"],
                endpoints=endpoints,
                tlvs=tlvs,
                trailing=bytes.fromhex(entry.get("trailing", "")),
            )
        )
    return vectors


VECTORS = _load_vectors()
ACCEPTED = [vector for vector in VECTORS if vector.verdict != "invalid"]
INVALID = [vector for vector in VECTORS if vector.verdict == "invalid"]
BY_ID = {vector.id: vector for vector in VECTORS}


def _ids(vectors: list[Vector]) -> list[str]:
    return [vector.id for vector in vectors]


def _parse_whole(data: bytes) -> tuple[ProxyHeader, int]:
    result = maybe_parse(data)
    assert result is not None, "expected a complete header"
    return result


# --- the vector file ----------------------------------------------------------


def test_vector_file_has_59_vectors_with_the_documented_verdict_counts() -> None:
    assert len(VECTORS) == 59
    assert len(BY_ID) == 59, "vector ids must be unique"
    assert Counter(vector.verdict for vector in VECTORS) == {
        "valid": 14,
        "valid-local": 3,
        "valid-refuse": 5,
        "invalid": 37,
    }


@pytest.mark.parametrize("vector", VECTORS, ids=_ids(VECTORS))
def test_vector_verdict_holds_when_fed_whole(vector: Vector) -> None:
    if vector.verdict == "invalid" and "EOF" in vector.note:
        # A truncated header can only wait for more; EOF mid-header is then invalid.
        assert maybe_parse(vector.data) is None
        return
    if vector.verdict == "invalid":
        with pytest.raises(RemoteProtocolError) as info:
            maybe_parse(vector.data)
        assert info.value.answer == b"", "PROXY protocol has no reply channel"
        assert str(info.value)
        return

    header, consumed = _parse_whole(vector.data)
    assert consumed == len(vector.header)
    assert vector.data[consumed:] == vector.trailing
    match vector.verdict:
        case "valid":
            assert header.command is Command.PROXY
            assert header.tcp_endpoints == vector.endpoints
            assert (header.source, header.destination) == vector.endpoints
        case "valid-local":
            assert header.command is Command.LOCAL
            assert header.source is None
            assert header.destination is None
            assert header.tcp_endpoints is None
        case "valid-refuse":
            assert header.command is Command.PROXY
            assert header.tcp_endpoints is None
        case other:
            pytest.fail(f"unknown verdict {other!r}")
    if vector.tlvs is not None:
        assert {tlv.type: tlv.value for tlv in header.tlvs} == vector.tlvs


# --- fragmentation and trailing bytes ------------------------------------------


@pytest.mark.parametrize("vector", ACCEPTED, ids=_ids(ACCEPTED))
def test_accepted_vector_needs_more_data_until_its_last_byte_arrives(vector: Vector) -> None:
    expected = _parse_whole(vector.header)
    received = bytearray()
    for byte in vector.header[:-1]:
        received.append(byte)
        assert maybe_parse(received) is None, f"complete after {len(received)} bytes"
    received.append(vector.header[-1])
    assert maybe_parse(received) == expected


@pytest.mark.parametrize("vector", ACCEPTED, ids=_ids(ACCEPTED))
def test_accepted_vector_leaves_appended_bytes_untouched(vector: Vector) -> None:
    expected_header, expected_count = _parse_whole(vector.header)
    appended = b"220 mx.example ESMTP\r\n\x00\xff" + V2_SIGNATURE + b"PROXY TCP4 "
    data = vector.header + appended
    header, consumed = _parse_whole(data)
    assert (header, consumed) == (expected_header, expected_count)
    assert data[consumed:] == appended


@given(
    vector=st.sampled_from(ACCEPTED),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
)
def test_accepted_vector_parses_the_same_across_random_split_points(
    vector: Vector, cuts: list[int]
) -> None:
    expected = _parse_whole(vector.data)
    header_length = expected[1]
    # Feed growing prefixes, as a reader appending each recv() to its buffer does.
    for cut in sorted({min(cut, len(vector.data)) for cut in cuts} | {len(vector.data)}):
        result = maybe_parse(vector.data[:cut])
        if cut < header_length:
            assert result is None
        else:
            assert result == expected


@given(
    vector=st.sampled_from(INVALID),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
)
def test_invalid_vector_once_rejected_stays_rejected_as_more_bytes_arrive(
    vector: Vector, cuts: list[int]
) -> None:
    rejected = False
    for cut in sorted({min(cut, len(vector.data)) for cut in cuts} | {len(vector.data)}):
        try:
            result = maybe_parse(vector.data[:cut])
        except RemoteProtocolError:
            rejected = True
            continue
        assert not rejected, f"rejected a shorter prefix but not {cut} bytes"
        assert result is None, "a prefix of an invalid vector parsed"


# --- early rejection -------------------------------------------------------------


def test_empty_buffer_needs_more_data() -> None:
    assert maybe_parse(b"") is None


@pytest.mark.parametrize(
    "prefix",
    [
        *(b"PROXY "[:n] for n in range(1, 7)),
        *(V2_SIGNATURE[:n] for n in range(1, 13)),
        V2_SIGNATURE + b"\x21",
        V2_SIGNATURE + b"\x21\x11",
        V2_SIGNATURE + b"\x21\x11\x00",
    ],
    ids=repr,
)
def test_every_prefix_of_a_signature_needs_more_data(prefix: bytes) -> None:
    assert maybe_parse(prefix) is None


@pytest.mark.parametrize("first", [b"G", b"E", b"p", b"\x05", b"\x16", b"\x00", b"\n", b" "])
def test_foreign_first_byte_is_rejected_without_waiting_for_more(first: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="not a PROXY protocol header"):
        maybe_parse(first)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP request", id="http"),
        pytest.param(b"\x05\x01\x00", "SOCKS5 client", id="socks5-greeting"),
        pytest.param(b"\x04\x01\x00\x19", "SOCKS4 client", id="socks4"),
        pytest.param(b"\x16\x03\x01\x02\x00", "TLS ClientHello", id="tls"),
        pytest.param(b"EHLO mta.example\r\n", "SMTP client", id="smtp-ehlo"),
        pytest.param(b"proxy TCP4 ", "wrong case", id="lowercase-proxy"),
        pytest.param(b"PROXY\r\n", "single space", id="proxy-without-space"),
        pytest.param(
            V2_SIGNATURE[:11] + b"\x0b", "v2 signature that is wrong at byte 11", id="sig"
        ),
    ],
)
def test_foreign_protocol_is_rejected_at_once_with_a_message_naming_it(
    data: bytes, named: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=named) as info:
        maybe_parse(data)
    assert info.value.answer == b""


@pytest.mark.parametrize(
    "partial",
    [
        b"PROXY TCP5",
        b"PROXY tcp4",
        b"PROXY TCP4\t",
        b"PROXY  ",
        b"PROXY TCP4 01",
        b"PROXY TCP4 256",
        b"PROXY TCP4 1.2.3.4.5",
        b"PROXY TCP4 1..",
        b"PROXY TCP4 1.2.3.4  ",
        b"PROXY TCP4 ::",
        b"PROXY TCP6 1.2",
        b"PROXY TCP6 fe80::1%",
        b"PROXY TCP6 ::ffff:1.",
        b"PROXY TCP6 fe80::g",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 00",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 655360",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 25 ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 25 x",
    ],
    ids=repr,
)
def test_v1_bad_field_is_rejected_as_soon_as_it_arrives(partial: bytes) -> None:
    # No CRLF yet: a lazy parser would wait for it (or for 107 bytes).
    with pytest.raises(RemoteProtocolError):
        maybe_parse(partial)


@pytest.mark.parametrize(
    "partial",
    [
        b"PROXY T",
        b"PROXY UNKNOWN",
        b"PROXY UNKNOWN anything \x01\xff at all",
        b"PROXY TCP4 ",
        b"PROXY TCP4 1.2.3.",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 2",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 25",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 25\r",
        b"PROXY TCP6 2001:DB8::",
    ],
    ids=repr,
)
def test_v1_valid_prefix_needs_more_data(partial: bytes) -> None:
    assert maybe_parse(partial) is None


def test_v1_line_without_crlf_is_rejected_once_107_bytes_are_present() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 1 - len(b"PROXY UNKNOWN "))
    assert len(line) == V1_MAX_LENGTH - 1
    assert maybe_parse(line) is None
    with pytest.raises(RemoteProtocolError, match="no CRLF within 107 bytes"):
        maybe_parse(line + b"x")


def test_v1_cr_as_the_107th_byte_is_rejected_because_its_lf_would_be_the_108th() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 1 - len(b"PROXY UNKNOWN "))
    with pytest.raises(RemoteProtocolError, match="no CRLF within 107 bytes"):
        maybe_parse(line + b"\r")


def test_v1_unknown_ignores_everything_up_to_crlf() -> None:
    header, consumed = _parse_whole(b"PROXY UNKNOWN 1.2.3.4 \x00\xfe junk\r\nEHLO")
    assert consumed == len(b"PROXY UNKNOWN 1.2.3.4 \x00\xfe junk\r\n")
    assert (header.family, header.transport) == (Family.UNSPEC, Transport.UNSPEC)
    assert header.source is None
    assert header.tcp_endpoints is None


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP6 ::ffff:c000:201 2001:db8::2 0 25\r\n",
        b"PROXY TCP6 2001:db8::1 ::ffff:c000:219 0 25\r\n",
    ],
    ids=["source", "destination"],
)
def test_v1_v4_mapped_ipv6_in_hex_form_is_rejected(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="v4-mapped"):
        maybe_parse(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP6 2001:db8::1 2001:db8:::2 0 25\r\n",
        b"PROXY TCP6 2001:db8::1 1:2:3:4:5:6:7:8:9 0 25\r\n",
        b"PROXY TCP6 2001:db8::1 12345:: 0 25\r\n",
        b"PROXY TCP4 1.2.3 5.6.7.8 0 25\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0 \r\n",
        b"PROXY \r\n",
        b"PROXY TCP4\r\n",
    ],
    ids=repr,
)
def test_v1_malformed_complete_line_is_rejected(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        maybe_parse(line)


def test_v1_accepts_upper_case_hex_and_port_zero() -> None:
    header, _ = _parse_whole(b"PROXY TCP6 2001:DB8::A 2001:db8::b 0 0\r\n")
    assert header.tcp_endpoints == (
        (ipaddress.IPv6Address("2001:db8::a"), 0),
        (ipaddress.IPv6Address("2001:db8::b"), 0),
    )


def _v2_prefix(ver_cmd: int, fam: int, length: int) -> bytes:
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + length.to_bytes(2, "big")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(V2_SIGNATURE + b"\x11", "version nibble is 1", id="version-1"),
        pytest.param(V2_SIGNATURE + b"\x31", "version nibble is 3", id="version-3"),
        pytest.param(V2_SIGNATURE + b"\x2f", "command 15", id="command-15"),
        pytest.param(V2_SIGNATURE + b"\x21\x41", "family 4", id="family-4"),
        pytest.param(V2_SIGNATURE + b"\x21\x13", "transport 3", id="transport-3"),
    ],
)
def test_v2_prefix_byte_is_checked_as_soon_as_it_arrives(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        maybe_parse(data)


def test_v2_length_above_the_default_cap_is_rejected_after_16_bytes() -> None:
    at_cap = _v2_prefix(0x21, 0x11, V2_DEFAULT_MAX_LENGTH - 16)
    assert maybe_parse(at_cap) is None  # legal: wait for the rest
    over_cap = _v2_prefix(0x21, 0x11, V2_DEFAULT_MAX_LENGTH - 16 + 1)
    with pytest.raises(RemoteProtocolError, match="above our cap of 4096"):
        maybe_parse(over_cap)


def test_v2_cap_is_configurable_and_covers_the_whole_header() -> None:
    kumod = BY_ID["V2-OK-kumo-tcp4"].data
    assert len(kumod) == 28
    assert maybe_parse(kumod, max_v2_length=28) is not None
    with pytest.raises(RemoteProtocolError, match="declares 28 bytes"):
        maybe_parse(kumod[:16], max_v2_length=27)


def test_v2_cap_below_the_prefix_size_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        maybe_parse(b"PROXY ", max_v2_length=15)


@pytest.mark.parametrize(
    ("fam", "length"),
    [(0x11, 11), (0x12, 0), (0x21, 35), (0x22, 12), (0x31, 215), (0x32, 0)],
    ids=["tcp4", "udp4", "tcp6", "udp6", "unix-stream", "unix-dgram"],
)
def test_v2_proxy_length_shorter_than_the_address_block_is_rejected_after_16_bytes(
    fam: int, length: int
) -> None:
    with pytest.raises(RemoteProtocolError, match="too short"):
        maybe_parse(_v2_prefix(0x21, fam, length))


def test_v2_local_skips_whatever_the_address_block_holds() -> None:
    # A v4-mapped "address" and odd ports: LOCAL ignores the block entirely.
    block = ipaddress.IPv6Address("::ffff:192.0.2.1").packed + bytes(range(16)) + b"\xff" * 4
    header, consumed = _parse_whole(_v2_prefix(0x20, 0x21, len(block)) + block)
    assert consumed == 16 + 36
    assert header.command is Command.LOCAL
    assert (header.source, header.destination, header.tlvs) == (None, None, ())


def test_v2_local_with_a_block_shorter_than_its_family_needs_is_accepted() -> None:
    header, consumed = _parse_whole(_v2_prefix(0x20, 0x11, 5) + b"\x00" * 5)
    assert consumed == 21
    assert header.command is Command.LOCAL
    assert header.tlvs == ()


def test_v2_udp_over_ipv4_has_addresses_but_no_tcp_endpoints() -> None:
    header, _ = _parse_whole(BY_ID["V2-REFUSE-udp4"].data)
    assert header.transport is Transport.DGRAM
    assert header.source == (ipaddress.IPv4Address("10.0.0.1"), 0)
    assert header.destination == (ipaddress.IPv4Address("192.0.2.25"), 25)
    assert header.tcp_endpoints is None


def test_v2_unix_and_unspec_have_no_addresses() -> None:
    for vector_id in ("V2-REFUSE-unix", "V2-REFUSE-proxy-unspec"):
        header, _ = _parse_whole(BY_ID[vector_id].data)
        assert (header.source, header.destination) == (None, None)


def test_v2_unknown_tlv_type_is_kept_verbatim() -> None:
    header, _ = _parse_whole(BY_ID["V2-OK-custom"].data)
    assert header.tlvs == (Tlv(type=0xE1, value=b"\x01tenant-a"),)


def test_v2_crc32c_tlv_is_kept_alongside_other_tlvs_in_order() -> None:
    header, _ = _parse_whole(BY_ID["V2-OK-haproxy-sender"].data)
    assert [tlv.type for tlv in header.tlvs] == [TlvType.CRC32C, TlvType.UNIQUE_ID]
    assert header.tlvs[1].value == b"7F0000099DD4"


def _tcp4_block(tlvs: bytes) -> bytes:
    addresses = bytes((10, 0, 0, 1, 192, 0, 2, 25, 0, 0, 0, 25))
    return _v2_prefix(0x21, 0x11, len(addresses) + len(tlvs)) + addresses + tlvs


def test_v2_unique_id_of_exactly_128_bytes_is_accepted() -> None:
    header, _ = _parse_whole(_tcp4_block(b"\x05\x00\x80" + b"u" * 128))
    assert header.tlvs == (Tlv(TlvType.UNIQUE_ID, b"u" * 128),)


def test_v2_second_crc32c_tlv_is_rejected_even_when_the_first_verifies() -> None:
    doubled = bytearray(_tcp4_block(b"\x03\x00\x04" + bytes(4) + b"\x03\x00\x04" + b"1234"))
    first = 16 + 12 + 3
    doubled[first : first + 4] = crc32c(doubled).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError, match="more than one CRC32C"):
        maybe_parse(bytes(doubled))


def test_v2_tlv_header_cut_short_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="stray"):
        maybe_parse(_tcp4_block(b"\x04\x00"))


def test_v2_v4_mapped_destination_is_rejected() -> None:
    block = (
        ipaddress.IPv6Address("2001:db8::1").packed
        + ipaddress.IPv6Address("::ffff:192.0.2.25").packed
        + b"\x00\x00\x00\x19"
    )
    with pytest.raises(RemoteProtocolError, match="v4-mapped"):
        maybe_parse(_v2_prefix(0x21, 0x21, len(block)) + block)


def test_v2_crc32c_over_the_header_is_castagnoli_with_its_field_zeroed() -> None:
    data = BY_ID["V2-OK-crc32c"].data
    assert int.from_bytes(data[-4:], "big") == crc32c(data[:-4] + bytes(4))


# --- encoders ---------------------------------------------------------------------


def _egress_header(
    source: str = "10.0.0.1", destination: str = "192.0.2.25", *, version: int = 2
) -> ProxyHeader:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    return ProxyHeader(
        version=version,
        command=Command.PROXY,
        family=Family.INET if src.version == 4 else Family.INET6,
        transport=Transport.STREAM,
        source=(src, 0),
        destination=(dst, 25),
    )


def test_encode_v2_produces_exactly_what_kumod_sends() -> None:
    assert encode_v2(_egress_header()) == BY_ID["V2-OK-kumo-tcp4"].data
    ipv6 = _egress_header("2001:db8::1", "2001:db8:1::25")
    assert encode_v2(ipv6) == BY_ID["V2-OK-kumo-tcp6"].data


def test_encode_v2_with_crc32c_matches_the_vector() -> None:
    assert encode_v2(_egress_header(), with_crc32c=True) == BY_ID["V2-OK-crc32c"].data


def test_encode_v2_local_is_the_bare_16_byte_prefix() -> None:
    local = ProxyHeader(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None)
    assert encode_v2(local) == BY_ID["V2-OK-local-empty"].data


def test_encode_v1_produces_the_canonical_line() -> None:
    assert encode_v1(_egress_header(version=1)) == BY_ID["V1-OK-egress-tcp4"].data
    ipv6 = _egress_header("2001:db8::1", "2001:db8:1::25", version=1)
    assert encode_v1(ipv6) == BY_ID["V1-OK-egress-tcp6"].data


@pytest.mark.parametrize(
    ("family", "transport"),
    [
        (Family.UNSPEC, Transport.UNSPEC),
        (Family.INET, Transport.DGRAM),
        (Family.UNIX, Transport.STREAM),
    ],
)
def test_encode_v1_sends_unknown_for_what_v1_cannot_express(
    family: Family, transport: Transport
) -> None:
    header = replace(_egress_header(version=1), family=family, transport=transport)
    assert encode_v1(header) == b"PROXY UNKNOWN\r\n"


def test_encode_v2_unix_round_trips_without_addresses() -> None:
    header = ProxyHeader(2, Command.PROXY, Family.UNIX, Transport.STREAM, None, None)
    encoded = encode_v2(header)
    assert len(encoded) == 16 + 216
    assert maybe_parse(encoded) == (header, len(encoded))


_MAPPED = ipaddress.IPv6Address("::ffff:192.0.2.1")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        pytest.param(
            replace(_egress_header(), family=Family.INET6), "does not match family", id="family"
        ),
        pytest.param(
            replace(_egress_header(), source=(_MAPPED, 0), family=Family.INET6),
            "v4-mapped",
            id="v4-mapped",
        ),
        pytest.param(
            replace(_egress_header(), source=(ipaddress.IPv6Address("fe80::1%eth0"), 0)),
            "does not match family",
            id="zone-in-v4-header",
        ),
        pytest.param(
            replace(
                _egress_header("2001:db8::1", "2001:db8::2"),
                source=(ipaddress.IPv6Address("fe80::1%eth0"), 0),
            ),
            "zone id",
            id="zone-id",
        ),
        pytest.param(
            replace(_egress_header(), destination=None), "needs both endpoints", id="no-dst"
        ),
        pytest.param(
            replace(_egress_header(), source=(ipaddress.IPv4Address("10.0.0.1"), 65536)),
            "outside 0..65535",
            id="port",
        ),
    ],
)
def test_encoders_refuse_headers_they_cannot_send_faithfully(
    header: ProxyHeader, message: str
) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        encode_v2(header)
    with pytest.raises(LocalProtocolError, match=message):
        encode_v1(header)


def test_encode_v1_refuses_local_and_tlvs() -> None:
    local = ProxyHeader(1, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None)
    with pytest.raises(LocalProtocolError, match="LOCAL"):
        encode_v1(local)
    with pytest.raises(LocalProtocolError, match="TLVs"):
        encode_v1(replace(_egress_header(version=1), tlvs=(Tlv(TlvType.NOOP, b""),)))


def test_encode_v2_refuses_local_with_addresses() -> None:
    with pytest.raises(LocalProtocolError, match="LOCAL"):
        encode_v2(replace(_egress_header(), command=Command.LOCAL))


def test_encode_v2_refuses_a_second_crc32c_tlv() -> None:
    header = replace(_egress_header(), tlvs=(Tlv(TlvType.CRC32C, bytes(4)),))
    with pytest.raises(LocalProtocolError, match="CRC32C"):
        encode_v2(header, with_crc32c=True)


@pytest.mark.parametrize(
    "tlv",
    [Tlv(256, b""), Tlv(-1, b""), Tlv(TlvType.NOOP, bytes(0x10000))],
    ids=["type-256", "type-negative", "value-64k"],
)
def test_encode_v2_refuses_tlvs_that_do_not_fit_the_wire(tlv: Tlv) -> None:
    with pytest.raises(LocalProtocolError):
        encode_v2(replace(_egress_header(), tlvs=(tlv,)))


# --- round trips ------------------------------------------------------------------

ports = st.integers(min_value=0, max_value=0xFFFF)
ipv4_addresses = st.ip_addresses(v=4)


def _not_v4_mapped(address: IPAddress) -> bool:
    return not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None)


ipv6_addresses: st.SearchStrategy[IPAddress] = st.ip_addresses(v=6).filter(_not_v4_mapped)
tlvs = st.lists(
    st.builds(
        Tlv,
        type=st.integers(min_value=0, max_value=0xFF).filter(lambda t: t != TlvType.CRC32C),
        value=st.binary(max_size=64),
    ),
    max_size=4,
).map(tuple)


@st.composite
def tcp_headers(draw: st.DrawFn, version: int) -> ProxyHeader:
    """PROXY/STREAM headers over IPv4 or IPv6, with any ports (and TLVs for v2)."""
    family = draw(st.sampled_from([Family.INET, Family.INET6]))
    addresses: st.SearchStrategy[IPAddress] = (
        ipv4_addresses if family is Family.INET else ipv6_addresses
    )
    return ProxyHeader(
        version=version,
        command=Command.PROXY,
        family=family,
        transport=Transport.STREAM,
        source=(draw(addresses), draw(ports)),
        destination=(draw(addresses), draw(ports)),
        tlvs=draw(tlvs) if version == 2 else (),
    )


@given(tcp_headers(version=1))
def test_encode_v1_round_trips_through_maybe_parse(header: ProxyHeader) -> None:
    encoded = encode_v1(header)
    assert len(encoded) <= V1_MAX_LENGTH
    assert maybe_parse(encoded + b"EHLO") == (header, len(encoded))
    # Early rejection must never fire on a prefix of a valid line.
    assert all(maybe_parse(encoded[:cut]) is None for cut in range(len(encoded)))


@given(tcp_headers(version=2))
def test_encode_v2_round_trips_through_maybe_parse(header: ProxyHeader) -> None:
    encoded = encode_v2(header)
    assert maybe_parse(encoded + b"EHLO") == (header, len(encoded))
    assert all(maybe_parse(encoded[:cut]) is None for cut in range(len(encoded)))


@given(tcp_headers(version=2))
def test_encode_v2_with_crc32c_round_trips_and_appends_a_verified_crc(
    header: ProxyHeader,
) -> None:
    encoded = encode_v2(header, with_crc32c=True)
    result = maybe_parse(encoded)
    assert result is not None
    parsed, consumed = result
    assert consumed == len(encoded)
    assert parsed.tlvs[:-1] == header.tlvs
    assert parsed.tlvs[-1] == Tlv(TlvType.CRC32C, encoded[-4:])
    assert replace(parsed, tlvs=header.tlvs) == header


@given(tcp_headers(version=2), st.data(), st.integers(min_value=1, max_value=255))
def test_corrupted_address_or_checksum_fails_crc32c_verification(
    header: ProxyHeader, data: st.DataObject, flip: int
) -> None:
    encoded = bytearray(encode_v2(header, with_crc32c=True))
    address_block = 12 if header.family is Family.INET else 36
    targets = [*range(16, 16 + address_block), *range(len(encoded) - 4, len(encoded))]
    encoded[data.draw(st.sampled_from(targets))] ^= flip
    with pytest.raises(RemoteProtocolError, match=r"CRC32C mismatch|v4-mapped"):
        maybe_parse(bytes(encoded))


# --- random input -------------------------------------------------------------------


@st.composite
def v2_like_headers(draw: st.DrawFn) -> bytes:
    """A v2 prefix with plausible bytes 13-16, then a random block, declared length or not."""
    ver_cmd = draw(st.sampled_from([0x20, 0x21, 0x22, 0x11]))
    fam = draw(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x10, 0x41, 0x13]))
    block = draw(st.binary(max_size=300))
    declared = draw(st.sampled_from([len(block), len(block) // 2, len(block) + 1]))
    return _v2_prefix(ver_cmd, fam, declared) + block


@st.composite
def mutated_valid_headers(draw: st.DrawFn) -> bytes:
    """A valid v1 or v2 encoding with one byte replaced, inserted or deleted, then more bytes."""
    version = draw(st.sampled_from([1, 2]))
    header = draw(tcp_headers(version=version))
    encoded = bytearray(encode_v1(header) if version == 1 else encode_v2(header))
    position = draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    byte = draw(st.integers(min_value=0, max_value=255))
    match draw(st.sampled_from(["replace", "insert", "delete"])):
        case "replace":
            encoded[position] = byte
        case "insert":
            encoded.insert(position, byte)
        case _:
            del encoded[position]
    return bytes(encoded) + draw(st.binary(max_size=8))


_v1_alphabet = b"PROXY TCP46UNKW0123456789.:abcdef%+_\r\n\x00\xff"
random_input = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda tail: b"PROXY " + tail),
    st.lists(st.sampled_from(list(_v1_alphabet)), max_size=120).map(
        lambda chars: b"PROXY " + bytes(chars)
    ),
    v2_like_headers(),
    mutated_valid_headers(),
)


@given(random_input)
def test_random_bytes_yield_need_more_a_header_or_a_remote_protocol_error(data: bytes) -> None:
    error: RemoteProtocolError | None = None
    result = None
    try:
        result = maybe_parse(data)
    except RemoteProtocolError as exc:
        error = exc
    if error is not None:
        assert error.answer == b""
    elif result is not None:
        header, consumed = result
        assert 0 < consumed <= len(data)
        assert header.version in (1, 2)


@given(random_input)
def test_growing_prefixes_go_from_need_more_to_one_fixed_outcome(data: bytes) -> None:
    # None for a while, then either the same header for every longer prefix, or
    # a rejection for every longer prefix: never reject what more bytes would
    # make valid, never change an answer already given.
    outcomes: list[object] = []
    for cut in range(len(data) + 1):
        try:
            outcomes.append(maybe_parse(data[:cut]))
        except RemoteProtocolError:
            outcomes.append(RemoteProtocolError)
    settled = [outcome for outcome in outcomes if outcome is not None]
    assert outcomes[len(outcomes) - len(settled) :] == settled, "None after an outcome"
    assert all(outcome == settled[0] for outcome in settled)
