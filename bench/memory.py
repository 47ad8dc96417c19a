"""Memory per established session: kumoproxy beside microsocks.

Starts the server, takes the resident memory (RSS) of its whole process
tree (for kumoproxy with ``workers``: the supervisor and every worker),
opens ``--sessions`` SOCKS5 sessions through it to a loopback echo server,
each a CONNECT and one 8-byte echo, holds them all open, waits for the
memory to settle and takes the RSS again. The difference divided by the
sessions held is the cost of one idle session: what a proxy holding tens
of thousands of MTA connections pays.

    python bench/memory.py                        # kumoproxy and microsocks, 5,000 sessions
    python bench/memory.py --servers ours --sessions 20000
    python bench/memory.py --ours-config my.yaml  # same listener and source as the bench config

microsocks (Debian: ``apt-get install microsocks``) is the reference the
performance issue names: the lightest SOCKS5 server a user would pick. It
is started with ``-b 127.0.0.2`` so that it binds the same source as
kumoproxy's bench config. ``../shared/bench/compare.py``'s ``idle``
workload measures the same thing with its C load generator; this script
runs from the repository alone and also shows each process's share.

The clients and the echo server run here, in one trio process; they bind
round robin to 127.0.3.1-16 and raise this process's descriptor limit as
far as the hard limit allows (two descriptors per session). Loopback only.
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio
from sustained import OURS_PORT, add_ours_config_argument, ours_command, serving

MICROSOCKS_PORT = 11190

#: Bytes each session echoes once, proving it is established end to end.
PING = b"kumoping"

#: Sessions opened at once: enough to be quick, few enough that no
#: server's accept queue overflows.
OPEN_AT_ONCE = 64

#: Seconds all the sessions may take to come up.
OPEN_TIMEOUT = 60.0

#: Seconds to wait after the last session is up, for lazy allocations and
#: the kernel's accounting to settle, as compare.py waits.
SETTLE = 2.0


def tree_rss_kib(root: int) -> dict[int, int]:
    """VmRSS in KiB of ``root`` and all its descendants, by pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    rss: dict[int, int] = {}
    pending = [root]
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[pid] = int(line.split()[1])
    return rss


async def echo_server(task_status: trio.TaskStatus[int]) -> None:
    """Echo every connection until it closes; reports the port it listens on.

    The port is one of 19000-19999, the only ones the bench config lets
    sessions reach.
    """
    for port in random.sample(range(19000, 20000), 50):
        try:
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            break
        except OSError:
            continue
    else:
        raise SystemExit("no free port in 19000-19999 for the echo server")

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    task_status.started(port)
    await trio.serve_listeners(echo, listeners)


async def receive_exactly(stream: trio.SocketStream, size: int, what: str) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise ConnectionError(f"the proxy closed the connection before {what}")
        data += chunk
    return data


async def open_session(proxy_port: int, target_port: int, index: int) -> trio.SocketStream:
    """One SOCKS5 session (no auth, CONNECT 127.0.0.1:target_port) with one echo through it.

    Not pipelined: microsocks reads the greeting and the request separately
    and would drop a request sent with the greeting.
    """
    sock = trio.socket.socket()
    await sock.bind((f"127.0.3.{index % 16 + 1}", 0))
    await sock.connect(("127.0.0.1", proxy_port))
    stream = trio.SocketStream(sock)
    await stream.send_all(b"\x05\x01\x00")
    if await receive_exactly(stream, 2, "the method selection") != b"\x05\x00":
        raise ConnectionError(f"session {index}: no-auth refused")
    await stream.send_all(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target_port.to_bytes(2, "big"))
    reply = await receive_exactly(stream, 10, "the CONNECT reply")  # IPv4 bound address
    if reply[1] != 0:
        raise ConnectionError(f"session {index}: refused, reply {reply.hex()}")
    await stream.send_all(PING)
    if await receive_exactly(stream, len(PING), "the echo") != PING:
        raise ConnectionError(f"session {index}: the echo came back wrong")
    return stream


