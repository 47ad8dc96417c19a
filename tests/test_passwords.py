"""Tests for kumoproxy.passwords: scrypt hash strings and the caching verifier.

Hashes use ``log2_n=10`` (1 MiB, milliseconds) except the one test of the
default parameters.
"""

from __future__ import annotations

import base64
import re

import pytest
import trio

from kumoproxy.passwords import (
    DEFAULT_LOG2_N,
    DEFAULT_P,
    DEFAULT_R,
    KEY_BYTES,
    MAX_LOG2_N,
    SALT_BYTES,
    PasswordHashError,
    PasswordVerifier,
    check_hash_format,
    hash_password,
    verify_password,
)

FAST = 10
FORMAT = re.compile(r"^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


SALT = b64(b"s" * SALT_BYTES)
KEY = b64(b"k" * KEY_BYTES)


@pytest.fixture(scope="module")
def encoded() -> str:
    return hash_password(b"correct horse", log2_n=FAST)


# ---------------------------------------------------------------------------
# hash_password / verify_password
# ---------------------------------------------------------------------------


def test_hash_verifies_the_same_password_only(encoded: str) -> None:
    assert verify_password(b"correct horse", encoded) is True
    assert verify_password(b"correct horsf", encoded) is False
    assert verify_password(b"", encoded) is False
    assert verify_password(b"correct horse ", encoded) is False


def test_hash_string_carries_its_parameters_salt_and_key(encoded: str) -> None:
    assert encoded.startswith(f"$scrypt$ln={FAST},r={DEFAULT_R},p={DEFAULT_P}$")
    match = FORMAT.match(encoded)
    assert match is not None  # also proves the base64 is unpadded: FORMAT has no "="
    assert len(unb64(match[4])) == SALT_BYTES
    assert len(unb64(match[5])) == KEY_BYTES
    check_hash_format(encoded)


def test_each_hash_has_its_own_salt() -> None:
    first, second = (hash_password(b"same", log2_n=FAST) for _ in range(2))
    assert first != second
    assert verify_password(b"same", first)
    assert verify_password(b"same", second)


def test_default_parameters_are_owasps_scrypt_recommendation() -> None:
    encoded = hash_password(b"pw")
    assert (DEFAULT_LOG2_N, DEFAULT_R, DEFAULT_P) == (17, 8, 1)
    assert encoded.startswith("$scrypt$ln=17,r=8,p=1$")
    assert verify_password(b"pw", encoded)


# ---------------------------------------------------------------------------
# Malformed hashes
# ---------------------------------------------------------------------------

MALFORMED = [
    "",
    "plaintext",
    "x",
    "$2b$12$abcdefghijklmnopqrstuv",  # bcrypt
    "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5",
    f"$scrypt$ln=10,r=8,p=1${SALT}",  # no key
    f"$scrypt$ln=10,r=8${SALT}${KEY}",  # no p
    f"$scrypt$r=8,p=1,ln=10${SALT}${KEY}",  # parameters out of order
    f"$scrypt$ln=0,r=8,p=1${SALT}${KEY}",
    f"$scrypt$ln=10,r=0,p=1${SALT}${KEY}",
    f"$scrypt$ln=10,r=33,p=1${SALT}${KEY}",
    f"$scrypt$ln=10,r=8,p=0${SALT}${KEY}",
    f"$scrypt$ln=10,r=8,p=17${SALT}${KEY}",
    f"$scrypt$ln=100,r=8,p=1${SALT}${KEY}",
    f"$scrypt$ln=10,r=8,p=1${b64(b's' * 7)}${KEY}",  # salt too short
    f"$scrypt$ln=10,r=8,p=1${SALT}${b64(b'k' * 15)}",  # key too short
    f"$scrypt$ln=10,r=8,p=1${SALT}${KEY}==",  # padded
    f"$scrypt$ln=10,r=8,p=1${SALT}$a2V5-a2V5_a2V5a2V5a2V5",  # urlsafe alphabet
    f" $scrypt$ln=10,r=8,p=1${SALT}${KEY}",
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_hash_is_rejected_and_never_verifies(bad: str) -> None:
    with pytest.raises(PasswordHashError):
        check_hash_format(bad)
    assert verify_password(b"", bad) is False
    assert verify_password(b"anything", bad) is False


def test_cost_above_max_log2_n_is_refused_without_running_scrypt() -> None:
    too_costly = f"$scrypt$ln={MAX_LOG2_N + 1},r=8,p=1${SALT}${KEY}"
    with pytest.raises(PasswordHashError, match="out of the supported range"):
        check_hash_format(too_costly)
    # Would need 2**23 * 1 KiB = 8 GiB if it ran: returning at all proves it did not.
    assert verify_password(b"pw", too_costly) is False


def test_cost_at_max_log2_n_is_an_accepted_format() -> None:
    check_hash_format(f"$scrypt$ln={MAX_LOG2_N},r=8,p=1${SALT}${KEY}")  # format only: not run


def test_hash_with_tampered_key_does_not_verify(encoded: str) -> None:
    head, key = encoded.rsplit("$", 1)
    tampered = f"{head}${b64(bytes(b ^ 1 for b in unb64(key)))}"
    check_hash_format(tampered)
    assert verify_password(b"correct horse", tampered) is False


@pytest.mark.parametrize(
    "bad",
    [
        f"$scrypt$ln=10,r=8,p=1${'A' * 13}${KEY}",  # salt of 13 characters
        f"$scrypt$ln=10,r=8,p=1${SALT}${'A' * 25}",  # key of 25 characters
    ],
)
def test_base64_of_impossible_length_is_a_malformed_hash(bad: str) -> None:
    assert verify_password(b"pw", bad) is False
    with pytest.raises(PasswordHashError):
        check_hash_format(bad)


# ---------------------------------------------------------------------------
# PasswordVerifier
# ---------------------------------------------------------------------------


async def verify_without_checkpoint(
    verifier: PasswordVerifier, user: str, password: bytes, encoded: str
) -> bool | None:
    """Verify inside an already-cancelled scope.

    A cache hit answers without reaching a checkpoint and returns its result;
    anything that would run scrypt in a worker thread is cancelled (``None``).
    """
    with trio.CancelScope() as scope:
        scope.cancel()
        return await verifier.verify(user, password, encoded)
    assert scope.cancelled_caught
    return None


async def test_verifier_accepts_the_right_password_and_refuses_others(encoded: str) -> None:
    verifier = PasswordVerifier()
    assert await verifier.verify("mta1", b"correct horse", encoded) is True
    assert await verifier.verify("mta1", b"wrong", encoded) is False
    assert await verifier.verify("mta1", b"wrong", "not a hash") is False


async def test_second_successful_verify_is_answered_from_the_cache(encoded: str) -> None:
    verifier = PasswordVerifier()
    # Before any success, verifying needs the worker thread: it is cancelled.
    assert await verify_without_checkpoint(verifier, "mta1", b"correct horse", encoded) is None
    assert await verifier.verify("mta1", b"correct horse", encoded) is True
    assert len(verifier._good) == 1
    # Now the same check is answered at once, with no scrypt run.
    assert await verify_without_checkpoint(verifier, "mta1", b"correct horse", encoded) is True
    assert len(verifier._good) == 1


async def test_failed_verify_is_not_cached(encoded: str) -> None:
    verifier = PasswordVerifier()
    assert await verifier.verify("mta1", b"wrong", encoded) is False
    assert verifier._good == {}
    # A wrong password pays full price every time.
    assert await verify_without_checkpoint(verifier, "mta1", b"wrong", encoded) is None


async def test_cache_hit_needs_the_same_user_password_and_hash(encoded: str) -> None:
    verifier = PasswordVerifier()
    assert await verifier.verify("mta1", b"correct horse", encoded)
    other_hash = hash_password(b"correct horse", log2_n=FAST)  # e.g. after a reload
    for user, password, hashed in (
        ("mta2", b"correct horse", encoded),
        ("mta1", b"correct horse", other_hash),
        ("mta1", b"correct horsf", encoded),
    ):
        assert await verify_without_checkpoint(verifier, user, password, hashed) is None


async def test_cache_never_stores_the_plaintext(encoded: str) -> None:
    verifier = PasswordVerifier()
    assert await verifier.verify("mta1", b"correct horse", encoded)
    [token] = verifier._good
    assert b"correct horse" not in token
    assert len(token) == 32


async def test_cache_evicts_the_oldest_success_beyond_its_size(encoded: str) -> None:
    verifier = PasswordVerifier(cache_size=1)
    assert await verifier.verify("mta1", b"correct horse", encoded)
    assert await verifier.verify("mta2", b"correct horse", encoded)
    assert len(verifier._good) == 1
    assert await verify_without_checkpoint(verifier, "mta2", b"correct horse", encoded) is True
    assert await verify_without_checkpoint(verifier, "mta1", b"correct horse", encoded) is None
