"""Password hashes for RFC 1929 users: scrypt, parameters in the hash string.

Format: ``$scrypt$ln=<log2 n>,r=<r>,p=<p>$<salt b64>$<key b64>`` (unpadded
standard base64), close to the PHC string format, so the cost can be raised
later without invalidating old hashes: each hash carries its own cost.

scrypt at these parameters costs ~100 ms of CPU and 128 MiB of memory per
check, on purpose (credential stuffing). MTAs open many connections with the
same credentials, so :class:`PasswordVerifier` remembers *successful* checks
under a per-process random key (a keyed BLAKE2b of user, password and hash):
the plaintext is never stored, and a wrong password always pays full price.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re

import trio
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

#: OWASP's scrypt recommendation: N=2^17, r=8, p=1 (128 MiB).
DEFAULT_LOG2_N = 17
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
#: Password checks running at once (each holds scrypt's 128 MiB).
VERIFY_CONCURRENCY = 4
KEY_BYTES = 32
#: Refuse hashes whose cost would take the host down (a hostile or mistyped
#: config): scrypt needs 128 * r * n bytes per check.
MAX_LOG2_N = 20  # with r=8: 1 GiB, the memory cap below
MAX_MEMORY = 1 << 30

_FORMAT = re.compile(
    r"^\$scrypt\$ln=(?P<ln>\d{1,2}),r=(?P<r>\d{1,2}),p=(?P<p>\d{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<key>[A-Za-z0-9+/]+)$"
)


class PasswordHashError(ValueError):
    """A ``password_hash`` string is not one we produce."""


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:  # e.g. a length of 4k+1 characters
        raise PasswordHashError("salt or key is not valid base64") from exc


def _kdf(salt: bytes, log2_n: int, r: int, p: int, length: int) -> Scrypt:
    return Scrypt(salt=salt, length=length, n=2**log2_n, r=r, p=p)


def hash_password(password: bytes, *, log2_n: int = DEFAULT_LOG2_N) -> str:
    """A new hash string for ``password`` with a random salt."""
    salt = os.urandom(SALT_BYTES)
    key = _kdf(salt, log2_n, DEFAULT_R, DEFAULT_P, KEY_BYTES).derive(password)
    return f"$scrypt$ln={log2_n},r={DEFAULT_R},p={DEFAULT_P}${_b64encode(salt)}${_b64encode(key)}"


def check_hash_format(encoded: str) -> None:
    """Raise :class:`PasswordHashError` unless ``encoded`` is a usable hash."""
    _parse(encoded)


def _parse(encoded: str) -> tuple[bytes, bytes, int, int, int]:
    match = _FORMAT.match(encoded)
    if match is None:
        raise PasswordHashError("not a hash from `kumoproxy hash-password` ($scrypt$...)")
    log2_n, r, p = int(match["ln"]), int(match["r"]), int(match["p"])
    if not 1 <= log2_n <= MAX_LOG2_N or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise PasswordHashError("scrypt parameters out of the supported range")
    if 128 * r * 2**log2_n > MAX_MEMORY:
        raise PasswordHashError("scrypt parameters need more than 1 GiB per check")
    salt, key = _b64decode(match["salt"]), _b64decode(match["key"])
    if len(key) < 16 or len(salt) < 8:
        raise PasswordHashError("salt or key too short")
    return salt, key, log2_n, r, p


def verify_password(password: bytes, encoded: str) -> bool:
    """Constant-time check (the KDF's own ``verify``) of ``password`` against ``encoded``."""
    try:
        salt, key, log2_n, r, p = _parse(encoded)
    except PasswordHashError:
        return False
    try:
        _kdf(salt, log2_n, r, p, len(key)).verify(password, key)
    except InvalidKey:
        return False
    return True


class PasswordVerifier:
    """Verifies off the event loop and remembers successes for this process."""

    def __init__(self, *, cache_size: int = 4096, concurrency: int = VERIFY_CONCURRENCY) -> None:
        self._key = os.urandom(32)
        # Each check holds 128 MiB: trio's default of 40 threads would let a
        # login burst take ~5 GiB. Extra checks queue instead.
        self._limiter = trio.CapacityLimiter(concurrency)
        self._good: dict[bytes, None] = {}
        self._cache_size = cache_size

    def _token(self, user: str, password: bytes, encoded: str) -> bytes:
        h = hashlib.blake2b(key=self._key, digest_size=32)
        for part in (user.encode(), password, encoded.encode()):
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        return h.digest()

    async def verify(self, user: str, password: bytes, encoded: str) -> bool:
        token = self._token(user, password, encoded)
        # A dict lookup is fine here: tokens are keyed by a secret random key,
        # so lookup timing tells an attacker nothing about any password.
        if token in self._good:
            return True
        # scrypt is deliberately slow; a worker thread keeps every relay moving.
        ok = await trio.to_thread.run_sync(
            verify_password, password, encoded, limiter=self._limiter
        )
        if ok:
            if len(self._good) >= self._cache_size:
                self._good.pop(next(iter(self._good)))
            self._good[token] = None
        return ok
