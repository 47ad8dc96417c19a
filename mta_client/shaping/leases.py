"""Lease semaphores: a connection limit that survives crashed holders.

A limit of ``n`` concurrent connections is a set of at most ``n`` lease ids,
each with an expiry time (in Redis, a sorted set scored by expiry). A lease
is taken when a connection opens, extended (its expiry pushed ``ttl`` ahead)
before every message, and removed when the connection closes. A holder that
dies stops extending, so its leases expire after ``ttl`` and the slots come
back without anyone having to notice the crash.

Expired members are dropped before every decision, so a lease whose expiry
has passed never counts, even if nobody has cleaned it up yet. A lease
expiring exactly at ``now`` is expired (Redis's ``ZREMRANGEBYSCORE -inf now``
is inclusive, and the Lua scripts must agree with this module).

Pure: ``members`` maps lease id to expiry time and is updated in place; the
caller supplies ``now``.
"""

from __future__ import annotations

from collections.abc import MutableMapping

__all__ = ["acquire", "extend", "has_room", "next_expiry", "prune", "release"]


def prune(members: MutableMapping[str, float], now: float) -> None:
    """Drop every lease whose expiry is at or before ``now``."""
    for lease_id in [i for i, expiry in members.items() if expiry <= now]:
        del members[lease_id]


def has_room(members: MutableMapping[str, float], now: float, limit: int, lease_id: str) -> bool:
    """Whether ``lease_id`` may hold a slot: it already does, or a slot is free.

    Prunes first.
    """
    prune(members, now)
    return lease_id in members or len(members) < limit


def acquire(
    members: MutableMapping[str, float], now: float, limit: int, lease_id: str, ttl: float
) -> bool:
    """Take (or refresh) a slot for ``lease_id`` until ``now + ttl``; False when full.

    A lease id that still holds a live slot is refreshed: taking twice never
    counts twice.
    """
    if not has_room(members, now, limit, lease_id):
        return False
    members[lease_id] = now + ttl
    return True


def extend(members: MutableMapping[str, float], now: float, lease_id: str, ttl: float) -> bool:
    """Push a live lease's expiry to ``now + ttl``; False if it expired or is unknown.

    An expired lease is not revived here: its slot may already be someone
    else's. (Taking a fresh slot under the same id is :func:`acquire`'s job,
    and counts against the limit.)
    """
    prune(members, now)
    if lease_id not in members:
        return False
    members[lease_id] = now + ttl
    return True


def release(members: MutableMapping[str, float], lease_id: str) -> None:
    """Free ``lease_id``'s slot (nothing happens if it holds none)."""
    members.pop(lease_id, None)


def next_expiry(members: MutableMapping[str, float]) -> float | None:
    """When the earliest lease expires (the latest a slot frees up without a release)."""
    return min(members.values(), default=None)
