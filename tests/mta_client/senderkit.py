"""Test kit for the spooling sender's commands, run as real processes.

``mta-client enqueue`` / ``queue`` run to completion (:func:`mta_client`);
``mta-client run`` is a long-lived child whose JSON log lines on stderr are
read as they come (:class:`SenderProcess`), so a test waits for
``sender_started`` instead of sleeping. Postfix's ``smtp-sink`` is the
receiving MTA: with ``-D`` it appends every transaction it receives (its own
``X-`` lines, then the message) to one dump file, which :class:`SinkCounter`
reads incrementally to count Message-ID lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from mta_client.clock import WallClock
from mta_client.events import Event, EventKind, parse_event
from mta_client.spool import Spool

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
needs_smtp_sink = pytest.mark.skipif(
    not os.path.exists(SMTP_SINK), reason="needs Postfix's smtp-sink (.ci/run installs postfix)"
)

#: A one-shot command (enqueue, queue, a refused run) must finish within this.
COMMAND_TIMEOUT = 60.0
#: ``mta-client run`` must log ``sender_started`` within this.
STARTUP_TIMEOUT = 20.0

SENDER = "a@origin.test"
DOMAIN = "example.test"
RECIPIENT = f"r@{DOMAIN}"

#: Matches the Message-ID lines of :func:`numbered_message`; the group is the number.
_MESSAGE_ID = re.compile(rb"^Message-ID: <n(\d+)@origin\.test>\r?$", re.MULTILINE)
#: smtp-sink's line naming the client address it saw: the egress source.
_CLIENT_ADDR = re.compile(rb"^X-Client-Addr: (\S+)$", re.MULTILINE)


def numbered_message(n: int, *, size: int = 0) -> bytes:
    """Message ``n``: unique ``Message-ID: <n{n}@origin.test>``, padded to ``size`` octets.

    Padding is body lines of 76 letters (RFC 5322 section 2.1.1 allows 998).
    """
    head = (
        f"Message-ID: <n{n}@origin.test>\r\nFrom: {SENDER}\r\nTo: {RECIPIENT}\r\n"
        f"Subject: message {n}\r\n\r\nbody of message {n}\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    lines = max(0, size - len(head)) // len(line)
    return head + line * lines


def write_eml_dir(directory: Path, numbers: Sequence[int], *, size: int = 0) -> Path:
    """``directory`` holding ``{n:05}.eml`` for each ``n``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        (directory / f"{n:05}.eml").write_bytes(numbered_message(n, size=size))
    return directory


# -- config -------------------------------------------------------------------------


def sender_config(
    tmp_path: Path,
    *,
    proxy: tuple[str, int] | None = None,
    sink_port: int | None = None,
    sources: Sequence[str] = ("127.0.0.2",),
    shutdown_timeout: float = 30.0,
    extra: str = "",
) -> Path:
    """Write ``tmp_path/client.yaml`` for the spooling sender; returns its path.

    Spool in ``tmp_path/spool``, event log ``tmp_path/events.jsonl``. Without
    ``proxy`` the pool points at a closed port (fine when nothing is
    delivered); without ``sink_port`` the domain routes nowhere.
    """
    host, port = proxy or ("127.0.0.1", 9)
    pool = "".join(
        f'    - {{source: {source}, proxy: "{host}:{port}", ehlo: mta.test}}\n'
        for source in sources
    )
    route = f'    {DOMAIN}: "127.0.0.1:{sink_port or 9}"\n'
    text = (
        f"egress:\n  pool:\n{pool}"
        f"dns:\n  routes:\n{route}"
        "smtp:\n  tls: disabled\n"
        f"spool:\n  path: {tmp_path / 'spool'}\n  scan_interval: 100ms\n"
        f"  shutdown_timeout: {shutdown_timeout:g}s\n"
        f"events:\n  path: {tmp_path / 'events.jsonl'}\n"
        "bounces:\n  reporting_mta: mta.test\n"
    ) + extra
    path = tmp_path / "client.yaml"
    path.write_text(text)
    return path


