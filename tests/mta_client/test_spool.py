"""Tests for mta_client.spool: the durable spool on real files in tmp_path.

Crashes and the lock are real: child processes are SIGKILLed mid-enqueue, and
flock(2) is contended from another process (a lock is per open file
description, so only another process shows the real behaviour).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from mta_client.clock import WallClock
from mta_client.spool import (
    QuarantineReason,
    Spool,
    SpoolError,
    SpoolLockedError,
    inspect,
    write_segment,
)
from mta_client.spool_format import (
    Done,
    JournalOp,
    NewMessage,
    QueuedMessage,
    Scheduled,
    decode_segment,
    encode_op,
    segment_name,
    segment_of,
)

EPOCH = 1_700_000_000.0
CHILD_DEADLINE = 60  # seconds for a child Python to start and answer: a real process


def msg(i: int, recipients: int = 2) -> NewMessage:
    body = b"Subject: %d\r\n\r\n" % i + bytes([i % 256]) * (i % 97) + b"\x00\xff\r\n.\r\n"
    return NewMessage(
        f"s{i}@sender.test", tuple(f"r{i}-{k}@example.test" for k in range(recipients)), body
    )


async def open_spool(root: Path, **options: int) -> Spool:
    return await Spool.open(root, clock=WallClock(EPOCH), **options)


def segment_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "segments"))


def addresses(message: QueuedMessage) -> tuple[str, ...]:
    return tuple(r.address for r in message.recipients)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


class LineReader:
    """Lines from a child's stdout (a trio stream)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def line(self) -> str | None:
        """The next whole line, or None at EOF (a partial last line is dropped)."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


# ---------------------------------------------------------------------------
# Enqueue, reopen, group commit
# ---------------------------------------------------------------------------


async def test_enqueued_messages_come_back_byte_exact_after_reopen(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    messages = [msg(i, recipients=1 + i % 3) for i in range(6)]
    spool = await open_spool(tmp_path)
    ids = await spool.enqueue(messages[:2]) + await spool.enqueue(messages[2:])
    await spool.aclose()

    spool = await open_spool(tmp_path)
    live = spool.messages()
    assert [m.id for m in live] == ids
    for queued, message in zip(live, messages, strict=True):
        assert queued.sender == message.sender
        assert addresses(queued) == message.recipients
        assert all(r.attempts == 0 and r.next_attempt == EPOCH for r in queued.recipients)
        assert queued.received == EPOCH
        assert queued.size == len(message.body)
    assert await spool.read_bodies(ids) == {i: m.body for i, m in zip(ids, messages, strict=True)}
    assert spool.quarantined == []
    await spool.aclose()


async def test_ids_name_their_segment_file(tmp_path: Path) -> None:
    async with await open_spool(tmp_path) as spool:
        ids = await spool.enqueue([msg(0), msg(1)])
    assert {segment_of(i) for i in ids} == set(segment_files(tmp_path))


async def test_concurrent_enqueues_share_segments_and_all_survive_reopen(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    acknowledged: dict[int, str] = {}

    async def one(i: int) -> None:
        [acknowledged[i]] = await spool.enqueue([msg(i)])

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    await spool.aclose()

    assert len(acknowledged) == 200
    assert len(set(acknowledged.values())) == 200
    # Group commit: a handful of segments (and fsyncs), not one per call.
    assert spool.stats.segments_written == len(segment_files(tmp_path)) <= 10
    spool = await open_spool(tmp_path)
    assert {m.id for m in spool.messages()} == set(acknowledged.values())
    bodies = await spool.read_bodies(list(acknowledged.values()))
    assert bodies == {ident: msg(i).body for i, ident in acknowledged.items()}
    await spool.aclose()


async def test_concurrent_records_share_fdatasyncs_and_survive_reopen(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    ids = await spool.enqueue([msg(i) for i in range(100)])

    async def finish_first(ident: str, i: int) -> None:
        await spool.record([Done(ident, (f"r{i}-0@example.test",))])

    async with trio.open_nursery() as nursery:
        for i, ident in enumerate(ids):
            nursery.start_soon(finish_first, ident, i)
    assert spool.stats.ops_recorded == 100
    assert spool.stats.journal_syncs <= 10
    await spool.aclose()

    spool = await open_spool(tmp_path)
    live = spool.messages()
    assert [addresses(m) for m in live] == [(f"r{i}-1@example.test",) for i in range(100)]
    await spool.aclose()


async def test_concurrent_body_reads_share_thread_hops(tmp_path: Path) -> None:
    async with await open_spool(tmp_path) as spool:
        ids = await spool.enqueue([msg(i) for i in range(50)])
        bodies: dict[str, bytes] = {}

        async def read(ident: str) -> None:
            bodies.update(await spool.read_bodies([ident]))

        async with trio.open_nursery() as nursery:
            for ident in ids:
                nursery.start_soon(read, ident)
        assert bodies == {ident: msg(i).body for i, ident in enumerate(ids)}
        assert spool.stats.read_batches <= 5


async def test_a_waiter_cancelled_before_its_batch_writes_nothing(tmp_path: Path) -> None:
    async with await open_spool(tmp_path) as spool:
        scope = trio.CancelScope()

        async def follower() -> None:
            with scope:
                await spool.enqueue([msg(1)])

        # Hold the worker threads (this run's limiter) so that the leader
        # stays in its batch, deterministically, while msg(1) waits.
        limiter = trio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 1
        await limiter.acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.enqueue, [msg(0)])
            await trio.testing.wait_all_tasks_blocked()  # msg(0) leads, waiting for a thread
            nursery.start_soon(follower)
            await trio.testing.wait_all_tasks_blocked()  # msg(1) queued behind it
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            limiter.release()
        assert scope.cancelled_caught
        assert [m.sender for m in spool.messages()] == [msg(0).sender]
        assert spool.stats.segments_written == 1


async def test_a_failed_segment_write_fails_every_waiter(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    (tmp_path / "segments").rename(tmp_path / "segments.away")
    (tmp_path / "segments").write_bytes(b"not a directory")
    failures: list[SpoolError] = []

    async def one(i: int) -> None:
        with pytest.raises(SpoolError) as info:
            await spool.enqueue([msg(i)])
        failures.append(info.value)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert len(failures) == 50
    assert all("cannot write a segment" in str(f) for f in failures)
    assert spool.messages() == []
    assert os.listdir(tmp_path / "tmp") == []  # the temp files went with the failure
    await spool.aclose()


async def test_enqueue_refuses_a_message_without_recipients_before_any_disk_work(
    tmp_path: Path,
) -> None:
    async with await open_spool(tmp_path) as spool:
        with pytest.raises(ValueError, match="recipient"):
            await spool.enqueue([msg(0), NewMessage("a@x.test", (), b"x")])
        assert spool.stats.segments_written == 0
    with pytest.raises(ValueError, match="recipient"):
        write_segment(tmp_path, [NewMessage("a@x.test", (), b"x")], now=EPOCH)


# ---------------------------------------------------------------------------
# Crashes
# ---------------------------------------------------------------------------

CRASH_CHILD = """
import sys
from pathlib import Path
from mta_client.spool import write_segment
from mta_client.spool_format import NewMessage

