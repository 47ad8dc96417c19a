"""Concurrency limits that hold in total across worker processes.

With ``workers`` > 1 the supervisor creates one :class:`SharedLimitTable` in
a private directory (tmpfs, e.g. ``/dev/shm``) and every worker attaches it
by path and counts through a :class:`SharedLimitTracker`, which has the
semantics of :class:`kumoproxy.limits.LimitTracker` but sums the counts of
all workers.

The table is a file mapped ``MAP_SHARED``: a hash table of keys and, per
worker, one column of counts::

    header      64 bytes: magic, version, workers W, capacity C, bookkeeping
    keys        C x 33 bytes: kind (1 byte) + two 16-byte addresses
    counts      W columns of C int32, column-major: worker w's counts are
                one contiguous array, so it only ever writes its own column
                and a dead worker's column is zeroed with one slice
    journal     a copy of the live entries, written only during a rebuild

A key's total is the sum of its W counts. Kinds: 1 = the global session
count, 2 = client, 3 = source, 4 = (source, destination); 0 is never used,
so an all-zero key marks a never-used slot. IPv4 addresses are stored
IPv4-mapped (``::ffff:a.b.c.d``), so an IPv4-mapped IPv6 address counts as
the IPv4 address it maps, as policy already treats it. Open addressing with
linear probing; the hash is :func:`zlib.crc32` (Python's ``hash()`` is
randomised per process).

One exclusive ``fcntl.lockf`` lock on the file serialises every operation:
admit (look up or insert the keys, sum, compare with the limit, add to the
own column), release, and structural changes. The kernel drops POSIX locks
of a process that dies, so a SIGKILLed worker never wedges the others; its
counts stay in its column until the supervisor calls
:meth:`SharedLimitTable.reset_worker`. A rebuild is the only multi-step
change that other workers' counts depend on: it first copies the live
entries to the journal, then commits with one aligned 4-byte store and
rewrites the table from the journal. Whoever next takes the lock and finds
the commit flag set (the rebuilder died) replays the journal, which is
idempotent. POSIX locks belong to the process: they do not exclude threads
(a :class:`threading.Lock` does that), a process must not attach the same
file twice (closing either descriptor drops the lock), and the lock is never
taken while held.

Slots whose total is zero are reusable: a released key keeps its slot (the
same destination usually comes back) until an insert on its probe path takes
it. When the never-used slots run low (more than 3/4 of C in use) the next
insert first rebuilds the table in place, keeping only entries with a
non-zero total. Live keys are at most ``1 + 3 * max_sessions`` (a session
holds one client key, one source key, one pair key), which
:func:`capacity_for` doubles. A table sized for a smaller ``max_sessions``
than a reload later allows could fill up with live keys, so the supervisor
refuses a reload whose ``max_sessions`` exceeds :func:`sessions_held`. Should
the table fill anyway, an admit that needs a new key is refused as
:attr:`LimitKind.MAX_SESSIONS`, which is the truth: the process cannot track
more sessions.

Memory: ``33 + 4 * W`` bytes per slot, plus the same per live entry for the
journal. The file is sparse on tmpfs: pages exist only once touched (the
journal only up to the live entries of the largest rebuild).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from array import array
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Final
from zlib import crc32

from kumoproxy.config import IPAddress, LimitsConfig
from kumoproxy.errors import KumoproxyError
from kumoproxy.limits import LimitKind

MAGIC: Final = b"kumolimt"
VERSION: Final = 1

#: Bytes per key: kind + two 16-byte addresses.
KEY_SIZE: Final = 33
HEADER_SIZE: Final = 64
MIN_CAPACITY: Final = 8
#: Slot indexes and counts are int32; far beyond any sensible max_sessions.
MAX_CAPACITY: Final = 1 << 24
MAX_WORKERS: Final = 1024

# Regions start on page boundaries so untouched ones stay sparse.
_PAGE = 4096

# Header, after the 8-byte magic, as native int32 (the file never leaves the host).
_HEADER = struct.Struct("=8s14i")
_H_VERSION = 2
_H_WORKERS = 3
_H_CAPACITY = 4
_H_USED = 5  # slots whose key is not all-zero (live or reusable)
_H_REBUILD_AT = 6  # rebuild before an insert would take USED past this
_H_JOURNAL_ENTRIES = 7
_H_JOURNAL_ACTIVE = 8  # 1 from the commit of a rebuild until it is complete
_H_REBUILDS = 9

_KIND_GLOBAL = b"\x01"
_KIND_CLIENT = b"\x02"
_KIND_SOURCE = b"\x03"
_KIND_PAIR = b"\x04"
_NO_ADDRESS = bytes(16)
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_GLOBAL_KEY = _KIND_GLOBAL + _NO_ADDRESS + _NO_ADDRESS
_EMPTY_KEY = bytes(KEY_SIZE)

_lockf = fcntl.lockf
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN


class SharedLimitsError(KumoproxyError):
    """The shared limit table cannot be created, attached or used."""


def capacity_for(limits: LimitsConfig) -> int:
    """Slots for a table that holds ``limits.max_sessions`` sessions at half load.

    Live keys are at most ``1 + 3 * max_sessions``; twice that keeps probe
    chains short and rebuilds rare. Size with the highest ``max_sessions`` a
    reload may set.
    """
    needed = 2 * (1 + 3 * limits.max_sessions)
    return max(MIN_CAPACITY, 1 << (needed - 1).bit_length())


def sessions_held(capacity: int) -> int:
    """The highest ``max_sessions`` whose live keys all fit in ``capacity`` slots."""
    return (capacity - 1) // 3


@dataclass(frozen=True, slots=True)
class TableStats:
    """Occupancy of a table, for metrics and tests."""

    capacity: int
    #: Slots holding a key, live or reusable (zero total).
    used_slots: int
    #: Rebuilds since the table was created.
    rebuilds: int


@dataclass(frozen=True, slots=True)
class _Layout:
    workers: int
    capacity: int
    keys: int
    counts: int
    journal_keys: int
    journal_counts: int
    size: int

    @classmethod
    def of(cls, workers: int, capacity: int) -> _Layout:
        keys = HEADER_SIZE
        counts = _align(keys + KEY_SIZE * capacity)
        journal_keys = _align(counts + 4 * workers * capacity)
        journal_counts = _align(journal_keys + KEY_SIZE * capacity)
        size = journal_counts + 4 * workers * capacity
        return cls(workers, capacity, keys, counts, journal_keys, journal_counts, size)


def _align(offset: int) -> int:
    return -(-offset // _PAGE) * _PAGE


def _rebuild_threshold(live: int, capacity: int) -> int:
    """USED at which the next insert rebuilds: 3/4 full, and at least C/8 inserts away.

    The second bound keeps rebuilds amortised when live keys alone are near
    3/4 (``max_sessions`` raised past the table's sizing).
    """
    return min(capacity, max(3 * capacity // 4, live + capacity // 8))


def _packed(address: IPAddress) -> bytes:
    """The 16-byte form of ``address``; IPv4 as IPv4-mapped IPv6 (RFC 4291 §2.5.5.2).

    Not memoised: an ``ipaddress`` object hashes in Python code, so a dict
    lookup costs as much as this.
    """
    if type(address) is IPv4Address:
        return _V4_MAPPED_PREFIX + address.packed
    return address.packed


def _check_shape(workers: int, capacity: int) -> str | None:
    if not 1 <= workers <= MAX_WORKERS:
        return f"workers must be 1..{MAX_WORKERS}, not {workers}"
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY or capacity & (capacity - 1):
        return f"capacity must be a power of two in {MIN_CAPACITY}..{MAX_CAPACITY}, not {capacity}"
    return None


class SharedLimitTable:
    """The mapped table file. The supervisor :meth:`create` s it; workers :meth:`attach`.

    Attach a given file at most once per process (see the module docstring:
    POSIX locks belong to the process, and closing any descriptor of the file
    drops them).
    """

    workers: int
    capacity: int
    path: Path

    def __init__(self, path: Path, fd: int, layout: _Layout) -> None:
        """Use :meth:`create` or :meth:`attach`; this takes ownership of ``fd``."""
        self.path = path
        self.workers = layout.workers
        self.capacity = layout.capacity
        self._layout = layout
        self._fd = fd
        self._mask = layout.capacity - 1
        self._keys = layout.keys
        self._journal_keys = layout.journal_keys
        self._thread_lock = threading.Lock()
        self._mm = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(self._mm)
        self._view = view
        self._header = view[:HEADER_SIZE].cast("i")
        column_bytes = 4 * layout.workers * layout.capacity
        self._counts = view[layout.counts : layout.counts + column_bytes].cast("i")
        self._journal_counts = view[
            layout.journal_counts : layout.journal_counts + column_bytes
        ].cast("i")
        self._zero_row = memoryview(array("i", bytes(4 * layout.workers)))

    @classmethod
    def create(cls, path: Path, *, workers: int, capacity: int) -> SharedLimitTable:
        """Create a new, empty table file at ``path`` (which must not exist)."""
        problem = _check_shape(workers, capacity)
        if problem:
            raise ValueError(problem)
        layout = _Layout.of(workers, capacity)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SharedLimitsError(f"{path}: cannot create limit table: {exc}") from exc
        try:
            # Sparse: tmpfs allocates pages only when they are first written.
            os.ftruncate(fd, layout.size)
            table = cls(path, fd, layout)
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        header = table._header
        header[_H_VERSION] = VERSION
        header[_H_WORKERS] = workers
        header[_H_CAPACITY] = capacity
        header[_H_REBUILD_AT] = _rebuild_threshold(0, capacity)
        # The magic last: a file cut short by a crash here never attaches.
        table._mm[: len(MAGIC)] = MAGIC
        return table

    @classmethod
    def attach(cls, path: Path) -> SharedLimitTable:
        """Map an existing table; :class:`SharedLimitsError` if it is not one."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedLimitsError(f"{path}: cannot open limit table: {exc}") from exc
        try:
            layout = _read_layout(path, fd)
            return cls(path, fd, layout)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Unmap and close. Idempotent. Does not remove the file."""
        if self._fd < 0:
            return
        for view in (self._zero_row, self._journal_counts, self._counts, self._header):
            view.release()
        self._view.release()
        self._mm.close()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> SharedLimitTable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reset_worker(self, worker: int) -> None:
        """Zero worker ``worker``'s column: call once the process is gone (reaped).

        Its sessions and egress connections died with it; until this call
        they still count against the limits.
        """
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker must be 0..{self.workers - 1}, not {worker}")
        start = self._layout.counts + 4 * worker * self.capacity
        self._lock()
        try:
            self._mm[start : start + 4 * self.capacity] = bytes(4 * self.capacity)
        finally:
            self._unlock()

    def source_connections(self, source: IPAddress) -> int:
        """Outbound connections through ``source`` now, summed over all workers."""
        return self._locked_total(_KIND_SOURCE + _packed(source) + _NO_ADDRESS)

    def sessions(self) -> int:
        """Sessions now, summed over all workers."""
        return self._locked_total(_GLOBAL_KEY)

    def stats(self) -> TableStats:
        """Occupancy now."""
        self._lock()
        try:
            header = self._header
            return TableStats(self.capacity, header[_H_USED], header[_H_REBUILDS])
        finally:
            self._unlock()

    # -- under the lock ----------------------------------------------------

    def _lock(self) -> None:
        # Blocks the calling (trio) thread until the lock is free, on
        # purpose: a critical section is a few microseconds, far cheaper than
        # a thread hop. The exception is a rebuild, at most once per C/8 new
        # keys: about 30 ms for 20000 live keys with W=2, 60 ms with W=64.
        if self._fd < 0:
            raise SharedLimitsError(f"{self.path}: limit table is closed")
        self._thread_lock.acquire()
        try:
            _lockf(self._fd, _LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        if self._header[_H_JOURNAL_ACTIVE]:
            # The last holder died half-way through a rebuild: finish it.
            try:
                self._replay_journal()
            except BaseException:
                self._unlock()
                raise

    def _unlock(self) -> None:
        try:
            _lockf(self._fd, _LOCK_UN)
        finally:
            self._thread_lock.release()

    def _locked_total(self, key: bytes) -> int:
        self._lock()
        try:
            slot = self._find(key)
            return sum(self._counts[slot :: self.capacity]) if slot >= 0 else 0
        finally:
            self._unlock()

    def _find(self, key: bytes) -> int:
        """The slot holding ``key``, or -1."""
        mm = self._mm
        mask = self._mask
        keys = self._keys
        slot = crc32(key) & mask
        offset = keys + slot * KEY_SIZE
        found = mm[offset : offset + KEY_SIZE]
        if found == key:
            return slot
        remaining = self.capacity
        while found[0]:  # a never-used slot ends the probe
            remaining -= 1
            if not remaining:
                return -1
            slot = (slot + 1) & mask
            offset = keys + slot * KEY_SIZE
            found = mm[offset : offset + KEY_SIZE]
            if found == key:
                return slot
        return -1

    def _total(self, slot: int) -> int:
        """The total of the key in ``slot``; 0 for ``slot`` -1 (absent)."""
        return sum(self._counts[slot :: self.capacity]) if slot >= 0 else 0

    def _make_room(self, new_keys: int) -> bool:
        """Rebuild if inserting ``new_keys`` would pass the threshold; True if it did.

        A rebuild moves keys, so slots found before it are stale.
        """
        header = self._header
        if header[_H_USED] + new_keys <= header[_H_REBUILD_AT]:
            return False
        self._rebuild()
        return True

    def _insert(self, key: bytes) -> int:
        """Put ``key`` (absent) in the first reusable or never-used slot; -1 if full."""
        mm = self._mm
        mask = self._mask
        keys = self._keys
        counts = self._counts
        capacity = self.capacity
        slot = crc32(key) & mask
        for _ in range(capacity):
            offset = keys + slot * KEY_SIZE
            if not mm[offset]:
                self._header[_H_USED] += 1
                break
            # Counts never go negative, so a zero total is all-zero columns.
            if not any(counts[slot::capacity]):
                break
            slot = (slot + 1) & mask
        else:
            return -1
        # Counts first, then the key: a never-used slot may hold stale counts
        # left by a rebuild, and a key must never appear with them.
        counts[slot::capacity] = self._zero_row
        mm[offset : offset + KEY_SIZE] = key
        return slot

    def _rebuild(self) -> None:
        """Drop zero-total keys, in place. Crash-safe through the journal."""
        self._write_journal()
        self._replay_journal()

    def _write_journal(self) -> None:
        """Copy the live entries to the journal and commit it."""
        mm = self._mm
        keys = self._keys
        journal_keys = self._journal_keys
        counts = self._counts
        journal_counts = self._journal_counts
        capacity = self.capacity
        workers = self.workers
        # Phase 1: copy live entries to the journal. The table is untouched,
        # so dying here loses nothing.
        entries = 0
        kinds = mm[keys : keys + KEY_SIZE * capacity : KEY_SIZE]
        for slot, kind in enumerate(kinds):
            if kind and any(counts[slot::capacity]):
                offset = keys + slot * KEY_SIZE
                journal_offset = journal_keys + entries * KEY_SIZE
                mm[journal_offset : journal_offset + KEY_SIZE] = mm[offset : offset + KEY_SIZE]
                journal_counts[entries * workers : (entries + 1) * workers] = counts[slot::capacity]
                entries += 1
        header = self._header
        header[_H_JOURNAL_ENTRIES] = entries
        header[_H_REBUILDS] += 1
        # Commit: one aligned 4-byte store. From here the journal is the truth.
        header[_H_JOURNAL_ACTIVE] = 1

    def _replay_journal(self) -> None:
        """Rewrite the table from the journal. Idempotent: a crash mid-way reruns it."""
        mm = self._mm
        mask = self._mask
        keys = self._keys
        journal_keys = self._journal_keys
        counts = self._counts
        journal_counts = self._journal_counts
        capacity = self.capacity
        workers = self.workers
        header = self._header
        entries = header[_H_JOURNAL_ENTRIES]
        mm[keys : keys + KEY_SIZE * capacity] = bytes(KEY_SIZE * capacity)
        for entry in range(entries):
            journal_offset = journal_keys + entry * KEY_SIZE
            key = mm[journal_offset : journal_offset + KEY_SIZE]
            slot = crc32(key) & mask
            while mm[keys + slot * KEY_SIZE]:
                slot = (slot + 1) & mask
            counts[slot::capacity] = journal_counts[entry * workers : (entry + 1) * workers]
            offset = keys + slot * KEY_SIZE
            mm[offset : offset + KEY_SIZE] = key
        header[_H_USED] = entries
        header[_H_REBUILD_AT] = _rebuild_threshold(entries, capacity)
        header[_H_JOURNAL_ACTIVE] = 0


def _read_layout(path: Path, fd: int) -> _Layout:
    size = os.fstat(fd).st_size
    raw = os.pread(fd, _HEADER.size, 0)
    if len(raw) < _HEADER.size:
        raise SharedLimitsError(f"{path}: not a kumoproxy limit table ({size} bytes)")
    magic, *fields = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise SharedLimitsError(f"{path}: not a kumoproxy limit table (magic {magic!r})")
    version, workers, capacity = fields[:3]  # _H_VERSION, _H_WORKERS, _H_CAPACITY
    if version != VERSION:
        raise SharedLimitsError(
            f"{path}: limit table version {version}, this kumoproxy reads {VERSION}"
        )
    problem = _check_shape(workers, capacity)
    if problem:
        raise SharedLimitsError(f"{path}: corrupt limit table header: {problem}")
    layout = _Layout.of(workers, capacity)
    if size != layout.size:
        raise SharedLimitsError(
            f"{path}: limit table is {size} bytes, its header says {layout.size}"
        )
    return layout


class SharedLimitTracker:
    """A :class:`kumoproxy.limits.Limiter` whose counts are summed over all workers.

    Same semantics as :class:`kumoproxy.limits.LimitTracker`; worker
    ``worker`` adds to and releases from its own column only, so a slot must
    be released by the worker that took it.
    """

    def __init__(self, table: SharedLimitTable, worker: int, limits: LimitsConfig) -> None:
        if not 0 <= worker < table.workers:
            raise ValueError(f"worker must be 0..{table.workers - 1}, not {worker}")
        self.limits = limits
        self.table = table
        self.worker = worker
        self._base = worker * table.capacity

    @property
    def sessions(self) -> int:
        """Sessions now, across all workers."""
        return self.table.sessions()

    def admit_session(self, client: IPAddress) -> LimitKind | None:
        limits = self.limits
        return self._admit(
            _GLOBAL_KEY, limits.max_sessions, LimitKind.MAX_SESSIONS,
            _KIND_CLIENT + _packed(client) + _NO_ADDRESS, limits.per_client, LimitKind.PER_CLIENT,
        )  # fmt: skip

    def release_session(self, client: IPAddress) -> None:
        key = _KIND_CLIENT + _packed(client) + _NO_ADDRESS
        self._give_back(_GLOBAL_KEY, key, client)

    def admit_egress(self, source: IPAddress, destination: IPAddress) -> LimitKind | None:
        packed = _packed(source)
        limits = self.limits
        return self._admit(
            _KIND_SOURCE + packed + _NO_ADDRESS, limits.per_source, LimitKind.PER_SOURCE,
            _KIND_PAIR + packed + _packed(destination), limits.per_source_destination,
            LimitKind.PER_SOURCE_DESTINATION,
        )  # fmt: skip

    def _admit(
        self,
        first: bytes,
        first_limit: int,
        first_kind: LimitKind,
        second: bytes,
        second_limit: int,
        second_kind: LimitKind,
    ) -> LimitKind | None:
        """Take one slot of each key, checked in order, or nothing and say which refused."""
        table = self.table
        table._lock()
        try:
            first_slot = table._find(first)
            if table._total(first_slot) >= first_limit:
                return first_kind
            second_slot = table._find(second)
            if table._total(second_slot) >= second_limit:
                return second_kind
            return self._take(first, first_slot, second, second_slot)
        finally:
            table._unlock()

    def release_egress(self, source: IPAddress, destination: IPAddress) -> None:
        packed = _packed(source)
        self._give_back(
            _KIND_SOURCE + packed + _NO_ADDRESS,
            _KIND_PAIR + packed + _packed(destination),
            (source, destination),
        )

    def source_connections(self, source: IPAddress) -> int:
        """Outbound connections through ``source`` now (connecting or relaying), all workers."""
        return self.table.source_connections(source)

    def client_sessions(self, client: IPAddress) -> int:
        """Sessions from ``client`` now, all workers."""
        return self.table._locked_total(_KIND_CLIENT + _packed(client) + _NO_ADDRESS)

    def limit_value(self, kind: LimitKind) -> int:
        return int(getattr(self.limits, str(kind)))

    def _take(
        self, first: bytes, first_slot: int, second: bytes, second_slot: int
    ) -> LimitKind | None:
        """Add one to both keys in the own column (under the lock; limits checked)."""
        table = self.table
        counts = table._counts
        base = self._base
        if first_slot < 0 or second_slot < 0:
            if table._make_room((first_slot < 0) + (second_slot < 0)):
                first_slot = table._find(first)
                second_slot = table._find(second)
            if first_slot < 0:
                first_slot = table._insert(first)
                if first_slot < 0:
                    return LimitKind.MAX_SESSIONS
                if first_slot == second_slot:
                    # ``second`` had a zero total, so its slot was reusable.
                    second_slot = -1
        # Count ``first`` before inserting ``second``: a zero-total slot is
        # reusable, and ``first`` must not lose its fresh one.
        counts[base + first_slot] += 1
        if second_slot < 0:
            second_slot = table._insert(second)
            if second_slot < 0:
                counts[base + first_slot] -= 1
                return LimitKind.MAX_SESSIONS
        counts[base + second_slot] += 1
        return None

    def _give_back(self, first: bytes, second: bytes, what: object) -> None:
        table = self.table
        counts = table._counts
        base = self._base
        table._lock()
        try:
            first_slot = table._find(first)
            second_slot = table._find(second)
            if (
                first_slot < 0
                or second_slot < 0
                or counts[base + first_slot] <= 0
                or counts[base + second_slot] <= 0
            ):
                raise AssertionError(f"limit slot released twice for {what!r}")
            counts[base + first_slot] -= 1
            counts[base + second_slot] -= 1
        finally:
            table._unlock()
