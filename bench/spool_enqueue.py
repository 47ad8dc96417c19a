"""Benchmark the spool's durable throughput (fsync on), on the disk given by --dir.

    python bench/spool_enqueue.py --messages 20000 --size 4096 --concurrency 64 [--dir D]

Phases, each in a fresh spool directory:

1. ``Spool.enqueue``: ``--concurrency`` tasks each enqueue one message per
   call; group commit shares segments and fsyncs among concurrent callers.
2. ``Spool.open`` of the resulting spool: recovery time.
3. Delivery bookkeeping, as the daemon would do it: ``--concurrency`` workers
   each take one message at a time, ``read_bodies([id])`` then
   ``record([Done(...)])`` (group-committed), until every segment is deleted.
4. ``write_segment`` (what ``mta-client enqueue`` does, one process, no
   concurrency) with each of ``--batch-sizes`` messages per segment.

Run it on the disk the spool will live on: a tmpfs makes fsync free and the
figures meaningless.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import trio

from mta_client.clock import WallClock
from mta_client.spool import Spool, write_segment
from mta_client.spool_format import Done, NewMessage


def _message(i: int, size: int) -> NewMessage:
    head = b"Subject: bench %d\r\n\r\n" % i
    return NewMessage(
        "bench@sender.test", (f"r{i}@example.test",), head + b"x" * (size - len(head))
    )


def _report(label: str, count: int, seconds: float, extra: str = "") -> None:
    rate = count / seconds if seconds > 0 else float("inf")
    print(f"{label:<42} {count:>7} msgs in {seconds:7.3f} s = {rate:>9,.0f} msgs/s {extra}")


async def _enqueue_phase(root: Path, count: int, size: int, concurrency: int) -> None:
    messages = [_message(i, size) for i in range(count)]
    spool = await Spool.open(root, clock=WallClock())
    cursor = iter(messages)

    async def worker() -> None:
        for message in cursor:  # shared iterator: each message is taken once
            await spool.enqueue([message])

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    stats = spool.stats
    await spool.aclose()
    per_segment = stats.messages_enqueued / max(1, stats.segments_written)
    _report(
        f"Spool.enqueue, {concurrency} concurrent callers",
        count,
        elapsed,
        f"({stats.segments_written} segments, {per_segment:.1f} msgs each)",
    )


async def _deliver_phase(root: Path, concurrency: int) -> None:
    start = time.perf_counter()
    spool = await Spool.open(root, clock=WallClock())
    opened = time.perf_counter() - start
    queued = spool.messages()
    _report("Spool.open (recovery)", len(queued), opened)
    cursor = iter(queued)

    async def worker() -> None:
        for message in cursor:
            bodies = await spool.read_bodies([message.id])
            assert len(bodies[message.id]) == message.size
            recipients = tuple(r.address for r in message.recipients)
            await spool.record([Done(message.id, recipients)])

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    stats = spool.stats
    left = len(spool.messages())
    await spool.aclose()
    assert left == 0
    _report(
        f"read_bodies + record(Done), {concurrency} workers",
        len(queued),
        elapsed,
        f"({stats.journal_syncs} journal syncs, {stats.segments_deleted} segments deleted)",
    )


def _write_segment_phase(root: Path, count: int, size: int, batch: int) -> None:
    messages = [_message(i, size) for i in range(count)]
    now = time.time()
    start = time.perf_counter()
    for first in range(0, count, batch):
        write_segment(root, messages[first : first + batch], now=now)
    _report(f"write_segment, {batch} per segment", count, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=4096, help="body bytes per message")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,16,64,256", help="for write_segment")
    parser.add_argument("--dir", type=Path, default=None, help="where to make spools")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
    print(f"spools under {base}; {args.size}-byte bodies; fsync on")
    try:
        trio.run(_enqueue_phase, base / "enqueue", args.messages, args.size, args.concurrency)
        trio.run(_deliver_phase, base / "enqueue", args.concurrency)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            # Single-message segments cost two fsyncs each: cap the run's length.
            count = min(args.messages, max(1000, 200 * batch))
            _write_segment_phase(base / f"segments-{batch}", count, args.size, batch)
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
