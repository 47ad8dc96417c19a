"""The durable spool of the spooling sender: the disk shell.

Record formats and the state model are pure, in :mod:`mta_client.spool_format`;
this module does the I/O. Layout under ``root``::

    segments/<time_ns hex>-<pid hex>   immutable message records, one enqueue batch each
    tmp/                               segments being written (and journal compaction)
    journal                            Done / Scheduled records, appended by the lock holder
    quarantine/                        damaged bytes, kept for a human; never silently dropped
    lock                               flock(2)ed by the daemon for its lifetime; holds its pid

Durability follows Postfix: an id is acknowledged only once its message is on
stable storage and survives kill -9 and power loss. A segment is written to
``tmp/``, fsynced, renamed into ``segments/``, and ``segments/`` is fsynced
(rename(2) is atomic, but the new name is durable only once its directory
is). Journal appends are fdatasynced before :meth:`Spool.record` returns.

One fsync costs a fraction of a millisecond here, so durable throughput
comes from *group commit*: concurrent :meth:`Spool.enqueue` calls share one
segment and its fsyncs, concurrent :meth:`Spool.record` calls one append and
its fdatasync, concurrent :meth:`Spool.read_bodies` calls one thread hop.
The first caller to find no batch in progress becomes the leader, takes
everything queued, does one thread hop for the batch and wakes everyone; a
failed write fails every waiter with :class:`SpoolError`.

Enqueue is lock-free (:func:`write_segment`, for ``mta-client enqueue`` in
its own process): it only ever adds whole segments. Everything else (the
journal, deleting finished segments, quarantine, compaction) is done by the
holder of ``lock`` (:class:`Spool`, in ``mta-client run``), which picks up
other processes' segments with :meth:`Spool.scan_new`. :func:`inspect` reads
the whole state without the lock.

Recovery at :meth:`Spool.open`: tmp files of dead writers are removed; the
journal is replayed (a torn tail is copied to quarantine/ and truncated, a
corrupt span mid-file is skipped, the journal copied to quarantine/ and then
compacted); every segment is read (one with damaged bytes has its valid
records salvaged into a segment of the same name, atomically, and the
original moved to quarantine/); segments whose messages are all finished are
deleted. Deleting needs no fsync: if it is lost, the journal still says done.
The journal is compacted (rewritten with only the held segments' state) when
it grows past a threshold; segment deletions are made durable first, because
a compacted journal no longer says those messages were done.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Generic, TypeVar

import trio

from mta_client.clock import WallClock
from mta_client.errors import MtaClientError
from mta_client.spool_format import (
    Damage,
    JournalOp,
    NewMessage,
    QueuedMessage,
    SpoolState,
    StoredMessage,
    decode_journal,
    decode_message_record,
    decode_segment,
    encode_ops,
    encode_segment,
    parse_segment_name,
    segment_name,
    validate_message,
)

__all__ = [
    "COMPACT_BYTES",
    "MAX_BATCH_BYTES",
    "QuarantineReason",
    "QuarantineReport",
    "Spool",
    "SpoolError",
    "SpoolLockedError",
    "SpoolStats",
    "inspect",
    "write_segment",
]

SEGMENTS: Final = "segments"
TMP: Final = "tmp"
QUARANTINE: Final = "quarantine"
JOURNAL: Final = "journal"
LOCK: Final = "lock"
_COMPACT_TMP: Final = "journal.compact"  # in tmp/; not a segment name, so open removes it

COMPACT_BYTES: Final = 8 * 1024 * 1024
"""The journal is compacted once it is this large..."""

COMPACT_GROWTH: Final = 4
"""...and this many times its size after the last compaction, so that a large
live state is not rewritten on every batch."""

MAX_BATCH_BYTES: Final = 32 * 1024 * 1024
"""A group commit takes queued requests until its segment holds this many
body bytes (at least one request): bounds one write's memory and latency."""

MAX_READ_BATCH: Final = 4096
"""Most messages one thread hop of :meth:`Spool.read_bodies` reads (bounds its memory)."""

_FILE_MODE: Final = 0o640  # mail is private; the daemon's group may read it


class SpoolError(MtaClientError, OSError):
    """The spool could not be read or written; the OSError is the ``__cause__``."""


class SpoolLockedError(SpoolError):
    """Another process holds the spool's lock (another ``mta-client run``)."""

    def __init__(self, root: Path, pid: int | None) -> None:
        self.root = root
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "another process (pid unknown)"
        super().__init__(f"spool {root} is locked by {holder}")


