"""Operations against the real ``kumoproxy serve`` process: reload, drain, EMFILE.

These drive the process the way systemd and an operator do: SIGHUP after
editing the file, SIGTERM to stop, a file-descriptor limit that runs out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import resource
import signal
from pathlib import Path

import pytest
import trio

from kumoproxy.config import IPAddress
from kumoproxy.passwords import hash_password
from kumoproxy.proto import socks5
from tests.netkit import (
    connect,
    proxy_header,
    read_replies,
    read_to_eof,
    read_until,
    target_server,
)
from tests.process import ServeProcess, serve_process
from tests.test_operations import http_get

IP = ipaddress.ip_address
PASSWORD = b"s3cret"
HASH = hash_password(PASSWORD, log2_n=10)  # cheap: these tests are about reload, not KDFs


def config_text(sources: list[str], users: list[str], *, extra: str = "") -> str:
    user_lines = "".join(f'    - name: {u}\n      password_hash: "{HASH}"\n' for u in users)
    return f"""
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
  - listen: "127.0.0.1:0"
    protocol: proxy
admin:
  listen: "127.0.0.1:0"
sources: [{", ".join(sources)}]
clients:
  allow: [127.0.0.0/8]
auth:
  required: true
  users:
{user_lines}destinations:
  ports: any
  allow: [127.0.0.0/8]
timeouts:
  drain: 10s
{extra}"""


async def authed_session(
    proxy: ServeProcess, user: str, source: str, target: tuple[IPAddress, int]
) -> tuple[trio.SocketStream, socks5.Socks5Client, list[object]]:
    client = socks5.Socks5Client()
    data = client.send(socks5.Greeting((socks5.Method.USERNAME_PASSWORD,)))
    data += client.send(socks5.Credentials(user.encode(), PASSWORD))
    data += client.send(socks5.Request(socks5.Command.BIND, socks5.Endpoint(IP(source), 0)))
    data += client.send(socks5.Request(socks5.Command.CONNECT, socks5.Endpoint(*target)))
    stream = await connect(proxy.listeners["socks5"])
    await stream.send_all(data)
    return stream, client, list(await read_replies(stream, client, 4))


async def metric(proxy: ServeProcess, line_prefix: str) -> float:
    assert proxy.admin is not None
    status, body = await http_get(proxy.admin, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_sighup_adds_a_source_removes_a_user_and_keeps_open_sessions(
    tmp_path: Path,
) -> None:
    before = config_text(["127.0.0.2"], ["keep", "gone"])
    after = config_text(["127.0.0.2", "127.0.0.4"], ["keep"])
    async with serve_process(before, tmp_path) as proxy, target_server() as target:
        open_stream, open_client, events = await authed_session(
            proxy, "gone", "127.0.0.2", target.address
        )
        assert isinstance(events[-1], socks5.ReplyEvent)
        assert events[-1].reply is socks5.Reply.SUCCEEDED
        banner = await read_until(open_stream, b"\r\n", open_client.trailing_data)

        new_source_before, _, refused_events = await authed_session(
            proxy, "keep", "127.0.0.4", target.address
        )
        await new_source_before.aclose()

        (tmp_path / "kumoproxy.yaml").write_text(after)
        proxy.signal(signal.SIGHUP)
        reloaded = await proxy.next_event("reloaded")

        # The session that started under the old config keeps relaying.
        await open_stream.send_all(b"still relaying\r\n")
        echoed = await read_until(open_stream, b"still relaying\r\n", banner)
        # The new source works, the removed user is refused.
        new_source, new_client, new_events = await authed_session(
            proxy, "keep", "127.0.0.4", target.address
        )
        new_banner = await read_until(new_source, b"\r\n", new_client.trailing_data)
        await new_source.aclose()
        removed, _, removed_events = await authed_session(
            proxy, "gone", "127.0.0.2", target.address
        )
        await removed.aclose()

        # A broken file changes nothing.
        (tmp_path / "kumoproxy.yaml").write_text(after + "limits:\n  per_sorce: 3\n")
        proxy.signal(signal.SIGHUP)
        refused_reload = await proxy.next_event("reload refused, old config stays")
        still, _, still_events = await authed_session(proxy, "keep", "127.0.0.4", target.address)
        await still.aclose()
        reload_ok = await metric(proxy, 'kumoproxy_config_reloads_total{result="ok"}')
        reload_error = await metric(proxy, 'kumoproxy_config_reloads_total{result="error"}')
        await open_stream.aclose()

    assert refused_events[-1] == socks5.ReplyEvent(socks5.Reply.NOT_ALLOWED)
    assert reloaded["sources"] == 2
    assert echoed.endswith(b"still relaying\r\n")
    assert isinstance(new_events[-1], socks5.ReplyEvent)
    assert new_events[-1].reply is socks5.Reply.SUCCEEDED
    assert new_banner.startswith(b"HELLO 127.0.0.4 ")
    assert removed_events[1] == socks5.AuthResult(False)
    assert any("limits.per_sorce" in e for e in refused_reload["errors"])
    assert isinstance(still_events[-1], socks5.ReplyEvent)
    assert still_events[-1].reply is socks5.Reply.SUCCEEDED
    assert (reload_ok, reload_error) == (1.0, 1.0)


async def test_sigterm_turns_readyz_503_and_drains_an_open_session(tmp_path: Path) -> None:
    async with serve_process(config_text(["127.0.0.2"], ["keep"]), tmp_path) as proxy:
        assert proxy.admin is not None
        async with target_server() as target:
            ready_before = await http_get(proxy.admin, "/readyz")
            stream, client, _ = await authed_session(proxy, "keep", "127.0.0.2", target.address)
            proxy.signal(signal.SIGTERM)
            await proxy.next_event("draining")
            ready_during = await http_get(proxy.admin, "/readyz")
            with pytest.raises(OSError, match="connect"):
                await connect(proxy.listeners["socks5"])
            await stream.send_all(b"z" * 50_000)
            await stream.send_eof()
            answer = await read_to_eof(stream, client.trailing_data)
            await stream.aclose()
            with trio.fail_after(5):
                returncode = await proxy.process.wait()
    assert ready_before == (200, b"ready\n")
    assert ready_during == (503, b"not ready: draining\n")
    assert answer.endswith(b"BYE 50000\r\n")
    assert returncode == 0


def _low_file_limit() -> None:
    """In the child: a file-descriptor limit low enough to run out (soft = hard)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))


