"""Who may use which source IP, and where they may connect: with real curl.

The password hash comes from the real ``kumoproxy hash-password`` command,
pasted into the config as an operator would. curl is the SOCKS5 client where
a standard client fits (it cannot send BIND, so it picks a source with the
``name+<ip>`` username); our own client codec drives BIND-then-CONNECT.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Sequence

import pytest
import trio

from kumoproxy.config import Config, parse_config
from kumoproxy.proto import socks5
from kumoproxy.session import Outcome
from kumoproxy.throttle import FIRST_DELAY
from tests.netkit import (
    HttpTarget,
    RunningService,
    connect,
    http_server,
    read_replies,
    running_service,
    target_server,
)

IP = ipaddress.ip_address
PASSWORD = "correct horse battery staple"

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None, reason="needs curl (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def password_hash() -> str:
    """What `kumoproxy hash-password` prints, as an operator would paste it."""
    result = subprocess.run(
        [sys.executable, "-m", "kumoproxy", "hash-password"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def auth_config(password_hash: str, *, required: bool = True, destinations: str = "") -> Config:
    destinations = destinations or "destinations:\n  ports: any\n  allow: [127.0.0.0/8]\n"
    return parse_config(
        f"""
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
sources: [127.0.0.2, 127.0.0.3]
default_source: 127.0.0.2
clients:
  allow: [127.0.0.0/8]
auth:
  required: {"true" if required else "false"}
  users:
    - name: mta1
      password_hash: "{password_hash}"
    - name: limited
      password_hash: "{password_hash}"
      sources: [127.0.0.2]
{destinations}"""
    )


async def curl(
    svc: RunningService, url: str, *args: str, hostname: bool = False
) -> subprocess.CompletedProcess[bytes]:
    host, port = svc.address("socks5")
    proxy_flag = "--socks5-hostname" if hostname else "--socks5"
    command: Sequence[str] = [
        "curl", "--silent", "--show-error", "--max-time", "20",
        proxy_flag, f"{host}:{port}", *args, url,
    ]  # fmt: skip
    return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


def url(target: HttpTarget, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{target.port}/"


async def test_right_password_from_hash_password_works(password_hash: str) -> None:
    async with running_service(auth_config(password_hash)) as svc, http_server() as target:
        result = await curl(svc, url(target), "--proxy-user", f"mta1:{PASSWORD}")
        record = await svc.next_record()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"127.0.0.2"  # the default source
    assert record.user == "mta1"
    assert record.outcome is Outcome.OK


async def test_wrong_password_fails_and_connects_nothing(password_hash: str) -> None:
    async with running_service(auth_config(password_hash)) as svc, http_server() as target:
        result = await curl(svc, url(target), "--proxy-user", f"mta1:{PASSWORD}!")
        record = await svc.next_record()
    assert result.returncode != 0
    assert target.peers == []
    assert record.outcome is Outcome.REFUSED
    assert record.reason == "auth"
    assert record.detail is not None
    assert record.detail.startswith("wrong username or password for 'mta1'")


async def test_unknown_user_is_refused_like_a_wrong_password(password_hash: str) -> None:
    async with running_service(auth_config(password_hash)) as svc, http_server() as target:
        result = await curl(svc, url(target), "--proxy-user", f"nobody:{PASSWORD}")
        record = await svc.next_record()
    assert result.returncode != 0
    assert target.peers == []
    assert record.reason == "auth"


async def test_username_plus_source_picks_that_source(password_hash: str) -> None:
    async with running_service(auth_config(password_hash)) as svc, http_server() as target:
        result = await curl(svc, url(target), "--proxy-user", f"mta1+127.0.0.3:{PASSWORD}")
        record = await svc.next_record()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"127.0.0.3"
    assert target.peers == [IP("127.0.0.3")]
    assert record.source is not None
    assert record.source.startswith("127.0.0.3:")


async def test_socks5_hostname_localhost_works_where_policy_allows(password_hash: str) -> None:
    async with running_service(auth_config(password_hash)) as svc, http_server() as target:
        result = await curl(
            svc, url(target, "localhost"), "--proxy-user", f"mta1:{PASSWORD}", hostname=True
        )
        record = await svc.next_record()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"127.0.0.2"
    assert record.destination == f"127.0.0.1:{target.port}"  # resolved by the proxy


async def test_socks5_hostname_localhost_gets_rep_02_where_policy_denies(
    password_hash: str,
) -> None:
    config = auth_config(password_hash, destinations="destinations:\n  ports: any\n")
    async with running_service(config) as svc, http_server() as target:
        result = await curl(
            svc, url(target, "localhost"), "--proxy-user", f"mta1:{PASSWORD}", hostname=True
        )
        record = await svc.next_record()
    assert result.returncode != 0
    assert target.peers == []
    assert record.reply == 2
    assert record.reason == "destination"
    assert record.detail == "127.0.0.1 is in destinations.deny"


async def test_user_limited_to_one_source_asking_for_another_by_bind_gets_rep_02(
    password_hash: str,
) -> None:
    async with running_service(auth_config(password_hash)) as svc, target_server() as target:
        client = socks5.Socks5Client()
        data = client.send(socks5.Greeting((socks5.Method.USERNAME_PASSWORD,)))
        data += client.send(socks5.Credentials(b"limited", PASSWORD.encode()))
        data += client.send(
            socks5.Request(socks5.Command.BIND, socks5.Endpoint(IP("127.0.0.3"), 0))
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            events = await read_replies(stream, client, 3)
        record = await svc.next_record()
    assert events == [
        socks5.MethodSelection(socks5.Method.USERNAME_PASSWORD),
        socks5.AuthResult(True),
        socks5.ReplyEvent(socks5.Reply.NOT_ALLOWED),
    ]
    assert target.peers == []
    assert record.reason == "source"
    assert record.detail == "user limited may not use source 127.0.0.3"


async def test_auth_required_refuses_a_client_that_offers_no_credentials(
    password_hash: str,
) -> None:
    async with running_service(auth_config(password_hash)) as svc, http_server() as target:
        result = await curl(svc, url(target))
        record = await svc.next_record()
    assert result.returncode != 0
    assert target.peers == []
    assert record.reason == "auth"
    assert record.detail == "no acceptable authentication method offered"


async def test_auth_optional_still_checks_credentials_that_are_offered(
    password_hash: str,
) -> None:
    config = auth_config(password_hash, required=False)
    async with running_service(config) as svc, http_server() as target:
        anonymous = await curl(svc, url(target))
        wrong = await curl(svc, url(target), "--proxy-user", f"mta1:{PASSWORD}!")
        records = [await svc.next_record(), await svc.next_record()]
    assert anonymous.returncode == 0, anonymous.stderr
    assert anonymous.stdout == b"127.0.0.2"
    assert wrong.returncode != 0
    assert target.peers == [IP("127.0.0.2")]
    assert [r.reason for r in records] == ["done", "auth"]


FILE_DEFAULTS = """
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
sources: [127.0.0.2]
default_source: 127.0.0.2
clients:
  allow: [127.0.0.0/8]
