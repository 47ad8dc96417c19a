"""The pure shaping core: config parsing, resolution, GCRA and lease arithmetic.

Everything here runs on explicit ``now`` values; no clock, no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoproxy.yamlconfig import ConfigErrors, Reader, compose
from mta_client.shaping import gcra, leases
from mta_client.shaping.gcra import Rate, default_burst
from mta_client.shaping.rules import (
    BUILTIN_PROVIDERS,
    DEFAULT_KNOBS,
    DEFAULT_LEASE_TTL,
    DEFAULT_THROTTLE,
    Knobs,
    RedisConfig,
    Scope,
    ShapingConfig,
    parse_rate,
    parse_redis,
    parse_shaping,
)

GMAIL = "alt1.gmail-smtp-in.l.google.com,gmail-smtp-in.l.google.com"
WORKSPACE = "aspmx.l.google.com"
YAHOO = "mta5.am0.yahoodns.net,mta6.am0.yahoodns.net"
OTHER = "mx.example.org"
SRC = "203.0.113.10"


def parse(text: str) -> tuple[ShapingConfig, RedisConfig | None]:
    """Read the two sections the way the sender's config will."""
    data, lines = compose(text, "<test>")
    r = Reader(lines)
    top = r.mapping(data, "", ("shaping", "redis")) or {}
    shaping = parse_shaping(r, top.get("shaping"))
    redis = parse_redis(r, top.get("redis"))
    if r.errors:
        raise ConfigErrors(r.errors)
    return shaping, redis


def errors(text: str) -> dict[str, str]:
    """path -> message of every error in ``text``."""
    with pytest.raises(ConfigErrors) as info:
        parse(text)
    return {e.path: e.message for e in info.value.errors}


FULL = r"""
shaping:
  default: {connection_limit: 8, max_connection_rate: 30/min, max_message_rate: 20/s,
            max_deliveries_per_connection: 40, idle_timeout: 45s}
  providers:
    google:
      match: [".google.com", ".googlemail.com"]
      connection_limit: 3
      max_message_rate: 500/h
      max_deliveries_per_connection: 25
      idle_timeout: 10s
    example:
      match: [example.org]
      max_connection_rate: 2/sec
  sources:
    "203.0.113.10":
      max_message_rate: 100/hour
      connection_limit: 2
      providers:
        google: {max_message_rate: 50/h, connection_limit: 1}
  throttle:
    - {pattern: '^4\d\d 4\.7\.(0|28|650)', duration: 30m}
    - {pattern: 'TSS04', duration: 2h}
  lease_ttl: 5m
redis:
  url: redis://127.0.0.1:6379/0
  key_prefix: "pool1:"
  node_ttl: 15s
"""


# --------------------------------------------------------------------------
# Parsing


def test_every_documented_knob_is_read() -> None:
    shaping, redis = parse(FULL)
    assert shaping.default == Knobs(8, Rate(30, 60.0), Rate(20, 1.0), 40, 45.0)
    google = next(p for p in shaping.providers if p.name == "google")
    assert google.match == ("google.com", "googlemail.com")
    assert google.knobs == Knobs(3, None, Rate(500, 3600.0), 25, 10.0)
    example = next(p for p in shaping.providers if p.name == "example")
    assert example.match == ("example.org",)
    assert example.knobs == Knobs(max_connection_rate=Rate(2, 1.0))
    source = shaping.sources[SRC]
    assert source.knobs == Knobs(connection_limit=2, max_message_rate=Rate(100, 3600.0))
    assert source.providers == {
        "google": Knobs(connection_limit=1, max_message_rate=Rate(50, 3600.0))
    }
    assert [(t.pattern.pattern, t.duration) for t in shaping.throttle] == [
        (r"^4\d\d 4\.7\.(0|28|650)", 1800.0),
        ("TSS04", 7200.0),
    ]
    assert shaping.lease_ttl == 300.0
    assert redis == RedisConfig("redis://127.0.0.1:6379/0", "pool1:", 15.0)


