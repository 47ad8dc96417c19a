"""Spool-to-sink throughput of ``mta-client run``, and of Postfix on the same box.

Ours: N messages of ``--size`` bytes are spooled, then a real ``mta-client
run`` delivers them through a real ``kumoproxy serve`` (sources 127.0.0.2 and
127.0.0.3) into Postfix's ``smtp-sink``; the clock runs from the daemon's
start until the event log holds N Delivery records.

Postfix (``--postfix``, root only): a private Postfix instance in a temporary
config directory listens on 127.0.0.1, relays everything to the same
``smtp-sink``, and ``smtp-source`` injects N messages of the same size; the
clock runs until the sink has seen N messages (``smtp-sink -c`` counts).
Postfix writes each message to its own queue file with fsync, just as ours
spools durably, so the comparison is durable-to-durable.

    python bench/sender_throughput.py --messages 20000 --size 4096
    python bench/sender_throughput.py --messages 20000 --size 4096 --postfix

Run it on an otherwise idle machine: the daemon, the proxy and the sink share
its cores. Uses loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mta_client.spool import write_segment
from mta_client.spool_format import NewMessage

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"

PROXY_CONFIG = """
listeners:
  - listen: "127.0.0.1:{port}"
    protocol: socks5
sources: [127.0.0.2, 127.0.0.3]
clients:
  allow: [127.0.0.0/8]
destinations:
  ports: any
  allow: [127.0.0.1/32]
limits: {{max_sessions: 100000, per_client: 100000, per_source: 100000,
          per_source_destination: 100000}}
log:
  level: warning
"""

SENDER_CONFIG = """
egress:
  pool:
    - {{source: 127.0.0.2, proxy: "127.0.0.1:{proxy}", ehlo: bench.test}}
    - {{source: 127.0.0.3, proxy: "127.0.0.1:{proxy}", ehlo: bench.test}}
dns:
  routes:
    example.test: "127.0.0.1:{sink}"
smtp:
  tls: disabled
spool:
  path: {spool}
events:
  path: {events}
