"""The Shaper: what the delivery daemon asks before it connects and before it sends.

One egress path is (source IP, site). Before opening a connection the daemon
calls :meth:`Shaper.acquire_connection` and gets a :class:`Lease` (or a
:class:`Refused` saying when to ask again); before every message it calls
:meth:`Shaper.extend` (False: the lease is lost, close the connection) and
:meth:`Shaper.take_messages` (0.0: send; else wait that long); when the
connection closes, :meth:`Shaper.release`. Throttle replies become
:meth:`Shaper.suspend`, which every node sees.

Shared and local mode. With Redis (:func:`open_shaper` with a
:class:`RedisConfig`), every node of the pool counts in one Redis, so limits
hold for each source IP as a whole. Every Redis call is bounded by
``call_timeout`` (1 s). When one fails (refused, reset, timed out), the
Shaper switches to *local* mode: an in-memory backend in which every limit
is divided by the number of live nodes last seen (connection limits rounded
down, at least 1; rates divided), so that N isolated nodes together stay
within the limit. The switch is logged once (``shaping_fallback``), counted
(:attr:`Shaper.fallbacks`) and reported to ``on_mode_change("local")``. A
background task (:meth:`Shaper.run`) heartbeats every ``node_ttl / 3`` in
shared mode and, in local mode, tries Redis again every ``retry_interval``
(5 s); when Redis answers it hands over what happened meanwhile (releases of
shared leases it could not send, local suspensions) and returns to shared
mode (``shaping_shared``, :attr:`Shaper.recoveries`, ``on_mode_change("shared")``).

Leases across a switch. A lease lives in the backend that granted it, and
:meth:`Shaper.extend` always extends in the *current* mode's backend, taking
the lease there if it is not held there yet, when there is room (counting
like a new lease); otherwise it returns False and the connection must close.
So:

* shared -> local: the node's open connections are counted in its local
  share at once (adopted, even over the share). A node holding more than
  its share closes the excess, one connection at its next message each; and
  no node opens a new connection for ``fallback_grace`` (10 s) after its
  switch, so the over-share nodes shed first. The source therefore stays
  within its limit as long as a message takes less than the grace. Redis
  slots are freed when Redis answers again, or expire after ``lease_ttl``.
* local -> shared: new connections are counted in Redis at once; each
  connection opened during the outage moves into Redis at its next
  message, or is closed if Redis has no room. Until then it is counted
  nowhere, so for at most one message time plus ``idle_timeout`` (an idle
  pooled connection sends nothing), a source may hold up to its local
  connections on top of the Redis limit: at most about twice the limit.
* Redis restarted empty: every open connection re-takes its slot at its next
  message while there is room; the rest close.

Between heartbeats a node believes in the live-node count it last saw; a
node that starts while Redis is down assumes ``initial_nodes`` (1).
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Final, Literal, TypeVar

import structlog
import trio

from mta_client.shaping.backend import LEASE_RETRY_HINT, Lease, RefusalReason, Refused
from mta_client.shaping.memory import MemoryBackend
from mta_client.shaping.redis_backend import REDIS_DOWN, RedisBackend
from mta_client.shaping.rules import PathLimits, RedisConfig, canonical_source, path_key

__all__ = [
    "CALL_TIMEOUT",
    "RETRY_INTERVAL",
    "Mode",
    "Shaper",
    "default_node_id",
    "open_shaper",
]

Mode = Literal["shared", "local"]

#: The deadline of one Redis call; past it, Redis counts as unreachable.
CALL_TIMEOUT: Final = 1.0
#: How often a node in local mode tries Redis again.
RETRY_INTERVAL: Final = 5.0
#: After a switch to local mode, no new connection for this long: nodes over
#: their local share close their excess first (one message time each).
FALLBACK_GRACE: Final = 10.0
#: Releases of shared leases kept while Redis is away; beyond this the
#: oldest are dropped (their leases then expire after ``lease_ttl``).
MAX_PENDING_RELEASES: Final = 10_000

T = TypeVar("T")


class _SharedDown(Exception):
    """Redis did not answer; the Shaper has switched to local mode."""


def default_node_id() -> str:
    """``host-pid-random``: unique per process, readable in ``redis-cli``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Shaper:
    """Connection leases, message rates and suspensions for every egress path.

    ``shared`` is the Redis backend (``None``: one node, in memory). See the
    module docstring for shared and local mode. Counters for metrics:
    :attr:`fallbacks` (switches to local mode), :attr:`recoveries` (back to
    shared), :attr:`redis_errors` (failed Redis calls); :attr:`mode` and
    :attr:`live_nodes` are the current state.
    """

    def __init__(
        self,
        shared: RedisBackend | None = None,
        *,
        local: MemoryBackend | None = None,
        node_ttl: float = 30.0,
        call_timeout: float = CALL_TIMEOUT,
        retry_interval: float = RETRY_INTERVAL,
        heartbeat_interval: float | None = None,
        on_mode_change: Callable[[Mode], None] | None = None,
        initial_nodes: int = 1,
        fallback_grace: float = FALLBACK_GRACE,
    ) -> None:
        self._shared = shared
        self._fallback_grace = fallback_grace
        self._grace_until = -math.inf
        self._local = local if local is not None else MemoryBackend()
        self._node_ttl = node_ttl
        self._call_timeout = call_timeout
        self._retry_interval = retry_interval
        self._heartbeat_interval = (
            heartbeat_interval if heartbeat_interval is not None else node_ttl / 3
        )
        self._on_mode_change = on_mode_change
        self.node_id = shared.node_id if shared is not None else "local"
        self.mode: Mode = "shared" if shared is not None else "local"
        self.live_nodes = max(1, initial_nodes)
        self.fallbacks = 0
        self.recoveries = 0
        self.redis_errors = 0
        self._homes: dict[str, Mode] = {}
        #: Every lease this node holds, by id (the fallback adopts them).
        self._held: dict[str, Lease] = {}
        self._pending_releases: deque[Lease] = deque(maxlen=MAX_PENDING_RELEASES)
        # A fresh token per process: a node restarted under the same id must
        # not find its predecessor's leases and count them as its own.
        self._lease_prefix = f"{self.node_id}:{secrets.token_hex(4)}:"
        self._counter = itertools.count(1)
        self._log = structlog.get_logger("mta_client.shaping")

    @property
    def local(self) -> MemoryBackend:
        """The in-memory backend (all state in single-node and local mode)."""
        return self._local

    # -- the daemon's API

    async def acquire_connection(
        self, source: str, site: str, limits: PathLimits
    ) -> Lease | Refused:
        """A lease to open one connection on the path, or when to ask again.

        Refused when the path is suspended, at a connection limit, or at a
        connection rate (of the path or of its provider).
        """
        self._check(source, site, limits)
        lease_id = f"{self._lease_prefix}{next(self._counter)}"
        shared = self._shared
        if shared is not None and self.mode == "shared":
            try:
                refused = await self._call(lambda: shared.acquire(lease_id, limits))
            except _SharedDown:
                pass
            else:
                if refused is None:
                    self._homes[lease_id] = "shared"
                    lease = self._held[lease_id] = Lease(lease_id, limits)
                    return lease
                return refused
        grace = self._grace_until - trio.current_time()
        if grace > 0:
            # Just fell back: nodes over their share shed connections first.
            return Refused(RefusalReason.CONNECTION_LIMIT, min(grace, LEASE_RETRY_HINT))
        refused = await self._local.acquire(lease_id, self._local_limits(limits))
        if refused is None:
            self._homes[lease_id] = "local"
            lease = self._held[lease_id] = Lease(lease_id, limits)
            return lease
        return refused

    async def extend(self, lease: Lease) -> bool:
        """Keep the lease for another ``lease_ttl``; call before every message.

        False: the lease is lost (released, or expired and its slot taken, or
        no room in the backend it had to move to): close the connection.
        """
        home = self._homes.get(lease.lease_id)
        if home is None:
            return False
        held: bool | None = None
        where: Mode = "local"
        shared = self._shared
        if shared is not None and self.mode == "shared":
            try:
                held = await self._call(lambda: shared.extend(lease.lease_id, lease.limits))
                where = "shared"
            except _SharedDown:
                pass
        if held is None:
            held = await self._local.extend(lease.lease_id, self._local_limits(lease.limits))
        if where != home:
            await self._forget(home, lease)
        elif where == "shared":
            # A copy adopted during an outage is no longer needed locally.
            await self._local.release(lease.lease_id, lease.limits)
        if held:
            self._homes[lease.lease_id] = where
        else:
            self._homes.pop(lease.lease_id, None)
            self._held.pop(lease.lease_id, None)
        return held

    async def release(self, lease: Lease) -> None:
        """Free the lease (the connection closed). Releasing twice is harmless."""
        home = self._homes.pop(lease.lease_id, None)
        self._held.pop(lease.lease_id, None)
        if home is not None:
            await self._forget(home, lease)

    async def take_messages(self, source: str, site: str, limits: PathLimits, n: int = 1) -> float:
        """Take ``n`` message tokens: 0.0 means send now; otherwise wait that
        many seconds and ask again (nothing was taken). A suspended path waits
        out its suspension."""
        self._check(source, site, limits)
        if n < 1:
            raise ValueError("n must be >= 1")
        shared = self._shared
        if shared is not None and self.mode == "shared":
            try:
                return await self._call(lambda: shared.take(limits, n))
            except _SharedDown:
                pass
        return await self._local.take(self._local_limits(limits), n)

    async def suspend(self, source: str, site: str, until: float, reason: str) -> None:
        """Suspend the path until ``until`` (trio clock) on every node.

        A running longer suspension is never shortened.
        """
        duration = until - trio.current_time()
        if duration <= 0:
            return
        key = path_key(canonical_source(source), site)
        # Kept locally too, so that it survives a switch to local mode.
        await self._local.suspend(key, duration, reason)
        shared = self._shared
        if shared is not None and self.mode == "shared":
            with suppress(_SharedDown):
                await self._call(lambda: shared.suspend(key, duration, reason))

    async def suspended_until(self, source: str, site: str) -> float | None:
        """When the path's suspension ends (trio clock), or None."""
        key = path_key(canonical_source(source), site)
        shared = self._shared
        if shared is not None and self.mode == "shared":
            try:
                found = await self._call(lambda: shared.suspension(key))
            except _SharedDown:
                pass
            else:
                return None if found is None else trio.current_time() + found.remaining
        found = await self._local.suspension(key)
        return None if found is None else trio.current_time() + found.remaining

    # -- the background task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat, and in local mode retry Redis; started once the first
        heartbeat has decided the mode. Returns at once without Redis."""
        if self._shared is None:
            task_status.started()
            return
        await self.heartbeat()
        task_status.started()
        while True:
            shared_mode = self.mode == "shared"
            await trio.sleep(self._heartbeat_interval if shared_mode else self._retry_interval)
            await self.heartbeat()

    async def leave(self) -> None:
        """Tell Redis this node is gone (best effort, bounded by ``call_timeout``)."""
        shared = self._shared
        if shared is None:
            return
        with trio.move_on_after(self._call_timeout):
            try:
                await shared.leave()
            except REDIS_DOWN:
                self.redis_errors += 1

    # -- internals

    def _check(self, source: str, site: str, limits: PathLimits) -> None:
        if canonical_source(source) != limits.source or site != limits.site:
            raise ValueError(f"limits are for {limits.path_key}, not {source}->{site}")

    def _local_limits(self, limits: PathLimits) -> PathLimits:
        return limits if self._shared is None else limits.divided(self.live_nodes)

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        with trio.fail_after(self._call_timeout):
            return await call()

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """One Redis call; on failure switch to local mode and raise _SharedDown."""
        try:
            return await self._bounded(call)
        except REDIS_DOWN as exc:
            self._fall_back(exc)
            raise _SharedDown from exc

    async def _forget(self, home: Mode, lease: Lease) -> None:
        shared = self._shared
        if home == "local":
            await self._local.release(lease.lease_id, lease.limits)
        elif shared is not None and self.mode == "shared":
            try:
                await self._call(lambda: shared.release(lease.lease_id, lease.limits))
            except _SharedDown:
                self._pending_releases.append(lease)
        else:
            self._pending_releases.append(lease)

    async def heartbeat(self) -> None:
        """One heartbeat now (what :meth:`run` does periodically): refresh the
        live-node count; in local mode, hand over to Redis and return to
        shared mode if it answers."""
        shared = self._shared
        if shared is None:
            return
        try:
            live = await self._bounded(lambda: shared.heartbeat(self._node_ttl))
            if self.mode == "local":
                await self._hand_over(shared)
        except REDIS_DOWN as exc:
            self._fall_back(exc)
            return
        self.live_nodes = max(1, live)
        if self.mode == "local":
            self.mode = "shared"
            self.recoveries += 1
            self._log.info("shaping_shared", node=self.node_id, live_nodes=self.live_nodes)
            if self._on_mode_change is not None:
                self._on_mode_change("shared")

    async def _hand_over(self, shared: RedisBackend) -> None:
        """Tell Redis what happened while it was away (raises REDIS_DOWN)."""
        while self._pending_releases:
            lease = self._pending_releases[0]
            await self._bounded(partial(shared.release, lease.lease_id, lease.limits))
            self._pending_releases.popleft()
        for key, suspension in self._local.suspensions().items():
            await self._bounded(
                partial(shared.suspend, key, suspension.remaining, suspension.reason)
            )

    def _fall_back(self, exc: BaseException) -> None:
        self.redis_errors += 1
        if self.mode == "local":
            return
        self.mode = "local"
        self.fallbacks += 1
        self._grace_until = trio.current_time() + self._fallback_grace
        # The connections this node opened in shared mode are still open:
        # count them against the local share from the first moment, so that
        # no new one opens until the node is under its share. (Every node
        # was within the shared limit at the switch, so the source stays
        # within it too.)
        for lease_id, home in self._homes.items():
            if home == "shared":
                lease = self._held[lease_id]
                self._local.adopt(lease_id, self._local_limits(lease.limits))
        self._log.warning(
            "shaping_fallback",
            node=self.node_id,
            error=f"{type(exc).__name__}: {exc}",
            live_nodes=self.live_nodes,
        )
        if self._on_mode_change is not None:
            self._on_mode_change("local")


@asynccontextmanager
async def open_shaper(
    redis: RedisConfig | None,
    *,
    node_id: str | None = None,
    on_mode_change: Callable[[Mode], None] | None = None,
    call_timeout: float = CALL_TIMEOUT,
    retry_interval: float = RETRY_INTERVAL,
    heartbeat_interval: float | None = None,
    initial_nodes: int = 1,
    fallback_grace: float = FALLBACK_GRACE,
) -> AsyncIterator[Shaper]:
    """A running Shaper: in memory without ``redis``; else connected, with its
    heartbeat task started (the first heartbeat has decided the mode).
    On exit the node leaves the live-node count."""
    if redis is None:
        yield Shaper()
        return
    backend = RedisBackend(
        redis.url,
        key_prefix=redis.key_prefix,
        node_id=node_id or default_node_id(),
        connect_timeout=call_timeout,
    )
    async with backend:
        shaper = Shaper(
            backend,
            node_ttl=redis.node_ttl,
            call_timeout=call_timeout,
            retry_interval=retry_interval,
            heartbeat_interval=heartbeat_interval,
            on_mode_change=on_mode_change,
            initial_nodes=initial_nodes,
            fallback_grace=fallback_grace,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(shaper.run)
            try:
                yield shaper
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await shaper.leave()
