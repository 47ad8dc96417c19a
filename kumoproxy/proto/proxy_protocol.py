"""The HAProxy PROXY protocol, versions 1 and 2: a sans-IO codec.

Spec: "The PROXY protocol, Versions 1 & 2", doc/proxy-protocol.txt in the
haproxy repository (section numbers below refer to it). kumoproxy is the
*receiver*: an MTA (KumoMTA's ``ha_proxy_server``) opens a TCP connection,
sends one header naming the source address it wants and the destination it
wants reached, and then speaks SMTP through us. The encoders exist for the
client side (tests, mta_client) and for round-trip tests.

The format is stateless, so this module is plain functions: ``maybe_parse``
looks at the bytes received so far and says "need more", "here is the header
and its length", or raises :class:`RemoteProtocolError`. It never consumes
bytes after the header: they belong to the relayed stream.

Version 1 (section 2.1), one US-ASCII line of at most 107 bytes::

    "PROXY" SP ("TCP4" | "TCP6") SP src-addr SP dst-addr SP src-port SP dst-port CRLF
    "PROXY" SP "UNKNOWN" [SP <anything but CRLF>] CRLF

Version 2 (section 2.2), binary, 16-byte prefix then ``len`` bytes::

    offset 0   12  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    offset 12   1  version (high nibble, must be 2) | command (low: 0 LOCAL, 1 PROXY)
    offset 13   1  family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
                   | transport (low: 0 UNSPEC, 1 STREAM, 2 DGRAM)
    offset 14   2  len, big-endian: bytes that follow
    offset 16      address block: INET 4+4+2+2 = 12, INET6 16+16+2+2 = 36,
                   UNIX 108+108 = 216, UNSPEC 0
                   then TLVs (type:1, length:2 big-endian, value) filling the rest

Receiver rules (kumoproxy's wire.md section 2, from the spec):

- Never guess: a listener that requires the header rejects anything else at
  once ("PROXY " or the v2 signature, nothing else), without waiting for more.
- v1: CRLF within 107 bytes (a lone CR or LF is invalid), exactly one space
  between fields, ``TCP4``/``TCP6``/``UNKNOWN`` (case-sensitive), no leading
  zeros in IPv4 octets or ports, ports are ASCII digits in 0..65535 (Python's
  ``int()`` is never applied to unchecked wire text), the address format
  matches the protocol, no zone ids.
- v2: version 2, command LOCAL/PROXY, defined family and transport nibbles,
  a declared length above our cap is rejected as soon as the 16-byte prefix
  shows it, the address block fits, TLVs fill the block exactly, a CRC32C TLV
  is 4 bytes and verifies, a UNIQUE_ID TLV is at most 128 bytes, unknown TLV
  types are kept and otherwise ignored.
- v4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are refused in both versions:
  binding one would silently become an IPv4 bind.
- LOCAL (health check), UNKNOWN, UNSPEC, UNIX and DGRAM headers parse, but
  have no :attr:`ProxyHeader.tcp_endpoints`: an egress proxy has nowhere to
  connect for them, and the caller decides what to do (close, refuse).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Final, assert_never

from kumoproxy.errors import LocalProtocolError, RemoteProtocolError
from kumoproxy.proto.crc32c import crc32c

__all__ = [
    "V1_MAX_LENGTH",
    "V2_DEFAULT_MAX_LENGTH",
    "V2_SIGNATURE",
    "Command",
    "Family",
    "IPAddress",
    "ProxyHeader",
    "Tlv",
    "TlvType",
    "Transport",
    "encode_v1",
    "encode_v2",
    "maybe_parse",
]

V1_MAX_LENGTH: Final = 107
"""Section 2.1: the longest v1 line, CRLF included ("PROXY UNKNOWN" + two full IPv6 addresses)."""

# Our cap on a whole v2 header (16-byte prefix + block). The spec allows a
# 16-bit length (64 KiB), but the largest address block is 216 bytes (UNIX),
# KumoMTA sends 28 or 52 bytes and HAProxy with every TLV option stays well
# under 1 KiB. 4 KiB leaves room for SSL sub-TLVs while making sure a peer
# cannot make us buffer 64 KiB per connection before we can say no.
V2_DEFAULT_MAX_LENGTH: Final = 4096
"""Default cap on a whole v2 header in bytes (prefix included)."""

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
"""Section 2.2: the 12 bytes every v2 header starts with."""

_V1_PREFIX: Final = b"PROXY "
_V2_PREFIX_LENGTH: Final = 16  # signature + ver_cmd + fam + len (section 2.2)
_V2_VERSION: Final = 2
_V1_PROTOCOLS: Final = (b"TCP4", b"TCP6", b"UNKNOWN")
_MAX_UNIQUE_ID_LENGTH: Final = 128  # section 2.2.5
_CRC32C_LENGTH: Final = 4  # section 2.2.3: a 32-bit value
_MAX_V2_BLOCK_LENGTH: Final = 0xFFFF  # the 16-bit len field

_ASCII_DIGITS: Final = frozenset(b"0123456789")
_IPV6_TEXT_CHARS: Final = frozenset(b"0123456789abcdefABCDEF:")
# First words that identify a client talking to the wrong port (see _describe_foreign).
_HTTP_METHODS: Final = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
)


class Command(enum.IntEnum):
    """The v2 command, low nibble of byte 13 (section 2.2)."""

    LOCAL = 0
    """A connection the proxy made on its own behalf (health check): no addresses."""
    PROXY = 1
    """A relayed connection: the address block names the original endpoints."""


class Family(enum.IntEnum):
    """The v2 address family, high nibble of byte 14 (section 2.2)."""

    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class Transport(enum.IntEnum):
    """The v2 transport protocol, low nibble of byte 14 (section 2.2)."""

    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


class TlvType(enum.IntEnum):
    """The registered v2 TLV types (section 2.2). Others are legal and kept as plain ints."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
