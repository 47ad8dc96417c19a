"""The in-memory shaping backend: one node, trio's clock.

Used alone when there is no Redis, and by :class:`~mta_client.shaping.shaper.Shaper`
as the fallback when Redis cannot be reached (with every limit divided among
the live nodes). Decisions are the pure functions of
:mod:`~mta_client.shaping.gcra` and :mod:`~mta_client.shaping.leases`;
:mod:`~mta_client.shaping.redis_backend` runs the same arithmetic in Lua, and
the tests hold the two to the same decisions.

Each call decides without awaiting in between (after one checkpoint), so
under trio it is atomic: a connection's leases and tokens on all its scopes
are taken all or nothing. Time is ``clock()``, ``trio.current_time`` by
default, so ``trio.testing.MockClock`` drives it.

Memory stays bounded by the keys in use: at most every :data:`SWEEP_INTERVAL`
seconds, empty lease sets, TATs in the past and ended suspensions are
dropped (a TAT in the past means the same as no TAT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from mta_client.shaping import leases
from mta_client.shaping.backend import LEASE_RETRY_HINT, RefusalReason, Refused, Suspension
from mta_client.shaping.gcra import gcra
from mta_client.shaping.rules import PathLimits

__all__ = ["SWEEP_INTERVAL", "MemoryBackend"]

#: How often (clock seconds) stale entries are swept out.
SWEEP_INTERVAL: Final = 60.0


class MemoryBackend:
    """Leases, GCRA state and suspensions in dictionaries (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._leases: dict[str, dict[str, float]] = {}
        self._connection_tats: dict[str, float] = {}
        self._message_tats: dict[str, float] = {}
        self._suspended: dict[str, tuple[float, str]] = {}
        self._next_sweep: float | None = None

    async def acquire(self, lease_id: str, limits: PathLimits) -> Refused | None:
        """See :meth:`ShapingBackend.acquire`."""
        await trio.lowlevel.checkpoint()
        now = self._now()
        suspension = self._suspension(limits.path_key, now)
        if suspension is not None:
            return Refused(RefusalReason.SUSPENDED, suspension.remaining)
        for scope in limits.scopes:
            if scope.connection_limit is None:
                continue
            members = self._leases.get(scope.key, {})
            if not leases.has_room(members, now, scope.connection_limit, lease_id):
                first = leases.next_expiry(members)
                assert first is not None  # full, so not empty
                return Refused(RefusalReason.CONNECTION_LIMIT, min(LEASE_RETRY_HINT, first - now))
        worst = 0.0
        tats: dict[str, float] = {}
        for scope in limits.scopes:
            if scope.connection_rate is None:
                continue
            decision = gcra(
                self._connection_tats.get(scope.key),
                now,
                scope.connection_rate,
                scope.connection_burst,
            )
            if decision.allowed:
                tats[scope.key] = decision.new_tat
            else:
                worst = max(worst, decision.retry_after)
        if worst > 0:
            return Refused(RefusalReason.CONNECTION_RATE, worst)
        self._connection_tats.update(tats)
        for scope in limits.scopes:
            if scope.connection_limit is not None:
                members = self._leases.setdefault(scope.key, {})
                leases.acquire(members, now, scope.connection_limit, lease_id, limits.lease_ttl)
        return None

    def adopt(self, lease_id: str, limits: PathLimits) -> None:
        """Count a connection opened elsewhere (in shared mode) as held here,
        even over the limit: it is open, and new ones must wait for it."""
        expiry = self._now() + limits.lease_ttl
        for scope in limits.scopes:
            if scope.connection_limit is not None:
                self._leases.setdefault(scope.key, {})[lease_id] = expiry

    async def extend(self, lease_id: str, limits: PathLimits) -> bool:
        """See :meth:`ShapingBackend.extend`."""
        await trio.lowlevel.checkpoint()
        now = self._now()
        limited = [s for s in limits.scopes if s.connection_limit is not None]
        over = any(
            lease_id in self._leases.get(s.key, {})
            and len(self._leases[s.key]) > s.connection_limit
            for s in limited
            if s.connection_limit is not None
        )
        if over:
            # More held than the limit (leases adopted at a switch to local
            # mode): shed this one, so the node comes down to its share.
            for scope in limited:
                leases.release(self._leases.setdefault(scope.key, {}), lease_id)
            return False
        room = all(
            leases.has_room(self._leases.get(s.key, {}), now, s.connection_limit, lease_id)
            for s in limited
            if s.connection_limit is not None
        )
        for scope in limited:
            members = self._leases.setdefault(scope.key, {})
            if room:
                members[lease_id] = now + limits.lease_ttl
            else:
                leases.release(members, lease_id)
        return room

    async def release(self, lease_id: str, limits: PathLimits) -> None:
        """See :meth:`ShapingBackend.release`."""
        await trio.lowlevel.checkpoint()
        for scope in limits.scopes:
            members = self._leases.get(scope.key)
            if members is not None:
                leases.release(members, lease_id)
                if not members:
                    del self._leases[scope.key]

    async def take(self, limits: PathLimits, n: int) -> float:
        """See :meth:`ShapingBackend.take`."""
        await trio.lowlevel.checkpoint()
        now = self._now()
        suspension = self._suspension(limits.path_key, now)
        if suspension is not None:
            return suspension.remaining
        worst = 0.0
        tats: dict[str, float] = {}
        for scope in limits.scopes:
            if scope.message_rate is None:
                continue
            decision = gcra(
                self._message_tats.get(scope.key), now, scope.message_rate, scope.message_burst, n
            )
            if decision.allowed:
                tats[scope.key] = decision.new_tat
            else:
                worst = max(worst, decision.retry_after)
        if worst > 0:
            return worst
        self._message_tats.update(tats)
        return 0.0

    async def suspend(self, key: str, duration: float, reason: str) -> None:
        """See :meth:`ShapingBackend.suspend`."""
        await trio.lowlevel.checkpoint()
        until = self._now() + duration
        current = self._suspended.get(key)
        if current is None or current[0] < until:
            self._suspended[key] = (until, reason)

    async def suspension(self, key: str) -> Suspension | None:
        """See :meth:`ShapingBackend.suspension`."""
        await trio.lowlevel.checkpoint()
        return self._suspension(key, self._now())

    def suspensions(self) -> dict[str, Suspension]:
        """Every suspension still running, by path key (to hand them to Redis)."""
        now = self._clock()
        out: dict[str, Suspension] = {}
        for key in list(self._suspended):
            suspension = self._suspension(key, now)
            if suspension is not None:
                out[key] = suspension
        return out

    def lease_count(self, key: str) -> int:
        """Live leases under ``key`` (for tests and metrics)."""
        members = self._leases.get(key, {})
        leases.prune(members, self._clock())
        return len(members)

    def _suspension(self, key: str, now: float) -> Suspension | None:
        entry = self._suspended.get(key)
        if entry is None:
            return None
        until, reason = entry
        if until <= now:
            del self._suspended[key]
            return None
        return Suspension(until - now, reason)

    def _now(self) -> float:
        now = self._clock()
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL
        elif now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + SWEEP_INTERVAL
        return now

    def _sweep(self, now: float) -> None:
        for key, members in list(self._leases.items()):
            leases.prune(members, now)
            if not members:
                del self._leases[key]
        for tats in (self._connection_tats, self._message_tats):
            for key in [k for k, tat in tats.items() if tat <= now]:
                del tats[key]
        for key in [k for k, (until, _) in self._suspended.items() if until <= now]:
            del self._suspended[key]
