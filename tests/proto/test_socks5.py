"""Tests for kumoproxy.proto.socks5: RFC 1928/1929 and KumoMTA's BIND-then-CONNECT."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, assert_never

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumoproxy.errors import LocalProtocolError, RemoteProtocolError
from kumoproxy.proto.socks5 import (
    MAX_CREDENTIALS,
    MAX_GREETING,
    MAX_REPLY,
    MAX_REQUEST,
    NEED_DATA,
    UNSPECIFIED_ENDPOINT,
    AuthResult,
    ClientState,
    ClientToServer,
    Command,
    Credentials,
    Endpoint,
    Greeting,
    Method,
    MethodSelection,
    NeedData,
    Reply,
    ReplyEvent,
    Request,
    ServerState,
    ServerToClient,
    Socks5Client,
    Socks5Server,
)

EXAMPLES = settings(max_examples=200, deadline=None)

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

SOURCE_V4 = IPv4("192.0.2.10")
SOURCE_V6 = IPv6("2001:db8::10")
MX_V4 = IPv4("203.0.113.5")
TRAIL = b"EHLO x\r\n\x00\xff"


def h(text: str) -> bytes:
    """Hex with spaces, as wire.md writes it."""
    return bytes.fromhex(text)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class Machine(Protocol):
    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...

    @property
    def trailing_data(self) -> bytes: ...


def drain(machine: Machine) -> list[object]:
    """All events available now (stops at NEED_DATA)."""
    events: list[object] = []
    while not isinstance(event := machine.next_event(), NeedData):
        events.append(event)
    return events


def feed_pulling(machine: Machine, data: bytes, *, bytewise: bool) -> None:
    """Feed ``data`` whole or one byte at a time, pulling an event after each feed."""
    for chunk in [bytes([b]) for b in data] if bytewise else [data]:
        machine.receive_data(chunk)
        machine.next_event()


def default_answer(server: Socks5Server, event: object) -> bytes:
    """A permissive proxy: picks USERNAME_PASSWORD when offered, accepts all."""
    match event:
        case Greeting(methods=methods):
            if Method.USERNAME_PASSWORD in methods:
                return server.send(MethodSelection(Method.USERNAME_PASSWORD))
            if Method.NO_AUTH in methods:
                return server.send(MethodSelection(Method.NO_AUTH))
            return server.send(MethodSelection(Method.NO_ACCEPTABLE))
        case Credentials():
            return server.send(AuthResult(success=True))
        case Request(command=Command.UDP_ASSOCIATE):
            return server.send(ReplyEvent(Reply.COMMAND_NOT_SUPPORTED))
        case Request(command=Command.BIND, destination=destination):
            return server.send(ReplyEvent(Reply.SUCCEEDED, Endpoint(destination.host, 40000)))
        case Request():
            return server.send(ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 50000)))
        case _:
            raise AssertionError(f"unexpected {event!r}")


def run_server(
    chunks: list[bytes],
    answer: Callable[[Socks5Server, object], bytes] = default_answer,
) -> tuple[Socks5Server, list[object], bytes]:
    """Feed chunks in order, answering each event; returns events and output."""
    server = Socks5Server()
    events: list[object] = []
    out = b""
    for chunk in chunks:
        server.receive_data(chunk)
        while not isinstance(event := server.next_event(), NeedData):
            events.append(event)
            out += answer(server, event)
    return server, events, out


def split(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` (modulo its length); no empty chunk, as b"" is EOF."""
    cuts = sorted({p % (len(data) + 1) for p in points})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if a < b]


GREETING_NO_AUTH = h("05 01 00")
GREETING_WITH_AUTH = h("05 02 00 02")
CREDS_USER_PASS = h("01 04") + b"user" + h("04") + b"pass"
BIND_V4 = h("05 02 00 01 c0 00 02 0a 00 00")
BIND_V6 = h("05 02 00 04 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 10 00 00")
CONNECT_V4 = h("05 01 00 01 cb 00 71 05 00 19")
CONNECT_DOMAIN = h("05 01 00 03 0a") + b"mx.example" + h("00 19")


def server_in(state: ServerState) -> Socks5Server:
    """A server driven into ``state`` through its public API."""
    server = Socks5Server()
    if state is ServerState.AWAIT_GREETING:
        return server
    if state is ServerState.ERROR:
        server.receive_data(b"\x04")
        with pytest.raises(RemoteProtocolError):
            server.next_event()
        return server
    server.receive_data(GREETING_WITH_AUTH)
    assert server.next_event() == Greeting((0, 2))
    if state is ServerState.SEND_METHOD:
        return server
    if state is ServerState.CLOSED:
        server.send(MethodSelection(Method.NO_ACCEPTABLE))
        return server
    server.send(MethodSelection(Method.USERNAME_PASSWORD))
    if state is ServerState.AWAIT_CREDENTIALS:
        return server
    server.receive_data(CREDS_USER_PASS)
    assert isinstance(server.next_event(), Credentials)
    if state is ServerState.SEND_AUTH_RESULT:
        return server
    server.send(AuthResult(success=True))
    if state is ServerState.AWAIT_REQUEST:
        return server
    if state is ServerState.SEND_REPLY:
        server.receive_data(CONNECT_V4)
        assert isinstance(server.next_event(), Request)
        return server
    server.receive_data(BIND_V4)
    assert isinstance(server.next_event(), Request)
    server.send(ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 0)))
    if state is ServerState.AWAIT_CONNECT_AFTER_BIND:
        return server
    server.receive_data(CONNECT_V4)
    assert isinstance(server.next_event(), Request)
    server.send(ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 50000)))
    assert state is ServerState.ESTABLISHED
    return server


def test_server_in_reaches_every_state() -> None:
    for state in ServerState:
        assert server_in(state).state is state


def client_awaiting(what: str) -> Socks5Client:
    """A client whose next owed answer is a method selection, auth result or reply."""
    client = Socks5Client()
    client.send(Greeting((Method.USERNAME_PASSWORD,)))
    if what == "method":
        return client
    client.send(Credentials(b"user", b"pass"))
    client.receive_data(h("05 02"))
    assert client.next_event() == MethodSelection(Method.USERNAME_PASSWORD)
    if what == "auth":
        return client
    client.send(Request(Command.BIND, Endpoint(SOURCE_V4, 0)))
    client.receive_data(h("01 00"))
    assert client.next_event() == AuthResult(success=True)
    assert what == "reply"
    return client


