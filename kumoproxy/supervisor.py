"""The supervisor of a multi-process service (``workers`` > 1).

One Python process tops out near one core of accepts and handshakes, so with
``workers: N`` the ``kumoproxy serve`` process becomes a supervisor that
serves no session itself. It:

* binds every listener once and hands the socket to every worker; it
  listens on it once all of them are ready, then tells them to accept, so
  a port accepts connections only when the service can serve them.
  Whichever worker is free accepts the next connection. The supervisor
  keeps its copy, so a restarted worker takes over the connections already
  queued;
* creates a private runtime directory (on /dev/shm where it can) with the
  shared limit table (kumoproxy.shared_limits), so the limits hold in total,
  and prometheus_client's multiprocess files, which it sums into the one
  ``/metrics`` view on the admin listener it serves;
* sends each worker the configuration text it validated, and fans SIGHUP
  reloads out the same way, counting one reload, not N;
* restarts a worker that dies (its limit slots are released, its gauges
  dropped), with a backoff if it keeps dying;
* on SIGTERM/SIGINT tells every worker to drain and exits once they have;
  a second signal closes every session now.

Workers are separate interpreters started with ``python -m kumoproxy
worker`` (not forked), so none inherits the supervisor's trio state.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import structlog
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from kumoproxy import runtime_dir
from kumoproxy.admin import AdminState, serve_admin
from kumoproxy.config import (
    Config,
    ConfigErrors,
    embedded_default_text,
    parse_config,
)
from kumoproxy.errors import KumoproxyError
from kumoproxy.logs import configure_logging
from kumoproxy.metrics import ControlMetrics
from kumoproxy.proto import control
from kumoproxy.runtime_dir import RuntimeDir
from kumoproxy.server import (
    ListenError,
    ReloadError,
    bind_listening_socket,
    listen_now,
    listen_on,
    refuse_reload,
    source_entries,
    validate_reload,
)
from kumoproxy.shared_limits import SharedLimitTable, capacity_for, sessions_held
from kumoproxy.yamlconfig import read_config_file

#: A worker that dies is restarted after this delay, doubled each time it
#: dies again soon after starting, up to the maximum.
RESTART_DELAY_INITIAL = 1.0
RESTART_DELAY_MAX = 30.0
#: A worker that served this long before dying restarts at once.
STABLE_AFTER = 10.0
#: Seconds a worker has to report ready after it is started.
READY_TIMEOUT = 30.0
#: Seconds a worker has to answer a reload.
RELOAD_TIMEOUT = 10.0
#: Seconds between "stop" (close every session now) and SIGKILL.
STOP_GRACE = 5.0
#: Bytes per read on a control channel.
CONTROL_READ = 65536


class WorkerStartError(KumoproxyError):
    """A worker did not come up at start (so the service cannot either)."""


# -- what the supervisor owns -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the configuration comes from, read afresh at each reload."""

    path: Path | None  # None: the embedded default

    def read(self) -> tuple[str, str, bool]:
        """``(text, origin, embedded)``; raises ConfigErrors if unreadable."""
        if self.path is None:
            return embedded_default_text(), "<embedded default>", True
        return read_config_file(self.path), str(self.path), False


async def bind_listeners(config: Config) -> list[trio.socket.SocketType]:
    """One bound (not yet listening) socket per configured listener.

    They listen once every worker is ready (:meth:`Supervisor.run`). Until
    then no other socket can bind the port (see
    :func:`kumoproxy.server.bind_listening_socket`), so "address in use" is
    found here, before any worker starts, whether something listens there
    already or a second kumoproxy is just starting too.

    One socket shared by every worker rather than one per worker in an
    SO_REUSEPORT group: the kernel's hash then sends a connection to a busy
    worker while another idles, which measured as a far longer latency tail
    (docs/performance.md); a shared socket is accepted by whichever worker
    gets to it first, at the cost of waking every idle worker per
    connection.
    """
    sockets: list[trio.socket.SocketType] = []
    try:
        for listener in config.listeners:
            sockets.append(
                await bind_listening_socket(listener.host, listener.port, listener.listen)
            )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# -- workers --------------------------------------------------------------------


@dataclass(slots=True)
class WorkerSlot:
    """Worker *index*: the process in it now (if any) and its control channel."""

    index: int
    process: trio.Process | None = None
    channel: trio.SocketStream | None = None
    ready: bool = False
    replies: dict[int, trio.MemorySendChannel[control.Message]] = field(default_factory=dict)
    #: Reload, drain, listen and stop may be sent from different tasks; a
    #: stream takes one writer at a time.
    send_lock: trio.Lock = field(default_factory=trio.Lock)


