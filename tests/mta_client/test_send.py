"""``mta-client send`` end to end: the real command, a real kumoproxy, Postfix's smtp-sink.

smtp-sink (Debian's postfix package; .ci/run installs it) records each
message with an ``X-Client-Addr`` line: the source IP it saw. Its ``-r`` /
``-f`` / ``-q`` options inject 4xx, 5xx and disconnects at chosen commands.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.mta_client.senderkit import Sink, needs_smtp_sink, smtp_sink
from tests.netkit import RunningService, make_config, running_service

pytestmark = needs_smtp_sink

MESSAGE = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHello.\r\n.dot line\r\n"


@dataclass
class SendResult:
    returncode: int
    lines: list[dict[str, object]]
    stderr: str


def client_config(proxy: RunningService, sink: Sink, *, pool: str = "") -> str:
    host, port = proxy.address("socks5")
    pool = pool or (
        f'    - {{source: 127.0.0.2, proxy: "{host}:{port}", ehlo: mta.test}}\n'
        f'    - {{source: 127.0.0.3, proxy: "{host}:{port}", ehlo: mta.test}}\n'
    )
    return (
        "egress:\n  pool:\n" + pool + "dns:\n  routes:\n"
        f'    example.test: "127.0.0.1:{sink.port}"\n'
        "smtp:\n  tls: disabled\n"
    )


async def mta_send(
    tmp_path: Path, config: str, *recipients: str, source: str | None = None
) -> SendResult:
    config_file = tmp_path / "client.yaml"
    config_file.write_text(config)
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    command = [sys.executable, "-m", "mta_client", "send", "--config", str(config_file)]
    command += ["--from", "a@sender.test"]
    for recipient in recipients:
        command += ["--to", recipient]
    if source is not None:
        command += ["--source", source]
    command.append(str(message))
    with trio.fail_after(60):
        done = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    return SendResult(done.returncode, lines, done.stderr.decode())


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.3"])
async def test_send_delivers_from_the_chosen_source(tmp_path: Path, source: str) -> None:
    async with running_service(make_config()) as proxy, smtp_sink() as sink:
        result = await mta_send(
            tmp_path, client_config(proxy, sink), "b@example.test", source=source
        )
        seen = sink.client_addresses()
    assert result.returncode == 0, result.stderr
    (line,) = result.lines
    assert line["recipient"] == "b@example.test"
    assert line["status"] == "delivered"
    assert line["code"] == 250
    assert str(line["source"]).startswith(f"{source}:")  # the ip:port actually used
    assert line["mx"] == "127.0.0.1"
    assert seen == [source]  # what the sink saw


async def test_one_line_per_recipient_and_weighted_sources_all_deliver(tmp_path: Path) -> None:
    async with running_service(make_config()) as proxy, smtp_sink() as sink:
        result = await mta_send(
            tmp_path, client_config(proxy, sink), "b@example.test", "c@example.test"
        )
        seen = sink.client_addresses()
    assert result.returncode == 0, result.stderr
    assert [line["recipient"] for line in result.lines] == ["b@example.test", "c@example.test"]
    assert {line["status"] for line in result.lines} == {"delivered"}
    assert len(seen) == 1  # both recipients in one transaction
    assert seen[0] in ("127.0.0.2", "127.0.0.3")


@pytest.mark.parametrize(
    ("options", "status", "code", "returncode"),
    [
        (("-r", "rcpt"), "deferred", 450, 75),  # 4xx at RCPT
        (("-f", "rcpt"), "bounced", 500, 1),  # 5xx at RCPT
        (("-r", "."), "deferred", 450, 75),  # 4xx at the end of DATA
        (("-f", "."), "bounced", 500, 1),  # 5xx at the end of DATA
    ],
)
async def test_sink_faults_give_per_recipient_statuses_and_exit_codes(
    tmp_path: Path, options: tuple[str, str], status: str, code: int, returncode: int
) -> None:
    async with running_service(make_config()) as proxy, smtp_sink(*options) as sink:
        result = await mta_send(
            tmp_path, client_config(proxy, sink), "b@example.test", source="127.0.0.2"
        )
    assert result.returncode == returncode, result.stderr
    (line,) = result.lines
    assert line["status"] == status
    assert line["code"] == code
    assert line["enhanced"] is not None


async def test_disconnect_mid_transaction_is_deferred(tmp_path: Path) -> None:
    async with running_service(make_config()) as proxy, smtp_sink("-q", "data") as sink:
        result = await mta_send(
            tmp_path, client_config(proxy, sink), "b@example.test", source="127.0.0.2"
        )
        seen = sink.client_addresses()
    assert result.returncode == 75, result.stderr
    (line,) = result.lines
    assert line["status"] == "deferred"
    assert seen == []


async def test_unplumbed_source_is_reported_as_a_source_problem(tmp_path: Path) -> None:
    async with running_service(make_config()) as proxy, smtp_sink() as sink:
        host, port = proxy.address("socks5")
        pool = f'    - {{source: 203.0.113.77, proxy: "{host}:{port}", ehlo: mta.test}}\n'
        result = await mta_send(tmp_path, client_config(proxy, sink, pool=pool), "b@example.test")
        seen = sink.client_addresses()
    assert result.returncode == 75, result.stderr
    (line,) = result.lines
    assert line["status"] == "deferred"
    assert "source 203.0.113.77 refused by the proxy" in str(line["text"])
    assert line["source"] is None
    assert seen == []


async def test_pipelining_sends_one_write_per_envelope(tmp_path: Path) -> None:
    """A recording hop between the proxy and the sink shows what arrived in each read."""
    chunks: list[bytes] = []

    async def record_and_forward(client: trio.SocketStream, sink_port: int) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", sink_port) as upstream:

            async def up() -> None:
                while data := await client.receive_some(65536):
                    chunks.append(bytes(data))
                    await upstream.send_all(data)
                await upstream.send_eof()

            async def down() -> None:
                while data := await upstream.receive_some(65536):
                    await client.send_all(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(up)
                nursery.start_soon(down)

    async with (
        running_service(make_config()) as proxy,
        smtp_sink() as sink,
        trio.open_nursery() as nursery,
    ):
        listeners = await nursery.start(
            trio.serve_tcp,
            lambda s: record_and_forward(s, sink.port),
            0,
        )
        hop_port = listeners[0].socket.getsockname()[1]
        hop = Sink(hop_port, sink.dump)
        result = await mta_send(
            tmp_path,
            client_config(proxy, hop),
            "b@example.test",
            "c@example.test",
            source="127.0.0.2",
        )
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr
    envelope = [c for c in chunks if c.startswith(b"MAIL FROM:")]
    assert len(envelope) == 1
    assert envelope[0].count(b"RCPT TO:") == 2
    assert envelope[0].endswith(b"DATA\r\n")