# ---------------------------------------------------------------------------
# Every parser: whole, one byte at a time, with trailing bytes, random splits
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseCase:
    name: str
    make: Callable[[], Machine]
    data: bytes
    expected: object


PARSE_CASES = [
    ParseCase(
        "greeting no auth",
        lambda: server_in(ServerState.AWAIT_GREETING),
        GREETING_NO_AUTH,
        Greeting((0,)),
    ),
    ParseCase(
        "greeting with auth",
        lambda: server_in(ServerState.AWAIT_GREETING),
        GREETING_WITH_AUTH,
        Greeting((0, 2)),
    ),
    ParseCase(
        "greeting keeps unknown and duplicate methods in order",
        lambda: server_in(ServerState.AWAIT_GREETING),
        h("05 04 80 02 02 01"),
        Greeting((0x80, 2, 2, 1)),
    ),
    ParseCase(
        "credentials",
        lambda: server_in(ServerState.AWAIT_CREDENTIALS),
        CREDS_USER_PASS,
        Credentials(b"user", b"pass"),
    ),
    ParseCase(
        "bind ipv4",
        lambda: server_in(ServerState.AWAIT_REQUEST),
        BIND_V4,
        Request(Command.BIND, Endpoint(SOURCE_V4, 0)),
    ),
    ParseCase(
        "bind ipv6",
        lambda: server_in(ServerState.AWAIT_REQUEST),
        BIND_V6,
        Request(Command.BIND, Endpoint(SOURCE_V6, 0)),
    ),
    ParseCase(
        "connect domain",
        lambda: server_in(ServerState.AWAIT_REQUEST),
        CONNECT_DOMAIN,
        Request(Command.CONNECT, Endpoint("mx.example", 25)),
    ),
    ParseCase(
        "connect after bind",
        lambda: server_in(ServerState.AWAIT_CONNECT_AFTER_BIND),
        CONNECT_V4,
        Request(Command.CONNECT, Endpoint(MX_V4, 25)),
    ),
    ParseCase(
        "udp associate",
        lambda: server_in(ServerState.AWAIT_REQUEST),
        h("05 03 00 01 00 00 00 00 00 00"),
        Request(Command.UDP_ASSOCIATE, Endpoint(IPv4(0), 0)),
    ),
    ParseCase(
        "method selection",
        lambda: client_awaiting("method"),
        h("05 02"),
        MethodSelection(Method.USERNAME_PASSWORD),
    ),
    ParseCase(
        "auth result ok",
        lambda: client_awaiting("auth"),
        h("01 00"),
        AuthResult(success=True),
    ),
    ParseCase(
        "reply ipv4",
        lambda: client_awaiting("reply"),
        h("05 00 00 01 c0 00 02 0a 9c 40"),
        ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 40000)),
    ),
    ParseCase(
        "reply ipv6",
        lambda: client_awaiting("reply"),
        h("05 00 00 04 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 10 9c 40"),
        ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V6, 40000)),
    ),
    ParseCase(
        "reply domain",
        lambda: client_awaiting("reply"),
        h("05 00 00 03 05") + b"proxy" + h("04 38"),
        ReplyEvent(Reply.SUCCEEDED, Endpoint("proxy", 1080)),
    ),
]
PARSE_IDS = [case.name for case in PARSE_CASES]


@pytest.mark.parametrize("case", PARSE_CASES, ids=PARSE_IDS)
def test_parser_accepts_message_fed_whole(case: ParseCase) -> None:
    machine = case.make()
    machine.receive_data(case.data)
    assert machine.next_event() == case.expected
    assert machine.trailing_data == b""


@pytest.mark.parametrize("case", PARSE_CASES, ids=PARSE_IDS)
def test_parser_waits_until_last_byte_when_fed_one_byte_at_a_time(case: ParseCase) -> None:
    machine = case.make()
    for byte in case.data[:-1]:
        machine.receive_data(bytes([byte]))
        assert machine.next_event() is NEED_DATA
    machine.receive_data(case.data[-1:])
    assert machine.next_event() == case.expected
    assert machine.trailing_data == b""


@pytest.mark.parametrize("case", PARSE_CASES, ids=PARSE_IDS)
def test_parser_leaves_trailing_bytes_untouched(case: ParseCase) -> None:
    machine = case.make()
    machine.receive_data(case.data + TRAIL)
    assert machine.next_event() == case.expected
    assert machine.trailing_data == TRAIL


@pytest.mark.parametrize("case", PARSE_CASES, ids=PARSE_IDS)
@EXAMPLES
@given(points=st.lists(st.integers(min_value=0, max_value=1000), max_size=8))
def test_parser_result_does_not_depend_on_split_points(case: ParseCase, points: list[int]) -> None:
    machine = case.make()
    events: list[object] = []
    for chunk in split(case.data + TRAIL, points):
        machine.receive_data(chunk)
        if not events:  # pulling again would parse TRAIL as the next message
            event = machine.next_event()
            if not isinstance(event, NeedData):
                events.append(event)
    assert events == [case.expected]
    assert machine.trailing_data == TRAIL


# ---------------------------------------------------------------------------
# KumoMTA byte sequences (wire.md section 1), both roles
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "encoded"),
    [
        (Method.NO_AUTH, h("05 00")),
        (Method.USERNAME_PASSWORD, h("05 02")),
        (Method.NO_ACCEPTABLE, h("05 ff")),
    ],
)
def test_server_encodes_method_selection_as_kumomta_expects(method: Method, encoded: bytes) -> None:
    server = server_in(ServerState.SEND_METHOD)
    assert server.send(MethodSelection(method)) == encoded
    assert server.method is method


@pytest.mark.parametrize(
    ("success", "encoded", "state"),
    [(True, h("01 00"), ServerState.AWAIT_REQUEST), (False, h("01 01"), ServerState.CLOSED)],
)
def test_server_encodes_auth_result_and_closes_on_refusal(
    success: bool, encoded: bytes, state: ServerState
) -> None:
    server = server_in(ServerState.SEND_AUTH_RESULT)
    assert server.send(AuthResult(success)) == encoded
    assert server.state is state


