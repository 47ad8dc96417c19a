"""Concurrency limits: whole process, per client, per source, per (source, destination).

Pure accounting, no I/O. Two kinds of slot:

* a *session* slot, taken at accept: ``max_sessions`` and ``per_client``;
* an *egress* slot, taken just before the outbound connect and held until
  the outbound connection closes: ``per_source`` and
  ``per_source_destination``. The latter is the hard backstop that protects
  an IP's reputation with one mailbox provider whatever the MTAs do.

Each ``admit_*`` either takes the slot and returns ``None``, or takes nothing
and returns the :class:`LimitKind` that refused. Every taken slot must be
released exactly once; the shell does that in ``finally`` blocks so no slot
leaks when a session ends by error, timeout or cancellation. Limits can be
replaced at any time (SIGHUP reload): counts carry over, and a lowered limit
refuses new slots until enough old ones are released.

:class:`Limiter` is what sessions use. :class:`LimitTracker` keeps the
counts in this process; with ``workers`` > 1 each worker process uses a
:class:`kumoproxy.shared_limits.SharedLimitTracker` instead, so the limits
hold in total across workers.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Hashable
from typing import Protocol, TypeVar

from kumoproxy.config import IPAddress, LimitsConfig

K = TypeVar("K", bound=Hashable)


class LimitKind(enum.StrEnum):
    """Which limit refused: the ``limit`` label of ``kumoproxy_limit_refusals_total``."""

    MAX_SESSIONS = "max_sessions"
    PER_CLIENT = "per_client"
    PER_SOURCE = "per_source"
    PER_SOURCE_DESTINATION = "per_source_destination"
    HANDSHAKES = "handshakes"  # enforced by eviction, see kumoproxy.handshakes


class Limiter(Protocol):
    """Slot accounting as sessions see it: admit, release, look up."""

    limits: LimitsConfig

    @property
    def sessions(self) -> int:
        """Sessions holding a slot now."""
        ...

    def admit_session(self, client: IPAddress) -> LimitKind | None: ...

    def release_session(self, client: IPAddress) -> None: ...

    def admit_egress(self, source: IPAddress, destination: IPAddress) -> LimitKind | None: ...

    def release_egress(self, source: IPAddress, destination: IPAddress) -> None: ...

    def source_connections(self, source: IPAddress) -> int: ...

    def client_sessions(self, client: IPAddress) -> int: ...

    def limit_value(self, kind: LimitKind) -> int: ...


class LimitTracker:
    """Live counts, checked against the current :class:`LimitsConfig`."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.sessions = 0
        self._clients: Counter[IPAddress] = Counter()
        self._sources: Counter[IPAddress] = Counter()
        self._pairs: Counter[tuple[IPAddress, IPAddress]] = Counter()

    def admit_session(self, client: IPAddress) -> LimitKind | None:
        if self.sessions >= self.limits.max_sessions:
            return LimitKind.MAX_SESSIONS
        if self._clients[client] >= self.limits.per_client:
            return LimitKind.PER_CLIENT
        self.sessions += 1
        self._clients[client] += 1
        return None

    def release_session(self, client: IPAddress) -> None:
        self.sessions -= 1
        _decrement(self._clients, client)

    def admit_egress(self, source: IPAddress, destination: IPAddress) -> LimitKind | None:
        if self._sources[source] >= self.limits.per_source:
            return LimitKind.PER_SOURCE
        if self._pairs[source, destination] >= self.limits.per_source_destination:
            return LimitKind.PER_SOURCE_DESTINATION
        self._sources[source] += 1
        self._pairs[source, destination] += 1
        return None

    def release_egress(self, source: IPAddress, destination: IPAddress) -> None:
        _decrement(self._sources, source)
        _decrement(self._pairs, (source, destination))

    def source_connections(self, source: IPAddress) -> int:
        """Outbound connections through ``source`` now (connecting or relaying)."""
        return self._sources[source]

    def client_sessions(self, client: IPAddress) -> int:
        return self._clients[client]

    def limit_value(self, kind: LimitKind) -> int:
        return int(getattr(self.limits, str(kind)))


def _decrement(counts: Counter[K], key: K) -> None:
    """Drop keys that reach zero, so the tables only hold what is in use."""
    remaining = counts[key] - 1
    if remaining < 0:
        raise AssertionError(f"limit slot released twice for {key!r}")
    if remaining:
        counts[key] = remaining
    else:
        del counts[key]