class QuarantineReason(enum.Enum):
    """Why bytes went to quarantine/; values are stable metric labels."""

    CORRUPT_SEGMENT = "corrupt_segment"
    """A segment had damaged bytes: valid records were kept, the file moved."""
    TORN_JOURNAL_TAIL = "torn_journal_tail"
    """The journal ended in a partial or damaged record: copied, then truncated."""
    CORRUPT_JOURNAL = "corrupt_journal"
    """The journal had damaged bytes before valid records: copied, then compacted."""
    CORRUPT_RECORD = "corrupt_record"
    """:meth:`Spool.read_bodies` read a record that no longer verifies; the
    next open salvages its segment."""


@dataclass(frozen=True, slots=True)
class QuarantineReport:
    """Damaged bytes recovery set aside, for the daemon to log and count."""

    reason: QuarantineReason
    source: str
    """The damaged file, relative to the spool root ("segments/<name>", "journal")."""
    copy: Path | None
    """Where its bytes are now (None for CORRUPT_RECORD: the file stays until the next open)."""
    damaged_bytes: int
    kept: int
    """Records kept: the segment's salvaged messages, or the journal's valid operations."""

    def __str__(self) -> str:
        where = f", bytes in {self.copy}" if self.copy is not None else ""
        return (
            f"{self.reason.value}: {self.source}: {self.damaged_bytes} damaged bytes, "
            f"{self.kept} records kept{where}"
        )


@dataclass(slots=True)
class SpoolStats:
    """Counters of the spool's disk work, for metrics (all monotonic)."""

    segments_written: int = 0
    messages_enqueued: int = 0
    journal_syncs: int = 0
    ops_recorded: int = 0
    segments_deleted: int = 0
    compactions: int = 0
    read_batches: int = 0


# ---------------------------------------------------------------------------
# Small sync helpers (run in worker threads, or by ``mta-client enqueue``)
# ---------------------------------------------------------------------------


