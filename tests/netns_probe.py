"""Run inside a private network namespace (see test_netns.py): IPv6 sources.

Adds documentation-range IPv6 addresses to this namespace's own loopback,
runs kumoproxy and a target there, asks for each source by BIND-then-CONNECT
and prints, as one JSON line, what the target saw and what the proxy
replied. Nothing leaves the namespace.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

import trio

from kumoproxy.proto import socks5
from tests.netkit import (
    connect,
    make_config,
    read_replies,
    running_service,
    socks5_bind_connect_bytes,
    target_server,
)

SOURCES = ("2001:db8::7", "2001:db8::8")
TARGET = "2001:db8::25"
CONFIG = f"""
listeners:
  - listen: "[::1]:0"
    protocol: socks5
sources: [{", ".join(f'"{s}"' for s in SOURCES)}, "2001:db8::99"]
clients:
  allow: ["::1/128"]
destinations:
  ports: any
  allow: ["2001:db8::/32"]
"""


def plumb() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in (*SOURCES, TARGET):  # nodad: usable at once, no DAD delay
        subprocess.run(["ip", "addr", "add", f"{address}/128", "dev", "lo", "nodad"], check=True)


async def probe() -> dict[str, object]:
    seen: dict[str, object] = {}
    async with running_service(make_config(base=CONFIG)) as svc, target_server(TARGET) as target:
        for source in (*SOURCES, "2001:db8::99"):  # the last is configured, not plumbed
            client, data = socks5_bind_connect_bytes(
                ipaddress.ip_address(source), socks5.Endpoint(target.address[0], target.port)
            )
            async with await connect(svc.address("socks5", version=6)) as stream:
                await stream.send_all(data)
                events = await read_replies(stream, client, 3)
            last = events[-1]
            assert isinstance(last, socks5.ReplyEvent)
            seen[source] = {"reply": int(last.reply), "bound": str(last.bound.host)}
        seen["target_saw"] = [str(peer.address[0]) for peer in target.peers]
    return seen


if __name__ == "__main__":
    plumb()
    print(json.dumps(trio.run(probe)))
    sys.exit(0)
