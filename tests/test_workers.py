"""``workers: 2``: a supervisor and two worker processes, driven as operators do.

Each test runs the real ``kumoproxy serve`` (which starts the real workers)
and real SOCKS5 sessions to a loopback target. The workers share the
listening sockets and whichever is free accepts, so the tests open enough
sessions that both workers serve some (asserted from the ``worker`` field
of the session log lines), and then check that limits, metrics and
reloads hold over the two together.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

from kumoproxy.config import IPAddress
from kumoproxy.proto import socks5
from kumoproxy.server import handshake_share
from kumoproxy.worker import name_metric_files_once
from tests.netkit import (
    connect,
    read_replies,
    read_to_eof,
    read_until,
    socks5_bind_connect_bytes,
    target_server,
)
from tests.process import ServeProcess, serve_process
from tests.test_operations import http_get
from tests.test_process_operations import metric

IP = ipaddress.ip_address
SOURCE = IP("127.0.0.2")


def config_text(*, sources: str = "[127.0.0.2]", extra: str = "") -> str:
    return f"""
workers: 2
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
admin:
  listen: "127.0.0.1:0"
sources: {sources}
clients:
  allow: [127.0.0.0/8]
destinations:
  ports: any
  allow: [127.0.0.0/8]
timeouts:
  drain: 10s
{extra}"""


async def open_session(
    proxy: ServeProcess, source: IPAddress, target: tuple[IPAddress, int]
) -> tuple[trio.SocketStream, socks5.Socks5Client, socks5.ReplyEvent]:
    """KumoMTA's BIND-then-CONNECT, pipelined; returns the CONNECT reply."""
    client, data = socks5_bind_connect_bytes(source, socks5.Endpoint(*target))
    stream = await connect(proxy.listeners["socks5"])
    await stream.send_all(data)
    events = await read_replies(stream, client, 3)
    reply = events[-1]
    assert isinstance(reply, socks5.ReplyEvent), events
    return stream, client, reply


#: Seconds any one awaited log line or process exit may take.
WAIT = 20.0


async def next_event(proxy: ServeProcess, event: str) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        return await proxy.next_event(event)


async def session_lines(proxy: ServeProcess, count: int) -> list[dict[str, Any]]:
    """The next ``count`` session log lines (one per session, at its end)."""
    return [await next_event(proxy, "session") for _ in range(count)]


def runtime_of(proxy: ServeProcess) -> trio.Path:
    """The supervisor's runtime directory, from its "listening" line."""
    listening = next(line for line in proxy.lines if line["event"] == "listening")
    return trio.Path(listening["runtime"])


def worker_pids(proxy: ServeProcess) -> dict[int, int]:
    """Worker index -> pid, from the "worker ready" lines read so far (latest wins).

    The supervisor logs "listening" only once every worker is ready, so at
    start both lines are already read.
    """
    return {line["worker"]: line["pid"] for line in proxy.lines if line["event"] == "worker ready"}