def spool_root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def files_under(root: Path) -> dict[str, int]:
    """Every regular file under ``root`` (relative path -> size); empty if it is absent."""
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


async def spooled_bodies(root: Path, ids: Sequence[str]) -> list[bytes]:
    """The spooled bytes of each id, in order, read through the spool itself.

    Opens the spool (taking its lock, so no ``run`` may hold it) and closes it.
    """
    async with await Spool.open(root, clock=WallClock()) as spool:
        bodies = await spool.read_bodies(ids)
    return [bodies[spool_id] for spool_id in ids]


def read_events(path: Path) -> list[Event]:
    """Every line of an event log, parsed; [] if there is no log."""
    if not path.exists():
        return []
    return [parse_event(line) for line in path.read_text().splitlines()]


def events_of(path: Path, kind: EventKind) -> list[Event]:
    return [event for event in read_events(path) if event.kind is kind]


# -- one-shot commands ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished ``mta-client`` command left behind."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def command(*args: str | Path) -> list[str]:
    """``python -m mta_client ARGS`` with this interpreter (the project's venv)."""
    return [sys.executable, "-m", "mta_client", *map(str, args)]


async def mta_client(
    *args: str | Path, stdin: bytes = b"", prefix: Sequence[str] = (), cwd: Path | None = None
) -> CommandResult:
    """Run one ``mta-client`` command to completion (``prefix``: e.g. ``setpriv ...``)."""
    with trio.fail_after(COMMAND_TIMEOUT):
        done = await trio.run_process(
            [*prefix, *command(*args)],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
        )
    return CommandResult(done.returncode, done.stdout.decode(), done.stderr.decode())


async def enqueue(
    config: Path,
    *messages: str | Path,
    sender: str = SENDER,
    recipients: Sequence[str] = (RECIPIENT,),
    stdin: bytes = b"",
    prefix: Sequence[str] = (),
    cwd: Path | None = None,
) -> CommandResult:
    """``mta-client enqueue --from SENDER --to R... MESSAGES``."""
    args: list[str | Path] = ["enqueue", "--config", config, "--from", sender]
    for recipient in recipients:
        args += ["--to", recipient]
    return await mta_client(*args, *messages, stdin=stdin, prefix=prefix, cwd=cwd)