def test_absent_sections_give_the_published_defaults() -> None:
    shaping, redis = parse("{}")
    assert redis is None  # a single node, in memory
    assert shaping == ShapingConfig()
    # The "default" row of shaping-providers.md.
    assert shaping.default == Knobs(10, Rate(100, 60.0), Rate(100, 1.0), 100, 60.0)
    assert shaping.lease_ttl == DEFAULT_LEASE_TTL == 600.0
    assert shaping.throttle == DEFAULT_THROTTLE


def test_builtin_provider_table_has_the_big_mailbox_providers() -> None:
    table = {p.name: p for p in BUILTIN_PROVIDERS}
    assert table["google"].match == ("google.com", "googlemail.com")
    assert table["google"].knobs.connection_limit == 5
    assert table["google"].knobs.max_deliveries_per_connection == 50
    assert table["yahoo"].match == ("yahoodns.net",)
    assert table["yahoo"].knobs.max_deliveries_per_connection == 20
    assert table["outlook"].match == ("olc.protection.outlook.com",)
    assert table["office365"].match == ("mail.protection.outlook.com", "mx.microsoft")
    for name in ("outlook", "office365"):
        assert table[name].knobs.connection_limit == 5
        assert table[name].knobs.max_deliveries_per_connection == 50


def test_partial_default_is_layered_over_the_builtin_default() -> None:
    shaping, _ = parse("shaping: {default: {connection_limit: 3}}")
    assert shaping.default == Knobs(3, Rate(100, 60.0), Rate(100, 1.0), 100, 60.0)


def test_user_provider_block_is_merged_over_the_builtin_by_name() -> None:
    shaping, _ = parse("shaping: {providers: {google: {connection_limit: 2}}}")
    google = next(p for p in shaping.providers if p.name == "google")
    assert google.match == ("google.com", "googlemail.com")  # kept
    assert google.knobs.connection_limit == 2  # overridden
    assert google.knobs.max_deliveries_per_connection == 50  # kept
    assert {p.name for p in shaping.providers} == {p.name for p in BUILTIN_PROVIDERS}


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/s", Rate(100, 1.0)),
        ("7/sec", Rate(7, 1.0)),
        ("10/min", Rate(10, 60.0)),
        ("10/m", Rate(10, 60.0)),
        ("5000/h", Rate(5000, 3600.0)),
        ("5000/hour", Rate(5000, 3600.0)),
        ("100000/d", Rate(100000, 86400.0)),
        ("100000/day", Rate(100000, 86400.0)),
        (" 3 / MIN ", Rate(3, 60.0)),
    ],
)
def test_rate_syntax(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("5/fortnight", "unknown period 'fortnight'"),
        ("0/s", "the count must be at least 1"),
        ("-5/s", "write a whole count"),
        ("1.5/s", "write a whole count"),
        ("100", "write a whole count"),
        (100, "write a count and a period"),
    ],
)
def test_bad_rates_say_what_is_wrong(text: Any, problem: str) -> None:
    value = repr(text) if isinstance(text, str) else text
    found = errors(f"shaping: {{default: {{max_message_rate: {value}}}}}")
    message = found["shaping.default.max_message_rate"]
    assert message.startswith("must be a rate like 100/s")
    assert problem in message


def test_unknown_keys_are_errors_naming_their_path() -> None:
    found = errors(
        """
shaping:
  defaults: {}
  default: {conection_limit: 3}
  providers: {google: {matches: [x.com]}}
  sources: {"192.0.2.1": {rate: 1/s, providers: {google: {limit: 1}}}}
  throttle: [{pattern: x, duration: 1m, action: suspend}]
redis: {url: "redis://127.0.0.1", ttl: 5s}
"""
    )
    assert set(found) == {
        "shaping.defaults",
        "shaping.default.conection_limit",
        "shaping.providers.google.matches",
        "shaping.sources.192.0.2.1.rate",
        "shaping.sources.192.0.2.1.providers.google.limit",
        "shaping.throttle[0].action",
        "redis.ttl",
    }
    assert all(m.startswith("unknown key") for m in found.values())


def test_negative_and_zero_limits_are_errors() -> None:
    found = errors("shaping: {default: {connection_limit: -1, max_deliveries_per_connection: 0}}")
    assert found == {
        "shaping.default.connection_limit": "must be a whole number >= 1, got -1",
        "shaping.default.max_deliveries_per_connection": "must be a whole number >= 1, got 0",
    }


