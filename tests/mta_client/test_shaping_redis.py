"""The Redis backend against a real redis-server, and the Shaper's fallback when it goes away.

Redis decides with its own clock (``TIME``), which is real time: these tests
run on trio's real clock. Decisions are compared where timing does not
matter (lease counts, bursts at one instant, rates slow enough not to refill
during the test), and rate behaviour over short real windows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import pytest
import structlog.testing
import trio

from mta_client.shaping import (
    Lease,
    MemoryBackend,
    Mode,
    PathLimits,
    Rate,
    RedisBackend,
    RedisConfig,
    RefusalReason,
    Refused,
    Scope,
    Shaper,
    ShapingBackend,
    open_shaper,
)
from tests.mta_client.redisserver import RedisServer, redis_server

SRC = "192.0.2.1"
SITE = "mx1.example.test"
PREFIX = "test:"


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path) as server:
        yield server


def limits(
    *,
    connection_limit: int | None = None,
    connection_rate: Rate | None = None,
    connection_burst: int = 1,
    message_rate: Rate | None = None,
    message_burst: int = 1,
    lease_ttl: float = 600.0,
    site: str = SITE,
    provider: Scope | None = None,
) -> PathLimits:
    scope = Scope(
        f"{SRC}->{site}",
        connection_limit,
        connection_rate,
        connection_burst,
        message_rate,
        message_burst,
    )
    scopes = (scope,) if provider is None else (scope, provider)
    return PathLimits(SRC, site, scopes, 100, 60.0, lease_ttl)


@asynccontextmanager
async def node(
    server: RedisServer,
    name: str,
    *,
    on_mode_change: Callable[[Mode], None] | None = None,
    call_timeout: float = 0.5,
) -> AsyncIterator[Shaper]:
    """One sender node's Shaper, sharing ``server``; retries Redis every 50 ms."""
    config = RedisConfig(server.url, PREFIX, node_ttl=5.0)
    async with open_shaper(
        config,
        node_id=name,
        on_mode_change=on_mode_change,
        call_timeout=call_timeout,
        retry_interval=0.05,
        fallback_grace=0.0,
    ) as shaper:
        yield shaper


@asynccontextmanager
async def client(server: RedisServer) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis(host=server.host, port=server.port) as c:
        yield c


def mode_of(shaper: Shaper) -> Mode:
    """The mode now (a call, so type checkers do not carry an earlier check over an await)."""
    return shaper.mode


async def lease_count(server: RedisServer, scope_key: str) -> int:
    async with client(server) as c:
        return await c.zcard(f"{PREFIX}lease:{scope_key}")


def outcome(result: Refused | bool | float | None) -> Any:
    """A decision in a form both clocks agree on (waits to whole seconds)."""
    if isinstance(result, Refused):
        return (result.reason.value, round(result.retry_after))
    if isinstance(result, float):
        return round(result)
    return result


async def scenario(backend: ShapingBackend) -> list[Any]:
    """A sequence of decisions whose outcome does not depend on a few ms of timing."""
    out: list[Any] = []
    three = limits(connection_limit=3)
    out += [outcome(await backend.acquire(f"l{i}", three)) for i in range(5)]
    await backend.release("l1", three)
    out += [outcome(await backend.acquire(f"l{i}", three)) for i in (5, 6)]
    out.append(await backend.extend("l0", three))
    out.append(await backend.extend("l1", three))  # released, and no room to re-take
    # A provider scope shared by two sites.
    google = Scope(f"{SRC}->provider:google", connection_limit=2)
    a, b = limits(site="a.test", provider=google), limits(site="b.test", provider=google)
    out += [outcome(await backend.acquire(i, p)) for i, p in (("p1", a), ("p2", b), ("p3", a))]
    # Connection rate with a burst of 2, too slow to refill during the test.
    rated = limits(site="rated.test", connection_limit=10, connection_rate=Rate(1, 60.0),
                   connection_burst=2)  # fmt: skip
    out += [outcome(await backend.acquire(f"r{i}", rated)) for i in range(3)]
    # A message burst of 5 at one instant, then batches.
    burst = limits(site="burst.test", message_rate=Rate(1, 60.0), message_burst=5)
    out += [outcome(await backend.take(burst, 1)) for _ in range(6)]
    batch = limits(site="batch.test", message_rate=Rate(1, 60.0), message_burst=4)
    out += [outcome(await backend.take(batch, n)) for n in (3, 3, 1, 1)]
    big = limits(site="big.test", message_rate=Rate(1, 60.0), message_burst=2)
    out += [outcome(await backend.take(big, n)) for n in (5, 1)]
    # Suspension.
    await backend.suspend(three.path_key, 60.0, "421 4.7.28 slow down")
    out.append(outcome(await backend.acquire("s1", three)))
    out.append(outcome(await backend.take(three, 1)))
    found = await backend.suspension(three.path_key)
    out.append(None if found is None else (round(found.remaining), found.reason))
    out.append(await backend.suspension("nobody->nowhere"))
    return out


