"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), sans-IO.

Both roles live here: :class:`Socks5Server` for kumoproxy's listener and
:class:`Socks5Client` for the MTA client library. Neither does any I/O; feed
bytes with ``receive_data`` (``b""`` means EOF), pull events with
``next_event`` (``NEED_DATA`` when a message is incomplete), and turn events
into bytes with ``send``. Bytes that follow the last handshake message (the
relayed SMTP stream) are never consumed: they stay in ``trailing_data``.

KumoMTA's dialect
-----------------
Plain RFC 1928 cannot ask for a source address, so KumoMTA's kumod reuses
BIND: it sends ``BIND <source ip>:0`` ("bind a socket to this local
address"), and after the success reply a ``CONNECT <mx>:<port>`` that
connects the already-bound socket. RFC 1928's own BIND (listen for an inbound
connection, two replies) is not supported. A client may pipeline greeting,
credentials, BIND, CONNECT and the first payload bytes in one segment; they
are parsed strictly in order.

Server states
-------------
::

    AWAIT_GREETING
        | Greeting (received)
        v
    SEND_METHOD --MethodSelection(NO_ACCEPTABLE)----------------------> CLOSED
        |      \\
        |       MethodSelection(USERNAME_PASSWORD)
        |        v
        |      AWAIT_CREDENTIALS
        |        | Credentials (received)
        |        v
        |      SEND_AUTH_RESULT --AuthResult(False)------------------> CLOSED
        |        | AuthResult(True)
        | MethodSelection(NO_AUTH)
        v        v
    AWAIT_REQUEST
        | Request (received: CONNECT, BIND or UDP_ASSOCIATE)
        v
    SEND_REPLY --ReplyEvent(reply != SUCCEEDED)-----------------------> CLOSED
        |   \\
        |    ReplyEvent(SUCCEEDED) to a BIND
        |     v
        |   AWAIT_CONNECT_AFTER_BIND
        |     | Request (received; only CONNECT) --> SEND_REPLY (again)
        |
        | ReplyEvent(SUCCEEDED) to a CONNECT
        v
    ESTABLISHED   (everything further is relay data, see trailing_data)

    Any state --(our misuse: LocalProtocolError,
                 peer violation: RemoteProtocolError)--> ERROR (absorbing)

The client role keeps a queue of the answers it is owed, in the order it
sent the messages that ask for them, so it can pipeline.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, NoReturn, assert_never

from kumoproxy.errors import LocalProtocolError, RemoteProtocolError
from kumoproxy.proto.common import NEED_DATA, BufferedReceiver, NeedData

__all__ = [
    "MAX_CREDENTIALS",
    "MAX_GREETING",
    "MAX_REPLY",
    "MAX_REQUEST",
    "NEED_DATA",
    "UNSPECIFIED_ENDPOINT",
    "AddressType",
    "AuthResult",
    "ClientState",
    "ClientToServer",
    "Command",
    "Credentials",
    "Endpoint",
    "Greeting",
    "Host",
    "Method",
    "MethodSelection",
    "NeedData",
    "Reply",
    "ReplyEvent",
    "Request",
    "ServerState",
    "ServerToClient",
    "Socks5Client",
    "Socks5Server",
]

# ---------------------------------------------------------------------------
# Wire constants
# ---------------------------------------------------------------------------

SOCKS_VERSION: Final = 0x05  # RFC 1928 section 3: VER is X'05'
AUTH_VERSION: Final = 0x01  # RFC 1929 section 2: sub-negotiation VER is X'01'

# Buffer caps. Each is the longest message the format can express; a parser
# that has this many bytes always decides (event or error), so it never waits
# on more than this.
MAX_GREETING: Final = 2 + 255
"""RFC 1928 section 3: VER, NMETHODS, then at most 255 one-byte METHODS."""

MAX_CREDENTIALS: Final = 1 + 1 + 255 + 1 + 255
"""RFC 1929 section 2: VER, ULEN, UNAME (<=255), PLEN, PASSWD (<=255)."""

MAX_REQUEST: Final = 4 + 1 + 255 + 2
"""RFC 1928 section 4: VER CMD RSV ATYP, then the longest DST.ADDR (a domain:
one length byte and up to 255 bytes), then the two-byte DST.PORT."""

MAX_REPLY: Final = 4 + 1 + 255 + 2
"""RFC 1928 section 6: same layout as a request (VER REP RSV ATYP BND.ADDR
BND.PORT)."""

_METHOD_SELECTION_LEN: Final = 2  # RFC 1928 section 3: VER, METHOD
_AUTH_RESULT_LEN: Final = 2  # RFC 1929 section 2: VER, STATUS


