"""The SMTP session shell against a real trio SMTP server (tests/mta_client/smtpserver.py).

Deliveries run over real loopback sockets, STARTTLS with real TLS (trustme
certificates). Deadline tests run over ``memory_stream_pair`` on
``autojump_clock`` and assert virtual time.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import pytest
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from mta_client.errors import (
    ConnectionLostError,
    PermanentSmtpError,
    SmtpReply,
    SmtpTimeoutError,
    TransientSmtpError,
)
from mta_client.proto.message import normalise_crlf, prepare_data
from mta_client.proto.smtp import Capabilities, Command
from mta_client.smtp_session import (
    DATA_BLOCK_SIZE,
    DeliveryResult,
    Envelope,
    RecipientResult,
    SmtpSession,
    TlsHandshakeError,
    TlsMode,
    TlsRequiredError,
)
from tests.mta_client.smtpserver import (
    Connection,
    ServerConfig,
    SmtpTestServer,
    smtp_server,
)

EHLO_NAME = "client.test"
SENDER = "a@src.test"
OK = "ok@dst.test"
OK2 = "ok2@dst.test"
GONE = "gone@dst.test"
MESSAGE = b"From: a@src.test\nTo: ok@dst.test\nSubject: hi\n\nHello\n.dot line\n"
QUEUED = SmtpReply(250, ("Ok: queued as TEST",), "2.0.0")


def envelope(*recipients: str, sender: str = SENDER, message: bytes = MESSAGE) -> Envelope:
    return Envelope(sender, recipients or (OK,), message)


def crlf_message(message: bytes) -> bytes:
    """What the receiver must recover: the message with CRLF line endings, ending in one."""
    data = normalise_crlf(message)
    return data + b"\r\n" if data and not data.endswith(b"\r\n") else data


@dataclass(frozen=True)
class Pki:
    server: ssl.SSLContext  # certificate for "localhost"
    client: ssl.SSLContext  # trusts the server's CA
    stranger: ssl.SSLContext  # trusts another CA only


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    return Pki(server, client, stranger)


async def open_session(
    server: SmtpTestServer,
    *,
    tls: TlsMode = TlsMode.DISABLED,
    context: ssl.SSLContext | None = None,
) -> SmtpSession:
    stream = await trio.open_tcp_stream(*server.address)
    return await SmtpSession.start(
        stream, ehlo=EHLO_NAME, tls=tls, tls_context=context, server_hostname="localhost"
    )


async def finished(server: SmtpTestServer) -> Connection:
    """The server's record of its one connection, once it has ended."""
    (connection,) = server.connections
    await connection.closed.wait()
    return connection


async def deliver_once(
    config: ServerConfig, mail: Envelope, *, tls: TlsMode = TlsMode.DISABLED
) -> tuple[DeliveryResult, Connection]:
    async with smtp_server(config) as server:
        session = await open_session(server, tls=tls)
        result = await session.deliver(mail)
        await session.quit()
        return result, await finished(server)


# -- per-recipient results ------------------------------------------------------


async def test_two_recipients_one_accepted_one_refused_are_delivered_and_bounced() -> None:
    config = ServerConfig(rcpt_replies={GONE: "550 5.1.1 <gone@dst.test>: user unknown"})
    result, connection = await deliver_once(config, envelope(OK, GONE))
    assert result.recipients == (
        RecipientResult(OK, QUEUED, "delivered"),
        RecipientResult(
            GONE, SmtpReply(550, ("<gone@dst.test>: user unknown",), "5.1.1"), "bounced"
        ),
    )
    assert result.data_reply == QUEUED
    (received,) = connection.messages
    assert received.recipients == (OK,)
    assert received.data == crlf_message(MESSAGE)
    assert connection.error is None  # ended by QUIT
    assert connection.verbs[-1] == "QUIT"


async def test_4xx_at_rcpt_defers_that_recipient_only() -> None:
    config = ServerConfig(rcpt_replies={OK2: "450 4.2.1 mailbox busy"})
    result, connection = await deliver_once(config, envelope(OK, OK2))
    assert [(r.recipient, r.status, r.reply.enhanced) for r in result.recipients] == [
        (OK, "delivered", "2.0.0"),
        (OK2, "deferred", "4.2.1"),
    ]
    assert connection.messages[0].recipients == (OK,)