def test_value_errors_name_their_paths() -> None:
    found = errors(
        """
shaping:
  default: {idle_timeout: 60}
  providers:
    newco: {connection_limit: 2}
    other: {match: []}
    bad: {match: ["not a host"]}
  sources:
    not-an-ip: {}
    "192.0.2.1": {providers: {nosuch: {connection_limit: 1}}}
  throttle:
    - {pattern: "(", duration: 1m}
    - {duration: 1m}
  lease_ttl: forever
redis: {url: "http://127.0.0.1", node_ttl: 0s}
"""
    )
    assert set(found) == {
        "shaping.default.idle_timeout",
        "shaping.providers.newco.match",
        "shaping.providers.other.match",
        "shaping.providers.bad.match[0]",
        "shaping.sources.not-an-ip",
        "shaping.sources.192.0.2.1.providers.nosuch",
        "shaping.throttle[0].pattern",
        "shaping.throttle[1].pattern",
        "shaping.lease_ttl",
        "redis.url",
        "redis.node_ttl",
    }
    assert "required for a provider that is not built in" in found["shaping.providers.newco.match"]
    assert "unknown provider" in found["shaping.sources.192.0.2.1.providers.nosuch"]
    assert "not a valid regular expression" in found["shaping.throttle[0].pattern"]
    assert "redis://" in found["redis.url"]


def test_errors_carry_their_line() -> None:
    with pytest.raises(ConfigErrors) as info:
        parse("shaping:\n  default:\n    max_message_rate: 5/fortnight\n")
    (error,) = info.value.errors
    assert error.line == 3


def test_redis_section_without_url_means_single_node() -> None:
    assert parse("redis: {key_prefix: 'x:'}")[1] is None
    assert parse("redis: {url: 'redis://10.0.0.5:6380/2'}")[1] == RedisConfig(
        "redis://10.0.0.5:6380/2", "mta:", 30.0
    )


def test_an_explicit_throttle_list_replaces_the_defaults() -> None:
    assert parse("shaping: {throttle: []}")[0].throttle == ()


# --------------------------------------------------------------------------
# Resolution


def test_path_limits_are_keyed_source_arrow_site() -> None:
    limits = ShapingConfig().limits_for(SRC, OTHER)
    assert limits.path_key == f"{SRC}->{OTHER}"
    (scope,) = limits.scopes
    assert scope == Scope(f"{SRC}->{OTHER}", 10, Rate(100, 60.0), 1, Rate(100, 1.0), 10)
    assert (limits.max_deliveries_per_connection, limits.idle_timeout) == (100, 60.0)
    assert limits.lease_ttl == DEFAULT_LEASE_TTL
    assert limits.provider is None


def test_provider_limits_are_counted_under_one_key_for_all_its_sites() -> None:
    config = ShapingConfig()
    gmail, workspace = config.limits_for(SRC, GMAIL), config.limits_for(SRC, WORKSPACE)
    assert gmail.provider == workspace.provider == "google"
    assert gmail.scopes[0].key == f"{SRC}->{GMAIL}"
    assert workspace.scopes[0].key == f"{SRC}->{WORKSPACE}"
    assert gmail.scopes[1] == workspace.scopes[1]
    assert gmail.scopes[1].key == f"{SRC}->provider:google"
    assert gmail.scopes[1].connection_limit == 5
    assert gmail.scopes[1].message_rate is None  # Google publishes no provider-wide rate
    assert gmail.max_deliveries_per_connection == 50  # the provider's, over the default's
    # Another source counts separately.
    assert config.limits_for("203.0.113.11", GMAIL).scopes[1].key == (
        "203.0.113.11->provider:google"
    )


def test_a_provider_without_shared_limits_adds_no_provider_key() -> None:
    limits = ShapingConfig().limits_for(SRC, YAHOO)
    assert limits.provider == "yahoo"
    assert len(limits.scopes) == 1
    assert limits.max_deliveries_per_connection == 20