"""An IPv4 or IPv6 address, as the headers carry them."""


@dataclass(frozen=True, slots=True)
class Tlv:
    """One v2 Type-Length-Value vector (section 2.2); ``type`` is 0..255."""

    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed (or to-be-encoded) PROXY header, either version.

    ``source`` and ``destination`` are set only for an INET or INET6 family
    (any transport) with command PROXY; v1 ``UNKNOWN`` is family and transport
    UNSPEC. ``tlvs`` is always empty for v1.
    """

    version: int
    command: Command
    family: Family
    transport: Transport
    source: tuple[IPAddress, int] | None
    destination: tuple[IPAddress, int] | None
    tlvs: tuple[Tlv, ...] = ()

    @property
    def tcp_endpoints(self) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]] | None:
        """(source, destination) when this header is a PROXY command for TCP over IPv4/IPv6.

        None for LOCAL, UNSPEC/UNKNOWN, UNIX and DGRAM headers: there is no TCP
        destination for an egress proxy to connect to.
        """
        if (
            self.command != Command.PROXY
            or self.family not in (Family.INET, Family.INET6)
            or self.transport != Transport.STREAM
            or self.source is None
            or self.destination is None
        ):
            return None
        return self.source, self.destination


def maybe_parse(
    buf: bytes | bytearray, *, max_v2_length: int = V2_DEFAULT_MAX_LENGTH
) -> tuple[ProxyHeader, int] | None:
    """Parse a header at the start of buf.

    Returns (header, bytes consumed) when complete, None when more bytes are
    needed, raises RemoteProtocolError as soon as the bytes seen so far cannot
    begin a valid header.

    Bytes after the header are never looked at: the count is exactly the
    header's length. ``max_v2_length`` caps a whole v2 header (prefix
    included); a v1 header is capped by the spec at :data:`V1_MAX_LENGTH`.
    Feed the whole buffer received so far on every call; on EOF, a ``None``
    means the peer sent a partial header, which the spec says to reject.
    """
    if max_v2_length < _V2_PREFIX_LENGTH:
        raise ValueError(f"max_v2_length must be at least {_V2_PREFIX_LENGTH}, got {max_v2_length}")
    # Section 2.2, "Identifying the protocol version": the two signatures
    # differ in their first byte, so at most one of them can still match.
    head = bytes(buf[: len(V2_SIGNATURE)])
    if not head:
        return None
    if _V1_PREFIX.startswith(head[: len(_V1_PREFIX)]):
        return _maybe_parse_v1(bytes(buf[:V1_MAX_LENGTH]))
    if V2_SIGNATURE.startswith(head):
        return _maybe_parse_v2(buf, max_v2_length)
    raise RemoteProtocolError(_describe_foreign(head))


def encode_v1(header: ProxyHeader) -> bytes:
    """Encode ``header`` as a v1 line (section 2.1). ``header.version`` is not consulted.

    TCP over IPv4/IPv6 becomes ``TCP4``/``TCP6``; every other family/transport
    becomes ``PROXY UNKNOWN\\r\\n``, as the spec says for protocols v1 cannot
    express. Raises :class:`LocalProtocolError` for what v1 cannot carry at
    all (a LOCAL command, TLVs) and for inconsistent or unsendable endpoints.
    """
    if header.command != Command.PROXY:
        raise LocalProtocolError("PROXY v1 has no LOCAL command; use encode_v2")
    if header.tlvs:
        raise LocalProtocolError("PROXY v1 cannot carry TLVs; use encode_v2")
    match header.family:
        case Family.UNSPEC | Family.UNIX:
            return b"PROXY UNKNOWN\r\n"
        case Family.INET | Family.INET6:
            pass
        case unreachable:
            assert_never(unreachable)
    match header.transport:
        case Transport.UNSPEC | Transport.DGRAM:
            return b"PROXY UNKNOWN\r\n"
        case Transport.STREAM:
            pass
        case unknown_transport:
            assert_never(unknown_transport)
    source, destination = _endpoints_for_encoding(header)
    protocol = "TCP4" if header.family == Family.INET else "TCP6"
    # str() of ipaddress objects is the canonical form section 2.1 asks for:
    # dotted decimal without leading zeros, RFC 5952 compressed IPv6.
    line = f"PROXY {protocol} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    encoded = line.encode("ascii")
    assert len(encoded) <= V1_MAX_LENGTH
    return encoded


def encode_v2(header: ProxyHeader, *, with_crc32c: bool = False) -> bytes:
    """Encode ``header`` as a v2 header (section 2.2). ``header.version`` is not consulted.

    ``with_crc32c`` appends a CRC32C TLV (section 2.2.3) computed over the
    whole header; ``header.tlvs`` must not already hold one then. Other TLVs
    are written verbatim, in order. A LOCAL header must have family UNSPEC and
    no addresses (the spec says a LOCAL sender "should not present any
    address"). UNIX addresses are not modelled and are sent as 216 zero bytes.
    Raises :class:`LocalProtocolError` for a header that cannot be sent.
    """
    block = bytearray()
    match header.command:
        case Command.LOCAL:
            if (
                header.family != Family.UNSPEC
                or header.source is not None
                or header.destination is not None
            ):
                raise LocalProtocolError("a LOCAL header carries no addresses: use family UNSPEC")
        case Command.PROXY:
            match header.family:
                case Family.UNSPEC:
                    if header.source is not None or header.destination is not None:
                        raise LocalProtocolError("family UNSPEC carries no addresses")
                case Family.INET | Family.INET6:
                    source, destination = _endpoints_for_encoding(header)
                    block += source[0].packed + destination[0].packed
                    block += source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
                case Family.UNIX:
                    if header.source is not None or header.destination is not None:
                        raise LocalProtocolError("UNIX addresses are not modelled; leave them None")
                    block += bytes(_address_block_size(Family.UNIX))
                case unknown_family:
                    assert_never(unknown_family)
        case unknown_command:
            assert_never(unknown_command)

    crc_offset: int | None = None
    for tlv in header.tlvs:
        if not 0 <= tlv.type <= 0xFF:
            raise LocalProtocolError(f"TLV type {tlv.type} does not fit in a byte")
        if len(tlv.value) > _MAX_V2_BLOCK_LENGTH:
            raise LocalProtocolError(f"TLV {tlv.type:#04x} value is {len(tlv.value)} bytes")
        if with_crc32c and tlv.type == TlvType.CRC32C:
            raise LocalProtocolError("header.tlvs already holds a CRC32C TLV")
        block += _encode_tlv(tlv.type, tlv.value)
    if with_crc32c:
        crc_offset = _V2_PREFIX_LENGTH + len(block) + 3
        block += _encode_tlv(TlvType.CRC32C, bytes(_CRC32C_LENGTH))
    if len(block) > _MAX_V2_BLOCK_LENGTH:
        raise LocalProtocolError(f"v2 address block and TLVs are {len(block)} bytes, over 65535")

    encoded = bytearray(V2_SIGNATURE)
    encoded.append((_V2_VERSION << 4) | header.command)
    encoded.append((header.family << 4) | header.transport)
    encoded += len(block).to_bytes(2, "big")
    encoded += block
    if crc_offset is not None:
        # Section 2.2.3: checksum the whole header with the field zeroed, then fill it in.
        encoded[crc_offset : crc_offset + _CRC32C_LENGTH] = crc32c(encoded).to_bytes(4, "big")
    return bytes(encoded)


# --- version 1 ---------------------------------------------------------------


def _maybe_parse_v1(window: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a v1 line from ``window``, the first (at most) 107 bytes received."""
    cr = window.find(b"\r")
    lf = window.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        raise RemoteProtocolError("PROXY v1 line ends with a lone LF; the spec requires CRLF")
    if cr == -1:
        if len(window) >= V1_MAX_LENGTH:
            raise RemoteProtocolError(
                f"PROXY v1 line has no CRLF within {V1_MAX_LENGTH} bytes (section 2.1)"
            )
        _parse_v1_line(window, complete=False)
        return None
    if cr + 2 > V1_MAX_LENGTH:
        # The CR is the 107th byte: its LF would be the 108th.
        raise RemoteProtocolError(
            f"PROXY v1 line has no CRLF within {V1_MAX_LENGTH} bytes (section 2.1)"
        )
    if cr + 1 == len(window):
        _parse_v1_line(window[:cr], complete=False)
        return None
    if window[cr + 1] != ord("\n"):
        raise RemoteProtocolError("PROXY v1 line ends with a lone CR; the spec requires CRLF")
    header = _parse_v1_line(window[:cr], complete=True)
    assert header is not None
    return header, cr + 2


def _parse_v1_line(line: bytes, *, complete: bool) -> ProxyHeader | None:
    """Check a v1 line without its CRLF; return the header when ``complete``.

    When not ``complete`` the line is a prefix of what the peer will send, and
    this only raises if no continuation could make it valid: so a bad field is
    reported as soon as it arrives, not after 107 bytes.
    """
    if len(line) < len(_V1_PREFIX):
        # maybe_parse only gets here with a prefix of "PROXY " (no CR yet).
        assert not complete
        return None
    tokens = line[len(_V1_PREFIX) :].split(b" ")
    protocol, fields = tokens[0], tokens[1:]
    if not complete and not fields:
        if not any(known.startswith(protocol) for known in _V1_PROTOCOLS):
            raise RemoteProtocolError(_bad_v1_protocol(protocol))
        return None

    if protocol == b"UNKNOWN":
        # Section 2.1: "the receiver must ignore anything presented before the CRLF".
        if not complete:
            return None
        return ProxyHeader(
            version=1,
            command=Command.PROXY,
            family=Family.UNSPEC,
            transport=Transport.UNSPEC,
            source=None,
            destination=None,
        )
    if protocol == b"TCP4":
        family = Family.INET
    elif protocol == b"TCP6":
        family = Family.INET6
    else:
        raise RemoteProtocolError(_bad_v1_protocol(protocol))

    name = protocol.decode("ascii")
    if (complete and line.endswith(b" ")) or (len(fields) == 5 and fields[4] == b""):
        raise RemoteProtocolError(f"PROXY v1 {name} line has a trailing space")
    # Every token but one still arriving must be non-empty: "exactly one space".
    settled = fields if complete else fields[:-1]
    if b"" in settled:
        raise RemoteProtocolError("PROXY v1 fields must be separated by exactly one space")
    if len(fields) > 4 or (complete and len(fields) < 4):
        raise RemoteProtocolError(
            f"PROXY v1 {name} line has {len(fields)} fields after the protocol, needs 4"
        )

    if not complete:
        # Fields 0 and 1 are addresses, 2 and 3 ports; the last one may be partial.
        for index, token in enumerate(fields):
            partial = index == len(fields) - 1
            if index < 2 and partial:
                _check_v1_address_prefix(token, family)
            elif index < 2:
                _parse_v1_address(token, family)
            elif token:
                # A prefix of a valid port is itself a valid port.
                _parse_v1_decimal(token, 0xFFFF, "port")
        return None

    src_addr = _parse_v1_address(fields[0], family)
    dst_addr = _parse_v1_address(fields[1], family)
    src_port = _parse_v1_decimal(fields[2], 0xFFFF, "port")
    dst_port = _parse_v1_decimal(fields[3], 0xFFFF, "port")
    return ProxyHeader(
        version=1,
        command=Command.PROXY,
        family=family,
        transport=Transport.STREAM,
        source=(src_addr, src_port),
        destination=(dst_addr, dst_port),
    )


def _bad_v1_protocol(protocol: bytes) -> str:
    if not protocol:
        return "PROXY v1 protocol field is empty (fields need exactly one space)"
    if any(byte < 0x21 or byte > 0x7E for byte in protocol):
        return f"PROXY v1 protocol {protocol!r}: fields are separated by one space (0x20) only"
    if any(known.startswith(protocol.upper()) for known in _V1_PROTOCOLS):
        return f"PROXY v1 protocol {protocol!r} must be upper case (section 2.1)"
    return f"PROXY v1 protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN"


def _parse_v1_decimal(token: bytes, maximum: int, what: str) -> int:
    """A v1 decimal number: ASCII digits, no sign, no leading zero, at most ``maximum``.

    Deliberately not plain ``int(token)``, which accepts "+80", " 80", "5_6"
    and non-ASCII digits: the bytes are checked first, so ``int()`` only ever
    sees one to five ASCII digits.
    """
    if not token:
        raise RemoteProtocolError(f"PROXY v1 {what} is empty")
    if not _ASCII_DIGITS.issuperset(token):
        raise RemoteProtocolError(f"PROXY v1 {what} {token!r} is not ASCII decimal digits")
    if len(token) > 1 and token[0] == ord("0"):
        raise RemoteProtocolError(f"PROXY v1 {what} {token!r} has a leading zero (section 2.1)")
    if len(token) > len(str(maximum)) or int(token) > maximum:
        raise RemoteProtocolError(f"PROXY v1 {what} {token!r} is above {maximum}")
    return int(token)


def _check_v1_address_prefix(token: bytes, family: Family) -> None:
    """Raise unless ``token`` can still grow into a v1 address of ``family``."""
    match family:
        case Family.INET:
            _check_v1_ipv4_text(token)
            octets = token.split(b".")
            if len(octets) > 4:
                raise RemoteProtocolError(f"PROXY v1 IPv4 address {token!r} has more than 4 octets")
            # A prefix of a valid octet is itself a valid octet; "" is still to come.
            for octet in octets[:-1] + [octets[-1]] * bool(octets[-1]):
                _parse_v1_decimal(octet, 255, "IPv4 octet")
        case Family.INET6:
            _check_v1_ipv6_text(token)
        case Family.UNSPEC | Family.UNIX:
            raise AssertionError(f"v1 has no {family.name} addresses")
        case unreachable:
            assert_never(unreachable)


def _parse_v1_address(token: bytes, family: Family) -> IPAddress:
    """A complete v1 address of ``family`` in the canonical form of section 2.1."""
    match family:
        case Family.INET:
            _check_v1_ipv4_text(token)
            octets = token.split(b".")
            if len(octets) != 4:
                raise RemoteProtocolError(
                    f"PROXY v1 IPv4 address {token!r} does not have 4 dotted octets"
                )
            return ipaddress.IPv4Address(
                bytes(_parse_v1_decimal(octet, 255, "IPv4 octet") for octet in octets)
            )
        case Family.INET6:
            _check_v1_ipv6_text(token)
            try:
                address = ipaddress.IPv6Address(token.decode("ascii"))
            except ValueError as exc:
                raise RemoteProtocolError(f"PROXY v1 IPv6 address {token!r} is invalid") from exc
            _refuse_v4_mapped(address)
            return address
        case Family.UNSPEC | Family.UNIX:
            raise AssertionError(f"v1 has no {family.name} addresses")
        case unreachable:
            assert_never(unreachable)


def _check_v1_ipv4_text(token: bytes) -> None:
    if b":" in token:
        raise RemoteProtocolError("PROXY v1 TCP4 line carries an IPv6 address")


def _check_v1_ipv6_text(token: bytes) -> None:
    """Section 2.1: IPv6 text is hex groups and colons, nothing else."""
    if b"%" in token:
        raise RemoteProtocolError(f"PROXY v1 IPv6 address {token!r} has a zone id")
    if b"." in token:
        if b":" not in token:
            raise RemoteProtocolError("PROXY v1 TCP6 line carries an IPv4 address")
        # "::ffff:192.0.2.1": the spec's grammar has no dotted tail, and the
        # v4-mapped form is refused anyway (it would bind IPv4).
        raise RemoteProtocolError(
            f"PROXY v1 IPv6 address {token!r} has a dotted IPv4 tail (v4-mapped forms are refused)"
        )
    if not _IPV6_TEXT_CHARS.issuperset(token):
        raise RemoteProtocolError(
            f"PROXY v1 IPv6 address {token!r} has characters other than hex digits and ':'"
        )


# --- version 2 ---------------------------------------------------------------


def _maybe_parse_v2(buf: bytes | bytearray, max_length: int) -> tuple[ProxyHeader, int] | None:
    """Parse a v2 header; ``buf`` starts with (a prefix of) the signature."""
    # Check each prefix byte as soon as it is there (section 2.2).
    if len(buf) <= len(V2_SIGNATURE):
        return None
    version, raw_command = buf[12] >> 4, buf[12] & 0x0F
    if version != _V2_VERSION:
        raise RemoteProtocolError(f"PROXY v2 version nibble is {version}, must be 2")
    try:
        command = Command(raw_command)
    except ValueError:
        raise RemoteProtocolError(
            f"PROXY v2 command {raw_command} is neither LOCAL (0) nor PROXY (1)"
        ) from None
    if len(buf) < 14:
        return None
    raw_family, raw_transport = buf[13] >> 4, buf[13] & 0x0F
    try:
        family = Family(raw_family)
    except ValueError:
        raise RemoteProtocolError(f"PROXY v2 address family {raw_family} is undefined") from None
    try:
        transport = Transport(raw_transport)
    except ValueError:
        raise RemoteProtocolError(f"PROXY v2 transport {raw_transport} is undefined") from None
    if len(buf) < _V2_PREFIX_LENGTH:
        return None

    block_length = int.from_bytes(buf[14:16], "big")
    total = _V2_PREFIX_LENGTH + block_length
    if total > max_length:
        raise RemoteProtocolError(
            f"PROXY v2 header declares {total} bytes, above our cap of {max_length}"
        )
    address_size = _address_block_size(family)
    if command is Command.PROXY and block_length < address_size:
        raise RemoteProtocolError(
            f"PROXY v2 length {block_length} is too short for the {address_size}-byte "
            f"address block of family {family.name}"
        )
    if len(buf) < total:
        return None

    header_bytes = bytes(buf[:total])
    block = memoryview(header_bytes)[_V2_PREFIX_LENGTH:]
    source: tuple[IPAddress, int] | None = None
    destination: tuple[IPAddress, int] | None = None
    match command:
        case Command.LOCAL:
            # Section 2.2: the receiver "must discard the protocol block including
            # the family"; we only skip what the family says the addresses take
            # (all of the block when that is more) so TLVs and CRC still get checked.
            address_size = min(address_size, block_length)
        case Command.PROXY:
            source, destination = _parse_v2_addresses(block[:address_size], family)
        case unreachable:
            assert_never(unreachable)
    tlvs = _parse_tlvs(header_bytes, _V2_PREFIX_LENGTH + address_size)
    return (
        ProxyHeader(
            version=2,
            command=command,
            family=family,
            transport=transport,
            source=source,
            destination=destination,
            tlvs=tlvs,
        ),
        total,
    )


def _address_block_size(family: Family) -> int:
    """Size of the v2 address block for ``family`` (section 2.2, union proxy_addr)."""
    match family:
        case Family.UNSPEC:
            return 0
        case Family.INET:
            return 4 + 4 + 2 + 2
        case Family.INET6:
            return 16 + 16 + 2 + 2
        case Family.UNIX:
            return 108 + 108
        case unreachable:
            assert_never(unreachable)


def _parse_v2_addresses(
    block: memoryview, family: Family
) -> tuple[tuple[IPAddress, int] | None, tuple[IPAddress, int] | None]:
    """Source and destination from a v2 address block of exactly the family's size."""
    address: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    match family:
        case Family.UNSPEC | Family.UNIX:
            # UNSPEC has none; UNIX paths are no use to an egress proxy.
            return None, None
        case Family.INET:
            width, address = 4, ipaddress.IPv4Address
        case Family.INET6:
            width, address = 16, ipaddress.IPv6Address
        case unreachable:
            assert_never(unreachable)
    src_addr = address(bytes(block[:width]))
    dst_addr = address(bytes(block[width : 2 * width]))
    for each in (src_addr, dst_addr):
        if isinstance(each, ipaddress.IPv6Address):
            _refuse_v4_mapped(each)
    src_port = int.from_bytes(block[2 * width : 2 * width + 2], "big")
    dst_port = int.from_bytes(block[2 * width + 2 : 2 * width + 4], "big")
    return (src_addr, src_port), (dst_addr, dst_port)


def _parse_tlvs(header: bytes, offset: int) -> tuple[Tlv, ...]:
    """Parse the TLVs from ``offset`` to the end of ``header`` (the whole v2 header)."""
    tlvs: list[Tlv] = []
    crc_seen = False
    while offset < len(header):
        if len(header) - offset < 3:
            raise RemoteProtocolError(
                f"PROXY v2 has {len(header) - offset} stray byte(s) after its last TLV"
            )
        tlv_type = header[offset]
        length = int.from_bytes(header[offset + 1 : offset + 3], "big")
        start, end = offset + 3, offset + 3 + length
        if end > len(header):
            raise RemoteProtocolError(
                f"PROXY v2 TLV {tlv_type:#04x} claims {length} bytes, "
                f"only {len(header) - start} remain"
            )
        value = header[start:end]
        if tlv_type == TlvType.CRC32C:
            if length != _CRC32C_LENGTH:
                raise RemoteProtocolError(f"PROXY v2 CRC32C TLV is {length} bytes, must be 4")
            if crc_seen:
                raise RemoteProtocolError("PROXY v2 header has more than one CRC32C TLV")
            crc_seen = True
            _verify_crc32c(header, start, value)
        elif tlv_type == TlvType.UNIQUE_ID and length > _MAX_UNIQUE_ID_LENGTH:
            raise RemoteProtocolError(
                f"PROXY v2 UNIQUE_ID TLV is {length} bytes, at most 128 allowed (section 2.2.5)"
            )
        tlvs.append(Tlv(type=tlv_type, value=value))
        offset = end
    return tuple(tlvs)


def _verify_crc32c(header: bytes, value_offset: int, value: bytes) -> None:
    """Section 2.2.3: CRC32C over the whole header with the checksum field zeroed."""
    zeroed = bytearray(header)
    zeroed[value_offset : value_offset + _CRC32C_LENGTH] = bytes(_CRC32C_LENGTH)
    expected = int.from_bytes(value, "big")
    actual = crc32c(zeroed)
    if actual != expected:
        raise RemoteProtocolError(
            f"PROXY v2 CRC32C mismatch: header says {expected:08x}, computed {actual:08x}"
        )


def _encode_tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes((tlv_type,)) + len(value).to_bytes(2, "big") + value


# --- shared ------------------------------------------------------------------


def _refuse_v4_mapped(address: ipaddress.IPv6Address) -> None:
    if address.ipv4_mapped is not None:
        raise RemoteProtocolError(
            f"v4-mapped IPv6 address {address} refused: binding it would silently use IPv4"
        )


def _endpoints_for_encoding(
    header: ProxyHeader,
) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]]:
    """The endpoints of an INET/INET6 header, checked against its family (for the encoders)."""
    if header.source is None or header.destination is None:
        raise LocalProtocolError(f"a PROXY {header.family.name} header needs both endpoints")
    expected = ipaddress.IPv4Address if header.family == Family.INET else ipaddress.IPv6Address
    for address, port in (header.source, header.destination):
        if not isinstance(address, expected):
            raise LocalProtocolError(
                f"address {address} does not match family {header.family.name}"
            )
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                raise LocalProtocolError(f"v4-mapped IPv6 address {address} would be refused")
            if address.scope_id is not None:
                raise LocalProtocolError(
                    f"IPv6 address {address} has a zone id; headers carry none"
                )
        if not 0 <= port <= 0xFFFF:
            raise LocalProtocolError(f"port {port} is outside 0..65535")
    return header.source, header.destination