async def wait_for_exit(pid: int) -> None:
    """Wait until process ``pid`` (not our child) has exited, via a pidfd."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


@asynccontextmanager
async def only_worker(pids: dict[int, int], index: int) -> AsyncIterator[None]:
    """New connections go to worker ``index``: the others are stopped meanwhile.

    The workers share the listening socket and whichever is free accepts, so
    without this a test could not say which worker serves a session. Use it
    only while the others are idle (their sessions ended or quiet): a worker
    stopped in the middle of a limit update would hold the table's lock.
    """
    others = [pid for i, pid in pids.items() if i != index]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


async def echo_session(proxy: ServeProcess, target: tuple[IPAddress, int], text: bytes) -> None:
    """One whole session: send ``text``, half-close, read the echo, close."""
    stream, client, reply = await open_session(proxy, SOURCE, target)
    assert reply.reply is socks5.Reply.SUCCEEDED
    await stream.send_all(text)
    await stream.send_eof()
    await read_to_eof(stream, client.trailing_data)
    await stream.aclose()


async def test_both_workers_serve_and_metrics_add_up_over_them(tmp_path: Path) -> None:
    async with serve_process(config_text(), tmp_path) as proxy, target_server() as target:
        assert proxy.admin is not None
        pids = worker_pids(proxy)
        lines = []
        for index, count in ((0, 3), (1, 5)):
            async with only_worker(pids, index):
                for number in range(count):
                    await echo_session(proxy, target.address, b"x" * (10 + number))
                lines += await session_lines(proxy, count)
        ok = await metric(
            proxy, 'kumoproxy_source_connections_total{result="ok",source="127.0.0.2"}'
        )
        running = await metric(proxy, "kumoproxy_workers_running")
        active = await metric(proxy, 'kumoproxy_sessions_active{listener="127.0.0.1:0"}')
        bytes_up = await metric(proxy, 'kumoproxy_bytes_total{direction="up",source="127.0.0.2"}')
        status, body = await http_get(proxy.admin, "/sources")
        ready = await http_get(proxy.admin, "/readyz")
    assert sorted(pids) == [0, 1]
    assert len(set(pids.values())) == 2
    assert Counter(line["worker"] for line in lines) == {0: 3, 1: 5}
    assert ok == 8
    assert bytes_up == sum(10 + n for n in range(3)) + sum(10 + n for n in range(5))
    assert running == 2
    assert active == 0
    assert ready == (200, b"ready\n")
    assert status == 200
    assert b'"totals": {"ok": 8}' in body
    assert b'"active": 0' in body


async def test_per_source_destination_cap_holds_in_total_over_both_workers(
    tmp_path: Path,
) -> None:
    cap = 3
    extra = f"limits:\n  per_source_destination: {cap}\n"
    async with (
        serve_process(config_text(extra=extra), tmp_path) as proxy,
        target_server() as target,
    ):
        assert proxy.admin is not None
        pids = worker_pids(proxy)
        held: list[trio.SocketStream] = []
        # Worker 0 takes two slots, worker 1 the third.
        for index, count in ((0, 2), (1, 1)):
            async with only_worker(pids, index):
                for _ in range(count):
                    stream, _, reply = await open_session(proxy, SOURCE, target.address)
                    assert reply.reply is socks5.Reply.SUCCEEDED
                    held.append(stream)
        # Now each worker refuses: it counts the other's slots too.
        refused = []
        for index in (0, 1):
            async with only_worker(pids, index):
                stream, _, reply = await open_session(proxy, SOURCE, target.address)
                refused.append(reply.reply)
                await stream.aclose()
                refused_line = await next_event(proxy, "session")
                assert refused_line["worker"] == index
                assert "per_source_destination limit (3)" in refused_line["detail"]
        active = await metric(proxy, 'kumoproxy_source_connections_active{source="127.0.0.2"}')
        refusals = await metric(
            proxy, 'kumoproxy_limit_refusals_total{limit="per_source_destination"}'
        )
        _, sources = await http_get(proxy.admin, "/sources")
        # A slot freed in worker 1 is free for worker 0.
        await held.pop().aclose()
        await next_event(proxy, "session")
        async with only_worker(pids, 0):
            again, _, again_reply = await open_session(proxy, SOURCE, target.address)
            over, _, over_reply = await open_session(proxy, SOURCE, target.address)
        for stream in (*held, again, over):
            await stream.aclose()
    assert refused == [socks5.Reply.NOT_ALLOWED, socks5.Reply.NOT_ALLOWED]
    assert active == cap
    assert refusals == 2
    assert b'"active": 3' in sources
    assert again_reply.reply is socks5.Reply.SUCCEEDED
    assert over_reply.reply is socks5.Reply.NOT_ALLOWED


async def test_sighup_reaches_every_worker_and_counts_one_reload(tmp_path: Path) -> None:
    new_source = IP("127.0.0.4")
    async with serve_process(config_text(), tmp_path) as proxy, target_server() as target:
        pids = worker_pids(proxy)
        before, _, refused = await open_session(proxy, new_source, target.address)
        await before.aclose()
        await next_event(proxy, "session")
        (tmp_path / "kumoproxy.yaml").write_text(config_text(sources="[127.0.0.2, 127.0.0.4]"))
        proxy.signal(signal.SIGHUP)
        reloaded = await next_event(proxy, "reloaded")
        banners = {}
        for index in (0, 1):
            async with only_worker(pids, index):
                stream, client, reply = await open_session(proxy, new_source, target.address)
                assert reply.reply is socks5.Reply.SUCCEEDED
                banners[index] = await read_until(stream, b"\r\n", client.trailing_data)
                await stream.aclose()
                assert (await next_event(proxy, "session"))["worker"] == index
        # A broken file is refused by the supervisor; no worker sees it.
        (tmp_path / "kumoproxy.yaml").write_text(config_text(extra="limits:\n  per_sorce: 3\n"))
        proxy.signal(signal.SIGHUP)
        refused_reload = await next_event(proxy, "reload refused, old config stays")
        still, _, still_reply = await open_session(proxy, new_source, target.address)
        await still.aclose()
        reload_ok = await metric(proxy, 'kumoproxy_config_reloads_total{result="ok"}')
        reload_error = await metric(proxy, 'kumoproxy_config_reloads_total{result="error"}')
    assert refused.reply is socks5.Reply.NOT_ALLOWED
    assert reloaded["sources"] == 2
    assert all(banner.startswith(b"HELLO 127.0.0.4 ") for banner in banners.values())
    assert any("limits.per_sorce" in error for error in refused_reload["errors"])
    assert still_reply.reply is socks5.Reply.SUCCEEDED
    assert (reload_ok, reload_error) == (1.0, 1.0)


async def test_a_reload_beyond_the_limit_tables_size_is_refused_and_serving_goes_on(
    tmp_path: Path,
) -> None:
    # max_sessions 10 sizes the table at 64 slots: room for the keys of 21 sessions.
    def with_max_sessions(n: int) -> str:
        return config_text(extra=f"limits:\n  max_sessions: {n}\n")

    async with serve_process(with_max_sessions(10), tmp_path) as proxy, target_server() as target:
        (tmp_path / "kumoproxy.yaml").write_text(with_max_sessions(22))
        proxy.signal(signal.SIGHUP)
        refused_reload = await next_event(proxy, "reload refused, old config stays")
        stream, _, reply = await open_session(proxy, SOURCE, target.address)
        await stream.aclose()
        (tmp_path / "kumoproxy.yaml").write_text(with_max_sessions(21))
        proxy.signal(signal.SIGHUP)
        await next_event(proxy, "reloaded")
        reloads = [
            await metric(proxy, f'kumoproxy_config_reloads_total{{result="{result}"}}')
            for result in ("ok", "error")
        ]
    assert refused_reload["errors"] == [
        "limits.max_sessions 22: the shared limit table was sized at start for at most "
        "21 sessions; restart to apply"
    ]
    assert reply.reply is socks5.Reply.SUCCEEDED
    assert reloads == [1.0, 1.0]


async def test_a_killed_worker_is_restarted_and_its_limit_slots_are_freed(
    tmp_path: Path,
) -> None:
    cap = 8
    extra = f"limits:\n  per_source: {cap}\n"
    async with (
        serve_process(config_text(extra=extra), tmp_path) as proxy,
        target_server() as target,
    ):
        assert proxy.admin is not None
        pids = worker_pids(proxy)
        held: dict[int, list[tuple[trio.SocketStream, bytes]]] = {0: [], 1: []}
        for index in (0, 1):
            async with only_worker(pids, index):
                for _ in range(cap // 2):
                    stream, client, reply = await open_session(proxy, SOURCE, target.address)
                    assert reply.reply is socks5.Reply.SUCCEEDED
                    banner = await read_until(stream, b"\r\n", client.trailing_data)
                    held[index].append((stream, banner))
        full, _, full_reply = await open_session(proxy, SOURCE, target.address)
        await full.aclose()
        await next_event(proxy, "session")

        os.kill(pids[0], signal.SIGKILL)
        exited = await next_event(proxy, "worker exited, restarting")
        restarted = await next_event(proxy, "worker ready")
        # Worker 0's sessions died with it; worker 1's still relay.
        dead = [await read_to_eof(stream, banner) for stream, banner in held[0]]
        alive = []
        for stream, banner in held[1]:
            await stream.send_all(b"ping\r\n")
            alive.append(await read_until(stream, b"ping\r\n", banner))
        for stream, _ in held[0] + held[1]:
            await stream.aclose()
        await session_lines(proxy, len(held[1]))
        # Every slot is free again, the dead worker's included.
        fresh = []
        for _ in range(cap + 1):
            stream, _, reply = await open_session(proxy, SOURCE, target.address)
            fresh.append((stream, reply.reply))
        for stream, _ in fresh:
            await stream.aclose()
        exits = await metric(proxy, "kumoproxy_worker_exits_total")
        running = await metric(proxy, "kumoproxy_workers_running")
    assert full_reply.reply is socks5.Reply.NOT_ALLOWED
    assert exited["worker"] == 0
    assert exited["status"] == -signal.SIGKILL
    assert restarted["worker"] == 0
    assert restarted["pid"] != pids[0]
    assert all(not end.endswith(b"ping\r\n") for end in dead)
    assert all(echo.endswith(b"ping\r\n") for echo in alive)
    assert [reply for _, reply in fresh] == [socks5.Reply.SUCCEEDED] * cap + [
        socks5.Reply.NOT_ALLOWED
    ]
    assert exits == 1
    assert running == 2


async def test_sigterm_drains_every_worker_then_exits_0_and_cleans_up(tmp_path: Path) -> None:
    async with serve_process(config_text(), tmp_path) as proxy, target_server() as target:
        assert proxy.admin is not None
        runtime = runtime_of(proxy)
        pids = worker_pids(proxy)
        streams = []
        for _ in range(4):
            stream, client, reply = await open_session(proxy, SOURCE, target.address)
            assert reply.reply is socks5.Reply.SUCCEEDED
            streams.append((stream, client))
        runtime_existed = await runtime.is_dir()
        proxy.signal(signal.SIGTERM)
        await next_event(proxy, "stop signal: draining")
        for _ in pids:
            # Each worker's service logs "draining" once its listeners are closed.
            await next_event(proxy, "draining")
        with pytest.raises(OSError, match="connect"):
            await connect(proxy.listeners["socks5"])
        # As systemd stops a unit (KillMode=control-group), every process
        # gets SIGTERM, here after the supervisor's drain message: a worker
        # must not take it as a second stop that cuts its sessions.
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        ready_during = await http_get(proxy.admin, "/readyz")
        answers = []
        for stream, client in streams:
            await stream.send_all(b"z" * 10_000)
            await stream.send_eof()
            answers.append(await read_to_eof(stream, client.trailing_data))
            await stream.aclose()
        with trio.fail_after(WAIT):
            returncode = await proxy.process.wait()
            for pid in pids.values():
                await wait_for_exit(pid)
    assert runtime_existed
    assert not await runtime.exists()
    assert ready_during == (503, b"not ready: draining\n")
    assert all(answer.endswith(b"BYE 10000\r\n") for answer in answers)
    assert returncode == 0


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    async with serve_process(config_text(), tmp_path) as proxy, target_server() as target:
        pids = worker_pids(proxy)
        stream, client, reply = await open_session(proxy, SOURCE, target.address)
        assert reply.reply is socks5.Reply.SUCCEEDED
        proxy.process.kill()
        # The open session still finishes: the workers drain, not crash.
        await stream.send_all(b"after the supervisor\r\n")
        await stream.send_eof()
        answer = await read_to_eof(stream, client.trailing_data)
        await stream.aclose()
        with trio.fail_after(WAIT):
            for pid in pids.values():
                await wait_for_exit(pid)
    # A killed supervisor cannot remove its runtime directory (tmpfs is
    # memory): the next one to start does.
    left_behind = runtime_of(proxy)
    left_existed = await left_behind.exists()
    second = trio.Path(tmp_path / "second")
    await second.mkdir()
    async with serve_process(config_text(), Path(second)) as proxy_after:
        # Logged before "listening", so among the lines read already.
        cleaned = next(
            line
            for line in proxy_after.lines
            if line["event"] == "removed runtime directories of dead supervisors"
        )
        gone = not await left_behind.exists()
    assert answer.endswith(b"BYE 22\r\n")
    assert left_existed
    assert str(left_behind) in cleaned["paths"]
    assert gone


async def test_a_second_sigterm_closes_every_session_at_once(tmp_path: Path) -> None:
    text = config_text().replace("drain: 10s", "drain: 60s")
    async with serve_process(text, tmp_path) as proxy, target_server() as target:
        streams = []
        for _ in range(4):
            stream, client, reply = await open_session(proxy, SOURCE, target.address)
            assert reply.reply is socks5.Reply.SUCCEEDED
            streams.append((stream, client))
        proxy.signal(signal.SIGTERM)
        await next_event(proxy, "stop signal: draining")
        proxy.signal(signal.SIGTERM)
        await next_event(proxy, "second stop signal: closing every session now")
        # Far sooner than the 60 s drain: every session is closed now.
        with trio.fail_after(WAIT):
            ends = [await read_to_eof(stream, client.trailing_data) for stream, client in streams]
            returncode = await proxy.process.wait()
        for stream, _ in streams:
            await stream.aclose()
    assert all(end.startswith(b"HELLO 127.0.0.2 ") for end in ends)
    assert returncode == 0


async def test_a_worker_that_cannot_start_stops_the_service_with_one_clear_line(
    tmp_path: Path,
) -> None:
    # Python runs sitecustomize before any of our code: a worker dies at
    # birth, as one would whose interpreter cannot start.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, sys\nif 'worker' in sys.argv:\n    os._exit(3)\n"
    )
    config = tmp_path / "kumoproxy.yaml"
    config.write_text(config_text())
    with trio.fail_after(WAIT):
        result = await trio.run_process(
            [sys.executable, "-m", "kumoproxy", "serve", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(hooks)},
            capture_stderr=True,
            check=False,
        )
    last = result.stderr.decode().strip().splitlines()[-1]
    assert result.returncode == 1
    assert last.startswith("kumoproxy: worker ")
    assert last.endswith(" exited with status 3 before it was ready")


def config_on_a_fixed_port(*, workers: int = 2) -> tuple[int, str]:
    """A free port now, and the config text that listens on it (for a second start)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = (
        config_text()
        .replace('"127.0.0.1:0"\n    protocol', f'"127.0.0.1:{port}"\n    protocol')
        .replace("workers: 2", f"workers: {workers}")
    )
    return port, text


