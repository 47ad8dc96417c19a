"""The spooling sender in process: a real spool on disk, a real kumoproxy, a real SMTP server.

Everything talks over loopback sockets; the sender runs on trio's clock, so
the retry tests run hours of schedule in virtual time. The clock jumps only
when every task has been idle for a few real milliseconds, so the spool's
thread hops (fsync) never let it skip ahead mid-attempt.
"""

from __future__ import annotations

import email
import email.policy
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import prometheus_client
import pytest
import trio
import trio.testing

from kumoproxy.config import parse_config
from mta_client.clock import WallClock
from mta_client.config import ClientConfig, parse_client_config
from mta_client.daemon import run_sender
from mta_client.events import Event, EventKind, parse_event
from mta_client.runner import Runner
from mta_client.spool import inspect, write_segment
from mta_client.spool_format import NewMessage
from tests.mta_client.smtpserver import ServerConfig, SmtpTestServer, smtp_server
from tests.netkit import RunningService, running_service

EPOCH = 1_800_000_000.0

PROXY_CONFIG = """
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
sources: [127.0.0.2, 127.0.0.3, 127.0.0.4]
clients:
  allow: [127.0.0.0/8]
destinations:
  ports: any
  allow: [127.0.0.0/8]
"""


def message(n: int) -> bytes:
    return (
        f"From: a@origin.test\r\nTo: r@example.test\r\nMessage-ID: <m{n}@origin.test>\r\n"
        f"Subject: test {n}\r\n\r\nbody {n}\r\n"
    ).encode()


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    # Jump only after 10 ms of real idleness: the spool's fsyncs run in
    # threads, and a jump during one would move an attempt off its schedule.
    return trio.testing.MockClock(autojump_threshold=0.01)


def sender_config(
    tmp_path: Path,
    proxy: RunningService,
    server: SmtpTestServer,
    *,
    pool: str = "",
    extra: str = "",
) -> ClientConfig:
    host, port = proxy.address("socks5")
    smtp_host, smtp_port = server.address
    pool = pool or (
        '    - {{source: 127.0.0.2, proxy: "{proxy}", ehlo: mta.test}}\n'
        '    - {{source: 127.0.0.3, proxy: "{proxy}", ehlo: mta.test}}\n'
    )
    text = (
        "egress:\n  pool:\n" + pool.format(proxy=f"{host}:{port}") + "dns:\n  routes:\n"
        f'    example.test: "{smtp_host}:{smtp_port}"\n'
        f'    origin.test: "{smtp_host}:{smtp_port}"\n'
        "smtp:\n  tls: disabled\n"
        f"spool:\n  path: {tmp_path / 'spool'}\n  scan_interval: 1h\n  shutdown_timeout: 30s\n"
        f"events:\n  path: {tmp_path / 'events.jsonl'}\n"
        "bounces:\n  reporting_mta: mta.test\n" + textwrap.dedent(extra)
    )
    return parse_client_config(text)


def events(tmp_path: Path) -> list[Event]:
    path = tmp_path / "events.jsonl"
    return [parse_event(line) for line in path.read_text().splitlines()] if path.exists() else []


def spool(config: ClientConfig, messages: list[NewMessage], *, now: float = EPOCH) -> list[str]:
    assert config.spool.path is not None
    return write_segment(config.spool.path, messages, now=now)


@asynccontextmanager
async def proxy() -> AsyncIterator[RunningService]:
    async with running_service(parse_config(PROXY_CONFIG)) as service:
        yield service


@asynccontextmanager
async def sender(
    config: ClientConfig, registry: prometheus_client.CollectorRegistry | None = None
) -> AsyncIterator[Runner]:
    async with trio.open_nursery() as nursery:
        runner: Runner = await nursery.start(
            partial(run_sender, config, registry=registry, clock=WallClock(EPOCH))
        )
        yield runner
        runner.stop()