def _describe_foreign(head: bytes) -> str:
    """Explain bytes that start neither a v1 nor a v2 header, naming the likely culprit."""
    shown = repr(head)
    first = head[0]
    if first == V2_SIGNATURE[0]:
        index = next(i for i, byte in enumerate(head) if byte != V2_SIGNATURE[i])
        culprit = f"a PROXY v2 signature that is wrong at byte {index}"
    elif first == 0x05:
        culprit = "a SOCKS5 client (version byte 5) on the PROXY-protocol listener"
    elif first == 0x04:
        culprit = "a SOCKS4 client on the PROXY-protocol listener"
    elif first == 0x16:
        culprit = "a TLS ClientHello (the client speaks TLS before the PROXY header)"
    elif head.startswith(b"PROXY"):
        culprit = "a PROXY v1 line without the single space after 'PROXY'"
    elif head[:5].upper() == b"PROXY":
        culprit = "a PROXY v1 line in the wrong case (the signature is case-sensitive)"
    elif head.split(b" ", 1)[0] in _HTTP_METHODS and b" " in head:
        culprit = "an HTTP request"
    elif head[:4].upper() in (b"EHLO", b"HELO"):
        culprit = "an SMTP client sending without a PROXY header"
    else:
        return f"not a PROXY protocol header: starts with {shown}"
    return f"not a PROXY protocol header: starts with {shown}, which looks like {culprit}"