@dataclass(frozen=True, slots=True)
class Measurement:
    server: str
    held: int
    before_kib: dict[int, int]
    after_kib: dict[int, int]

    @property
    def kib_per_session(self) -> float:
        return (sum(self.after_kib.values()) - sum(self.before_kib.values())) / self.held


async def hold_sessions(server: str, root: int, proxy_port: int, sessions: int) -> Measurement:
    """Open ``sessions`` sessions, measure with all of them held, then close them."""
    before = tree_rss_kib(root)
    held: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        target_port: int = await nursery.start(echo_server)
        limiter = trio.CapacityLimiter(OPEN_AT_ONCE)

        async def open_one(index: int) -> None:
            async with limiter:
                held.append(await open_session(proxy_port, target_port, index))

        with trio.move_on_after(OPEN_TIMEOUT):
            async with trio.open_nursery() as openers:
                for index in range(sessions):
                    openers.start_soon(open_one, index)
        await trio.sleep(SETTLE)
        after = tree_rss_kib(root)
        for stream in held:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    return Measurement(server, len(held), before, after)


def raise_descriptor_limit(sessions: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * sessions + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise SystemExit(
                f"{sessions} sessions need {wanted} descriptors; the hard limit is {hard}"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def server_command(name: str, ours_config: Path) -> tuple[list[str], int]:
    if name == "ours":
        return ours_command(ours_config), OURS_PORT
    if name == "microsocks":
        exe = shutil.which("microsocks")
        if exe is None:
            raise SystemExit("microsocks is not installed (Debian: apt-get install microsocks)")
        return [
            exe,
            "-i",
            "127.0.0.1",
            "-p",
            str(MICROSOCKS_PORT),
            "-b",
            "127.0.0.2",
        ], MICROSOCKS_PORT
    raise SystemExit(f"unknown server {name!r} (ours, microsocks)")


#: The table's header, in the columns :func:`report` prints.
HEADER = "server         held processes before MiB after MiB KiB/session"


def report(measurement: Measurement) -> None:
    before = sum(measurement.before_kib.values())
    after = sum(measurement.after_kib.values())
    print(
        f"{measurement.server:<11} {measurement.held:>7} {len(measurement.after_kib):>9} "
        f"{before / 1024:>10.1f} {after / 1024:>9.1f} {measurement.kib_per_session:>11.1f}"
    )
    if len(measurement.after_kib) > 1:
        for pid, kib in sorted(measurement.after_kib.items()):
            grown = kib - measurement.before_kib.get(pid, 0)
            print(f"{'':<11}   pid {pid:<8} {kib / 1024:>9.1f} MiB, grew {grown / 1024:.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="ours,microsocks", help="ours, microsocks")
    parser.add_argument("--sessions", type=int, default=5000)
    add_ours_config_argument(parser)
    args = parser.parse_args()
    raise_descriptor_limit(args.sessions)
    results: list[Measurement] = []
    for name in [s for s in args.servers.split(",") if s]:
        command, port = server_command(name, args.ours_config)
        with serving(command, port) as child:
            measurement = trio.run(hold_sessions, name, child.pid, port, args.sessions)
        if measurement.held < args.sessions:
            print(
                f"{name}: only {measurement.held} of {args.sessions} sessions came up "
                f"in {OPEN_TIMEOUT:g} s",
                file=sys.stderr,
            )
            return 1
        results.append(measurement)
        time.sleep(0.5)  # let the port close before the next server
    print(f"# RSS of each server's process tree, {args.sessions} idle sessions held")
    print(HEADER)
    for measurement in results:
        report(measurement)
    reference = {m.server: m.kib_per_session for m in results}
    if "ours" in reference and "microsocks" in reference:
        print(f"ours/microsocks: {reference['ours'] / reference['microsocks']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