@pytest.mark.parametrize(
    ("site", "provider"),
    [
        (GMAIL, "google"),
        ("google.com", "google"),  # the suffix's own domain
        ("mx.googlemail.com", "google"),
        ("MX.GOOGLEMAIL.COM.", "google"),
        ("evilgoogle.com", None),  # a label boundary is required
        ("google.com.evil.test", None),
        ("mx.example.org,aspmx.l.google.com", "google"),  # any host of the site
        ("x.mail.protection.outlook.com", "office365"),
        ("x.olc.protection.outlook.com", "outlook"),
        ("route:127.0.0.1:2525", None),
    ],
)
def test_provider_matching_by_mx_host_suffix(site: str, provider: str | None) -> None:
    found = ShapingConfig().provider_for(site)
    assert (found.name if found else None) == provider


def test_the_longest_matching_suffix_wins_over_list_order() -> None:
    shaping, _ = parse("shaping: {providers: {gsuite_mx: {match: [l.google.com]}}}")
    found = shaping.provider_for(WORKSPACE)
    assert found is not None
    assert found.name == "gsuite_mx"
    other = shaping.provider_for("mx.googlemail.com")
    assert other is not None
    assert other.name == "google"


def test_per_source_overrides_take_precedence() -> None:
    shaping, _ = parse(FULL)
    warm = shaping.limits_for(SRC, GMAIL)
    path, provider = warm.scopes
    # Source knobs over the default, on the path key.
    assert (path.connection_limit, path.message_rate) == (2, Rate(100, 3600.0))
    assert path.connection_rate == Rate(30, 60.0)  # not overridden: the default's
    # Source's provider knobs over the provider's, on the provider key.
    assert (provider.connection_limit, provider.message_rate) == (1, Rate(50, 3600.0))
    # Per-connection knobs: the provider's replace the path's.
    assert (warm.max_deliveries_per_connection, warm.idle_timeout) == (25, 10.0)
    # Another source gets the plain provider and default.
    cold = shaping.limits_for("203.0.113.99", GMAIL)
    assert (cold.scopes[0].connection_limit, cold.scopes[1].connection_limit) == (8, 3)
    assert cold.scopes[1].message_rate == Rate(500, 3600.0)


def test_sources_are_matched_in_canonical_ip_spelling() -> None:
    shaping, _ = parse('shaping: {sources: {"2001:DB8:0::1": {connection_limit: 1}}}')
    limits = shaping.limits_for("2001:db8::1", OTHER)
    assert limits.scopes[0].connection_limit == 1
    assert limits.path_key == f"2001:db8::1->{OTHER}"
    assert shaping.limits_for("2001:0db8::0001", OTHER).path_key == limits.path_key


def test_divided_limits_are_each_nodes_local_share() -> None:
    scope = Scope("k", 6, Rate(60, 60.0), 5, Rate(100, 1.0), 10)
    assert scope.divided(3) == Scope("k", 2, Rate(60, 180.0), 1, Rate(100, 3.0), 3)
    # Never below one connection or one token of burst.
    assert Scope("k", 2, None, 1, None, 1).divided(5) == Scope("k", 1, None, 1, None, 1)
    limits = ShapingConfig().limits_for(SRC, GMAIL)
    assert limits.divided(1) is limits
    divided = limits.divided(2)
    assert [s.connection_limit for s in divided.scopes] == [5, 2]
    assert divided.max_deliveries_per_connection == limits.max_deliveries_per_connection


@pytest.mark.parametrize(
    ("reply", "duration"),
    [
        ("421 4.7.28 Our system has detected an unusual rate of unsolicited mail", 1800.0),
        ("421 4.7.0 Try again later, closing connection. (EHLO)", 900.0),
        ("421 4.7.0 [TSS04] Messages from 203.0.113.10 temporarily deferred", 7200.0),
        ("451 4.7.0 [TSS04] temporarily deferred due to user complaints", 7200.0),
        ("451 4.7.650 The mail server [203.0.113.10] has been temporarily rate limited", 3600.0),
        ("450 4.2.1 mailbox busy", None),
        ("550 5.7.28 unusual rate", None),  # permanent: not a throttle
    ],
)
def test_default_throttle_patterns(reply: str, duration: float | None) -> None:
    rule = ShapingConfig().throttle_match(reply)
    assert (rule.duration if rule else None) == duration