@pytest.mark.parametrize("reply", [r for r in Reply if r is not Reply.SUCCEEDED])
def test_failure_reply_is_zero_ipv4_endpoint_and_closes(reply: Reply) -> None:
    server = server_in(ServerState.SEND_REPLY)
    assert server.send(ReplyEvent(reply)) == bytes([5, reply]) + h("00 01 00 00 00 00 00 00")
    assert server.state is ServerState.CLOSED


BIND_OK_V4 = h("05 00 00 01 c0 00 02 0a 9c 40")
CONNECT_OK_V4 = h("05 00 00 01 c0 00 02 0a c3 50")
V6_PREFIX = "20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00"
BIND_OK_V6 = h(f"05 00 00 04 {V6_PREFIX} 10 9c 40")
CONNECT_MX_V6 = h(f"05 01 00 04 {V6_PREFIX} 25 00 19")
CONNECT_OK_V6 = h(f"05 00 00 04 {V6_PREFIX} 10 c3 50")

# wire.md section 1, one step at a time: (bytes, the event they carry). The
# event's type says who speaks.
KUMOMTA_NO_AUTH: list[tuple[bytes, ClientToServer | ServerToClient]] = [
    (h("05 01 00"), Greeting((0,))),
    (h("05 00"), MethodSelection(Method.NO_AUTH)),
    (BIND_V4, Request(Command.BIND, Endpoint(SOURCE_V4, 0))),
    (BIND_OK_V4, ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 40000))),
    (CONNECT_V4, Request(Command.CONNECT, Endpoint(MX_V4, 25))),
    (CONNECT_OK_V4, ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 50000))),
]
KUMOMTA_AUTH_V6: list[tuple[bytes, ClientToServer | ServerToClient]] = [
    (h("05 02 00 02"), Greeting((0, 2))),
    (h("05 02"), MethodSelection(Method.USERNAME_PASSWORD)),
    (CREDS_USER_PASS, Credentials(b"user", b"pass")),
    (h("01 00"), AuthResult(success=True)),
    (BIND_V6, Request(Command.BIND, Endpoint(SOURCE_V6, 0))),
    (BIND_OK_V6, ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V6, 40000))),
    (CONNECT_MX_V6, Request(Command.CONNECT, Endpoint(IPv6("2001:db8::25"), 25))),
    (CONNECT_OK_V6, ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V6, 50000))),
]


@pytest.mark.parametrize("steps", [KUMOMTA_NO_AUTH, KUMOMTA_AUTH_V6], ids=["no-auth", "auth-v6"])
def test_kumomta_session_step_by_step_matches_wire_bytes_in_both_roles(
    steps: list[tuple[bytes, ClientToServer | ServerToClient]],
) -> None:
    server, client = Socks5Server(), Socks5Client()
    for data, event in steps:
        match event:
            case Greeting() | Credentials() | Request():
                assert client.send(event) == data
                server.receive_data(data)
                assert server.next_event() == event
            case MethodSelection() | AuthResult() | ReplyEvent():
                assert server.send(event) == data
                client.receive_data(data)
                assert client.next_event() == event
            case _:
                assert_never(event)
    assert server.state is ServerState.ESTABLISHED
    assert client.state is ClientState.ESTABLISHED
    server.receive_data(b"QUIT\r\n")
    client.receive_data(b"220 mx ESMTP\r\n")
    assert server.next_event() is NEED_DATA
    assert client.next_event() is NEED_DATA
    assert server.trailing_data == b"QUIT\r\n"
    assert client.trailing_data == b"220 mx ESMTP\r\n"


PIPELINE = GREETING_WITH_AUTH + CREDS_USER_PASS + BIND_V4 + CONNECT_V4 + b"EHLO x\r\n"
PIPELINE_EVENTS = [
    Greeting((0, 2)),
    Credentials(b"user", b"pass"),
    Request(Command.BIND, Endpoint(SOURCE_V4, 0)),
    Request(Command.CONNECT, Endpoint(MX_V4, 25)),
]
PIPELINE_ANSWERS = h("05 02  01 00  05 00 00 01 c0 00 02 0a 9c 40  05 00 00 01 c0 00 02 0a c3 50")


def test_server_parses_pipelined_greeting_auth_bind_connect_in_order_and_keeps_payload() -> None:
    server, events, out = run_server([PIPELINE])
    assert events == PIPELINE_EVENTS
    assert out == PIPELINE_ANSWERS
    assert server.state is ServerState.ESTABLISHED
    assert server.trailing_data == b"EHLO x\r\n"


@EXAMPLES
@given(points=st.lists(st.integers(min_value=0, max_value=len(PIPELINE)), max_size=12))
def test_server_pipeline_result_does_not_depend_on_split_points(points: list[int]) -> None:
    server, events, out = run_server(split(PIPELINE, points))
    assert events == PIPELINE_EVENTS
    assert out == PIPELINE_ANSWERS
    assert server.trailing_data == b"EHLO x\r\n"


def test_server_holds_pipelined_bytes_while_it_owes_an_answer() -> None:
    server = Socks5Server()
    server.receive_data(PIPELINE)
    assert server.next_event() == Greeting((0, 2))
    assert server.next_event() is NEED_DATA  # SEND_METHOD: our turn
    assert server.next_event() is NEED_DATA
    assert server.trailing_data == PIPELINE[4:]
    server.send(MethodSelection(Method.USERNAME_PASSWORD))
    assert server.next_event() == Credentials(b"user", b"pass")


def test_client_pipelines_greeting_auth_bind_connect_in_one_write() -> None:
    client = Socks5Client()
    pipeline: list[ClientToServer] = [
        Greeting((Method.USERNAME_PASSWORD,)),
        Credentials(b"user", b"pass"),
        Request(Command.BIND, Endpoint(SOURCE_V4, 0)),
        Request(Command.CONNECT, Endpoint(MX_V4, 25)),
    ]
    wire = b"".join(client.send(event) for event in pipeline)
    assert wire == h("05 01 02") + CREDS_USER_PASS + BIND_V4 + CONNECT_V4
    client.receive_data(h("05 02") + PIPELINE_ANSWERS[2:] + b"220 mx ESMTP\r\n")
    assert drain(client) == [
        MethodSelection(Method.USERNAME_PASSWORD),
        AuthResult(success=True),
        ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 40000)),
        ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 50000)),
    ]
    assert client.state is ClientState.ESTABLISHED
    assert client.trailing_data == b"220 mx ESMTP\r\n"