def _spool_error(action: str, exc: OSError) -> SpoolError:
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return SpoolError(f"cannot {action}: {reason}{where}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        return None


def _mkdir(path: Path) -> bool:
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        return False
    return True


def _ensure_layout(root: Path) -> None:
    created_root = _mkdir(root)
    created = [_mkdir(root / name) for name in (SEGMENTS, TMP, QUARANTINE)]
    if any(created):
        _fsync_dir(root)  # the new directories' names must outlive a crash too
    if created_root:
        _fsync_dir(root.parent)


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist) holding ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(root: Path, name: str, data: bytes, *, tmp_name: str | None = None) -> None:
    """Durably put ``data`` at ``segments/<name>``: write in tmp/, fsync, rename.

    The caller fsyncs segments/ afterwards.
    """
    tmp = root / TMP / (tmp_name or name)
    try:
        _write_new_file(tmp, data)
        os.rename(tmp, root / SEGMENTS / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Names:
    """Segment names: unique across processes (the pid) and increasing within this one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> str:
        with self._lock:
            # Strictly increasing, so two segments of one process never share
            # a name even if the clock repeats or steps back.
            self._last = max(time.time_ns(), self._last + 1)
            stamp = self._last
        return segment_name(stamp, os.getpid())


_NAMES = _Names()


def write_segment(root: Path, messages: Sequence[NewMessage], *, now: float) -> list[str]:
    """Lock-free and sync: write one segment durably, return its ids.

    What ``mta-client enqueue`` does: safe while a daemon runs, which picks
    the segment up with :meth:`Spool.scan_new`. ``now`` is the received time
    of every message. Raises ValueError for a message that cannot be spooled,
    SpoolError if the disk work fails (then no id was acknowledged).
    """
    if not messages:
        return []
    for message in messages:
        validate_message(message)
    name = _NAMES.next()
    data, stored = encode_segment(name, messages, received=now)
    try:
        _ensure_layout(root)
        _install(root, name, data)
        _fsync_dir(root / SEGMENTS)
    except OSError as exc:
        raise _spool_error(f"write a segment in {root}", exc) from exc
    return [message.id for message in stored]


def _segment_names(root: Path) -> list[str]:
    with os.scandir(root / SEGMENTS) as entries:
        names = [e.name for e in entries if parse_segment_name(e.name) and e.is_file()]
    return sorted(names)


def inspect(root: Path) -> list[QueuedMessage]:
    """Read-only, lock-free view of the live messages, oldest first (``mta-client queue``).

    Tolerates a daemon working at the same time: the journal is read before
    the segments, so a segment deleted in between is simply absent (its
    messages were done), and a partial record at the journal's end (an
    append in progress) is ignored. Damaged bytes are skipped, not moved.
    """
    if not root.is_dir():
        raise SpoolError(f"no spool at {root}")
    state = SpoolState()
    try:
        ops, _ = decode_journal(_read(root / JOURNAL) or b"")
        names = _segment_names(root) if (root / SEGMENTS).is_dir() else []
        for name in names:
            data = _read(root / SEGMENTS / name)
            if data is not None:
                state.add_segment(name, decode_segment(data)[0])
    except OSError as exc:
        raise _spool_error("read the spool", exc) from exc
    state.apply(ops)
    return state.live()


# ---------------------------------------------------------------------------
# Recovery and quarantine (sync, the lock holder only)
# ---------------------------------------------------------------------------


def _quarantine_path(root: Path, source: str, reason: QuarantineReason) -> Path:
    return root / QUARANTINE / f"{source}.{time.time_ns():x}.{reason.value}"


def _salvage(
    root: Path, name: str, data: bytes, messages: list[StoredMessage], damage: list[Damage]
) -> tuple[list[StoredMessage], QuarantineReport]:
    """Keep a damaged segment's valid records under its name; move the original aside.

    Crash-safe in any order: the original is linked into quarantine/ first,
    then atomically replaced (or removed, if nothing is valid). Redoing it
    after a crash finds either the original again or a clean segment.
    """
    reason = QuarantineReason.CORRUPT_SEGMENT
    copy = _quarantine_path(root, name, reason)
    try:
        os.link(root / SEGMENTS / name, copy)  # a move: the inode leaves segments/ below
    except OSError:
        _write_new_file(copy, data)  # no hard links here: keep a copy instead
    _fsync_dir(root / QUARANTINE)
    kept: list[StoredMessage] = []
    if messages:
        pieces: list[bytes] = []
        pos = 0
        for message in messages:
            pieces.append(data[message.offset : message.offset + message.length])
            shift = pos - message.offset
            kept.append(replace(message, offset=pos, body_offset=message.body_offset + shift))
            pos += message.length
        _install(root, name, b"".join(pieces), tmp_name=f"{name}.salvage")
    else:
        os.unlink(root / SEGMENTS / name)
    _fsync_dir(root / SEGMENTS)
    damaged = sum(d.length for d in damage)
    return kept, QuarantineReport(reason, f"{SEGMENTS}/{name}", copy, damaged, len(kept))


def _load_segment(
    root: Path, name: str, reports: list[QuarantineReport]
) -> list[StoredMessage] | None:
    data = _read(root / SEGMENTS / name)
    if data is None:
        return None
    messages, damage = decode_segment(data)
    if damage:
        messages, report = _salvage(root, name, data, messages, damage)
        reports.append(report)
    return messages


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def _clean_tmp(root: Path) -> None:
    """Remove what dead writers left in tmp/ (a live ``mta-client enqueue`` may be writing)."""
    with os.scandir(root / TMP) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        parsed = parse_segment_name(name)
        if parsed is not None and (parsed[1] == os.getpid() or _pid_alive(parsed[1])):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(root / TMP / name)


def _take_lock(root: Path) -> int:
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise SpoolLockedError(root, int(text) if text.isdigit() else None) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release_lock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # the pid names a holder only while it holds the lock
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _recover_journal(root: Path, reports: list[QuarantineReport]) -> tuple[list[JournalOp], bool]:
    """The journal's operations, and whether damage mid-file calls for a compaction."""
    path = root / JOURNAL
    data = _read(path) or b""
    ops, damage = decode_journal(data)
    tail = damage[-1] if damage and damage[-1].end == len(data) else None
    middle = [d for d in damage if d is not tail]
    copy: Path | None = None
    if middle:
        reason = QuarantineReason.CORRUPT_JOURNAL
        copy = _quarantine_path(root, JOURNAL, reason)
        _write_new_file(copy, data)
        _fsync_dir(root / QUARANTINE)
        damaged = sum(d.length for d in middle)
        reports.append(QuarantineReport(reason, JOURNAL, copy, damaged, len(ops)))
    if tail is not None:
        reason = QuarantineReason.TORN_JOURNAL_TAIL
        if copy is None:
            copy = _quarantine_path(root, JOURNAL, reason)
            _write_new_file(copy, data[tail.start :])
            _fsync_dir(root / QUARANTINE)
        # The bytes are safe in quarantine/: now cut them, so that appends
        # follow the last valid record instead of garbage.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, tail.start)
            os.fsync(fd)
        finally:
            os.close(fd)
        reports.append(QuarantineReport(reason, JOURNAL, copy, tail.length, len(ops)))
    return ops, bool(middle)