def test_configured_throttle_patterns_match_in_order() -> None:
    shaping, _ = parse(FULL)
    rule = shaping.throttle_match("421 4.7.0 [TSS04] deferred")
    assert rule is not None
    assert rule.duration == 1800.0  # the first pattern matches before TSS04
    tss = shaping.throttle_match("451 4.3.2 [TSS04] deferred")
    assert tss is not None
    assert tss.duration == 7200.0


def test_the_default_knobs_must_be_complete() -> None:
    with pytest.raises(ValueError, match="must all be set"):
        ShapingConfig(default=Knobs(connection_limit=1))


# --------------------------------------------------------------------------
# GCRA


def run_gcra(times: list[float], rate: Rate, burst: int) -> list[bool]:
    tat: float | None = None
    out = []
    for now in times:
        decision = gcra.gcra(tat, now, rate, burst)
        if decision.allowed:
            tat = decision.new_tat
        out.append(decision.allowed)
    return out


def test_gcra_spaces_requests_one_interval_apart_with_burst_one() -> None:
    rate = Rate(10, 1.0)
    assert run_gcra([0.0, 0.05, 0.1, 0.15, 0.2], rate, 1) == [True, False, True, False, True]


def test_gcra_allows_burst_at_one_instant_then_refuses_with_retry_after() -> None:
    rate = Rate(50, 1.0)
    assert run_gcra([0.0] * 7, rate, 5) == [True] * 5 + [False] * 2
    tat: float | None = None
    for _ in range(5):
        tat = gcra.gcra(tat, 0.0, rate, 5).new_tat
    refused = gcra.gcra(tat, 0.0, rate, 5)
    assert not refused.allowed
    assert refused.new_tat == tat  # a refusal changes nothing
    assert refused.retry_after == pytest.approx(0.02)
    assert gcra.gcra(tat, refused.retry_after, rate, 5).allowed


@given(
    count=st.integers(1, 200),
    period=st.sampled_from([1.0, 60.0, 3600.0]),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=300),
)
def test_gcra_never_allows_more_than_burst_plus_window_over_rate(
    count: int, period: float, burst: int, gaps: list[float]
) -> None:
    rate = Rate(count, period)
    times = [0.0]
    for gap in gaps:
        times.append(times[-1] + gap * rate.interval)
    allowed = [t for t, ok in zip(times, run_gcra(times, rate, burst), strict=True) if ok]
    # Over every window [allowed[i], allowed[j]]: at most burst + elapsed / T, plus one.
    for i in range(len(allowed)):
        for j in range(i, min(len(allowed), i + 40)):
            elapsed = allowed[j] - allowed[i]
            assert j - i + 1 <= burst + elapsed / rate.interval + 1e-6


def test_gcra_allowed_count_over_a_window_matches_the_rate_within_one_burst() -> None:
    # A caller asking every millisecond for 20 s at 50/s.
    rate = Rate(50, 1.0)
    burst = default_burst(rate)
    times = [i / 1000 for i in range(20_000)]
    allowed = sum(run_gcra(times, rate, burst))
    expected = 20 * 50
    assert expected <= allowed <= expected + burst


def test_gcra_retry_after_lands_on_a_grant() -> None:
    rate = Rate(3, 1.0)  # an interval that is not a round float
    tat: float | None = None
    now, grants = 0.0, 0
    while now < 10.0:
        decision = gcra.gcra(tat, now, rate, 1)
        if decision.allowed:
            tat, grants = decision.new_tat, grants + 1
        else:
            now += decision.retry_after
            assert gcra.gcra(tat, now, rate, 1).allowed
    assert grants == 30


def test_gcra_quantity_takes_a_batch_of_tokens_at_once() -> None:
    rate = Rate(10, 1.0)
    first = gcra.gcra(None, 0.0, rate, 5, quantity=3)
    assert first.allowed
    assert first.new_tat == pytest.approx(0.3)
    second = gcra.gcra(first.new_tat, 0.0, rate, 5, quantity=3)  # 6 > burst 5
    assert not second.allowed
    assert second.retry_after == pytest.approx(0.1)
    assert gcra.gcra(first.new_tat, 0.0, rate, 5, quantity=2).allowed


