"""The admin HTTP listener: ``/metrics``, ``/healthz``, ``/readyz``, ``/sources``.

HTTP/1.1 (RFC 9112) is spoken by h11's sans-IO machine, one
:class:`h11.Connection` per client; this module is the thin trio shell around
it plus a four-route table. Per connection::

    accept --(over max_connections)--> close at once
      |
      v
    WAIT_REQUEST --(head + body within REQUEST_TIMEOUT)--> RESPOND --(keep-alive)--+
      ^   |  +--(malformed: 400/431)--> CLOSE                                     |
      |   +--(timeout: 408 if a request had begun, else silence)--> CLOSE          |
      +--(first byte of the next request within KEEPALIVE_TIMEOUT)-----------------+

The admin port faces operators and scrapers, but it must survive a hostile or
broken client: every read and write has a deadline, request bodies are capped,
and the number of concurrent connections is bounded, so a flood on this port
cannot exhaust the process that relays mail.
"""

from __future__ import annotations

import http
import json
from collections.abc import Callable
from dataclasses import dataclass

import h11
import prometheus_client
import structlog
import trio

#: Seconds a whole request (head and body) may take to arrive, counted from
#: accept for the first request and from its first byte for later ones.
#: Generous for any real client; short enough that slow-loris clients do not
#: pin connection slots.
REQUEST_TIMEOUT = 10.0
#: Seconds an idle keep-alive connection waits for its next request. Longer
#: than Prometheus' default 15 s scrape interval would need to be useful;
#: scrapers reconnect cheaply if we close first.
KEEPALIVE_TIMEOUT = 30.0
#: Seconds we may take to write one response (a client that stops reading
#: must not hold a slot forever).
RESPONSE_TIMEOUT = 10.0
#: Seconds, and bytes, we keep reading (and discarding) after our final
#: response on a connection we close, so unread request bytes do not turn our
#: close into a reset that destroys the response in flight (RFC 9112, 9.6).
LINGER_TIMEOUT = 2.0
LINGER_LIMIT = 256 * 1024
#: Concurrent admin connections; beyond this, new ones are closed at once.
MAX_CONNECTIONS = 64
#: Request body bytes read and discarded; no route takes a body, but clients
#: may send one, and reading it keeps the connection usable (else 413).
MAX_BODY = 64 * 1024
#: Request line plus headers (h11's cap; beyond it, 431).
MAX_HEAD = 16 * 1024
#: Bytes asked for per receive.
RECEIVE_SIZE = 16 * 1024

SERVER_NAME = "kumoproxy-admin"
ALLOW = "GET, HEAD"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
#: The paths served; everything else is 404.
ROUTES = frozenset({b"/metrics", b"/healthz", b"/readyz", b"/sources"})


@dataclass(frozen=True, slots=True)
class AdminState:
    """What the admin endpoints report; the service supplies a fresh one per request."""

    ready: bool  # /readyz 200 when True, else 503
    reason: str  # why not ready (e.g. "draining", "starting"); "" when ready
    #: Builds the /sources body (a JSON array). Called only for /sources: it
    #: may probe every source IP, which a frequent /readyz must not pay for.
    sources: Callable[[], list[dict[str, object]]]


#: Called once per /readyz or /sources request.
AdminStateProvider = Callable[[], AdminState]


@dataclass(frozen=True, slots=True)
class Reply:
    """One response: status, content type, full body and any extra headers."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _text(status: int, text: str, *headers: tuple[str, str]) -> Reply:
    return Reply(status, TEXT, text.encode(), headers)


def route(
    method: bytes,
    target: bytes,
    *,
    registry: prometheus_client.CollectorRegistry,
    state: AdminStateProvider,
) -> Reply:
    """Answer one request. HEAD gets GET's reply (the caller drops the body).

    The query string never affects routing. An unknown path is 404 whatever
    the method; a known one with a method other than GET/HEAD is 405.
    """
    path = target.partition(b"?")[0]
    if path not in ROUTES:
        return _text(404, "not found\n")
    if method not in (b"GET", b"HEAD"):
        return _text(405, "method not allowed\n", ("Allow", ALLOW))
    match path:
        case b"/metrics":
            body = prometheus_client.generate_latest(registry)
            return Reply(200, prometheus_client.CONTENT_TYPE_LATEST, body)
        case b"/healthz":
            return _text(200, "ok\n")
        case b"/readyz":
            current = state()
            if current.ready:
                return _text(200, "ready\n")
            return _text(503, f"not ready: {current.reason or 'unknown'}\n")
        case b"/sources":
            return Reply(200, JSON, json.dumps(state().sources()).encode())
        case _:  # pragma: no cover - ROUTES and this match are edited together
            raise AssertionError(f"route {path!r} has no handler")


async def serve_admin(
    listener: trio.SocketListener,
    *,
    registry: prometheus_client.CollectorRegistry,
    state: AdminStateProvider,
    max_connections: int = MAX_CONNECTIONS,
    logger: structlog.typing.FilteringBoundLogger | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoints on ``listener`` until cancelled (the listener is closed then).

    Calls ``task_status.started()`` once accepting. ``registry`` is what
    ``/metrics`` exposes; ``state`` is asked afresh for every ``/readyz`` and
    ``/sources`` request. ``logger`` is a structlog logger (default
    ``kumoproxy.admin``); only unexpected failures are logged, so a misbehaving
    client cannot flood the log.
    """
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}")
    log = logger if logger is not None else structlog.get_logger("kumoproxy.admin")
    active = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= max_connections:
            await trio.aclose_forcefully(stream)
            return
        active += 1
        try:
            await _AdminConnection(stream, registry=registry, state=state, log=log).serve()
        except Exception as exc:
            # Never let one connection's failure reach serve_listeners.
            log.warning("admin connection failed", error=repr(exc), exc_info=True)
        finally:
            active -= 1

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [listener])
        task_status.started()