async def test_accept_survives_emfile_and_serves_again_when_descriptors_free(
    tmp_path: Path,
) -> None:
    text = config_text(["127.0.0.2"], ["keep"], extra="  handshake: 60s\n")
    async with (
        serve_process(text, tmp_path, preexec_fn=_low_file_limit) as proxy,
        target_server() as target,
    ):
        idle: list[trio.SocketStream] = []
        # Each idle client holds one descriptor in the proxy until it leaves.
        with trio.fail_after(20):
            for _ in range(60):
                idle.append(await connect(proxy.listeners["proxy"]))
            failing = await proxy.next_event("accept failing, backing off")
        for stream in idle[:40]:
            await stream.aclose()
        with trio.fail_after(20):
            recovered = await proxy.next_event("accept recovered")
            async with await connect(proxy.listeners["proxy"]) as stream:
                await stream.send_all(proxy_header(2, IP("127.0.0.2"), target.address))
                banner = await read_until(stream, b"\r\n")
        accept_errors = await metric(
            proxy, 'kumoproxy_accept_errors_total{error="EMFILE",listener="127.0.0.1:0"}'
        )
        for stream in idle[40:]:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.aclose()
        assert proxy.process.returncode is None  # the listener never died
    assert failing["error"] == "EMFILE"
    assert recovered["failures"] >= 1
    assert banner.startswith(b"HELLO 127.0.0.2 ")
    assert accept_errors >= 1
    # Logged once per burst, not once per failed accept.
    assert [line["event"] for line in proxy.lines].count("accept failing, backing off") == 1


async def test_sighup_applies_the_new_log_level(tmp_path: Path) -> None:
    text = config_text(["127.0.0.2"], ["keep"])
    async with serve_process(text, tmp_path) as proxy, target_server() as target:
        first, *_ = await authed_session(proxy, "keep", "127.0.0.2", target.address)
        await first.aclose()
        before = await proxy.next_event("session")  # info: an ok session is logged
        quiet = text.replace("timeouts:", "log:\n  level: warning\ntimeouts:")
        (tmp_path / "kumoproxy.yaml").write_text(quiet)
        proxy.signal(signal.SIGHUP)
        await proxy.next_event("reloaded")
        ok, ok_client, _ = await authed_session(proxy, "keep", "127.0.0.2", target.address)
        await ok.send_eof()  # end it cleanly before the next one starts, so had it
        await read_to_eof(ok, ok_client.trailing_data)  # been logged, it would come first
        await ok.aclose()
        refused, *_ = await authed_session(proxy, "gone", "127.0.0.2", target.address)
        await refused.aclose()
        after = await proxy.next_event("session")  # the next line logged at all
    assert before["outcome"] == "ok"
    # The ok session (info) is no longer logged; the refusal (warning) is.
    assert after["outcome"] == "refused"
    assert after["user"] == "gone"
