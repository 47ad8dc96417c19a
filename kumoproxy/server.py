"""The service: listeners, accept loops, sessions, drain.

Structured concurrency throughout: one nursery holds every session, another
the accept loops. Draining cancels the accept loops (no new sessions), closes
the listening sockets, waits up to ``timeouts.drain`` for the sessions to
finish by themselves, then cancels what is left.
"""

from __future__ import annotations

import errno
import gc
import ipaddress
import logging
import secrets
import socket
import ssl
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import structlog
import trio
from prometheus_client import CollectorRegistry

from kumoproxy import egress
from kumoproxy.admin import AdminState, serve_admin
from kumoproxy.config import Config, ConfigErrors, IPAddress, ListenerConfig
from kumoproxy.errors import KumoproxyError
from kumoproxy.handshakes import HandshakeTracker
from kumoproxy.limits import Limiter, LimitTracker
from kumoproxy.metrics import ControlMetrics, Metrics
from kumoproxy.passwords import PasswordVerifier
from kumoproxy.policy import RefusalReason, check_client, unmap
from kumoproxy.proto.common import format_endpoint
from kumoproxy.proxy_session import run_proxy
from kumoproxy.relay import SPLICE_AVAILABLE, PipePool
from kumoproxy.session import (
    MetricChildren,
    Outcome,
    SessionContext,
    SessionRecord,
    limit_refusal,
    refuse,
)
from kumoproxy.socks5_session import run_socks5
from kumoproxy.throttle import AuthThrottle
from kumoproxy.tls import server_context

#: accept() errors that mean "out of resources right now", not "listener
#: broken": back off and try again (the reference proxy died here for good).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_INITIAL = 0.01
ACCEPT_BACKOFF_MAX = 1.0

#: The ``end`` of a relayed session cut because the drain time ran out.
DRAIN_END = "drain"

#: Listen backlog: the kernel caps it at net.core.somaxconn anyway.
LISTEN_BACKLOG = 4096

#: accept() errors that concern only the connection being accepted (Linux
#: passes pending network errors on through accept(2), "Error handling"):
#: skip it and accept the next one.
ACCEPT_SKIP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED", "ECONNRESET", "EPERM", "EPROTO", "ENETDOWN", "ENOPROTOOPT",
        "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ETIMEDOUT",
    )
    if hasattr(errno, name)
)  # fmt: skip

#: Linux copies the listening socket's options (keepalive and its timings,
#: TCP_NODELAY) to each accepted socket, so they are set once on the
#: listener instead of with four system calls per session.
OPTIONS_INHERITED = sys.platform == "linux"

SessionObserver = Callable[[SessionRecord], None]


def freeze_startup_objects() -> None:
    """Exclude everything alive now (modules, config, the service) from garbage collection.

    A full collection walks every tracked object: ~37,000 after the imports,
    about 29 ms on the benchmark machine, a stall every client in flight
    pays. Under the conn benchmark one still comes every few seconds. The
    objects made at start-up live until exit, so the collector never needs
    to look at them again (gc.freeze, Python 3.7+).
    """
    gc.collect()
    gc.freeze()


def bound_address(sock: trio.socket.SocketType) -> tuple[IPAddress, int]:
    """The address a socket is bound to (the real port when 0 was asked for)."""
    host, port = sock.getsockname()[:2]
    return ipaddress.ip_address(host), port


class ListenError(KumoproxyError, OSError):
    """A configured listener could not be opened (address in use, not ours...)."""


@dataclass(frozen=True, slots=True)
class BoundListener:
    """A configured listener and the address it actually got."""

    config: ListenerConfig
    listener: trio.SocketListener

    @property
    def address(self) -> tuple[IPAddress, int]:
        return bound_address(self.listener.socket)


