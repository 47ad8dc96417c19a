"""Run the real ``kumoproxy serve`` as a child process and read its log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

STARTUP_TIMEOUT = 20.0


@dataclass
class ServeProcess:
    """A running ``kumoproxy serve`` and the JSON lines it has logged so far."""

    process: trio.Process
    listeners: dict[str, tuple[str, int]]  # "socks5" / "proxy" / "socks5-v6" -> address
    admin: tuple[str, int] | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    _stderr: bytearray = field(default_factory=bytearray)

    async def next_line(self) -> dict[str, Any]:
        """The next JSON log line from stderr (waits for it)."""
        assert self.process.stderr is not None
        while b"\n" not in self._stderr:
            data = await self.process.stderr.receive_some(65536)
            if not data:
                raise EOFError(f"kumoproxy exited; stderr so far: {bytes(self._stderr)!r}")
            self._stderr += data
        line, _, rest = bytes(self._stderr).partition(b"\n")
        self._stderr[:] = rest
        parsed: dict[str, Any] = json.loads(line)
        self.lines.append(parsed)
        return parsed

    async def next_event(self, event: str) -> dict[str, Any]:
        """Skip lines until one whose ``event`` is ``event``."""
        while (line := await self.next_line())["event"] != event:
            pass
        return line

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)


def _listener_key(url: str) -> tuple[str, tuple[str, int]]:
    protocol, _, address = url.partition("://")
    host, _, port = address.rpartition(":")
    key = f"{protocol}-v6" if host.startswith("[") else protocol
    return key, (host.strip("[]"), int(port))


@asynccontextmanager
async def serve_process(
    config_text: str,
    tmp_path: Path,
    *,
    preexec_fn: Callable[[], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ServeProcess]:
    """Start ``python -m kumoproxy serve --config``; SIGKILL it if the test did not stop it.

    The config file is ``tmp_path / "kumoproxy.yaml"`` (rewrite it, then SIGHUP).
    ``env`` adds to the environment.
    """
    config = tmp_path / "kumoproxy.yaml"
    config.write_text(config_text)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "kumoproxy", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=preexec_fn,
    )
    try:
        running = ServeProcess(process, {})
        with trio.fail_after(STARTUP_TIMEOUT):
            listening = await running.next_event("listening")
        running.listeners = dict(_listener_key(url) for url in listening["listeners"])
        if listening.get("admin"):
            running.admin = _listener_key(listening["admin"])[1]
        yield running
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stderr is not None:
                await process.stderr.aclose()