async def test_redis_backend_makes_the_same_decisions_as_memory(redis: RedisServer) -> None:
    async with RedisBackend(redis.url, key_prefix=PREFIX, node_id="n1") as shared:
        from_redis = await scenario(shared)
    from_memory = await scenario(MemoryBackend())
    assert from_redis == from_memory
    limit = ("connection_limit", 1)
    assert from_memory == [
        *[None] * 3, limit, limit,               # limit 3
        None, limit,                             # a release frees one slot
        True, False,                             # extend: held; released
        None, None, limit,                       # the provider scope spans sites
        None, None, ("connection_rate", 60),     # connection burst 2
        *[0] * 5, 60,                            # message burst 5
        0, 120, 0, 60,                           # batches within burst 4
        0, 240,                                  # a batch over the burst needs an idle bucket
        ("suspended", 60), 60, (60, "421 4.7.28 slow down"), None,
    ]  # fmt: skip


async def test_three_nodes_never_exceed_connection_limit_two_together(
    redis: RedisServer,
) -> None:
    shared = limits(connection_limit=2)
    open_now, most, done = 0, 0, 0

    async def worker(shaper: Shaper) -> None:
        nonlocal open_now, most, done
        for _ in range(6):
            while not (lease := await shaper.acquire_connection(SRC, SITE, shared)):
                assert lease.reason is RefusalReason.CONNECTION_LIMIT
                await trio.sleep(0.002)
            open_now += 1
            most = max(most, open_now)
            assert open_now <= 2
            assert await shaper.extend(lease)  # a round trip while holding it
            assert await shaper.extend(lease)
            open_now -= 1
            await shaper.release(lease)
            done += 1

    async with node(redis, "n1") as n1, node(redis, "n2") as n2, node(redis, "n3") as n3:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for shaper in (n1, n2, n3) * 3:
                    nursery.start_soon(worker, shaper)
        assert all(s.mode == "shared" for s in (n1, n2, n3))
    assert done == 54
    assert most == 2
    assert await lease_count(redis, shared.path_key) == 0


async def test_a_lease_not_extended_expires_after_lease_ttl_and_another_node_takes_it(
    redis: RedisServer,
) -> None:
    short = limits(connection_limit=1, lease_ttl=0.3)
    async with node(redis, "n1") as n1, node(redis, "n2") as n2:
        stale = await n1.acquire_connection(SRC, SITE, short)
        assert isinstance(stale, Lease)
        start = trio.current_time()
        refused = await n2.acquire_connection(SRC, SITE, short)
        assert isinstance(refused, Refused)
        assert refused.reason is RefusalReason.CONNECTION_LIMIT
        assert 0.2 < refused.retry_after <= 0.3  # until the holder's lease expires
        # The wait is the behaviour under test: Redis's clock must pass the expiry.
        await trio.sleep_until(start + refused.retry_after + 0.02)
        taken = await n2.acquire_connection(SRC, SITE, short)
        assert isinstance(taken, Lease)
        assert not await n1.extend(stale)  # lost: n1 must close its connection
        assert await n2.extend(taken)


async def test_suspension_set_by_one_node_is_seen_by_another(redis: RedisServer) -> None:
    path = limits(connection_limit=5)
    async with node(redis, "n1") as n1, node(redis, "n2") as n2:
        until = trio.current_time() + 120.0
        await n1.suspend(SRC, SITE, until, "451 4.7.650 rate limited due to IP reputation")
        seen = await n2.suspended_until(SRC, SITE)
        assert seen == pytest.approx(until, abs=0.1)
        refused = await n2.acquire_connection(SRC, SITE, path)
        assert isinstance(refused, Refused)
        assert refused.reason is RefusalReason.SUSPENDED
        assert await n2.take_messages(SRC, SITE, path) == pytest.approx(120.0, abs=0.1)
        assert await n2.suspended_until(SRC, "other.test") is None