@pytest.mark.parametrize(
    ("reply", "status"),
    [("451 4.3.0 try again later", "deferred"), ("554 5.7.1 spam", "bounced")],
)
async def test_data_end_refusal_applies_to_every_accepted_recipient(
    reply: str, status: str
) -> None:
    config = ServerConfig(rcpt_replies={GONE: "550 5.1.1 unknown"}, data_end_reply=reply)
    result, _ = await deliver_once(config, envelope(OK, GONE, OK2))
    assert [(r.recipient, r.status, r.reply.code) for r in result.recipients] == [
        (OK, status, int(reply[:3])),
        (GONE, "bounced", 550),
        (OK2, status, int(reply[:3])),
    ]
    assert result.data_reply is not None
    assert result.data_reply.code == int(reply[:3])


@pytest.mark.parametrize("pipelining", [True, False])
async def test_mail_refusal_applies_to_all_recipients(pipelining: bool) -> None:
    config = ServerConfig(
        pipelining=pipelining, mail_replies={SENDER: "451 4.7.1 greylisted, try later"}
    )
    result, connection = await deliver_once(config, envelope(OK, OK2))
    assert result.with_status("deferred") == (OK, OK2)
    assert {r.reply.enhanced for r in result.recipients} == {"4.7.1"}
    assert result.data_reply is None
    assert connection.messages == []


async def test_recipient_the_machine_will_not_encode_is_bounced_and_not_sent() -> None:
    injected = "x@dst.test>\r\nRSET"
    result, connection = await deliver_once(ServerConfig(), envelope(OK, injected))
    bounced = result.recipients[1]
    assert (bounced.status, bounced.reply.code, bounced.reply.enhanced) == ("bounced", 553, "5.1.3")
    assert result.recipients[0].status == "delivered"
    assert connection.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


# -- PIPELINING -----------------------------------------------------------------


async def test_pipelining_sends_mail_rcpts_and_data_in_one_segment() -> None:
    async with smtp_server(ServerConfig(pipelining=True)) as server:
        session = await open_session(server)
        assert session.capabilities.pipelining
        result = await session.deliver(envelope(OK, GONE))
        await session.quit()
        connection = await finished(server)
    assert result.with_status("delivered") == (OK, GONE)
    group = (
        b"MAIL FROM:<a@src.test>\r\nRCPT TO:<ok@dst.test>\r\nRCPT TO:<gone@dst.test>\r\nDATA\r\n"
    )
    # One read got the whole group: the client did not wait for the MAIL reply.
    assert group in connection.segments
    index = connection.log.index(("recv", group))
    assert connection.log[index + 1][1].startswith(b"250 2.1.0")  # replies came after
    assert connection.segments[connection.segments.index(group) + 1] == prepare_data(MESSAGE)


async def test_without_pipelining_each_command_is_its_own_segment() -> None:
    async with smtp_server(ServerConfig(pipelining=False)) as server:
        session = await open_session(server)
        result = await session.deliver(envelope(OK, GONE))
        await session.quit()
        connection = await finished(server)
    assert result.with_status("delivered") == (OK, GONE)
    assert connection.segments == [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<a@src.test>\r\n",
        b"RCPT TO:<ok@dst.test>\r\n",
        b"RCPT TO:<gone@dst.test>\r\n",
        b"DATA\r\n",
        prepare_data(MESSAGE),
        b"QUIT\r\n",
    ]
    # Lockstep: every segment after the first came after a reply.
    directions = [direction for direction, _ in connection.log]
    assert directions == ["send"] + ["recv", "send"] * 7