def test_pipelined_client_and_server_talk_to_each_other() -> None:
    client = Socks5Client()
    wire = (
        client.send(Greeting((Method.NO_AUTH,)))
        + client.send(Request(Command.BIND, Endpoint(SOURCE_V4, 0)))
        + client.send(Request(Command.CONNECT, Endpoint("mx.example", 25)))
    )
    server, _, out = run_server([wire + b"EHLO x\r\n"])
    assert server.state is ServerState.ESTABLISHED
    client.receive_data(out + b"220 hi\r\n")
    assert [type(e) for e in drain(client)] == [MethodSelection, ReplyEvent, ReplyEvent]
    assert client.state is ClientState.ESTABLISHED
    assert (server.trailing_data, client.trailing_data) == (b"EHLO x\r\n", b"220 hi\r\n")


# ---------------------------------------------------------------------------
# Round trips over generated endpoints and credentials
# ---------------------------------------------------------------------------


def not_ipv4_mapped(address: IPv4 | IPv6) -> bool:
    return not (isinstance(address, IPv6) and address.ipv4_mapped is not None)


domains = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255
)
hosts = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(v=6).filter(not_ipv4_mapped),
    domains,
)
ports = st.integers(min_value=0, max_value=0xFFFF)
endpoints = st.builds(Endpoint, hosts, ports)
# A server may report a dual-stack socket's IPv4-mapped address as BND.ADDR.
bound_endpoints = endpoints | st.builds(Endpoint, st.ip_addresses(v=6), ports)
secrets = st.binary(min_size=1, max_size=255)


@EXAMPLES
@given(command=st.sampled_from(Command), destination=endpoints)
def test_request_round_trips_client_to_server(command: Command, destination: Endpoint) -> None:
    client = Socks5Client()
    wire = client.send(Greeting((Method.NO_AUTH,))) + client.send(Request(command, destination))
    _, events, _ = run_server([wire])
    assert events == [Greeting((Method.NO_AUTH,)), Request(command, destination)]


@EXAMPLES
@given(reply=st.sampled_from(Reply), bound=bound_endpoints)
def test_reply_round_trips_server_to_client(reply: Reply, bound: Endpoint) -> None:
    client = client_awaiting("reply")
    server = server_in(ServerState.SEND_REPLY)
    client.receive_data(server.send(ReplyEvent(reply, bound)))
    assert client.next_event() == ReplyEvent(reply, bound)


@EXAMPLES
@given(username=secrets, password=secrets)
def test_credentials_round_trip_client_to_server(username: bytes, password: bytes) -> None:
    client = Socks5Client()
    wire = client.send(Greeting((Method.USERNAME_PASSWORD,)))
    wire += client.send(Credentials(username, password))
    _, events, _ = run_server([wire])
    assert events == [Greeting((Method.USERNAME_PASSWORD,)), Credentials(username, password)]


@EXAMPLES
@given(
    methods=st.lists(
        st.sampled_from([Method.NO_AUTH, Method.USERNAME_PASSWORD]), min_size=1, max_size=255
    )
)
def test_greeting_round_trips_client_to_server(methods: list[Method]) -> None:
    client = Socks5Client()
    _, events, _ = run_server([client.send(Greeting(tuple(methods)))])
    assert events[0] == Greeting(tuple(methods))


@EXAMPLES
@given(methods=st.lists(st.integers(min_value=0, max_value=255), min_size=1, max_size=255))
def test_server_parses_any_raw_method_bytes_in_greeting(methods: list[int]) -> None:
    server = Socks5Server()
    server.receive_data(bytes([5, len(methods), *methods]))
    assert server.next_event() == Greeting(tuple(methods))


@pytest.mark.parametrize(
    "event",
    [
        MethodSelection(Method.NO_AUTH),
        MethodSelection(Method.USERNAME_PASSWORD),
        MethodSelection(Method.NO_ACCEPTABLE),
    ],
)
def test_method_selection_round_trips_server_to_client(event: MethodSelection) -> None:
    server = server_in(ServerState.SEND_METHOD)
    client = Socks5Client()
    client.send(Greeting((Method.NO_AUTH, Method.USERNAME_PASSWORD)))
    client.receive_data(server.send(event))
    assert client.next_event() == event


@pytest.mark.parametrize("event", [AuthResult(success=True), AuthResult(success=False)])
def test_auth_result_round_trips_server_to_client(event: AuthResult) -> None:
    server = server_in(ServerState.SEND_AUTH_RESULT)
    client = client_awaiting("auth")
    client.receive_data(server.send(event))
    assert client.next_event() == event


# ---------------------------------------------------------------------------
# Random bytes: the server only ever raises RemoteProtocolError
# ---------------------------------------------------------------------------

PREFIXES = [
    b"",
    GREETING_NO_AUTH,
    GREETING_WITH_AUTH,
    GREETING_WITH_AUTH + CREDS_USER_PASS,
    GREETING_NO_AUTH + BIND_V4,
    GREETING_NO_AUTH + h("05 03 00"),
]


@EXAMPLES
@given(
    prefix=st.sampled_from(PREFIXES),
    chunks=st.lists(st.binary(max_size=300), max_size=4),
    eof=st.booleans(),
)
def test_random_bytes_into_server_only_raise_remote_protocol_error(
    prefix: bytes, chunks: list[bytes], eof: bool
) -> None:
    # Anything but RemoteProtocolError escapes and fails the test.
    try:
        server, _, _ = run_server([prefix, *chunks, *([b""] if eof else [])])
    except RemoteProtocolError:
        return
    assert server.state is not ServerState.ERROR