async def bind_listening_socket(host: IPAddress, port: int, label: str) -> trio.socket.SocketType:
    """A socket bound for listening, not yet listening, that no other socket can join.

    SO_REUSEADDR lets the bind succeed over the TIME_WAIT connections a
    previous run left on the port. Left on, it would also let any other
    SO_REUSEADDR socket bind the same port until this one listens (Linux
    only refuses once one of them listens): a second kumoproxy started
    while the workers of the first are still starting would take the port
    from them. So it is off from bind until :func:`listen_now`.
    IPv6 sockets are IPv6-only.
    """
    family = socket.AF_INET if host.version == 4 else socket.AF_INET6
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if OPTIONS_INHERITED:
            egress.set_keepalive(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.bind((str(host), port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {label}: {exc.strerror}") from exc
    return sock


def listen_now(sock: trio.socket.SocketType) -> None:
    """listen(2) on a bound socket (again, for one that already listens: harmless).

    SO_REUSEADDR goes back on first: listen(2) checks the port again, and
    without it the TIME_WAIT connections of a previous run would fail it.
    The connections it accepts inherit the option, so their own TIME_WAIT
    does not block the next start either. A listening socket excludes
    every other bind by itself.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.listen(LISTEN_BACKLOG)


def start_listening(sock: trio.socket.SocketType) -> trio.SocketListener:
    """:func:`listen_now`, and a listener to accept from."""
    listen_now(sock)
    return trio.SocketListener(sock)


async def listen_on(host: IPAddress, port: int, label: str) -> trio.SocketListener:
    """A listening socket on ``host:port``; raises :class:`ListenError`."""
    sock = await bind_listening_socket(host, port, label)
    try:
        return start_listening(sock)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {label}: {exc.strerror}") from exc


@dataclass(frozen=True, slots=True)
class Bound:
    """Every listening socket of the service: proxy listeners and the admin one."""

    listeners: list[BoundListener]
    admin: trio.SocketListener | None = None

    @property
    def admin_address(self) -> tuple[IPAddress, int] | None:
        if self.admin is None:
            return None
        return bound_address(self.admin.socket)

    async def aclose(self) -> None:
        for b in self.listeners:
            await b.listener.aclose()
        if self.admin is not None:
            await self.admin.aclose()


async def open_listeners(config: Config) -> Bound:
    """Bind every configured listener, or none: on failure the open ones are closed."""
    opened = Bound([])
    try:
        for listener_config in config.listeners:
            listener = await listen_on(
                listener_config.host, listener_config.port, listener_config.listen
            )
            opened.listeners.append(BoundListener(listener_config, listener))
        admin = config.admin
        if admin.host is not None and admin.listen is not None:
            admin_listener = await listen_on(admin.host, admin.port, f"admin {admin.listen}")
            opened = Bound(opened.listeners, admin_listener)
    except BaseException:
        await opened.aclose()
        raise
    return opened


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What makes a service one of ``workers`` processes (kumoproxy.supervisor, .worker).

    A worker shares its limits with the others, gets its share of
    ``limits.handshakes``, and leaves the admin listener and the control
    metrics (reloads, drain) to the supervisor.
    """

    index: int
    workers: int
    limits: Limiter


def handshake_share(limit: int, workers: int) -> int:
    """A worker's part of ``limits.handshakes``.

    The parts never add up to more than the limit, unless the limit is
    below the number of workers: each keeps at least one.
    """
    return max(1, limit // workers)


class Service:
    """The running proxy. ``serve`` runs it; ``drain`` asks it to stop; ``reload`` swaps config."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: egress.Resolver = egress.system_resolver,
        logger: structlog.typing.FilteringBoundLogger | None = None,
        observers: tuple[SessionObserver, ...] = (),
        registry: CollectorRegistry | None = None,
        wall_clock: Callable[[], float] = time.time,
        worker: WorkerRole | None = None,
    ) -> None:
        self.config = config
        self.log = logger if logger is not None else structlog.get_logger("kumoproxy")
        registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(registry)
        self.control = ControlMetrics(registry) if worker is None else None
        self.worker = worker
        self.limits: Limiter = LimitTracker(config.limits) if worker is None else worker.limits
        self.handshakes = HandshakeTracker(self._handshake_limit(config))
        self._resolver = resolver
        self._passwords = PasswordVerifier()
        self._auth_throttle = AuthThrottle()
        self._wall_clock = wall_clock
        # Loaded up front: a bad certificate must stop start-up with one clear
        # line, not fail every client later.
        self._tls_contexts = _tls_contexts(config)
        if self.control is not None:
            self.control.config_loaded.set(wall_clock())
        self._observers = observers
        self._children = MetricChildren()
        self._pipes = PipePool() if SPLICE_AVAILABLE else None
        self._context = self._session_context()
        self._source_totals: dict[IPAddress, Counter[str]] = defaultdict(Counter)
        self._drain_requested = trio.Event()
        self._sessions_changed = trio.Event()
        self.active_sessions = 0
        self.listening = False
        self.draining = False

    # -- control -----------------------------------------------------------

    def drain(self) -> None:
        """Stop accepting; running sessions get ``timeouts.drain`` to finish."""
        self.draining = True
        if self.control is not None:
            self.control.draining.set(1)
        self._drain_requested.set()

    def reload(self, config: Config) -> list[str]:
        """Swap in ``config`` for new sessions; sessions in flight keep theirs.

        Everything but the listening addresses changes: users, sources, policy,
        limits, timeouts, certificates. Raises (and changes nothing) if a
        certificate cannot be loaded. Returns what could not be applied.
        """
        _check_tls_unchanged(self.config, config)  # may raise: nothing is swapped yet
        tls_contexts = _tls_contexts(config)  # may raise too
        ignored = []
        old = {(li.listen, li.protocol) for li in self.config.listeners}
        new = {(li.listen, li.protocol) for li in config.listeners}
        if old != new or self.config.admin.listen != config.admin.listen:
            ignored.append("listener addresses (restart to apply)")
        self.config = config
        self._context = self._session_context()
        self._tls_contexts = tls_contexts
        self.limits.limits = config.limits
        self.handshakes.limit = self._handshake_limit(config)
        if self.control is not None:
            self.control.config_reloads.labels("ok").inc()
            self.control.config_loaded.set(self._wall_clock())
        return ignored

    def _handshake_limit(self, config: Config) -> int:
        limit = config.limits.handshakes
        return limit if self.worker is None else handshake_share(limit, self.worker.workers)

    def admin_state(self) -> AdminState:
        """What /readyz reports right now; /sources is built only when asked."""
        if self.draining:
            ready, reason = False, "draining"
        elif not self.listening:
            ready, reason = False, "starting"
        else:
            ready, reason = True, ""
        return AdminState(ready, reason, self.sources_report)

    def sources_report(self) -> list[dict[str, object]]:
        """/sources: per source IP, bindable now, active, totals (see :func:`source_entries`)."""
        totals = self._source_totals
        return source_entries(
            self.config, self.limits.source_connections, lambda source: totals.get(source, {})
        )

    # -- running -----------------------------------------------------------

    async def serve(
        self,
        bound: Bound | None = None,
        *,
        task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until drained, on ``bound`` or on freshly opened configured listeners.

        ``task_status.started`` receives the bound sockets (tests use port 0).
        They are all closed when this returns, however it returns.
        """
        opened = Bound([])
        try:
            opened = bound if bound is not None else await open_listeners(self.config)
            async with trio.open_nursery() as admin:
                if opened.admin is not None:
                    await admin.start(
                        partial(
                            serve_admin,
                            opened.admin,
                            registry=self.metrics.registry,
                            state=self.admin_state,
                        )
                    )
                await self._serve_until_drained(opened, task_status)
                admin.cancel_scope.cancel()
        finally:
            # Cancellation (a second signal, a test) must not leak listening sockets.
            with trio.CancelScope(shield=True):
                await opened.aclose()
            if self._pipes is not None:
                self._pipes.close()
        self.log.info("stopped")

    async def _serve_until_drained(self, bound: Bound, task_status: trio.TaskStatus[Bound]) -> None:
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as acceptors:
                for b in bound.listeners:
                    acceptors.start_soon(self._accept_loop, b, sessions)
                self.listening = True
                task_status.started(bound)
                await self._drain_requested.wait()
                acceptors.cancel_scope.cancel()
            for b in bound.listeners:  # new connections are now refused by the kernel
                await b.listener.aclose()
            self.listening = False
            drain = self.config.timeouts.drain
            self.log.info("draining", active_sessions=self.active_sessions, drain_seconds=drain)
            with trio.move_on_after(drain):
                while self.active_sessions:
                    await self._sessions_changed.wait()
            if self.active_sessions:
                self.log.warning("drain timeout: closing sessions", remaining=self.active_sessions)
            sessions.cancel_scope.cancel()

    async def _accept_loop(self, bound: BoundListener, sessions: trio.Nursery) -> None:
        backoff = ACCEPT_BACKOFF_INITIAL
        failures = 0
        label = bound.config.listen
        listening = bound.listener.socket
        while True:
            try:
                # The socket's accept, not the listener's: it returns the
                # peer's address, which saves a getpeername() per session.
                sock, address = await listening.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP_ERRNOS:
                    continue
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError from None
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                error = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                self.metrics.accept_errors.labels(label, error).inc()
                if failures == 0:  # once per burst, not once per attempt
                    self.log.error("accept failing, backing off", listener=label, error=error)
                failures += 1
                await trio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            if failures:
                self.log.info("accept recovered", listener=label, failures=failures)
                failures, backoff = 0, ACCEPT_BACKOFF_INITIAL
            sessions.start_soon(self._handle, bound.config, trio.SocketStream(sock), address)

    def _session_context(self) -> SessionContext:
        """The context new sessions get, built at start and at each reload.

        A session keeps the one it started with: a reload does not change
        sessions in flight.
        """
        return SessionContext(
            config=self.config,
            resolver=self._resolver,
            passwords=self._passwords,
            auth_throttle=self._auth_throttle,
            limits=self.limits,
            metrics=self.metrics,
            handshakes=self.handshakes,
            children=self._children,
            pipes=self._pipes,
        )

    async def _handle(
        self,
        listener: ListenerConfig,
        stream: trio.SocketStream,
        address: tuple[str, int] | tuple[str, int, int, int],  # accept()'s, IPv4 or IPv6
    ) -> None:
        peer_host, peer_port = address[:2]
        peer = unmap(ipaddress.ip_address(peer_host))
        record = SessionRecord(
            session_id=secrets.token_hex(8),
            listener=listener.listen,
            protocol=listener.protocol,
            client=format_endpoint(peer, peer_port),
            started_at=trio.current_time(),
            client_ip=peer,
        )
        ctx = self._context
        self.active_sessions += 1
        self._children(self.metrics.sessions_active, listener.listen).inc()
        admitted = False
        try:
            if not OPTIONS_INHERITED:
                egress.set_keepalive(stream.socket)
            refusal = check_client(ctx.config, peer)
            if refusal is not None:
                refuse(record, refusal)
                return
            over_limit = None
            if (kind := self.limits.admit_session(peer)) is not None:
                over_limit = limit_refusal(ctx, kind, f"client {peer}")
            else:
                admitted = True
            if listener.protocol == "socks5":
                tls_context = self._tls_contexts.get(listener.listen)
                await run_socks5(
                    ctx, record, stream, tls_context=tls_context, over_limit=over_limit
                )
            else:
                await run_proxy(ctx, record, stream, over_limit=over_limit)
        except Exception as exc:  # a bug: log it, keep the service up
            record.detail = f"internal error: {exc!r}"
            self.log.exception("session crashed", session_id=record.session_id)
        except BaseException as exc:
            if _cancelled(exc):  # both relay pumps cancelled arrive as a group
                record.detail = "closed at shutdown (drain time over)"
                if record.outcome is Outcome.OK:
                    record.reason = DRAIN_END  # so the end says why, not just "ok"
            raise
        finally:
            if admitted:
                self.limits.release_session(peer)
            stream.socket.close()  # synchronous: nothing to shield
            record.total_seconds = trio.current_time() - record.started_at
            self._account(record)
            self.active_sessions -= 1
            if self.draining:  # only the drain waits for sessions to end
                self._sessions_changed.set()
                self._sessions_changed = trio.Event()

    def _account(self, record: SessionRecord) -> None:
        """The session's log line, metrics and per-source totals."""
        metrics = self.metrics
        children = self._children
        children(metrics.sessions_active, record.listener).dec()
        children(metrics.session_ends, record.listener, record.end).inc()
        if record.reason in REFUSAL_REASONS and record.outcome is not Outcome.OK:
            metrics.refusals.labels(record.listener, record.reason).inc()
        result = SOURCE_RESULTS.get(record.outcome)
        if record.source_ip is not None and result is not None:
            children(metrics.source_connections, record.source_ip, result).inc()
            self._source_totals[record.source_ip][result] += 1
        for observer in self._observers:
            observer(record)
        if record.outcome in (Outcome.OK, Outcome.HEALTH_CHECK):
            # Building the line costs more than the session's own Python
            # code at thousands a second: skip it when info is filtered out.
            if self.log.is_enabled_for(logging.INFO):
                self.log.info("session", **record.fields())
        else:
            self.log.warning("session", **record.fields())


def _cancelled(exc: BaseException) -> bool:
    """Is ``exc`` a cancellation: ``Cancelled``, or a group of nothing else?"""
    if isinstance(exc, BaseExceptionGroup):
        return all(_cancelled(inner) for inner in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


#: The ``reason`` labels of ``kumoproxy_refusals_total``.
REFUSAL_REASONS = frozenset(str(r) for r in RefusalReason)

#: Session outcome -> the ``result`` label of ``kumoproxy_source_connections_total``.
SOURCE_RESULTS = {
    Outcome.OK: "ok",
    Outcome.REFUSED: "refused",
    Outcome.BIND_FAILED: "bind_failed",
    Outcome.CONNECT_FAILED: "connect_failed",
    Outcome.TIMEOUT: "timeout",
}


class ReloadError(KumoproxyError):
    """A new configuration cannot be applied without a restart."""


def refuse_reload(
    log: structlog.typing.FilteringBoundLogger,
    control: ControlMetrics,
    exc: ConfigErrors | KumoproxyError,
) -> None:
    """A reload that cannot be applied: counted, logged with every error; nothing changes."""
    control.config_reloads.labels("error").inc()
    errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    log.error("reload refused, old config stays", errors=[str(e) for e in errors])


def source_entries(
    config: Config,
    active: Callable[[IPAddress], int],
    totals: Callable[[IPAddress], Mapping[str, int]],
) -> list[dict[str, object]]:
    """The /sources report: per configured source IP, bindable now (a probe each),
    connections ``active`` through it and its session ``totals`` by result.

    One shape for both process models; they differ only in where the counts live.
    """
    entries: list[dict[str, object]] = []
    for source in config.sorted_sources():
        problem = egress.probe_source(source)
        entries.append(
            {
                "source": str(source),
                "bindable": problem is None,
                "problem": problem,
                "active": active(source),
                "totals": dict(totals(source)),
            }
        )
    return entries


def validate_reload(old: Config, new: Config) -> None:
    """Raise unless ``new`` can replace ``old`` live: TLS kept as it was, certificates load."""
    _check_tls_unchanged(old, new)
    _tls_contexts(new)


def _check_tls_unchanged(old: Config, new: Config) -> None:
    """Adding or removing TLS on a live listener needs a restart.

    Applying it in place would, for a removal, silently turn a TLS listener
    into cleartext SOCKS5 carrying passwords: refuse the whole reload.
    """
    was = {li.listen: li.tls is not None for li in old.listeners}
    for li in new.listeners:
        if li.listen in was and was[li.listen] != (li.tls is not None):
            change = "adds" if li.tls is not None else "removes"
            raise ReloadError(
                f"listeners {li.listen}: the new config {change} TLS; restart to apply"
            )


def _tls_contexts(config: Config) -> dict[str, ssl.SSLContext]:
    return {li.listen: server_context(li.tls) for li in config.listeners if li.tls is not None}
