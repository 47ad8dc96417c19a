"""The retry schedule: pure, driven by explicit ``now`` values and seeded rngs."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta_client.retry import Expire, RetryAt, RetryPolicy

DAY = 86400.0
EXACT = RetryPolicy(jitter=0.0)

# Any valid policy: initial > 0, max >= initial, max_age > 0, 0 <= jitter < 1.
policies = st.builds(
    lambda initial, factor, max_age, jitter: RetryPolicy(
        initial, initial * factor, max_age, jitter
    ),
    st.floats(min_value=1e-3, max_value=1e5),
    st.floats(min_value=1.0, max_value=1e4),
    st.floats(min_value=1.0, max_value=1e7),
    st.floats(min_value=0.0, max_value=0.99),
)
nows = st.floats(min_value=0.0, max_value=4e9)  # epoch seconds, into the 22nd century


def test_defaults_are_postfix_like_five_minutes_four_hours_five_days() -> None:
    policy = RetryPolicy()
    assert (policy.initial, policy.max, policy.max_age, policy.jitter) == (
        300.0,
        4 * 3600.0,
        5 * DAY,
        0.1,
    )


def test_the_interval_doubles_from_initial_and_stops_at_the_cap() -> None:
    intervals = [EXACT.interval(n) for n in range(1, 9)]
    assert intervals == [300.0, 600.0, 1200.0, 2400.0, 4800.0, 9600.0, 14400.0, 14400.0]


def test_a_huge_attempt_count_gives_the_cap_instead_of_overflowing() -> None:
    assert EXACT.interval(10**6) == EXACT.max
    assert EXACT.interval(10**30) == EXACT.max


def test_there_is_no_interval_before_the_first_failure() -> None:
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        EXACT.interval(0)


def test_without_jitter_the_next_attempt_is_now_plus_the_interval() -> None:
    rng = random.Random(1)
    assert EXACT.next_attempt(1, 1000.0, rng) == 1300.0
    assert EXACT.next_attempt(3, 1000.0, rng) == 2200.0
    assert EXACT.next_attempt(20, 1000.0, rng) == 1000.0 + 4 * 3600.0


def test_jitter_stays_within_its_fraction_of_the_interval_and_varies() -> None:
    policy = RetryPolicy(jitter=0.1)
    rng = random.Random(7)
    waits = [policy.next_attempt(2, 5000.0, rng) - 5000.0 for _ in range(2000)]
    assert all(540.0 <= wait <= 660.0 for wait in waits)
    # It spreads: both halves of the band are used, and nearly every draw differs.
    assert min(waits) < 560.0
    assert max(waits) > 640.0
    assert len(set(waits)) > 1990


def test_jitter_comes_from_the_given_rng_so_a_seed_reproduces_the_schedule() -> None:
    policy = RetryPolicy()
    first = [policy.next_attempt(n, 0.0, random.Random(3)) for n in range(1, 6)]
    second = [policy.next_attempt(n, 0.0, random.Random(3)) for n in range(1, 6)]
    assert first == second


def test_a_retry_past_the_expiry_is_pulled_in_to_the_expiry() -> None:
    received = 0.0
    expiry = received + EXACT.max_age
    now = expiry - 600.0  # a 4 h wait would overshoot by 3 h 50 min
    assert EXACT.next_attempt(10, now, random.Random(), received=received) == expiry


def test_a_retry_before_the_expiry_is_not_clamped() -> None:
    now = 1 * DAY
    assert EXACT.next_attempt(1, now, random.Random(), received=0.0) == now + 300.0


def test_next_attempt_refuses_a_message_that_has_expired() -> None:
    with pytest.raises(ValueError, match="bounce it"):
        EXACT.next_attempt(5, 5 * DAY, random.Random(), received=0.0)


def test_a_message_expires_exactly_at_max_age() -> None:
    assert not EXACT.expired(received=100.0, now=100.0 + 5 * DAY - 0.001)
    assert EXACT.expired(received=100.0, now=100.0 + 5 * DAY)
    assert EXACT.expired(received=100.0, now=100.0 + 6 * DAY)


def test_schedule_gives_a_final_try_at_the_expiry_then_expires() -> None:
    policy = RetryPolicy(max_age=1000.0, jitter=0.0)
    rng = random.Random(0)
    received, now, attempts = 0.0, 0.0, 1
    decisions: list[RetryAt | Expire] = []
    while True:
        decision = policy.schedule(attempts, received, now, rng)
        decisions.append(decision)
        if isinstance(decision, Expire):
            break
        now, attempts = decision.at, attempts + 1
    # 300, then 300 + 600 = 900, then 1800 would overshoot: clamped to 1000.
    assert decisions == [
        RetryAt(300.0),
        RetryAt(900.0),
        RetryAt(1000.0, final=True),
        Expire(1000.0),
    ]


def test_schedule_expires_a_message_that_failed_after_its_expiry() -> None:
    assert EXACT.schedule(3, 0.0, 6 * DAY, random.Random()) == Expire(6 * DAY)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"initial": 0.0}, "initial must be"),
        ({"initial": -1.0}, "initial must be"),
        ({"initial": math.nan}, "initial must be"),
        ({"initial": math.inf}, "initial must be"),
        ({"initial": 600.0, "max": 300.0}, "max must be"),
        ({"max": math.inf}, "max must be"),
        ({"max_age": 0.0}, "max_age must be"),
        ({"max_age": math.nan}, "max_age must be"),
        ({"jitter": -0.1}, "jitter must be"),
        ({"jitter": 1.0}, "jitter must be"),
        ({"jitter": math.nan}, "jitter must be"),
    ],
)
def test_invalid_policies_are_refused_naming_the_field(
    kwargs: dict[str, float], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        RetryPolicy(**kwargs)


@given(policies, st.integers(min_value=1, max_value=2000))
def test_nominal_intervals_never_decrease_and_stay_within_initial_and_max(
    policy: RetryPolicy, attempts: int
) -> None:
    assert policy.initial <= policy.interval(attempts) <= policy.max
    assert policy.interval(attempts) <= policy.interval(attempts + 1)


@given(policies, st.integers(min_value=1, max_value=100), nows, st.integers(0, 2**32))
def test_the_next_attempt_is_always_after_now_and_within_the_jitter_band(
    policy: RetryPolicy, attempts: int, now: float, seed: int
) -> None:
    at = policy.next_attempt(attempts, now, random.Random(seed))
    assert at > now
    nominal = policy.interval(attempts)
    slack = 1e-9 * max(now, 1.0)  # float rounding of the sum
    assert now + nominal * (1 - policy.jitter) - slack <= at
    assert at <= now + nominal * (1 + policy.jitter) + slack


@given(policies, st.integers(min_value=1, max_value=100), nows, st.floats(0.0, 1.0), st.integers())
def test_a_scheduled_retry_is_after_now_and_never_after_the_expiry(
    policy: RetryPolicy, attempts: int, received: float, fraction: float, seed: int
) -> None:
    now = received + fraction * policy.max_age
    decision = policy.schedule(attempts, received, now, random.Random(seed))
    if isinstance(decision, Expire):
        assert policy.expired(received, now)
        return
    assert now < decision.at <= received + policy.max_age
    assert decision.final == (decision.at == received + policy.max_age)
