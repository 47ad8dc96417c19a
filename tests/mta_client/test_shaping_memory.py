"""The in-memory backend through the Shaper, on trio's virtual clock (``autojump_clock``)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mta_client.shaping import (
    Knobs,
    Lease,
    MemoryBackend,
    PathLimits,
    Rate,
    RefusalReason,
    Refused,
    Scope,
    Shaper,
    ShapingConfig,
    SourceRules,
    default_burst,
    open_shaper,
)

SRC = "192.0.2.1"
SITE = "mx1.example.test,mx2.example.test"
GMAIL = "alt1.gmail-smtp-in.l.google.com,gmail-smtp-in.l.google.com"
WORKSPACE = "aspmx.l.google.com"


def path(
    *,
    connection_limit: int | None = None,
    connection_rate: Rate | None = None,
    connection_burst: int = 1,
    message_rate: Rate | None = None,
    message_burst: int = 1,
    lease_ttl: float = 600.0,
    source: str = SRC,
    site: str = SITE,
) -> PathLimits:
    """Limits with one scope, the path itself."""
    scope = Scope(
        f"{source}->{site}",
        connection_limit,
        connection_rate,
        connection_burst,
        message_rate,
        message_burst,
    )
    return PathLimits(source, site, (scope,), 100, 60.0, lease_ttl)


async def take_lease(shaper: Shaper, limits: PathLimits) -> Lease:
    """A lease that must be granted, once the connection rate allows (virtual time)."""
    while not (lease := await shaper.acquire_connection(limits.source, limits.site, limits)):
        assert lease.reason is RefusalReason.CONNECTION_RATE, lease
        await trio.sleep(lease.retry_after)
    assert isinstance(lease, Lease)
    return lease


async def test_connection_limit_two_is_never_exceeded_by_ten_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    limits = path(connection_limit=2)
    open_now, most, connections = 0, 0, 0

    async def worker() -> None:
        nonlocal open_now, most, connections
        for _ in range(3):
            while not (lease := await shaper.acquire_connection(SRC, SITE, limits)):
                assert isinstance(lease, Refused)
                assert lease.reason is RefusalReason.CONNECTION_LIMIT
                await trio.sleep(lease.retry_after)
            open_now += 1
            most = max(most, open_now)
            assert open_now <= 2
            for _ in range(2):  # two messages of 0.1 s each
                assert await shaper.extend(lease)
                await trio.sleep(0.1)
            open_now -= 1
            connections += 1
            await shaper.release(lease)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(worker)
    assert connections == 30
    assert most == 2
    # 30 connections of 0.2 s, two at a time: at least 3 s of virtual time.
    assert trio.current_time() - start >= 3.0


async def test_message_rate_50_per_second_holds_within_10_percent_over_20_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    rate = Rate(50, 1.0)
    limits = path(message_rate=rate, message_burst=default_burst(rate))
    sent = 0

    async def sender() -> None:
        nonlocal sent
        while True:
            wait = await shaper.take_messages(SRC, SITE, limits)
            if wait:
                await trio.sleep(wait)
            else:
                sent += 1

    with trio.move_on_after(20.0):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(sender)
    assert 900 <= sent <= 1100
    assert 1000 <= sent <= 1000 + default_burst(rate) + 1  # in fact: exact plus the burst


async def test_take_messages_batch_takes_n_tokens_in_one_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    limits = path(message_rate=Rate(10, 1.0), message_burst=10)
    assert await shaper.take_messages(SRC, SITE, limits, n=6) == 0.0
    wait = await shaper.take_messages(SRC, SITE, limits, n=6)
    assert wait == pytest.approx(0.2)  # nothing taken: 4 left, 2 more needed
    assert await shaper.take_messages(SRC, SITE, limits, n=4) == 0.0
    assert await shaper.take_messages(SRC, SITE, limits) == pytest.approx(0.1)


async def test_connection_rate_refuses_with_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    limits = path(connection_limit=10, connection_rate=Rate(2, 1.0))
    await take_lease(shaper, limits)
    refused = await shaper.acquire_connection(SRC, SITE, limits)
    assert isinstance(refused, Refused)
    assert refused.reason is RefusalReason.CONNECTION_RATE
    assert refused.retry_after == pytest.approx(0.5)
    await trio.sleep(refused.retry_after)
    await take_lease(shaper, limits)


async def test_a_refused_connection_takes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    limits = path(connection_limit=1, connection_rate=Rate(1, 1.0))
    first = await take_lease(shaper, limits)
    await trio.sleep(1.0)
    refused = await shaper.acquire_connection(SRC, SITE, limits)
    assert isinstance(refused, Refused)
    assert refused.reason is RefusalReason.CONNECTION_LIMIT
    await shaper.release(first)
    await take_lease(shaper, limits)  # the refusal did not spend the rate token


async def test_provider_connection_limit_is_shared_by_all_its_sites(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = ShapingConfig()  # built-in Google: 5 connections per source
    shaper = Shaper()
    gmail, workspace = config.limits_for(SRC, GMAIL), config.limits_for(SRC, WORKSPACE)
    held = [await take_lease(shaper, gmail) for _ in range(3)]
    held += [await take_lease(shaper, workspace) for _ in range(2)]
    refused = await shaper.acquire_connection(SRC, WORKSPACE, workspace)
    assert isinstance(refused, Refused)
    assert refused.reason is RefusalReason.CONNECTION_LIMIT
    # Another source has its own provider budget.
    other = config.limits_for("192.0.2.2", GMAIL)
    await take_lease(shaper, other)
    await shaper.release(held[0])
    await take_lease(shaper, workspace)


async def test_a_lease_not_extended_expires_after_lease_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    limits = path(connection_limit=1, lease_ttl=10.0)
    stale = await take_lease(shaper, limits)
    await trio.sleep(9.9)
    refused = await shaper.acquire_connection(SRC, SITE, limits)
    assert isinstance(refused, Refused)
    assert refused.retry_after == pytest.approx(0.1)  # the holder's expiry, under the hint
    await trio.sleep(0.1)
    await take_lease(shaper, limits)
    assert not await shaper.extend(stale)  # its slot is someone else's now


async def test_extending_keeps_a_lease_alive_past_its_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    limits = path(connection_limit=1, lease_ttl=10.0)
    lease = await take_lease(shaper, limits)
    for _ in range(5):
        await trio.sleep(8.0)
        assert await shaper.extend(lease)
    refused = await shaper.acquire_connection(SRC, SITE, limits)
    assert isinstance(refused, Refused)
    assert refused.retry_after == pytest.approx(1.0)  # LEASE_RETRY_HINT caps the wait


async def test_an_expired_lease_is_retaken_on_extend_when_there_is_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    limits = path(connection_limit=2, lease_ttl=10.0)
    lease = await take_lease(shaper, limits)
    await trio.sleep(30.0)
    assert await shaper.extend(lease)
    assert shaper.local.lease_count(limits.path_key) == 1


async def test_a_released_lease_cannot_be_extended_and_frees_its_slot_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    limits = path(connection_limit=1)
    lease = await take_lease(shaper, limits)
    await shaper.release(lease)
    await shaper.release(lease)  # twice is harmless
    assert not await shaper.extend(lease)
    await take_lease(shaper, limits)


async def test_suspension_stops_connections_and_messages_until_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    limits = path(connection_limit=5, message_rate=Rate(100, 1.0), message_burst=10)
    lease = await take_lease(shaper, limits)
    until = trio.current_time() + 30.0
    await shaper.suspend(SRC, SITE, until, "421 4.7.28 unusual rate")
    assert await shaper.suspended_until(SRC, SITE) == pytest.approx(until)
    refused = await shaper.acquire_connection(SRC, SITE, limits)
    assert isinstance(refused, Refused)
    assert refused.reason is RefusalReason.SUSPENDED
    assert refused.retry_after == pytest.approx(30.0)
    assert await shaper.take_messages(SRC, SITE, limits) == pytest.approx(30.0)
    # A shorter suspension does not cut a longer one short.
    await shaper.suspend(SRC, SITE, trio.current_time() + 5.0, "short")
    assert await shaper.suspended_until(SRC, SITE) == pytest.approx(until)
    await trio.sleep(30.0)
    assert await shaper.suspended_until(SRC, SITE) is None
    assert await shaper.take_messages(SRC, SITE, limits) == 0.0
    assert await shaper.extend(lease)


async def test_a_suspension_in_the_past_is_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    await shaper.suspend(SRC, SITE, trio.current_time() - 1.0, "stale")
    assert await shaper.suspended_until(SRC, SITE) is None


async def test_suspension_key_uses_the_canonical_source(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = Shaper()
    until = trio.current_time() + 60.0
    await shaper.suspend("2001:DB8::0:1", SITE, until, "x")
    assert await shaper.suspended_until("2001:db8::1", SITE) == pytest.approx(until)


async def test_limits_for_another_path_are_refused() -> None:
    shaper = Shaper()
    with pytest.raises(ValueError, match="limits are for"):
        await shaper.take_messages("192.0.2.9", SITE, path())


async def test_warmup_source_rate_holds_across_the_built_in_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = ShapingConfig(sources={SRC: SourceRules(Knobs(max_message_rate=Rate(100, 3600.0)))})
    shaper = Shaper()
    limits = config.limits_for(SRC, GMAIL)
    assert await shaper.take_messages(SRC, GMAIL, limits) == 0.0
    assert await shaper.take_messages(SRC, GMAIL, limits) == pytest.approx(36.0)


async def test_memory_backend_forgets_idle_keys(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    shaper = Shaper(local=backend)
    limits = path(connection_limit=1, message_rate=Rate(1, 1.0), lease_ttl=5.0)
    await take_lease(shaper, limits)
    await shaper.take_messages(SRC, SITE, limits)
    await shaper.suspend(SRC, SITE, trio.current_time() + 1.0, "x")
    await trio.sleep(3600.0)
    other = path(site="other.test", message_rate=Rate(1, 1.0))
    await shaper.take_messages(SRC, "other.test", other)  # any call may sweep
    # Memory is bounded by the keys in use: the idle path left nothing behind.
    assert backend._leases == {}
    assert backend._suspended == {}
    assert backend._connection_tats == {}
    assert list(backend._message_tats) == [other.path_key]


async def test_open_shaper_without_redis_is_a_single_node_in_memory() -> None:
    async with open_shaper(None) as shaper:
        assert shaper.mode == "local"
        assert shaper.live_nodes == 1
        limits = path(connection_limit=1)
        await take_lease(shaper, limits)
        assert not await shaper.acquire_connection(SRC, SITE, limits)
    assert shaper.fallbacks == 0
