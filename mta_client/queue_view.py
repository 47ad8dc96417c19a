"""What ``mta-client queue`` prints: the spool summarised per domain (pure)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass

from mta_client.scheduler import domain_of
from mta_client.spool_format import QueuedMessage


@dataclass(slots=True)
class DomainSummary:
    """One destination domain's share of the queue.

    ``new`` recipients have not been tried yet; ``deferred`` ones have, and
    wait for their next attempt. ``next_attempt`` is the earliest of all.
    """

    domain: str
    messages: int = 0
    new: int = 0
    deferred: int = 0
    next_attempt: float = float("inf")
    oldest: float = float("inf")

    def as_json(self) -> dict[str, object]:
        return {
            "domain": self.domain,
            "messages": self.messages,
            "recipients": self.new + self.deferred,
            "new": self.new,
            "deferred": self.deferred,
            "next_attempt": _iso(self.next_attempt),
            "oldest": _iso(self.oldest),
        }


def summarize(messages: Iterable[QueuedMessage]) -> list[DomainSummary]:
    """Per-domain counts, the busiest domain first."""
    by_domain: dict[str, DomainSummary] = {}
    for message in messages:
        seen: set[str] = set()
        for recipient in message.recipients:
            domain = domain_of(recipient.address)
            row = by_domain.get(domain)
            if row is None:
                row = by_domain[domain] = DomainSummary(domain)
            if domain not in seen:
                seen.add(domain)
                row.messages += 1
                row.oldest = min(row.oldest, message.received)
            if recipient.attempts:
                row.deferred += 1
            else:
                row.new += 1
            row.next_attempt = min(row.next_attempt, recipient.next_attempt)
    return sorted(by_domain.values(), key=lambda row: (-(row.new + row.deferred), row.domain))


def render(rows: list[DomainSummary], *, now: float) -> str:
    """A fixed-width table for people; ``--json`` gives the machine form."""
    header = f"{'DOMAIN':<32} {'MSGS':>7} {'NEW':>7} {'DEFERRED':>8}  NEXT ATTEMPT"
    lines = [header]
    for row in rows:
        due = "now" if row.next_attempt <= now else _iso(row.next_attempt)
        lines.append(f"{row.domain:<32} {row.messages:>7} {row.new:>7} {row.deferred:>8}  {due}")
    total_messages = sum(row.messages for row in rows)
    lines.append(f"{len(rows)} domains, {total_messages} message-domain pairs queued")
    return "\n".join(lines)


def _iso(when: float) -> str | None:
    if when == float("inf"):
        return None
    moment = datetime.datetime.fromtimestamp(when, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