@EXAMPLES
@given(data=st.binary(max_size=600), eof=st.booleans())
def test_random_bytes_into_pipelined_client_only_raise_remote_protocol_error(
    data: bytes, eof: bool
) -> None:
    client = Socks5Client()
    client.send(Greeting((Method.USERNAME_PASSWORD,)))
    client.send(Credentials(b"u", b"p"))
    client.send(Request(Command.BIND, Endpoint(SOURCE_V4, 0)))
    client.send(Request(Command.CONNECT, Endpoint(MX_V4, 25)))
    client.receive_data(data)
    if eof:
        client.receive_data(b"")
    error: RemoteProtocolError | None = None
    try:
        drain(client)
    except RemoteProtocolError as exc:
        error = exc
    if error is not None:
        assert error.answer == b""
        assert client.state is ClientState.ERROR


AWAIT_PARSERS = [
    (ServerState.AWAIT_GREETING, MAX_GREETING),
    (ServerState.AWAIT_CREDENTIALS, MAX_CREDENTIALS),
    (ServerState.AWAIT_REQUEST, MAX_REQUEST),
    (ServerState.AWAIT_CONNECT_AFTER_BIND, MAX_REQUEST),
]


@pytest.mark.parametrize(("state", "cap"), AWAIT_PARSERS, ids=lambda x: str(x))
@EXAMPLES
@given(data=st.binary(min_size=MAX_CREDENTIALS, max_size=MAX_CREDENTIALS + 8))
def test_server_decides_within_its_buffer_cap(state: ServerState, cap: int, data: bytes) -> None:
    server = server_in(state)
    server.receive_data(data[:cap])
    try:
        event = server.next_event()
    except RemoteProtocolError:
        return
    assert event is not NEED_DATA


def test_buffer_caps_are_the_longest_valid_messages() -> None:
    _, events, _ = run_server([bytes([5, 255, *range(255)])])
    assert len(events) == 1
    assert MAX_GREETING == 2 + 255
    client = Socks5Client()
    client.send(Greeting((Method.USERNAME_PASSWORD,)))
    assert len(client.send(Credentials(b"u" * 255, b"p" * 255))) == MAX_CREDENTIALS
    longest = Endpoint("d" * 255, 65535)
    assert len(client.send(Request(Command.CONNECT, longest))) == MAX_REQUEST
    assert len(server_in(ServerState.SEND_REPLY).send(ReplyEvent(Reply.SUCCEEDED, longest))) == (
        MAX_REPLY
    )


# ---------------------------------------------------------------------------
# The transition table: every (state, event) pair transitions or raises
# ---------------------------------------------------------------------------

SEND_EVENTS: dict[str, MethodSelection | AuthResult | ReplyEvent] = {
    "method-no-auth": MethodSelection(Method.NO_AUTH),
    "method-gssapi": MethodSelection(Method.GSSAPI),
    "method-username-password": MethodSelection(Method.USERNAME_PASSWORD),
    "method-no-acceptable": MethodSelection(Method.NO_ACCEPTABLE),
    "auth-ok": AuthResult(success=True),
    "auth-failed": AuthResult(success=False),
    "reply-succeeded": ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 1)),
    "reply-failed": ReplyEvent(Reply.HOST_UNREACHABLE),
}
# SEND_METHOD is reached after a greeting offering 00 and 02 (so GSSAPI was not
# offered); SEND_REPLY after a CONNECT; ESTABLISHED after BIND then CONNECT.
EXPECTED_SEND: dict[tuple[ServerState, str], ServerState] = {
    (ServerState.SEND_METHOD, "method-no-auth"): ServerState.AWAIT_REQUEST,
    (ServerState.SEND_METHOD, "method-username-password"): ServerState.AWAIT_CREDENTIALS,
    (ServerState.SEND_METHOD, "method-no-acceptable"): ServerState.CLOSED,
    (ServerState.SEND_AUTH_RESULT, "auth-ok"): ServerState.AWAIT_REQUEST,
    (ServerState.SEND_AUTH_RESULT, "auth-failed"): ServerState.CLOSED,
    (ServerState.SEND_REPLY, "reply-succeeded"): ServerState.ESTABLISHED,
    (ServerState.SEND_REPLY, "reply-failed"): ServerState.CLOSED,
}


@pytest.mark.parametrize("state", list(ServerState), ids=lambda s: s.name)
@pytest.mark.parametrize("kind", list(SEND_EVENTS))
def test_every_state_and_send_event_either_transitions_or_raises_into_error(
    state: ServerState, kind: str
) -> None:
    server = server_in(state)
    target = EXPECTED_SEND.get((state, kind))
    if target is None:
        with pytest.raises(LocalProtocolError):
            server.send(SEND_EVENTS[kind])
        assert server.state is ServerState.ERROR
    else:
        assert server.send(SEND_EVENTS[kind])
        assert server.state is target


RECEIVED = {
    ServerState.AWAIT_GREETING: (GREETING_NO_AUTH, ServerState.SEND_METHOD),
    ServerState.AWAIT_CREDENTIALS: (CREDS_USER_PASS, ServerState.SEND_AUTH_RESULT),
    ServerState.AWAIT_REQUEST: (CONNECT_V4, ServerState.SEND_REPLY),
    ServerState.AWAIT_CONNECT_AFTER_BIND: (CONNECT_V4, ServerState.SEND_REPLY),
}


@pytest.mark.parametrize("state", list(ServerState), ids=lambda s: s.name)
def test_every_state_either_parses_its_message_holds_bytes_or_raises(state: ServerState) -> None:
    server = server_in(state)
    if state is ServerState.ERROR:
        with pytest.raises(LocalProtocolError):
            server.next_event()
        return
    if state in RECEIVED:
        data, target = RECEIVED[state]
        server.receive_data(data)
        assert server.next_event() is not NEED_DATA
        assert server.state is target
        return
    # SEND_* (our turn), ESTABLISHED and CLOSED parse nothing and lose nothing.
    server.receive_data(CONNECT_V4)
    assert server.next_event() is NEED_DATA
    assert server.state is state
    assert server.trailing_data == CONNECT_V4


def test_error_state_is_absorbing() -> None:
    server = server_in(ServerState.ERROR)
    for event in SEND_EVENTS.values():
        with pytest.raises(LocalProtocolError):
            server.send(event)
    with pytest.raises(LocalProtocolError):
        server.next_event()
    assert server.state is ServerState.ERROR


