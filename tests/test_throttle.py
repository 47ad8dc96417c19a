"""The authentication-failure throttle: pure, driven by explicit ``now`` values."""

from __future__ import annotations

import ipaddress

from kumoproxy.throttle import FIRST_DELAY, FORGET_AFTER, MAX_DELAY, AuthThrottle

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")


def test_each_consecutive_failure_doubles_the_delay_up_to_the_cap() -> None:
    throttle = AuthThrottle()
    delays = [throttle.record_failure(A, now=float(i)) for i in range(8)]
    assert delays[:4] == [FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY, 8 * FIRST_DELAY]
    assert max(delays) == MAX_DELAY
    assert delays == sorted(delays)


def test_addresses_are_counted_separately() -> None:
    throttle = AuthThrottle()
    for now in range(5):
        throttle.record_failure(A, now=float(now))
    assert throttle.record_failure(B, now=5.0) == FIRST_DELAY
    assert throttle.failures(A, now=5.0) == 5


def test_a_success_forgives_the_address() -> None:
    throttle = AuthThrottle()
    for now in range(3):
        throttle.record_failure(A, now=float(now))
    throttle.record_success(A)
    assert throttle.failures(A, now=3.0) == 0
    assert throttle.record_failure(A, now=4.0) == FIRST_DELAY


def test_a_quiet_period_forgives_the_address() -> None:
    throttle = AuthThrottle()
    for now in range(4):
        throttle.record_failure(A, now=float(now))
    later = 3.0 + FORGET_AFTER + 1
    assert throttle.failures(A, now=later) == 0
    assert throttle.record_failure(A, now=later) == FIRST_DELAY


def test_the_table_is_bounded_and_drops_the_oldest_address_first() -> None:
    throttle = AuthThrottle(max_tracked=2)
    c = ipaddress.ip_address("192.0.2.3")
    throttle.record_failure(A, now=0.0)
    throttle.record_failure(B, now=1.0)
    throttle.record_failure(c, now=2.0)
    assert throttle.failures(A, now=2.0) == 0  # evicted
    assert throttle.failures(B, now=2.0) == 1
    assert throttle.failures(c, now=2.0) == 1
