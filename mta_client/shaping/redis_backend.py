"""The Redis shaping backend: limits shared by every node of the egress pool.

Every decision is one Lua script, so it is atomic on the server, and reads
the clock with ``redis.call('TIME')``: Redis's own clock, so the nodes'
clocks never matter (Redis 5+ replicates scripts by their effects, which is
what makes a non-deterministic ``TIME`` legal before a write). Times are
integer microseconds (an epoch in microseconds, about 1.8e15, is exact in a
Lua double, which holds integers up to 2^53).

Keys (``P`` is ``key_prefix``; a scope key is ``source->site`` or
``source->provider:<name>``)::

    P lease:<scope>    ZSET  lease id -> expiry (µs); PEXPIRE'd to the newest expiry
    P crate:<scope>    STR   connection-rate GCRA TAT (µs); PEXPIRE'd to the TAT
    P mrate:<scope>    STR   message-rate GCRA TAT (µs);    PEXPIRE'd to the TAT
    P suspend:<path>   STR   the reason; PX = the suspension
    P nodes            ZSET  node id -> last heartbeat (µs)

A key that expired means exactly what its absence means (a TAT in the past
is an idle bucket, an empty set has room), so nothing needs cleaning up.

All keys of one connection (the path's and the provider's) are read and
written by one script, all or nothing. Under Redis Cluster they would have to
share a hash slot; this backend targets a single Redis (or a primary with
replicas).

The calls do not bound their own time: the caller wraps each in
``trio.fail_after`` (the :class:`~mta_client.shaping.shaper.Shaper` does), and
a failure surfaces as :data:`REDIS_DOWN` exceptions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Final, Self

import coredis
import coredis.exceptions
import trio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from coredis.commands.script import Script
from coredis.connection import TCPConnection, UnixDomainSocketConnection
from coredis.retry import NoRetryPolicy

from mta_client.shaping.backend import LEASE_RETRY_HINT, RefusalReason, Refused, Suspension
from mta_client.shaping.rules import PathLimits, Scope

__all__ = ["REDIS_DOWN", "RedisBackend"]

#: What "Redis cannot be reached" looks like: refused, reset, timed out,
#: still loading its data set after a restart.
REDIS_DOWN: Final = (
    coredis.exceptions.ConnectionError,
    TimeoutError,
    trio.TooSlowError,
    OSError,
)

_US: Final = 1_000_000

# Shared Lua: the clock and GCRA (the arithmetic of mta_client.shaping.gcra,
# in microseconds). A refused request returns the wait and changes nothing.
_PRELUDE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function gcra(key, interval, burst, quantity)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local allow_at = tat + math.min(0, quantity - burst) * interval
  if allow_at <= now then
    return true, tat + quantity * interval
  end
  return false, allow_at - now
end

local function store_tat(key, tat)
  local ms = math.max(1, math.ceil((tat - now) / 1000))
  redis.call('SET', key, string.format('%.0f', math.ceil(tat)), 'PX', ms)
end

local function suspended(key)
  local pttl = redis.call('PTTL', key)
  if pttl > 0 then return pttl * 1000 end
  return 0
end

-- Does lease id hold, or can it take, a slot in the set? (prunes first)
local function has_room(key, id, limit)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZSCORE', key, id) or redis.call('ZCARD', key) < limit
end

local function hold(key, id, ttl)
  redis.call('ZADD', key, string.format('%.0f', now + ttl), id)
  local ms = math.ceil(ttl / 1000)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: suspension, nlease lease sets, connection-rate TATs.
# ARGV: lease id, ttl µs, nlease, limit x nlease, (interval µs, burst) x rates.
# Returns {0, 0} granted, {1, µs} suspended, {2, µs to earliest expiry} full,
# {3, µs} connection rate.
_ACQUIRE: Final = (
    _PRELUDE
    + """
local id, ttl, nlease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local wait = suspended(KEYS[1])
if wait > 0 then return {1, wait} end
for i = 1, nlease do
  local key = KEYS[1 + i]
  if not has_room(key, id, tonumber(ARGV[3 + i])) then
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return {2, math.ceil(tonumber(first[2]) - now)}
  end
end
local worst, tats = 0, {}
for j = 2 + nlease, #KEYS do
  local a = 4 + nlease + 2 * (j - 2 - nlease)
  local ok, value = gcra(KEYS[j], tonumber(ARGV[a]), tonumber(ARGV[a + 1]), 1)
  if ok then tats[j] = value elseif value > worst then worst = value end
end
if worst > 0 then return {3, math.ceil(worst)} end
for j, tat in pairs(tats) do store_tat(KEYS[j], tat) end
for i = 1, nlease do hold(KEYS[1 + i], id, ttl) end
return {0, 0}
"""
)

# KEYS: lease sets. ARGV: lease id, ttl µs, limit x sets. Returns 1 or 0.
_EXTEND: Final = (
    _PRELUDE
    + """
