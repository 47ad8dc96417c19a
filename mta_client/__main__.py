"""The ``mta-client`` command: the one place that wires mta_client together.

``mta-client send`` delivers one message now (no spool) and prints one JSON
line per recipient. Exit status: 0 when every recipient was delivered, 75
(EX_TEMPFAIL) when some were deferred and none bounced, 1 otherwise. Mistakes
a user can make (bad config, unreadable message, bad address, a --source not
in the pool) are one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from kumoproxy.yamlconfig import ConfigErrors
from mta_client import __version__
from mta_client.config import ClientConfig, PoolEntry, load_client_config
from mta_client.send import Sender, exit_status

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mta-client", description="Deliver mail through a kumoproxy egress pool."
    )
    parser.add_argument("--version", action="version", version=f"mta-client {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    send = commands.add_parser("send", help="deliver one message now, without a spool")
    send.add_argument("--config", type=Path, required=True)
    send.add_argument("--from", dest="sender", required=True, help="envelope sender ('' for <>)")
    send.add_argument("--to", dest="recipients", action="append", required=True)
    send.add_argument("--source", help="use this pool source only")
    send.add_argument("message", type=Path, help="the message file, sent byte for byte")
    send.add_argument("--version", action="version", version=f"mta-client {__version__}")
    return parser


def _fail(message: str) -> int:
    print(f"mta-client: {message}", file=sys.stderr)
    return EXIT_USAGE


def _pick_source(config: ClientConfig, text: str | None) -> PoolEntry | None:
    if text is None:
        return None
    entry = config.entry_for(ipaddress.ip_address(text))
    if entry is None:
        raise ValueError(f"--source {text} is not in egress.pool")
    return entry


def cmd_send(args: argparse.Namespace) -> int:
    try:
        config = load_client_config(args.config)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"mta-client: config: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        message = args.message.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {args.message}: {exc.strerror}")
    try:
        source = _pick_source(config, args.source)
        sender = Sender(config)
        outcomes = trio.run(
            partial(sender.send, args.sender, args.recipients, message, source=source)
        )
    except ValueError as exc:  # a bad address or --source
        return _fail(str(exc))
    for outcome in outcomes:
        print(json.dumps(outcome.as_json()))
    return exit_status(outcomes)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    match args.command:
        case "send":
            return cmd_send(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
