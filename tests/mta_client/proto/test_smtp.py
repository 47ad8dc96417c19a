"""Tests for mta_client.proto.smtp: the sans-IO SMTP client (RFC 5321 and friends)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta_client.errors import (
    ConnectionLostError,
    LocalProtocolError,
    PermanentSmtpError,
    RemoteProtocolError,
    SmtpReply,
    TransientSmtpError,
)
from mta_client.proto.message import prepare_data
from mta_client.proto.smtp import (
    DATA_BLOCK_TIMEOUT,
    MAX_ADDRESS_PATH,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    NEED_DATA,
    REPLY_TIMEOUTS,
    RFC_REPLY_LINE,
    Capabilities,
    ClientCommand,
    ClientState,
    Command,
    Data,
    Ehlo,
    Helo,
    MailFrom,
    MessageContent,
    NeedData,
    Noop,
    Quit,
    RcptTo,
    Rset,
    ServerReply,
    SmtpClient,
    StartTls,
    UnsendableCommandError,
)

EXAMPLES = settings(max_examples=200, deadline=None)
TRAIL = b"250 not yet asked for\r\n\x00\xff"

GREETING = b"220 mx.example.com ESMTP Postfix\r\n"

POSTFIX_EHLO = (
    b"250-mx.example.com\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-VRFY\r\n"
    b"250-ETRN\r\n"
    b"250-STARTTLS\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n"
    b"250-DSN\r\n"
    b"250-SMTPUTF8\r\n"
    b"250 CHUNKING\r\n"
)

GMAIL_EHLO = (
    b"250-mx.google.com at your service, [203.0.113.5]\r\n"
    b"250-SIZE 157286400\r\n"
    b"250-8BITMIME\r\n"
    b"250-STARTTLS\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-PIPELINING\r\n"
    b"250-CHUNKING\r\n"
    b"250 SMTPUTF8\r\n"
)

PLAIN_EHLO = b"250-old.example.net Hello\r\n250 HELP\r\n"  # nothing we use

MESSAGE = prepare_data(b"Subject: hi\n\n.hello\n")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def drain(client: SmtpClient) -> list[ServerReply]:
    """All replies available now (stops at NEED_DATA)."""
    events: list[ServerReply] = []
    while not isinstance(event := client.next_event(), NeedData):
        events.append(event)
    return events


def answer(client: SmtpClient, data: bytes) -> list[ServerReply]:
    client.receive_data(data)
    return drain(client)


def one(client: SmtpClient, data: bytes) -> ServerReply:
    events = answer(client, data)
    assert len(events) == 1
    return events[0]


def first_reply(client: SmtpClient, data: bytes) -> ServerReply:
    """The first reply to ``data``, without asking for more (which may raise after a 421)."""
    client.receive_data(data)
    event = client.next_event()
    assert isinstance(event, ServerReply)
    return event


def greeted() -> SmtpClient:
    client = SmtpClient()
    one(client, GREETING)
    assert_state(client, ClientState.GREETED)
    return client


def ready(ehlo: bytes = POSTFIX_EHLO) -> SmtpClient:
    client = greeted()
    client.send(Ehlo("client.example.org"))
    one(client, ehlo)
    assert_state(client, ClientState.READY)
    return client


def assert_state(client: SmtpClient, expected: ClientState) -> None:
    # A function, not an inline assert: mypy would keep ``client.state``
    # narrowed to the first asserted state across the sends that change it.
    assert client.state is expected


def split(data: bytes, points: list[int]) -> Iterator[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    start = 0
    for cut in [*cuts, len(data)]:
        if cut > start:
            yield data[start:cut]
            start = cut


def codes(events: list[ServerReply]) -> list[tuple[Command, int]]:
    return [(event.command, event.reply.code) for event in events]


# ---------------------------------------------------------------------------
# Reply parsing: whole, byte by byte, with trailing bytes, random splits
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseCase:
    name: str
    data: bytes
    expected: SmtpReply


LONGEST_LINE = b"250 " + b"x" * (MAX_REPLY_LINE - 6) + b"\r\n"
MOST_LINES = b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 x\r\n"

PARSE_CASES = [
    ParseCase(
        "single line", b"220 mx.example.com ESMTP\r\n", SmtpReply(220, ("mx.example.com ESMTP",))
    ),
    ParseCase(
        "multi-line",
        b"250-first\r\n250-second\r\n250 last\r\n",
        SmtpReply(250, ("first", "second", "last")),
    ),
    ParseCase("bare code line", b"250\r\n", SmtpReply(250, ("",))),
    ParseCase("empty continuation text", b"250-\r\n250 ok\r\n", SmtpReply(250, ("", "ok"))),
    ParseCase(
        "enhanced code",
        b"250 2.1.0 Sender OK\r\n",
        SmtpReply(250, ("Sender OK",), "2.1.0"),
    ),
    ParseCase(
        "enhanced code on a multi-line reply",
        b"250-2.1.0 Sender OK\r\n250 2.1.0 really\r\n",
        SmtpReply(250, ("Sender OK", "really"), "2.1.0"),
    ),
    ParseCase(
        "recipient rejected",
        b"550 5.1.1 <x@example.com>: Recipient address rejected\r\n",
        SmtpReply(550, ("<x@example.com>: Recipient address rejected",), "5.1.1"),
    ),
    ParseCase(
        "gmail multi-line rejection",
        b"550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
        b"550-5.1.1 double-checking the recipient's email address for typos or\r\n"
        b"550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser a1si\r\n",
        SmtpReply(
            550,
            (
                "The email account that you tried to reach does not exist. Please try",
                "double-checking the recipient's email address for typos or",
                "unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser a1si",
            ),
            "5.1.1",
        ),
    ),
    ParseCase("enhanced code alone", b"452 4.5.3\r\n", SmtpReply(452, ("",), "4.5.3")),
    ParseCase(
        "enhanced class must match the reply class",
        b"250 5.1.1 odd\r\n",
        SmtpReply(250, ("5.1.1 odd",)),
    ),
    ParseCase(
        "enhanced code with leading zero is text",
        b"250 2.01.0 x\r\n",
        SmtpReply(250, ("2.01.0 x",)),
    ),
    ParseCase(
        "enhanced code must be followed by a space",
        b"250 2.1.0ok\r\n",
        SmtpReply(250, ("2.1.0ok",)),
    ),
    ParseCase("utf-8 text", "250 Grüße\r\n".encode(), SmtpReply(250, ("Grüße",))),
    ParseCase("non-utf-8 text kept as escapes", b"250 a\xffb\r\n", SmtpReply(250, ("a\\xffb",))),
    ParseCase("tab in text", b"250 a\tb\r\n", SmtpReply(250, ("a\tb",))),
    ParseCase("longest line", LONGEST_LINE, SmtpReply(250, ("x" * (MAX_REPLY_LINE - 6),))),
    ParseCase("most lines", MOST_LINES, SmtpReply(250, ("x",) * MAX_REPLY_LINES)),
]
PARSE_IDS = [case.name for case in PARSE_CASES]


@pytest.mark.parametrize("case", PARSE_CASES, ids=PARSE_IDS)
def test_reply_parses_when_fed_whole(case: ParseCase) -> None:
    client = SmtpClient()
    client.receive_data(case.data)
    assert client.next_event() == ServerReply(Command.GREETING, case.expected)
    assert client.trailing_data == b""


@pytest.mark.parametrize("case", PARSE_CASES, ids=PARSE_IDS)
def test_reply_waits_until_last_byte_when_fed_one_byte_at_a_time(case: ParseCase) -> None:
    client = SmtpClient()
    for byte in case.data[:-1]:
        client.receive_data(bytes([byte]))
        assert client.next_event() is NEED_DATA
    client.receive_data(case.data[-1:])
    assert client.next_event() == ServerReply(Command.GREETING, case.expected)


@pytest.mark.parametrize("case", PARSE_CASES, ids=PARSE_IDS)
def test_reply_leaves_trailing_bytes_untouched(case: ParseCase) -> None:
    client = SmtpClient()
    client.receive_data(case.data + TRAIL)
    assert client.next_event() == ServerReply(Command.GREETING, case.expected)
    assert client.trailing_data == TRAIL
    assert client.next_event() is NEED_DATA  # nothing owed: the bytes wait
    assert client.trailing_data == TRAIL


@pytest.mark.parametrize("case", PARSE_CASES, ids=PARSE_IDS)
@EXAMPLES
@given(points=st.lists(st.integers(min_value=0, max_value=5000), max_size=8))
def test_reply_does_not_depend_on_split_points(case: ParseCase, points: list[int]) -> None:
    client = SmtpClient()
    events: list[ServerReply] = []
    for chunk in split(case.data + TRAIL, points):
        client.receive_data(chunk)
        events.extend(drain(client))
    assert events == [ServerReply(Command.GREETING, case.expected)]
    assert client.trailing_data == TRAIL


BAD_REPLIES = {
    "letter in code": b"2x0 hi\r\n",
    "1xx does not exist in SMTP": b"150 hi\r\n",
    "6xx does not exist": b"650 hi\r\n",
    "second digit above 5": b"260 hi\r\n",
    "two-digit code": b"25 hi\r\n",
    "bad separator": b"250_hi\r\n",
    "bare LF as separator": b"250\n",
    "mixed codes in a multi-line reply": b"250-first\r\n251 second\r\n",
    "bare LF ends a line": b"250 a\nb\r\n",
    "bare CR in a line": b"250 a\rb\r\n",
    "line longer than the cap": b"250 " + b"x" * (MAX_REPLY_LINE - 5) + b"\r\n",
    "too many lines": b"250-x\r\n" * MAX_REPLY_LINES + b"250 x\r\n",
    "http response": b"HTTP/1.1 400 Bad Request\r\n",
    "tls record": b"\x16\x03\x01\x00\x05hello",
}


def error_for(chunks: Iterator[bytes] | list[bytes]) -> str:
    """The RemoteProtocolError message the chunks end in (no reply comes first)."""
    client = SmtpClient()
    for chunk in chunks:
        client.receive_data(chunk)
        try:
            events = drain(client)
        except RemoteProtocolError as exc:
            assert_state(client, ClientState.ERROR)
            return str(exc)
        assert events == []
    raise AssertionError("no RemoteProtocolError")


@pytest.mark.parametrize("data", BAD_REPLIES.values(), ids=BAD_REPLIES.keys())
def test_malformed_reply_is_remote_error_however_split(data: bytes) -> None:
    whole = error_for([data])
    assert error_for([bytes([byte]) for byte in data]) == whole


@pytest.mark.parametrize("data", BAD_REPLIES.values(), ids=BAD_REPLIES.keys())
@EXAMPLES
@given(points=st.lists(st.integers(min_value=0, max_value=100_000), max_size=6))
def test_malformed_reply_error_does_not_depend_on_split_points(
    data: bytes, points: list[int]
) -> None:
    assert error_for(split(data, points)) == error_for([data])


def test_mixed_codes_are_refused_as_soon_as_the_second_code_arrives() -> None:
    client = SmtpClient()
    client.receive_data(b"250-first\r\n25")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"1")
    with pytest.raises(RemoteProtocolError, match="changes code from 250 to 251"):
        client.next_event()


def test_reply_line_cap_is_decided_within_the_cap() -> None:
    client = SmtpClient()
    client.receive_data(b"250 " + b"x" * (MAX_REPLY_LINE - 5) + b"\r")
    assert len(client.trailing_data) == MAX_REPLY_LINE
    with pytest.raises(RemoteProtocolError, match="longer than"):
        client.next_event()


def test_reply_line_cap_tolerates_more_than_rfc_512() -> None:
    assert RFC_REPLY_LINE == 512 < MAX_REPLY_LINE
    client = SmtpClient()
    client.receive_data(b"554 " + b"y" * 1000 + b"\r\n")
    assert client.next_event() == ServerReply(Command.GREETING, SmtpReply(554, ("y" * 1000,)))


# ---------------------------------------------------------------------------
# EHLO capabilities
# ---------------------------------------------------------------------------


def test_postfix_ehlo_capabilities() -> None:
    caps = ready(POSTFIX_EHLO).capabilities
    assert caps == Capabilities(
        pipelining=True,
        size=10240000,
        eight_bit_mime=True,
        smtputf8=True,
        starttls=True,
        enhanced_status_codes=True,
        chunking=True,
        dsn=True,
        auth=(),
        raw={
            "PIPELINING": "",
            "SIZE": "10240000",
            "VRFY": "",
            "ETRN": "",
            "STARTTLS": "",
            "ENHANCEDSTATUSCODES": "",
            "8BITMIME": "",
            "DSN": "",
            "SMTPUTF8": "",
            "CHUNKING": "",
        },
    )


def test_gmail_ehlo_capabilities_skip_the_greeting_line() -> None:
    caps = ready(GMAIL_EHLO).capabilities
    assert caps is not None
    assert (caps.pipelining, caps.size, caps.eight_bit_mime, caps.smtputf8) == (
        True,
        157286400,
        True,
        True,
    )
    assert (caps.starttls, caps.enhanced_status_codes, caps.chunking, caps.dsn) == (
        True,
        True,
        True,
        False,
    )
    assert "MX.GOOGLE.COM" not in caps.raw


def test_ehlo_keywords_are_case_insensitive_and_auth_merges_old_and_new_forms() -> None:
    caps = ready(
        b"250-mx.example.net\r\n"
        b"250-pipelining\r\n"
        b"250-AUTH=LOGIN PLAIN\r\n"
        b"250-auth plain login CRAM-MD5\r\n"
        b"250 8bitmime\r\n"
    ).capabilities
    assert caps is not None
    assert caps.pipelining
    assert caps.eight_bit_mime
    assert caps.auth == ("LOGIN", "PLAIN", "CRAM-MD5")
    assert caps.raw["AUTH"] == "plain login CRAM-MD5"


@pytest.mark.parametrize(
    ("line", "size"),
    [
        (b"250 SIZE\r\n", 0),
        (b"250 SIZE 0\r\n", 0),
        (b"250 SIZE lots\r\n", 0),
        (b"250 SIZE 52428800\r\n", 52428800),
        (b"250 HELP\r\n", None),
    ],
)
def test_ehlo_size_is_none_unadvertised_zero_without_usable_limit(
    line: bytes, size: int | None
) -> None:
    caps = ready(b"250-mx.example.net\r\n" + line).capabilities
    assert caps is not None
    assert caps.size == size


def test_ehlo_lines_that_are_not_keywords_are_skipped() -> None:
    caps = ready(b"250-mx\r\n250-\r\n250-=junk\r\n250-  \r\n250 PIPELINING extra\r\n").capabilities
    assert caps is not None
    assert dict(caps.raw) == {"PIPELINING": "extra"}


def test_capabilities_are_unknown_before_ehlo_and_hashable() -> None:
    client = greeted()
    assert client.capabilities is None
    caps = ready().capabilities
    assert caps is not None
    assert hash(caps) == hash(ready().capabilities)


def test_ehlo_refused_allows_helo_which_advertises_nothing() -> None:
    client = greeted()
    client.send(Ehlo("client.example.org"))
    assert one(client, b"502 5.5.2 Error: command not recognized\r\n").command is Command.EHLO
    assert_state(client, ClientState.GREETED)
    assert client.capabilities is None
    assert client.send(Helo("client.example.org")) == b"HELO client.example.org\r\n"
    assert one(client, b"250 mx.example.com\r\n").command is Command.HELO
    assert_state(client, ClientState.READY)
    assert client.capabilities == Capabilities()


def test_repeated_ehlo_refused_forgets_capabilities() -> None:
    client = ready()
    client.send(Ehlo("client.example.org"))
    one(client, b"451 4.3.0 try later\r\n")
    assert_state(client, ClientState.GREETED)
    assert client.capabilities is None


# ---------------------------------------------------------------------------
# Transactions, pipelining
# ---------------------------------------------------------------------------


def test_pipelined_transaction_yields_replies_tagged_in_order_with_per_recipient_results() -> None:
    client = ready()
    batch = (
        client.send(MailFrom("sender@example.org", size=len(MESSAGE), body_8bitmime=True))
        + client.send(RcptTo("gone@example.com"))
        + client.send(RcptTo("here@example.com"))
        + client.send(Data())
    )
    assert batch == (
        b"MAIL FROM:<sender@example.org> SIZE=%d BODY=8BITMIME\r\n"
        b"RCPT TO:<gone@example.com>\r\n"
        b"RCPT TO:<here@example.com>\r\n"
        b"DATA\r\n" % len(MESSAGE)
    )
    assert list(client.pending) == [Command.MAIL, Command.RCPT, Command.RCPT, Command.DATA]
    events = answer(
        client,
        b"250 2.1.0 Ok\r\n"
        b"550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown\r\n"
        b"250 2.1.5 Ok\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n",
    )
    assert codes(events) == [
        (Command.MAIL, 250),
        (Command.RCPT, 550),
        (Command.RCPT, 250),
        (Command.DATA, 354),
    ]
    assert events[1].reply.enhanced == "5.1.1"
    assert client.accepted_recipients == 1
    assert_state(client, ClientState.DATA_OPEN)
    assert client.send(MessageContent(MESSAGE)) == MESSAGE
    assert list(client.pending) == [Command.DATA_END]
    assert codes(answer(client, b"250 2.0.0 Ok: queued as 4Xyz\r\n")) == [(Command.DATA_END, 250)]
    assert_state(client, ClientState.READY)
    assert client.pending == ()


SESSION_REPLIES = (
    GREETING
    + POSTFIX_EHLO
    + b"250 2.1.0 Ok\r\n550 5.1.1 no\r\n250 2.1.5 Ok\r\n354 go\r\n"
    + b"250 2.0.0 queued\r\n221 2.0.0 Bye\r\n"
)
SESSION_EXPECTED = [
    (Command.GREETING, 220),
    (Command.EHLO, 250),
    (Command.MAIL, 250),
    (Command.RCPT, 550),
    (Command.RCPT, 250),
    (Command.DATA, 354),
    (Command.DATA_END, 250),
    (Command.QUIT, 221),
]


def session(chunks: Iterator[bytes]) -> list[ServerReply]:
    """A pipelining client driven by the replies it gets."""
    client = SmtpClient()
    events: list[ServerReply] = []
    for chunk in chunks:
        client.receive_data(chunk)
        while not isinstance(event := client.next_event(), NeedData):
            events.append(event)
            match event.command:
                case Command.GREETING:
                    client.send(Ehlo("client.example.org"))
                case Command.EHLO:
                    client.send(MailFrom("a@example.org"))
                    client.send(RcptTo("b@example.com"))
                    client.send(RcptTo("c@example.com"))
                    client.send(Data())
                case Command.DATA:
                    client.send(MessageContent(MESSAGE))
                    client.send(Quit())  # pipelined after the content (RFC 2920 section 3.1)
                case _:
                    pass
    assert_state(client, ClientState.CLOSED)
    return events


@EXAMPLES
@given(points=st.lists(st.integers(min_value=0, max_value=1000), max_size=10))
def test_pipelined_session_replies_do_not_depend_on_split_points(points: list[int]) -> None:
    assert codes(session(split(SESSION_REPLIES, points))) == SESSION_EXPECTED


def test_non_pipelining_server_forbids_back_to_back_commands() -> None:
    client = ready(PLAIN_EHLO)
    client.send(MailFrom("a@example.org"))
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        client.send(RcptTo("b@example.com"))
    assert_state(client, ClientState.ERROR)


def test_non_pipelining_server_gets_one_command_per_reply() -> None:
    client = ready(PLAIN_EHLO)
    client.send(MailFrom("a@example.org"))
    assert codes(answer(client, b"250 ok\r\n")) == [(Command.MAIL, 250)]
    client.send(RcptTo("b@example.com"))
    assert codes(answer(client, b"250 ok\r\n")) == [(Command.RCPT, 250)]
    client.send(Data())
    assert codes(answer(client, b"354 go\r\n")) == [(Command.DATA, 354)]
    client.send(MessageContent(MESSAGE))
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        client.send(Quit())  # the content may lead a group only when pipelining


def test_content_may_lead_a_pipelined_group_with_the_next_transaction() -> None:
    client = ready()
    client.send(MailFrom("a@example.org"))
    client.send(RcptTo("b@example.com"))
    client.send(Data())
    answer(client, b"250 ok\r\n250 ok\r\n354 go\r\n")
    client.send(MessageContent(MESSAGE))
    client.send(MailFrom("a@example.org"))
    client.send(RcptTo("c@example.com"))
    client.send(Data())
    events = answer(client, b"250 queued 1\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert [event.command for event in events] == [
        Command.DATA_END,
        Command.MAIL,
        Command.RCPT,
        Command.DATA,
    ]
    assert_state(client, ClientState.DATA_OPEN)


@pytest.mark.parametrize(
    ("last", "then"),
    [
        (Noop(), MailFrom("a@example.org")),
        (Quit(), Noop()),
        (Data(), Rset()),
        (Ehlo("client.example.org"), MailFrom("a@example.org")),
        (StartTls(), Ehlo("client.example.org")),
    ],
    ids=["NOOP", "QUIT", "DATA", "EHLO", "STARTTLS"],
)
def test_commands_that_end_a_pipelined_group_block_further_sends(
    last: ClientCommand, then: ClientCommand
) -> None:
    client = ready()
    if isinstance(last, Data):
        client.send(MailFrom("a@example.org"))
        client.send(RcptTo("b@example.com"))
    client.send(last)
    with pytest.raises(LocalProtocolError):
        client.send(then)
    assert_state(client, ClientState.ERROR)


def test_two_messages_on_one_connection_with_rset_between() -> None:
    client = ready(PLAIN_EHLO)
    for number in (1, 2):
        client.send(MailFrom("a@example.org"))
        one(client, b"250 ok\r\n")
        client.send(RcptTo(f"rcpt{number}@example.com"))
        one(client, b"250 ok\r\n")
        client.send(Data())
        one(client, b"354 go\r\n")
        assert client.send(MessageContent(MESSAGE)) == MESSAGE
        assert one(client, b"250 queued %d\r\n" % number).reply.text == f"queued {number}"
        assert_state(client, ClientState.READY)
        assert client.send(Rset()) == b"RSET\r\n"
        assert codes(answer(client, b"250 2.0.0 Ok\r\n")) == [(Command.RSET, 250)]
        assert_state(client, ClientState.READY)


def refused_data() -> SmtpClient:
    """A pipelined transaction whose only RCPT and then DATA were refused."""
    client = ready()
    client.send(MailFrom("a@example.org"))
    client.send(RcptTo("gone@example.com"))
    client.send(Data())
    events = answer(client, b"250 ok\r\n550 5.1.1 no\r\n554 5.5.1 Error: no valid recipients\r\n")
    assert codes(events) == [(Command.MAIL, 250), (Command.RCPT, 550), (Command.DATA, 554)]
    assert_state(client, ClientState.ABORTED)
    return client


def test_refused_data_forbids_the_content() -> None:
    client = refused_data()
    with pytest.raises(LocalProtocolError):
        client.send(MessageContent(MESSAGE))
    assert_state(client, ClientState.ERROR)


def test_refused_data_forbids_mail_before_rset() -> None:
    # The server accepted MAIL: it may still hold the transaction ("nested MAIL").
    client = refused_data()
    with pytest.raises(LocalProtocolError):
        client.send(MailFrom("a@example.org"))


def test_refused_data_then_rset_and_mail_pipelined() -> None:
    client = refused_data()
    client.send(Rset())
    client.send(MailFrom("a@example.org"))
    assert codes(answer(client, b"250 ok\r\n250 ok\r\n")) == [
        (Command.RSET, 250),
        (Command.MAIL, 250),
    ]
    assert_state(client, ClientState.MAIL)


def test_data_accepted_without_accepted_recipients_is_ended_with_empty_content() -> None:
    client = ready()
    client.send(MailFrom("a@example.org"))
    client.send(RcptTo("gone@example.com"))
    client.send(Data())
    answer(client, b"250 ok\r\n550 5.1.1 no\r\n354 go ahead anyway\r\n")
    assert_state(client, ClientState.DATA_OPEN)
    assert client.accepted_recipients == 0
    assert client.send(MessageContent(prepare_data(b""))) == b".\r\n"
    assert codes(answer(client, b"554 5.5.1 no recipients\r\n")) == [(Command.DATA_END, 554)]
    assert_state(client, ClientState.READY)


def test_refused_mail_keeps_the_state_until_rset() -> None:
    client = ready(PLAIN_EHLO)
    client.send(MailFrom("a@example.org"))
    assert one(client, b"550 5.7.1 go away\r\n").reply.code == 550
    assert_state(client, ClientState.MAIL)
    client.send(Rset())
    one(client, b"250 ok\r\n")
    assert_state(client, ClientState.READY)


def test_accepted_recipients_count_restarts_with_each_mail() -> None:
    client = ready()
    client.send(MailFrom("a@example.org"))
    client.send(RcptTo("b@example.com"))
    client.send(RcptTo("c@example.com"))
    answer(client, b"250 ok\r\n250 ok\r\n251 forwarded\r\n")
    assert client.accepted_recipients == 2
    client.send(Rset())
    client.send(MailFrom("a@example.org"))
    assert client.accepted_recipients == 0


def test_unprepared_content_is_refused() -> None:
    client = ready()
    client.send(MailFrom("a@example.org"))
    client.send(RcptTo("b@example.com"))
    client.send(Data())
    answer(client, b"250 ok\r\n250 ok\r\n354 go\r\n")
    with pytest.raises(LocalProtocolError, match="prepare_data"):
        client.send(MessageContent(b"Subject: x\n\nbody\n.\nmore\r\n.\r\n"))
    assert_state(client, ClientState.ERROR)


# ---------------------------------------------------------------------------
# Greeting, 421, EOF, QUIT
# ---------------------------------------------------------------------------


def test_554_greeting_allows_only_quit() -> None:
    client = SmtpClient()
    assert one(client, b"554 5.7.1 no service for you\r\n").reply.code == 554
    assert_state(client, ClientState.REFUSED)
    assert client.send(Quit()) == b"QUIT\r\n"
    one(client, b"221 bye\r\n")
    assert_state(client, ClientState.CLOSED)
    assert client.next_event() is NEED_DATA


def test_nothing_may_be_sent_before_the_greeting() -> None:
    client = SmtpClient()
    assert client.pending == (Command.GREETING,)
    with pytest.raises(LocalProtocolError):
        client.send(Ehlo("client.example.org"))


def test_421_is_yielded_then_closes_and_drops_pipelined_replies() -> None:
    client = ready()
    client.send(MailFrom("a@example.org"))
    client.send(RcptTo("b@example.com"))
    client.send(Data())
    client.receive_data(b"250 ok\r\n421 4.3.2 Service shutting down\r\n")
    events = [client.next_event(), client.next_event()]
    replies = [event for event in events if isinstance(event, ServerReply)]
    assert codes(replies) == [(Command.MAIL, 250), (Command.RCPT, 421)]
    assert_state(client, ClientState.CLOSED)
    assert client.pending == ()
    with pytest.raises(ConnectionLostError, match="421"):
        client.next_event()
    with pytest.raises(ConnectionLostError):
        replies[1].raise_for_status()
    with pytest.raises(LocalProtocolError):
        client.send(Rset())


def test_421_greeting_closes() -> None:
    client = SmtpClient()
    assert first_reply(client, b"421 4.7.0 too many connections\r\n").reply.code == 421
    assert_state(client, ClientState.CLOSED)
    with pytest.raises(ConnectionLostError):
        client.next_event()


def test_eof_in_the_middle_of_a_reply_is_connection_lost() -> None:
    client = greeted()
    client.send(Ehlo("client.example.org"))
    client.receive_data(b"250-mx.example.com\r\n250-PIPE")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(ConnectionLostError, match="middle of its reply to EHLO"):
        client.next_event()
    assert_state(client, ClientState.CLOSED)
    with pytest.raises(ConnectionLostError):
        client.next_event()


def test_eof_before_a_reply_is_connection_lost() -> None:
    client = SmtpClient()
    client.receive_data(b"")
    with pytest.raises(ConnectionLostError, match="before its reply to greeting"):
        client.next_event()


def test_eof_while_idle_is_connection_lost() -> None:
    client = ready()
    client.receive_data(b"")
    with pytest.raises(ConnectionLostError, match="no reply was owed"):
        client.next_event()


def test_complete_reply_before_eof_is_still_yielded() -> None:
    client = SmtpClient()
    client.receive_data(GREETING)
    client.receive_data(b"")
    assert client.next_event() == ServerReply(
        Command.GREETING, SmtpReply(220, ("mx.example.com ESMTP Postfix",))
    )


def test_data_after_eof_is_local_error() -> None:
    client = SmtpClient()
    client.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"220 late\r\n")
    assert_state(client, ClientState.ERROR)


def test_quit_closes_quietly() -> None:
    client = ready()
    assert client.send(Quit()) == b"QUIT\r\n"
    assert codes(answer(client, b"221 2.0.0 Bye\r\n")) == [(Command.QUIT, 221)]
    assert_state(client, ClientState.CLOSED)
    client.receive_data(b"")
    assert client.next_event() is NEED_DATA


def test_unsolicited_421_while_idle_answers_the_next_command() -> None:
    client = ready()
    client.receive_data(b"421 4.4.2 mx.example.com Error: timeout exceeded\r\n")
    assert client.next_event() is NEED_DATA
    client.send(MailFrom("a@example.org"))
    event = client.next_event()
    assert isinstance(event, ServerReply)
    assert codes([event]) == [(Command.MAIL, 421)]
    assert_state(client, ClientState.CLOSED)


def test_unsolicited_flood_while_idle_is_remote_error() -> None:
    client = ready()
    client.receive_data(b"x" * (MAX_REPLY_LINE + 1))
    with pytest.raises(RemoteProtocolError, match="unsolicited"):
        client.next_event()


# ---------------------------------------------------------------------------
# STARTTLS
# ---------------------------------------------------------------------------


def test_starttls_then_reset_requires_a_new_ehlo_and_forgets_capabilities() -> None:
    client = ready()
    assert client.send(StartTls()) == b"STARTTLS\r\n"
    assert codes(answer(client, b"220 2.0.0 Ready to start TLS\r\n")) == [(Command.STARTTLS, 220)]
    assert_state(client, ClientState.TLS_PENDING)
    assert client.next_event() is NEED_DATA
    client.reset_after_tls()
    assert_state(client, ClientState.GREETED)
    assert client.capabilities is None
    client.send(Ehlo("client.example.org"))
    one(client, POSTFIX_EHLO.replace(b"250-STARTTLS\r\n", b""))
    assert client.capabilities is not None
    assert not client.capabilities.starttls
    with pytest.raises(UnsendableCommandError, match="already"):
        client.send(StartTls())
    assert_state(client, ClientState.READY)


def test_bytes_with_the_starttls_220_are_refused_as_injection() -> None:
    client = ready()
    client.send(StartTls())
    client.receive_data(b"220 2.0.0 Ready to start TLS\r\n250-injected\r\n")
    with pytest.raises(RemoteProtocolError, match="injection"):
        client.next_event()
    assert_state(client, ClientState.ERROR)


def test_bytes_after_the_starttls_220_before_the_handshake_are_refused() -> None:
    client = ready()
    client.send(StartTls())
    one(client, b"220 2.0.0 Ready to start TLS\r\n")
    client.receive_data(b"250 fake\r\n")
    with pytest.raises(RemoteProtocolError, match="injection"):
        client.reset_after_tls()
    assert_state(client, ClientState.ERROR)


def test_starttls_not_advertised_is_refused_without_sending() -> None:
    client = ready(PLAIN_EHLO)
    with pytest.raises(UnsendableCommandError, match="STARTTLS"):
        client.send(StartTls())
    assert_state(client, ClientState.READY)
    assert client.pending == ()


def test_starttls_refused_goes_back_to_ready() -> None:
    client = ready()
    client.send(StartTls())
    one(client, b"454 4.7.0 TLS not available due to local problem\r\n")
    assert_state(client, ClientState.READY)
    assert client.capabilities is not None


def test_reset_after_tls_outside_tls_pending_is_local_error() -> None:
    client = ready()
    with pytest.raises(LocalProtocolError):
        client.reset_after_tls()
    assert_state(client, ClientState.ERROR)


# ---------------------------------------------------------------------------
# SMTPUTF8, SIZE, 8BITMIME
# ---------------------------------------------------------------------------


def test_non_ascii_sender_without_smtputf8_is_refused() -> None:
    client = ready()
    with pytest.raises(UnsendableCommandError, match="SMTPUTF8"):
        client.send(MailFrom("josé@example.org"))
    assert_state(client, ClientState.READY)
    assert client.pending == ()


def test_smtputf8_needs_the_server_to_advertise_it() -> None:
    client = ready(GMAIL_EHLO.replace(b"250 SMTPUTF8", b"250 HELP"))
    with pytest.raises(UnsendableCommandError, match=r"SMTPUTF8.*did not advertise"):
        client.send(MailFrom("josé@example.org", smtputf8=True))
    assert_state(client, ClientState.READY)


def test_smtputf8_transaction_sends_utf8_envelope() -> None:
    client = ready()
    assert client.send(MailFrom("josé@example.org", smtputf8=True)) == (
        "MAIL FROM:<josé@example.org> SMTPUTF8\r\n".encode()
    )
    assert client.send(RcptTo("用户@例子.广告")) == "RCPT TO:<用户@例子.广告>\r\n".encode()


def test_non_ascii_recipient_in_ascii_transaction_is_refused() -> None:
    client = ready()
    client.send(MailFrom("a@example.org"))
    with pytest.raises(UnsendableCommandError, match="SMTPUTF8"):
        client.send(RcptTo("用户@例子.广告"))
    assert_state(client, ClientState.MAIL)
    assert client.send(RcptTo("b@example.com")) == b"RCPT TO:<b@example.com>\r\n"


def test_size_is_sent_only_when_advertised() -> None:
    assert ready().send(MailFrom("a@example.org", size=1234)) == (
        b"MAIL FROM:<a@example.org> SIZE=1234\r\n"
    )
    assert ready(PLAIN_EHLO).send(MailFrom("a@example.org", size=1234)) == (
        b"MAIL FROM:<a@example.org>\r\n"
    )


def test_message_over_advertised_size_is_refused_early() -> None:
    client = ready()
    assert client.capabilities is not None
    limit = client.capabilities.size
    assert limit == 10240000
    with pytest.raises(UnsendableCommandError, match="SIZE limit"):
        client.send(MailFrom("a@example.org", size=limit + 1))
    assert client.send(MailFrom("a@example.org", size=limit)).endswith(b" SIZE=10240000\r\n")


def test_size_zero_means_no_limit() -> None:
    client = ready(b"250-mx\r\n250 SIZE 0\r\n")
    assert client.send(MailFrom("a@example.org", size=10**12)) == (
        b"MAIL FROM:<a@example.org> SIZE=1000000000000\r\n"
    )


def test_8bitmime_needs_the_server_to_advertise_it() -> None:
    client = ready(PLAIN_EHLO)
    with pytest.raises(UnsendableCommandError, match="8BITMIME"):
        client.send(MailFrom("a@example.org", body_8bitmime=True))
    assert ready().send(MailFrom("a@example.org", body_8bitmime=True, smtputf8=True)) == (
        b"MAIL FROM:<a@example.org> BODY=8BITMIME SMTPUTF8\r\n"
    )


# ---------------------------------------------------------------------------
# Addresses and names: the command injection guard
# ---------------------------------------------------------------------------

BAD_ADDRESSES = [
    "a@example.org\r\nRCPT TO:<evil@example.net>",
    "a@example.org\n",
    "a@example.org\r",
    "a@example.org>",
    "<a@example.org",
    "a@example.org> SIZE=1",
    "a b@example.org",
    "a\t@example.org",
    "a\x00@example.org",
    "a\x7f@example.org",
    "a\x85@example.org",
    "a\u2028@example.org",
    "a\u200b@example.org",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_mail_from_refuses_injection(address: str) -> None:
    client = ready()
    with pytest.raises(UnsendableCommandError, match="injection"):
        client.send(MailFrom(address, smtputf8=True))
    assert_state(client, ClientState.READY)
    assert client.pending == ()


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_rcpt_to_refuses_injection(address: str) -> None:
    client = ready()
    client.send(MailFrom("a@example.org", smtputf8=True))
    with pytest.raises(UnsendableCommandError, match="injection"):
        client.send(RcptTo(address))
    assert_state(client, ClientState.MAIL)
    assert client.pending == (Command.MAIL,)


def test_null_reverse_path_is_allowed_but_not_an_empty_recipient() -> None:
    client = ready()
    assert client.send(MailFrom("")) == b"MAIL FROM:<>\r\n"
    with pytest.raises(UnsendableCommandError):
        client.send(RcptTo(""))


def test_path_longer_than_256_octets_is_refused() -> None:
    longest = "a" * (MAX_ADDRESS_PATH - 2 - len("@example.org")) + "@example.org"
    assert ready().send(MailFrom(longest)) == b"MAIL FROM:<" + longest.encode() + b">\r\n"
    with pytest.raises(UnsendableCommandError, match="256"):
        ready().send(MailFrom("a" + longest))


@pytest.mark.parametrize(
    "domain",
    ["", "client example.org", "client.example.org\r\nMAIL FROM:<x>", "exämple.org", "x" * 256],
)
def test_bad_ehlo_names_are_refused(domain: str) -> None:
    client = greeted()
    with pytest.raises(UnsendableCommandError):
        client.send(Ehlo(domain))
    with pytest.raises(UnsendableCommandError):
        client.send(Helo(domain))
    assert_state(client, ClientState.GREETED)


def test_ehlo_accepts_an_address_literal() -> None:
    assert greeted().send(Ehlo("[IPv6:2001:db8::1]")) == b"EHLO [IPv6:2001:db8::1]\r\n"


# ---------------------------------------------------------------------------
# Robustness: random bytes
# ---------------------------------------------------------------------------

_FRAGMENTS = [b"250-", b"250 ", b"421 ", b"354 ", b"\r\n", b"\r", b"\n", b"2", b"PIPELINING", b" "]
server_bytes = st.lists(
    st.one_of(st.binary(max_size=40), st.sampled_from(_FRAGMENTS)), max_size=30
).map(b"".join)


@EXAMPLES
@given(chunks=st.lists(server_bytes, max_size=4), eof=st.booleans())
def test_random_bytes_after_ehlo_only_raise_remote_error_or_connection_lost(
    chunks: list[bytes], eof: bool
) -> None:
    client = greeted()
    client.send(Ehlo("client.example.org"))
    try:
        for chunk in [*chunks, *([b""] if eof else [])]:
            client.receive_data(chunk)
            while not isinstance(client.next_event(), NeedData):
                # Keep the machine consuming: ask for one more reply each time.
                if client.state is ClientState.GREETED:
                    client.send(Ehlo("client.example.org"))
                elif client.state is ClientState.READY:
                    client.send(Noop())
    except RemoteProtocolError:
        assert_state(client, ClientState.ERROR)
    except ConnectionLostError:
        assert_state(client, ClientState.CLOSED)


# ---------------------------------------------------------------------------
# The transition table: every (state, command) pair transitions or raises
# ---------------------------------------------------------------------------


def client_in(state: ClientState) -> SmtpClient:
    """A client in ``state`` with no reply owed where the state allows it."""
    steps: dict[ClientState, Callable[[], SmtpClient]] = {
        ClientState.AWAIT_GREETING: SmtpClient,
        ClientState.GREETED: greeted,
        ClientState.READY: ready,
    }
    if state in steps:
        return steps[state]()
    match state:
        case ClientState.REFUSED:
            client = SmtpClient()
            one(client, b"554 no\r\n")
        case ClientState.AWAIT_HELLO:
            client = greeted()
            client.send(Ehlo("client.example.org"))
        case ClientState.AWAIT_STARTTLS:
            client = ready()
            client.send(StartTls())
        case ClientState.TLS_PENDING:
            client = client_in(ClientState.AWAIT_STARTTLS)
            one(client, b"220 go\r\n")
        case ClientState.MAIL:
            client = ready()
            client.send(MailFrom("a@example.org"))
            one(client, b"250 ok\r\n")
        case ClientState.RCPT:
            client = client_in(ClientState.MAIL)
            client.send(RcptTo("b@example.com"))
            one(client, b"250 ok\r\n")
        case ClientState.AWAIT_DATA:
            client = client_in(ClientState.RCPT)
            client.send(Data())
        case ClientState.DATA_OPEN:
            client = client_in(ClientState.AWAIT_DATA)
            one(client, b"354 go\r\n")
        case ClientState.ABORTED:
            client = client_in(ClientState.AWAIT_DATA)
            one(client, b"554 no\r\n")
        case ClientState.AWAIT_QUIT:
            client = ready()
            client.send(Quit())
        case ClientState.CLOSED:
            client = client_in(ClientState.AWAIT_QUIT)
            one(client, b"221 bye\r\n")
        case ClientState.ERROR:
            client = greeted()
            with pytest.raises(LocalProtocolError):
                client.send(Data())
        case _:
            raise AssertionError(state)
    assert client.state is state
    return client


COMMANDS: dict[str, ClientCommand] = {
    "EHLO": Ehlo("client.example.org"),
    "HELO": Helo("client.example.org"),
    "STARTTLS": StartTls(),
    "MAIL": MailFrom("a@example.org"),
    "RCPT": RcptTo("b@example.com"),
    "DATA": Data(),
    "CONTENT": MessageContent(MESSAGE),
    "RSET": Rset(),
    "NOOP": Noop(),
    "QUIT": Quit(),
}

S = ClientState
EXPECTED_SEND: dict[tuple[ClientState, str], ClientState] = {
    (S.GREETED, "EHLO"): S.AWAIT_HELLO,
    (S.GREETED, "HELO"): S.AWAIT_HELLO,
    (S.GREETED, "NOOP"): S.GREETED,
    (S.GREETED, "QUIT"): S.AWAIT_QUIT,
    (S.REFUSED, "QUIT"): S.AWAIT_QUIT,
    (S.READY, "EHLO"): S.AWAIT_HELLO,
    (S.READY, "STARTTLS"): S.AWAIT_STARTTLS,
    (S.READY, "MAIL"): S.MAIL,
    (S.READY, "RSET"): S.READY,
    (S.READY, "NOOP"): S.READY,
    (S.READY, "QUIT"): S.AWAIT_QUIT,
    (S.MAIL, "RCPT"): S.RCPT,
    (S.MAIL, "RSET"): S.READY,
    (S.MAIL, "NOOP"): S.MAIL,
    (S.MAIL, "QUIT"): S.AWAIT_QUIT,
    (S.RCPT, "RCPT"): S.RCPT,
    (S.RCPT, "DATA"): S.AWAIT_DATA,
    (S.RCPT, "RSET"): S.READY,
    (S.RCPT, "NOOP"): S.RCPT,
    (S.RCPT, "QUIT"): S.AWAIT_QUIT,
    (S.DATA_OPEN, "CONTENT"): S.READY,
    (S.ABORTED, "RSET"): S.READY,
    (S.ABORTED, "NOOP"): S.ABORTED,
    (S.ABORTED, "QUIT"): S.AWAIT_QUIT,
}


@pytest.mark.parametrize("state", list(ClientState), ids=lambda s: s.name)
@pytest.mark.parametrize("kind", list(COMMANDS))
def test_every_state_and_command_either_transitions_or_raises_into_error(
    state: ClientState, kind: str
) -> None:
    client = client_in(state)
    target = EXPECTED_SEND.get((state, kind))
    if target is None:
        with pytest.raises(LocalProtocolError):
            client.send(COMMANDS[kind])
        assert_state(client, ClientState.ERROR)
    else:
        assert client.send(COMMANDS[kind])
        assert client.state is target
        assert client.pending[-1] is not Command.GREETING


REPLY_TRANSITIONS = [
    (S.AWAIT_GREETING, b"220 hi\r\n", S.GREETED),
    (S.AWAIT_GREETING, b"554 no\r\n", S.REFUSED),
    (S.AWAIT_GREETING, b"250 odd\r\n", S.REFUSED),
    (S.AWAIT_GREETING, b"421 busy\r\n", S.CLOSED),
    (S.AWAIT_HELLO, POSTFIX_EHLO, S.READY),
    (S.AWAIT_HELLO, b"502 no\r\n", S.GREETED),
    (S.AWAIT_HELLO, b"451 later\r\n", S.GREETED),
    (S.AWAIT_STARTTLS, b"220 go\r\n", S.TLS_PENDING),
    (S.AWAIT_STARTTLS, b"454 no\r\n", S.READY),
    (S.AWAIT_DATA, b"354 go\r\n", S.DATA_OPEN),
    (S.AWAIT_DATA, b"554 no\r\n", S.ABORTED),
    (S.AWAIT_DATA, b"451 later\r\n", S.ABORTED),
    (S.AWAIT_DATA, b"250 odd\r\n", S.ABORTED),
    (S.AWAIT_QUIT, b"221 bye\r\n", S.CLOSED),
    (S.AWAIT_QUIT, b"500 what\r\n", S.CLOSED),
]


@pytest.mark.parametrize(
    ("state", "data", "target"),
    REPLY_TRANSITIONS,
    ids=[f"{s.name}-{d[:3].decode()}" for s, d, _ in REPLY_TRANSITIONS],
)
def test_deciding_replies_move_the_state(
    state: ClientState, data: bytes, target: ClientState
) -> None:
    client = client_in(state)
    first_reply(client, data)
    assert client.state is target


@pytest.mark.parametrize(
    "state", [S.GREETED, S.REFUSED, S.READY, S.MAIL, S.RCPT, S.DATA_OPEN, S.ABORTED]
)
def test_states_owing_nothing_hold_received_bytes(state: ClientState) -> None:
    client = client_in(state)
    client.receive_data(b"250 early\r\n")
    assert client.next_event() is NEED_DATA
    assert client.trailing_data == b"250 early\r\n"
    assert client.state is state


def test_error_state_is_absorbing() -> None:
    client = client_in(ClientState.ERROR)
    for command in COMMANDS.values():
        with pytest.raises(LocalProtocolError):
            client.send(command)
    with pytest.raises(LocalProtocolError):
        client.next_event()
    assert_state(client, ClientState.ERROR)


# ---------------------------------------------------------------------------
# Reply helpers, timeouts, misc
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (250, None),
        (354, None),
        (450, TransientSmtpError),
        (552, PermanentSmtpError),
        (421, ConnectionLostError),
    ],
)
def test_raise_for_status_maps_reply_classes_to_errors(
    code: int, error: type[Exception] | None
) -> None:
    event = ServerReply(Command.RCPT, SmtpReply(code, ("text",), None))
    if error is None:
        event.raise_for_status()
        return
    with pytest.raises(error) as info:
        event.raise_for_status()
    if isinstance(info.value, TransientSmtpError | PermanentSmtpError):
        assert info.value.phase == "RCPT"
        assert info.value.reply.code == code


def test_reply_timeouts_are_rfc_5321_values_for_every_command() -> None:
    assert set(REPLY_TIMEOUTS) == set(Command)
    assert REPLY_TIMEOUTS[Command.GREETING] == 300
    assert REPLY_TIMEOUTS[Command.MAIL] == 300
    assert REPLY_TIMEOUTS[Command.RCPT] == 300
    assert REPLY_TIMEOUTS[Command.DATA] == 120
    assert REPLY_TIMEOUTS[Command.DATA_END] == 600
    assert DATA_BLOCK_TIMEOUT == 180


def test_command_names_are_the_wire_words() -> None:
    assert [str(command) for command in Command] == [
        "greeting",
        "EHLO",
        "HELO",
        "STARTTLS",
        "MAIL",
        "RCPT",
        "DATA",
        "DATA-END",
        "RSET",
        "NOOP",
        "QUIT",
    ]


def test_message_content_repr_hides_the_message() -> None:
    assert "Subject" not in repr(MessageContent(MESSAGE))


def test_need_data_is_a_singleton() -> None:
    assert NeedData() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"


def test_trickled_reply_of_maximum_size_is_parsed() -> None:
    data = (b"250-" + b"x" * (MAX_REPLY_LINE - 6) + b"\r\n") * (MAX_REPLY_LINES - 1) + b"250 x\r\n"
    client = SmtpClient()
    pieces = [data[i : i + 7] for i in range(0, len(data), 7)]
    for piece in pieces[:-1]:
        client.receive_data(piece)
        assert client.next_event() is NEED_DATA
    client.receive_data(pieces[-1])
    event = client.next_event()
    assert isinstance(event, ServerReply)
    assert len(event.reply.lines) == MAX_REPLY_LINES