async def queue_json(config: Path) -> list[dict[str, Any]]:
    """``mta-client queue --json``, parsed; fails the test if the command fails."""
    result = await mta_client("queue", "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.lines]


# -- the daemon -----------------------------------------------------------------------


@dataclass
class SenderProcess:
    """A running ``mta-client run`` and the log lines it has written to stderr."""

    process: trio.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    """Every stderr line, JSON or not (a traceback is not)."""
    eof: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _add(self, line: str) -> None:
        self.raw.append(line)
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            self.lines.append(parsed)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_event(self, event: str) -> dict[str, Any]:
        """The first logged line whose ``event`` is ``event``, waiting for it.

        Raises AssertionError (with stderr) if the process exits without it.
        """
        while True:
            for line in self.lines:
                if line.get("event") == event:
                    return line
            if self.eof:
                stderr = "\n".join(self.raw)
                raise AssertionError(f"mta-client run ended without {event!r}; stderr:\n{stderr}")
            await self._changed.wait()

    async def read_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        buffer = bytearray()
        try:
            while data := await stream.receive_some(65536):
                buffer += data
                *complete, rest = bytes(buffer).split(b"\n")
                buffer[:] = rest
                for line in complete:
                    self._add(line.decode(errors="replace"))
            if buffer:
                self._add(buffer.decode(errors="replace"))
        finally:
            self.eof = True
            self._notify()

    def send_signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def stop(self, signum: signal.Signals = signal.SIGTERM, *, within: float = 30.0) -> float:
        """Send ``signum`` and wait for the exit; returns the seconds it took."""
        start = trio.current_time()
        self.send_signal(signum)
        with trio.fail_after(within):
            await self.process.wait()
        return trio.current_time() - start


@asynccontextmanager
async def sender_process(config: Path) -> AsyncIterator[SenderProcess]:
    """Start ``mta-client run --config CONFIG`` and wait until it logs ``sender_started``.

    SIGKILLs it on the way out if the test did not stop it.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        command("run", "--config", config), stderr=subprocess.PIPE, env=env
    )
    running = SenderProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.read_stderr)
            try:
                with trio.fail_after(STARTUP_TIMEOUT):
                    await running.wait_for_event("sender_started")
                yield running
            finally:
                # Then the reader sees EOF and the nursery can end.
                if process.returncode is None:
                    process.kill()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            assert process.stderr is not None
            await process.stderr.aclose()


# -- smtp-sink --------------------------------------------------------------------------


@dataclass
class SinkCounter:
    """Counts the Message-IDs of :func:`numbered_message` in smtp-sink's dump file.

    Reads only what was appended since the last call, keeping an unfinished
    last line for the next. smtp-sink (seen with strace, Postfix 3.7) writes
    a transaction to an unlinked temporary file and copies it to the dump in
    one go when DATA ends, *before* it answers 250: the dump holds whole
    transactions only, never interleaved, never one the client was cut off
    in. So a Message-ID here is one the sender was (or was about to be) told
    was accepted.
    """

    dump: Path
    counts: Counter[int] = field(default_factory=Counter)
    """Message number -> how many times the sink received it."""
    clients: Counter[str] = field(default_factory=Counter)
    """Client (egress source) address -> transactions the sink saw from it."""
    _offset: int = 0
    _partial: bytes = b""

    def update(self) -> Counter[int]:
        try:
            with open(self.dump, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return self.counts
        self._offset += len(data)
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        self.counts.update(int(n) for n in _MESSAGE_ID.findall(complete))
        self.clients.update(a.decode() for a in _CLIENT_ADDR.findall(complete))
        return self.counts

    def duplicates(self) -> int:
        """Deliveries beyond the first, summed over every Message-ID."""
        return sum(count - 1 for count in self.counts.values())


@dataclass
class Sink:
    port: int
    dump: Path

    def counter(self) -> SinkCounter:
        return SinkCounter(self.dump)

    def client_addresses(self) -> list[str]:
        """The source address of every transaction so far, in arrival order."""
        if not self.dump.exists():
            return []
        return [a.decode() for a in _CLIENT_ADDR.findall(self.dump.read_bytes())]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def smtp_sink(*options: str) -> AsyncIterator[Sink]:
    """smtp-sink on loopback, appending every transaction to ``Sink.dump``."""
    # Started as root, smtp-sink drops to nobody, who cannot reach pytest's
    # root-only tmp_path: the dump goes to a directory nobody can write.
    with tempfile.TemporaryDirectory(prefix="smtp-sink-") as name:
        os.chmod(name, 0o777)
        dump = Path(name) / "dump"
        port = _free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        argv = [SMTP_SINK, *user, "-D", str(dump), *options, f"127.0.0.1:{port}", "256"]
        process = await trio.lowlevel.open_process(argv)
        try:
            with trio.fail_after(10):  # an external process with no start signal: probe
                while True:
                    try:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                    except OSError:
                        await trio.sleep(0.02)
                        continue
                    await stream.aclose()
                    break
            yield Sink(port, dump)
        finally:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def wait_until_sink_has(
    counter: SinkCounter, wanted: int, *, within: float, poll: float = 0.02
) -> Counter[int]:
    """Poll the dump until ``wanted`` distinct Message-IDs arrived.

    smtp-sink is an external process with no way to signal us: polling with
    a short sleep under a deadline is the honest wait.
    """
    with trio.fail_after(within):
        while len(counter.update()) < wanted:  # noqa: ASYNC110 (no event to wait on)
            await trio.sleep(poll)
    return counter.counts
