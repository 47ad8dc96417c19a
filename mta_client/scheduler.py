"""The scheduled queues: what is due, per destination domain (pure).

KumoMTA's queue model, reduced to what one sender node needs::

    spool ──> scheduled queue per domain (ordered by next attempt)
                  │  due
                  v
              dispatcher: resolve MX → site, pick a source
                  │
                  v
              ready queue per (source, site) ──> connections ──> outcome
                                                                   │
              deferred: back to its scheduled queue at the next ───┘
              attempt; delivered, bounced, expired: done

A *work item* is one message's recipients in one domain: a message to
``a@x.example`` and ``b@y.example`` is two items, because the two domains
have different MX hosts, outcomes and retry times. The spool records state
per recipient, so splitting costs nothing there.

Each domain keeps a heap ordered by next attempt, and the scheduler keeps a
heap of domains by their earliest item, so finding what is due costs
O(log n) per item whatever the queue holds. Superseded entries in the domain
heap are skipped lazily instead of being searched for and removed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from mta_client.spool_format import QueuedMessage


def domain_of(address: str) -> str:
    """The domain of a validated address, lower-cased (its own queue)."""
    return address.rpartition("@")[2].lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One message's recipients in one domain, due at ``next_attempt`` (wall seconds)."""

    id: str
    domain: str
    sender: str
    recipients: tuple[str, ...]
    attempts: int
    next_attempt: float
    received: float
    size: int


def split(message: QueuedMessage) -> list[WorkItem]:
    """A spooled message's live recipients, grouped into one item per domain.

    Recipients of one domain that were scheduled apart (a partial deferral
    of an earlier attempt) go together again: the item is due when the
    earliest of them is, and carries the most attempts any of them had,
    so a retry never waits longer than the policy says for anyone.
    """
    grouped: dict[str, list[tuple[str, int, float]]] = {}
    for recipient in message.recipients:
        grouped.setdefault(domain_of(recipient.address), []).append(
            (recipient.address, recipient.attempts, recipient.next_attempt)
        )
    return [
        WorkItem(
            id=message.id,
            domain=domain,
            sender=message.sender,
            recipients=tuple(address for address, _, _ in members),
            attempts=max(attempts for _, attempts, _ in members),
            next_attempt=min(due for _, _, due in members),
            received=message.received,
            size=message.size,
        )
        for domain, members in grouped.items()
    ]


@dataclass(slots=True)
class _DomainQueue:
    heap: list[tuple[float, int, WorkItem]] = field(default_factory=list)


class Scheduler:
    """Per-domain queues of work items ordered by next attempt."""

    def __init__(self) -> None:
        self._queues: dict[str, _DomainQueue] = {}
        # (earliest due, domain); entries left behind when a domain's head
        # moved are skipped when they surface.
        self._domains: list[tuple[float, str]] = []
        self._tiebreak = itertools.count()  # FIFO among items due at one instant
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, item: WorkItem) -> None:
        """Queue ``item`` until its ``next_attempt``."""
        queue = self._queues.get(item.domain)
        if queue is None:
            queue = self._queues[item.domain] = _DomainQueue()
        head = queue.heap[0][0] if queue.heap else None
        heapq.heappush(queue.heap, (item.next_attempt, next(self._tiebreak), item))
        self._count += 1
        if head is None or item.next_attempt < head:
            heapq.heappush(self._domains, (item.next_attempt, item.domain))

    def add_all(self, items: Iterable[WorkItem]) -> None:
        for item in items:
            self.add(item)

    def next_due(self) -> float | None:
        """When the earliest item is due; None when nothing is queued."""
        self._drop_stale()
        return self._domains[0][0] if self._domains else None

    def pop_due(self, now: float, limit: int) -> list[WorkItem]:
        """Up to ``limit`` items due at ``now``, earliest first, removed from the queues."""
        due: list[WorkItem] = []
        while len(due) < limit:
            self._drop_stale()
            if not self._domains or self._domains[0][0] > now:
                break
            _, domain = heapq.heappop(self._domains)
            queue = self._queues[domain]
            while queue.heap and queue.heap[0][0] <= now and len(due) < limit:
                due.append(heapq.heappop(queue.heap)[2])
                self._count -= 1
            if queue.heap:
                heapq.heappush(self._domains, (queue.heap[0][0], domain))
            else:
                del self._queues[domain]
        return due

    def counts(self) -> dict[str, tuple[int, float]]:
        """Per domain: how many items wait and when the earliest is due."""
        return {
            domain: (len(queue.heap), queue.heap[0][0])
            for domain, queue in self._queues.items()
            if queue.heap
        }

    def _drop_stale(self) -> None:
        # Invariant: every non-empty domain has an entry equal to its head
        # (add() files an earlier head, pop_due() re-files the new head), so
        # an entry that differs from its domain's head is stale and goes.
        while self._domains:
            due, domain = self._domains[0]
            queue = self._queues.get(domain)
            if queue is not None and queue.heap and queue.heap[0][0] == due:
                return
            heapq.heappop(self._domains)