@pytest.mark.parametrize("pipelining", [True, False])
async def test_several_messages_on_one_connection_with_rset_after_failures(
    pipelining: bool,
) -> None:
    config = ServerConfig(
        pipelining=pipelining,
        mail_replies={"refused@src.test": "550 5.7.1 sender refused"},
        rcpt_replies={GONE: "550 5.1.1 unknown"},
    )
    async with smtp_server(config) as server:
        session = await open_session(server)
        refused_sender = await session.deliver(envelope(OK, sender="refused@src.test"))
        first = await session.deliver(envelope(OK, message=b"first\n"))
        no_recipient = await session.deliver(envelope(GONE))
        second = await session.deliver(envelope(OK2, message=b"second\n"))
        assert session.usable
        await session.quit()
        connection = await finished(server)
    assert refused_sender.with_status("bounced") == (OK,)
    assert refused_sender.recipients[0].reply.text == "sender refused"
    assert no_recipient.with_status("bounced") == (GONE,)
    assert (first.with_status("delivered"), second.with_status("delivered")) == ((OK,), (OK2,))
    assert [(m.recipients, m.data) for m in connection.messages] == [
        ((OK,), b"first\r\n"),
        ((OK2,), b"second\r\n"),
    ]
    if pipelining:
        # A refused MAIL or DATA leaves the transaction to be reset (RFC 2920
        # answers the pipelined RCPT and DATA anyway, with 503/554).
        assert connection.verbs == [
            "EHLO",
            *("MAIL", "RCPT", "DATA"),
            *("RSET", "MAIL", "RCPT", "DATA"),
            *("MAIL", "RCPT", "DATA"),
            *("RSET", "MAIL", "RCPT", "DATA"),
            "QUIT",
        ]
    else:
        # Lockstep stops at the refusal; the open transaction is reset later.
        assert connection.verbs == [
            "EHLO",
            "MAIL",
            *("RSET", "MAIL", "RCPT", "DATA"),
            *("MAIL", "RCPT"),
            *("RSET", "MAIL", "RCPT", "DATA"),
            "QUIT",
        ]


async def test_pipelined_data_refused_without_accepted_recipients_sends_no_content() -> None:
    config = ServerConfig(rcpt_replies={GONE: "550 5.1.1 unknown", OK: "450 4.2.1 busy"})
    result, connection = await deliver_once(config, envelope(GONE, OK))
    assert [r.status for r in result.recipients] == ["bounced", "deferred"]
    assert result.data_reply is not None
    assert result.data_reply.code == 554  # RFC 2920 §3.1
    assert connection.messages == []
    assert connection.segments[-1] == b"QUIT\r\n"


# -- EHLO / HELO, greeting ----------------------------------------------------------


async def test_ehlo_refused_falls_back_to_helo_without_extensions() -> None:
    async with smtp_server(ServerConfig(ehlo_supported=False)) as server:
        session = await open_session(server)
        assert session.capabilities == Capabilities()
        result = await session.deliver(envelope(OK))
        await session.quit()
        connection = await finished(server)
    assert result.with_status("delivered") == (OK,)
    assert connection.verbs == ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert connection.messages[0].mail_params == ""  # no SIZE/BODY after HELO


@pytest.mark.parametrize(
    ("banner", "error", "verbs"),
    [
        ("554 5.3.2 no service here", PermanentSmtpError, ["QUIT"]),
        ("450 4.3.2 too busy", TransientSmtpError, ["QUIT"]),
        ("421 4.3.2 shutting down", ConnectionLostError, []),
    ],
)
async def test_greeting_other_than_220_raises_by_class(
    banner: str, error: type[Exception], verbs: list[str]
) -> None:
    async with smtp_server(ServerConfig(banner=banner)) as server:
        with pytest.raises(error) as info:
            await open_session(server)
        connection = await finished(server)
    assert banner[4:] in str(info.value)
    if isinstance(info.value, TransientSmtpError | PermanentSmtpError):
        assert info.value.phase == "greeting"
    assert connection.verbs == verbs


# -- STARTTLS ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [TlsMode.OPPORTUNISTIC, TlsMode.REQUIRED])
async def test_starttls_when_offered_delivers_over_tls_after_a_new_ehlo(
    pki: Pki, mode: TlsMode
) -> None:
    async with smtp_server(ServerConfig(tls_context=pki.server)) as server:
        session = await open_session(server, tls=mode, context=pki.client)
        assert session.tls_active
        # RFC 3207 §4.2: capabilities come from the EHLO after TLS.
        assert not session.capabilities.starttls
        assert session.capabilities.pipelining
        result = await session.deliver(envelope(OK))
        await session.quit()
        connection = await finished(server)
    assert result.with_status("delivered") == (OK,)
    assert connection.verbs == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert connection.messages[0].tls
    assert connection.messages[0].data == crlf_message(MESSAGE)


