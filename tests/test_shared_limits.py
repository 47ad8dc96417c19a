"""Shared limits: LimitTracker's semantics, summed exactly over worker processes.

Unit behaviour runs against both :class:`LimitTracker` and
:class:`SharedLimitTracker`, and a hypothesis property replays random
operations through both. Exactness under contention, SIGKILLed workers and a
worker dying in the middle of a rebuild use real processes (``spawn``).
"""

from __future__ import annotations

import fcntl
import ipaddress
import multiprocessing
import os
import random
import signal
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumoproxy.config import IPAddress, LimitsConfig
from kumoproxy.limits import Limiter, LimitKind, LimitTracker
from kumoproxy.shared_limits import (
    MIN_CAPACITY,
    SharedLimitsError,
    SharedLimitTable,
    SharedLimitTracker,
    capacity_for,
    sessions_held,
)

CLIENT = ipaddress.ip_address("192.0.2.1")
OTHER_CLIENT = ipaddress.ip_address("2001:db8::1")
SOURCE = ipaddress.ip_address("198.51.100.1")
OTHER_SOURCE = ipaddress.ip_address("2001:db8:1::1")
DEST = ipaddress.ip_address("203.0.113.5")
OTHER_DEST = ipaddress.ip_address("2001:db8:2::25")
ROOMY = LimitsConfig(max_sessions=10**6, per_client=10**6, per_source=10**6)

#: Bounds every wait on another process, so a broken child fails the test
#: instead of hanging it. Never reached when things work.
PROCESS_TIMEOUT = 60.0

SPAWN = multiprocessing.get_context("spawn")

LimiterFactory = Callable[[LimitsConfig], Limiter]


@pytest.fixture
def table(tmp_path: Path) -> Iterator[SharedLimitTable]:
    with SharedLimitTable.create(tmp_path / "limits", workers=2, capacity=64) as created:
        yield created


@pytest.fixture(params=["LimitTracker", "SharedLimitTracker"])
def make_limiter(request: pytest.FixtureRequest, table: SharedLimitTable) -> LimiterFactory:
    if request.param == "LimitTracker":
        return LimitTracker
    return lambda limits: SharedLimitTracker(table, 1, limits)


def test_shared_limit_tracker_is_a_limiter(table: SharedLimitTable) -> None:
    # mypy checks this line: the protocol conformance is pinned statically.
    limiter: Limiter = SharedLimitTracker(table, 0, LimitsConfig())
    assert limiter.limit_value(LimitKind.PER_SOURCE) == LimitsConfig().per_source


# -- semantics shared with LimitTracker ---------------------------------------


def test_max_sessions_refuses_at_its_value_and_takes_nothing(
    make_limiter: LimiterFactory,
) -> None:
    limiter = make_limiter(LimitsConfig(max_sessions=2, per_client=10))
    assert limiter.admit_session(CLIENT) is None
    assert limiter.admit_session(OTHER_CLIENT) is None
    assert limiter.admit_session(CLIENT) is LimitKind.MAX_SESSIONS
    assert limiter.client_sessions(CLIENT) == 1
    assert limiter.client_sessions(OTHER_CLIENT) == 1


def test_per_client_refuses_at_its_value_for_that_client_only(
    make_limiter: LimiterFactory,
) -> None:
    limiter = make_limiter(LimitsConfig(max_sessions=10, per_client=2))
    assert limiter.admit_session(CLIENT) is None
    assert limiter.admit_session(CLIENT) is None
    assert limiter.admit_session(CLIENT) is LimitKind.PER_CLIENT
    assert limiter.client_sessions(CLIENT) == 2
    assert limiter.admit_session(OTHER_CLIENT) is None