def test_selecting_a_method_the_client_did_not_offer_is_local_error() -> None:
    server = Socks5Server()
    server.receive_data(GREETING_NO_AUTH)
    server.next_event()
    with pytest.raises(LocalProtocolError, match="did not offer"):
        server.send(MethodSelection(Method.USERNAME_PASSWORD))
    assert server.state is ServerState.ERROR


def test_selecting_gssapi_is_local_error_even_when_offered() -> None:
    server = Socks5Server()
    server.receive_data(h("05 01 01"))
    assert server.next_event() == Greeting((Method.GSSAPI,))
    with pytest.raises(LocalProtocolError):
        server.send(MethodSelection(Method.GSSAPI))
    assert server.state is ServerState.ERROR


def test_no_acceptable_may_be_sent_whatever_was_offered() -> None:
    server = Socks5Server()
    server.receive_data(h("05 01 01"))
    server.next_event()
    assert server.send(MethodSelection(Method.NO_ACCEPTABLE)) == h("05 ff")
    assert server.state is ServerState.CLOSED
    assert server.method is Method.NO_ACCEPTABLE


def test_udp_associate_gets_command_not_supported_and_success_is_local_error() -> None:
    server = server_in(ServerState.AWAIT_REQUEST)
    server.receive_data(h("05 03 00 01 00 00 00 00 00 00"))
    assert server.next_event() == Request(Command.UDP_ASSOCIATE, Endpoint(IPv4(0), 0))
    assert server.send(ReplyEvent(Reply.COMMAND_NOT_SUPPORTED)) == h(
        "05 07 00 01 00 00 00 00 00 00"
    )
    assert server.state is ServerState.CLOSED

    server = server_in(ServerState.AWAIT_REQUEST)
    server.receive_data(h("05 03 00 01 00 00 00 00 00 00"))
    server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(ReplyEvent(Reply.SUCCEEDED))
    assert server.state is ServerState.ERROR


def test_bind_success_awaits_connect_and_bind_failure_closes() -> None:
    server = server_in(ServerState.AWAIT_REQUEST)
    server.receive_data(BIND_V4)
    server.next_event()
    server.send(ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 0)))
    assert server.state is ServerState.AWAIT_CONNECT_AFTER_BIND

    server = server_in(ServerState.AWAIT_REQUEST)
    server.receive_data(BIND_V4)
    server.next_event()
    assert server.send(ReplyEvent(Reply.NOT_ALLOWED)) == h("05 02 00 01 00 00 00 00 00 00")
    assert server.state is ServerState.CLOSED


def test_plain_connect_without_bind_establishes() -> None:
    server = server_in(ServerState.AWAIT_REQUEST)
    server.receive_data(CONNECT_DOMAIN)
    assert server.next_event() == Request(Command.CONNECT, Endpoint("mx.example", 25))
    server.send(ReplyEvent(Reply.SUCCEEDED, Endpoint(SOURCE_V4, 50000)))
    assert server.state is ServerState.ESTABLISHED


# ---------------------------------------------------------------------------
# Validation: each violation answers as stated, however the bytes are split
# ---------------------------------------------------------------------------

COMMAND_NOT_SUPPORTED = h("05 07 00 01 00 00 00 00 00 00")
GENERAL_FAILURE = h("05 01 00 01 00 00 00 00 00 00")
ADDR_NOT_SUPPORTED = h("05 08 00 01 00 00 00 00 00 00")


@dataclass(frozen=True)
class Violation:
    name: str
    state: ServerState
    data: bytes
    answer: bytes
    match: str


GREETING = ServerState.AWAIT_GREETING
CREDS = ServerState.AWAIT_CREDENTIALS
REQUEST = ServerState.AWAIT_REQUEST
AFTER_BIND = ServerState.AWAIT_CONNECT_AFTER_BIND
MAPPED_MX = "00 00 00 00 00 00 00 00 00 00 ff ff cb 00 71 05"

VIOLATIONS = [
    Violation("socks4", GREETING, h("04 01 00 19 7f 00 00 01 00"), b"", "SOCKS4"),
    Violation("http get", GREETING, b"GET / HTTP/1.1\r\n\r\n", b"", "HTTP"),
    Violation("http connect", GREETING, b"CONNECT mx:25 HTTP/1.1\r\n", b"", "HTTP"),
    Violation("tls", GREETING, h("16 03 01 00 05"), b"", "0x16"),
    Violation("no methods", GREETING, h("05 00"), h("05 ff"), "no methods"),
    Violation("creds ver", CREDS, h("05 01 75 01 70"), h("01 01"), "VER"),
    Violation("empty user", CREDS, h("01 00 01 70"), h("01 01"), "username"),
    Violation("empty pass", CREDS, h("01 01 75 00"), h("01 01"), "password"),
    Violation("req ver", REQUEST, h("04 01 00 01 7f 00 00 01 00 19"), GENERAL_FAILURE, "VER"),
    Violation("req rsv", REQUEST, h("05 01 01 01 7f 00 00 01 00 19"), GENERAL_FAILURE, "RSV"),
    Violation("cmd 0", REQUEST, h("05 00 00 01 7f 00 00 01 00 19"), COMMAND_NOT_SUPPORTED, "CMD"),
    Violation("cmd 9", REQUEST, h("05 09 00 01 7f 00 00 01 00 19"), COMMAND_NOT_SUPPORTED, "CMD"),
    Violation("atyp 2", REQUEST, h("05 01 00 02 7f 00 00 01 00 19"), ADDR_NOT_SUPPORTED, "ATYP"),
    Violation("atyp 5", REQUEST, h("05 01 00 05 7f 00 00 01 00 19"), ADDR_NOT_SUPPORTED, "ATYP"),
    Violation("empty domain", REQUEST, h("05 01 00 03 00 00 19"), GENERAL_FAILURE, "empty"),
    Violation("space", REQUEST, h("05 01 00 03 03 61 20 62 00 19"), GENERAL_FAILURE, "printable"),
    Violation("nul", REQUEST, h("05 01 00 03 01 00 00 19"), GENERAL_FAILURE, "printable"),
    Violation("del", REQUEST, h("05 01 00 03 01 7f 00 19"), GENERAL_FAILURE, "printable"),
    Violation(
        "utf-8 domain",
        REQUEST,
        h("05 01 00 03 07") + "bücher".encode() + h("00 19"),
        ADDR_NOT_SUPPORTED,
        "non-ASCII",
    ),
    Violation("mapped", REQUEST, h(f"05 01 00 04 {MAPPED_MX} 00 19"), ADDR_NOT_SUPPORTED, "mapped"),
    Violation("bind after bind", AFTER_BIND, BIND_V4, COMMAND_NOT_SUPPORTED, "only CONNECT"),
    Violation(
        "udp after bind",
        AFTER_BIND,
        h("05 03 00 01 00 00 00 00 00 00"),
        COMMAND_NOT_SUPPORTED,
        "only CONNECT",
    ),
    Violation(
        "ver after bind", AFTER_BIND, h("04 01 00 01 7f 00 00 01 00 19"), GENERAL_FAILURE, "VER"
    ),
]