async def test_spooled_messages_are_delivered_through_the_proxy_and_recorded(
    tmp_path: Path,
) -> None:
    async with proxy() as kumo, smtp_server() as server:
        config = sender_config(tmp_path, kumo, server)
        ids = spool(config, [NewMessage("a@origin.test", ("r@example.test",), message(0))])
        ids += spool(
            config,
            [
                NewMessage("a@origin.test", ("x@example.test", "y@example.test"), message(i))
                for i in (1, 2)
            ],
        )
        async with sender(config) as runner:
            with trio.fail_after(30):
                await runner.wait_idle()
    received = [m for c in server.connections for m in c.messages]
    assert sorted(m.data.split(b"Message-ID: ")[1][:16] for m in received) == [
        b"<m0@origin.test>",
        b"<m1@origin.test>",
        b"<m2@origin.test>",
    ]
    assert {c.peer[0] for c in server.connections if c.peer} <= {"127.0.0.2", "127.0.0.3"}
    deliveries = [e for e in events(tmp_path) if e.kind is EventKind.DELIVERY]
    assert sorted((e.message_id, e.recipient) for e in deliveries) == sorted(
        [(ids[0], "r@example.test")]
        + [(i, r) for i in ids[1:] for r in ("x@example.test", "y@example.test")]
    )
    assert all(e.source in {"127.0.0.2", "127.0.0.3"} and e.code == 250 for e in deliveries)
    assert all(e.site is not None and e.site.startswith("route:") for e in deliveries)
    assert {e.header_message_id for e in deliveries} == {f"<m{i}@origin.test>" for i in range(3)}
    assert config.spool.path is not None
    assert inspect(config.spool.path) == []  # everything done: nothing left to deliver


async def test_several_messages_share_one_connection(tmp_path: Path) -> None:
    async with proxy() as kumo, smtp_server() as server:
        config = sender_config(
            tmp_path,
            kumo,
            server,
            pool='    - {{source: 127.0.0.2, proxy: "{proxy}", ehlo: mta.test}}\n',
            extra="shaping:\n  default: {connection_limit: 1}\n",
        )
        spool(
            config,
            [NewMessage("a@origin.test", ("r@example.test",), message(i)) for i in range(40)],
        )
        async with sender(config) as runner:
            with trio.fail_after(30):
                await runner.wait_idle()
    assert sum(len(c.messages) for c in server.connections) == 40
    assert len(server.connections) == 1  # one connection carried all 40 (limit 1)


