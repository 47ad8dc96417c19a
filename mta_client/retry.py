"""When to retry a message after a transient failure, and when to give up.

Pure: no clock, no randomness of its own. Callers pass ``now`` (the spool's
wall clock, in seconds) and a :class:`random.Random`, and get back times.

The schedule is exponential backoff with a cap, as Postfix and KumoMTA do::

    attempt 1 fails ─> wait initial        (5 min)
    attempt 2 fails ─> wait initial * 2    (10 min)
    attempt n fails ─> wait min(initial * 2**(n-1), max)   (... 4 h, 4 h, ...)

Each wait is spread by ``± jitter`` of itself, so that messages that failed
together (a destination was down for everyone) do not come back in one storm.

A message lives at most ``max_age`` in the queue (Postfix's
``maximal_queue_lifetime``, 5 days by default; RFC 5321 §4.5.4.1 asks for
"at least 4-5 days"). A retry that would fall after ``received + max_age`` is
pulled in to exactly that time, so every message gets a last try at its
expiry rather than expiring untried after a long final wait. When that last
try fails too, :meth:`RetryPolicy.expired` is true and the message bounces.
:meth:`RetryPolicy.schedule` makes that whole decision in one call.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final

__all__ = ["Expire", "RetryAt", "RetryPolicy"]

#: The default first wait: 5 minutes (Postfix's ``minimal_backoff_time`` is 300 s).
DEFAULT_INITIAL: Final = 300.0
#: The default cap on a wait: 4 hours (Postfix's ``maximal_backoff_time``).
DEFAULT_MAX: Final = 4 * 3600.0
#: The default queue lifetime: 5 days (Postfix's ``maximal_queue_lifetime``).
DEFAULT_MAX_AGE: Final = 5 * 86400.0
#: The default spread of a wait: ± 10 %.
DEFAULT_JITTER: Final = 0.1


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Try the message again at ``at``.

    ``final`` is true when ``at`` is the expiry time itself: if that attempt
    fails transiently, the message expires.
    """

    at: float
    final: bool = False


@dataclass(frozen=True, slots=True)
class Expire:
    """The message has been queued for ``max_age`` or longer: bounce it.

    ``age`` is how long it was queued, for the bounce text and the event log.
    """

    age: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with a cap, jitter and a maximum queue age.

    All values are seconds except ``jitter``, a fraction of the wait. Raises
    :class:`ValueError` unless ``initial > 0``, ``max >= initial``,
    ``max_age > 0`` (all finite) and ``0 <= jitter < 1``. A jitter of 1 or
    more could make a wait zero or negative.
    """

    initial: float = DEFAULT_INITIAL
    max: float = DEFAULT_MAX
    max_age: float = DEFAULT_MAX_AGE
    jitter: float = DEFAULT_JITTER

    def __post_init__(self) -> None:
        # Written as "not (ok)" so that NaN, which compares false, is refused.
        if not (math.isfinite(self.initial) and self.initial > 0):
            raise ValueError(f"retry initial must be a finite number > 0, got {self.initial!r}")
        if not (math.isfinite(self.max) and self.max >= self.initial):
            raise ValueError(
                f"retry max must be finite and >= initial ({self.initial!r}), got {self.max!r}"
            )
        if not (math.isfinite(self.max_age) and self.max_age > 0):
            raise ValueError(f"retry max_age must be a finite number > 0, got {self.max_age!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"retry jitter must be in [0, 1), got {self.jitter!r}")

    def interval(self, attempts: int) -> float:
        """The nominal wait after ``attempts`` failed attempts (``attempts >= 1``).

        ``initial * 2**(attempts - 1)``, capped at ``max``; no jitter.
        """
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1 (a wait follows a failure), got {attempts}")
        try:
            # ldexp doubles exactly and raises instead of returning inf when a
            # large attempt count overflows; either way the cap applies.
            nominal = math.ldexp(self.initial, attempts - 1)
        except OverflowError:
            return self.max
        return min(nominal, self.max)

    def next_attempt(
        self, attempts: int, now: float, rng: random.Random, *, received: float | None = None
    ) -> float:
        """When to try again after the ``attempts``-th failed attempt, at ``now``.

        ``now + interval(attempts) * (1 ± jitter)``, the factor drawn uniformly
        from ``rng``. Always later than ``now``.

        With ``received`` (when the message entered the queue), the time is
        clamped to the expiry ``received + max_age``: the message gets one last
        try right at its expiry. Raises :class:`ValueError` if the message has
        already expired at ``now``: it has no next attempt, it bounces (see
        :meth:`expired` and :meth:`schedule`).
        """
        spread = rng.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else 1.0
        at = now + self.interval(attempts) * spread
        if at <= now:
            # A wait far below the resolution of ``now`` (a tiny ``initial`` and
            # a large epoch time) would round to ``now``; keep the promise.
            at = math.nextafter(now, math.inf)
        if received is None:
            return at
        expiry = received + self.max_age
        if now >= expiry:
            raise ValueError(
                f"the message expired at {expiry!r} (received {received!r}, now {now!r}); "
                "bounce it instead of scheduling another attempt"
            )
        return min(at, expiry)

    def expired(self, received: float, now: float) -> bool:
        """Whether a message received at ``received`` has been queued ``max_age`` or longer.

        True from the expiry time on, so the last try scheduled at exactly the
        expiry (see :meth:`next_attempt`) is followed by expiry if it fails.
        """
        # The same sum as next_attempt's clamp, so that an attempt scheduled
        # at the expiry is, to the last bit, at an expired time.
        return now >= received + self.max_age

    def schedule(
        self, attempts: int, received: float, now: float, rng: random.Random
    ) -> RetryAt | Expire:
        """What to do after the ``attempts``-th attempt failed transiently at ``now``.

        :class:`Expire` once the message is :meth:`expired`; otherwise
        :class:`RetryAt` with the clamped :meth:`next_attempt`, marked ``final``
        when that is the expiry time.
        """
        if self.expired(received, now):
            return Expire(now - received)
        at = self.next_attempt(attempts, now, rng, received=received)
        return RetryAt(at, final=at == received + self.max_age)
