"""``mta-client run`` assembled: spool, shaping, event log, metrics listener, runner.

:func:`run_sender` is what the command runs inside ``trio.run``, and what
tests start in a nursery (on virtual time if they like): it reports the
:class:`Runner` through ``task_status`` once delivering, and returns after
:meth:`Runner.stop` and the drain.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import prometheus_client
import structlog
import trio

from kumoproxy.admin import AdminState, serve_admin
from mta_client.clock import WallClock
from mta_client.config import ClientConfig
from mta_client.events import EventLog
from mta_client.metrics import SenderMetrics
from mta_client.mx import MxResolver
from mta_client.runner import Runner
from mta_client.shaping import open_shaper
from mta_client.spool import Spool, SpoolError


class SenderSetupError(SpoolError):
    """The sender cannot start: no spool configured, spool locked, listener busy."""


@contextlib.asynccontextmanager
async def _metrics_listener(
    config: ClientConfig, registry: prometheus_client.CollectorRegistry, runner: Runner
) -> AsyncIterator[tuple[str, int] | None]:
    if config.metrics_listen is None:
        yield None
        return
    host, port = config.metrics_listen
    try:
        listeners = await trio.open_tcp_listeners(port, host=str(host))
    except OSError as exc:
        raise SenderSetupError(f"metrics.listen {host}:{port}: {exc.strerror}") from exc

    def state() -> AdminState:
        return AdminState(
            ready=not runner.stopping,
            reason="stopping" if runner.stopping else "",
            sources=runner.sources_report,
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_admin(
                listeners[0], registry=registry, state=state, task_status=task_status
            )
        )
        address = listeners[0].socket.getsockname()
        yield (address[0], address[1])
        nursery.cancel_scope.cancel()


async def run_sender(
    config: ClientConfig,
    *,
    registry: prometheus_client.CollectorRegistry | None = None,
    resolver: MxResolver | None = None,
    clock: WallClock | None = None,
    task_status: trio.TaskStatus[Runner] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Deliver the spool until the runner is stopped; everything closed on return."""
    if config.spool.path is None:
        raise SenderSetupError("spool.path is not set in the config")
    log = structlog.get_logger("mta_client")
    clock = clock or WallClock()
    registry = registry or prometheus_client.CollectorRegistry()
    metrics = SenderMetrics(registry)
    spool = await Spool.open(config.spool.path, clock=clock)
    events = EventLog(config.events_path)
    try:
        for report in spool.quarantined:
            log.error("spool_quarantined", detail=str(report))
        metrics.quarantined(len(spool.quarantined))
        async with open_shaper(config.redis, on_mode_change=metrics.shaping_mode) as shaper:
            runner = Runner(
                config,
                spool=spool,
                clock=clock,
                shaper=shaper,
                resolver=resolver,
                events=events,
                metrics=metrics,
            )
            async with (
                _metrics_listener(config, registry, runner) as admin,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(runner.run)
                log.info(
                    "sender_started",
                    spool=str(config.spool.path),
                    queued=len(runner.scheduler),
                    sources=[str(e.source) for e in config.pool],
                    metrics=f"http://{admin[0]}:{admin[1]}/metrics" if admin else None,
                )
                task_status.started(runner)
            log.info("sender_stopped")
    finally:
        events.close()
        with trio.CancelScope(shield=True):
            await spool.aclose()