async def test_transient_failures_follow_the_backoff_schedule_then_expire_and_bounce(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    refusing = ServerConfig(rcpt_replies={"r@example.test": "451 4.3.0 try again later"})
    async with proxy() as kumo, smtp_server(refusing) as server:
        config = sender_config(
            tmp_path,
            kumo,
            server,
            extra="retry: {initial: 60s, max: 240s, max_age: 1000s, jitter: 0}\n",
        )
        [spool_id] = spool(config, [NewMessage("a@origin.test", ("r@example.test",), message(7))])
        async with sender(config) as runner:
            with trio.fail_after(5000):
                await runner.wait_idle()
    records = [e for e in events(tmp_path) if e.message_id == spool_id]
    failures = [e for e in records if e.kind is EventKind.TRANSIENT_FAILURE]
    # 60 s doubling to the 240 s cap, with a last try exactly at max_age.
    expected = [0.0, 60.0, 180.0, 420.0, 660.0, 900.0]
    assert [e.attempt for e in failures] == [1, 2, 3, 4, 5, 6]
    assert [e.time - EPOCH for e in failures] == pytest.approx(expected, abs=0.5)
    assert all(e.code == 451 and e.reply == "try again later" for e in failures)
    [expiration] = [e for e in records if e.kind is EventKind.EXPIRATION]
    assert expiration.time - EPOCH == pytest.approx(1000.0, abs=0.5)
    assert expiration.attempt == 7
    bounces = [m for c in server.connections for m in c.messages if m.sender == ""]
    assert len(bounces) == 1
    assert bounces[0].recipients == ("a@origin.test",)
    report = email.message_from_bytes(bounces[0].data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert "r@example.test" in bounces[0].data.decode()


async def test_a_permanent_refusal_bounces_at_once_and_a_bounce_never_bounces(
    tmp_path: Path,
) -> None:
    refusing = ServerConfig(rcpt_replies={"gone@example.test": "550 5.1.1 no such user"})
    async with proxy() as kumo, smtp_server(refusing) as server:
        config = sender_config(tmp_path, kumo, server)
        normal, null_sender = spool(
            config,
            [
                NewMessage("a@origin.test", ("gone@example.test", "r@example.test"), message(1)),
                NewMessage("", ("gone@example.test",), message(2)),
            ],
        )
        async with sender(config) as runner:
            with trio.fail_after(30):
                await runner.wait_idle()
    records = events(tmp_path)
    bounce_records = [e for e in records if e.kind is EventKind.BOUNCE]
    assert sorted((e.message_id, e.recipient, e.attempt) for e in bounce_records) == sorted(
        [(normal, "gone@example.test", 1), (null_sender, "gone@example.test", 1)]
    )
    assert not [e for e in records if e.kind is EventKind.TRANSIENT_FAILURE]
    delivered = {(e.message_id, e.recipient) for e in records if e.kind is EventKind.DELIVERY}
    assert (normal, "r@example.test") in delivered  # the other recipient went through
    reports = [m for c in server.connections for m in c.messages if m.sender == ""]
    # One report, for the message with a real sender; none for the null-sender one.
    assert [(m.recipients, b"gone@example.test" in m.data) for m in reports] == [
        (("a@origin.test",), True)
    ]


async def test_pool_weights_set_each_source_share_at_the_server(tmp_path: Path) -> None:
    async with proxy() as kumo, smtp_server() as server:
        pool = (
            '    - {{source: 127.0.0.2, proxy: "{proxy}", ehlo: mta.test, weight: 1}}\n'
            '    - {{source: 127.0.0.3, proxy: "{proxy}", ehlo: mta.test, weight: 1}}\n'
            '    - {{source: 127.0.0.4, proxy: "{proxy}", ehlo: mta.test, weight: 2}}\n'
        )
        config = sender_config(tmp_path, kumo, server, pool=pool)
        total = 2000
        spool(
            config,
            [NewMessage("a@origin.test", ("r@example.test",), message(i)) for i in range(total)],
        )
        async with sender(config) as runner:
            with trio.fail_after(120):
                await runner.wait_idle()
    per_source: dict[str, int] = {}
    for connection in server.connections:
        assert connection.peer is not None
        per_source[connection.peer[0]] = per_source.get(connection.peer[0], 0) + len(
            connection.messages
        )
    assert sum(per_source.values()) == total
    shares = {source: count / total for source, count in per_source.items()}
    expected = {"127.0.0.2": 0.25, "127.0.0.3": 0.25, "127.0.0.4": 0.5}
    assert shares == pytest.approx(expected, abs=0.03)


async def test_a_source_the_proxy_refuses_is_suspended_and_the_others_carry_the_mail(
    tmp_path: Path,
) -> None:
    async with proxy() as kumo, smtp_server() as server:
        # 127.0.0.9 is not one of the proxy's sources: it answers "not allowed".
        pool = (
            '    - {{source: 127.0.0.9, proxy: "{proxy}", ehlo: mta.test, weight: 3}}\n'
            '    - {{source: 127.0.0.2, proxy: "{proxy}", ehlo: mta.test}}\n'
        )
        config = sender_config(tmp_path, kumo, server, pool=pool)
        spool(
            config,
            [NewMessage("a@origin.test", ("r@example.test",), message(i)) for i in range(50)],
        )
        registry = prometheus_client.CollectorRegistry()
        async with sender(config, registry) as runner:
            with trio.fail_after(60):
                await runner.wait_idle()
            report = {row["source"]: row for row in runner.sources_report()}
    assert sum(len(c.messages) for c in server.connections) == 50
    assert {c.peer[0] for c in server.connections if c.peer} == {"127.0.0.2"}
    assert report["127.0.0.9"]["suspended"] is True
    assert "SourceRefusedError" in str(report["127.0.0.9"]["reason"])
    assert report["127.0.0.2"]["suspended"] is False
    refused = registry.get_sample_value(
        "mta_client_connections_total", {"source": "127.0.0.9", "outcome": "source_refused"}
    )
    assert refused == 1.0  # suspended after the first refusal, not hammered
    assert registry.get_sample_value("mta_client_suspended_sources") == 1.0
    delivered = registry.get_sample_value(
        "mta_client_deliveries_total", {"source": "127.0.0.2", "status": "delivered"}
    )
    assert delivered == 50.0
    # The refusal cost no attempt: every message was delivered on its first.
    assert {e.attempt for e in events(tmp_path) if e.kind is EventKind.DELIVERY} == {1}


async def test_stop_finishes_in_flight_transactions_and_leaves_the_rest_spooled(
    tmp_path: Path,
) -> None:
    twenty_arrived = trio.Event()
    counted = 0

    def count(_: int) -> None:
        nonlocal counted
        counted += 1
        if counted == 20:
            twenty_arrived.set()

    async with proxy() as kumo, smtp_server(ServerConfig(on_message=count)) as server:
        config = sender_config(
            tmp_path,
            kumo,
            server,
            extra="shaping:\n  default: {connection_limit: 2}\n",
        )
        ids = spool(
            config,
            [NewMessage("a@origin.test", ("r@example.test",), message(i)) for i in range(300)],
        )
        async with sender(config) as runner:
            with trio.fail_after(30):
                await twenty_arrived.wait()
            runner.stop()
        first_run = [m for c in server.connections for m in c.messages]
        assert config.spool.path is not None
        left = {m.id for m in inspect(config.spool.path)}
        delivered_ids = {e.message_id for e in events(tmp_path) if e.kind is EventKind.DELIVERY}
        # Nothing lost, nothing double-counted: each id is either recorded as
        # delivered or still spooled, and the server got each delivered one once.
        assert delivered_ids | left == set(ids)
        assert not delivered_ids & left
        assert len(first_run) == len(delivered_ids)
        assert all(not c.error for c in server.connections)  # every session ended with QUIT
        async with sender(config) as runner:
            with trio.fail_after(30):
                await runner.wait_idle()
    every = [m.data for c in server.connections for m in c.messages]
    assert len(every) == 300 == len(set(every))


async def test_a_throttle_reply_suspends_the_path_and_the_other_source_carries_the_rest(
    tmp_path: Path,
) -> None:
    thirty_arrived = trio.Event()

    def count(_: int) -> None:
        if sum(len(c.messages) for c in server.connections) >= 30:
            thirty_arrived.set()

    throttling = ServerConfig(
        rcpt_replies={"slow@example.test": "451 4.7.650 rate limited, try again later"},
        on_message=count,
    )
    async with proxy() as kumo, smtp_server(throttling) as server:
        config = sender_config(
            tmp_path, kumo, server, extra="shaping:\n  default: {connection_limit: 1}\n"
        )
        spool(
            config,
            [NewMessage("a@origin.test", ("slow@example.test",), message(0))]
            + [NewMessage("a@origin.test", ("r@example.test",), message(i)) for i in range(1, 31)],
        )
        registry = prometheus_client.CollectorRegistry()
        async with sender(config, registry) as runner:
            with trio.fail_after(30):
                await thirty_arrived.wait()
            runner.stop()
    [failure] = [e for e in events(tmp_path) if e.kind is EventKind.TRANSIENT_FAILURE]
    throttled = failure.source
    assert failure.recipient == "slow@example.test"
    assert failure.enhanced == "4.7.650"
    # The throttled source's one connection ended after the throttling reply,
    # and no new connection left from it: the other source took the rest.
    from_throttled = [c for c in server.connections if c.peer and c.peer[0] == throttled]
    assert len(from_throttled) == 1
    assert [v for v in from_throttled[0].verbs if v in ("MAIL", "RCPT")] == ["MAIL", "RCPT"]
    delivered = [e for e in events(tmp_path) if e.kind is EventKind.DELIVERY]
    assert len(delivered) == 30
    assert {e.source for e in delivered} == {"127.0.0.2", "127.0.0.3"} - {throttled}
    assert (
        registry.get_sample_value(
            "mta_client_throttle_suspensions_total", {"source": str(throttled)}
        )
        == 1.0
    )


async def test_a_slow_message_rate_spaces_deliveries_without_idle_connections(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    async with proxy() as kumo, smtp_server() as server:
        config = sender_config(
            tmp_path,
            kumo,
            server,
            pool='    - {{source: 127.0.0.2, proxy: "{proxy}", ehlo: mta.test}}\n',
            extra="shaping:\n  default: {max_message_rate: 1/h, idle_timeout: 60s}\n",
        )
        spool(
            config,
            [NewMessage("a@origin.test", ("r@example.test",), message(i)) for i in range(3)],
        )
        async with sender(config) as runner:
            with trio.fail_after(4 * 3600):
                await runner.wait_idle()
    times = sorted(e.time - EPOCH for e in events(tmp_path) if e.kind is EventKind.DELIVERY)
    assert len(times) == 3
    # One an hour (an IP warming up): each waited in its scheduled queue, and
    # no connection was opened just to sit and wait for the rate.
    assert times[1] - times[0] == pytest.approx(3600, abs=2)
    assert times[2] - times[1] == pytest.approx(3600, abs=2)
    assert len(server.connections) == 3
    assert all(len(c.messages) == 1 for c in server.connections)
