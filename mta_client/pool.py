"""Which egress source sends the next connection: weighted, with suspensions.

Pure bookkeeping, no clock of its own: callers pass ``now`` (trio's clock in
the sender) and get back entries and times.

Selection is nginx's smooth weighted round robin (``ngx_http_upstream_rr``):
each choice adds every usable entry's weight to its running score, picks the
highest score (the first in pool order on a tie), and takes the total weight
of the usable entries off the winner. It is deterministic and interleaves:
weights 1:1:2 give the order C A B C, so every window of 4 consecutive
choices holds exactly one A, one B and two C, instead of bursts (C C A B).
Only usable entries take part, so a suspended or excluded entry's share goes
to the others in proportion to their weights; the running scores of all
entries always sum to zero, which keeps the order fair when it comes back.

An entry is suspended when its source cannot be used (the proxy refused or
could not bind it): for 60 s after the first suspension, doubling with each
further consecutive suspension up to 15 min, so a source that is down for
long costs one failed connection per 15 min, not one per message. A success
through the entry starts it over. Failures reported while the entry is
already suspended (concurrent deliveries that were already under way) do not
count again: they would otherwise jump straight to the cap.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    # Only for annotations: the config module reads files; this one is pure.
    from mta_client.config import PoolEntry

__all__ = ["FIRST_SUSPENSION", "MAX_SUSPENSION", "EgressPool"]

#: How long the first suspension of an entry lasts, in seconds.
FIRST_SUSPENSION: Final = 60.0
#: The cap on a suspension: a dead source is retried every 15 minutes.
MAX_SUSPENSION: Final = 15 * 60.0


@dataclass(slots=True)
class _State:
    """What the pool tracks for one entry."""

    current: int = 0  # smooth weighted round robin score
    strikes: int = 0  # consecutive suspensions since the last success
    until: float = float("-inf")  # suspended while now < until
    reason: str = ""


class EgressPool:
    """The egress sources of a pool, chosen by weight and suspended on failure."""

    def __init__(self, entries: Sequence[PoolEntry]) -> None:
        """Track ``entries``; each must appear once and have a weight of at least 1."""
        self._entries: tuple[PoolEntry, ...] = tuple(entries)
        self._states: dict[PoolEntry, _State] = {}
        for entry in self._entries:
            if entry in self._states:
                raise ValueError(f"egress source {entry.source} appears twice in the pool")
            if entry.weight < 1:
                raise ValueError(f"egress source {entry.source}: weight must be >= 1")
            self._states[entry] = _State()

    @property
    def entries(self) -> tuple[PoolEntry, ...]:
        """Every entry, in pool order, suspended or not."""
        return self._entries

    def _state(self, entry: PoolEntry) -> _State:
        try:
            return self._states[entry]
        except KeyError:
            raise ValueError(f"egress source {entry.source} is not in this pool") from None

    def choose(
        self, family: int, now: float, *, exclude: Collection[PoolEntry] = ()
    ) -> PoolEntry | None:
        """The next entry for a connection over IP version ``family`` (4 or 6).

        Smooth weighted round robin over the entries whose source is of that
        family, not suspended at ``now`` and not in ``exclude`` (e.g. sources
        that already failed for this destination). None when none is usable.
        """
        usable = [
            (entry, state)
            for entry, state in self._states.items()
            if entry.source.version == family and now >= state.until and entry not in exclude
        ]
        if not usable:
            return None
        total = 0
        best: tuple[PoolEntry, _State] | None = None
        for entry, state in usable:
            state.current += entry.weight
            total += entry.weight
            if best is None or state.current > best[1].current:
                best = (entry, state)
        assert best is not None
        best[1].current -= total
        return best[0]

    def suspend(self, entry: PoolEntry, now: float, reason: str) -> float:
        """Take ``entry`` out of :meth:`choose` for a while; return until when.

        The first suspension lasts :data:`FIRST_SUSPENSION`; each consecutive
        one (no :meth:`succeeded` in between) twice as long as the previous,
        up to :data:`MAX_SUSPENSION`. Suspending an entry that is suspended
        already changes nothing and returns the current end: the failures of
        deliveries that were under way when it was suspended are the same
        outage, not new evidence.
        """
        state = self._state(entry)
        if now < state.until:
            return state.until
        state.strikes += 1
        # Capped before exponentiating, so a long outage cannot overflow.
        doublings = min(state.strikes - 1, 32)
        state.until = now + min(FIRST_SUSPENSION * 2.0**doublings, MAX_SUSPENSION)
        state.reason = reason
        return state.until

    def succeeded(self, entry: PoolEntry) -> None:
        """A delivery through ``entry`` worked: its next suspension starts short again.

        Does not lift a suspension that is in force.
        """
        self._state(entry).strikes = 0

    def suspended(self, now: float) -> list[tuple[PoolEntry, float, str]]:
        """``(entry, until, reason)`` for each entry suspended at ``now``, in pool order."""
        return [
            (entry, state.until, state.reason)
            for entry, state in self._states.items()
            if now < state.until
        ]

    def next_resume(self, now: float) -> float | None:
        """When the earliest suspension in force at ``now`` ends; None if there is none."""
        return min((until for _, until, _ in self.suspended(now)), default=None)

    def families(self, now: float) -> frozenset[int]:
        """The IP versions with at least one entry usable at ``now``.

        For filtering MX addresses: there is no point in trying an IPv6 MX
        when no IPv6 source can send.
        """
        return frozenset(
            entry.source.version for entry, state in self._states.items() if now >= state.until
        )
