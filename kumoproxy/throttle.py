"""Slow down repeated authentication failures from one client address.

Pure bookkeeping, no clock of its own: callers pass ``now`` (trio's clock in
the service). Each consecutive failure from an address doubles the delay
before the next failure reply, up to a cap; a success, or a quiet period,
forgives. The table is bounded so a spray of addresses cannot grow it
without limit (the oldest entries go first).

A delay is applied only to *failure* replies, so a well-behaved MTA with the
right password never waits, while a credential-stuffing client gets at most
one guess per ``MAX_DELAY`` per connection. (It can open more connections;
``limits.per_client`` bounds those.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kumoproxy.config import IPAddress

FIRST_DELAY = 0.25  # seconds before the reply to the first failure
MAX_DELAY = 8.0  # the cap: failures never wait longer than this
FORGET_AFTER = 600.0  # quiet seconds after which an address starts over
MAX_TRACKED = 65536  # addresses remembered at once


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class AuthThrottle:
    """Failure counts per client address, and the delay they earn."""

    def __init__(self, *, max_tracked: int = MAX_TRACKED) -> None:
        self._failures: OrderedDict[IPAddress, _Failures] = OrderedDict()
        self._max_tracked = max_tracked

    def record_failure(self, client: IPAddress, now: float) -> float:
        """Count a failure; return how long to wait before answering it."""
        entry = self._failures.pop(client, None)
        if entry is None or now - entry.last > FORGET_AFTER:
            entry = _Failures(0, now)
        entry.count += 1
        entry.last = now
        self._failures[client] = entry  # most recent last
        while len(self._failures) > self._max_tracked:
            self._failures.popitem(last=False)
        return min(FIRST_DELAY * 2.0 ** (entry.count - 1), MAX_DELAY)

    def record_success(self, client: IPAddress) -> None:
        self._failures.pop(client, None)

    def failures(self, client: IPAddress, now: float) -> int:
        """Consecutive recent failures from ``client`` (for logs and tests)."""
        entry = self._failures.get(client)
        if entry is None or now - entry.last > FORGET_AFTER:
            return 0
        return entry.count