async def test_message_rate_is_shared_by_three_nodes(redis: RedisServer) -> None:
    rate = Rate(50, 1.0)
    interval = 1.0 / 50
    path = limits(message_rate=rate, message_burst=5)
    sent = 0
    longest_wait = 0.0

    async def sender(shaper: Shaper) -> None:
        nonlocal sent, longest_wait
        while True:
            wait = await shaper.take_messages(SRC, SITE, path)
            if wait:
                longest_wait = max(longest_wait, wait)
                await trio.sleep(wait)
            else:
                sent += 1

    async with node(redis, "n1") as n1, node(redis, "n2") as n2, node(redis, "n3") as n3:
        start = trio.current_time()
        with trio.move_on_after(1.2):
            async with trio.open_nursery() as nursery:
                for shaper in (n1, n2, n3) * 2:
                    nursery.start_soon(sender, shaper)
        elapsed = trio.current_time() - start
    # The ceiling is the shared bucket: the burst, then one per 20 ms for
    # all six senders together, however fast or slow this machine is.
    assert sent <= 5 + elapsed * 50 + 1
    # The floor is not a count (a loaded machine sends fewer) but the
    # promise that makes full speed possible: no sender is ever told to
    # wait longer than the next token, so the bucket is never left idle.
    assert 0.0 < longest_wait <= interval + 0.001
    assert sent > 5  # past the burst, tokens kept coming


async def test_connection_rate_is_shared_across_nodes(redis: RedisServer) -> None:
    path = limits(connection_limit=10, connection_rate=Rate(1, 60.0))
    async with node(redis, "n1") as n1, node(redis, "n2") as n2:
        assert isinstance(await n1.acquire_connection(SRC, SITE, path), Lease)
        refused = await n2.acquire_connection(SRC, SITE, path)
        assert isinstance(refused, Refused)
        assert refused.reason is RefusalReason.CONNECTION_RATE
        assert refused.retry_after == pytest.approx(60.0, abs=0.5)


async def test_nodes_count_each_other_and_leave_on_exit(redis: RedisServer) -> None:
    async with node(redis, "n1") as n1:
        async with node(redis, "n2"), node(redis, "n3"):
            await n1.heartbeat()
            assert n1.live_nodes == 3
        await n1.heartbeat()
        assert n1.live_nodes == 1


async def test_redis_stopped_mid_run_falls_back_to_the_local_share_then_recovers(
    redis: RedisServer,
) -> None:
    shared = limits(connection_limit=6)
    modes: list[Mode] = []
    back = trio.Event()

    def on_mode_change(mode: Mode) -> None:
        modes.append(mode)
        if mode == "shared":
            back.set()

    async with (
        node(redis, "n1", on_mode_change=on_mode_change) as n1,
        node(redis, "n2") as n2,
        node(redis, "n3") as n3,
    ):
        for shaper in (n1, n2, n3):
            await shaper.heartbeat()
        assert n1.live_nodes == 3
        before = await n1.acquire_connection(SRC, SITE, shared)
        assert isinstance(before, Lease)

        await redis.stop()
        with structlog.testing.capture_logs() as logs:
            granted = [await n1.acquire_connection(SRC, SITE, shared) for _ in range(2)]
            assert n1.mode == "local"
            # 6 connections / 3 live nodes: 2 for this node while it cannot
            # coordinate, and the one it opened before the outage holds one.
            assert [isinstance(g, Lease) for g in granted] == [True, False]
            refused = granted[1]
            assert isinstance(refused, Refused)
            assert refused.reason is RefusalReason.CONNECTION_LIMIT
            assert await n1.take_messages(SRC, SITE, shared) == 0.0
        fallbacks = [e for e in logs if e["event"] == "shaping_fallback" and e["node"] == "n1"]
        assert len(fallbacks) == 1  # logged once, not per failed call
        assert fallbacks[0]["log_level"] == "warning"
        assert (n1.mode, n1.fallbacks, modes) == ("local", 1, ["local"])
        assert n1.redis_errors >= 1
        # Another node falls back on its own, to its own share.
        others = [await n2.acquire_connection(SRC, SITE, shared) for _ in range(3)]
        assert [isinstance(g, Lease) for g in others] == [True, True, False]

        with structlog.testing.capture_logs() as logs:
            await redis.start()  # same port, empty data set
            with trio.fail_after(3):
                await back.wait()  # the retry loop found Redis again
        assert [e["event"] for e in logs if e.get("node") == "n1"] == ["shaping_shared"]
        assert (mode_of(n1), n1.recoveries, modes) == ("shared", 1, ["local", "shared"])

        # New connections are counted in Redis again.
        after = await n1.acquire_connection(SRC, SITE, shared)
        assert isinstance(after, Lease)
        assert await lease_count(redis, shared.path_key) == 1
        # A connection opened during the outage moves into Redis at its next message.
        local_lease = granted[0]
        assert isinstance(local_lease, Lease)
        assert await n1.extend(local_lease)
        assert await lease_count(redis, shared.path_key) == 2
        assert n1.local.lease_count(shared.path_key) == 1  # `before`, adopted, not yet moved
        # The lease from before the crash was wiped with Redis's data; it re-takes a slot.
        assert await n1.extend(before)
        assert await lease_count(redis, shared.path_key) == 3
        assert n1.local.lease_count(shared.path_key) == 0  # its adopted copy is gone