async def test_opportunistic_without_starttls_offered_delivers_in_the_clear() -> None:
    async with smtp_server(ServerConfig(tls_context=None)) as server:
        # The default context: verification on, never used here.
        session = await open_session(server, tls=TlsMode.OPPORTUNISTIC)
        assert not session.tls_active
        result = await session.deliver(envelope(OK))
        await session.quit()
        connection = await finished(server)
    assert result.with_status("delivered") == (OK,)
    assert "STARTTLS" not in connection.verbs
    assert not connection.messages[0].tls


async def test_required_without_starttls_offered_defers_and_sends_nothing() -> None:
    async with smtp_server(ServerConfig(tls_context=None)) as server:
        with pytest.raises(TlsRequiredError) as info:
            await open_session(server, tls=TlsMode.REQUIRED)
        connection = await finished(server)
    error = info.value
    assert isinstance(error, TransientSmtpError)  # retry logic: deferred
    assert error.reason == "STARTTLS required but not offered by the server"
    assert (error.reply.code, error.reply.enhanced) == (454, "4.7.4")
    assert error.phase == "STARTTLS"
    assert connection.verbs == ["EHLO", "QUIT"]


async def test_starttls_refused_defers_when_required_and_goes_on_in_the_clear_otherwise(
    pki: Pki,
) -> None:
    config = ServerConfig(tls_context=pki.server, starttls_reply="454 4.7.0 TLS not available")
    async with smtp_server(config) as server:
        with pytest.raises(TlsRequiredError) as info:
            await open_session(server, tls=TlsMode.REQUIRED, context=pki.client)
        assert info.value.server_reply == SmtpReply(454, ("TLS not available",), "4.7.0")
        assert "refused by the server: 454 4.7.0" in info.value.reason

        session = await open_session(server, tls=TlsMode.OPPORTUNISTIC, context=pki.client)
        assert not session.tls_active
        result = await session.deliver(envelope(OK))
        await session.quit()
    required, opportunistic = server.connections
    assert required.verbs == ["EHLO", "STARTTLS", "QUIT"]
    assert opportunistic.verbs == ["EHLO", "STARTTLS", "MAIL", "RCPT", "DATA", "QUIT"]
    assert result.with_status("delivered") == (OK,)


@pytest.mark.parametrize(
    ("mode", "error"),
    [(TlsMode.REQUIRED, TlsRequiredError), (TlsMode.OPPORTUNISTIC, TlsHandshakeError)],
)
async def test_failed_tls_handshake_ends_the_session(
    pki: Pki, mode: TlsMode, error: type[Exception]
) -> None:
    async with smtp_server(ServerConfig(tls_context=pki.server)) as server:
        with pytest.raises(error, match=r"handshake failed.*CERTIFICATE_VERIFY_FAILED"):
            await open_session(server, tls=mode, context=pki.stranger)
        connection = await finished(server)
    assert connection.verbs == ["EHLO", "STARTTLS"]
    assert connection.messages == []


# -- SIZE, 8BITMIME, SMTPUTF8 -------------------------------------------------------------


async def test_message_over_advertised_size_is_bounced_without_sending() -> None:
    small = b"x" * 50 + b"\n.y\n"  # 50 + 2 + 2 + 2 = 56 octets once CRLF; unstuffed
    async with smtp_server(ServerConfig(size=100)) as server:
        session = await open_session(server)
        big = await session.deliver(envelope(OK, OK2, message=b"x" * 101))
        fits = await session.deliver(envelope(OK, message=small))
        await session.quit()
        connection = await finished(server)
    assert [(r.status, r.reply.code, r.reply.enhanced) for r in big.recipients] == [
        ("bounced", 552, "5.3.4"),
        ("bounced", 552, "5.3.4"),
    ]
    assert "SIZE limit of 100" in big.recipients[0].reply.text
    assert fits.with_status("delivered") == (OK,)
    # Only the message that fits was offered; SIZE= is its RFC 1870 size
    # (CRLF counted, the stuffing dot and the terminator not).
    assert connection.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    (received,) = connection.messages
    assert received.mail_params == f" SIZE={len(received.data)}"
    assert len(received.data) == 56