class _Journal:
    """The journal's append descriptor. Used in worker threads, one at a time:
    only by the leader of the record group commit, or by open and close."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / JOURNAL
        self.fd = self._open(self.path, os.O_CREAT)
        _fsync_dir(root)  # the journal's name, if this created it
        self.size = os.fstat(self.fd).st_size
        # Unknown until the first compaction: the threshold alone decides.
        self.compacted_size = 0
        self.broken: OSError | None = None

    @staticmethod
    def _open(path: Path, flags: int) -> int:
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | flags, _FILE_MODE)

    def append(self, ops: Sequence[JournalOp]) -> None:
        if self.broken is not None:
            raise SpoolError(f"journal {self.path} unusable after: {self.broken}") from self.broken
        data = encode_ops(ops)
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            # Nothing was synced: cut the partial append so the next one
            # follows a whole record, or give up on the descriptor.
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                self.broken = exc
            raise _spool_error("append to the journal", exc) from exc
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty pages
            # and a retry would "succeed": only a reopen (recovery) is safe.
            self.broken = exc
            raise _spool_error("sync the journal", exc) from exc
        self.size += len(data)

    def due_for_compaction(self, threshold: int) -> bool:
        return self.size > max(threshold, COMPACT_GROWTH * self.compacted_size)

    def compact(self, ops: Sequence[JournalOp]) -> None:
        """Replace the journal with ``ops``: temp file, fsync, rename, directory fsync."""
        # Deletions of finished segments are not fsynced; the new journal no
        # longer says their messages are done, so make the deletions durable.
        _fsync_dir(self.root / SEGMENTS)
        tmp = self.root / TMP / _COMPACT_TMP
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        data = encode_ops(ops)
        fd = self._open(tmp, os.O_CREAT | os.O_EXCL)
        try:
            _write_all(fd, data)
            os.fsync(fd)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The descriptor follows the inode through the rename: it is the journal now.
        os.close(self.fd)
        self.fd = fd
        self.size = self.compacted_size = len(data)
        try:
            _fsync_dir(self.root)
        except OSError as exc:
            self.broken = exc
            raise

    def close(self) -> None:
        os.close(self.fd)


@dataclass(slots=True)
class _Recovered:
    lock_fd: int
    journal: _Journal
    state: SpoolState
    reports: list[QuarantineReport]
    deleted: int
    compacted: bool


def _delete_segments(root: Path, names: Iterable[str]) -> list[str]:
    """Unlink finished segments (no fsync: the journal says done); returns those gone."""
    gone: list[str] = []
    for name in names:
        try:
            os.unlink(root / SEGMENTS / name)
        except FileNotFoundError:
            pass
        except OSError:
            continue  # still held; retried after the next record()
        gone.append(name)
    return gone


def _recover(root: Path, compact_bytes: int) -> _Recovered:
    _ensure_layout(root)
    lock_fd = _take_lock(root)
    journal: _Journal | None = None
    try:
        _clean_tmp(root)
        reports: list[QuarantineReport] = []
        ops, journal_damaged = _recover_journal(root, reports)
        state = SpoolState()
        for name in _segment_names(root):
            messages = _load_segment(root, name, reports)
            if messages:
                state.add_segment(name, messages)
        state.apply(ops)
        gone = _delete_segments(root, state.finished_segments())
        for name in gone:
            state.drop_segment(name)
        journal = _Journal(root)
        compacted = journal_damaged or journal.due_for_compaction(compact_bytes)
        if compacted:
            # Mid-file damage would be reported again at every open: rewrite it away.
            journal.compact(state.compacted_ops())
        return _Recovered(lock_fd, journal, state, reports, len(gone), compacted)
    except BaseException:
        if journal is not None:
            journal.close()
        _release_lock(lock_fd)
        raise


# ---------------------------------------------------------------------------
# Group commit
# ---------------------------------------------------------------------------

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Waiter(Generic[Item, Result]):
    __slots__ = ("_event", "done", "error", "item", "result", "weight")

    def __init__(self, item: Item, weight: int) -> None:
        self.item = item
        self.weight = weight
        self.done = False
        self.result: Result | None = None
        self.error: BaseException | None = None
        self._event = trio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class _GroupCommit(Generic[Item, Result]):
    """Concurrent requests share one batch: the first caller to find no batch
    running leads, runs ``run`` on everything queued (up to ``max_weight``),
    and wakes the others; the next queued caller leads the next batch."""

    def __init__(
        self, run: Callable[[list[Item]], Awaitable[list[Result]]], max_weight: int
    ) -> None:
        self._run = run
        self._max_weight = max_weight
        self._queue: deque[_Waiter[Item, Result]] = deque()
        self._busy = False
        self._idle: list[trio.Event] = []

    async def submit(self, item: Item, weight: int) -> Result:
        waiter: _Waiter[Item, Result] = _Waiter(item, weight)
        self._queue.append(waiter)
        try:
            while not waiter.done:
                if self._busy:
                    await waiter.wait()
                    continue
                self._busy = True
                try:
                    # A batch runs to the end: its writes are not cancellable
                    # anyway, and every waiter in it needs its outcome.
                    with trio.CancelScope(shield=True):
                        await self._lead()
                finally:
                    self._busy = False
                    self._pass_on()
        except BaseException:
            if not waiter.done:
                with contextlib.suppress(ValueError):
                    self._queue.remove(waiter)  # withdrawn before any batch took it
                self._pass_on()
            raise
        if waiter.error is not None:
            raise SpoolError(str(waiter.error)) from waiter.error
        return waiter.result  # type: ignore[return-value]  # set with done

    def _pass_on(self) -> None:
        if self._busy:
            return
        if self._queue:
            self._queue[0].wake()  # the next leader
        else:
            for event in self._idle:
                event.set()
            self._idle.clear()

    async def _lead(self) -> None:
        batch: list[_Waiter[Item, Result]] = [self._queue.popleft()]
        weight = batch[0].weight
        while self._queue and weight + self._queue[0].weight <= self._max_weight:
            weight += self._queue[0].weight
            batch.append(self._queue.popleft())
        try:
            results = await self._run([w.item for w in batch])
        except BaseException as exc:
            for waiter in batch:
                waiter.error = exc
                waiter.done = True
                waiter.wake()
            if not isinstance(exc, Exception):
                raise
            return
        for waiter, result in zip(batch, results, strict=True):
            waiter.result = result
            waiter.done = True
            waiter.wake()

    async def drain(self) -> None:
        """Return once everything queued so far has run."""
        if self._busy or self._queue:
            event = trio.Event()
            self._idle.append(event)
            await event.wait()


# ---------------------------------------------------------------------------
# The spool
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Enqueue:
    messages: list[NewMessage]
    received: float


def _body_bytes(messages: Iterable[NewMessage]) -> int:
    return sum(len(m.body) for m in messages)


class Spool:
    """The lock holder's spool: what ``mta-client run`` opens for its lifetime.

    Make it with :meth:`open`; close it with :meth:`aclose` (or ``async with``).
    All disk work runs in worker threads, one hop per batch.
    """

    def __init__(
        self, root: Path, clock: WallClock, recovered: _Recovered, compact_bytes: int
    ) -> None:
        self.root = root
        self.quarantined: list[QuarantineReport] = list(recovered.reports)
        """What recovery (and later scans and reads) set aside; grows, never shrinks."""
        self.stats = SpoolStats(segments_deleted=recovered.deleted)
        self.stats.compactions = int(recovered.compacted)
        self._clock = clock
        self._lock_fd = recovered.lock_fd
        self._journal = recovered.journal
        self._state = recovered.state
        self._compact_bytes = compact_bytes
        # Segments this process knows of: held, being written by enqueue, or
        # not yet deleted. scan_new reads only the others.
        self._known: set[str] = set(recovered.state.segments())
        self._enqueues: _GroupCommit[_Enqueue, list[str]] = _GroupCommit(
            self._enqueue_batch, MAX_BATCH_BYTES
        )
        self._records: _GroupCommit[list[JournalOp], None] = _GroupCommit(self._record_batch, 2**62)
        self._reads: _GroupCommit[list[tuple[str, StoredMessage]], dict[str, bytes]] = _GroupCommit(
            self._read_batch, MAX_READ_BATCH
        )
        self._scan_lock = trio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls, root: Path, *, clock: WallClock, compact_bytes: int = COMPACT_BYTES
    ) -> Spool:
        """Create the layout if needed, take the lock, and recover.

        Raises SpoolLockedError if another process holds the lock, SpoolError
        if the disk work fails. ``quarantined`` then lists what recovery set
        aside. ``compact_bytes`` is the journal compaction threshold.
        """
        try:
            recovered = await trio.to_thread.run_sync(_recover, root, compact_bytes)
        except SpoolError:
            raise
        except OSError as exc:
            raise _spool_error(f"open the spool {root}", exc) from exc
        return cls(root, clock, recovered, compact_bytes)

    async def __aenter__(self) -> Spool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.root} is closed")

    def messages(self) -> list[QueuedMessage]:
        """Every message with recipients left, oldest first."""
        return self._state.live()

    def message(self, message_id: str) -> QueuedMessage | None:
        """One message's live state; None if it is finished or unknown."""
        return self._state.queued(message_id)

    # -- enqueue --------------------------------------------------------------

    async def enqueue(self, messages: Sequence[NewMessage]) -> list[str]:
        """Spool ``messages`` (received now); returns their ids once they are durable.

        Concurrent callers share one segment and one set of fsyncs. Raises
        ValueError for a message that cannot be spooled (before any disk
        work), SpoolError if the batch's write failed.
        """
        self._check_open()
        if not messages:
            return []
        for message in messages:
            validate_message(message)
        request = _Enqueue(list(messages), self._clock.now())
        return await self._enqueues.submit(request, max(1, _body_bytes(messages)))

    async def _enqueue_batch(self, requests: list[_Enqueue]) -> list[list[str]]:
        name = _NAMES.next()
        self._known.add(name)  # before the rename: scan_new must never take it for new
        try:
            stored = await trio.to_thread.run_sync(self._write_batch, name, requests)
        except BaseException:
            self._known.discard(name)
            raise
        self._state.add_segment(name, stored)
        self.stats.segments_written += 1
        self.stats.messages_enqueued += len(stored)
        ids = iter(m.id for m in stored)
        return [[next(ids) for _ in request.messages] for request in requests]

    def _write_batch(self, name: str, requests: list[_Enqueue]) -> list[StoredMessage]:
        messages = [m for request in requests for m in request.messages]
        received = [request.received for request in requests for _ in request.messages]
        data, stored = encode_segment(name, messages, received=received)
        try:
            _install(self.root, name, data)
            _fsync_dir(self.root / SEGMENTS)
        except OSError as exc:
            raise _spool_error(f"write a segment in {self.root}", exc) from exc
        return stored

    # -- record ---------------------------------------------------------------

    async def record(self, ops: Sequence[JournalOp]) -> None:
        """Append ``ops`` to the journal; returns once they are fdatasynced.

        Concurrent callers share one append and one fdatasync. Operations on
        ids the spool does not hold are dropped. Segments whose messages are
        then all finished are deleted. Raises SpoolError if the append failed
        (after a failed sync every later call fails too: reopen the spool).
        """
        self._check_open()
        held = [op for op in ops if self._state.holds(op.id)]
        if held:
            await self._records.submit(held, len(held))

    async def _record_batch(self, batches: list[list[JournalOp]]) -> list[None]:
        ops = [op for batch in batches for op in batch]
        await trio.to_thread.run_sync(self._journal.append, ops)
        self.stats.journal_syncs += 1
        self.stats.ops_recorded += len(ops)
        self._state.apply(ops)
        # Housekeeping runs while this batch still leads, so that compaction
        # never races an append. Its failures are not the callers': their
        # operations are durable; it is retried after the next batch.
        with contextlib.suppress(OSError):
            await self._housekeep()
        return [None] * len(batches)

    async def _housekeep(self) -> None:
        finished = self._state.finished_segments()
        compact = self._journal.due_for_compaction(self._compact_bytes)
        if not finished and not compact:
            return
        ops = self._state.compacted_ops(excluding=finished) if compact else None
        gone, compacted = await trio.to_thread.run_sync(self._housekeep_sync, finished, ops)
        for name in gone:
            self._state.drop_segment(name)
            self._known.discard(name)
        self.stats.segments_deleted += len(gone)
        self.stats.compactions += int(compacted)

    def _housekeep_sync(
        self, finished: list[str], ops: list[JournalOp] | None
    ) -> tuple[list[str], bool]:
        gone = _delete_segments(self.root, finished)
        # The compacted journal omits the finished segments: only if all are gone.
        if ops is None or len(gone) != len(finished):
            return gone, False
        try:
            self._journal.compact(ops)
        except OSError:
            # Try again only after as much growth again, not on every batch.
            self._journal.compacted_size = self._journal.size
            return gone, False
        return gone, True

    # -- segments from other processes ------------------------------------------

    async def scan_new(self) -> list[QueuedMessage]:
        """Messages in segments other processes wrote since open or the last scan.

        Each segment is returned once. A damaged one is salvaged as at open,
        and reported in ``quarantined``.
        """
        self._check_open()
        async with self._scan_lock:
            known = frozenset(self._known)
            try:
                found, reports = await trio.to_thread.run_sync(self._scan_sync, known)
            except OSError as exc:
                raise _spool_error("scan the spool", exc) from exc
            self.quarantined += reports
            new: list[QueuedMessage] = []
            for name, messages in found:
                self._known.add(name)
                for message in self._state.add_segment(name, messages):
                    queued = self._state.queued(message.id)
                    if queued is not None:
                        new.append(queued)
        return new

    def _scan_sync(
        self, known: frozenset[str]
    ) -> tuple[list[tuple[str, list[StoredMessage]]], list[QuarantineReport]]:
        found: list[tuple[str, list[StoredMessage]]] = []
        reports: list[QuarantineReport] = []
        for name in _segment_names(self.root):
            if name in known:
                continue
            messages = _load_segment(self.root, name, reports)
            if messages is not None:
                found.append((name, messages))
        return found, reports

    # -- bodies -----------------------------------------------------------------

    async def read_bodies(self, ids: Sequence[str]) -> dict[str, bytes]:
        """The bodies of the held messages among ``ids``.

        Concurrent callers share one thread hop. An id the spool does not
        hold is left out. So is a record that no longer passes its CRC (the
        disk changed under us): it is reported in ``quarantined``, and the
        next open salvages its segment.
        """
        self._check_open()
        wanted = [located for i in ids if (located := self._state.locate(i)) is not None]
        if not wanted:
            return {}
        return await self._reads.submit(wanted, len(wanted))

    async def _read_batch(
        self, requests: list[list[tuple[str, StoredMessage]]]
    ) -> list[dict[str, bytes]]:
        wanted: dict[str, list[StoredMessage]] = {}
        for request in requests:
            for name, message in request:
                wanted.setdefault(name, []).append(message)
        try:
            bodies, bad = await trio.to_thread.run_sync(self._read_sync, wanted)
        except OSError as exc:
            raise _spool_error("read message bodies", exc) from exc
        self.stats.read_batches += 1
        for name, damaged in bad:
            report = QuarantineReport(
                QuarantineReason.CORRUPT_RECORD, f"{SEGMENTS}/{name}", None, damaged, 0
            )
            self.quarantined.append(report)
        return [{m.id: bodies[m.id] for _, m in request if m.id in bodies} for request in requests]

    def _read_sync(
        self, wanted: dict[str, list[StoredMessage]]
    ) -> tuple[dict[str, bytes], list[tuple[str, int]]]:
        bodies: dict[str, bytes] = {}
        bad: list[tuple[str, int]] = []
        for name, messages in wanted.items():
            try:
                fd = os.open(self.root / SEGMENTS / name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # deleted meanwhile: its messages were all finished
            try:
                for message in messages:
                    data = os.pread(fd, message.length, message.offset)
                    try:
                        stored, body = decode_message_record(data)
                    except ValueError:
                        bad.append((name, message.length))
                        continue
                    if stored.id == message.id:
                        bodies[message.id] = body
                    else:
                        bad.append((name, message.length))
            finally:
                os.close(fd)
        return bodies, bad

    # -- close --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Finish the batches already queued, then release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Shielded: a worker thread may be using the descriptors this closes.
        with trio.CancelScope(shield=True):
            await self._enqueues.drain()
            await self._records.drain()
            await self._reads.drain()
            async with self._scan_lock:
                await trio.to_thread.run_sync(self._close_sync)

    def _close_sync(self) -> None:
        try:
            self._journal.close()
        finally:
            _release_lock(self._lock_fd)