root = Path(sys.argv[1])
i = 0
while True:
    batch = [NewMessage("s@x.test", ("r@y.test",), b"body %d " % (i + k) * 500) for k in range(3)]
    for ident in write_segment(root, batch, now=float(i)):
        print(ident, flush=True)
    i += 3
"""


async def test_sigkill_mid_enqueue_loses_no_acknowledged_id(tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CRASH_CHILD, str(tmp_path)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    reader = LineReader(process.stdout)
    printed: list[str] = []
    with trio.fail_after(CHILD_DEADLINE):
        while len(printed) < 300:
            line = await reader.line()
            assert line is not None, "the child died on its own"
            printed.append(line)
        process.kill()  # SIGKILL, mid-loop
        await process.wait()  # reaped: its pid is dead, so open may clean its tmp files
        while (line := await reader.line()) is not None:
            printed.append(line)
    await process.stdout.aclose()
    assert process.returncode == -9

    spool = await open_spool(tmp_path)
    live = {m.id: m for m in spool.messages()}
    assert set(printed) <= set(live)
    # At most one segment more: written, renamed, but killed before printing.
    assert len({segment_of(i) for i in set(live) - set(printed)}) <= 1
    bodies = await spool.read_bodies(list(live))
    assert set(bodies) == set(live)
    assert all(re.fullmatch(rb"(body \d+ ){500}", body) for body in bodies.values())
    assert os.listdir(tmp_path / "tmp") == []
    assert spool.quarantined == []
    await spool.aclose()


async def test_tmp_files_of_dead_writers_are_removed_at_open_and_live_ones_kept(
    tmp_path: Path,
) -> None:
    dead = await trio.lowlevel.open_process([sys.executable, "-c", "pass"])
    await dead.wait()
    write_segment(tmp_path, [msg(0)], now=EPOCH)  # creates the layout
    tmp = tmp_path / "tmp"
    dead_file = tmp / segment_name(1, dead.pid)
    live_file = tmp / segment_name(2, os.getpid())  # a writer still running
    for path in (dead_file, live_file, tmp / "journal.compact"):
        path.write_bytes(b"half a segment")

    async with await open_spool(tmp_path) as spool:
        assert sorted(os.listdir(tmp)) == [live_file.name]
        assert len(spool.messages()) == 1


# ---------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------

LOCK_CHILD = """
import sys
from pathlib import Path

