"""A real ``redis-server`` for the shaping tests, on a free loopback port.

Started in a temp dir with no persistence (``--save '' --appendonly no``),
bound to 127.0.0.1 only. Ready means: it logged "Ready to accept
connections" and answered a ``PING`` (no polling sleeps). Its output is
drained by a task in the helper's nursery and kept for error messages.

Tests can :meth:`RedisServer.stop` it mid-run (SIGKILL: a crash, the data
set is gone) and :meth:`RedisServer.start` it again on the same port.

Usage::

    async with redis_server(tmp_path) as server:
        async with coredis.Redis(host=server.host, port=server.port) as client: ...
        await server.stop()
        await server.start()

A missing ``redis-server`` is a test failure with a clear message, never a
skip: CI installs it.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
import trio

__all__ = ["RedisServer", "redis_server", "redis_server_binary"]

#: How long a start may take before the test fails.
STARTUP_TIMEOUT: Final = 10.0
_READY: Final = b"Ready to accept connections"
_HOST: Final = "127.0.0.1"


def redis_server_binary() -> str:
    """The path of ``redis-server``; fails the test when it is not installed."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed (not on PATH): the shaping tests need a real "
            "Redis 7; install it (e.g. apt-get install redis-server)",
            pytrace=False,
        )
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """One redis-server process (or none, while stopped) on a fixed port."""

    port: int
    directory: Path
    nursery: trio.Nursery
    host: str = _HOST
    process: trio.Process | None = None
    output: bytearray = field(default_factory=bytearray)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start on :attr:`port` and wait until it answers PING."""
        assert not self.running, "already running"
        self.output.clear()
        process = await trio.lowlevel.open_process(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        self.process = process
        assert process.stdout is not None
        stdout = process.stdout
        with trio.fail_after(STARTUP_TIMEOUT):
            while _READY not in self.output:
                chunk = await stdout.receive_some(65536)
                if not chunk:
                    await process.wait()
                    await stdout.aclose()
                    raise RuntimeError(
                        f"redis-server exited ({process.returncode}) before it was ready:\n"
                        + self.output.decode(errors="replace")
                    )
                self.output += chunk
            await self._ping()
        self.nursery.start_soon(self._drain, stdout)

    async def stop(self) -> None:
        """Kill it (SIGKILL, like a crash) and wait until it is gone."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            process.kill()  # SIGKILL works on a paused process too
        with trio.CancelScope(shield=True):
            await process.wait()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections open but nothing answers (a hung or partitioned Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`; the data set is intact."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    async def restart(self) -> None:
        """Stop, then start again on the same port (with an empty data set)."""
        await self.stop()
        await self.start()

    async def _ping(self) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)
        async with stream:
            await stream.send_all(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = await stream.receive_some(64)
                if not chunk:
                    break
                reply += chunk
        if reply != b"+PONG\r\n":
            raise RuntimeError(f"redis-server answered PING with {reply!r}")

    async def _drain(self, stdout: trio.abc.ReceiveStream) -> None:
        # Keep reading so a chatty server never blocks on a full pipe.
        async with stdout:
            while chunk := await stdout.receive_some(65536):
                self.output += chunk


@asynccontextmanager
async def redis_server(directory: Path) -> AsyncIterator[RedisServer]:
    """A running redis-server on a free loopback port; killed on exit."""
    redis_server_binary()
    async with trio.open_nursery() as nursery:
        server: RedisServer | None = None
        for _ in range(5):  # the free port may be taken between probe and bind
            server = RedisServer(_free_port(), directory, nursery)
            try:
                await server.start()
                break
            except RuntimeError:
                await server.stop()
                if b"in use" not in server.output:
                    raise
        else:
            raise RuntimeError("no free port for redis-server after 5 tries")
        assert server is not None
        try:
            yield server
        finally:
            await server.stop()