def test_gcra_batch_larger_than_burst_waits_for_an_idle_bucket_and_keeps_the_rate() -> None:
    rate = Rate(10, 1.0)
    big = gcra.gcra(None, 0.0, rate, 2, quantity=5)
    assert big.allowed  # idle bucket
    assert big.new_tat == pytest.approx(0.5)  # paid for in full
    again = gcra.gcra(big.new_tat, 0.0, rate, 2, quantity=5)
    assert not again.allowed
    assert again.retry_after == pytest.approx(0.5)


def test_gcra_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="burst"):
        gcra.gcra(None, 0.0, Rate(1, 1.0), 0)
    with pytest.raises(ValueError, match="quantity"):
        gcra.gcra(None, 0.0, Rate(1, 1.0), 1, quantity=0)
    with pytest.raises(ValueError, match="count >= 1"):
        Rate(0, 1.0)


@pytest.mark.parametrize(
    ("rate", "burst"),
    [
        (Rate(50, 1.0), 5),
        (Rate(100, 1.0), 10),
        (Rate(100, 60.0), 1),
        (Rate(100, 3600.0), 1),
        (Rate(100000, 86400.0), 1),
        (Rate(1, 0.01), 1),  # never more than the count
    ],
)
def test_default_burst_is_a_tenth_of_a_second_of_the_rate(rate: Rate, burst: int) -> None:
    assert default_burst(rate) == burst


# --------------------------------------------------------------------------
# Leases


def test_lease_limit_holds() -> None:
    members: dict[str, float] = {}
    granted = [leases.acquire(members, 0.0, 2, f"l{i}", 10.0) for i in range(4)]
    assert granted == [True, True, False, False]
    assert set(members) == {"l0", "l1"}


def test_acquiring_a_held_lease_again_refreshes_it_without_counting_twice() -> None:
    members: dict[str, float] = {}
    assert leases.acquire(members, 0.0, 1, "a", 10.0)
    assert leases.acquire(members, 5.0, 1, "a", 10.0)
    assert members == {"a": 15.0}


def test_lease_expiry_frees_the_slot() -> None:
    members: dict[str, float] = {}
    assert leases.acquire(members, 0.0, 1, "a", 10.0)
    assert not leases.acquire(members, 9.999, 1, "b", 10.0)
    assert leases.acquire(members, 10.0, 1, "b", 10.0)  # expiring at now is expired
    assert set(members) == {"b"}


def test_extend_keeps_a_live_lease_and_refuses_a_lost_one() -> None:
    members: dict[str, float] = {}
    leases.acquire(members, 0.0, 1, "a", 10.0)
    assert leases.extend(members, 8.0, "a", 10.0)
    assert members["a"] == 18.0
    assert not leases.extend(members, 18.0, "a", 10.0)  # expired
    assert not leases.extend(members, 0.0, "never", 10.0)
    assert members == {}


def test_release_frees_the_slot_at_once() -> None:
    members: dict[str, float] = {}
    leases.acquire(members, 0.0, 1, "a", 10.0)
    leases.release(members, "a")
    leases.release(members, "a")  # twice is harmless
    assert leases.acquire(members, 0.0, 1, "b", 10.0)
    assert leases.next_expiry(members) == 10.0


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["acquire", "extend", "release"]), st.integers(0, 5)),
        max_size=100,
    ),
    limit=st.integers(1, 3),
)
def test_leases_never_exceed_the_limit(ops: list[tuple[str, int]], limit: int) -> None:
    members: dict[str, float] = {}
    now = 0.0
    for op, who in ops:
        now += 0.7
        lease_id = f"l{who}"
        if op == "acquire":
            leases.acquire(members, now, limit, lease_id, 2.0)
        elif op == "extend":
            leases.extend(members, now, lease_id, 2.0)
        else:
            leases.release(members, lease_id)
        leases.prune(members, now)
        assert len(members) <= limit
        assert all(expiry > now for expiry in members.values())


# --------------------------------------------------------------------------
# The pure modules stay pure


def test_default_knobs_constant_matches_the_table() -> None:
    assert DEFAULT_KNOBS.max_message_rate is not None
    assert math.isclose(DEFAULT_KNOBS.max_message_rate.per_second, 100.0)
