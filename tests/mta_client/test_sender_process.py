"""The spooling sender as operators run it: real processes, SIGKILL and SIGTERM.

``mta-client enqueue`` spools the messages, ``mta-client run`` (a child
process) delivers them through a real kumoproxy (in process, over loopback)
from 127.0.0.2 and 127.0.0.3 to Postfix's smtp-sink, and the test counts the
Message-ID lines smtp-sink dumped. Delivery is at-least-once: a transaction
the server acknowledged but the spool had not yet journaled is sent again
after a crash, so a SIGKILL may duplicate at most the transactions in flight
(one per connection); a SIGTERM, none.
"""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from kumoproxy.config import parse_config
from mta_client.events import EventKind
from mta_client.spool import inspect
from tests.mta_client.senderkit import (
    Sink,
    enqueue,
    events_of,
    needs_smtp_sink,
    queue_json,
    sender_config,
    sender_process,
    smtp_sink,
    spool_root,
    wait_until_sink_has,
    write_eml_dir,
)
from tests.netkit import RunningService, running_service

pytestmark = needs_smtp_sink

PROXY_CONFIG = """
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
sources: [127.0.0.2, 127.0.0.3]
clients:
  allow: [127.0.0.0/8]
destinations:
  ports: any
  allow: [127.0.0.0/8]
"""

SOURCES = ("127.0.0.2", "127.0.0.3")
#: Connections per path (source -> site): with two sources, at most 8
#: transactions are in flight, so a SIGKILL can duplicate at most 8 messages.
CONNECTION_LIMIT = 4
IN_FLIGHT = CONNECTION_LIMIT * len(SOURCES)
SHUTDOWN_TIMEOUT = 10.0


def config_for(tmp_path: Path, kumo: RunningService, sink: Sink) -> Path:
    # The built-in default message rate (100/s per path) would make these
    # tests measure the rate limiter; the connection limit is what matters.
    return sender_config(
        tmp_path,
        proxy=kumo.address("socks5"),
        sink_port=sink.port,
        sources=SOURCES,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        extra=(
            "shaping:\n"
            f"  default: {{connection_limit: {CONNECTION_LIMIT}, max_message_rate: 100000/s}}\n"
        ),
    )


async def wait_until_spool_empty(root: Path, *, within: float, poll: float = 0.1) -> None:
    """Poll the spool (lock-free :func:`inspect`) until nothing is left to deliver.

    The daemon journals a delivery only after the server's answer, and
    re-delivers after a crash what it had not journaled: the sink having
    every Message-ID does not yet mean the spool is done with them.
    """
    with trio.fail_after(within):
        while await trio.to_thread.run_sync(inspect, root):  # noqa: ASYNC110 (another process)
            await trio.sleep(poll)


#: The issue's must-show: 5,000 messages of about 4 KiB, each with its own Message-ID.
TOTAL = 5000
SIZE = 4096
#: Enqueued by this many concurrent ``mta-client enqueue`` commands (a
#: directory of .eml files each): lock-free writers of separate segments.
BATCHES = 5


async def enqueue_batches(config: Path, batches: list[Path]) -> list[str]:
    """Run one ``mta-client enqueue DIR`` per batch, concurrently; every printed id."""
    printed: list[str] = []

    async def one(directory: Path) -> None:
        result = await enqueue(config, directory)
        assert result.returncode == 0, result.stderr
        printed.extend(result.lines)

    async with trio.open_nursery() as nursery:
        for directory in batches:
            nursery.start_soon(one, directory)
    return printed


async def test_sigkill_mid_run_loses_nothing_and_duplicates_at_most_the_transactions_in_flight(
    tmp_path: Path,
) -> None:
    per_batch = TOTAL // BATCHES
    batches = [
        write_eml_dir(tmp_path / f"batch{b}", range(b * per_batch, (b + 1) * per_batch), size=SIZE)
        for b in range(BATCHES)
    ]
    root = spool_root(tmp_path)
    async with running_service(parse_config(PROXY_CONFIG)) as kumo, smtp_sink() as sink:
        config = config_for(tmp_path, kumo, sink)
        ids = await enqueue_batches(config, batches)
        assert len(set(ids)) == TOTAL
        counter = sink.counter()
        async with sender_process(config) as first:
            await wait_until_sink_has(counter, TOTAL // 3, within=60)
            await first.stop(signal.SIGKILL, within=10)
        assert first.process.returncode == -signal.SIGKILL
        assert len(counter.update()) < TOTAL  # the kill came mid-run
        async with sender_process(config) as second:
            await wait_until_sink_has(counter, TOTAL, within=120)
            await wait_until_spool_empty(root, within=30)
            await second.stop(signal.SIGTERM, within=SHUTDOWN_TIMEOUT + 5)
        assert second.process.returncode == 0, second.raw[-5:]
    counts = counter.update()
    assert set(counts) == set(range(TOTAL))  # every message arrived...
    assert counter.duplicates() <= IN_FLIGHT  # ...and only the in-flight ones twice
    assert set(counter.clients) == set(SOURCES)  # from both egress sources
    assert await queue_json(config) == []
    assert inspect(root) == []


async def test_sigterm_mid_run_exits_within_the_shutdown_timeout_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    total = 1500
    batch = write_eml_dir(tmp_path / "batch", range(total), size=SIZE)
    root = spool_root(tmp_path)
    events = tmp_path / "events.jsonl"
    async with running_service(parse_config(PROXY_CONFIG)) as kumo, smtp_sink() as sink:
        config = config_for(tmp_path, kumo, sink)
        ids = await enqueue_batches(config, [batch])
        counter = sink.counter()
        async with sender_process(config) as first:
            await wait_until_sink_has(counter, total // 5, within=60)
            took = await first.stop(signal.SIGTERM, within=SHUTDOWN_TIMEOUT + 5)
        assert first.process.returncode == 0, first.raw[-5:]
        assert took < SHUTDOWN_TIMEOUT
        assert [line["event"] for line in first.lines][-1] == "sender_stopped"
        at_stop = dict(counter.update())
        deliveries = events_of(events, EventKind.DELIVERY)
        # In-flight transactions were finished and journaled, nothing else begun:
        # the sink has exactly the messages the event log says were delivered.
        assert 0 < len(at_stop) < total
        assert sum(at_stop.values()) == len(deliveries)
        assert {f"<n{n}@origin.test>" for n in at_stop} == {e.header_message_id for e in deliveries}
        left = {m.id for m in inspect(root)}
        assert left == set(ids) - {e.message_id for e in deliveries}
        async with sender_process(config) as second:
            await wait_until_sink_has(counter, total, within=60)
            await wait_until_spool_empty(root, within=30)
            await second.stop(signal.SIGTERM, within=SHUTDOWN_TIMEOUT + 5)
        assert second.process.returncode == 0, second.raw[-5:]
    counts = counter.update()
    assert set(counts) == set(range(total))
    assert counter.duplicates() == 0
    deliveries = events_of(events, EventKind.DELIVERY)
    assert sorted(e.message_id for e in deliveries) == sorted(ids)  # each id delivered once