def source_totals(registry: CollectorRegistry) -> dict[str, Counter[str]]:
    """``kumoproxy_source_connections_total`` summed over workers: source -> result -> n."""
    totals: dict[str, Counter[str]] = defaultdict(Counter)
    for family in registry.collect():
        if family.name != "kumoproxy_source_connections":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals[sample.labels["source"]][sample.labels["result"]] += int(sample.value)
    return totals


class _Countdown:
    """An event set once ``done`` has been called ``count`` times."""

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.finished = trio.Event()
        if count == 0:
            self.finished.set()

    def done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.finished.set()


class Supervisor:
    """Runs the workers; ``reload``/``drain``/``stop`` come from the signal loop."""

    def __init__(
        self,
        config: Config,
        source: ConfigSource,
        *,
        sockets: list[trio.socket.SocketType],
        admin: trio.SocketListener | None,
        runtime: RuntimeDir,
        table: SharedLimitTable,
        workers: int,
        logger: structlog.typing.FilteringBoundLogger,
        wall_clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.source = source
        self.log = logger
        self.runtime = runtime
        self.table = table
        self.admin = admin
        self.sockets = sockets  # the listeners, shared by every worker
        self.slots = [WorkerSlot(i) for i in range(workers)]
        self.registry = CollectorRegistry()
        # prometheus_client's multiprocess module has no type hints.
        MultiProcessCollector(self.registry, path=str(runtime.metrics))  # type: ignore[no-untyped-call]
        self.control = ControlMetrics(self.registry)
        self.draining = False
        self._wall_clock = wall_clock
        self._config_message: dict[str, object] = {}
        self._reload_seq = 0
        self._serving = False  # every worker was told to listen
        self._workers_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None

    @property
    def workers(self) -> int:
        return len(self.slots)

    # -- running -------------------------------------------------------------

    async def run(
        self,
        text: str,
        embedded: bool,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start every worker, report started once all are ready, return when all have exited."""
        self._config_message = {"text": text, "origin": self.config.origin, "embedded": embedded}
        self.control.config_loaded.set(self._wall_clock())
        try:
            async with trio.open_nursery() as outer:
                self._nursery = outer
                if self.admin is not None:
                    await outer.start(
                        partial(
                            serve_admin, self.admin, registry=self.registry, state=self.admin_state
                        )
                    )
                with self._workers_scope:
                    async with trio.open_nursery() as workers:
                        # Started side by side; the ports open only once
                        # every worker is ready, so a client (or a health
                        # check) never meets a half-started service.
                        starting = _Countdown(len(self.slots))
                        for slot in self.slots:
                            workers.start_soon(self._keep, slot, starting.done)
                        await starting.finished.wait()
                        # Listen here, not only in the workers: from now on
                        # the kernel queues connections until a worker
                        # accepts, so "listening" and /readyz are true the
                        # moment they are said, however slow a worker is to
                        # act on "listen" (which starts it accepting).
                        for listener, sock in zip(self.config.listeners, self.sockets, strict=True):
                            try:
                                listen_now(sock)
                            except OSError as exc:
                                raise ListenError(
                                    f"cannot listen on {listener.listen}: {exc.strerror}"
                                ) from exc
                        self._serving = True
                        for slot in self.slots:
                            await self._send(slot, "listen")
                        task_status.started()
                outer.cancel_scope.cancel()  # every worker has exited: stop the admin listener
        finally:
            self._close_listeners()
            self.control.workers_running.set(0)

    async def _keep(self, slot: WorkerSlot, first_ready: Callable[[], None]) -> None:
        """Run worker ``slot.index``, restarting it until the service drains.

        Calls ``first_ready`` once the first process is ready; if that one
        dies before, the service cannot start and this raises.
        """
        delay = RESTART_DELAY_INITIAL
        on_ready: Callable[[], None] | None = first_ready
        while True:
            started_at = trio.current_time()
            try:
                process, was_ready = await self._run_once(slot, on_ready)
            except OSError as exc:  # could not even start it (EMFILE, EAGAIN, ...)
                if on_ready is not None:
                    raise WorkerStartError(f"cannot start worker {slot.index}: {exc}") from exc
                self.log.error("cannot start worker", worker=slot.index, error=str(exc))
                await trio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX)
                if self.draining:
                    return
                continue
            self._forget(slot, process)
            if on_ready is not None and not was_ready:
                raise WorkerStartError(
                    f"worker {slot.index} exited with status {process.returncode} "
                    "before it was ready"
                )
            on_ready = None
            if self.draining:
                return
            self.control.worker_exits.inc()
            if trio.current_time() - started_at >= STABLE_AFTER:
                wait, delay = 0.0, RESTART_DELAY_INITIAL
            else:  # dying soon after starting: back off
                wait, delay = delay, min(delay * 2, RESTART_DELAY_MAX)
            self.log.error(
                "worker exited, restarting",
                worker=slot.index,
                pid=process.pid,
                status=process.returncode,
                restart_in=wait,
            )
            await trio.sleep(wait)
            if self.draining:
                return

    def _forget(self, slot: WorkerSlot, process: trio.Process) -> None:
        """A worker has exited: release its limit slots and drop its live gauges."""
        slot.ready = False
        slot.process = None
        self.table.reset_worker(slot.index)
        mark_process_dead(process.pid, str(self.runtime.metrics))  # type: ignore[no-untyped-call]
        self._count_running()

    async def _run_once(
        self, slot: WorkerSlot, on_ready: Callable[[], None] | None
    ) -> tuple[trio.Process, bool]:
        """Start one worker process in ``slot``; once it has exited, return it
        and whether it had reported ready."""
        ours, theirs = socket.socketpair()
        listen_fds = [sock.fileno() for sock in self.sockets]
        argv = [
            sys.executable, "-m", "kumoproxy", "worker",
            "--index", str(slot.index),
            "--workers", str(self.workers),
            "--control-fd", str(theirs.fileno()),
            "--listen-fds", ",".join(map(str, listen_fds)),
            "--limits-table", str(self.runtime.limits_table),
        ]  # fmt: skip
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.runtime.metrics)}
        channel = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        try:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        argv,
                        check=False,
                        stdin=subprocess.DEVNULL,
                        pass_fds=(theirs.fileno(), *listen_fds),
                        env=env,
                        deliver_cancel=partial(self._stop_process, slot),
                    )
                )
                theirs.close()
                slot.process, slot.channel = process, channel
                await self._send(slot, "config", **self._config_message)
                with trio.move_on_after(READY_TIMEOUT) as waiting:
                    await self._listen(slot, channel, on_ready, waiting)
                if waiting.cancelled_caught:
                    self.log.error("worker not ready in time, killing it", worker=slot.index)
                    process.kill()
        finally:
            theirs.close()
            slot.channel = None
            await channel.aclose()
        return process, slot.ready

    async def _listen(
        self,
        slot: WorkerSlot,
        channel: trio.SocketStream,
        on_ready: Callable[[], None] | None,
        ready_wait: trio.CancelScope,
    ) -> None:
        """Read the worker's messages until it closes the channel (it exited)."""
        reader = control.MessageReader()
        try:
            while data := await channel.receive_some(CONTROL_READ):
                for message in reader.feed(data):
                    if message["op"] == "ready":
                        slot.ready = True
                        ready_wait.deadline = float("inf")
                        self._count_running()
                        pid = slot.process.pid if slot.process is not None else None
                        self.log.info("worker ready", worker=slot.index, pid=pid)
                        if on_ready is not None:
                            on_ready()
                            on_ready = None
                        if self._serving:  # a restart: its socket listens already
                            await self._send(slot, "listen")
                    elif (reply := slot.replies.get(message.get("seq", -1))) is not None:
                        reply.send_nowait(message)
        except (trio.BrokenResourceError, control.ControlProtocolError) as exc:
            self.log.error("worker control channel failed", worker=slot.index, error=str(exc))

    async def _stop_process(self, slot: WorkerSlot, process: trio.Process) -> None:
        """Cancelled: ask the worker to close everything now, then kill it."""
        with trio.move_on_after(STOP_GRACE):
            await self._send(slot, "stop")
            await process.wait()
        if process.returncode is None:
            process.kill()

    async def _send(self, slot: WorkerSlot, op: str, **fields: object) -> bool:
        """Send one message; False if the worker is gone (its exit is handled elsewhere)."""
        async with slot.send_lock:
            channel = slot.channel
            if channel is None:
                return False
            try:
                await channel.send_all(control.encode(op, **fields))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            return True

    def _count_running(self) -> None:
        self.control.workers_running.set(sum(slot.ready for slot in self.slots))

    def _close_listeners(self) -> None:
        for sock in self.sockets:
            sock.close()

    # -- control ---------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: validate the file here, then have every worker apply the same text."""
        try:
            text, origin, embedded = await trio.to_thread.run_sync(self.source.read)
            config = parse_config(text, origin=origin, embedded=embedded)
            validate_reload(self.config, config)
            self._check_table_holds(config)
        except (ConfigErrors, KumoproxyError) as exc:
            refuse_reload(self.log, self.control, exc)
            return
        message = {"text": text, "origin": origin, "embedded": embedded}
        not_applied: set[str] = set()
        if config.workers != self.workers:
            not_applied.add("workers (restart to apply)")
        failed: dict[int, str] = {}
        for slot in self.slots:
            outcome = await self._reload_worker(slot, message)
            if isinstance(outcome, str):
                failed[slot.index] = outcome
            else:
                not_applied.update(outcome)
        # A worker started from now on gets the new text, whatever happened.
        self._config_message = message
        self.config = config
        if failed:
            self.control.config_reloads.labels("error").inc()
            self.log.error("reload failed in workers", failed=failed)
            return
        self.control.config_reloads.labels("ok").inc()
        self.control.config_loaded.set(self._wall_clock())
        self.log.info(
            "reloaded", config=origin, not_applied=sorted(not_applied), sources=len(config.sources)
        )
        configure_logging(config.log)

    def _check_table_holds(self, config: Config) -> None:
        """The limit table was sized at start; a reload cannot raise ``max_sessions`` past it."""
        held = sessions_held(self.table.capacity)
        if config.limits.max_sessions > held:
            raise ReloadError(
                f"limits.max_sessions {config.limits.max_sessions}: the shared limit table "
                f"was sized at start for at most {held} sessions; restart to apply"
            )

    async def _reload_worker(self, slot: WorkerSlot, message: dict[str, object]) -> list[str] | str:
        """The worker's ``not_applied`` list, or why it did not apply the config."""
        if not slot.ready:
            return []  # starting or restarting: it will read the new text
        self._reload_seq += 1
        seq = self._reload_seq
        send, receive = trio.open_memory_channel[control.Message](1)
        slot.replies[seq] = send
        try:
            if not await self._send(slot, "reload", seq=seq, **message):
                return []  # it just exited: it restarts with the new text
            with trio.move_on_after(RELOAD_TIMEOUT):
                reply = await receive.receive()
                if reply["op"] == "reloaded":
                    return [str(item) for item in reply.get("not_applied", [])]
                return str(reply.get("error", "unknown error"))
            return f"no answer within {RELOAD_TIMEOUT:g}s"
        finally:
            del slot.replies[seq]

    def drain(self) -> None:
        """Tell every worker to drain; stop the service once they have exited."""
        self.draining = True
        self.control.draining.set(1)
        # Workers close their sockets as they drain; ours must go too, or the
        # kernel keeps queueing connections nobody will accept.
        self._close_listeners()
        assert self._nursery is not None, "drain before run"
        for slot in self.slots:
            self._nursery.start_soon(self._send, slot, "drain")
        # Workers cut their sessions after timeouts.drain; this is the backstop.
        self._nursery.start_soon(self._stop_after, self.config.timeouts.drain + STOP_GRACE)

    async def _stop_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self.log.warning("workers still running after the drain time: stopping them")
        self.stop()

    def stop(self) -> None:
        """Second signal: every worker closes its sessions now (or is killed)."""
        self.draining = True
        self._workers_scope.cancel()

    # -- admin -------------------------------------------------------------------

    def admin_state(self) -> AdminState:
        if self.draining:
            ready, reason = False, "draining"
        elif not all(slot.ready for slot in self.slots):
            waiting = [str(slot.index) for slot in self.slots if not slot.ready]
            ready, reason = False, f"starting workers {','.join(waiting)}"
        else:
            ready, reason = True, ""
        return AdminState(ready, reason, self.sources_report)

    def sources_report(self) -> list[dict[str, object]]:
        """/sources: as in one process, with active and totals summed over the workers."""
        totals = source_totals(self.registry)
        return source_entries(
            self.config, self.table.source_connections, lambda source: totals.get(str(source), {})
        )


# -- wiring --------------------------------------------------------------------


async def open_supervisor(
    config: Config,
    source: ConfigSource,
    *,
    logger: structlog.typing.FilteringBoundLogger,
    wall_clock: Callable[[], float],
) -> Supervisor:
    """Bind the listeners and create the runtime directory; nothing runs yet."""
    sockets = await bind_listeners(config)
    admin: trio.SocketListener | None = None
    runtime: RuntimeDir | None = None
    try:
        if config.admin.host is not None and config.admin.listen is not None:
            admin = await listen_on(
                config.admin.host, config.admin.port, f"admin {config.admin.listen}"
            )
        parent = runtime_dir.default_parent()
        stale = runtime_dir.remove_stale(parent)
        if stale:
            logger.info(
                "removed runtime directories of dead supervisors", paths=[str(p) for p in stale]
            )
        runtime = RuntimeDir.create(parent)
        table = SharedLimitTable.create(
            runtime.limits_table, workers=config.workers, capacity=capacity_for(config.limits)
        )
    except BaseException:
        for sock in sockets:
            sock.close()
        if admin is not None:
            admin.socket.close()
        if runtime is not None:
            runtime.remove()
        raise
    return Supervisor(
        config,
        source,
        sockets=sockets,
        workers=config.workers,
        admin=admin,
        runtime=runtime,
        table=table,
        logger=logger,
        wall_clock=wall_clock,
    )
