"""MX resolution against a fake DNS server on loopback (RFC 5321 §5.1, RFC 7505, RFC 2308).

Every resolver here is pointed at the fake server explicitly: no test reaches
the system resolver or leaves 127.0.0.1. Cache and timeout tests run on
``autojump_clock`` and assert virtual time.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address

import pytest
import trio

from mta_client.errors import MtaClientError
from mta_client.mx import (
    Destination,
    MxCandidate,
    MxFailure,
    MxPermanentError,
    MxResolver,
    MxTemporaryError,
    normalize_domain,
    parse_route,
)
from tests.mta_client.dnsfake import DROP, NXDOMAIN, SERVFAIL, Entry, FakeDns, R, fake_dns

V4 = frozenset({4})
V6 = frozenset({6})

# example.com: two hosts at different preferences, each with A and AAAA.
ZONE: dict[tuple[str, str], Entry] = {
    ("example.com", "MX"): [R("20 mx2.example.com."), R("10 mx1.example.com.")],
    ("mx1.example.com", "A"): [R("192.0.2.1")],
    ("mx1.example.com", "AAAA"): [R("2001:db8::1")],
    ("mx2.example.com", "A"): [R("192.0.2.2")],
    ("mx2.example.com", "AAAA"): [R("2001:db8::2")],
}


def zone_with(extra: Mapping[tuple[str, str], Entry]) -> dict[tuple[str, str], Entry]:
    return {**ZONE, **extra}


def make_resolver(
    server: FakeDns,
    *,
    seed: int = 0,
    routes: Mapping[str, str] | None = None,
    port: int = 25,
    timeout: float = 5.0,
    max_cache_ttl: float = 3600.0,
    failure_cache_ttl: float = 30.0,
) -> MxResolver:
    """A resolver that asks only the fake server, with a seeded rng."""
    return MxResolver(
        nameservers=[server.address],
        routes=routes,
        port=port,
        timeout=timeout,
        max_cache_ttl=max_cache_ttl,
        failure_cache_ttl=failure_cache_ttl,
        rng=random.Random(seed),
    )


def hosts(destination: Destination) -> list[str]:
    return [candidate.host for candidate in destination.candidates]


def addresses(destination: Destination) -> list[str]:
    return [str(candidate.address) for candidate in destination.candidates]


# -- ordering ------------------------------------------------------------------


async def test_candidates_go_by_ascending_preference_ipv6_first_within_a_host() -> None:
    async with fake_dns(ZONE) as server:
        destination = await make_resolver(server).resolve("example.com")
    assert destination.candidates == (
        MxCandidate("mx1.example.com", IPv6Address("2001:db8::1"), 25, 10),
        MxCandidate("mx1.example.com", IPv4Address("192.0.2.1"), 25, 10),
        MxCandidate("mx2.example.com", IPv6Address("2001:db8::2"), 25, 20),
        MxCandidate("mx2.example.com", IPv4Address("192.0.2.2"), 25, 20),
    )


EQUALS_ZONE: dict[tuple[str, str], Entry] = {
    ("equal.example", "MX"): [
        R("10 a.equal.example."),
        R("10 b.equal.example."),
        R("10 c.equal.example."),
        R("20 z.equal.example."),
    ],
    ("a.equal.example", "A"): [R("192.0.2.10")],
    ("b.equal.example", "A"): [R("192.0.2.11")],
    ("c.equal.example", "A"): [R("192.0.2.12")],
    ("z.equal.example", "A"): [R("192.0.2.19")],
}


async def test_equal_preferences_are_shuffled_across_seeds_and_no_host_is_lost() -> None:
    orders = set()
    async with fake_dns(EQUALS_ZONE) as server:
        for seed in range(20):
            destination = await make_resolver(server, seed=seed).resolve(
                "equal.example", families=V4
            )
            order = hosts(destination)
            assert sorted(order[:3]) == ["a.equal.example", "b.equal.example", "c.equal.example"]
            assert order[3] == "z.equal.example"
            orders.add(tuple(order))
    assert len(orders) > 1


async def test_the_same_seed_gives_the_same_order() -> None:
    async with fake_dns(EQUALS_ZONE) as server:
        first = await make_resolver(server, seed=7).resolve("equal.example")
        second = await make_resolver(server, seed=7).resolve("equal.example")
    assert first == second


async def test_a_cache_hit_reshuffles_equal_preferences() -> None:
    async with fake_dns(EQUALS_ZONE) as server:
        resolver = make_resolver(server, seed=3)
        orders = {tuple(hosts(await resolver.resolve("equal.example"))) for _ in range(20)}
        assert server.count("equal.example", "MX") == 1
    assert len(orders) > 1


async def test_an_address_shared_by_two_hosts_is_listed_once_under_the_better_host() -> None:
    zone = zone_with({("mx2.example.com", "A"): [R("192.0.2.1")]})
    async with fake_dns(zone) as server:
        destination = await make_resolver(server).resolve("example.com", families=V4)
    assert [(c.host, str(c.address)) for c in destination.candidates] == [
        ("mx1.example.com", "192.0.2.1")
    ]


# -- families ------------------------------------------------------------------


async def test_ipv4_only_caller_gets_only_ipv4_addresses_and_asks_no_aaaa() -> None:
    async with fake_dns(ZONE) as server:
        destination = await make_resolver(server).resolve("example.com", families=V4)
        assert server.count(rdtype="AAAA") == 0
    assert addresses(destination) == ["192.0.2.1", "192.0.2.2"]


async def test_ipv6_only_caller_gets_only_ipv6_addresses() -> None:
    async with fake_dns(ZONE) as server:
        destination = await make_resolver(server).resolve("example.com", families=V6)
        assert server.count(rdtype="A") == 0
    assert addresses(destination) == ["2001:db8::1", "2001:db8::2"]


async def test_hosts_with_only_the_other_family_are_permanent_no_address() -> None:
    zone = {
        ("v6only.example", "MX"): [R("10 mx.v6only.example.")],
        ("mx.v6only.example", "AAAA"): [R("2001:db8::6")],
    }
    async with fake_dns(zone) as server:
        with pytest.raises(MxPermanentError) as info:
            await make_resolver(server).resolve("v6only.example", families=V4)
    assert info.value.reason is MxFailure.NO_ADDRESS
    assert "mx.v6only.example: no IPv4 address" in str(info.value)


async def test_families_must_be_a_non_empty_subset_of_4_and_6() -> None:
    async with fake_dns(ZONE) as server:
        resolver = make_resolver(server)
        for families in (frozenset[int](), frozenset({4, 5})):
            with pytest.raises(ValueError, match="families"):
                await resolver.resolve("example.com", families=families)
        assert server.count() == 0


# -- implicit MX, null MX, failures ---------------------------------------------


async def test_domain_without_mx_is_its_own_implicit_mx_at_preference_0() -> None:
    zone = {("plain.example", "A"): [R("192.0.2.9")]}
    async with fake_dns(zone) as server:
        destination = await make_resolver(server).resolve("plain.example")
    assert destination == Destination(
        "plain.example",
        "plain.example",
        (MxCandidate("plain.example", IPv4Address("192.0.2.9"), 25, 0),),
    )


async def test_domain_without_mx_or_address_is_permanent_no_address() -> None:
    zone = {("bare.example", "TXT"): [R('"v=spf1 -all"')]}
    async with fake_dns(zone) as server:
        with pytest.raises(MxPermanentError) as info:
            await make_resolver(server).resolve("bare.example")
    assert info.value.reason is MxFailure.NO_ADDRESS
    assert info.value.domain == "bare.example"


async def test_null_mx_is_permanent_and_looks_up_no_address() -> None:
    zone = {
        ("nullmx.example", "MX"): [R("0 .")],
        ("nullmx.example", "A"): [R("192.0.2.3")],
    }
    async with fake_dns(zone) as server:
        with pytest.raises(MxPermanentError) as info:
            await make_resolver(server).resolve("nullmx.example")
        assert server.count(rdtype="A") == server.count(rdtype="AAAA") == 0
    assert info.value.reason is MxFailure.NULL_MX
    assert str(info.value).startswith("nullmx.example: null MX")


async def test_null_mx_next_to_real_exchanges_is_ignored() -> None:
    zone = zone_with({("example.com", "MX"): [R("0 ."), R("10 mx1.example.com.")]})
    async with fake_dns(zone) as server:
        destination = await make_resolver(server).resolve("example.com", families=V4)
    assert destination.site == "mx1.example.com"
    assert addresses(destination) == ["192.0.2.1"]


async def test_nxdomain_is_permanent() -> None:
    async with fake_dns(ZONE) as server:
        with pytest.raises(MxPermanentError) as info:
            await make_resolver(server).resolve("nowhere.example")
    assert info.value.reason is MxFailure.NXDOMAIN
    assert isinstance(info.value, MtaClientError)
    assert str(info.value).startswith("nowhere.example: NXDOMAIN")


async def test_servfail_is_temporary() -> None:
    zone = {("broken.example", "MX"): SERVFAIL}
    async with fake_dns(zone) as server:
        with pytest.raises(MxTemporaryError) as info:
            await make_resolver(server).resolve("broken.example")
    assert info.value.reason is MxFailure.SERVFAIL
    assert str(info.value).startswith("broken.example: SERVFAIL")


async def test_silent_nameserver_is_temporary_timeout_after_the_timeout_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    zone = {("silent.example", "MX"): DROP}
    async with fake_dns(zone) as server:
        resolver = make_resolver(server, timeout=5.0)
        start = trio.current_time()
        with pytest.raises(MxTemporaryError) as info:
            await resolver.resolve("silent.example")
        elapsed = trio.current_time() - start
        # dnspython retried within the deadline: 2 s per attempt, then backoff.
        assert server.count("silent.example", "MX") >= 2
    assert elapsed == pytest.approx(5.0)
    assert info.value.reason is MxFailure.TIMEOUT
    assert "timeout" in str(info.value)


async def test_host_whose_lookup_fails_is_skipped_when_others_have_addresses() -> None:
    zone = zone_with({("mx1.example.com", "A"): NXDOMAIN, ("mx1.example.com", "AAAA"): NXDOMAIN})
    async with fake_dns(zone) as server:
        destination = await make_resolver(server).resolve("example.com")
    assert hosts(destination) == ["mx2.example.com", "mx2.example.com"]


async def test_host_whose_lookup_times_out_is_skipped_within_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    zone = zone_with({("mx1.example.com", "A"): DROP})
    async with fake_dns(zone) as server:
        start = trio.current_time()
        destination = await make_resolver(server, timeout=3.0).resolve("example.com", families=V4)
    assert trio.current_time() - start == pytest.approx(3.0)
    assert addresses(destination) == ["192.0.2.2"]


async def test_no_host_with_an_address_is_permanent_no_address_naming_the_hosts() -> None:
    zone = {("example.com", "MX"): ZONE["example.com", "MX"]}
    async with fake_dns(zone) as server:
        with pytest.raises(MxPermanentError) as info:
            await make_resolver(server).resolve("example.com")
    assert info.value.reason is MxFailure.NO_ADDRESS
    assert "mx1.example.com IPv4: nxdomain" in info.value.detail
    assert "mx2.example.com IPv6: nxdomain" in info.value.detail


async def test_no_address_with_a_temporary_lookup_failure_is_temporary() -> None:
    zone = {
        ("example.com", "MX"): ZONE["example.com", "MX"],
        ("mx2.example.com", "A"): SERVFAIL,
    }
    async with fake_dns(zone) as server:
        with pytest.raises(MxTemporaryError) as info:
            await make_resolver(server).resolve("example.com", families=V4)
    assert info.value.reason is MxFailure.SERVFAIL


async def test_mx_exchange_that_is_an_ip_address_is_never_used_nor_queried() -> None:
    zone = {
        ("literal.example", "MX"): [R("10 192.0.2.7.")],
        ("192.0.2.7", "A"): [R("192.0.2.7")],
    }
    async with fake_dns(zone) as server:
        with pytest.raises(MxPermanentError) as info:
            await make_resolver(server).resolve("literal.example")
        assert server.count("192.0.2.7") == 0
    assert info.value.reason is MxFailure.NO_ADDRESS
    assert "192.0.2.7: an IP address, not a host name" in info.value.detail


async def test_mx_host_that_is_a_cname_resolves_to_the_target_and_keeps_the_mx_name() -> None:
    zone = {
        ("alias.example", "MX"): [R("10 mx.alias.example.")],
        ("mx.alias.example", "CNAME"): [R("real.example.net.")],
        ("real.example.net", "A"): [R("192.0.2.30")],
    }
    async with fake_dns(zone) as server:
        destination = await make_resolver(server).resolve("alias.example", families=V4)
    assert destination.site == "mx.alias.example"
    assert destination.candidates == (
        MxCandidate("mx.alias.example", IPv4Address("192.0.2.30"), 25, 10),
    )


# -- cache -----------------------------------------------------------------------


async def test_second_resolve_within_the_ttl_sends_no_query(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_dns(ZONE) as server:
        resolver = make_resolver(server)
        first = await resolver.resolve("example.com", families=V4)
        sent = server.count()
        assert sent == 3  # MX, and A of each host
        await trio.sleep(299)
        assert await resolver.resolve("example.com", families=V4) == first
        assert server.count() == sent


async def test_each_answer_is_queried_again_after_its_own_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    zone = zone_with(
        {
            ("example.com", "MX"): [R("10 mx1.example.com.", ttl=3600)],
            ("mx1.example.com", "A"): [R("192.0.2.1", ttl=60)],
        }
    )
    async with fake_dns(zone) as server:
        resolver = make_resolver(server)
        await resolver.resolve("example.com", families=V4)
        server.set("mx1.example.com", "A", [R("192.0.2.99", ttl=60)])
        await trio.sleep(59)
        assert addresses(await resolver.resolve("example.com", families=V4)) == ["192.0.2.1"]
        await trio.sleep(2)
        assert addresses(await resolver.resolve("example.com", families=V4)) == ["192.0.2.99"]
        assert server.count("mx1.example.com", "A") == 2
        assert server.count("example.com", "MX") == 1


async def test_max_cache_ttl_caps_a_long_ttl(autojump_clock: trio.testing.MockClock) -> None:
    zone = {("long.example", "A"): [R("192.0.2.40", ttl=86400)]}
    async with fake_dns(zone) as server:
        resolver = make_resolver(server, max_cache_ttl=600.0)
        await resolver.resolve("long.example", families=V4)
        await trio.sleep(599)
        await resolver.resolve("long.example", families=V4)
        assert server.count("long.example", "A") == 1
        await trio.sleep(2)
        await resolver.resolve("long.example", families=V4)
        assert server.count("long.example", "A") == 2


async def test_ttl_zero_is_not_cached() -> None:
    zone = {("zero.example", "A"): [R("192.0.2.41", ttl=0)]}
    async with fake_dns(zone) as server:
        resolver = make_resolver(server)
        await resolver.resolve("zero.example", families=V4)
        await resolver.resolve("zero.example", families=V4)
        assert server.count("zero.example", "A") == 2


async def test_nxdomain_is_cached_for_the_soa_negative_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_dns(ZONE, negative_ttl=60) as server:
        resolver = make_resolver(server)
        for _ in range(2):
            with pytest.raises(MxPermanentError):
                await resolver.resolve("nowhere.example")
        assert server.count("nowhere.example") == 1
        await trio.sleep(61)
        server.set("nowhere.example", "A", [R("192.0.2.42")])
        destination = await resolver.resolve("nowhere.example", families=V4)
        assert addresses(destination) == ["192.0.2.42"]


async def test_negative_caching_is_capped_at_five_minutes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_dns(ZONE, negative_ttl=86400) as server:
        resolver = make_resolver(server)
        with pytest.raises(MxPermanentError):
            await resolver.resolve("nowhere.example")
        await trio.sleep(299)
        with pytest.raises(MxPermanentError):
            await resolver.resolve("nowhere.example")
        assert server.count("nowhere.example") == 1
        await trio.sleep(2)
        with pytest.raises(MxPermanentError):
            await resolver.resolve("nowhere.example")
        assert server.count("nowhere.example") == 2


async def test_nodata_for_mx_is_cached_for_the_soa_negative_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    zone = {("plain.example", "A"): [R("192.0.2.9", ttl=3600)]}
    async with fake_dns(zone, negative_ttl=120) as server:
        resolver = make_resolver(server)
        await resolver.resolve("plain.example", families=V4)
        await trio.sleep(119)
        await resolver.resolve("plain.example", families=V4)
        assert server.count("plain.example", "MX") == 1
        await trio.sleep(2)
        await resolver.resolve("plain.example", families=V4)
        assert server.count("plain.example", "MX") == 2


async def test_servfail_is_remembered_briefly_then_asked_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_dns({("flaky.example", "MX"): SERVFAIL}) as server:
        resolver = make_resolver(server, failure_cache_ttl=30.0)
        for _ in range(2):
            with pytest.raises(MxTemporaryError):
                await resolver.resolve("flaky.example")
        assert server.count("flaky.example", "MX") == 1
        server.set("flaky.example", "MX", [R("10 mx1.example.com.")])
        server.set("mx1.example.com", "A", [R("192.0.2.1")])
        await trio.sleep(31)
        destination = await resolver.resolve("flaky.example", families=V4)
        assert addresses(destination) == ["192.0.2.1"]


async def test_the_cache_holds_at_most_max_cache_entries_answers_per_kind() -> None:
    zone = {("a.example", "A"): [R("192.0.2.81")], ("b.example", "A"): [R("192.0.2.82")]}
    async with fake_dns(zone) as server:
        resolver = MxResolver(nameservers=[server.address], max_cache_entries=1)
        for domain in ("a.example", "b.example", "a.example"):
            await resolver.resolve(domain, families=V4)
        assert server.count("a.example", "MX") == 2
        assert server.count("b.example", "MX") == 1


async def test_concurrent_resolves_of_one_domain_share_the_queries() -> None:
    results: list[Destination] = []
    async with fake_dns(ZONE) as server:
        resolver = make_resolver(server)

        async def resolve_one() -> None:
            results.append(await resolver.resolve("example.com", families=V4))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(resolve_one)
        assert server.count("example.com", "MX") == 1
        assert server.count("mx1.example.com", "A") == 1
    assert len(results) == 10
    assert all(addresses(result) == ["192.0.2.1", "192.0.2.2"] for result in results)


async def test_domains_on_the_same_hosts_share_the_host_lookups() -> None:
    zone = zone_with({("other.example", "MX"): [R("5 mx1.example.com.")]})
    async with fake_dns(zone) as server:
        resolver = make_resolver(server)
        await resolver.resolve("example.com", families=V4)
        await resolver.resolve("other.example", families=V4)
        assert server.count("mx1.example.com", "A") == 1


# -- site ------------------------------------------------------------------------


async def test_domains_on_the_same_mx_set_share_one_site_whatever_the_order() -> None:
    zone = {
        ("one.example", "MX"): [
            R("5 gmail-smtp-in.l.google.com."),
            R("10 ALT1.gmail-smtp-in.l.google.com."),
            R("20 alt2.gmail-smtp-in.l.google.com."),
        ],
        ("two.example", "MX"): [
            R("30 alt2.gmail-smtp-in.l.google.com."),
            R("1 alt1.gmail-smtp-in.l.google.com."),
            R("40 Gmail-Smtp-In.L.Google.Com."),
        ],
        ("gmail-smtp-in.l.google.com", "A"): [R("192.0.2.50")],
        ("alt1.gmail-smtp-in.l.google.com", "A"): [R("192.0.2.51")],
        ("alt2.gmail-smtp-in.l.google.com", "A"): [R("192.0.2.52")],
    }
    async with fake_dns(zone) as server:
        resolver = make_resolver(server)
        one = await resolver.resolve("one.example", families=V4)
        two = await resolver.resolve("two.example", families=V4)
    assert (
        one.site
        == two.site
        == (
            "alt1.gmail-smtp-in.l.google.com,"
            "alt2.gmail-smtp-in.l.google.com,"
            "gmail-smtp-in.l.google.com"
        )
    )


async def test_different_mx_sets_are_different_sites() -> None:
    zone = zone_with({("other.example", "MX"): [R("10 mx1.example.com.")]})
    async with fake_dns(zone) as server:
        resolver = make_resolver(server)
        example = await resolver.resolve("example.com")
        other = await resolver.resolve("other.example")
    assert example.site == "mx1.example.com,mx2.example.com"
    assert other.site == "mx1.example.com"


async def test_site_does_not_depend_on_the_callers_families() -> None:
    zone = zone_with({("mx2.example.com", "A"): NXDOMAIN})
    async with fake_dns(zone) as server:
        resolver = make_resolver(server)
        v4 = await resolver.resolve("example.com", families=V4)
        v6 = await resolver.resolve("example.com", families=V6)
    assert v4.site == v6.site == "mx1.example.com,mx2.example.com"


# -- routes ----------------------------------------------------------------------


async def test_route_to_an_ip_literal_bypasses_dns() -> None:
    async with fake_dns(ZONE) as server:
        resolver = make_resolver(server, routes={"example.com": "127.0.0.1:2525"})
        destination = await resolver.resolve("example.com")
        assert server.count() == 0
    assert destination == Destination(
        "example.com",
        "route:127.0.0.1:2525",
        (MxCandidate("127.0.0.1", IPv4Address("127.0.0.1"), 2525, 0),),
    )


async def test_route_to_a_host_name_looks_up_its_address_not_the_mx() -> None:
    zone = zone_with({("smart.example.net", "A"): [R("192.0.2.60")]})
    async with fake_dns(zone) as server:
        resolver = make_resolver(server, routes={"Example.COM.": "Smart.Example.Net:587"})
        destination = await resolver.resolve("example.com", families=V4)
        assert server.count("example.com") == 0
    assert destination.site == "route:smart.example.net:587"
    assert destination.candidates == (
        MxCandidate("smart.example.net", IPv4Address("192.0.2.60"), 587, 0),
    )


async def test_route_without_port_uses_the_resolvers_port() -> None:
    async with fake_dns(ZONE) as server:
        resolver = make_resolver(server, routes={"example.com": "[::1]"}, port=2500)
        destination = await resolver.resolve("example.com")
    assert destination.site == "route:[::1]:2500"
    assert destination.candidates == (MxCandidate("::1", IPv6Address("::1"), 2500, 0),)


async def test_route_to_an_address_of_the_other_family_is_permanent_no_address() -> None:
    async with fake_dns(ZONE) as server:
        resolver = make_resolver(server, routes={"example.com": "[::1]:25"})
        with pytest.raises(MxPermanentError) as info:
            await resolver.resolve("example.com", families=V4)
    assert info.value.reason is MxFailure.NO_ADDRESS


async def test_mx_port_is_the_resolvers_port() -> None:
    async with fake_dns(ZONE) as server:
        destination = await make_resolver(server, port=2525).resolve("example.com")
    assert {candidate.port for candidate in destination.candidates} == {2525}


@pytest.mark.parametrize(
    "target",
    ["host:", "host:0", "host:65536", "host:+25", "[::1", "[::1]x", "[nope]:25", "2001:db8::1:25"],
)
def test_a_bad_route_is_rejected_when_the_resolver_is_built(target: str) -> None:
    with pytest.raises(ValueError, match="route"):
        MxResolver(nameservers=[("127.0.0.1", 53)], routes={"example.com": target})


def test_parse_route_normalizes_host_and_port() -> None:
    assert parse_route("[2001:DB8::0:1]:2525").label == "[2001:db8::1]:2525"
    assert parse_route("Smart.Example.:25").label == "smart.example:25"
    assert parse_route("192.0.2.1", default_port=587).label == "192.0.2.1:587"


# -- domain names ----------------------------------------------------------------


async def test_unicode_domain_is_queried_as_idna_a_labels() -> None:
    zone = {("xn--bcher-kva.example", "A"): [R("192.0.2.70")]}
    async with fake_dns(zone) as server:
        destination = await make_resolver(server).resolve("Bücher.Example.", families=V4)
        assert server.count("xn--bcher-kva.example", "MX") == 1
    assert destination.domain == destination.site == "xn--bcher-kva.example"
    assert addresses(destination) == ["192.0.2.70"]


def test_domain_names_are_lower_cased_without_final_dot_in_idna_2008() -> None:
    assert normalize_domain("Example.COM.") == "example.com"
    # IDNA 2008 keeps ß (IDNA 2003 would have mapped it to "ss").
    assert normalize_domain("straße.de") == "xn--strae-oqa.de"


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "a..b",
        "exa mple.com",
        "-bad.example",
        "under_score.example",
        "[192.0.2.1]",
        "192.0.2.1",
        "x" * 64 + ".example",
        ".".join(["abcdefghi"] * 26),
    ],
)
async def test_invalid_domain_is_permanent_and_sends_no_query(domain: str) -> None:
    async with fake_dns(ZONE) as server:
        with pytest.raises(MxPermanentError) as info:
            await make_resolver(server).resolve(domain)
        assert server.count() == 0
    assert info.value.reason is MxFailure.INVALID_DOMAIN