async def test_hung_redis_times_out_and_pending_releases_are_handed_over(
    redis: RedisServer,
) -> None:
    shared = limits(connection_limit=2)
    async with node(redis, "n1", call_timeout=0.2) as n1:
        lease = await n1.acquire_connection(SRC, SITE, shared)
        assert isinstance(lease, Lease)
        redis.pause()
        try:
            start = trio.current_time()
            # The lease moves into the local share (2 / 1 live node).
            assert await n1.extend(lease)
            assert trio.current_time() - start < 0.5  # bounded by call_timeout
            assert n1.mode == "local"
            await n1.release(lease)  # its Redis slot cannot be freed yet
        finally:
            redis.resume()
        assert await lease_count(redis, shared.path_key) == 1
        await n1.heartbeat()
        assert mode_of(n1) == "shared"
        # Handed over on recovery, without waiting out lease_ttl.
        assert await lease_count(redis, shared.path_key) == 0


async def test_a_suspension_made_while_redis_was_away_reaches_redis(
    redis: RedisServer,
) -> None:
    async with node(redis, "n1") as n1, node(redis, "n2") as n2:
        await redis.stop()
        until = trio.current_time() + 60.0
        await n1.suspend(SRC, SITE, until, "TSS04")
        assert await n1.suspended_until(SRC, SITE) == pytest.approx(until)
        await redis.start()
        await n1.heartbeat()
        await n2.heartbeat()
        assert (n1.mode, n2.mode) == ("shared", "shared")
        assert await n2.suspended_until(SRC, SITE) == pytest.approx(until, abs=0.1)


async def test_a_node_started_while_redis_is_down_runs_locally_until_it_is_up(
    redis: RedisServer,
) -> None:
    await redis.stop()
    modes: list[Mode] = []
    async with node(redis, "n1", on_mode_change=modes.append) as n1:
        assert n1.mode == "local"
        assert n1.live_nodes == 1  # nothing seen yet: the whole limit
        await redis.start()
        await n1.heartbeat()
        assert mode_of(n1) == "shared"
    assert modes == ["local", "shared"]


async def test_a_node_over_its_local_share_sheds_and_new_connections_wait_the_grace(
    redis: RedisServer,
) -> None:
    shared = limits(connection_limit=6)
    config = RedisConfig(redis.url, PREFIX, node_ttl=5.0)
    async with (
        open_shaper(config, node_id="n1", call_timeout=0.5, fallback_grace=2.0) as n1,
        open_shaper(config, node_id="n2", call_timeout=0.5) as n2,
        open_shaper(config, node_id="n3", call_timeout=0.5) as n3,
    ):
        for shaper in (n1, n2, n3):
            await shaper.heartbeat()
        held = [await n1.acquire_connection(SRC, SITE, shared) for _ in range(4)]
        assert all(isinstance(lease, Lease) for lease in held)
        await redis.stop()
        # The switch: n1's four open connections count against its share of 2.
        refused = await n1.acquire_connection(SRC, SITE, shared)
        assert isinstance(refused, Refused)
        assert n1.mode == "local"
        assert n1.local.lease_count(shared.path_key) == 4
        # Each extend sheds one until the node is down to its share...
        kept = [await n1.extend(lease) for lease in held if isinstance(lease, Lease)]
        assert kept == [False, False, True, True]
        assert n1.local.lease_count(shared.path_key) == 2
        # ...and nothing new opens during the grace, even below the share.
        released = held[2]
        assert isinstance(released, Lease)
        await n1.release(released)
        grace = await n1.acquire_connection(SRC, SITE, shared)
        assert isinstance(grace, Refused)
        assert grace.reason is RefusalReason.CONNECTION_LIMIT
        await trio.sleep(2.0)
        assert isinstance(await n1.acquire_connection(SRC, SITE, shared), Lease)
