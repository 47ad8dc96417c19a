"""The service: listeners, accept loops, sessions, drain.

Structured concurrency throughout: one nursery holds every session, another
the accept loops. Draining cancels the accept loops (no new sessions), closes
the listening sockets, waits up to ``timeouts.drain`` for the sessions to
finish by themselves, then cancels what is left.
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

from kumoproxy import egress
from kumoproxy.config import Config, IPAddress, ListenerConfig
from kumoproxy.errors import KumoproxyError
from kumoproxy.passwords import PasswordVerifier
from kumoproxy.policy import check_client
from kumoproxy.proxy_session import run_proxy
from kumoproxy.session import Outcome, SessionContext, SessionRecord
from kumoproxy.socks5_session import run_socks5
from kumoproxy.throttle import AuthThrottle
from kumoproxy.tls import server_context

#: accept() errors that mean "out of resources right now", not "listener
#: broken": back off and try again (the reference proxy died here for good).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_INITIAL = 0.01
ACCEPT_BACKOFF_MAX = 1.0

#: Listen backlog: the kernel caps it at net.core.somaxconn anyway.
LISTEN_BACKLOG = 4096

SessionObserver = Callable[[SessionRecord], None]


class ListenError(KumoproxyError, OSError):
    """A configured listener could not be opened (address in use, not ours...)."""


@dataclass(frozen=True, slots=True)
class BoundListener:
    """A configured listener and the address it actually got."""

    config: ListenerConfig
    listener: trio.SocketListener

    @property
    def address(self) -> tuple[IPAddress, int]:
        host, port = self.listener.socket.getsockname()[:2]
        return ipaddress.ip_address(host), port


async def open_listener(config: ListenerConfig) -> BoundListener:
    """Bind one listener; IPv6 listeners are IPv6-only (no surprise dual-stack)."""
    family = socket.AF_INET if config.host.version == 4 else socket.AF_INET6
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((str(config.host), config.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {config.listen}: {exc.strerror}") from exc
    return BoundListener(config, trio.SocketListener(sock))


async def open_listeners(config: Config) -> list[BoundListener]:
    """Bind every configured listener, or none: on failure the open ones are closed."""
    bound: list[BoundListener] = []
    try:
        for listener_config in config.listeners:
            bound.append(await open_listener(listener_config))
    except BaseException:
        for b in bound:
            await b.listener.aclose()
        raise
    return bound


class Service:
    """The running proxy. ``serve`` runs it; ``drain`` asks it to stop."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: egress.Resolver = egress.system_resolver,
        logger: structlog.typing.FilteringBoundLogger | None = None,
        observers: tuple[SessionObserver, ...] = (),
    ) -> None:
        self.config = config
        self.log = logger if logger is not None else structlog.get_logger("kumoproxy")
        self._context = SessionContext(config, resolver, PasswordVerifier(), AuthThrottle())
        # Loaded up front: a bad certificate must stop start-up with one clear
        # line, not fail every client later.
        self._tls_contexts = {
            li.listen: server_context(li.tls) for li in config.listeners if li.tls is not None
        }
        self._observers = observers
        self._drain_requested = trio.Event()
        self._sessions_changed = trio.Event()
        self.active_sessions = 0
        self.draining = False

    def drain(self) -> None:
        """Stop accepting; running sessions get ``timeouts.drain`` to finish."""
        self.draining = True
        self._drain_requested.set()

    async def serve(
        self,
        listeners: list[BoundListener] | None = None,
        *,
        task_status: trio.TaskStatus[list[BoundListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until drained, on ``listeners`` or on freshly opened configured ones.

        ``task_status.started`` receives the bound listeners (tests use port 0).
        The listeners are closed when this returns, however it returns.
        """
        bound: list[BoundListener] = []
        try:
            bound = listeners if listeners is not None else await open_listeners(self.config)
            await self._serve_until_drained(bound, task_status)
        finally:
            # Cancellation (a second signal, a test) must not leak listening sockets.
            with trio.CancelScope(shield=True):
                for b in bound:
                    await b.listener.aclose()
        self.log.info("stopped")

    async def _serve_until_drained(
        self, bound: list[BoundListener], task_status: trio.TaskStatus[list[BoundListener]]
    ) -> None:
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as acceptors:
                for b in bound:
                    acceptors.start_soon(self._accept_loop, b, sessions)
                task_status.started(bound)
                await self._drain_requested.wait()
                acceptors.cancel_scope.cancel()
            for b in bound:  # new connections are now refused by the kernel
                await b.listener.aclose()
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
        while True:
            try:
                stream = await bound.listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                if failures == 0:  # once per burst, not once per attempt
                    self.log.error(
                        "accept failing, backing off",
                        listener=bound.config.listen,
                        error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                    )
                failures += 1
                await trio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            if failures:
                self.log.info("accept recovered", listener=bound.config.listen, failures=failures)
                failures, backoff = 0, ACCEPT_BACKOFF_INITIAL
            sessions.start_soon(self._handle, bound.config, stream)

    async def _handle(self, listener: ListenerConfig, stream: trio.SocketStream) -> None:
        peer_host, peer_port = stream.socket.getpeername()[:2]
        peer = ipaddress.ip_address(peer_host)
        record = SessionRecord(
            session_id=secrets.token_hex(8),
            listener=listener.listen,
            protocol=listener.protocol,
            client=f"[{peer}]:{peer_port}" if peer.version == 6 else f"{peer}:{peer_port}",
            started_at=trio.current_time(),
            client_ip=peer,
        )
        self.active_sessions += 1
        try:
            egress.set_keepalive(stream.socket)
            refusal = check_client(self.config, peer)
            if refusal is not None:
                record.outcome = Outcome.REFUSED
                record.reason = str(refusal.reason)
                record.detail = refusal.detail
            elif listener.protocol == "socks5":
                tls_context = self._tls_contexts.get(listener.listen)
                await run_socks5(self._context, record, stream, tls_context=tls_context)
            else:
                await run_proxy(self._context, record, stream)
        except trio.Cancelled:
            record.detail = "closed at shutdown (drain time over)"
            raise
        except Exception as exc:  # a bug: log it, keep the service up
            record.detail = f"internal error: {exc!r}"
            self.log.exception("session crashed", session_id=record.session_id)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            record.total_seconds = trio.current_time() - record.started_at
            self._log_session(record)
            self.active_sessions -= 1
            self._sessions_changed.set()
            self._sessions_changed = trio.Event()

    def _log_session(self, record: SessionRecord) -> None:
        for observer in self._observers:
            observer(record)
        fields = record.fields()
        if record.outcome in (Outcome.OK, Outcome.HEALTH_CHECK):
            self.log.info("session", **fields)
        else:
            self.log.warning("session", **fields)