#: The sitecustomize of gated worker processes: ``wait_at_gate()`` connects
#: to the test's gate listener and waits until the test closes it.
_GATE = """\
import os, socket, sys
def wait_at_gate():
    try:
        address = ('127.0.0.1', int(os.environ['TEST_GATE_PORT']))
        with socket.create_connection(address, timeout=30) as gate:
            gate.recv(1)
    except OSError:
        pass  # closed (or never reached): go on
"""
#: Each worker waits at the gate as it is born, before any of our code runs.
GATE_AT_BIRTH = _GATE + "if 'worker' in sys.argv:\n    wait_at_gate()\n"
#: Each worker waits at the gate inside listen(2).
GATE_AT_LISTEN = (
    _GATE
    + """\
if 'worker' in sys.argv:
    real_listen = socket.socket.listen
    def held_listen(self, *args):
        wait_at_gate()
        return real_listen(self, *args)
    socket.socket.listen = held_listen
"""
)


def gated_workers(tmp_path: Path, hook: str, gate: trio.SocketListener) -> dict[str, str]:
    """The environment that makes ``serve``'s workers wait at ``gate``."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(hook)
    return {"PYTHONPATH": str(hooks), "TEST_GATE_PORT": str(gate.socket.getsockname()[1])}


async def test_a_second_instance_started_meanwhile_cannot_take_the_port(tmp_path: Path) -> None:
    # The first supervisor has bound the port; its workers, which will make
    # it listen once ready, are held at birth. A second kumoproxy on the
    # same port must fail meanwhile, not take the port from them.
    port, text = config_on_a_fixed_port()
    second_config = tmp_path / "second.yaml"
    second_config.write_text(text)
    second: list[subprocess.CompletedProcess[bytes]] = []
    (gate,) = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def start_the_second_then_open_the_gate() -> None:
        command = [sys.executable, "-m", "kumoproxy", "serve", "--config", str(second_config)]
        with trio.fail_after(WAIT):
            async with gate, await gate.accept():  # a worker of the first is born
                second.append(await trio.run_process(command, capture_stderr=True, check=False))

    env = gated_workers(tmp_path, GATE_AT_BIRTH, gate)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(start_the_second_then_open_the_gate)
        async with serve_process(text, tmp_path, env=env) as first, target_server() as target:
            stream, _, reply = await open_session(first, SOURCE, target.address)
            await stream.aclose()
    (result,) = second
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines()[-1] == (
        f"kumoproxy: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert first.listeners["socks5"] == ("127.0.0.1", port)
    assert reply.reply is socks5.Reply.SUCCEEDED


async def test_a_client_that_connects_at_listening_is_served_though_no_worker_listens_yet(
    tmp_path: Path,
) -> None:
    # "listening" (and /readyz) are said once every worker is ready. A
    # client that connects at that moment must be queued by the kernel and
    # served, not refused, however slow the workers are to act on "listen".
    (gate,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    env = gated_workers(tmp_path, GATE_AT_LISTEN, gate)
    async with serve_process(config_text(), tmp_path, env=env) as proxy, target_server() as target:
        async with gate:
            client, data = socks5_bind_connect_bytes(SOURCE, socks5.Endpoint(*target.address))
            stream = await connect(proxy.listeners["socks5"])
            await stream.send_all(data)
        # The gate is closed: the workers listen, and one accepts the client.
        events = await read_replies(stream, client, 3)
        await stream.aclose()
    reply = events[-1]
    assert isinstance(reply, socks5.ReplyEvent)
    assert reply.reply is socks5.Reply.SUCCEEDED


def time_wait_ports() -> set[int]:
    """Local ports of IPv4 TCP connections in TIME_WAIT (state 06), from /proc."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {int(f[1].split(":")[1], 16) for f in map(str.split, lines) if f[3] == "06"}


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_restart_binds_the_port_its_predecessor_left_in_time_wait(
    tmp_path: Path, workers: int
) -> None:
    # SO_REUSEADDR is off from bind until listen(2), which checks the port
    # again: it must be back on by then, and on for the connections
    # accepted, or their TIME_WAIT blocks the restart.
    port, text = config_on_a_fixed_port(workers=workers)
    async with serve_process(text, tmp_path) as first:
        # Offering only username/password where no users exist is refused
        # (X'FF') and closed by the proxy: its end of the connection sends
        # the first FIN and so is the one left in TIME_WAIT.
        stream = await connect(first.listeners["socks5"])
        await stream.send_all(b"\x05\x01\x02")
        refusal = await read_to_eof(stream, b"")
        await stream.aclose()
        await next_event(first, "session")
        first.signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await first.process.wait() == 0
    assert port in time_wait_ports()
    async with serve_process(text, tmp_path) as second:
        assert second.listeners["socks5"] == ("127.0.0.1", port)
    assert refusal == b"\x05\xff"


