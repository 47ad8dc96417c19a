"""CRC-32C (Castagnoli), as the PROXY protocol v2 ``PP2_TYPE_CRC32C`` TLV needs it.

The PROXY protocol spec (doc/proxy-protocol.txt, section 2.2.3) defines the
checksum as "CRC32c ... as described in RFC 4960, Appendix B": the Castagnoli
polynomial 0x1EDC6F41, used bit-reflected (0x82F63B78), initial value and final
XOR 0xFFFFFFFF.

Why this is hand-written rather than a C extension: a PROXY v2 header is at
most a few KiB (kumoproxy caps it at 4 KiB), it is checked once per
connection, and the CRC32C TLV is optional -- KumoMTA never sends it -- so a
table-driven loop in pure Python costs microseconds and a compiled dependency
is not worth carrying. ``zlib.crc32`` is no substitute: it is CRC-32/ISO-HDLC,
a different polynomial (0xEDB88320 reflected), and gives different answers.
"""

from __future__ import annotations

from typing import Final

__all__ = ["crc32c"]

# Bit-reflected Castagnoli polynomial (RFC 3720 section 12.1, RFC 4960 Appendix B).
_POLYNOMIAL: Final = 0x82F63B78
_MASK: Final = 0xFFFFFFFF


def _make_table() -> tuple[int, ...]:
    """The 256-entry lookup table for one byte of reflected CRC-32C."""
    table = []
    for index in range(256):
        value = index
        for _ in range(8):
            value = (value >> 1) ^ _POLYNOMIAL if value & 1 else value >> 1
        table.append(value)
    return tuple(table)


_TABLE: Final = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Return the CRC-32C of ``data``, continuing from ``crc``.

    ``crc`` is a previous result, so ``crc32c(b, crc32c(a)) == crc32c(a + b)``;
    the default 0 starts a new checksum. The result is an unsigned 32-bit int
    (``crc32c(b"123456789") == 0xE3069283``, the standard check value).
    """
    if not 0 <= crc <= _MASK:
        raise ValueError(f"crc must be an unsigned 32-bit value, got {crc!r}")
    table = _TABLE
    value = crc ^ _MASK  # undo the final XOR of the previous call (or preset to all ones)
    for byte in memoryview(data).cast("B"):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ _MASK