import trio

from mta_client.clock import WallClock
from mta_client.spool import Spool


async def main() -> None:
    spool = await Spool.open(Path(sys.argv[1]), clock=WallClock())
    print("locked", flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
    await spool.aclose()
    print("released", flush=True)


trio.run(main)
"""


async def test_a_spool_locked_by_another_process_refuses_to_open_naming_the_pid(
    tmp_path: Path,
) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", LOCK_CHILD, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    reader = LineReader(process.stdout)
    with trio.fail_after(CHILD_DEADLINE):
        assert await reader.line() == "locked"
        with pytest.raises(SpoolLockedError) as info:
            await open_spool(tmp_path)
        assert info.value.pid == process.pid
        assert str(info.value) == f"spool {tmp_path} is locked by pid {process.pid}"

        await process.stdin.aclose()
        assert await reader.line() == "released"
        await process.wait()
    await process.stdout.aclose()

    spool = await open_spool(tmp_path)  # after the holder's aclose, it works
    await spool.aclose()


async def test_a_closed_spool_refuses_work_and_can_be_reopened(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    await spool.aclose()
    await spool.aclose()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        await spool.enqueue([msg(0)])
    with pytest.raises(SpoolError, match="closed"):
        await spool.record([Done("x.0", ("a",))])
    again = await open_spool(tmp_path)
    await again.aclose()


# ---------------------------------------------------------------------------
# Damage: segments and journal
# ---------------------------------------------------------------------------


async def test_a_corrupt_segment_byte_keeps_the_other_records_and_quarantines_the_file(
    tmp_path: Path,
) -> None:
    ids = write_segment(tmp_path, [msg(0), msg(1), msg(2)], now=EPOCH)
    [name] = segment_files(tmp_path)
    path = tmp_path / "segments" / name
    stored, _ = decode_segment(path.read_bytes())
    flip_byte(path, stored[1].body_offset + 3)
    damaged = path.read_bytes()

    spool = await open_spool(tmp_path)
    assert [m.id for m in spool.messages()] == [ids[0], ids[2]]
    [report] = spool.quarantined
    assert report.reason is QuarantineReason.CORRUPT_SEGMENT
    assert report.source == f"segments/{name}"
    assert report.copy is not None
    assert report.copy.parent == tmp_path / "quarantine"
    assert report.copy.read_bytes() == damaged
    assert report.kept == 2
    assert report.damaged_bytes == stored[1].length
    assert await spool.read_bodies(ids) == {ids[0]: msg(0).body, ids[2]: msg(2).body}
    assert decode_segment(path.read_bytes())[1] == []  # salvaged under the same name
    await spool.aclose()

    spool = await open_spool(tmp_path)  # nothing left to report
    assert spool.quarantined == []
    assert [m.id for m in spool.messages()] == [ids[0], ids[2]]
    await spool.aclose()


async def test_a_segment_with_no_valid_record_is_moved_to_quarantine(tmp_path: Path) -> None:
    write_segment(tmp_path, [msg(0)], now=EPOCH)
    [name] = segment_files(tmp_path)
    flip_byte(tmp_path / "segments" / name, 0)
    async with await open_spool(tmp_path) as spool:
        assert spool.messages() == []
        [report] = spool.quarantined
        assert report.kept == 0
        assert report.copy is not None
        assert report.copy.exists()
    assert segment_files(tmp_path) == []


async def test_a_torn_journal_tail_is_quarantined_and_truncated(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    [ident] = await spool.enqueue([msg(0)])
    await spool.record([Scheduled(ident, ("r0-1@example.test",), 1, EPOCH + 60)])
    await spool.aclose()
    journal = tmp_path / "journal"
    whole = journal.read_bytes()
    torn = encode_op(Done(ident, ("r0-0@example.test",)))[:30]
    journal.write_bytes(whole + torn)

    spool = await open_spool(tmp_path)
    [report] = spool.quarantined
    assert report.reason is QuarantineReason.TORN_JOURNAL_TAIL
    assert report.damaged_bytes == len(torn)
    assert report.copy is not None
    assert report.copy.read_bytes() == torn
    assert journal.read_bytes() == whole
    [queued] = spool.messages()
    assert [(r.address, r.attempts, r.next_attempt) for r in queued.recipients] == [
        ("r0-0@example.test", 0, queued.received),
        ("r0-1@example.test", 1, EPOCH + 60),
    ]
    await spool.record([Done(ident, ("r0-0@example.test",))])  # appends after the cut
    await spool.aclose()

    spool = await open_spool(tmp_path)
    assert spool.quarantined == []
    assert [addresses(m) for m in spool.messages()] == [("r0-1@example.test",)]
    await spool.aclose()


async def test_a_corrupt_journal_record_is_skipped_reported_and_compacted_away(
    tmp_path: Path,
) -> None:
    spool = await open_spool(tmp_path)
    ids = await spool.enqueue([msg(0), msg(1), msg(2)])
    sizes = []
    for i, ident in enumerate(ids):
        await spool.record([Done(ident, (f"r{i}-0@example.test",))])
        sizes.append((tmp_path / "journal").stat().st_size)
    await spool.aclose()
    journal = tmp_path / "journal"
    flip_byte(journal, sizes[0] + 30)  # inside the second record
    damaged = journal.read_bytes()

    spool = await open_spool(tmp_path)
    [report] = spool.quarantined
    assert report.reason is QuarantineReason.CORRUPT_JOURNAL
    assert report.damaged_bytes == sizes[1] - sizes[0]
    assert report.kept == 2
    assert report.copy is not None
    assert report.copy.read_bytes() == damaged
    expected = [("r0-1@example.test",), ("r1-0@example.test", "r1-1@example.test")]
    expected.append(("r2-1@example.test",))
    assert [addresses(m) for m in spool.messages()] == expected
    await spool.aclose()

    spool = await open_spool(tmp_path)  # compacted at open: not reported twice
    assert spool.quarantined == []
    assert [addresses(m) for m in spool.messages()] == expected
    await spool.aclose()


async def test_a_record_that_rots_after_open_is_left_out_and_reported(tmp_path: Path) -> None:
    ids = write_segment(tmp_path, [msg(0), msg(1)], now=EPOCH)
    spool = await open_spool(tmp_path)
    [name] = segment_files(tmp_path)
    path = tmp_path / "segments" / name
    stored, _ = decode_segment(path.read_bytes())
    flip_byte(path, stored[0].body_offset)
    assert await spool.read_bodies(ids) == {ids[1]: msg(1).body}
    [report] = spool.quarantined
    assert report.reason is QuarantineReason.CORRUPT_RECORD
    assert report.source == f"segments/{name}"
    await spool.aclose()


# ---------------------------------------------------------------------------
# The daemon's view: record, scan_new, inspect, compaction
# ---------------------------------------------------------------------------


async def test_done_for_every_recipient_deletes_the_segment(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    first, second = await spool.enqueue([msg(0), msg(1)])
    [name] = segment_files(tmp_path)
    await spool.record([Done(first, ("r0-0@example.test", "r0-1@example.test"))])
    assert segment_files(tmp_path) == [name]  # the other message still needs it
    await spool.record([Done(second, ("r1-0@example.test",))])
    assert segment_files(tmp_path) == [name]
    await spool.record([Done(second, ("r1-1@example.test",))])
    assert segment_files(tmp_path) == []
    assert spool.stats.segments_deleted == 1
    assert spool.messages() == []
    assert await spool.read_bodies([first, second]) == {}
    await spool.aclose()

    spool = await open_spool(tmp_path)
    assert spool.messages() == []
    await spool.aclose()


async def test_ops_on_ids_the_spool_does_not_hold_are_not_written(tmp_path: Path) -> None:
    async with await open_spool(tmp_path) as spool:
        await spool.record([Done("0000000000000001-1.0", ("a@x.test",))])
        assert spool.stats.journal_syncs == 0
        assert await spool.read_bodies(["0000000000000001-1.0"]) == {}
    assert (tmp_path / "journal").stat().st_size == 0


async def test_scan_new_returns_a_segment_written_after_open_exactly_once(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    own = await spool.enqueue([msg(0)])
    other = await trio.to_thread.run_sync(
        lambda: write_segment(tmp_path, [msg(1), msg(2)], now=EPOCH + 5)
    )
    new = await spool.scan_new()
    assert [m.id for m in new] == other
    assert [addresses(m) for m in new] == [msg(1).recipients, msg(2).recipients]
    assert await spool.scan_new() == []
    assert [m.id for m in spool.messages()] == own + other
    assert await spool.read_bodies(other) == {other[0]: msg(1).body, other[1]: msg(2).body}
    await spool.aclose()


async def test_inspect_gives_the_live_state_of_an_open_spool(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    ids = await spool.enqueue([msg(i, recipients=3) for i in range(4)])
    ops: list[JournalOp] = [
        Done(ids[0], ("r0-0@example.test", "r0-1@example.test", "r0-2@example.test")),
        Done(ids[1], ("r1-1@example.test",)),
        Scheduled(ids[2], ("r2-0@example.test", "r2-2@example.test"), 2, EPOCH + 900),
    ]
    await spool.record(ops)
    viewed = await trio.to_thread.run_sync(inspect, tmp_path)
    assert viewed == spool.messages()
    assert [m.id for m in viewed] == ids[1:]
    await spool.aclose()


def test_inspect_of_a_missing_spool_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="no spool"):
        inspect(tmp_path / "nowhere")


async def test_a_journal_over_the_threshold_is_compacted_at_open(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path)
    [ident] = await spool.enqueue([msg(0)])
    for attempt in range(1, 40):
        await spool.record([Scheduled(ident, msg(0).recipients, attempt, EPOCH + attempt)])
    before = spool.messages()
    await spool.aclose()
    grown = (tmp_path / "journal").stat().st_size

    spool = await open_spool(tmp_path, compact_bytes=grown - 1)
    assert spool.stats.compactions == 1
    assert (tmp_path / "journal").stat().st_size < grown / 10
    assert spool.messages() == before
    await spool.aclose()


async def test_compaction_shrinks_the_journal_and_keeps_the_state(tmp_path: Path) -> None:
    spool = await open_spool(tmp_path, compact_bytes=4000)
    ids = await spool.enqueue([msg(i) for i in range(10)])
    await spool.record([Done(ids[0], msg(0).recipients)])
    for attempt in range(1, 30):
        ops: list[JournalOp] = [
            Scheduled(ident, (f"r{i}-0@example.test",), attempt, EPOCH + attempt)
            for i, ident in enumerate(ids[1:], start=1)
        ]
        await spool.record(ops)
    assert spool.stats.compactions >= 1
    assert (tmp_path / "journal").stat().st_size < 4 * 4000
    before = spool.messages()
    assert before[0].recipients[0].attempts == 29
    await spool.aclose()

    spool = await open_spool(tmp_path, compact_bytes=4000)
    assert spool.messages() == before
    await spool.aclose()