def test_worker_metric_updates_make_no_getpid_system_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    default_values = prometheus_values.ValueClass
    pid = os.getpid()
    try:
        name_metric_files_once()
        counter = PromCounter("kumoproxy_test", "A counter.", registry=CollectorRegistry())

        # Record every call of the real os.getpid (a C builtin: the profiler
        # sees it as a "c_call" event) made while the counter is updated.
        getpid_calls: list[str] = []

        def profiler(frame: FrameType, event: str, arg: object) -> None:
            if event == "c_call" and arg is os.getpid:
                getpid_calls.append(frame.f_code.co_name)

        sys.setprofile(profiler)
        try:
            counter.inc()
            counter.inc()
        finally:
            sys.setprofile(None)
        collected = {
            sample.name: sample.value
            for family in MultiProcessCollector(None, path=str(tmp_path)).collect()  # type: ignore[no-untyped-call]
            for sample in family.samples
        }
    finally:
        prometheus_values.ValueClass = default_values
    # The values still land in this process's file, named by its real pid.
    assert getpid_calls == []
    assert (tmp_path / f"counter_{pid}.db").exists()
    assert collected["kumoproxy_test_total"] == 2.0


@pytest.mark.parametrize(
    ("limit", "workers", "share"), [(2000, 2, 1000), (2000, 3, 666), (5, 8, 1), (1, 1, 1)]
)
def test_each_worker_evicts_handshakes_beyond_its_share(
    limit: int, workers: int, share: int
) -> None:
    assert handshake_share(limit, workers) == share