@pytest.mark.parametrize("violation", VIOLATIONS, ids=[v.name for v in VIOLATIONS])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_server_violation_raises_remote_error_with_stated_answer(
    violation: Violation, bytewise: bool
) -> None:
    server = server_in(violation.state)
    with pytest.raises(RemoteProtocolError, match=violation.match) as info:
        feed_pulling(server, violation.data, bytewise=bytewise)
    assert info.value.answer == violation.answer
    assert server.state is ServerState.ERROR


# ---------------------------------------------------------------------------
# EOF
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "partial"),
    [
        (ServerState.AWAIT_GREETING, b""),
        (ServerState.AWAIT_GREETING, h("05 02 00")),
        (ServerState.AWAIT_CREDENTIALS, h("01 04 75 73")),
        (ServerState.AWAIT_REQUEST, b""),
        (ServerState.AWAIT_REQUEST, CONNECT_V4[:-1]),
        (ServerState.AWAIT_CONNECT_AFTER_BIND, b""),  # a BIND not followed by CONNECT
        (ServerState.AWAIT_CONNECT_AFTER_BIND, CONNECT_V4[:5]),
    ],
)
def test_server_eof_before_or_inside_a_message_raises_remote_error(
    state: ServerState, partial: bytes
) -> None:
    server = server_in(state)
    server.receive_data(partial)
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated" if partial else "closed") as info:
        server.next_event()
    assert info.value.answer == b""
    assert server.state is ServerState.ERROR


def test_server_eof_while_owing_an_answer_raises_once_answered() -> None:
    server = Socks5Server()
    server.receive_data(GREETING_NO_AUTH)
    server.receive_data(b"")
    assert server.next_event() == Greeting((0,))
    assert server.next_event() is NEED_DATA
    server.send(MethodSelection(Method.NO_AUTH))
    with pytest.raises(RemoteProtocolError, match="closed"):
        server.next_event()


def test_server_eof_and_data_when_established_are_relay_business() -> None:
    server = server_in(ServerState.ESTABLISHED)
    server.receive_data(b"DATA\r\n")
    server.receive_data(b"")
    for _ in range(3):
        assert server.next_event() is NEED_DATA
    assert server.trailing_data == b"DATA\r\n"
    assert server.state is ServerState.ESTABLISHED


def test_data_after_eof_is_local_error() -> None:
    server = Socks5Server()
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"\x05")
    client = Socks5Client()
    client.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"\x05")


# ---------------------------------------------------------------------------
# Encoders refuse what the format cannot carry
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bound",
    [
        Endpoint(SOURCE_V4, -1),
        Endpoint(SOURCE_V4, 65536),
        Endpoint("", 25),
        Endpoint("d" * 256, 25),
        Endpoint("bücher.example", 25),
        Endpoint("a b", 25),
    ],
)
def test_server_refuses_to_encode_unencodable_bound_endpoint(bound: Endpoint) -> None:
    server = server_in(ServerState.SEND_REPLY)
    with pytest.raises(LocalProtocolError):
        server.send(ReplyEvent(Reply.SUCCEEDED, bound))
    assert server.state is ServerState.ERROR


@pytest.mark.parametrize(
    "destination",
    [
        Endpoint(MX_V4, 70000),
        Endpoint("bücher.example", 25),
        Endpoint(IPv6("::ffff:203.0.113.5"), 25),
    ],
)
def test_client_refuses_to_encode_unencodable_destination(destination: Endpoint) -> None:
    client = Socks5Client()
    client.send(Greeting((Method.NO_AUTH,)))
    with pytest.raises(LocalProtocolError):
        client.send(Request(Command.CONNECT, destination))
    assert client.state is ClientState.ERROR


@pytest.mark.parametrize(
    ("username", "password"), [(b"", b"p"), (b"u", b""), (b"u" * 256, b"p"), (b"u", b"p" * 256)]
)
def test_client_refuses_credentials_outside_1_to_255_bytes(
    username: bytes, password: bytes
) -> None:
    client = Socks5Client()
    client.send(Greeting((Method.USERNAME_PASSWORD,)))
    with pytest.raises(LocalProtocolError, match=r"1\.\.255"):
        client.send(Credentials(username, password))


# ---------------------------------------------------------------------------
# Client role
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "last"),
    [
        (h("05 ff"), MethodSelection(Method.NO_ACCEPTABLE)),
        (h("05 02 01 01"), AuthResult(success=False)),
        (h("05 02 01 ff"), AuthResult(success=False)),
        (h("05 02 01 00 05 02 00 01 00 00 00 00 00 00"), ReplyEvent(Reply.NOT_ALLOWED)),
    ],
    ids=["no-acceptable", "auth-refused", "auth-status-ff", "bind-refused"],
)
def test_client_closes_after_refusal_and_drops_pipelined_expectations(
    answers: bytes, last: object
) -> None:
    client = Socks5Client()
    client.send(Greeting((Method.USERNAME_PASSWORD,)))
    client.send(Credentials(b"u", b"p"))
    client.send(Request(Command.BIND, Endpoint(SOURCE_V4, 0)))
    client.send(Request(Command.CONNECT, Endpoint(MX_V4, 25)))
    client.receive_data(answers + b"junk")
    assert drain(client)[-1] == last
    assert client.state is ClientState.CLOSED
    assert client.next_event() is NEED_DATA
    assert client.trailing_data == b"junk"
    with pytest.raises(LocalProtocolError):
        client.send(Request(Command.CONNECT, Endpoint(MX_V4, 25)))


