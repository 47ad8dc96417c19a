"""The admin HTTP listener (product.md, "kumoproxy: observability").

Everything runs over real loopback sockets: a raw HTTP/1.1 client for exact
status lines, keep-alive and misbehaviour, and real curl where an operator or
a scraper would use it. Timeouts run on ``autojump_clock`` and assert virtual
time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import prometheus_client
import pytest
import structlog
import trio
import trio.testing

from kumoproxy.admin import (
    KEEPALIVE_TIMEOUT,
    MAX_BODY,
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT,
    AdminState,
    route,
    serve_admin,
)

READY = AdminState(ready=True, reason="", sources=list)
TEXT = "text/plain; charset=utf-8"

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@dataclass
class FakeService:
    """A state provider whose answer the test changes between requests."""

    current: AdminState = READY
    calls: int = 0
    fail: bool = False

    def __call__(self) -> AdminState:
        self.calls += 1
        if self.fail:
            raise RuntimeError("state provider broke")
        return self.current


@dataclass
class Admin:
    port: int
    events: prometheus_client.Counter
    service: FakeService = field(default_factory=FakeService)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


async def start_admin(nursery: trio.Nursery, *, max_connections: int = MAX_CONNECTIONS) -> Admin:
    registry = prometheus_client.CollectorRegistry()
    events = prometheus_client.Counter(
        "admin_test_events", "Events counted by the test.", registry=registry
    )
    service = FakeService()
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    await nursery.start(
        partial(
            serve_admin, listener, registry=registry, state=service, max_connections=max_connections
        )
    )
    return Admin(port, events, service)


@pytest.fixture
async def admin(nursery: trio.Nursery) -> Admin:
    return await start_admin(nursery)


# --- a raw HTTP/1.1 client ---------------------------------------------------


@dataclass
class RawResponse:
    status_line: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ")[1])


@dataclass
class RawClient:
    stream: trio.SocketStream
    buffer: bytes = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def response(self, *, head: bool = False) -> RawResponse:
        """One response; ``head``: it answers a HEAD request (no body follows)."""
        while b"\r\n\r\n" not in self.buffer:
            assert await self._fill(), f"EOF inside a response head: {self.buffer!r}"
        raw_head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        response = RawResponse(status_line, headers, b"")
        if not head and response.status >= 200:
            length = int(headers["content-length"])
            while len(self.buffer) < length:
                assert await self._fill(), "EOF inside a response body"
            response.body, self.buffer = self.buffer[:length], self.buffer[length:]
        return response

    async def rest(self) -> bytes:
        """Everything until the server closes."""
        while await self._fill():
            pass
        rest, self.buffer = self.buffer, b""
        return rest


@asynccontextmanager
async def raw_client(admin: Admin) -> AsyncIterator[RawClient]:
    stream = await trio.open_tcp_stream("127.0.0.1", admin.port)
    async with stream:
        yield RawClient(stream)


def request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: admin.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def fetch(admin: Admin, method: str, target: str, *headers: str) -> RawResponse:
    async with raw_client(admin) as client:
        await client.send(request(method, target, *headers))
        return await client.response(head=method == "HEAD")


def assert_common_headers(response: RawResponse) -> None:
    assert response.headers["server"] == "kumoproxy-admin"
    assert response.headers["cache-control"] == "no-store"
    if "content-length" in response.headers and response.body:
        assert int(response.headers["content-length"]) == len(response.body)


# --- routes --------------------------------------------------------------------


async def test_metrics_exposes_the_injected_registry(admin: Admin) -> None:
    admin.events.inc(3)
    response = await fetch(admin, "GET", "/metrics")
    assert response.status_line == "HTTP/1.1 200 OK"
    assert response.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert b"\nadmin_test_events_total 3.0\n" in response.body
    # Only the injected registry: none of the default registry's collectors.
    assert b"python_info" not in response.body
    assert_common_headers(response)
    admin.events.inc()
    again = await fetch(admin, "GET", "/metrics")
    assert b"\nadmin_test_events_total 4.0\n" in again.body


async def test_healthz_says_ok(admin: Admin) -> None:
    response = await fetch(admin, "GET", "/healthz")
    assert response.status_line == "HTTP/1.1 200 OK"
    assert response.headers["content-type"] == TEXT
    assert response.body == b"ok\n"
    assert_common_headers(response)
    assert admin.service.calls == 0  # liveness never asks the service


async def test_readyz_follows_the_state_provider_on_every_request(admin: Admin) -> None:
    ready = await fetch(admin, "GET", "/readyz")
    assert (ready.status_line, ready.body) == ("HTTP/1.1 200 OK", b"ready\n")
    assert ready.headers["content-type"] == TEXT

    admin.service.current = AdminState(ready=False, reason="draining", sources=list)
    draining = await fetch(admin, "GET", "/readyz")
    assert draining.status_line == "HTTP/1.1 503 Service Unavailable"
    assert draining.body == b"not ready: draining\n"
    assert draining.headers["content-type"] == TEXT
    assert_common_headers(draining)

    admin.service.current = READY
    assert (await fetch(admin, "GET", "/readyz")).status == 200
    assert admin.service.calls == 3


async def test_sources_is_the_services_json(admin: Admin) -> None:
    sources: list[dict[str, object]] = [
        {"source": "192.0.2.10", "bindable": True, "active": 2, "total": 40},
        {"source": "2001:db8::1", "bindable": False, "active": 0, "total": 0},
    ]
    admin.service.current = AdminState(ready=True, reason="", sources=lambda: sources)
    response = await fetch(admin, "GET", "/sources")
    assert response.status_line == "HTTP/1.1 200 OK"
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body) == sources
    assert_common_headers(response)

    admin.service.current = READY
    assert json.loads((await fetch(admin, "GET", "/sources")).body) == []


@pytest.mark.parametrize(
    ("target", "body"),
    [("/healthz?probe=1", b"ok\n"), ("/readyz?verbose&x=%20", b"ready\n")],
)
async def test_query_string_is_ignored_for_routing(admin: Admin, target: str, body: bytes) -> None:
    response = await fetch(admin, "GET", target)
    assert (response.status, response.body) == (200, body)


async def test_metrics_with_query_string_is_still_metrics(admin: Admin) -> None:
    response = await fetch(admin, "GET", "/metrics?x=1")
    assert response.status == 200
    assert b"admin_test_events_total 0.0" in response.body


@pytest.mark.parametrize("target", ["/", "/nope", "/metrics/", "/healthz/x", "/READYZ"])
async def test_unknown_path_is_404(admin: Admin, target: str) -> None:
    response = await fetch(admin, "GET", target)
    assert response.status_line == "HTTP/1.1 404 Not Found"
    assert response.body == b"not found\n"
    assert response.headers["content-type"] == TEXT
    assert_common_headers(response)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_other_methods_are_405_with_allow(admin: Admin, method: str) -> None:
    response = await fetch(admin, method, "/metrics", "Content-Length: 0")
    assert response.status_line == "HTTP/1.1 405 Method Not Allowed"
    assert response.headers["allow"] == "GET, HEAD"
    assert_common_headers(response)


@pytest.mark.parametrize(
    ("target", "content_type"),
    [
        ("/metrics", prometheus_client.CONTENT_TYPE_LATEST),
        ("/healthz", TEXT),
        ("/readyz", TEXT),
        ("/sources", "application/json"),
        ("/nope", TEXT),
    ],
)
async def test_head_sends_the_get_headers_and_no_body(
    admin: Admin, target: str, content_type: str
) -> None:
    async with raw_client(admin) as client:
        await client.send(request("GET", target))
        get = await client.response()
        # The GET right behind the HEAD proves no body bytes followed the HEAD's headers.
        await client.send(request("HEAD", target) + request("GET", "/healthz"))
        head = await client.response(head=True)
        after = await client.response()
    assert head.status_line == get.status_line
    assert head.headers["content-type"] == content_type
    assert head.headers["content-length"] == str(len(get.body))
    assert head.headers["server"] == "kumoproxy-admin"
    assert (after.status, after.body) == (200, b"ok\n")


# --- connection handling -------------------------------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection(admin: Admin) -> None:
    async with raw_client(admin) as client:
        await client.send(request("GET", "/healthz"))
        first = await client.response()
        await client.send(request("GET", "/readyz"))
        second = await client.response()
    assert "connection" not in first.headers
    assert (first.body, second.body) == (b"ok\n", b"ready\n")


async def test_pipelined_requests_are_answered_in_order(admin: Admin) -> None:
    async with raw_client(admin) as client:
        await client.send(
            request("GET", "/readyz")
            + request("HEAD", "/healthz")
            + request("GET", "/nope")
            + request("GET", "/healthz", "Connection: close")
        )
        answers = [
            await client.response(),
            await client.response(head=True),
            await client.response(),
            await client.response(),
        ]
        assert await client.rest() == b""  # closed after the Connection: close one
    assert [(a.status, a.body) for a in answers] == [
        (200, b"ready\n"),
        (200, b""),
        (404, b"not found\n"),
        (200, b"ok\n"),
    ]
    assert answers[-1].headers["connection"] == "close"


async def test_a_small_body_is_discarded_and_the_connection_stays_usable(admin: Admin) -> None:
    async with raw_client(admin) as client:
        await client.send(request("POST", "/metrics", "Content-Length: 11", body=b"hello world"))
        refused = await client.response()
        await client.send(
            request(
                "POST", "/healthz", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"
            )
        )
        chunked = await client.response()
        await client.send(request("GET", "/healthz"))
        ok = await client.response()
    assert (refused.status, chunked.status, ok.status) == (405, 405, 200)


async def test_expect_100_continue_is_honoured(admin: Admin) -> None:
    async with raw_client(admin) as client:
        await client.send(request("POST", "/readyz", "Content-Length: 4", "Expect: 100-continue"))
        interim = await client.response()
        await client.send(b"data")
        final = await client.response()
    assert interim.status_line == "HTTP/1.1 100 Continue"
    assert final.status == 405


async def test_a_declared_body_over_the_cap_is_413_and_closed(admin: Admin) -> None:
    async with raw_client(admin) as client:
        await client.send(request("POST", "/metrics", f"Content-Length: {MAX_BODY + 1}"))
        response = await client.response()
        assert await client.rest() == b""
    # The reason phrase changed in Python 3.13 (RFC 9110 renamed it); the code did not.
    assert response.status_line.startswith("HTTP/1.1 413 ")
    assert response.headers["connection"] == "close"


async def test_a_chunked_body_over_the_cap_is_413_and_closed(admin: Admin) -> None:
    chunk = b"x" * 4096
    # Well past the cap, so unread bytes are still in flight when the server closes.
    body = (b"1000\r\n" + chunk + b"\r\n") * (3 * MAX_BODY // len(chunk))
    async with raw_client(admin) as client:
        await client.send(request("POST", "/metrics", "Transfer-Encoding: chunked", body=body))
        response = await client.response()
        # The server keeps draining while it closes, so the 413 is not lost to a reset.
        assert await client.rest() == b""
    assert response.status == 413


async def test_malformed_request_is_400_and_the_server_keeps_serving(admin: Admin) -> None:
    async with raw_client(admin) as client:
        await client.send(b"THIS IS NOT HTTP\r\n\r\n")
        response = await client.response()
        assert await client.rest() == b""
    assert response.status_line == "HTTP/1.1 400 Bad Request"
    assert response.headers["connection"] == "close"
    assert_common_headers(response)
    assert (await fetch(admin, "GET", "/healthz")).status == 200


async def test_a_request_without_host_is_400(admin: Admin) -> None:
    async with raw_client(admin) as client:
        await client.send(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (await client.response()).status == 400


async def test_an_oversized_request_head_is_431(admin: Admin) -> None:
    async with raw_client(admin) as client:
        await client.send(b"GET /healthz HTTP/1.1\r\nX-Junk: " + b"a" * 20_000)
        response = await client.response()
    assert response.status_line == "HTTP/1.1 431 Request Header Fields Too Large"


async def test_a_failing_state_provider_is_500_and_logged_and_the_server_survives(
    admin: Admin,
) -> None:
    admin.service.fail = True
    with structlog.testing.capture_logs() as logs:
        response = await fetch(admin, "GET", "/readyz")
    assert response.status_line == "HTTP/1.1 500 Internal Server Error"
    assert [(log["event"], log["log_level"]) for log in logs] == [
        ("admin request failed", "warning")
    ]
    admin.service.fail = False
    assert (await fetch(admin, "GET", "/readyz")).status == 200


async def test_serve_admin_rejects_a_cap_below_one() -> None:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        with pytest.raises(ValueError, match="max_connections"):
            await serve_admin(
                listener,
                registry=prometheus_client.CollectorRegistry(),
                state=FakeService(),
                max_connections=0,
            )


# --- deadlines (virtual time) ---------------------------------------------------


async def test_a_slow_request_gets_408_at_request_timeout(
    admin: Admin, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_client(admin) as client:
        start = trio.current_time()
        await client.send(b"GET /metrics HTTP/1.1\r\nHost: admin.test\r\n")  # never finished
        response = await client.response()
        assert await client.rest() == b""
        assert trio.current_time() - start == pytest.approx(REQUEST_TIMEOUT)
    assert response.status_line == "HTTP/1.1 408 Request Timeout"
    assert response.headers["connection"] == "close"


async def test_a_silent_connection_is_closed_at_request_timeout(
    admin: Admin, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_client(admin) as client:
        start = trio.current_time()
        assert await client.rest() == b""  # no 408 for a request that never began
        assert trio.current_time() - start == pytest.approx(REQUEST_TIMEOUT)


async def test_an_idle_keep_alive_connection_is_closed_at_keepalive_timeout(
    admin: Admin, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_client(admin) as client:
        await client.send(request("GET", "/healthz"))
        await client.response()
        answered = trio.current_time()
        assert await client.rest() == b""
        assert trio.current_time() - answered == pytest.approx(KEEPALIVE_TIMEOUT)


async def test_a_later_request_gets_request_timeout_from_its_first_byte(
    admin: Admin, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_client(admin) as client:
        await client.send(request("GET", "/healthz"))
        await client.response()
        await trio.sleep(KEEPALIVE_TIMEOUT - 5)  # idle, but within the keep-alive window
        began = trio.current_time()
        await client.send(b"GET /healthz HTTP/1.1\r\n")
        response = await client.response()
        assert trio.current_time() - began == pytest.approx(REQUEST_TIMEOUT)
    assert response.status == 408


# --- connection cap ---------------------------------------------------------------


async def test_connections_beyond_the_cap_are_closed_at_once(nursery: trio.Nursery) -> None:
    admin = await start_admin(nursery, max_connections=2)
    async with raw_client(admin) as first, raw_client(admin) as second:
        await trio.testing.wait_all_tasks_blocked()  # both accepted and counted
        async with raw_client(admin) as extra:
            # Well inside REQUEST_TIMEOUT, so only the cap can have closed it.
            with trio.fail_after(REQUEST_TIMEOUT / 2):
                assert await extra.rest() == b""
        for client in (first, second):
            await client.send(request("GET", "/healthz"))
            assert (await client.response()).status == 200

        await first.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()  # the server saw the close
        async with raw_client(admin) as late:
            await late.send(request("GET", "/healthz"))
            assert (await late.response()).body == b"ok\n"
        await second.send(request("GET", "/readyz"))
        assert (await second.response()).status == 200


# --- real curl ---------------------------------------------------------------------


async def curl(*args: str) -> str:
    # -q: ignore any ~/.curlrc; --noproxy: never route loopback through an env proxy.
    result = await trio.run_process(
        ["curl", "-q", "-sS", "--noproxy", "*", "--max-time", "5", *args],
        capture_stdout=True,
    )
    return result.stdout.decode()


def split_response(text: str) -> tuple[str, dict[str, str], str]:
    head, _, body = text.partition("\r\n\r\n")
    status_line, *lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return status_line, headers, body


@needs_curl
async def test_curl_scrapes_metrics(admin: Admin) -> None:
    admin.events.inc(7)
    status_line, headers, body = split_response(await curl("-i", admin.url("/metrics")))
    assert status_line == "HTTP/1.1 200 OK"
    assert headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert headers["server"] == "kumoproxy-admin"
    assert headers["cache-control"] == "no-store"
    assert "\nadmin_test_events_total 7.0\n" in body


@needs_curl
async def test_curl_sees_readyz_flip(admin: Admin) -> None:
    assert split_response(await curl("-i", admin.url("/readyz")))[::2] == (
        "HTTP/1.1 200 OK",
        "ready\n",
    )
    admin.service.current = AdminState(ready=False, reason="starting", sources=list)
    assert split_response(await curl("-i", admin.url("/readyz")))[::2] == (
        "HTTP/1.1 503 Service Unavailable",
        "not ready: starting\n",
    )


@needs_curl
async def test_curl_head_and_keep_alive(admin: Admin) -> None:
    status_line, headers, body = split_response(await curl("-I", admin.url("/healthz")))
    assert (status_line, headers["content-length"], body) == ("HTTP/1.1 200 OK", "3", "")
    # Two URLs in one curl run: the second transfer reuses the connection.
    written = await curl(
        "-o", "/dev/null", "-o", "/dev/null",
        "-w", "%{http_code} %{num_connects}\n",
        admin.url("/healthz"), admin.url("/metrics"),
    )  # fmt: skip
    assert written.splitlines() == ["200 1", "200 0"]


def test_readyz_never_builds_the_sources_report() -> None:
    """The report probes every source IP: a frequent readiness probe must not pay for it."""
    built: list[int] = []

    def report() -> list[dict[str, object]]:
        built.append(1)
        return [{"source": "127.0.0.2"}]

    def state() -> AdminState:
        return AdminState(ready=True, reason="", sources=report)

    registry = prometheus_client.CollectorRegistry()
    ready = route(b"GET", b"/readyz", registry=registry, state=state)
    assert (ready.status, built) == (200, [])
    sources = route(b"GET", b"/sources", registry=registry, state=state)
    assert (sources.status, sources.body, built) == (200, b'[{"source": "127.0.0.2"}]', [1])
