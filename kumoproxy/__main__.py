"""The ``kumoproxy`` command: the one place that wires the parts together.

Anything a user can get wrong (bad YAML, unknown key, address in use, a
source that cannot be bound) ends in one clear line on stderr and a non-zero
exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

import structlog
import trio
import yaml

from kumoproxy import __version__, egress
from kumoproxy.config import (
    Config,
    ConfigErrors,
    IPAddress,
    config_to_data,
    embedded_default,
    load_config,
    parse_config,
)
from kumoproxy.errors import KumoproxyError
from kumoproxy.logs import configure_logging
from kumoproxy.passwords import hash_password
from kumoproxy.proto.common import format_endpoint
from kumoproxy.server import (
    Bound,
    Service,
    bound_address,
    freeze_startup_objects,
    open_listeners,
    refuse_reload,
)
from kumoproxy.supervisor import ConfigSource, Supervisor, open_supervisor
from kumoproxy.tls import TlsSetupError, server_context
from kumoproxy.worker import WorkerArgs, run_worker

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kumoproxy", description="Egress proxy for email (SOCKS5 and PROXY protocol)."
    )
    parser.add_argument("--version", action="version", version=f"kumoproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the service in the foreground")
    serve.add_argument("--config", type=Path, help="YAML config (default: the embedded default)")
    check = commands.add_parser("check-config", help="validate a config and print it in effect")
    check.add_argument("file", type=Path)
    sources = commands.add_parser("sources", help="list sources and whether they can be bound")
    sources.add_argument("--config", type=Path)
    hash_cmd = commands.add_parser(
        "hash-password", help="hash a password for auth.users[].password_hash"
    )
    # Started by the supervisor when workers > 1, never by hand: not listed.
    worker = commands.add_parser("worker")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--workers", type=int, required=True)
    worker.add_argument("--control-fd", type=int, required=True)
    worker.add_argument("--listen-fds", required=True)
    worker.add_argument("--limits-table", type=Path, required=True)
    for sub in (serve, check, sources, hash_cmd):
        sub.add_argument("--version", action="version", version=f"kumoproxy {__version__}")
    return parser


def _load(path: Path | None) -> Config:
    return embedded_default() if path is None else load_config(path)


def _fail(message: str) -> int:
    print(f"kumoproxy: {message}", file=sys.stderr)
    return EXIT_ERROR


def cmd_check_config(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"{path}: {error}", file=sys.stderr)
        return EXIT_ERROR
    # Load certificates as serve and reload would: systemd runs check-config
    # before both, so an unreadable key must fail here, not after.
    tls_errors = []
    for index, listener in enumerate(config.listeners):
        if listener.tls is not None:
            try:
                server_context(listener.tls)
            except TlsSetupError as exc:
                tls_errors.append(f"{path}: listeners[{index}].tls: {exc}")
    if tls_errors:
        print("\n".join(tls_errors), file=sys.stderr)
        return EXIT_ERROR
    yaml.safe_dump(config_to_data(config), sys.stdout, sort_keys=False)
    return EXIT_OK


def cmd_sources(config: Config) -> int:
    unbindable = 0
    for source in config.sorted_sources():
        problem = egress.probe_source(source)
        unbindable += problem is not None
        print(f"{source}\t{'bindable' if problem is None else 'NOT bindable: ' + problem}")
    return EXIT_OK if unbindable == 0 else EXIT_ERROR


def cmd_hash_password() -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            return _fail("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        return _fail("empty password")
    if len(password.encode()) > 255:
        return _fail("RFC 1929 passwords are at most 255 bytes")
    print(hash_password(password.encode()))
    return EXIT_OK


async def _serve(config: Config, path: Path | None) -> None:
    log = structlog.get_logger("kumoproxy")
    service = Service(config, logger=log)
    # Opened before any nursery, so "address in use" arrives as itself and
    # not wrapped in an exception group.
    bound = await open_listeners(config)
    freeze_startup_objects()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[Bound]) -> None:
                await service.serve(bound, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop waiting for signals

            await nursery.start(serve_then_stop)
            _log_listening(
                log,
                config,
                [(b.config.protocol, b.address) for b in bound.listeners],
                bound.admin_address,
            )
            await _obey_signals(
                signals,
                log,
                reload=partial(_reload, service, path, log),
                draining=lambda: service.draining,
                drain=service.drain,
                stop=nursery.cancel_scope.cancel,
            )


def _log_listening(
    log: structlog.typing.FilteringBoundLogger,
    config: Config,
    listeners: list[tuple[str, tuple[IPAddress, int]]],
    admin: tuple[IPAddress, int] | None,
    **extra: object,
) -> None:
    """The start-up line: what listens where (tests and operators read it)."""
    log.info(
        "listening",
        version=__version__,
        config=config.origin,
        listeners=[f"{protocol}://{format_endpoint(*address)}" for protocol, address in listeners],
        admin=f"http://{format_endpoint(*admin)}" if admin is not None else None,
        sources=len(config.sources),
        **extra,
        nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    )


async def _obey_signals(
    signals: AsyncIterator[int],
    log: structlog.typing.FilteringBoundLogger,
    *,
    reload: Callable[[], Awaitable[None]],
    draining: Callable[[], bool],
    drain: Callable[[], None],
    stop: Callable[[], None],
) -> None:
    """SIGHUP reloads; a first SIGTERM/SIGINT drains, a second closes every session now."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            await reload()
        elif draining():
            log.warning("second stop signal: closing every session now")
            stop()
        else:
            log.info("stop signal: draining", signal=signal.Signals(signum).name)
            drain()