local id, ttl = ARGV[1], tonumber(ARGV[2])
local room = true
for i = 1, #KEYS do
  if not has_room(KEYS[i], id, tonumber(ARGV[2 + i])) then room = false end
end
for i = 1, #KEYS do
  if room then hold(KEYS[i], id, ttl) else redis.call('ZREM', KEYS[i], id) end
end
if room then return 1 end
return 0
"""
)

# KEYS: lease sets. ARGV: lease id.
_RELEASE: Final = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 0
"""

# KEYS: suspension, message-rate TATs. ARGV: n, (interval µs, burst) x rates.
# Returns 0 (taken) or the µs to wait.
_TAKE: Final = (
    _PRELUDE
    + """
local n = tonumber(ARGV[1])
local wait = suspended(KEYS[1])
if wait > 0 then return wait end
local worst, tats = 0, {}
for j = 2, #KEYS do
  local a = 2 * (j - 1)
  local ok, value = gcra(KEYS[j], tonumber(ARGV[a]), tonumber(ARGV[a + 1]), n)
  if ok then tats[j] = value elseif value > worst then worst = value end
end
if worst > 0 then return math.ceil(worst) end
for j, tat in pairs(tats) do store_tat(KEYS[j], tat) end
return 0
"""
)

# KEYS: suspension. ARGV: ms, reason. Never shortens a running suspension.
_SUSPEND: Final = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
return 0
"""

# KEYS: suspension. Returns {ms, reason} or nil.
_SUSPENSION: Final = """
local pttl = redis.call('PTTL', KEYS[1])
if pttl <= 0 then return false end
return {pttl, redis.call('GET', KEYS[1])}
"""

# KEYS: the node set. ARGV: node id, node ttl µs. Returns the live node count.
_HEARTBEAT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - ttl))
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000))
return redis.call('ZCARD', KEYS[1])
"""


def _close_buffers(connection: object) -> None:
    # coredis 6.9 makes a connection's in-memory buffers in __init__ and
    # closes them only once it has connected; after a failed connect (Redis
    # down) they are left open and anyio warns (ResourceWarning) when they
    # are collected, which is every call during an outage. Closing twice is
    # harmless.
    for value in vars(connection).values():
        if isinstance(value, MemoryObjectSendStream | MemoryObjectReceiveStream):
            value.close()


class _TCPConnection(TCPConnection):
    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await super().run(task_status=task_status)
        finally:
            _close_buffers(self)


class _UnixConnection(UnixDomainSocketConnection):
    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await super().run(task_status=task_status)
        finally:
            _close_buffers(self)


def _us(seconds: float) -> int:
    return math.ceil(seconds * _US)


def _rate_args(rate_interval: float, burst: int) -> list[str]:
    # Fractional microseconds are kept: 1/3 s is 333333.33… µs, and rounding
    # it would drift a slow rate by a whole count over a long period.
    return [repr(rate_interval * _US), str(burst)]


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise coredis.exceptions.InvalidResponse(f"expected an integer, got {value!r}")
    return value