"""


async def connect_reply(svc: RunningService, host: str, port: int) -> socks5.ReplyEvent:
    client = socks5.Socks5Client()
    data = client.send(socks5.Greeting((socks5.Method.NO_AUTH,)))
    data += client.send(socks5.Request(socks5.Command.CONNECT, socks5.Endpoint(IP(host), port)))
    async with await connect(svc.address("socks5")) as stream:
        await stream.send_all(data)
        *_, reply = await read_replies(stream, client, 2)
    assert isinstance(reply, socks5.ReplyEvent)
    return reply


@pytest.mark.parametrize(
    ("host", "port", "detail"),
    [
        ("127.0.0.1", 25, "127.0.0.1 is in destinations.deny"),
        ("127.0.0.5", 80, "port 80 is not in destinations.ports"),
    ],
)
async def test_file_config_defaults_refuse_loopback_and_non_smtp_ports(
    host: str, port: int, detail: str
) -> None:
    async with running_service(parse_config(FILE_DEFAULTS)) as svc:
        reply = await connect_reply(svc, host, port)
        record = await svc.next_record()
    assert reply == socks5.ReplyEvent(socks5.Reply.NOT_ALLOWED)
    assert record.detail == detail


async def test_an_allow_exception_lifts_the_default_deny() -> None:
    async with target_server() as target:
        config = parse_config(
            FILE_DEFAULTS
            + f"destinations:\n  ports: [25, 465, 587, {target.port}]\n"
            + "  allow: [127.0.0.1/32]\n"
        )
        async with running_service(config) as svc:
            reply = await connect_reply(svc, "127.0.0.1", target.port)
    assert reply.reply is socks5.Reply.SUCCEEDED
    assert target.peers[0].address[0] == IP("127.0.0.2")


async def test_repeated_failures_from_one_client_are_slowed_down(
    password_hash: str, mock_clock: trio.testing.MockClock
) -> None:
    # Jump virtual time only after real idleness, so the password check that
    # runs in a worker thread is never mistaken for waiting on a deadline.
    mock_clock.autojump_threshold = 0.5
    async with running_service(auth_config(password_hash)) as svc:
        waited = []
        for _ in range(3):
            client = socks5.Socks5Client()
            data = client.send(socks5.Greeting((socks5.Method.USERNAME_PASSWORD,)))
            data += client.send(socks5.Credentials(b"mta1", b"wrong"))
            async with await connect(svc.address("socks5")) as stream:
                started = trio.current_time()
                await stream.send_all(data)
                events = await read_replies(stream, client, 2)
                waited.append(trio.current_time() - started)
            assert events[-1] == socks5.AuthResult(False)
        details = [(await svc.next_record()).detail for _ in range(3)]
    expected = [FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY]
    for detail, delay, elapsed in zip(details, expected, waited, strict=True):
        assert detail is not None
        assert detail.endswith(f"failure reply delayed {delay:g}s")
        assert elapsed >= delay