shaping:
  # The bench measures the sender, not a provider's limits.
  default: {{connection_limit: {connections}, max_connection_rate: 100000/s,
             max_message_rate: 1000000/s, max_deliveries_per_connection: 10000}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def message(n: int, size: int) -> bytes:
    head = (
        f"From: bench@origin.test\r\nTo: r@example.test\r\nMessage-ID: <b{n}@origin.test>\r\n"
        f"Subject: bench {n}\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(0, (size - len(head)) // len(line))
    return head + body


@contextlib.contextmanager
def process(command: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(command, **kwargs)  # type: ignore[call-overload]
    try:
        yield child
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def sink_command(port: int) -> list[str]:
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    return [SMTP_SINK, *user, f"127.0.0.1:{port}", "256"]


def count_deliveries(events: Path) -> int:
    if not events.exists():
        return 0
    with events.open("rb") as file:
        return sum(1 for line in file if b'"type":"Delivery"' in line.replace(b" ", b""))


def run_ours(messages: int, size: int, connections: int) -> float:
    with tempfile.TemporaryDirectory(prefix="sender-bench-") as name:
        work = Path(name)
        proxy_port, sink_port = free_port(), free_port()
        (work / "proxy.yaml").write_text(PROXY_CONFIG.format(port=proxy_port))
        events = work / "events.jsonl"
        (work / "sender.yaml").write_text(
            SENDER_CONFIG.format(
                proxy=proxy_port,
                sink=sink_port,
                spool=work / "spool",
                events=events,
                connections=connections,
            )
        )
        batch = 256
        for start in range(0, messages, batch):
            write_segment(
                work / "spool",
                [
                    NewMessage("bench@origin.test", ("r@example.test",), message(n, size))
                    for n in range(start, min(messages, start + batch))
                ],
                now=time.time(),
            )
        kumoproxy = [str(BIN / "kumoproxy"), "serve", "--config", str(work / "proxy.yaml")]
        sender = [str(BIN / "mta-client"), "run", "--config", str(work / "sender.yaml")]
        with (
            process(kumoproxy),
            process(sink_command(sink_port)),
        ):
            wait_listening(proxy_port)
            wait_listening(sink_port)
            log = (work / "sender.log").open("wb")
            started = time.monotonic()
            with process(sender, stderr=log) as daemon:
                while count_deliveries(events) < messages:
                    if daemon.poll() is not None:
                        raise SystemExit(f"mta-client run exited: {daemon.returncode}")
                    time.sleep(0.05)
                elapsed = time.monotonic() - started
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(30)
        return messages / elapsed


POSTFIX_MAIN = """
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink}
smtpd_recipient_restrictions = permit_mynetworks, reject
default_destination_concurrency_limit = {connections}
smtp_destination_concurrency_limit = {connections}
default_process_limit = 200
smtp_tls_security_level = none
smtpd_tls_security_level = none
"""


def run_postfix(messages: int, size: int, connections: int) -> float:
    if os.geteuid() != 0:
        raise SystemExit("--postfix needs root (Postfix's master runs as root)")
    with tempfile.TemporaryDirectory(prefix="postfix-bench-") as name:
        work = Path(name)
        os.chmod(work, 0o755)  # Postfix's daemons run as the postfix user
        config = work / "etc"
        config.mkdir()
        shutil.copy("/etc/postfix/master.cf", config / "master.cf")
        smtpd_port = free_port()
        # Our own smtpd port, so a system Postfix (if any) is left alone.
        master = (config / "master.cf").read_text()
        master = master.replace("smtp      inet", f"{smtpd_port}      inet", 1)
        (config / "master.cf").write_text(master)
        sink_port = free_port()
        (work / "queue").mkdir()
        (work / "data").mkdir()
        shutil.chown(work / "data", "postfix")
        (config / "main.cf").write_text(
            POSTFIX_MAIN.format(
                queue=work / "queue",
                data=work / "data",
                sink=sink_port,
                connections=connections,
                work=work,
            )
        )
        env = {**os.environ, "MAIL_CONFIG": str(config)}
        subprocess.run(["postfix", "-c", str(config), "check"], check=True, env=env)
        counts = work / "sink.count"
        with process(
            [*sink_command(sink_port)[:-2], "-c", f"127.0.0.1:{sink_port}", "256"],
            stdout=counts.open("wb"),
        ):
            wait_listening(sink_port)
            subprocess.run(["postfix", "-c", str(config), "start"], check=True, env=env)
            try:
                wait_listening(smtpd_port)
                started = time.monotonic()
                subprocess.run(
                    [
                        SMTP_SOURCE,
                        "-s",
                        "20",
                        "-l",
                        str(size),
                        "-m",
                        str(messages),
                        "-f",
                        "bench@origin.test",
                        "-t",
                        "r@example.test",
                        f"127.0.0.1:{smtpd_port}",
                    ],
                    check=True,
                )
                while sink_count(counts) < messages:
                    time.sleep(0.05)
                elapsed = time.monotonic() - started
            finally:
                subprocess.run(["postfix", "-c", str(config), "stop"], check=False, env=env)
        return messages / elapsed


def sink_count(path: Path) -> int:
    # smtp-sink -c prints running counters ("sess=3 quit=3 mesg=120"), \r-separated.
    found = re.findall(rb"mesg=(\d+)", path.read_bytes())
    return int(found[-1]) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument(
        "--connections", type=int, default=16, help="per source (ours), per destination (Postfix)"
    )
    parser.add_argument("--postfix", action="store_true", help="also measure Postfix")
    args = parser.parse_args()
    ours = run_ours(args.messages, args.size, args.connections)
    result = {"messages": args.messages, "size": args.size, "ours_msgs_per_s": round(ours, 1)}
    if args.postfix:
        theirs = run_postfix(args.messages, args.size, args.connections)
        result["postfix_msgs_per_s"] = round(theirs, 1)
        result["ratio"] = round(ours / theirs, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