class Method(enum.IntEnum):
    """Authentication methods (RFC 1928 section 3)."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """Request commands (RFC 1928 section 4, CMD)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    """Address types (RFC 1928 section 5, ATYP)."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    """Reply codes (RFC 1928 section 6, REP)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


_COMMAND_VALUES: Final = frozenset(int(c) for c in Command)
_ADDRESS_TYPE_VALUES: Final = frozenset(int(a) for a in AddressType)
_REPLY_VALUES: Final = frozenset(int(r) for r in Reply)

# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------

Host = ipaddress.IPv4Address | ipaddress.IPv6Address | str
"""A destination or bound host. ``str`` is a domain name (ATYP X'03')."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host and a port, as DST.ADDR/DST.PORT or BND.ADDR/BND.PORT carry them.

    ``port`` must be 0..65535; that is checked when the endpoint is encoded.
    """

    host: Host
    port: int


UNSPECIFIED_ENDPOINT: Final = Endpoint(ipaddress.IPv4Address(0), 0)
"""``0.0.0.0:0``, the BND of a failure reply (``05 REP 00 01 00000000 0000``)."""


@dataclass(frozen=True, slots=True)
class Greeting:
    """Client to server: the methods offered (RFC 1928 section 3).

    ``methods`` are the raw METHOD bytes in the order sent, duplicates kept.
    """

    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MethodSelection:
    """Server to client: the method chosen (RFC 1928 section 3)."""

    method: Method


