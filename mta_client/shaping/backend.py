"""What a shaping backend decides, and the interface both backends implement.

A backend keeps the counters (leases, GCRA TATs, suspensions) and decides
with its own clock: :class:`~mta_client.shaping.memory.MemoryBackend` with
trio's, :class:`~mta_client.shaping.redis_backend.RedisBackend` with Redis's
``TIME`` (so node clocks never matter). That is why the interface speaks in
durations (``retry_after``, ``remaining``), never in points in time.

Pure: records and a protocol, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from mta_client.shaping.rules import PathLimits

__all__ = [
    "LEASE_RETRY_HINT",
    "Lease",
    "RefusalReason",
    "Refused",
    "ShapingBackend",
    "Suspension",
]

#: The longest ``retry_after`` given for a full connection limit. A slot
#: usually frees up by a release, which nobody announces; the holder's lease
#: expiry is only the worst case. Callers poll at most this far apart.
LEASE_RETRY_HINT: Final = 1.0


class RefusalReason(enum.Enum):
    """Why a connection may not open now; values are stable metric labels."""

    SUSPENDED = "suspended"
    CONNECTION_LIMIT = "connection_limit"
    CONNECTION_RATE = "connection_rate"


@dataclass(frozen=True, slots=True)
class Refused:
    """A connection may not open now; ask again after ``retry_after`` seconds.

    Falsy, so ``if lease := await shaper.acquire_connection(...)`` reads as
    it would with ``None``.
    """

    reason: RefusalReason
    retry_after: float

    def __bool__(self) -> Literal[False]:
        return False


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to hold one connection open on ``limits``' path.

    Extend it before every message; release it when the connection closes.
    """

    lease_id: str
    limits: PathLimits

    def __bool__(self) -> Literal[True]:
        # Lets type checkers narrow ``Lease | Refused`` on truthiness.
        return True

    @property
    def source(self) -> str:
        return self.limits.source

    @property
    def site(self) -> str:
        return self.limits.site


@dataclass(frozen=True, slots=True)
class Suspension:
    """A suspended path: ``remaining`` seconds to go, and why."""

    remaining: float
    reason: str


class ShapingBackend(Protocol):
    """Counters for leases, rates and suspensions, with the backend's own clock.

    Every call is atomic: a refusal changes nothing, and a connection's
    leases and rate tokens over all its scopes are taken all or nothing.
    """

    async def acquire(self, lease_id: str, limits: PathLimits) -> Refused | None:
        """Open a connection: the path is not suspended, a lease on every scope
        with a connection limit, a token from every connection rate. ``None``
        when granted."""
        ...

    async def extend(self, lease_id: str, limits: PathLimits) -> bool:
        """Push the lease's expiry ``limits.lease_ttl`` ahead on every scope.

        A lease that expired (or was wiped) is taken again if every scope has
        room, counting like a new one, so the limit always holds; False when
        some scope is full: the connection must close.
        """
        ...

    async def release(self, lease_id: str, limits: PathLimits) -> None:
        """Free the lease on every scope."""
        ...

    async def take(self, limits: PathLimits, n: int) -> float:
        """Take ``n`` message tokens from every message rate: 0.0 when taken,
        else the seconds to wait (nothing taken). A suspended path waits out
        its suspension."""
        ...

    async def suspend(self, key: str, duration: float, reason: str) -> None:
        """Suspend the path ``key`` for ``duration`` seconds (never shortening one)."""
        ...

    async def suspension(self, key: str) -> Suspension | None:
        """The path's suspension, if any."""
        ...
