"""From one delivery attempt's per-recipient answers to spool ops, records and bounces (pure).

Every attempt on a work item ends here, whatever happened: the server
answered each recipient, or the attempt failed before it could (no MX host
reachable, DNS failure, the connection broke mid-transaction), in which case
the caller passes the same synthetic answer for every recipient. The rules:

* 2xx: ``Delivery``; the recipient is done.
* 5xx: ``Bounce``; the recipient is done, and a bounce goes to the sender.
* 4xx: ``TransientFailure`` and a retry at the policy's next time, unless
  the message has reached its maximum age: then ``Expiration``, done, and a
  bounce (RFC 5321 §4.5.4.1: give up after a period of days).

A message whose sender is the null reverse-path is itself a bounce: it never
gets one back (RFC 5321 §6.1, "no bounce for a bounce").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from mta_client.events import Event, EventKind
from mta_client.proto.dsn import FailedRecipient, is_bounce
from mta_client.retry import RetryPolicy
from mta_client.scheduler import WorkItem
from mta_client.spool_format import Done, JournalOp, Scheduled

Status = str  # "delivered" | "deferred" | "bounced", as the SMTP session reports


@dataclass(frozen=True, slots=True)
class Answer:
    """What decided one recipient in one attempt."""

    recipient: str
    status: Status
    code: int
    enhanced: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Route:
    """Where the attempt went: all optional, since an attempt may fail before choosing."""

    source: str | None = None
    site: str | None = None
    mx: str | None = None
    mx_address: str | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to do after an attempt: journal ``ops``, ``events`` to log, and
    ``failed`` recipients to report in a bounce to ``item.sender`` (empty when
    none is due). ``retry`` is the item to queue again, if any."""

    ops: tuple[JournalOp, ...]
    events: tuple[Event, ...]
    failed: tuple[FailedRecipient, ...]
    retry: WorkItem | None
    delivered: tuple[str, ...]
    bounced: tuple[str, ...]
    deferred: tuple[str, ...]
    expired: tuple[str, ...]


def settle(
    item: WorkItem,
    answers: Sequence[Answer],
    route: Route,
    *,
    now: float,
    policy: RetryPolicy,
    rng: random.Random,
    header_message_id: str | None = None,
) -> Settlement:
    """Decide every recipient of ``item`` from its ``answers`` (one per recipient)."""
    attempt = item.attempts + 1
    expired_now = policy.expired(item.received, now)
    done: list[str] = []
    events: list[Event] = []
    failed: list[FailedRecipient] = []
    delivered: list[str] = []
    bounced: list[str] = []
    deferred: list[str] = []
    expired: list[str] = []

    def event(kind: EventKind, answer: Answer) -> Event:
        return Event(
            kind=kind,
            time=now,
            message_id=item.id,
            sender=item.sender,
            recipient=answer.recipient,
            attempt=attempt,
            source=route.source,
            site=route.site,
            mx=route.mx,
            mx_address=route.mx_address,
            code=answer.code,
            enhanced=answer.enhanced,
            reply=answer.text,
            header_message_id=header_message_id,
            size=item.size,
        )

    for answer in answers:
        if answer.status == "delivered":
            done.append(answer.recipient)
            delivered.append(answer.recipient)
            events.append(event(EventKind.DELIVERY, answer))
        elif answer.status == "bounced":
            done.append(answer.recipient)
            bounced.append(answer.recipient)
            events.append(event(EventKind.BOUNCE, answer))
            failed.append(_failed(answer, route, now))
        elif expired_now:
            done.append(answer.recipient)
            expired.append(answer.recipient)
            events.append(event(EventKind.EXPIRATION, answer))
            failed.append(_failed(answer, route, now, expired=True))
        else:
            deferred.append(answer.recipient)
            events.append(event(EventKind.TRANSIENT_FAILURE, answer))

    ops: list[JournalOp] = []
    if done:
        ops.append(Done(item.id, tuple(done)))
    retry = None
    if deferred:
        # Never past the expiry: the last try happens right at max_age.
        next_attempt = policy.next_attempt(attempt, now, rng, received=item.received)
        ops.append(Scheduled(item.id, tuple(deferred), attempt, next_attempt))
        retry = WorkItem(
            id=item.id,
            domain=item.domain,
            sender=item.sender,
            recipients=tuple(deferred),
            attempts=attempt,
            next_attempt=next_attempt,
            received=item.received,
            size=item.size,
        )
    return Settlement(
        ops=tuple(ops),
        events=tuple(events),
        failed=() if is_bounce(item.sender) else tuple(failed),
        retry=retry,
        delivered=tuple(delivered),
        bounced=tuple(bounced),
        deferred=tuple(deferred),
        expired=tuple(expired),
    )


def _failed(answer: Answer, route: Route, now: float, *, expired: bool = False) -> FailedRecipient:
    reply = " ".join(str(part) for part in (answer.code, answer.enhanced, answer.text) if part)
    # An expired recipient's last answer was a 4xx; the DSN still says
    # "failed", with a 4.x.x status naming the last transient reason
    # (RFC 3464 §2.3.3: Action failed, Status from the last attempt).
    status = answer.enhanced or ("4.4.7" if expired else "5.0.0")
    return FailedRecipient(
        recipient=answer.recipient,
        action="failed",
        status=status,
        diagnostic=f"smtp; {reply}" if reply else None,
        remote_mta=route.mx,
        last_attempt=now,
    )