@dataclass(frozen=True, slots=True)
class Credentials:
    """Client to server: RFC 1929 username and password, 1..255 bytes each.

    The password is left out of ``repr`` so it never reaches a log line.
    """

    username: bytes
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Server to client: RFC 1929 STATUS (X'00' success, X'01' sent for failure)."""

    success: bool


@dataclass(frozen=True, slots=True)
class Request:
    """Client to server: CMD and DST.ADDR/DST.PORT (RFC 1928 section 4)."""

    command: Command
    destination: Endpoint


@dataclass(frozen=True, slots=True)
class ReplyEvent:
    """Server to client: REP and BND.ADDR/BND.PORT (RFC 1928 section 6).

    ``bound`` defaults to ``0.0.0.0:0``, which is what a failure reply carries.
    """

    reply: Reply
    bound: Endpoint = UNSPECIFIED_ENDPOINT


ClientToServer = Greeting | Credentials | Request
"""Events a client sends and a server receives."""

ServerToClient = MethodSelection | AuthResult | ReplyEvent
"""Events a server sends and a client receives."""

# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _domain_problem(raw: bytes) -> tuple[Reply, str] | None:
    """Why ``raw`` is not an acceptable domain name, or None if it is.

    RFC 1928 section 5 says only "fully-qualified domain name" with a length
    octet. We accept printable ASCII without space (X'21'..X'7E'): raw UTF-8
    (an IDN not converted to its A-label) is an address type we do not
    support; empty names and control bytes are malformed.
    """
    if not raw:
        return Reply.GENERAL_FAILURE, "empty domain name"
    for byte in raw:
        if byte >= 0x80:
            return Reply.ADDRESS_TYPE_NOT_SUPPORTED, (
                f"non-ASCII byte 0x{byte:02x} in domain name (send the IDNA A-label)"
            )
        if not 0x21 <= byte <= 0x7E:
            return Reply.GENERAL_FAILURE, f"non-printable byte 0x{byte:02x} in domain name"
    return None


def _encode_endpoint(endpoint: Endpoint) -> bytes:
    """ATYP, ADDR and PORT (RFC 1928 sections 4, 5 and 6)."""
    port = endpoint.port
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port!r} is not in 0..65535")
    host = endpoint.host
    match host:
        case ipaddress.IPv4Address():
            address = bytes([AddressType.IPV4]) + host.packed
        case ipaddress.IPv6Address():
            address = bytes([AddressType.IPV6]) + host.packed
        case str():
            try:
                raw = host.encode("ascii")
            except UnicodeEncodeError:
                raise LocalProtocolError(
                    f"domain {host!r} is not ASCII (encode it to its IDNA A-label first)"
                ) from None
            problem = _domain_problem(raw)
            if problem is not None:
                raise LocalProtocolError(f"domain {host!r}: {problem[1]}")
            if len(raw) > 255:
                raise LocalProtocolError(f"domain is {len(raw)} bytes; SOCKS5 allows 255")
            address = bytes([AddressType.DOMAIN, len(raw)]) + raw
        case _:
            assert_never(host)
    return address + port.to_bytes(2, "big")


def _encode_reply(event: ReplyEvent) -> bytes:
    """RFC 1928 section 6: VER REP RSV(X'00') ATYP BND.ADDR BND.PORT."""
    return bytes([SOCKS_VERSION, event.reply, 0x00]) + _encode_endpoint(event.bound)


def _failure_answer(reply: Reply) -> bytes:
    """The reply to write before closing: ``05 REP 00 01 00000000 0000``."""
    return _encode_reply(ReplyEvent(reply, UNSPECIFIED_ENDPOINT))


def _encode_method_selection(event: MethodSelection) -> bytes:
    """RFC 1928 section 3: VER METHOD."""
    return bytes([SOCKS_VERSION, event.method])


def _encode_auth_result(event: AuthResult) -> bytes:
    """RFC 1929 section 2: VER STATUS; any non-zero STATUS is failure."""
    return bytes([AUTH_VERSION, 0x00 if event.success else 0x01])


def _encode_greeting(event: Greeting) -> bytes:
    """RFC 1928 section 3: VER NMETHODS METHODS."""
    if not 1 <= len(event.methods) <= 255:
        raise LocalProtocolError(f"a greeting offers 1..255 methods, not {len(event.methods)}")
    for method in event.methods:
        if not 0 <= method <= 0xFF:
            raise LocalProtocolError(f"method {method!r} is not a byte")
    return bytes([SOCKS_VERSION, len(event.methods), *event.methods])


def _encode_credentials(event: Credentials) -> bytes:
    """RFC 1929 section 2: VER ULEN UNAME PLEN PASSWD."""
    for name, value in (("username", event.username), ("password", event.password)):
        if not 1 <= len(value) <= 255:
            raise LocalProtocolError(f"{name} is {len(value)} bytes; RFC 1929 allows 1..255")
    return (
        bytes([AUTH_VERSION, len(event.username)])
        + event.username
        + bytes([len(event.password)])
        + event.password
    )


def _encode_request(event: Request) -> bytes:
    """RFC 1928 section 4: VER CMD RSV(X'00') ATYP DST.ADDR DST.PORT."""
    host = event.destination.host
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        # Our server refuses these (see _parse_endpoint); say so before sending.
        raise LocalProtocolError(f"IPv4-mapped destination {host}; use {host.ipv4_mapped}")
    return bytes([SOCKS_VERSION, event.command, 0x00]) + _encode_endpoint(event.destination)


# ---------------------------------------------------------------------------
# Parsing. Each parser takes the buffer, returns (event, bytes used) or None
# when more bytes are needed, and raises RemoteProtocolError as soon as a bad
# field is present, checking fields in wire order. So the error (and its
# answer) does not depend on how the bytes were split.
# ---------------------------------------------------------------------------

_HTTP_METHODS: Final = (
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
)


def _describe_bad_version(buf: bytes | bytearray) -> str:
    """A message for a greeting whose VER is not 5, naming likely culprits."""
    head = bytes(buf[:8])
    for token in _HTTP_METHODS:
        if head.startswith(token) or token.startswith(head):
            return f"this looks like an HTTP request ({head!r}), not a SOCKS5 greeting"
    if head[0] == 0x04:
        return "SOCKS4 greeting; only SOCKS5 is spoken here"
    return f"greeting VER is 0x{head[0]:02x}, not 0x05"


def _parse_greeting(buf: bytes | bytearray) -> tuple[Greeting, int] | None:
    """RFC 1928 section 3: VER NMETHODS METHODS."""
    if len(buf) < 1:
        return None
    if buf[0] != SOCKS_VERSION:
        # Not SOCKS5: no answer it would understand, so just close.
        raise RemoteProtocolError(_describe_bad_version(buf), answer=b"")
    if len(buf) < 2:
        return None
    nmethods = buf[1]
    if nmethods == 0:
        raise RemoteProtocolError(
            "greeting offers no methods",
            answer=_encode_method_selection(MethodSelection(Method.NO_ACCEPTABLE)),
        )
    end = 2 + nmethods
    if len(buf) < end:
        return None
    assert end <= MAX_GREETING
    return Greeting(tuple(buf[2:end])), end


def _parse_credentials(buf: bytes | bytearray) -> tuple[Credentials, int] | None:
    """RFC 1929 section 2: VER ULEN UNAME PLEN PASSWD."""
    # RFC 1929 section 2: a non-zero STATUS is failure, and we close after it.
    refuse = _encode_auth_result(AuthResult(success=False))
    if len(buf) < 1:
        return None
    if buf[0] != AUTH_VERSION:
        raise RemoteProtocolError(
            f"credentials VER is 0x{buf[0]:02x}, not 0x01 (RFC 1929)", answer=refuse
        )
    if len(buf) < 2:
        return None
    ulen = buf[1]
    if ulen == 0:
        raise RemoteProtocolError("empty username (RFC 1929 ULEN is 1..255)", answer=refuse)
    plen_at = 2 + ulen
    if len(buf) < plen_at + 1:
        return None
    plen = buf[plen_at]
    if plen == 0:
        raise RemoteProtocolError("empty password (RFC 1929 PLEN is 1..255)", answer=refuse)
    end = plen_at + 1 + plen
    if len(buf) < end:
        return None
    assert end <= MAX_CREDENTIALS
    return Credentials(bytes(buf[2:plen_at]), bytes(buf[plen_at + 1 : end])), end


def _parse_endpoint(
    buf: bytes | bytearray,
    start: int,
    *,
    fail: Callable[[Reply, str], RemoteProtocolError],
    reject_mapped: bool,
) -> tuple[Endpoint, int] | None:
    """ATYP ADDR PORT at ``start`` (RFC 1928 section 5); returns the end offset."""
    if len(buf) < start + 1:
        return None
    atyp = buf[start]
    if atyp not in _ADDRESS_TYPE_VALUES:
        raise fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"unknown ATYP 0x{atyp:02x}")
    host: Host
    match AddressType(atyp):
        case AddressType.IPV4:
            port_at = start + 1 + 4
            if len(buf) < port_at:
                return None
            host = ipaddress.IPv4Address(bytes(buf[start + 1 : port_at]))
        case AddressType.IPV6:
            port_at = start + 1 + 16
            if len(buf) < port_at:
                return None
            v6 = ipaddress.IPv6Address(bytes(buf[start + 1 : port_at]))
            if reject_mapped and v6.ipv4_mapped is not None:
                # One address, two spellings: policy keyed on the IPv4 form
                # must not be sidestepped by the mapped one.
                raise fail(
                    Reply.ADDRESS_TYPE_NOT_SUPPORTED,
                    f"IPv4-mapped IPv6 address {v6}; send ATYP 1 instead",
                )
            host = v6
        case AddressType.DOMAIN:
            if len(buf) < start + 2:
                return None
            length = buf[start + 1]
            if length == 0:
                raise fail(Reply.GENERAL_FAILURE, "empty domain name")
            port_at = start + 2 + length
            if len(buf) < port_at:
                return None
            raw = bytes(buf[start + 2 : port_at])
            problem = _domain_problem(raw)
            if problem is not None:
                raise fail(*problem)
            host = raw.decode("ascii")
        case unreachable:
            assert_never(unreachable)
    end = port_at + 2
    if len(buf) < end:
        return None
    return Endpoint(host, int.from_bytes(buf[port_at:end], "big")), end


def _server_fail(reply: Reply, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, answer=_failure_answer(reply))


def _parse_request(buf: bytes | bytearray, *, after_bind: bool) -> tuple[Request, int] | None:
    """RFC 1928 section 4: VER CMD RSV ATYP DST.ADDR DST.PORT."""
    if len(buf) < 1:
        return None
    if buf[0] != SOCKS_VERSION:
        raise _server_fail(Reply.GENERAL_FAILURE, f"request VER is 0x{buf[0]:02x}, not 0x05")
    if len(buf) < 2:
        return None
    cmd = buf[1]
    if cmd not in _COMMAND_VALUES:
        raise _server_fail(Reply.COMMAND_NOT_SUPPORTED, f"unknown CMD 0x{cmd:02x}")
    command = Command(cmd)
    if after_bind and command is not Command.CONNECT:
        # KumoMTA dialect: the BIND only chose the source; a CONNECT must follow.
        raise _server_fail(
            Reply.COMMAND_NOT_SUPPORTED, f"{command.name} after BIND; only CONNECT may follow BIND"
        )
    if len(buf) < 3:
        return None
    if buf[2] != 0x00:
        raise _server_fail(Reply.GENERAL_FAILURE, f"request RSV is 0x{buf[2]:02x}, not 0x00")
    parsed = _parse_endpoint(buf, 3, fail=_server_fail, reject_mapped=True)
    if parsed is None:
        return None
    destination, end = parsed
    assert end <= MAX_REQUEST
    return Request(command, destination), end


def _client_error(message: str) -> RemoteProtocolError:
    # The client never answers a broken server; it just closes.
    return RemoteProtocolError(f"bad answer from SOCKS5 server: {message}", answer=b"")


def _client_endpoint_error(reply: Reply, message: str) -> RemoteProtocolError:
    del reply  # the REP a server would answer with means nothing to a client
    return _client_error(message)


def _parse_method_selection(
    buf: bytes | bytearray, offered: tuple[int, ...]
) -> tuple[MethodSelection, int] | None:
    """RFC 1928 section 3: VER METHOD, METHOD one of those offered or X'FF'."""
    if len(buf) < 1:
        return None
    if buf[0] != SOCKS_VERSION:
        raise _client_error(f"method selection VER is 0x{buf[0]:02x}")
    if len(buf) < _METHOD_SELECTION_LEN:
        return None
    method = buf[1]
    if method != Method.NO_ACCEPTABLE and method not in offered:
        raise _client_error(f"server chose method 0x{method:02x}, not offered")
    return MethodSelection(Method(method)), _METHOD_SELECTION_LEN


def _parse_auth_result(buf: bytes | bytearray) -> tuple[AuthResult, int] | None:
    """RFC 1929 section 2: VER STATUS; X'00' is success, anything else failure."""
    if len(buf) < 1:
        return None
    if buf[0] != AUTH_VERSION:
        raise _client_error(f"auth result VER is 0x{buf[0]:02x}, not 0x01")
    if len(buf) < _AUTH_RESULT_LEN:
        return None
    return AuthResult(success=buf[1] == 0x00), _AUTH_RESULT_LEN


def _parse_reply(buf: bytes | bytearray) -> tuple[ReplyEvent, int] | None:
    """RFC 1928 section 6: VER REP RSV ATYP BND.ADDR BND.PORT."""
    if len(buf) < 1:
        return None
    if buf[0] != SOCKS_VERSION:
        raise _client_error(f"reply VER is 0x{buf[0]:02x}, not 0x05")
    if len(buf) < 2:
        return None
    rep = buf[1]
    if rep not in _REPLY_VALUES:
        raise _client_error(f"unassigned REP 0x{rep:02x}")
    if len(buf) < 3:
        return None
    if buf[2] != 0x00:
        raise _client_error(f"reply RSV is 0x{buf[2]:02x}, not 0x00")
    # A server may legitimately report a dual-stack socket's mapped address.
    parsed = _parse_endpoint(buf, 3, fail=_client_endpoint_error, reject_mapped=False)
    if parsed is None:
        return None
    bound, end = parsed
    assert end <= MAX_REPLY
    return ReplyEvent(Reply(rep), bound), end


# ---------------------------------------------------------------------------
# Server role
# ---------------------------------------------------------------------------


class ServerState(enum.Enum):
    """Where the server side of the handshake is; see the module docstring."""

    AWAIT_GREETING = enum.auto()
    SEND_METHOD = enum.auto()
    AWAIT_CREDENTIALS = enum.auto()
    SEND_AUTH_RESULT = enum.auto()
    AWAIT_REQUEST = enum.auto()
    SEND_REPLY = enum.auto()
    AWAIT_CONNECT_AFTER_BIND = enum.auto()
    ESTABLISHED = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()


class _Input(enum.Enum):
    """What happened to the server machine: a message received or an event sent.

    Sent events are classified by their content, so the table can say where
    each outcome leads.
    """

    GREETING = enum.auto()
    CREDENTIALS = enum.auto()
    REQUEST = enum.auto()
    METHOD_NO_AUTH = enum.auto()
    METHOD_GSSAPI = enum.auto()  # never in the table: we do not implement GSSAPI
    METHOD_USERNAME_PASSWORD = enum.auto()
    METHOD_NO_ACCEPTABLE = enum.auto()
    AUTH_OK = enum.auto()
    AUTH_FAILED = enum.auto()
    REPLY_FAILED = enum.auto()
    REPLY_BIND_OK = enum.auto()
    REPLY_CONNECT_OK = enum.auto()
    REPLY_UDP_ASSOCIATE_OK = enum.auto()  # never in the table: unsupported
    REPLY_OK_WITHOUT_REQUEST = enum.auto()  # never in the table


_S = ServerState
_I = _Input

_SERVER_TRANSITIONS: Final[Mapping[tuple[ServerState, _Input], ServerState]] = {
    (_S.AWAIT_GREETING, _I.GREETING): _S.SEND_METHOD,
    (_S.SEND_METHOD, _I.METHOD_NO_AUTH): _S.AWAIT_REQUEST,
    (_S.SEND_METHOD, _I.METHOD_USERNAME_PASSWORD): _S.AWAIT_CREDENTIALS,
    (_S.SEND_METHOD, _I.METHOD_NO_ACCEPTABLE): _S.CLOSED,
    (_S.AWAIT_CREDENTIALS, _I.CREDENTIALS): _S.SEND_AUTH_RESULT,
    (_S.SEND_AUTH_RESULT, _I.AUTH_OK): _S.AWAIT_REQUEST,
    (_S.SEND_AUTH_RESULT, _I.AUTH_FAILED): _S.CLOSED,
    (_S.AWAIT_REQUEST, _I.REQUEST): _S.SEND_REPLY,
    (_S.AWAIT_CONNECT_AFTER_BIND, _I.REQUEST): _S.SEND_REPLY,
    (_S.SEND_REPLY, _I.REPLY_FAILED): _S.CLOSED,
    (_S.SEND_REPLY, _I.REPLY_BIND_OK): _S.AWAIT_CONNECT_AFTER_BIND,
    (_S.SEND_REPLY, _I.REPLY_CONNECT_OK): _S.ESTABLISHED,
}
"""The server's only transitions. A missing pair is an error (-> ERROR)."""

