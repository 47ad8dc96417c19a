"""The spooling sender's daemon: ``mta-client run``.

Tasks, all in one nursery (module docstring of :mod:`mta_client.scheduler`
draws the queues)::

    scan loop ──(new segments from `mta-client enqueue`)──> scheduler
    dispatch loop: due items ─> MX lookup per domain ─> source from the pool
                   ─> ready queue (source, site) ─> path manager
    path manager, one per ready queue: opens connections while the path has
                   work and shaping grants a lease
    connection: takes items from its ready queue, several per connection,
                   delivers them, settles each (spool ops, events, bounces,
                   metrics), QUITs when idle or at the per-connection cap

Shutdown (SIGTERM) stops the dispatcher and lets each connection finish the
transaction it is in, then QUIT; items not yet attempted stay in the spool,
untouched, for the next start. Nothing acknowledged is lost: the spool is
only told a recipient is done after the server's answer was read.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import structlog
import trio

from mta_client.clock import WallClock
from mta_client.config import ClientConfig, PoolEntry
from mta_client.egress import open_egress
from mta_client.errors import (
    ConnectionLostError,
    EgressError,
    MxError,
    MxPermanentError,
    ProxyAuthError,
    ProxyUnreachableError,
    SmtpError,
    SmtpReply,
    SmtpTimeoutError,
    SourceRefusedError,
)
from mta_client.events import Event, EventLog, reception_events
from mta_client.metrics import ConnectionOutcome, SenderMetrics
from mta_client.mx import Destination, MxCandidate, MxResolver
from mta_client.outcomes import Answer, Route, Settlement, settle
from mta_client.pool import EgressPool
from mta_client.proto.dsn import build_bounce
from mta_client.ready import ReadyQueue
from mta_client.scheduler import Scheduler, WorkItem, split
from mta_client.send import CONNECT_TIMEOUT, egress_path, smtp_timeouts, tls_context
from mta_client.shaping import Lease, PathLimits, RefusalReason, Shaper
from mta_client.smtp_session import Envelope, SmtpSession, TlsMode
from mta_client.spool import Spool
from mta_client.spool_format import NewMessage, QueuedMessage
from mta_client.submission import header_value, message_id

#: Due items taken from the scheduler per dispatch round; bounds one round's work.
DISPATCH_BATCH = 1000
#: Items a connection takes from its ready queue at once: their bodies are
#: read from the spool in one batch. Small enough that a broken connection
#: hands few back; large enough to amortise the read.
TAKE_BATCH = 16
#: How long a path manager waits for a refused lease before asking again,
#: unless one of its own connections ends first.
LEASE_RETRY = 1.0
#: Connections per path when the shaping rules set no connection limit.
DEFAULT_CONNECTION_CAP = 10
#: How long a QUIT may take before the connection is dropped.
QUIT_TIMEOUT = 10.0

_DESTINATION_FAILURES = (
    EgressError,
    ConnectionLostError,
    SmtpTimeoutError,
    trio.TooSlowError,
    SmtpError,
)


@dataclass(frozen=True, slots=True)
class _Connected:
    session: SmtpSession
    candidate: MxCandidate
    local: str


class _SourceFailed(Exception):
    """The pool entry cannot be used now (refused, bad credentials, proxy down)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Runner:
    """Delivers the spool's messages until :meth:`stop` is called."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        spool: Spool,
        clock: WallClock,
        shaper: Shaper,
        resolver: MxResolver | None = None,
        events: EventLog | None = None,
        metrics: SenderMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.clock = clock
        self.shaper = shaper
        self.rng = rng or random.Random()  # noqa: S311 (jitter and load spreading)
        self.resolver = resolver or MxResolver(
            nameservers=config.dns.nameservers or None,
            routes=config.dns.routes,
            port=config.smtp.port,
            rng=self.rng,
        )
        self.events = events or EventLog(None)
        self.metrics = metrics
        self.pool = EgressPool(config.pool)
        self.scheduler = Scheduler()
        self.log = structlog.get_logger("mta_client.runner")
        self._ready: dict[tuple[str, str], ReadyQueue] = {}
        #: (source, site) -> trio time its throttle suspension ends, as last
        #: learned from the shaper; routing avoids these paths until then.
        self._suspended_paths: dict[tuple[str, str], float] = {}
        self._in_flight = 0
        self._wake_dispatcher = trio.Event()
        self._stopping = trio.Event()
        self._event_log_failing = False
        self._idle = trio.Event()
        self._tls_context = tls_context()
        self._timeouts = smtp_timeouts(config.smtp.timeouts)

    # -- lifecycle ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until :meth:`stop`; then finish in-flight transactions and return."""
        self._add_messages(self.spool.messages())
        async with trio.open_nursery() as connections:
            self._connections = connections
            async with trio.open_nursery() as intake:
                intake.start_soon(self._scan_loop)
                intake.start_soon(self._dispatch_loop)
                task_status.started()
                await self._stopping.wait()
                intake.cancel_scope.cancel()
            # Connections see _stopping: each ends its transaction and QUITs.
            # The nursery waits for them, up to the shutdown deadline.
            connections.cancel_scope.deadline = (
                trio.current_time() + self.config.spool.shutdown_timeout
            )
        if connections.cancel_scope.cancelled_caught:
            self.log.warning(
                "shutdown_timeout",
                seconds=self.config.spool.shutdown_timeout,
                in_flight=self._in_flight,
            )

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def sources_report(self) -> list[dict[str, object]]:
        """The pool as the metrics listener's ``/sources`` shows it."""
        now = self.clock.now()
        suspended = {entry: (until, why) for entry, until, why in self.pool.suspended(now)}
        report: list[dict[str, object]] = []
        for entry in self.config.pool:
            until, reason = suspended.get(entry, (None, None))
            report.append(
                {
                    "source": str(entry.source),
                    "weight": entry.weight,
                    "suspended": until is not None,
                    "resumes_in_seconds": None if until is None else round(until - now, 3),
                    "reason": reason,
                }
            )
        return report

    async def wait_idle(self) -> None:
        """Return once nothing is queued or being delivered (for tests and tools)."""
        while not self._idle.is_set():
            await self._idle.wait()

    def stop(self) -> None:
        """Begin shutdown (idempotent)."""
        self._stopping.set()

    # -- intake ------------------------------------------------------------------

    def _add_messages(self, messages: Sequence[QueuedMessage]) -> None:
        for message in messages:
            self.scheduler.add_all(split(message))
        self._update_gauges()
        self._wake()

    async def _scan_loop(self) -> None:
        """Pick up what ``mta-client enqueue`` spooled (it logged the Reception)."""
        while True:
            await trio.sleep(self.config.spool.scan_interval)
            fresh = await self.spool.scan_new()
            if fresh:
                if self.metrics is not None:
                    self.metrics.received(len(fresh))
                self._add_messages(fresh)

    async def enqueue(self, messages: Sequence[NewMessage]) -> list[str]:
        """Spool messages from inside the daemon (bounces) and queue them."""
        ids = await self.spool.enqueue(messages)
        queued = [m for m in map(self.spool.message, ids) if m is not None]
        header_ids = {i: message_id(m.body) for i, m in zip(ids, messages, strict=True)}
        self._record_events(reception_events(queued, header_ids=header_ids))
        if self.metrics is not None:
            self.metrics.received(len(queued))
        for message in queued:
            self.scheduler.add_all(split(message))
        self._update_gauges()
        self._wake()
        return ids

    def _wake(self) -> None:
        self._wake_dispatcher.set()

    # -- dispatch ----------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        async with trio.open_nursery() as lookups:
            while True:
                now = self.clock.now()
                due = self.scheduler.pop_due(now, DISPATCH_BATCH)
                if not due:
                    self._wake_dispatcher = trio.Event()
                    next_due = self.scheduler.next_due()
                    deadline = math.inf if next_due is None else self.clock.to_trio(next_due)
                    with trio.move_on_at(deadline):
                        await self._wake_dispatcher.wait()
                    continue
                self._in_flight += len(due)
                self._update_gauges()
                by_domain: dict[str, list[WorkItem]] = {}
                for item in due:
                    by_domain.setdefault(item.domain, []).append(item)
                for domain, items in by_domain.items():
                    lookups.start_soon(self._route_domain, domain, items)
                await trio.lowlevel.checkpoint()

    async def _route_domain(self, domain: str, items: list[WorkItem]) -> None:
        now = self.clock.now()
        families = self.pool.families(now)
        if not families:
            self._park(items, "every egress source is suspended")
            return
        try:
            destination = await self.resolver.resolve(domain, families=families)
        except MxPermanentError as exc:
            await self._fail_all(items, Answer("", "bounced", 550, "5.1.2", str(exc)), Route())
            return
        except MxError as exc:
            await self._fail_all(items, Answer("", "deferred", 451, "4.4.3", str(exc)), Route())
            return
        self._route(destination, items)

    def _route(self, destination: Destination, items: list[WorkItem]) -> None:
        """Give each item a source (weighted round robin, in an MX address family)."""
        now = self.clock.now()
        families = [c.address.version for c in destination.candidates]
        throttled = self._throttled_entries(destination.site)
        for item in items:
            entry = None
            for family in dict.fromkeys(families):  # best MX's family first
                entry = self.pool.choose(family, now, exclude=throttled)
                if entry is not None:
                    break
            if entry is None:
                self._park(
                    [item],
                    "no usable egress source for the MX addresses",
                    until=self._throttle_end(destination.site),
                )
                continue
            key = (str(entry.source), destination.site)
            queue = self._ready.get(key)
            if queue is None:
                queue = self._ready[key] = ReadyQueue(entry, destination)
                self._connections.start_soon(self._manage_path, queue)
            else:
                queue.destination = destination  # the freshest lookup wins
            queue.push([item])

    def _throttled_entries(self, site: str) -> list[PoolEntry]:
        """Pool entries whose path to ``site`` is suspended by throttle feedback now."""
        now = trio.current_time()
        for key in [k for k, until in self._suspended_paths.items() if until <= now]:
            del self._suspended_paths[key]
        return [
            entry
            for entry in self.config.pool
            if (str(entry.source), site) in self._suspended_paths
        ]

    def _throttle_end(self, site: str) -> float | None:
        """Wall time the first throttled path to ``site`` reopens, if any is throttled."""
        ends = [until for (_, s), until in self._suspended_paths.items() if s == site]
        if not ends:
            return None
        return self.clock.now() + (min(ends) - trio.current_time())

    def _park(self, items: list[WorkItem], reason: str, *, until: float | None = None) -> None:
        """No source can take these now: wait for the first suspension to end.

        Not an attempt (nothing was tried), so nothing is journaled: after a
        restart they are simply due again.
        """
        now = self.clock.now()
        resumes = [t for t in (self.pool.next_resume(now), until) if t is not None]
        resume = min(resumes) if resumes else now + LEASE_RETRY
        self.log.info("parked", count=len(items), reason=reason, until=resume)
        self._in_flight -= len(items)
        for item in items:
            self.scheduler.add(replace(item, next_attempt=resume))
        self._update_gauges()
        self._wake()

    def _reroute(self, items: list[WorkItem]) -> None:
        """Items of a path whose source failed go back through the dispatcher now."""
        self._in_flight -= len(items)
        now = self.clock.now()
        for item in items:
            self.scheduler.add(replace(item, next_attempt=now))
        self._update_gauges()
        self._wake()

    # -- paths and connections -----------------------------------------------------

    async def _manage_path(self, queue: ReadyQueue) -> None:
        """Open connections for ``queue`` while it has work, within shaping limits.

        One connection per TAKE_BATCH waiting items, up to the path's
        connection limit; each needs a shaping lease, which other nodes may
        hold. The manager sleeps until items arrive, a connection ends, or
        the lease retry interval passes.
        """
        source, site = queue.key
        try:
            while not self._stopping.is_set():
                if not queue.items and queue.connections == 0:
                    return  # idle path: forget it; the dispatcher makes a new one
                limits = self.config.shaping.limits_for(source, site)
                cap = limits.scopes[0].connection_limit or DEFAULT_CONNECTION_CAP
                wanted = min(cap, _ceil_div(len(queue.items), TAKE_BATCH))
                wait = LEASE_RETRY
                if queue.connections < wanted:
                    lease = await self.shaper.acquire_connection(source, site, limits)
                    if lease:
                        queue.connections += 1
                        self._connections.start_soon(self._run_connection, queue, lease, limits)
                        continue
                    if lease.reason is RefusalReason.SUSPENDED and queue.connections == 0:
                        self._route_around(queue, queue.take_all(), lease.retry_after)
                        continue
                    wait = min(max(lease.retry_after, 0.001), LEASE_RETRY)
                with trio.move_on_after(wait):
                    await _first(queue.changed, self._stopping.wait)
        finally:
            if self._ready.get(queue.key) is queue and queue.connections == 0:
                del self._ready[queue.key]
                if queue.items:  # stopping: hand them back untouched
                    self._in_flight -= len(queue.items)
                    queue.items.clear()

    async def _run_connection(self, queue: ReadyQueue, lease: Lease, limits: PathLimits) -> None:
        try:
            await self._connection(queue, lease, limits)
        finally:
            queue.connections -= 1
            queue.notify()
            with trio.CancelScope(shield=True), trio.move_on_after(QUIT_TIMEOUT):
                await self.shaper.release(lease)

    async def _connection(self, queue: ReadyQueue, lease: Lease, limits: PathLimits) -> None:
        entry = queue.entry
        try:
            connected = await self._connect(queue)
        except _SourceFailed as exc:
            self.pool.suspend(entry, self.clock.now(), exc.reason)
            self.log.warning("source_suspended", source=str(entry.source), reason=exc.reason)
            self._count_connection(entry, "source_refused")
            self._reroute(queue.take_all())
            return
        if isinstance(connected, Answer):  # no MX host of the site took us
            self._count_connection(entry, "failed")
            route = Route(str(entry.source), queue.destination.site)
            await self._fail_all(queue.take_all(), connected, route)
            return
        self.pool.succeeded(entry)
        self._count_connection(entry, "ok")
        session, candidate = connected.session, connected.candidate
        route = Route(
            connected.local, queue.destination.site, candidate.host, str(candidate.address)
        )
        sent = 0
        async with session:
            while sent < limits.max_deliveries_per_connection and not self._stopping.is_set():
                if not queue.items:  # idle: keep the connection for reuse a while
                    with trio.move_on_after(limits.idle_timeout):
                        await _first(queue.wait_for_items, self._stopping.wait)
                if not queue.items or self._stopping.is_set():
                    break
                batch = queue.take(min(TAKE_BATCH, limits.max_deliveries_per_connection - sent))
                done = await self._deliver_batch(session, queue, lease, limits, batch, route)
                sent += done
                if done < len(batch) or not session.usable:
                    break
            with trio.move_on_after(QUIT_TIMEOUT):
                await session.quit()

    async def _deliver_batch(
        self,
        session: SmtpSession,
        queue: ReadyQueue,
        lease: Lease,
        limits: PathLimits,
        batch: list[WorkItem],
        route: Route,
    ) -> int:
        """Deliver ``batch`` on ``session``; how many were attempted. The rest go back."""
        source, site = queue.key
        bodies = await self.spool.read_bodies([item.id for item in batch])
        for index, item in enumerate(batch):
            unattempted = batch[index:]
            if self._stopping.is_set() or not await self.shaper.extend(lease):
                queue.push_front(unattempted)
                return index
            wait = await self.shaper.take_messages(source, site, limits, 1)
            while wait > 0:
                if wait > limits.idle_timeout:
                    # Longer than we keep a connection idle: close it, and
                    # take the items out of the ready queue so that no new
                    # connection opens just to wait again.
                    await self._hold_back(queue, unattempted, wait)
                    return index
                # Sleep in steps shorter than the lease, extending it after
                # each: waits add up, and a lapsed lease lets another node
                # take the slot while this connection is still open.
                await trio.sleep(min(wait, limits.lease_ttl / 3))
                if not await self.shaper.extend(lease):
                    queue.push_front(unattempted)
                    return index
                wait = await self.shaper.take_messages(source, site, limits, 1)
            body = bodies.get(item.id)
            if body is None:
                # The spool could not read it back (it reported the damage):
                # retry later like any transient failure; expiry bounces it.
                unreadable = Answer("", "deferred", 451, "4.3.0", "spool record unreadable")
                await self._settle(
                    item, [_for(r, unreadable) for r in item.recipients], route, None
                )
                continue
            try:
                result = await session.deliver(Envelope(item.sender, item.recipients, body))
            except (ConnectionLostError, SmtpTimeoutError, trio.TooSlowError) as exc:
                # The server never answered for these recipients: defer them
                # (the message may have arrived: at-least-once, docs say so).
                reason = str(exc) or type(exc).__name__
                lost = Answer("", "deferred", 451, "4.4.2", reason)
                await self._settle(item, [_for(r, lost) for r in item.recipients], route, body)
                if isinstance(exc, ConnectionLostError) and exc.reply is not None:
                    await self._check_throttle(queue, [exc.reply])
                queue.push_front(batch[index + 1 :])
                return index + 1
            answers = [
                Answer(r.recipient, r.status, r.reply.code, r.reply.enhanced, r.reply.text)
                for r in result.recipients
            ]
            await self._settle(item, answers, route, body)
            replies = [r.reply for r in result.recipients]
            if result.data_reply is not None:
                replies.append(result.data_reply)
            if await self._check_throttle(queue, replies):
                queue.push_front(batch[index + 1 :])
                return index + 1
        return len(batch)

    def _route_around(self, queue: ReadyQueue, items: list[WorkItem], seconds: float) -> None:
        """A throttled path (this node or another saw "slow down"): routing
        avoids it for ``seconds``, so its items go to other sources or wait."""
        source, site = queue.key
        self._suspended_paths[queue.key] = trio.current_time() + seconds
        self.log.info("path_suspended", source=source, site=site, seconds=seconds)
        self._reroute(items)

    async def _hold_back(self, queue: ReadyQueue, items: list[WorkItem], wait: float) -> None:
        """Items whose path cannot send for ``wait`` seconds leave the ready queue:
        around a suspended path at once, or back to their scheduled queue until
        the message rate lets them go (not an attempt either way)."""
        items = items + queue.take_all()
        source, site = queue.key
        until = await self.shaper.suspended_until(source, site)
        if until is not None:
            self._route_around(queue, items, until - trio.current_time())
        else:
            self._park(items, f"path {source}->{site} message rate", until=self.clock.now() + wait)

    async def _check_throttle(self, queue: ReadyQueue, replies: Sequence[SmtpReply]) -> bool:
        """Throttle feedback: a reply that says "slow down" suspends the path
        on every node (through the shaper) for the rule's duration."""
        for reply in replies:
            if reply.code < 400:
                continue
            rule = self.config.shaping.throttle_match(str(reply))
            if rule is None:
                continue
            source, site = queue.key
            until = trio.current_time() + rule.duration
            await self.shaper.suspend(source, site, until, str(reply))
            self._suspended_paths[queue.key] = until
            self.log.warning(
                "path_throttled",
                source=source,
                site=site,
                seconds=rule.duration,
                reply=str(reply),
            )
            if self.metrics is not None:
                self.metrics.throttled(source)
            return True
        return False

    async def _connect(self, queue: ReadyQueue) -> _Connected | Answer:
        """A session on the best reachable MX of the path's family, or why none.

        Raises :class:`_SourceFailed` when the pool entry itself is the problem.
        """
        entry = queue.entry
        last = Answer("", "deferred", 451, "4.4.1", "no MX address in the source's family")
        for candidate in queue.destination.candidates:
            if candidate.address.version != entry.source.version:
                continue
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    connection = await open_egress(
                        egress_path(entry), (candidate.address, candidate.port)
                    )
            except (SourceRefusedError, ProxyAuthError, ProxyUnreachableError) as exc:
                raise _SourceFailed(f"{type(exc).__name__}: {exc}") from exc
            except (EgressError, trio.TooSlowError) as exc:
                last = Answer("", "deferred", 451, "4.4.1", _describe(candidate, exc))
                continue
            try:
                session = await SmtpSession.start(
                    connection.stream,
                    ehlo=entry.ehlo,
                    tls=TlsMode(self.config.smtp.tls),
                    tls_context=self._tls_context,
                    timeouts=self._timeouts,
                )
            except SmtpError as exc:
                # Refused at the greeting or EHLO: the server spoke for every
                # recipient; the next MX may still take them (RFC 5321 §5.1).
                await trio.aclose_forcefully(connection.stream)
                await self._check_throttle(queue, [exc.reply])
                status = "bounced" if exc.reply.is_permanent else "deferred"
                reply = exc.reply
                last = Answer("", status, reply.code, reply.enhanced, _describe(candidate, exc))
                continue
            except _DESTINATION_FAILURES as exc:
                await trio.aclose_forcefully(connection.stream)
                if isinstance(exc, ConnectionLostError) and exc.reply is not None:
                    await self._check_throttle(queue, [exc.reply])
                last = Answer("", "deferred", 451, "4.4.2", _describe(candidate, exc))
                continue
            return _Connected(session, candidate, str(connection.local[0]))
        return last

    # -- outcomes ----------------------------------------------------------------

    async def _fail_all(self, items: list[WorkItem], answer: Answer, route: Route) -> None:
        for item in items:
            await self._settle(item, [_for(r, answer) for r in item.recipients], route, None)

    async def _settle(
        self, item: WorkItem, answers: list[Answer], route: Route, body: bytes | None
    ) -> None:
        now = self.clock.now()
        outcome = settle(
            item,
            answers,
            route,
            now=now,
            policy=self.config.retry,
            rng=self.rng,
            header_message_id=message_id(body) if body is not None else None,
        )
        if outcome.failed and self.config.bounces.enabled:
            # The report is spooled before the recipients are marked done: a
            # crash in between repeats the bounce, it never loses it.
            await self._bounce(item, outcome, body, now)
        await self.spool.record(outcome.ops)
        self._record_events(outcome.events)
        self._in_flight -= 1
        if outcome.retry is not None:
            self.scheduler.add(outcome.retry)
            self._wake()
        self._count(outcome, route, now - item.received)
        self._update_gauges()

    async def _bounce(
        self, item: WorkItem, outcome: Settlement, body: bytes | None, now: float
    ) -> None:
        if body is None:
            body = (await self.spool.read_bodies([item.id])).get(item.id, b"")
        headers = body.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in body else body.split(b"\n\n")[0]
        try:
            report = build_bounce(
                original_sender=item.sender,
                original_headers=headers,
                original_message_id=header_value(body, "Message-ID"),
                spool_id=item.id,
                recipients=outcome.failed,
                reporting_mta=self.config.bounces.reporting_mta,
                arrival=item.received,
                now=now,
                postmaster=self.config.bounces.postmaster,
            )
        except ValueError as exc:  # a sender no report can be addressed to
            self.log.warning("bounce_not_sent", id=item.id, sender=item.sender, error=str(exc))
            return
        await self.enqueue([NewMessage("", (item.sender,), report)])

    def _record_events(self, events: Sequence[Event]) -> None:
        """The event log is a record, the spool is the truth: a failing log
        (disk full) is reported, once per failure streak, and delivery goes on."""
        try:
            self.events.write(events)
        except OSError as exc:
            if not self._event_log_failing:
                self.log.error("event_log_failed", error=str(exc))
            self._event_log_failing = True
        else:
            self._event_log_failing = False

    def _count(self, outcome: Settlement, route: Route, latency: float) -> None:
        if self.metrics is None:
            return
        source = route.source
        for _ in outcome.delivered:
            self.metrics.delivered(source, latency)
        for _ in outcome.deferred:
            self.metrics.deferred(source)
        for _ in outcome.bounced:
            self.metrics.bounced(source)
        for _ in outcome.expired:
            self.metrics.expired(source)

    def _count_connection(self, entry: PoolEntry, outcome: ConnectionOutcome) -> None:
        if self.metrics is not None:
            self.metrics.connection(str(entry.source), outcome)

    def _update_gauges(self) -> None:
        """After every change of the queue: gauges, and the idle signal."""
        if len(self.scheduler) == 0 and self._in_flight == 0:
            self._idle.set()
        elif self._idle.is_set():
            self._idle = trio.Event()
        if self.metrics is not None:
            self.metrics.set_queue(len(self.scheduler), self._in_flight)
            self.metrics.set_suspended(len(self.pool.suspended(self.clock.now())))


def _for(recipient: str, answer: Answer) -> Answer:
    return Answer(recipient, answer.status, answer.code, answer.enhanced, answer.text)


def _describe(candidate: MxCandidate, exc: BaseException) -> str:
    return f"{candidate.host} [{candidate.address}]: {exc or type(exc).__name__}"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


async def _first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as the first of ``waits`` returns; cancel the others."""
    async with trio.open_nursery() as nursery:

        async def run(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(run, wait)
