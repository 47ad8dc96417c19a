"""GCRA, the generic cell rate algorithm: a rate limit kept as one number.

GCRA (ITU-T I.371, the "virtual scheduling" form) is a token bucket that
stores a single value per key, the *theoretical arrival time* (TAT): when the
bucket would be empty again if everything granted so far had been spaced
exactly one emission interval ``T = period / count`` apart. A request for
``quantity`` tokens at ``now`` conforms when::

    start    = max(tat, now)                       # an idle bucket starts at now
    allow_at = start + min(0, quantity - burst) * T
    allowed  = now >= allow_at    ->  new tat = start + quantity * T

so at most ``burst`` tokens may be taken at one instant, and over any window
``W`` at most ``burst + W / T`` are granted: the long-run rate is exact, the
burst is the only slack. A refused request changes nothing (the caller
retries after ``retry_after``), which is what lets several keys be checked
first and committed together, all or nothing.

Batching: a sender may take ``quantity`` tokens in one call (one Redis round
trip for several messages). A batch larger than ``burst`` would never
conform under the textbook rule; here it is granted when the bucket is idle
(``now >= tat``) and pushes the TAT ``quantity * T`` ahead, so the long-run
rate still holds and the one-off overshoot is at most ``quantity - burst``.

Burst choice (:func:`default_burst`): 100 ms worth of the rate, at least 1.
A burst of 1 (strict spacing) wastes capacity whenever a request arrives a
little after its TAT (scheduling and Redis latency), which several nodes
competing for one key do all the time; a large burst (a whole period, as
some MTAs default to) lets ``100000/day`` go out in one go. A tenth of a
second absorbs jitter at high rates (``50/s`` gives 5, ``100/s`` 10: an
aggregate within 1% of the rate over 20 s) and is strict spacing for the
slow rates used to warm up IPs (``100/h`` gives 1).

Pure: no clock reads, no I/O. Times are seconds on any monotonic clock; the
Redis backend runs the same arithmetic in Lua on Redis's own clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = ["BURST_WINDOW", "GcraDecision", "Rate", "default_burst", "gcra"]

#: How much of a rate may go out at one instant, in seconds of that rate.
BURST_WINDOW: Final = 0.1

# Float arithmetic on ``now + retry_after`` can land a hair before
# ``allow_at``; a nanosecond of slack keeps a caller that slept exactly
# ``retry_after`` from being refused again for 1e-17 s.
_EPSILON: Final = 1e-9


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events per ``period`` seconds (``100/min`` is ``Rate(100, 60.0)``)."""

    count: int
    period: float

    def __post_init__(self) -> None:
        if self.count < 1 or not self.period > 0:
            raise ValueError(f"a rate needs count >= 1 and period > 0, got {self}")

    @property
    def interval(self) -> float:
        """The emission interval: seconds between two events at this rate."""
        return self.period / self.count

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def divided(self, parts: int) -> Rate:
        """This rate shared by ``parts`` takers: the same count over a longer period."""
        if parts < 1:
            raise ValueError("parts must be >= 1")
        return Rate(self.count, self.period * parts)

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


@dataclass(frozen=True, slots=True)
class GcraDecision:
    """The outcome of one :func:`gcra` call.

    ``new_tat`` is what to store (unchanged when refused); ``retry_after`` is
    0 when allowed, else how long until the same request would conform.
    """

    allowed: bool
    new_tat: float
    retry_after: float


def default_burst(rate: Rate) -> int:
    """:data:`BURST_WINDOW` seconds of ``rate``, at least 1 and at most its count."""
    return max(1, min(rate.count, math.ceil(rate.per_second * BURST_WINDOW)))


def gcra(tat: float | None, now: float, rate: Rate, burst: int, quantity: int = 1) -> GcraDecision:
    """Decide whether ``quantity`` tokens may be taken at ``now``.

    ``tat`` is the stored theoretical arrival time (``None``: never used, or
    expired). ``burst >= 1`` is how many tokens may go at one instant.
    """
    if burst < 1:
        raise ValueError("burst must be >= 1")
    if quantity < 1:
        raise ValueError("quantity must be >= 1")
    interval = rate.interval
    start = now if tat is None else max(tat, now)
    allow_at = start + min(0, quantity - burst) * interval
    if allow_at - now <= _EPSILON:
        return GcraDecision(True, start + quantity * interval, 0.0)
    return GcraDecision(False, start, allow_at - now)