async def _supervise(config: Config, path: Path | None) -> None:
    """``workers`` > 1: this process supervises; the workers serve."""
    log = structlog.get_logger("kumoproxy").bind(role="supervisor")
    source = ConfigSource(path)
    # The workers parse this very text: parse it here too, so what the
    # supervisor checked is what they run even if the file just changed.
    text, origin, embedded = source.read()
    config = parse_config(text, origin=origin, embedded=embedded)
    supervisor = await open_supervisor(config, source, logger=log, wall_clock=time.time)
    try:
        await _supervise_until_stopped(supervisor, config, text, embedded, log)
    except BaseExceptionGroup as group:
        # A worker that cannot start arrives wrapped by the nursery; say it
        # in one line like any other start-up error.
        failure = _sole_error(group)
        if failure is None:
            raise
        raise failure from None
    finally:
        supervisor.table.close()
        supervisor.runtime.remove()
    log.info("stopped")


def _sole_error(group: BaseExceptionGroup[BaseException]) -> KumoproxyError | None:
    """The one KumoproxyError a group holds (however nested), if that is all it holds."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1 and isinstance(leaves[0], KumoproxyError):
        return leaves[0]
    return None


async def _supervise_until_stopped(
    supervisor: Supervisor,
    config: Config,
    text: str,
    embedded: bool,
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def run_then_stop(task_status: trio.TaskStatus[None]) -> None:
                await supervisor.run(text, embedded, task_status=task_status)
                nursery.cancel_scope.cancel()  # every worker has exited

            await nursery.start(run_then_stop)
            _log_listening(
                log,
                config,
                [
                    (listener.protocol, bound_address(sock))
                    for listener, sock in zip(config.listeners, supervisor.sockets, strict=True)
                ],
                bound_address(supervisor.admin.socket) if supervisor.admin is not None else None,
                workers=config.workers,
                runtime=str(supervisor.runtime.path),
            )
            await _obey_signals(
                signals,
                log,
                reload=supervisor.reload,
                draining=lambda: supervisor.draining,
                drain=supervisor.drain,
                stop=supervisor.stop,
            )


async def _reload(
    service: Service, path: Path | None, log: structlog.typing.FilteringBoundLogger
) -> None:
    """SIGHUP: validate the file, then swap it in; on any error keep the old config."""
    try:
        config = await trio.to_thread.run_sync(_load, path)
        ignored = service.reload(config)
    except (ConfigErrors, KumoproxyError) as exc:
        assert service.control is not None  # the single process owns its control metrics
        refuse_reload(log, service.control, exc)
        return
    log.info("reloaded", config=config.origin, not_applied=ignored, sources=len(config.sources))
    # Last, so the line above still goes out in the old format and level.
    configure_logging(config.log)


def raise_file_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit: each session needs two fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def cmd_serve(config: Config, path: Path | None) -> int:
    # systemd may send SIGHUP (reload) before trio's handler is installed; the
    # default action would kill us. Ignore it until the real handler takes over.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(config.log)
    raise_file_limit()
    try:
        if config.workers > 1:
            trio.run(_supervise, config, path)
        else:
            trio.run(_serve, config, path)
    except KumoproxyError as exc:  # cannot listen, cannot load a certificate
        return _fail(str(exc))
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    run_worker(
        WorkerArgs(
            index=args.index,
            workers=args.workers,
            control_fd=args.control_fd,
            listen_fds=tuple(int(fd) for fd in args.listen_fds.split(",") if fd),
            limits_table=args.limits_table,
        )
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        match args.command:
            case "check-config":
                return cmd_check_config(args.file)
            case "hash-password":
                return cmd_hash_password()
            case "sources":
                return cmd_sources(_load(args.config))
            case "serve":
                return cmd_serve(_load(args.config), args.config)
            case "worker":
                return cmd_worker(args)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"kumoproxy: config: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