class RedisBackend:
    """Shared counters in one Redis; use as ``async with RedisBackend(...) as backend``.

    ``url`` (``redis://host:port/db``) wins over ``host`` and ``port``.
    ``node_id`` names this node in the heartbeat set.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        key_prefix: str = "mta:",
        node_id: str,
        connect_timeout: float = 1.0,
    ) -> None:
        self.key_prefix = key_prefix
        self.node_id = node_id
        # No retries inside the client: a script is not idempotent (it may
        # have run before the connection broke), and the Shaper decides what
        # a failure means.
        if url is not None:
            self.client: coredis.Redis[bytes] = coredis.Redis.from_url(
                url,
                connect_timeout=connect_timeout,
                stream_timeout=connect_timeout,
                retry_policy=NoRetryPolicy(),
            )
        else:
            self.client = coredis.Redis(
                host=host,
                port=port,
                connect_timeout=connect_timeout,
                stream_timeout=connect_timeout,
                retry_policy=NoRetryPolicy(),
            )
        pool = self.client.connection_pool
        if pool.connection_class is TCPConnection:
            pool.connection_class = _TCPConnection
        elif pool.connection_class is UnixDomainSocketConnection:
            pool.connection_class = _UnixConnection
        self._stack = AsyncExitStack()
        register = self.client.register_script
        self._acquire: Script[bytes] = register(_ACQUIRE)
        self._extend: Script[bytes] = register(_EXTEND)
        self._release: Script[bytes] = register(_RELEASE)
        self._take: Script[bytes] = register(_TAKE)
        self._suspend: Script[bytes] = register(_SUSPEND)
        self._suspension: Script[bytes] = register(_SUSPENSION)
        self._heartbeat: Script[bytes] = register(_HEARTBEAT)

    async def __aenter__(self) -> Self:
        # Entering the client does not connect: a Redis that is down now is
        # found out by the first call, like one that goes down later.
        await self._stack.enter_async_context(self.client)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    # -- keys

    def _key(self, kind: str, name: str) -> str:
        return f"{self.key_prefix}{kind}:{name}"

    def _lease_scopes(self, limits: PathLimits) -> list[Scope]:
        return [s for s in limits.scopes if s.connection_limit is not None]

    # -- ShapingBackend

    async def acquire(self, lease_id: str, limits: PathLimits) -> Refused | None:
        """See :meth:`ShapingBackend.acquire`."""
        held = self._lease_scopes(limits)
        rated = [s for s in limits.scopes if s.connection_rate is not None]
        keys = [self._key("suspend", limits.path_key)]
        keys += [self._key("lease", s.key) for s in held]
        keys += [self._key("crate", s.key) for s in rated]
        args = [lease_id, str(_us(limits.lease_ttl)), str(len(held))]
        args += [str(s.connection_limit) for s in held]
        for s in rated:
            assert s.connection_rate is not None
            args += _rate_args(s.connection_rate.interval, s.connection_burst)
        result: object = await self._acquire(keys=keys, args=args)
        if not isinstance(result, list) or len(result) != 2:
            raise coredis.exceptions.InvalidResponse(f"acquire: {result!r}")
        code, wait_us = _int(result[0]), _int(result[1])
        wait = wait_us / _US
        if code == 0:
            return None
        if code == 1:
            return Refused(RefusalReason.SUSPENDED, wait)
        if code == 2:
            return Refused(RefusalReason.CONNECTION_LIMIT, min(LEASE_RETRY_HINT, wait))
        return Refused(RefusalReason.CONNECTION_RATE, wait)

    async def extend(self, lease_id: str, limits: PathLimits) -> bool:
        """See :meth:`ShapingBackend.extend`."""
        held = self._lease_scopes(limits)
        if not held:
            return True
        keys = [self._key("lease", s.key) for s in held]
        args = [lease_id, str(_us(limits.lease_ttl))]
        args += [str(s.connection_limit) for s in held]
        return _int(await self._extend(keys=keys, args=args)) == 1

    async def release(self, lease_id: str, limits: PathLimits) -> None:
        """See :meth:`ShapingBackend.release`."""
        keys = [self._key("lease", s.key) for s in self._lease_scopes(limits)]
        if keys:
            await self._release(keys=keys, args=[lease_id])

    async def take(self, limits: PathLimits, n: int) -> float:
        """See :meth:`ShapingBackend.take`."""
        if n < 1:
            raise ValueError("n must be >= 1")
        rated = [s for s in limits.scopes if s.message_rate is not None]
        keys = [self._key("suspend", limits.path_key)]
        keys += [self._key("mrate", s.key) for s in rated]
        args = [str(n)]
        for s in rated:
            assert s.message_rate is not None
            args += _rate_args(s.message_rate.interval, s.message_burst)
        return _int(await self._take(keys=keys, args=args)) / _US

    async def suspend(self, key: str, duration: float, reason: str) -> None:
        """See :meth:`ShapingBackend.suspend`."""
        ms = max(1, math.ceil(duration * 1000))
        await self._suspend(keys=[self._key("suspend", key)], args=[str(ms), reason])

    async def suspension(self, key: str) -> Suspension | None:
        """See :meth:`ShapingBackend.suspension`."""
        result: object = await self._suspension(keys=[self._key("suspend", key)], args=[])
        if result is None:
            return None
        if not isinstance(result, list) or len(result) != 2:
            raise coredis.exceptions.InvalidResponse(f"suspension: {result!r}")
        reason = result[1]
        text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        return Suspension(_int(result[0]) / 1000, text)

    # -- nodes

    async def heartbeat(self, node_ttl: float) -> int:
        """Mark this node alive for ``node_ttl`` seconds; returns how many nodes are."""
        keys = [f"{self.key_prefix}nodes"]
        return _int(await self._heartbeat(keys=keys, args=[self.node_id, str(_us(node_ttl))]))

    async def leave(self) -> None:
        """Take this node out of the live count (a clean shutdown)."""
        await self.client.zrem(f"{self.key_prefix}nodes", [self.node_id])

    async def lease_count(self, scope_key: str) -> int:
        """Leases under ``scope_key``, expired ones included until pruned (tests, metrics)."""
        return await self.client.zcard(self._key("lease", scope_key))

    async def ping(self) -> None:
        await self.client.ping()


def script_sources() -> Sequence[str]:
    """Every Lua script (for tests that lint or load them)."""
    return (_ACQUIRE, _EXTEND, _RELEASE, _TAKE, _SUSPEND, _SUSPENSION, _HEARTBEAT)
