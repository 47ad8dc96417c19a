"""One worker process of a multi-process service (``workers`` > 1).

The supervisor (kumoproxy.supervisor) starts each worker with the bound
listener sockets (shared by every worker) and one end of a control
socketpair already open, and with prometheus_client's multiprocess
directory in the environment. The worker then:

1. reads its configuration from the control channel (the supervisor sends
   the YAML text it validated, so every worker parses the same bytes),
   sets up, reports ``ready``, and starts accepting when told ``listen``
   (once every worker is ready and the supervisor listens);
2. serves sessions with limits counted in the shared table
   (kumoproxy.shared_limits), so the caps hold in total;
3. obeys ``reload``/``drain``/``stop`` messages and answers ``ready`` and
   reload results. If the channel closes (the supervisor died) it drains
   and exits: a worker never outlives its supervisor for long.

SIGTERM/SIGINT only ever start a drain here: Ctrl-C reaches the whole
process group and systemd signals every process of the unit, in no set
order with the supervisor's own ``drain``, so a signal cannot count as the
"second stop". Closing every session now is the supervisor's ``stop``.
SIGHUP is ignored, since reloads come from the supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio
from prometheus_client import CollectorRegistry
from prometheus_client import values as prometheus_values

from kumoproxy.config import Config, ConfigErrors, parse_config
from kumoproxy.errors import KumoproxyError
from kumoproxy.logs import configure_logging
from kumoproxy.proto import control
from kumoproxy.server import (
    Bound,
    BoundListener,
    Service,
    WorkerRole,
    freeze_startup_objects,
    start_listening,
)
from kumoproxy.shared_limits import SharedLimitTable, SharedLimitTracker

#: Bytes per read on the control channel.
CONTROL_READ = 65536


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    """What the supervisor passes on the worker's command line."""

    index: int
    workers: int
    control_fd: int
    listen_fds: tuple[int, ...]
    limits_table: Path


class ControlChannel:
    """The worker's end of the control socketpair."""

    def __init__(self, fd: int) -> None:
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
        self._reader = control.MessageReader()
        self._pending: list[control.Message] = []

    async def receive(self) -> control.Message | None:
        """The next message, or ``None`` once the supervisor has closed its end."""
        while not self._pending:
            data = await self.stream.receive_some(CONTROL_READ)
            if not data:
                return None
            self._pending.extend(self._reader.feed(data))
        return self._pending.pop(0)

    async def send(self, op: str, **fields: object) -> None:
        # If the supervisor is gone the reader sees EOF and drains.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(control.encode(op, **fields))


def config_from(message: control.Message) -> Config:
    """The configuration a ``config`` or ``reload`` message carries."""
    return parse_config(
        message["text"], origin=message["origin"], embedded=bool(message.get("embedded"))
    )


def name_metric_files_once() -> None:
    """Stop prometheus_client asking the kernel for our pid on every metric update.

    Its multiprocess values call ``os.getpid()`` on each update to notice a
    fork (14 system calls per session here). A worker never forks, so the
    pid is read once; it still names this process's metric files, as the
    supervisor's ``mark_process_dead`` expects. Must run before any metric
    is created.
    """
    pid = os.getpid()
    # prometheus_client.values has no type hints.
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue(lambda: pid)  # type: ignore[no-untyped-call]


def run_worker(args: WorkerArgs) -> None:
    """The worker's main: returns when it has drained (or was stopped)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    trio.run(_worker, args)


async def _worker(args: WorkerArgs) -> None:
    channel = ControlChannel(args.control_fd)
    first = await channel.receive()
    if first is None or first.get("op") != "config":
        raise KumoproxyError("worker: the supervisor sent no configuration")
    config = config_from(first)
    configure_logging(config.log)
    log = structlog.get_logger("kumoproxy").bind(worker=args.index)
    table = SharedLimitTable.attach(args.limits_table)
    role = WorkerRole(
        index=args.index,
        workers=args.workers,
        limits=SharedLimitTracker(table, args.index, config.limits),
    )
    name_metric_files_once()
    # The registry only scopes metric names: in multiprocess mode the values
    # live in the files the supervisor collects.
    service = Service(config, logger=log, registry=CollectorRegistry(), worker=role)
    sockets = [trio.socket.from_stdlib_socket(socket.socket(fileno=fd)) for fd in args.listen_fds]
    told_to_listen = trio.Event()
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def serve_when_told() -> None:
                    await told_to_listen.wait()
                    # The supervisor bound them and listens once every
                    # worker is ready (listening again here is harmless).
                    listeners = [
                        BoundListener(listener_config, start_listening(sock))
                        for listener_config, sock in zip(config.listeners, sockets, strict=True)
                    ]
                    await service.serve(Bound(listeners))
                    nursery.cancel_scope.cancel()  # drained

                nursery.start_soon(serve_when_told)
                nursery.start_soon(
                    _obey, channel, service, log, nursery.cancel_scope, told_to_listen
                )
                freeze_startup_objects()
                await channel.send("ready")
                async for signum in signals:
                    if not told_to_listen.is_set():
                        nursery.cancel_scope.cancel()  # nothing to drain yet
                    _drain(service, log, signal.Signals(signum).name)
    finally:
        table.close()


def _drain(service: Service, log: structlog.typing.FilteringBoundLogger, why: str) -> None:
    """Start draining, once: later requests change nothing."""
    if not service.draining:
        log.info("drain requested", by=why)
        service.drain()


async def _obey(
    channel: ControlChannel,
    service: Service,
    log: structlog.typing.FilteringBoundLogger,
    scope: trio.CancelScope,
    told_to_listen: trio.Event,
) -> None:
    """Carry out the supervisor's messages until it closes the channel."""
    while (message := await channel.receive()) is not None:
        match message.get("op"):
            case "listen":
                told_to_listen.set()
            case "reload":
                try:
                    config = config_from(message)
                    not_applied = service.reload(config)
                except (ConfigErrors, KumoproxyError) as exc:
                    await channel.send("reload_failed", seq=message.get("seq"), error=str(exc))
                    continue
                configure_logging(config.log)
                await channel.send("reloaded", seq=message.get("seq"), not_applied=not_applied)
            case "drain":
                if not told_to_listen.is_set():
                    scope.cancel()  # never served: nothing to drain
                _drain(service, log, "supervisor")
            case "stop":
                log.warning("supervisor: closing every session now")
                scope.cancel()
            case op:
                log.error("unknown control message, ignored", op=op)
    if not service.draining:
        log.error("supervisor gone")
    if not told_to_listen.is_set():
        scope.cancel()
    _drain(service, log, "supervisor gone")