class _AdminConnection:
    """One client: read requests with h11, answer them, close on any doubt."""

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        registry: prometheus_client.CollectorRegistry,
        state: AdminStateProvider,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._stream = stream
        self._registry = registry
        self._state = state
        self._log = log
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        # Whether any byte of the current request has arrived (a timeout
        # before that closes silently, after it answers 408), and whether we
        # are still in a keep-alive wait running on KEEPALIVE_TIMEOUT.
        self._request_started = False
        self._idle = False
        # Whether the request being answered is HEAD (its replies carry no body).
        self._head = False
        self._linger = False

    async def serve(self) -> None:
        try:
            first = True
            while await self._exchange(first=first):
                self._conn.start_next_cycle()
                first = False
            if self._linger:
                await self._linger_close()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to answer

    async def _exchange(self, *, first: bool) -> bool:
        """Read one request and answer it; True if the connection may carry another."""
        # Pipelined bytes already buffered mean the next request has begun.
        self._request_started = bool(self._conn.trailing_data[0])
        # The first request's deadline counts from accept; later ones wait idle first.
        self._idle = not (first or self._request_started)
        self._head = False
        timeout = KEEPALIVE_TIMEOUT if self._idle else REQUEST_TIMEOUT
        request: h11.Request | None = None
        refusal: Reply | None = None  # answered without routing, then closed
        with trio.move_on_after(timeout) as scope:
            try:
                request = await self._receive_request(scope)
                if request is None:
                    return False
                refusal = await self._receive_body(scope, request)
            except h11.RemoteProtocolError as exc:
                # 400 for garbage, 431 for an oversized head (h11's hint).
                refusal = _text(exc.error_status_hint, "bad request\n")
        if scope.cancelled_caught:
            if not self._request_started:
                return False  # an idle connection just ends
            refusal = _text(408, "request timeout\n")
        if refusal is not None:
            await self._send_final(refusal)
            return False
        assert request is not None
        try:
            reply = route(
                request.method, request.target, registry=self._registry, state=self._state
            )
        except Exception as exc:
            self._log.warning("admin request failed", error=repr(exc), exc_info=True)
            await self._send_final(_text(500, "internal error\n"))
            return False
        await self._send(reply)
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    async def _receive_request(self, scope: trio.CancelScope) -> h11.Request | None:
        """The next request head, or None if the client closed between requests."""
        event = await self._next_event(scope)
        if isinstance(event, h11.Request):
            self._head = event.method == b"HEAD"
            return event
        # Between requests h11 can only report the client's clean close.
        assert isinstance(event, h11.ConnectionClosed), event
        return None

    async def _receive_body(self, scope: trio.CancelScope, request: h11.Request) -> Reply | None:
        """Read and discard the body; a 413 reply if it exceeds MAX_BODY."""
        too_large = _text(413, "request body too large\n")
        for name, value in request.headers:
            if name == b"content-length" and int(value) > MAX_BODY:
                return too_large  # do not read what we would refuse anyway
        if self._conn.they_are_waiting_for_100_continue:
            await self._stream.send_all(
                self._conn.send(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
                or b""
            )
        size = 0
        while True:
            event = await self._next_event(scope)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    return too_large
            elif isinstance(event, h11.EndOfMessage):
                return None
            else:  # pragma: no cover - h11 raises RemoteProtocolError on early close
                raise AssertionError(f"unexpected h11 event in a body: {event!r}")

    async def _next_event(self, scope: trio.CancelScope) -> h11.Event:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._stream.receive_some(RECEIVE_SIZE)
                if data:
                    self._request_started = True
                if data and self._idle:
                    # The idle wait is over; the request now has its own deadline.
                    self._idle = False
                    scope.deadline = trio.current_time() + REQUEST_TIMEOUT
                self._conn.receive_data(data)
                continue
            # PAUSED only follows a finished request, and we never read past one.
            assert event is not h11.PAUSED
            assert isinstance(event, h11.Event)
            return event

    async def _send_final(self, reply: Reply) -> None:
        """Send an error reply (if h11 still allows one) and mark the connection closing."""
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = (*reply.headers, ("Connection", "close"))
        await self._send(Reply(reply.status, reply.content_type, reply.body, headers))

    async def _send(self, reply: Reply) -> None:
        headers = [
            ("Server", SERVER_NAME),
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Cache-Control", "no-store"),
            *reply.headers,
        ]
        reason = http.HTTPStatus(reply.status).phrase.encode()
        wire = self._conn.send(
            h11.Response(status_code=reply.status, headers=headers, reason=reason)
        )
        assert wire is not None
        if not self._head:
            wire += self._conn.send(h11.Data(data=reply.body)) or b""
        wire += self._conn.send(h11.EndOfMessage()) or b""
        if self._conn.our_state is h11.MUST_CLOSE:
            self._linger = True
        with trio.move_on_after(RESPONSE_TIMEOUT) as scope:
            await self._stream.send_all(wire)
        if scope.cancelled_caught:
            self._linger = False
            self._conn.send_failed()

    async def _linger_close(self) -> None:
        """Half-close, then drain what the client still sends, within bounds."""
        with trio.move_on_after(LINGER_TIMEOUT):
            await self._stream.send_eof()
            drained = 0
            while drained < LINGER_LIMIT:
                data = await self._stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                drained += len(data)