del _S, _I

# States whose next step is ours to send: next_event has nothing to parse.
_SERVER_SENDING: Final = frozenset(
    {ServerState.SEND_METHOD, ServerState.SEND_AUTH_RESULT, ServerState.SEND_REPLY}
)


class Socks5Server(BufferedReceiver):
    """The server side of a SOCKS5 handshake, in KumoMTA's BIND-then-CONNECT
    dialect or plain CONNECT.

    Feed bytes with :meth:`receive_data`, take :class:`Greeting`,
    :class:`Credentials` and :class:`Request` events from :meth:`next_event`,
    answer each with :meth:`send`. Once :attr:`state` is ``ESTABLISHED`` the
    machine is done: :attr:`trailing_data` holds the first relay bytes.
    """

    def __init__(self) -> None:
        self._state = ServerState.AWAIT_GREETING
        self._buffer = bytearray()
        self._eof = False
        self._offered: tuple[int, ...] = ()
        self._method: Method | None = None
        self._command: Command | None = None

    @property
    def state(self) -> ServerState:
        """The current :class:`ServerState`."""
        return self._state

    @property
    def method(self) -> Method | None:
        """The method we selected with ``send(MethodSelection(...))``, if any."""
        return self._method

    @property
    def trailing_data(self) -> bytes:
        """Bytes received and not parsed yet: once ESTABLISHED, the relay payload."""
        return bytes(self._buffer)

    def _misuse(self, message: str) -> NoReturn:
        self._fail(LocalProtocolError(message))

    def next_event(self) -> Greeting | Credentials | Request | NeedData:
        """Parse the next client message, or return ``NEED_DATA``.

        Returns ``NEED_DATA`` while a message is incomplete, while it is our
        turn to :meth:`send`, and forever once ESTABLISHED or CLOSED.
        Raises RemoteProtocolError (machine -> ERROR) if the client broke
        the protocol, including closing mid-handshake.
        """
        state = self._state
        if state is ServerState.ERROR:
            raise LocalProtocolError("the SOCKS5 server machine is in ERROR")
        if state in _SERVER_SENDING or state in (ServerState.ESTABLISHED, ServerState.CLOSED):
            return NEED_DATA
        try:
            parsed = self._parse(state)
        except RemoteProtocolError as exc:
            self._fail(exc)
        if parsed is None:
            if self._eof:
                what = "truncated" if self._buffer else "closed"
                self._fail(
                    RemoteProtocolError(f"client {what} the connection in {state.name}", answer=b"")
                )
            return NEED_DATA
        event, used = parsed
        del self._buffer[:used]
        match event:
            case Greeting():
                self._offered = event.methods
                self._transition(_Input.GREETING)
            case Credentials():
                self._transition(_Input.CREDENTIALS)
            case Request():
                self._command = event.command
                self._transition(_Input.REQUEST)
            case _:
                assert_never(event)
        return event

    def _parse(self, state: ServerState) -> tuple[Greeting | Credentials | Request, int] | None:
        if state is ServerState.AWAIT_GREETING:
            return _parse_greeting(self._buffer)
        if state is ServerState.AWAIT_CREDENTIALS:
            return _parse_credentials(self._buffer)
        if state is ServerState.AWAIT_REQUEST:
            return _parse_request(self._buffer, after_bind=False)
        if state is ServerState.AWAIT_CONNECT_AFTER_BIND:
            return _parse_request(self._buffer, after_bind=True)
        raise AssertionError(f"no parser for {state}")  # pragma: no cover

    def send(self, event: MethodSelection | AuthResult | ReplyEvent) -> bytes:
        """Encode our answer and advance the state; returns the bytes to write.

        Raises LocalProtocolError (machine -> ERROR) if the answer does not
        fit the state: wrong kind, a method the client did not offer, GSSAPI,
        success to UDP ASSOCIATE, or an unencodable endpoint.
        """
        if self._state is ServerState.ERROR:
            raise LocalProtocolError("the SOCKS5 server machine is in ERROR")
        try:
            data, action = self._encode(event)
            self._transition(action)
        except LocalProtocolError as exc:
            self._fail(exc)
        if isinstance(event, MethodSelection):
            self._method = event.method
        return data

    def _encode(self, event: MethodSelection | AuthResult | ReplyEvent) -> tuple[bytes, _Input]:
        action: _Input
        match event:
            case MethodSelection(method=method):
                match method:
                    case Method.NO_AUTH:
                        action = _Input.METHOD_NO_AUTH
                    case Method.GSSAPI:
                        action = _Input.METHOD_GSSAPI
                    case Method.USERNAME_PASSWORD:
                        action = _Input.METHOD_USERNAME_PASSWORD
                    case Method.NO_ACCEPTABLE:
                        action = _Input.METHOD_NO_ACCEPTABLE
                    case _:
                        assert_never(method)
                self._check_allowed(action)
                # RFC 1928 section 3: the server selects from the methods given.
                if method is not Method.NO_ACCEPTABLE and method not in self._offered:
                    raise LocalProtocolError(
                        f"selecting {method.name}, which the client did not offer"
                    )
                return _encode_method_selection(event), action
            case AuthResult(success=success):
                action = _Input.AUTH_OK if success else _Input.AUTH_FAILED
                return _encode_auth_result(event), action
            case ReplyEvent(reply=reply):
                if reply is not Reply.SUCCEEDED:
                    action = _Input.REPLY_FAILED
                else:
                    match self._command:
                        case Command.CONNECT:
                            action = _Input.REPLY_CONNECT_OK
                        case Command.BIND:
                            action = _Input.REPLY_BIND_OK
                        case Command.UDP_ASSOCIATE:
                            action = _Input.REPLY_UDP_ASSOCIATE_OK
                        case None:
                            action = _Input.REPLY_OK_WITHOUT_REQUEST
                        case _:
                            assert_never(self._command)
                self._check_allowed(action)
                return _encode_reply(event), action
            case _:
                assert_never(event)

    def _check_allowed(self, action: _Input) -> None:
        if (self._state, action) not in _SERVER_TRANSITIONS:
            raise LocalProtocolError(f"cannot {action.name} in state {self._state.name}")

    def _transition(self, action: _Input) -> None:
        self._check_allowed(action)
        self._state = _SERVER_TRANSITIONS[self._state, action]

    def _fail(self, exc: LocalProtocolError | RemoteProtocolError) -> NoReturn:
        self._state = ServerState.ERROR
        raise exc