@pytest.mark.parametrize(
    ("awaiting", "data"),
    [
        ("method", h("04 02")),
        ("method", h("05 00")),  # not offered: the client offered only 02
        ("method", h("05 01")),
        ("auth", h("05 00")),
        ("reply", h("04 00 00 01 00 00 00 00 00 00")),
        ("reply", h("05 09 00 01 00 00 00 00 00 00")),
        ("reply", h("05 00 01 01 00 00 00 00 00 00")),
        ("reply", h("05 00 00 02 00 00 00 00 00 00")),
        ("reply", h("05 00 00 03 00 00 00")),
        ("reply", h("05 00 00 03 01 80 00 00")),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_client_rejects_bad_answers_with_empty_answer(
    awaiting: str, data: bytes, bytewise: bool
) -> None:
    client = client_awaiting(awaiting)
    with pytest.raises(RemoteProtocolError) as info:
        feed_pulling(client, data, bytewise=bytewise)
    assert info.value.answer == b""
    assert client.state is ClientState.ERROR


def test_client_eof_inside_an_owed_answer_raises() -> None:
    client = client_awaiting("reply")
    client.receive_data(h("05 00 00 01 c0"))
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        client.next_event()


def test_client_eof_while_negotiating_with_nothing_owed_raises() -> None:
    client = Socks5Client()
    client.send(Greeting((Method.NO_AUTH,)))
    client.receive_data(h("05 00"))
    assert client.next_event() == MethodSelection(Method.NO_AUTH)
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed"):
        client.next_event()


def test_client_rejects_unsolicited_bytes() -> None:
    client = Socks5Client()
    client.send(Greeting((Method.NO_AUTH,)))
    client.receive_data(h("05 00 05 00"))
    assert client.next_event() == MethodSelection(Method.NO_AUTH)
    with pytest.raises(RemoteProtocolError, match="unsolicited"):
        client.next_event()


def test_client_eof_after_established_is_relay_business() -> None:
    client = Socks5Client()
    client.send(Greeting((Method.NO_AUTH,)))
    client.send(Request(Command.CONNECT, Endpoint(MX_V4, 25)))
    client.receive_data(h("05 00 05 00 00 01 c0 00 02 0a c3 50") + b"220")
    client.receive_data(b"")
    assert len(drain(client)) == 2
    assert client.next_event() is NEED_DATA
    assert client.trailing_data == b"220"


def _greet(*methods: Method) -> Socks5Client:
    client = Socks5Client()
    client.send(Greeting(methods))
    return client


CONNECT_MX = Request(Command.CONNECT, Endpoint(MX_V4, 25))
BIND_SRC = Request(Command.BIND, Endpoint(SOURCE_V4, 0))


@pytest.mark.parametrize(
    ("make", "event"),
    [
        (Socks5Client, CONNECT_MX),
        (Socks5Client, Credentials(b"u", b"p")),
        (lambda: _greet(Method.NO_AUTH), Greeting((Method.NO_AUTH,))),
        (lambda: _greet(Method.NO_AUTH), Credentials(b"u", b"p")),
        # Method undecided between 00 and 02: what follows would be ambiguous.
        (lambda: _greet(Method.NO_AUTH, Method.USERNAME_PASSWORD), Credentials(b"u", b"p")),
        (lambda: _greet(Method.NO_AUTH, Method.USERNAME_PASSWORD), CONNECT_MX),
        (lambda: _greet(Method.USERNAME_PASSWORD), CONNECT_MX),
        (Socks5Client, Greeting((Method.GSSAPI,))),
        (Socks5Client, Greeting(())),
    ],
    ids=[
        "request-before-greeting",
        "credentials-before-greeting",
        "second-greeting",
        "credentials-not-offered",
        "credentials-method-undecided",
        "request-method-undecided",
        "request-before-credentials",
        "gssapi-offer",
        "empty-offer",
    ],
)
def test_client_refuses_sends_out_of_order_or_ambiguous(
    make: Callable[[], Socks5Client], event: Greeting | Credentials | Request
) -> None:
    client = make()
    with pytest.raises(LocalProtocolError):
        client.send(event)
    assert client.state is ClientState.ERROR


@pytest.mark.parametrize(
    ("first", "second"),
    [(BIND_SRC, BIND_SRC), (CONNECT_MX, CONNECT_MX), (CONNECT_MX, BIND_SRC)],
)
def test_client_allows_only_connect_after_bind_and_nothing_after_connect(
    first: Request, second: Request
) -> None:
    client = _greet(Method.NO_AUTH)
    client.send(first)
    with pytest.raises(LocalProtocolError):
        client.send(second)


def test_client_sends_credentials_after_method_selected_from_two_offers() -> None:
    client = _greet(Method.NO_AUTH, Method.USERNAME_PASSWORD)
    client.receive_data(h("05 02"))
    assert client.next_event() == MethodSelection(Method.USERNAME_PASSWORD)
    assert client.send(Credentials(b"user", b"pass")) == CREDS_USER_PASS


def test_client_sends_request_without_credentials_when_no_auth_selected() -> None:
    client = _greet(Method.NO_AUTH, Method.USERNAME_PASSWORD)
    client.receive_data(h("05 00"))
    client.next_event()
    assert client.send(CONNECT_MX) == CONNECT_V4
    with pytest.raises(LocalProtocolError):
        client.send(Credentials(b"u", b"p"))


# ---------------------------------------------------------------------------
# Small contracts
# ---------------------------------------------------------------------------


def test_need_data_is_a_singleton() -> None:
    assert NeedData() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"


def test_credentials_repr_hides_password() -> None:
    assert "hunter2" not in repr(Credentials(b"user", b"hunter2"))


def test_failure_reply_default_bound_is_unspecified_ipv4() -> None:
    assert ReplyEvent(Reply.GENERAL_FAILURE).bound == UNSPECIFIED_ENDPOINT
    assert Endpoint(IPv4("0.0.0.0"), 0) == UNSPECIFIED_ENDPOINT
