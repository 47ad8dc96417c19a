"""The ``mta-client`` command: the one place that wires mta_client together.

``mta-client send`` delivers one message now (no spool) and prints one JSON
line per recipient. Exit status: 0 when every recipient was delivered, 75
(EX_TEMPFAIL) when some were deferred and none bounced, 1 otherwise.

``mta-client enqueue`` validates messages and spools them durably, printing
one spool id per message once they are on stable storage; ``mta-client run``
is the delivering daemon (SIGTERM: finish in-flight transactions, exit 0;
SIGHUP: reopen the event log); ``mta-client queue`` summarises the spool.

Mistakes a user can make (bad config, unreadable or malformed message, bad
address, a --source not in the pool, a spool already in use) are one line on
stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import structlog
import trio

from kumoproxy.config import LogConfig
from kumoproxy.logs import configure_logging
from kumoproxy.yamlconfig import ConfigErrors
from mta_client import __version__
from mta_client.config import ClientConfig, PoolEntry, load_client_config
from mta_client.daemon import run_sender
from mta_client.events import EventLog, reception_events
from mta_client.queue_view import render, summarize
from mta_client.runner import Runner
from mta_client.send import Sender, exit_status
from mta_client.spool import SpoolError, inspect, write_segment
from mta_client.spool_format import NewMessage, QueuedMessage
from mta_client.submission import (
    SubmissionError,
    check_address,
    check_message,
    check_sender,
    message_id,
)

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

    enqueue = commands.add_parser("enqueue", help="spool messages durably for `run` to deliver")
    enqueue.add_argument("--config", type=Path, required=True)
    enqueue.add_argument("--from", dest="sender", required=True, help="envelope sender ('' for <>)")
    enqueue.add_argument("--to", dest="recipients", action="append", required=True)
    enqueue.add_argument(
        "message",
        nargs="?",
        default="-",
        help="a message file, a directory of .eml files, or - for stdin (the default)",
    )

    run = commands.add_parser("run", help="deliver the spool until SIGTERM")
    run.add_argument("--config", type=Path, required=True)

    queue = commands.add_parser("queue", help="summarise the spool per destination domain")
    queue.add_argument("--config", type=Path, required=True)
    queue.add_argument("--json", action="store_true", help="one JSON object per domain")
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


def _load(path: Path) -> ClientConfig | None:
    try:
        return load_client_config(path)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"mta-client: config: {error}", file=sys.stderr)
        return None


def _spool_path(config: ClientConfig) -> Path:
    if config.spool.path is None:
        raise SubmissionError(f"{config.origin}: spool.path is not set")
    return config.spool.path


def cmd_send(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
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


def _read_messages(where: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of each message: stdin, one file, or a directory's ``*.eml``."""
    if where == "-":
        return [("<stdin>", sys.stdin.buffer.read())]
    path = Path(where)
    try:
        if path.is_dir():
            files = sorted(path.glob("*.eml"))
            if not files:
                raise SubmissionError(f"{path}: no .eml files in the directory")
            return [(str(f), f.read_bytes()) for f in files]
        return [(str(path), path.read_bytes())]
    except OSError as exc:
        raise SubmissionError(f"cannot read {exc.filename}: {exc.strerror}") from exc


def cmd_enqueue(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    try:
        root = _spool_path(config)
        sender = check_sender(args.sender)
        recipients = tuple(check_address(r, what="recipient") for r in args.recipients)
        messages = []
        # Everything is checked before anything is written: a bad file in a
        # directory refuses the whole batch, and nothing reaches the spool.
        for name, body in _read_messages(args.message):
            try:
                messages.append(NewMessage(sender, recipients, check_message(body)))
            except SubmissionError as exc:
                raise SubmissionError(f"{name}: {exc}") from exc
        now = time.time()
        ids = write_segment(root, messages, now=now)
    except SubmissionError as exc:
        return _fail(str(exc))
    except SpoolError as exc:
        return _fail(f"spool: {exc}")
    # Acknowledged first: the ids are durable whatever the event log does.
    for spool_id in ids:
        print(spool_id)
    sys.stdout.flush()
    queued = [
        QueuedMessage.fresh(spool_id, m.sender, m.recipients, now, len(m.body))
        for spool_id, m in zip(ids, messages, strict=True)
    ]
    try:
        with EventLog(config.events_path) as events:
            events.write(
                reception_events(
                    queued,
                    header_ids={
                        q.id: message_id(m.body) for q, m in zip(queued, messages, strict=True)
                    },
                )
            )
    except OSError as exc:
        print(f"mta-client: event log: {exc}", file=sys.stderr)
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    try:
        rows = summarize(inspect(_spool_path(config)))
    except SubmissionError as exc:
        return _fail(str(exc))
    except (SpoolError, OSError) as exc:
        return _fail(f"spool: {exc}")
    if args.json:
        for row in rows:
            print(json.dumps(row.as_json()))
    else:
        print(render(rows, now=time.time()))
    return 0


async def _run(config: ClientConfig) -> None:
    log = structlog.get_logger("mta_client")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def send_then_stop(task_status: trio.TaskStatus[Runner]) -> None:
                await run_sender(config, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop waiting for signals

            runner: Runner = await nursery.start(send_then_stop)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    runner.events.reopen()
                    log.info("event_log_reopened")
                elif runner.stopping:
                    log.warning("second stop signal: abandoning in-flight transactions")
                    nursery.cancel_scope.cancel()
                else:
                    log.info("stop signal: finishing in-flight transactions")
                    runner.stop()


def cmd_run(args: argparse.Namespace) -> int:
    # A SIGHUP (log rotation) before trio's handler is installed must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    configure_logging(LogConfig())
    failure: str | None = None
    try:
        trio.run(_run, config)
    except* SpoolError as group:  # no spool.path, locked spool, busy metrics port
        failure = "; ".join(str(exc) for exc in _leaves(group))
    return 0 if failure is None else _fail(failure)


def _leaves(group: BaseExceptionGroup[SpoolError]) -> list[SpoolError]:
    """The errors inside a (nested) exception group, in order."""
    found: list[SpoolError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    match args.command:
        case "send":
            return cmd_send(args)
        case "enqueue":
            return cmd_enqueue(args)
        case "run":
            return cmd_run(args)
        case "queue":
            return cmd_queue(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