@pytest.mark.parametrize("advertised", [True, False])
async def test_8bit_body_declares_8bitmime_only_when_advertised_and_is_sent_anyway(
    advertised: bool,
) -> None:
    message = "Subject: café\n\nna\xefve \xff\n".encode("latin-1")
    config = ServerConfig(eight_bit_mime=advertised)
    result, connection = await deliver_once(config, envelope(OK, message=message))
    assert result.with_status("delivered") == (OK,)
    received = connection.messages[0]
    assert ("BODY=8BITMIME" in received.mail_params.split()) is advertised
    assert received.data == crlf_message(message)


async def test_non_ascii_address_needs_smtputf8() -> None:
    unicode_rcpt = "josé@dst.test"
    refused, connection = await deliver_once(ServerConfig(smtputf8=False), envelope(unicode_rcpt))
    assert [(r.status, r.reply.code, r.reply.enhanced) for r in refused.recipients] == [
        ("bounced", 553, "5.6.7")
    ]
    assert connection.verbs == ["EHLO", "QUIT"]

    accepted, connection = await deliver_once(ServerConfig(smtputf8=True), envelope(unicode_rcpt))
    assert accepted.with_status("delivered") == (unicode_rcpt,)
    assert connection.messages[0].recipients == (unicode_rcpt,)
    assert "SMTPUTF8" in connection.messages[0].mail_params.split()


# -- the bytes on the wire ----------------------------------------------------------------

PIECES = st.sampled_from(
    [b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\xff", b"x"]
)


@settings(max_examples=60, deadline=None)
@given(message=st.lists(PIECES | st.binary(max_size=16), max_size=24).map(b"".join))
async def test_message_arrives_byte_exactly(message: bytes) -> None:
    config = ServerConfig(size=10**6)
    result, connection = await deliver_once(config, envelope(OK, message=message))
    assert result.with_status("delivered") == (OK,)
    (received,) = connection.messages
    assert received.raw == prepare_data(message)  # sent as prepare_data made it
    assert received.data == crlf_message(message)
    assert f"SIZE={len(received.data)}" in received.mail_params.split()


async def test_large_message_with_dot_lines_arrives_byte_exactly_over_several_writes() -> None:
    line = b".leading dot, then some text to make the line long enough\n"
    message = b"Subject: big\n\n" + line * 10_000  # ~600 KB: several data blocks
    result, connection = await deliver_once(ServerConfig(), envelope(OK, message=message))
    assert result.with_status("delivered") == (OK,)
    assert connection.messages[0].data == crlf_message(message)


# -- connection loss ---------------------------------------------------------------


async def test_421_at_rcpt_raises_connection_lost_and_the_session_is_closed() -> None:
    async with smtp_server(ServerConfig(reply_421_at=Command.RCPT)) as server:
        session = await open_session(server)
        with pytest.raises(ConnectionLostError, match=r"421 4\.3\.2"):
            await session.deliver(envelope(OK))
        assert not session.usable
        with pytest.raises(ConnectionLostError):
            await session.deliver(envelope(OK))
        await session.quit()  # a no-op now
        connection = await finished(server)
    assert connection.messages == []


@pytest.mark.parametrize(
    ("config", "content_arrived"),
    [
        (ServerConfig(close_after_data_bytes=1000), False),
        (ServerConfig(close_at=Command.DATA_END), True),
        (ServerConfig(close_at=Command.MAIL, pipelining=False), False),
        (ServerConfig(reply_421_at=Command.DATA_END), True),
    ],
    ids=["mid-data", "before-data-end-reply", "before-mail-reply", "421-at-data-end"],
)
async def test_server_closing_mid_transaction_is_connection_lost(
    config: ServerConfig, content_arrived: bool
) -> None:
    message = b"y" * 300 + b"\n" + b"z" * 300_000 + b"\n"
    async with smtp_server(config) as server:
        session = await open_session(server)
        with pytest.raises(ConnectionLostError):
            await session.deliver(envelope(OK, message=message))
        assert not session.usable
        connection = await finished(server)
    assert bool(connection.messages) is content_arrived
    assert "QUIT" not in connection.verbs


# -- deadlines (virtual time) -------------------------------------------------------------


async def start_in_memory(
    nursery: trio.Nursery, config: ServerConfig, **timeouts: float
) -> tuple[SmtpSession, SmtpTestServer]:
    server = SmtpTestServer(config)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle, server_stream)
    session = await SmtpSession.start(
        client_stream, ehlo=EHLO_NAME, tls=TlsMode.DISABLED, timeouts=timeouts or None
    )
    return session, server


