"""Egress selection: smooth weighted round robin and suspensions, with explicit ``now``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta_client.config import PoolEntry
from mta_client.pool import FIRST_SUSPENSION, MAX_SUSPENSION, EgressPool


def entry(source: str, weight: int = 1) -> PoolEntry:
    return PoolEntry(ip_address(source), ehlo="mta.example", weight=weight)


A = entry("192.0.2.1")
B = entry("192.0.2.2")
C = entry("192.0.2.3", weight=2)
V6 = entry("2001:db8::1")
V6_HEAVY = entry("2001:db8::2", weight=3)


def picks(pool: EgressPool, count: int, now: float = 0.0, family: int = 4) -> list[PoolEntry]:
    chosen = [pool.choose(family, now) for _ in range(count)]
    assert None not in chosen
    return [e for e in chosen if e is not None]


def windows(sequence: list[PoolEntry], size: int) -> Iterable[Counter[PoolEntry]]:
    for start in range(len(sequence) - size + 1):
        yield Counter(sequence[start : start + size])


def test_weights_1_1_2_give_exact_shares_in_every_window_of_four() -> None:
    pool = EgressPool([A, B, C])
    sequence = picks(pool, 400)
    for window in windows(sequence, 4):
        assert window == Counter({A: 1, B: 1, C: 2})


def test_choices_interleave_instead_of_bursting_the_heavy_entry() -> None:
    pool = EgressPool([A, B, C])
    # nginx's order for 1:1:2: the heavy entry never goes twice in a row
    # within a cycle, and ties go to pool order.
    assert picks(pool, 4) == [C, A, B, C]


def test_a_suspended_entrys_share_goes_to_the_others_in_proportion() -> None:
    pool = EgressPool([A, B, C])
    pool.suspend(A, now=0.0, reason="socks5 reply 5")
    sequence = picks(pool, 300, now=1.0)
    assert A not in sequence
    assert Counter(sequence) == Counter({B: 100, C: 200})
    for window in windows(sequence, 3):
        assert window == Counter({B: 1, C: 2})


def test_a_suspended_heavy_entry_leaves_the_light_ones_alternating() -> None:
    pool = EgressPool([A, B, C])
    pool.suspend(C, now=0.0, reason="bind failed")
    assert Counter(picks(pool, 100, now=1.0)) == Counter({A: 50, B: 50})


def test_an_entry_gets_traffic_again_when_its_suspension_ends() -> None:
    pool = EgressPool([A, B, C])
    picks(pool, 5)
    until = pool.suspend(C, now=10.0, reason="bind failed")
    assert C not in picks(pool, 7, now=until - 0.001)
    # Its score was frozen while suspended: it is back within one cycle of 4.
    assert C in picks(pool, 4, now=until)
    # Back to its share for good: long-run counts within 2 of the exact shares.
    sequence = picks(pool, 1000, now=until)
    counts = Counter(sequence)
    assert abs(counts[A] - 250) <= 2
    assert abs(counts[B] - 250) <= 2
    assert abs(counts[C] - 500) <= 2


def test_excluded_entries_are_not_chosen() -> None:
    pool = EgressPool([A, B, C])
    for _ in range(20):
        assert pool.choose(4, 0.0, exclude={C}) in (A, B)
    assert pool.choose(4, 0.0, exclude=[A, B, C]) is None


def test_exclude_does_not_suspend() -> None:
    pool = EgressPool([A, B])
    pool.choose(4, 0.0, exclude=(A,))
    assert pool.suspended(0.0) == []
    assert A in picks(pool, 2)


def test_choices_are_limited_to_the_requested_family() -> None:
    pool = EgressPool([A, V6, B, V6_HEAVY])
    assert set(picks(pool, 20, family=4)) == {A, B}
    assert Counter(picks(pool, 40, family=6)) == Counter({V6: 10, V6_HEAVY: 30})


def test_an_ipv6_only_pool_has_nothing_for_ipv4() -> None:
    pool = EgressPool([V6])
    assert pool.choose(4, 0.0) is None
    assert pool.choose(6, 0.0) == V6
    assert pool.families(0.0) == frozenset({6})


def test_families_lists_versions_with_a_usable_entry() -> None:
    pool = EgressPool([A, V6])
    assert pool.families(0.0) == frozenset({4, 6})
    until = pool.suspend(V6, now=0.0, reason="no route")
    assert pool.families(1.0) == frozenset({4})
    assert pool.families(until) == frozenset({4, 6})


def test_a_fully_suspended_pool_chooses_nothing_and_says_when_it_resumes() -> None:
    pool = EgressPool([A, B])
    until_a = pool.suspend(A, now=0.0, reason="a")
    until_b = pool.suspend(B, now=5.0, reason="b")
    assert pool.choose(4, 6.0) is None
    assert pool.families(6.0) == frozenset()
    assert pool.next_resume(6.0) == until_a == 60.0
    assert pool.next_resume(until_a) == until_b == 65.0
    assert pool.next_resume(until_b) is None


def test_suspension_starts_at_a_minute_and_doubles_up_to_fifteen_minutes() -> None:
    pool = EgressPool([A])
    lengths = []
    now = 0.0
    for _ in range(7):
        until = pool.suspend(A, now, "refused")
        lengths.append(until - now)
        now = until  # it failed again right after resuming
    assert FIRST_SUSPENSION == 60.0
    assert MAX_SUSPENSION == 900.0
    assert lengths == [60.0, 120.0, 240.0, 480.0, 900.0, 900.0, 900.0]


def test_a_success_makes_the_next_suspension_short_again() -> None:
    pool = EgressPool([A])
    now = 0.0
    for _ in range(3):
        now = pool.suspend(A, now, "refused")
    pool.succeeded(A)
    assert pool.suspend(A, now, "refused") == now + FIRST_SUSPENSION


def test_a_success_does_not_lift_a_suspension_in_force() -> None:
    pool = EgressPool([A, B])
    until = pool.suspend(A, now=0.0, reason="refused")
    pool.succeeded(A)  # a delivery that started before the suspension
    assert pool.suspended(1.0) == [(A, until, "refused")]


def test_failures_during_a_suspension_do_not_lengthen_it() -> None:
    pool = EgressPool([A])
    until = pool.suspend(A, now=0.0, reason="first")
    # Concurrent deliveries on A report the same outage a moment later.
    assert pool.suspend(A, now=1.0, reason="second") == until
    assert pool.suspend(A, now=2.0, reason="third") == until
    assert pool.suspended(3.0) == [(A, until, "first")]
    # The next real suspension is only the second step.
    assert pool.suspend(A, now=until, reason="again") == until + 2 * FIRST_SUSPENSION


def test_suspended_lists_entry_until_and_reason_in_pool_order() -> None:
    pool = EgressPool([A, B, C])
    until_c = pool.suspend(C, now=0.0, reason="bind failed")
    until_a = pool.suspend(A, now=10.0, reason="socks5 reply 2")
    assert pool.suspended(20.0) == [(A, until_a, "socks5 reply 2"), (C, until_c, "bind failed")]
    assert pool.suspended(until_c) == [(A, until_a, "socks5 reply 2")]
    assert pool.suspended(until_a) == []


def test_entries_not_in_the_pool_are_refused() -> None:
    pool = EgressPool([A])
    with pytest.raises(ValueError, match="not in this pool"):
        pool.suspend(B, 0.0, "x")
    with pytest.raises(ValueError, match="not in this pool"):
        pool.succeeded(B)


def test_a_source_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        EgressPool([A, B, A])


def test_an_empty_pool_chooses_nothing() -> None:
    pool = EgressPool([])
    assert pool.choose(4, 0.0) is None
    assert pool.families(0.0) == frozenset()
    assert pool.next_resume(0.0) is None


@given(st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=6))
def test_over_each_full_cycle_from_a_fresh_pool_every_entry_gets_exactly_its_weight(
    weights: list[int],
) -> None:
    entries = [entry(f"192.0.2.{i + 1}", weight) for i, weight in enumerate(weights)]
    pool = EgressPool(entries)
    total = sum(weights)
    sequence = picks(pool, 3 * total)
    for cycle in range(3):
        counts = Counter(sequence[cycle * total : (cycle + 1) * total])
        assert counts == Counter(dict(zip(entries, weights, strict=True)))


@given(
    st.lists(st.integers(min_value=1, max_value=10), min_size=2, max_size=6),
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=5), st.booleans()), min_size=1, max_size=60
    ),
)
def test_long_run_shares_stay_within_a_bound_whatever_was_suspended_or_excluded(
    weights: list[int], disturbances: list[tuple[int, bool]]
) -> None:
    entries = [entry(f"192.0.2.{i + 1}", weight) for i, weight in enumerate(weights)]
    pool = EgressPool(entries)
    now = 0.0
    # Disturb the round robin: choose with random exclusions and suspensions.
    for index, suspend in disturbances:
        target = entries[index % len(entries)]
        if suspend:
            pool.suspend(target, now, "test")
        pool.choose(4, now, exclude={target})
        now += 7.0
    now += MAX_SUSPENSION  # everything has resumed
    total = sum(weights)
    rounds = 50 * total
    counts = Counter(picks(pool, rounds, now=now))
    for e in entries:
        # Running scores stay bounded, so the deviation from the exact share does too.
        assert abs(counts[e] - rounds * e.weight / total) <= 2