def test_max_sessions_is_checked_before_per_client(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(LimitsConfig(max_sessions=1, per_client=1))
    assert limiter.admit_session(CLIENT) is None
    assert limiter.admit_session(CLIENT) is LimitKind.MAX_SESSIONS


def test_per_source_refuses_at_its_value_and_takes_nothing(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(LimitsConfig(per_source=2, per_source_destination=1))
    assert limiter.admit_egress(SOURCE, DEST) is None
    assert limiter.admit_egress(SOURCE, OTHER_DEST) is None
    # Checked before per_source_destination, which DEST is also at.
    assert limiter.admit_egress(SOURCE, DEST) is LimitKind.PER_SOURCE
    assert limiter.source_connections(SOURCE) == 2
    assert limiter.admit_egress(OTHER_SOURCE, DEST) is None
    assert limiter.source_connections(OTHER_SOURCE) == 1


def test_per_source_destination_refuses_at_its_value_and_takes_nothing(
    make_limiter: LimiterFactory,
) -> None:
    limiter = make_limiter(LimitsConfig(per_source=10, per_source_destination=2))
    assert limiter.admit_egress(SOURCE, DEST) is None
    assert limiter.admit_egress(SOURCE, DEST) is None
    assert limiter.admit_egress(SOURCE, DEST) is LimitKind.PER_SOURCE_DESTINATION
    assert limiter.source_connections(SOURCE) == 2
    assert limiter.admit_egress(SOURCE, OTHER_DEST) is None
    assert limiter.source_connections(SOURCE) == 3


def test_release_frees_the_slot_for_the_next_admit(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(LimitsConfig(max_sessions=1, per_source=1))
    assert limiter.admit_session(CLIENT) is None
    assert limiter.admit_egress(SOURCE, DEST) is None
    limiter.release_session(CLIENT)
    limiter.release_egress(SOURCE, DEST)
    assert limiter.client_sessions(CLIENT) == 0
    assert limiter.source_connections(SOURCE) == 0
    assert limiter.admit_session(OTHER_CLIENT) is None
    assert limiter.admit_egress(SOURCE, OTHER_DEST) is None


def test_lowered_limit_refuses_until_enough_are_released(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(LimitsConfig(per_source=3))
    for destination in (DEST, OTHER_DEST, DEST):
        assert limiter.admit_egress(SOURCE, destination) is None
    limiter.limits = LimitsConfig(per_source=1)
    assert limiter.limit_value(LimitKind.PER_SOURCE) == 1
    assert limiter.admit_egress(SOURCE, OTHER_DEST) is LimitKind.PER_SOURCE
    limiter.release_egress(SOURCE, DEST)
    assert limiter.admit_egress(SOURCE, OTHER_DEST) is LimitKind.PER_SOURCE
    limiter.release_egress(SOURCE, DEST)
    limiter.release_egress(SOURCE, OTHER_DEST)
    assert limiter.admit_egress(SOURCE, OTHER_DEST) is None


def test_releasing_a_session_twice_raises(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(LimitsConfig())
    assert limiter.admit_session(CLIENT) is None
    limiter.release_session(CLIENT)
    with pytest.raises(AssertionError, match="released twice"):
        limiter.release_session(CLIENT)


def test_releasing_an_egress_slot_twice_raises(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(LimitsConfig())
    assert limiter.admit_egress(SOURCE, DEST) is None
    limiter.release_egress(SOURCE, DEST)
    with pytest.raises(AssertionError, match="released twice"):
        limiter.release_egress(SOURCE, DEST)


CLIENTS = [CLIENT, OTHER_CLIENT, ipaddress.ip_address("192.0.2.2")]
SOURCES = [SOURCE, OTHER_SOURCE]
DESTS = [ipaddress.ip_address(f"203.0.113.{i}") for i in range(1, 5)] + [
    ipaddress.ip_address(f"2001:db8:2::{i}") for i in range(1, 5)
]
small_limits = st.builds(
    LimitsConfig,
    max_sessions=st.integers(1, 4),
    per_client=st.integers(1, 3),
    per_source=st.integers(1, 3),
    per_source_destination=st.integers(1, 2),
)
OPS = ["session", "end_session", "egress", "end_egress", "limits"]


@settings(max_examples=300, deadline=None)
@given(
    limit_sets=st.lists(small_limits, min_size=1, max_size=3),
    ops=st.lists(
        st.tuples(st.sampled_from(OPS), st.integers(0, 1), st.integers(0, 7), st.integers(0, 7)),
        max_size=120,
    ),
)
def test_two_shared_trackers_answer_like_one_limit_tracker(
    limit_sets: list[LimitsConfig], ops: list[tuple[str, int, int, int]]
) -> None:
    # Capacity 16 holds every live key these pools and limits allow (at most
    # 12), but far fewer than the distinct keys, so slots are reused and the
    # table rebuilt along the way.
    with (
        tempfile.TemporaryDirectory() as directory,
        SharedLimitTable.create(Path(directory) / "t", workers=2, capacity=16) as table,
    ):
        local = LimitTracker(limit_sets[0])
        shared = [SharedLimitTracker(table, worker, limit_sets[0]) for worker in (0, 1)]
        sessions: list[list[IPAddress]] = [[], []]
        egress: list[list[tuple[IPAddress, IPAddress]]] = [[], []]
        for op, worker, a, b in ops:
            tracker = shared[worker]
            if op == "session":
                client = CLIENTS[a % len(CLIENTS)]
                answer = tracker.admit_session(client)
                assert answer == local.admit_session(client)
                if answer is None:
                    sessions[worker].append(client)
            elif op == "end_session" and sessions[worker]:
                client = sessions[worker].pop(a % len(sessions[worker]))
                tracker.release_session(client)
                local.release_session(client)
            elif op == "egress":
                pair = (SOURCES[a % len(SOURCES)], DESTS[b])
                answer = tracker.admit_egress(*pair)
                assert answer == local.admit_egress(*pair)
                if answer is None:
                    egress[worker].append(pair)
            elif op == "end_egress" and egress[worker]:
                pair = egress[worker].pop(a % len(egress[worker]))
                tracker.release_egress(*pair)
                local.release_egress(*pair)
            elif op == "limits":
                local.limits = limit_sets[a % len(limit_sets)]
                for each in shared:
                    each.limits = local.limits
            assert tracker.sessions == local.sessions
            assert [tracker.client_sessions(c) for c in CLIENTS] == [
                local.client_sessions(c) for c in CLIENTS
            ]
            assert [table.source_connections(s) for s in SOURCES] == [
                local.source_connections(s) for s in SOURCES
            ]


# -- the shared table in one process ------------------------------------------


def test_trackers_of_different_workers_share_totals(table: SharedLimitTable) -> None:
    limits = LimitsConfig(max_sessions=3, per_client=2, per_source=3, per_source_destination=2)
    first = SharedLimitTracker(table, 0, limits)
    second = SharedLimitTracker(table, 1, limits)
    assert first.admit_session(CLIENT) is None
    assert second.admit_session(CLIENT) is None
    assert first.admit_session(CLIENT) is LimitKind.PER_CLIENT
    assert second.admit_session(OTHER_CLIENT) is None
    assert first.admit_session(OTHER_CLIENT) is LimitKind.MAX_SESSIONS
    assert (first.sessions, second.client_sessions(CLIENT)) == (3, 2)
    assert first.admit_egress(SOURCE, DEST) is None
    assert second.admit_egress(SOURCE, DEST) is None
    assert first.admit_egress(SOURCE, DEST) is LimitKind.PER_SOURCE_DESTINATION
    assert second.admit_egress(SOURCE, OTHER_DEST) is None
    assert first.admit_egress(SOURCE, OTHER_DEST) is LimitKind.PER_SOURCE
    assert table.source_connections(SOURCE) == first.source_connections(SOURCE) == 3
    second.release_session(CLIENT)
    assert first.admit_session(OTHER_CLIENT) is None


def test_a_worker_cannot_release_a_slot_another_worker_took(table: SharedLimitTable) -> None:
    taker = SharedLimitTracker(table, 0, LimitsConfig())
    other = SharedLimitTracker(table, 1, LimitsConfig())
    assert taker.admit_egress(SOURCE, DEST) is None
    with pytest.raises(AssertionError, match="released twice"):
        other.release_egress(SOURCE, DEST)
    assert table.source_connections(SOURCE) == 1


def test_reset_worker_frees_only_that_workers_slots(table: SharedLimitTable) -> None:
    dead = SharedLimitTracker(table, 0, ROOMY)
    alive = SharedLimitTracker(table, 1, ROOMY)
    for tracker in (dead, dead, alive):
        assert tracker.admit_session(CLIENT) is None
        assert tracker.admit_egress(SOURCE, DEST) is None
    table.reset_worker(0)
    assert (table.sessions(), alive.client_sessions(CLIENT)) == (1, 1)
    assert table.source_connections(SOURCE) == 1
    alive.release_session(CLIENT)
    alive.release_egress(SOURCE, DEST)
    assert (table.sessions(), table.source_connections(SOURCE)) == (0, 0)


def test_attached_table_sees_the_creators_counts(table: SharedLimitTable) -> None:
    assert SharedLimitTracker(table, 0, ROOMY).admit_egress(SOURCE, DEST) is None
    with SharedLimitTable.attach(table.path) as attached:
        assert (attached.workers, attached.capacity) == (2, 64)
        assert attached.source_connections(SOURCE) == 1


def test_released_keys_slots_are_reused_without_rebuilding(table: SharedLimitTable) -> None:
    tracker = SharedLimitTracker(table, 0, ROOMY)
    for _ in range(1000):
        assert tracker.admit_egress(SOURCE, DEST) is None
        tracker.release_egress(SOURCE, DEST)
    assert table.stats().used_slots == 2
    assert table.stats().rebuilds == 0


def test_churning_many_destinations_through_a_small_table_keeps_live_counts(
    tmp_path: Path,
) -> None:
    with SharedLimitTable.create(tmp_path / "t", workers=2, capacity=MIN_CAPACITY) as table:
        holder = SharedLimitTracker(table, 0, ROOMY)
        churner = SharedLimitTracker(table, 1, ROOMY)
        assert holder.admit_egress(SOURCE, DEST) is None
        assert holder.admit_egress(SOURCE, DEST) is None
        assert churner.admit_egress(OTHER_SOURCE, DEST) is None
        for n in range(2000):
            destination = ipaddress.IPv6Address((0x2001_0DB8 << 96) + n)
            assert churner.admit_egress(SOURCE, destination) is None
            assert churner.admit_egress(SOURCE, destination) is None
            churner.release_egress(SOURCE, destination)
            churner.release_egress(SOURCE, destination)
            assert table.source_connections(SOURCE) == 2
        assert table.stats().rebuilds > 0
        assert table.source_connections(OTHER_SOURCE) == 1
        # The held pair kept its count through every rebuild: two releases
        # succeed and a third is one too many.
        holder.release_egress(SOURCE, DEST)
        holder.release_egress(SOURCE, DEST)
        with pytest.raises(AssertionError):
            holder.release_egress(SOURCE, DEST)


# -- probe paths, built from colliding keys -----------------------------------
#
# These tests encode keys as the file format documents (kind byte, two
# 16-byte addresses, IPv4 mapped) to choose addresses whose keys share a home
# slot, so the corner cases of slot reuse happen on purpose.


def _key(kind: int, first: IPAddress | None, second: IPAddress | None = None) -> bytes:
    def packed(address: IPAddress | None) -> bytes:
        if address is None:
            return bytes(16)
        if address.version == 4:
            return bytes(10) + b"\xff\xff" + address.packed
        return address.packed

    return bytes([kind]) + packed(first) + packed(second)


GLOBAL_KEY = _key(1, None)


def _home(table: SharedLimitTable, key: bytes) -> int:
    return zlib.crc32(key) & (table.capacity - 1)


def _with_home(
    table: SharedLimitTable, slot: int, key_of: Callable[[IPAddress], bytes], *, skip: int = 0
) -> IPAddress:
    """The first address (after ``skip`` others) whose key has home ``slot``."""
    candidates = (ipaddress.IPv6Address((0x2001_0DB8_0009 << 80) + n) for n in range(1 << 20))
    matches = (address for address in candidates if _home(table, key_of(address)) == slot)
    for _ in range(skip):
        next(matches)
    return next(matches)


def _quiet_source(table: SharedLimitTable) -> IPAddress:
    """A source whose home and the two slots after it are clear of the global key's."""
    global_home = _home(table, GLOBAL_KEY)
    mask = table.capacity - 1
    for n in range(1, 1000):
        source = ipaddress.IPv4Address(0xC6336400 + n)
        home = _home(table, _key(3, source))
        if global_home not in {(home + step) & mask for step in range(-1, 4)}:
            return source
    raise AssertionError("no quiet source")


def _rebuild_now(table: SharedLimitTable) -> None:
    table._lock()
    try:
        table._rebuild()
    finally:
        table._unlock()


def test_a_new_key_takes_the_slot_of_a_released_key_on_its_path(table: SharedLimitTable) -> None:
    tracker = SharedLimitTracker(table, 0, ROOMY)
    source = _quiet_source(table)
    source_home = _home(table, _key(3, source))
    first = _with_home(table, (source_home + 8) & 63, lambda d: _key(4, source, d))
    second = _with_home(table, (source_home + 8) & 63, lambda d: _key(4, source, d), skip=1)
    assert tracker.admit_egress(source, first) is None
    tracker.release_egress(source, first)
    assert table.stats().used_slots == 2
    assert tracker.admit_egress(source, second) is None
    assert table.stats().used_slots == 2
    assert table.source_connections(source) == 1


def test_inserting_a_source_over_its_own_pairs_reusable_slot_keeps_both(
    table: SharedLimitTable,
) -> None:
    tracker = SharedLimitTracker(table, 0, ROOMY)
    source = _quiet_source(table)
    source_home = _home(table, _key(3, source))
    # The pair collides with its source: source at home, pair one after.
    destination = _with_home(table, source_home, lambda d: _key(4, source, d))
    assert tracker.admit_egress(source, destination) is None
    tracker.release_egress(source, destination)
    # A client key with the same home takes the source's reusable slot,
    # leaving the pair's (zero total) next on the source's path.
    client = _with_home(table, source_home, lambda c: _key(2, c))
    assert tracker.admit_session(client) is None
    assert tracker.admit_egress(source, destination) is None
    assert table.source_connections(source) == 1
    assert tracker.client_sessions(client) == 1
    tracker.release_egress(source, destination)
    with pytest.raises(AssertionError, match="released twice"):
        tracker.release_egress(source, destination)


def test_a_key_inserted_where_a_rebuild_moved_another_from_starts_at_zero(
    table: SharedLimitTable,
) -> None:
    tracker = SharedLimitTracker(table, 0, LimitsConfig(per_source_destination=1))
    source = _quiet_source(table)
    slot = (_home(table, _key(3, source)) + 8) & 63
    released = _with_home(table, slot, lambda d: _key(4, source, d))
    moved = _with_home(table, slot, lambda d: _key(4, source, d), skip=1)
    assert tracker.admit_egress(source, released) is None
    assert tracker.admit_egress(source, moved) is None  # one slot after its home
    tracker.release_egress(source, released)
    _rebuild_now(table)  # ``moved`` goes home; its old slot keeps stale counts
    newcomer = _with_home(table, (slot + 1) & 63, lambda d: _key(4, source, d))
    assert tracker.admit_egress(source, newcomer) is None
    tracker.release_egress(source, newcomer)
    assert tracker.admit_egress(source, newcomer) is None
    assert table.source_connections(source) == 2
    tracker.release_egress(source, moved)
    with pytest.raises(AssertionError, match="released twice"):
        tracker.release_egress(source, moved)


def test_full_table_refuses_as_max_sessions_and_takes_nothing(tmp_path: Path) -> None:
    with SharedLimitTable.create(tmp_path / "t", workers=2, capacity=MIN_CAPACITY) as table:
        tracker = SharedLimitTracker(table, 0, ROOMY)
        # One source key and seven pair keys fill eight slots.
        destinations = [ipaddress.IPv4Address(0xCB007100 + n) for n in range(8)]
        for destination in destinations[:7]:
            assert tracker.admit_egress(SOURCE, destination) is None
        assert tracker.admit_egress(SOURCE, destinations[7]) is LimitKind.MAX_SESSIONS
        assert tracker.source_connections(SOURCE) == 7
        assert tracker.admit_session(CLIENT) is LimitKind.MAX_SESSIONS
        assert tracker.sessions == 0
        # Existing keys still count, and a released key's slot is reusable.
        tracker.release_egress(SOURCE, destinations[0])
        assert tracker.admit_egress(SOURCE, destinations[1]) is None
        tracker.release_egress(SOURCE, destinations[1])
        assert tracker.admit_egress(SOURCE, destinations[7]) is None
        assert tracker.source_connections(SOURCE) == 7


@pytest.mark.parametrize(("max_sessions", "capacity"), [(1, 8), (2, 16), (5, 32), (20000, 131072)])
def test_capacity_holds_every_live_key_at_half_load(max_sessions: int, capacity: int) -> None:
    assert capacity_for(LimitsConfig(max_sessions=max_sessions)) == capacity


@pytest.mark.parametrize("max_sessions", [1, 5, 10, 20000])
def test_a_table_sized_for_max_sessions_holds_at_least_that_many(max_sessions: int) -> None:
    assert sessions_held(capacity_for(LimitsConfig(max_sessions=max_sessions))) >= max_sessions


def test_sessions_held_sessions_fit_with_every_key_distinct(tmp_path: Path) -> None:
    # The worst case: each session its own client, source and destination.
    capacity = 64
    held = sessions_held(capacity)
    limits = LimitsConfig(max_sessions=held, per_client=1, per_source=1, per_source_destination=1)
    with SharedLimitTable.create(tmp_path / "t", workers=1, capacity=capacity) as table:
        tracker = SharedLimitTracker(table, 0, limits)
        for n in range(held):
            client, source, destination = (
                ipaddress.IPv4Address(base + n) for base in (0xC0000200, 0xC6336400, 0xCB007100)
            )
            assert tracker.admit_session(client) is None
            assert tracker.admit_egress(source, destination) is None
        assert tracker.sessions == held
        assert tracker.admit_session(OTHER_CLIENT) is LimitKind.MAX_SESSIONS


@pytest.mark.parametrize(("workers", "capacity"), [(0, 64), (2, 48), (2, 4)])
def test_create_rejects_a_bad_shape(tmp_path: Path, workers: int, capacity: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        SharedLimitTable.create(tmp_path / "t", workers=workers, capacity=capacity)
    assert not (tmp_path / "t").exists()


def test_create_refuses_to_replace_an_existing_file(table: SharedLimitTable) -> None:
    with pytest.raises(SharedLimitsError, match="cannot create"):
        SharedLimitTable.create(table.path, workers=2, capacity=64)


def test_tracker_rejects_a_worker_index_outside_the_table(table: SharedLimitTable) -> None:
    with pytest.raises(ValueError, match="worker"):
        SharedLimitTracker(table, 2, LimitsConfig())


def test_closed_table_raises_instead_of_touching_freed_memory(tmp_path: Path) -> None:
    table = SharedLimitTable.create(tmp_path / "t", workers=2, capacity=64)
    tracker = SharedLimitTracker(table, 0, LimitsConfig())
    table.close()
    table.close()
    with pytest.raises(SharedLimitsError, match="closed"):
        tracker.admit_session(CLIENT)


def _corrupt_header(path: Path, index: int, value: int) -> None:
    with path.open("r+b") as file:
        file.seek(8 + 4 * (index - 2))
        file.write(struct.pack("=i", value))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: path.write_bytes(b"#!/bin/sh\n" * 100), "not a kumoproxy limit table"),
        (lambda path: path.write_bytes(b""), "not a kumoproxy limit table"),
        (lambda path: _corrupt_header(path, 2, 99), "version 99"),
        (lambda path: _corrupt_header(path, 4, 100), "corrupt limit table header"),
        (lambda path: os.truncate(path, 4096), "header says"),
    ],
    ids=["other file", "empty", "version", "capacity", "truncated"],
)
def test_attach_rejects_what_is_not_a_table(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "t"
    SharedLimitTable.create(path, workers=2, capacity=64).close()
    damage(path)
    with pytest.raises(SharedLimitsError, match=message):
        SharedLimitTable.attach(path)


def test_attach_to_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(SharedLimitsError, match="cannot open"):
        SharedLimitTable.attach(tmp_path / "absent")


# -- real worker processes ----------------------------------------------------


def _admit_same_pair(
    path: Path, worker: int, attempts: int, start: Barrier, out: Connection
) -> None:
    limits = LimitsConfig(per_source=10**6, per_source_destination=50)
    with SharedLimitTable.attach(path) as table:
        tracker = SharedLimitTracker(table, worker, limits)
        start.wait(PROCESS_TIMEOUT)
        out.send(sum(tracker.admit_egress(SOURCE, DEST) is None for _ in range(attempts)))


def _churn(path: Path, worker: int, rounds: int, start: Barrier, out: Connection) -> None:
    """Admit and release at random; after each admit read the totals under the lock."""
    limits = LimitsConfig(max_sessions=6, per_client=4, per_source=5, per_source_destination=3)
    rng = random.Random(worker)
    worst = [0, 0, 0]
    refused = 0
    sessions: list[IPAddress] = []
    egress: list[IPAddress] = []
    with SharedLimitTable.attach(path) as table:
        tracker = SharedLimitTracker(table, worker, limits)
        start.wait(PROCESS_TIMEOUT)
        for _ in range(rounds):
            if sessions and rng.random() < 0.45:
                tracker.release_session(sessions.pop(rng.randrange(len(sessions))))
            elif rng.random() < 0.5:
                client = rng.choice([CLIENT, OTHER_CLIENT])
                if tracker.admit_session(client) is None:
                    sessions.append(client)
                    worst[0] = max(worst[0], tracker.sessions)
                    worst[1] = max(worst[1], tracker.client_sessions(client))
                else:
                    refused += 1
            if egress and rng.random() < 0.45:
                tracker.release_egress(SOURCE, egress.pop(rng.randrange(len(egress))))
            elif rng.random() < 0.5:
                destination = rng.choice([DEST, OTHER_DEST])
                if tracker.admit_egress(SOURCE, destination) is None:
                    egress.append(destination)
                    worst[2] = max(worst[2], tracker.source_connections(SOURCE))
                else:
                    refused += 1
        for client in sessions:
            tracker.release_session(client)
        for destination in egress:
            tracker.release_egress(SOURCE, destination)
    out.send((worst, refused))


def _hold_lock_until_killed(path: Path, out: Connection) -> None:
    with SharedLimitTable.attach(path) as table:
        tracker = SharedLimitTracker(table, 1, ROOMY)
        for _ in range(3):
            assert tracker.admit_session(CLIENT) is None
        assert tracker.admit_egress(SOURCE, DEST) is None
        table._lock()
        out.send("locked")
        out.recv()  # never comes: the parent SIGKILLs us


def _die_in_the_middle_of_a_rebuild(path: Path) -> None:
    with SharedLimitTable.attach(path) as table:
        tracker = SharedLimitTracker(table, 1, ROOMY)
        assert tracker.admit_egress(SOURCE, OTHER_DEST) is None
        table._lock()
        table._write_journal()
        # What replaying does first; then die before putting anything back.
        keys = table._keys
        table._mm[keys : keys + 33 * table.capacity] = bytes(33 * table.capacity)
        os.kill(os.getpid(), signal.SIGKILL)


def _receive(connection: Connection) -> Any:
    assert connection.poll(PROCESS_TIMEOUT), "the child process sent nothing"
    return connection.recv()


def _start(target: Callable[..., None], *args: object) -> SpawnProcess:
    process = SPAWN.Process(target=target, args=args)
    process.start()
    return process


def _join(process: SpawnProcess) -> int | None:
    process.join(PROCESS_TIMEOUT)
    if process.exitcode is None:
        process.kill()
        process.join()
    return process.exitcode


def test_concurrent_workers_admit_exactly_the_per_source_destination_limit(
    tmp_path: Path,
) -> None:
    workers = 4
    path = tmp_path / "limits"
    with SharedLimitTable.create(path, workers=workers, capacity=64) as table:
        start = SPAWN.Barrier(workers)
        pipes = [SPAWN.Pipe(duplex=False) for _ in range(workers)]
        processes = [
            _start(_admit_same_pair, path, worker, 200, start, pipes[worker][1])
            for worker in range(workers)
        ]
        admitted: list[int] = [_receive(receive) for receive, _ in pipes]
        assert [_join(process) for process in processes] == [0] * workers
        assert sum(admitted) == 50
        assert table.source_connections(SOURCE) == 50


def test_concurrent_churn_never_exceeds_any_limit(tmp_path: Path) -> None:
    workers = 4
    path = tmp_path / "limits"
    with SharedLimitTable.create(path, workers=workers, capacity=64) as table:
        start = SPAWN.Barrier(workers)
        pipes = [SPAWN.Pipe(duplex=False) for _ in range(workers)]
        processes = [
            _start(_churn, path, worker, 3000, start, pipes[worker][1]) for worker in range(workers)
        ]
        results: list[tuple[list[int], int]] = [_receive(receive) for receive, _ in pipes]
        assert [_join(process) for process in processes] == [0] * workers
        worst = [max(column) for column in zip(*(result[0] for result in results), strict=True)]
        assert all(seen <= limit for seen, limit in zip(worst, [6, 4, 5], strict=True))
        assert sum(result[1] for result in results) > 0  # the limits were reached
        assert (table.sessions(), table.source_connections(SOURCE)) == (0, 0)


def test_a_worker_killed_holding_the_lock_wedges_nobody_and_reset_frees_its_slots(
    tmp_path: Path,
) -> None:
    path = tmp_path / "limits"
    with SharedLimitTable.create(path, workers=2, capacity=64) as table:
        receive, send = SPAWN.Pipe()
        child = _start(_hold_lock_until_killed, path, send)
        assert _receive(receive) == "locked"
        probe = os.open(path, os.O_RDWR)
        try:
            # EAGAIN or EACCES (fcntl(2)): held by another process.
            with pytest.raises((BlockingIOError, PermissionError)):
                fcntl.lockf(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
        child.kill()
        assert _join(child) == -signal.SIGKILL
        survivor = SharedLimitTracker(table, 0, LimitsConfig(per_client=3))
        # The lock is free, and the dead worker's sessions count until reset.
        assert survivor.admit_session(CLIENT) is LimitKind.PER_CLIENT
        assert table.source_connections(SOURCE) == 1
        table.reset_worker(1)
        assert survivor.admit_session(CLIENT) is None
        assert (table.sessions(), table.source_connections(SOURCE)) == (1, 0)


def test_a_rebuild_cut_short_by_sigkill_is_finished_by_the_next_lock_holder(
    tmp_path: Path,
) -> None:
    path = tmp_path / "limits"
    with SharedLimitTable.create(path, workers=2, capacity=64) as table:
        tracker = SharedLimitTracker(table, 0, ROOMY)
        assert tracker.admit_session(CLIENT) is None
        assert tracker.admit_egress(SOURCE, DEST) is None
        assert tracker.admit_egress(SOURCE, DEST) is None
        # A released key: the rebuild drops it.
        assert tracker.admit_egress(OTHER_SOURCE, DEST) is None
        tracker.release_egress(OTHER_SOURCE, DEST)
        rebuilds = table.stats().rebuilds
        assert _join(_start(_die_in_the_middle_of_a_rebuild, path)) == -signal.SIGKILL
        assert (tracker.sessions, table.source_connections(SOURCE)) == (1, 3)
        assert table.stats().rebuilds == rebuilds + 1
        # Global, client, source and the two live pairs of (SOURCE, *).
        assert table.stats().used_slots == 5
        tracker.release_egress(SOURCE, DEST)
        tracker.release_egress(SOURCE, DEST)
        table.reset_worker(1)
        assert table.source_connections(SOURCE) == 0