async def test_slow_data_end_reply_times_out_at_ten_minutes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        session, server = await start_in_memory(
            nursery, ServerConfig(delays={Command.DATA_END: 3600})
        )
        started = trio.current_time()
        with pytest.raises(SmtpTimeoutError, match="reply to DATA-END: not done within 600 s"):
            await session.deliver(envelope(OK))
        assert trio.current_time() - started == 600  # RFC 5321 §4.5.3.2.6
        assert not session.usable
    # The content had arrived; the server never got to answer.
    assert server.connections[0].messages[0].data == crlf_message(MESSAGE)


async def test_reply_deadlines_can_be_overridden_per_phase(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = ServerConfig(delays={Command.RCPT: 200})
    async with trio.open_nursery() as nursery:
        default, _ = await start_in_memory(nursery, config)
        started = trio.current_time()
        result = await default.deliver(envelope(OK))  # 200 s < 5 minutes
        assert trio.current_time() - started == 200
        assert result.with_status("delivered") == (OK,)

        impatient, _ = await start_in_memory(nursery, config, RCPT=30)
        started = trio.current_time()
        with pytest.raises(SmtpTimeoutError, match="reply to RCPT: not done within 30 s"):
            await impatient.deliver(envelope(OK))
        assert trio.current_time() - started == 30
        nursery.cancel_scope.cancel()


async def test_slow_greeting_times_out_and_closes_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = SmtpTestServer(ServerConfig(delays={Command.GREETING: 301}))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream)
        with pytest.raises(SmtpTimeoutError, match="reply to greeting: not done within 300 s"):
            await SmtpSession.start(client_stream, ehlo=EHLO_NAME, tls=TlsMode.DISABLED)
        assert trio.current_time() == 300
    # When the server finally speaks, nobody is listening any more.
    assert server.connections[0].error is not None
    assert server.connections[0].commands == []


async def test_stalled_receiver_times_out_on_a_data_block_after_three_minutes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # lockstep streams: a write returns only once the peer has read it all.
    server = SmtpTestServer(ServerConfig(stall_after_data_bytes=1))
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    message = b"z" * (3 * DATA_BLOCK_SIZE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream)
        session = await SmtpSession.start(client_stream, ehlo=EHLO_NAME, tls=TlsMode.DISABLED)
        started = trio.current_time()
        with pytest.raises(SmtpTimeoutError, match="block of message content: not done within 180"):
            await session.deliver(envelope(OK, message=message))
        assert trio.current_time() - started == 180  # RFC 5321 §4.5.3.2.5
        nursery.cancel_scope.cancel()


async def test_one_session_serves_one_task_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        session, _ = await start_in_memory(nursery, ServerConfig(delays={Command.RCPT: 10}))
        nursery.start_soon(session.deliver, envelope(OK))
        await trio.sleep(1)
        with pytest.raises(trio.BusyResourceError):
            await session.deliver(envelope(OK2))
        await trio.sleep(10)
        assert session.usable  # the first delivery finished normally
        result = await session.deliver(envelope(OK2))
        assert result.with_status("delivered") == (OK2,)
        nursery.cancel_scope.cancel()


async def test_unknown_timeout_key_is_refused_and_the_stream_closed() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="unknown key 'MAILX'"):
        await SmtpSession.start(client_stream, ehlo=EHLO_NAME, timeouts={"MAILX": 1.0})
    assert await server_stream.receive_some() == b""  # closed: EOF


def test_envelope_needs_a_recipient() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        Envelope(SENDER, (), b"")
