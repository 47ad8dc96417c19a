"""CRC-32C (Castagnoli) against published check values, and its incremental form."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoproxy.proto.crc32c import crc32c


def test_standard_check_value_for_123456789() -> None:
    # The "check" value of the CRC-32C catalogue entry (CRC-32/ISCSI).
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(bytes(32), 0x8A9136AA, id="32-zero-bytes"),
        pytest.param(b"\xff" * 32, 0x62A8AB43, id="32-ff-bytes"),
        pytest.param(bytes(range(32)), 0x46DD794E, id="32-ascending-bytes"),
    ],
)
def test_rfc3720_appendix_b4_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


def test_empty_input_is_zero() -> None:
    assert crc32c(b"") == 0


def test_is_not_zlib_crc32() -> None:
    # The bug this module exists to prevent: zlib.crc32 is another polynomial.
    assert crc32c(b"123456789") != zlib.crc32(b"123456789")


def test_accepts_bytearray_and_memoryview() -> None:
    assert crc32c(bytearray(b"123456789")) == crc32c(memoryview(b"123456789")) == 0xE3069283


@pytest.mark.parametrize("crc", [-1, 0x1_0000_0000])
def test_rejects_a_starting_crc_outside_32_bits(crc: int) -> None:
    with pytest.raises(ValueError, match="32-bit"):
        crc32c(b"x", crc)


@given(st.binary(max_size=256), st.binary(max_size=256))
def test_incremental_equals_one_shot(first: bytes, second: bytes) -> None:
    assert crc32c(second, crc32c(first)) == crc32c(first + second)


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=63))
def test_any_single_bit_flip_changes_the_checksum(data: bytes, bit: int) -> None:
    flipped = bytearray(data)
    index = (bit // 8) % len(data)
    flipped[index] ^= 1 << (bit % 8)
    assert crc32c(flipped) != crc32c(data)