# ---------------------------------------------------------------------------
# Client role
# ---------------------------------------------------------------------------


class ClientState(enum.Enum):
    """Where the client side is."""

    NEGOTIATING = enum.auto()
    ESTABLISHED = enum.auto()  # success reply to the final request received
    CLOSED = enum.auto()  # the server refused something; it will close
    ERROR = enum.auto()  # absorbing


@dataclass(frozen=True, slots=True)
class _AwaitMethod:
    pass


@dataclass(frozen=True, slots=True)
class _AwaitAuth:
    pass


@dataclass(frozen=True, slots=True)
class _AwaitReply:
    command: Command


_Awaited = _AwaitMethod | _AwaitAuth | _AwaitReply

# The methods this client can carry out after selection.
_CLIENT_METHODS: Final = frozenset({Method.NO_AUTH, Method.USERNAME_PASSWORD})


class Socks5Client(BufferedReceiver):
    """The client side of a SOCKS5 handshake; may pipeline.

    :meth:`send` may be called several times before any answer arrives, e.g.
    greeting, credentials, BIND and CONNECT in one write. It refuses (with
    LocalProtocolError) a pipeline whose meaning depends on an answer not yet
    received: credentials or a request while the method is still open between
    NO_AUTH and USERNAME_PASSWORD. :meth:`next_event` yields the server's
    answers in the order the messages asking for them were sent. After a
    refusal (NO_ACCEPTABLE, failed auth, non-zero REP) the state is CLOSED and
    answers still expected are dropped. Bytes after the final success reply
    stay in :attr:`trailing_data`.
    """

    def __init__(self) -> None:
        self._state = ClientState.NEGOTIATING
        self._buffer = bytearray()
        self._eof = False
        self._awaited: collections.deque[_Awaited] = collections.deque()
        self._offered: tuple[int, ...] | None = None
        self._method: Method | None = None
        self._credentials_sent = False
        self._last_command: Command | None = None

    @property
    def state(self) -> ClientState:
        """The current :class:`ClientState`."""
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes received and not parsed: after the final reply, the server's payload."""
        return bytes(self._buffer)

    def send(self, event: Greeting | Credentials | Request) -> bytes:
        """Encode a message to the server; returns the bytes to write."""
        if self._state is not ClientState.NEGOTIATING:
            self._fail(LocalProtocolError(f"cannot send in state {self._state.name}"))
        try:
            data, awaited = self._encode(event)
        except LocalProtocolError as exc:
            self._fail(exc)
        self._awaited.append(awaited)
        return data

    def _encode(self, event: Greeting | Credentials | Request) -> tuple[bytes, _Awaited]:
        match event:
            case Greeting(methods=methods):
                if self._offered is not None:
                    raise LocalProtocolError("greeting already sent")
                for method in methods:
                    if method not in _CLIENT_METHODS:
                        raise LocalProtocolError(f"this client cannot carry out method {method!r}")
                data = _encode_greeting(event)
                self._offered = methods
                return data, _AwaitMethod()
            case Credentials():
                if self._offered is None or Method.USERNAME_PASSWORD not in self._offered:
                    raise LocalProtocolError("credentials without offering USERNAME_PASSWORD")
                if self._credentials_sent or self._last_command is not None:
                    raise LocalProtocolError("credentials must come once, before any request")
                if self._expected_method() is not Method.USERNAME_PASSWORD:
                    raise LocalProtocolError(
                        "credentials only after USERNAME_PASSWORD was selected, or pipelined "
                        "when it was the only method offered"
                    )
                data = _encode_credentials(event)
                self._credentials_sent = True
                return data, _AwaitAuth()
            case Request(command=command):
                if self._offered is None:
                    raise LocalProtocolError("request before greeting")
                match self._last_command:
                    case None:
                        pass
                    case Command.BIND:
                        # KumoMTA dialect: the BIND is followed by exactly one CONNECT.
                        if command is not Command.CONNECT:
                            raise LocalProtocolError("only CONNECT may follow BIND")
                    case Command.CONNECT | Command.UDP_ASSOCIATE:
                        raise LocalProtocolError(f"no request may follow {self._last_command.name}")
                    case _:
                        assert_never(self._last_command)
                match self._expected_method():
                    case None:
                        raise LocalProtocolError(
                            "request pipelined while the method is undecided; "
                            "offer one method or wait for MethodSelection"
                        )
                    case Method.USERNAME_PASSWORD if not self._credentials_sent:
                        raise LocalProtocolError("request before credentials")
                    case _:
                        pass
                data = _encode_request(event)
                self._last_command = command
                return data, _AwaitReply(command)
            case _:
                assert_never(event)

    def _expected_method(self) -> Method | None:
        """The method in force: selected, or the only one offered; else None."""
        if self._method is not None:
            return self._method
        offered = set(self._offered or ())
        if len(offered) == 1:
            return Method(offered.pop())
        return None

    def _misuse(self, message: str) -> NoReturn:
        self._fail(LocalProtocolError(message))

    def next_event(self) -> MethodSelection | AuthResult | ReplyEvent | NeedData:
        """Parse the next answer owed to us, or return ``NEED_DATA``.

        Raises RemoteProtocolError (machine -> ERROR, empty ``answer``) if the
        server broke the protocol, sent bytes nobody asked for, or closed
        while we were still negotiating.
        """
        if self._state is ClientState.ERROR:
            raise LocalProtocolError("the SOCKS5 client machine is in ERROR")
        if self._state is not ClientState.NEGOTIATING:
            return NEED_DATA
        if not self._awaited:
            if self._buffer:
                self._fail(
                    RemoteProtocolError(
                        f"unsolicited bytes from server: {bytes(self._buffer[:16])!r}"
                    )
                )
            if self._eof:
                self._fail(RemoteProtocolError("server closed the connection during negotiation"))
            return NEED_DATA
        awaited = self._awaited[0]
        try:
            parsed = self._parse(awaited)
        except RemoteProtocolError as exc:
            self._fail(exc)
        if parsed is None:
            if self._eof:
                what = "truncated its answer" if self._buffer else "closed the connection"
                self._fail(RemoteProtocolError(f"server {what} during negotiation"))
            return NEED_DATA
        event, used = parsed
        del self._buffer[:used]
        self._awaited.popleft()
        self._after(event, awaited)
        return event

    def _parse(self, awaited: _Awaited) -> tuple[ServerToClient, int] | None:
        match awaited:
            case _AwaitMethod():
                assert self._offered is not None
                return _parse_method_selection(self._buffer, self._offered)
            case _AwaitAuth():
                return _parse_auth_result(self._buffer)
            case _AwaitReply():
                return _parse_reply(self._buffer)
            case _:
                assert_never(awaited)

    def _after(self, event: ServerToClient, awaited: _Awaited) -> None:
        refused: bool
        match event:
            case MethodSelection(method=method):
                self._method = method
                refused = method is Method.NO_ACCEPTABLE
            case AuthResult(success=success):
                refused = not success
            case ReplyEvent(reply=reply):
                refused = reply is not Reply.SUCCEEDED
                assert isinstance(awaited, _AwaitReply)
                if not refused and awaited.command is not Command.BIND:
                    self._state = ClientState.ESTABLISHED
            case _:
                assert_never(event)
        if refused:
            # The server closes after a refusal; nothing else will be answered.
            self._awaited.clear()
            self._state = ClientState.CLOSED

    def _fail(self, exc: LocalProtocolError | RemoteProtocolError) -> NoReturn:
        self._state = ClientState.ERROR
        raise exc
