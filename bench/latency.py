"""Handshake latency a proxy adds: direct connection vs kumoproxy vs Dante.

"Handshake" is the time a client waits before it can send its first byte
to the destination: from the start of ``connect()`` to the CONNECT reply
(through a proxy: TCP connect, greeting, method selection, request, the
proxy's own connect out, reply), or to the TCP connect completing (direct).
Every connection then echoes 64 bytes and closes, so the proxies also do
their whole per-session work.

Two loads, each ``--rounds`` times; the table shows medians over rounds:

* ``32 concurrent``: 32 connections always in flight, as fast as the server
  allows (closed loop, the issue's measure). At saturation this is mostly
  queueing: roughly 32 / (connections per second).
* ``paced``: ``--rate`` new connections per second (open loop, at most 32
  in flight), below every server's capacity: the latency of one handshake.

    python bench/latency.py                 # direct, kumoproxy, Dante (danted, root)
    python bench/latency.py --servers direct,ours --rounds 5 --seconds 5

Same load generator as ``bench/sustained.py`` (built on first use). Dante
gets a fresh external 127.0.5.x per run, as there. Loopback only; run it on
an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sustained import (
    CLIENT_SOURCES,
    Server,
    add_ours_config_argument,
    build_loadgen,
    make_server,
    run_loadgen,
    serving,
    settle_after_dante,
)

DIRECT = Server("direct", 0, "-")


def loadgen_args(server: Server, *, rate: float, seconds: float) -> list[str]:
    target = f"127.0.0.1:{random.randint(19000, 19999)}"  # the bench config allows these
    via = ["--direct"] if server is DIRECT else ["--proxy", f"127.0.0.1:{server.port}"]
    return [
        *via, "--target", target, "--client-src", CLIENT_SOURCES, "--conns", "32",
        "--rate", str(rate), "--seconds", str(seconds), "--warmup", "1", "--timeout", "10",
    ]  # fmt: skip


def measure(
    exe: Path, name: str, *, rate: float, seconds: float, workdir: Path, ours_config: Path
) -> dict[str, str]:
    """One run against a freshly started server (or none, for direct)."""
    if name == "direct":
        return run_loadgen(exe, loadgen_args(DIRECT, rate=rate, seconds=seconds))
    server = make_server(name, ours_config)
    with serving(server.command(workdir), server.port):
        result = run_loadgen(exe, loadgen_args(server, rate=rate, seconds=seconds))
    if name == "dante":
        # Its bind(ip, 0) TIME_WAITs would slow the next run's connects
        # (see sustained.settle_after_dante); a fresh IP per run keeps its
        # own ~14,000 ports from running out within a run.
        settle_after_dante(server.source, below=3000)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="direct,ours,dante", help="direct, ours, dante")
    parser.add_argument("--rounds", type=int, default=3)
    # Short: Dante binds (ip, 0) per connection and has ~14,000 ports per IP;
    # at its ~3,800/s, 1 s of warm-up and 2 s of measuring stay within them.
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=500.0, help="paced load, connections/s")
    add_ours_config_argument(parser)
    args = parser.parse_args()

    exe = build_loadgen()
    names = [s for s in args.servers.split(",") if s]
    loads = {"32 concurrent": 0.0, f"paced {args.rate:g}/s": args.rate}
    # (load, server) -> [(p50, p99, conn/s, failed)] over rounds
    runs: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
    # Dante last: its TIME_WAIT sockets slow every connect() on the host for
    # 60 s (see sustained.settle_after_dante). The others are interleaved,
    # so drift in the machine's load hits them alike.
    batches = [[n for n in names if n != "dante"], [n for n in names if n == "dante"]]
    with tempfile.TemporaryDirectory(prefix="kumoproxy-latency-") as tmp:
        for batch in batches:
            for _round in range(args.rounds):
                for load, rate in loads.items():
                    for name in batch:
                        r = measure(
                            exe,
                            name,
                            rate=rate,
                            seconds=args.seconds,
                            workdir=Path(tmp),
                            ours_config=args.ours_config,
                        )
                        runs.setdefault((load, name), []).append(
                            (
                                float(r["hs_p50_ms"]),
                                float(r["hs_p99_ms"]),
                                float(r["completed_per_s"]),
                                int(r["failed"]),
                            )
                        )
                        time.sleep(0.5)

    print(
        f"# handshake latency, ms (median of {args.rounds} rounds of {args.seconds:g} s); "
        "added = this server's minus direct"
    )
    print(
        f"{'load':<16}{'server':<8}{'p50':>8}{'p99':>8}{'added p50':>11}{'added p99':>11}"
        f"{'conn/s':>9}{'failed':>8}"
    )
    for load in loads:
        base = runs.get((load, "direct"))
        base_p50 = statistics.median(r[0] for r in base) if base else None
        base_p99 = statistics.median(r[1] for r in base) if base else None
        for name in names:
            rows = runs[(load, name)]
            p50 = statistics.median(r[0] for r in rows)
            p99 = statistics.median(r[1] for r in rows)
            rate = statistics.median(r[2] for r in rows)
            failed = sum(r[3] for r in rows)
            added50 = "" if base_p50 is None or name == "direct" else f"{p50 - base_p50:+.3f}"
            added99 = "" if base_p99 is None or name == "direct" else f"{p99 - base_p99:+.3f}"
            print(
                f"{load:<16}{name:<8}{p50:>8.3f}{p99:>8.3f}{added50:>11}{added99:>11}"
                f"{rate:>9.0f}{failed:>8}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
