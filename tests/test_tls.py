"""SOCKS5 over TLS with client certificates, real TLS over real loopback sockets.

Certificates come from trustme: one CA for the server, one CA whose
certificates clients must present (``tls.client_ca``), and a stranger CA.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from kumoproxy.proto import socks5
from kumoproxy.server import ReloadError
from kumoproxy.session import Outcome
from tests.netkit import (
    connect,
    make_config,
    peer_closed,
    read_replies,
    read_to_eof,
    read_until,
    running_service,
    socks5_bind_connect_bytes,
    target_server,
)

IP = ipaddress.ip_address


@dataclass
class Pki:
    server_ca: trustme.CA
    client_ca: trustme.CA
    stranger_ca: trustme.CA
    config_yaml: str

    def client_context(self, issuer: trustme.CA | None) -> ssl.SSLContext:
        """A client that trusts the server, with a certificate from ``issuer`` (or none)."""
        context = ssl.create_default_context()
        self.server_ca.configure_trust(context)
        if issuer is not None:
            issuer.issue_cert("mta1.example.test").configure_cert(context)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server_cert = server_ca.issue_cert("localhost", "127.0.0.1")
    cert, key, clients = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "clients.pem"
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(cert))
    server_cert.private_key_pem.write_to_path(str(key))
    client_ca.cert_pem.write_to_path(str(clients))
    listener = f"""
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
    tls:
      certificate: {cert}
      private_key: {key}
      client_ca: {clients}
"""
    return Pki(server_ca, client_ca, trustme.CA(), listener)


def tls_config(pki: Pki, extra: str = "") -> str:
    return pki.config_yaml + (
        "sources: [127.0.0.2]\n"
        "clients:\n  allow: [127.0.0.0/8]\n"
        "destinations:\n  ports: any\n  allow: [127.0.0.0/8]\n" + extra
    )


async def test_client_with_a_certificate_from_client_ca_completes_socks5_over_tls(
    pki: Pki,
) -> None:
    config = make_config(base=tls_config(pki))
    async with running_service(config) as svc, target_server() as target:
        raw = await connect(svc.address("socks5"))
        stream = trio.SSLStream(raw, pki.client_context(pki.client_ca), server_hostname="localhost")
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"),
            socks5.Endpoint(target.address[0], target.port),
            payload=b"QUIT\r\n",
        )
        async with stream:
            await stream.send_all(data)
            *_, reply = await read_replies(stream, client, 3)
            answer = await read_until(stream, b"QUIT\r\n", client.trailing_data)
        record = await svc.next_record()
    assert reply == socks5.ReplyEvent(
        socks5.Reply.SUCCEEDED, socks5.Endpoint(*target.peers[0].address)
    )
    assert target.peers[0].address[0] == IP("127.0.0.2")
    assert answer.endswith(b"QUIT\r\n")
    assert record.outcome is Outcome.OK


async def test_tls_session_ends_cleanly_when_the_destination_closes(pki: Pki) -> None:
    """TLS cannot half-close: the destination's EOF ends the whole session, cleanly."""
    config = make_config(base=tls_config(pki))
    async with running_service(config) as svc, target_server() as target:
        raw = await connect(svc.address("socks5"))
        stream = trio.SSLStream(raw, pki.client_context(pki.client_ca), server_hostname="localhost")
        client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"),
            socks5.Endpoint(target.address[0], target.port),
            payload=b"CLOSE\r\n",  # the target answers BYE and closes first
        )
        async with stream:
            await stream.send_all(data)
            await read_replies(stream, client, 3)
            # A clean close_notify: no BrokenResourceError, just EOF after BYE.
            answer = await read_to_eof(stream, client.trailing_data)
        record = await svc.next_record()
    assert answer.startswith(b"HELLO 127.0.0.2 ")
    assert answer.endswith(b"CLOSE\r\nBYE 7\r\n")
    assert record.outcome is Outcome.OK
    assert record.reason == "done"


@pytest.mark.parametrize("issuer", ["none", "stranger"])
async def test_client_without_a_trusted_certificate_is_refused(pki: Pki, issuer: str) -> None:
    config = make_config(base=tls_config(pki))
    ca = None if issuer == "none" else pki.stranger_ca
    async with running_service(config) as svc, target_server() as target:
        raw = await connect(svc.address("socks5"))
        stream = trio.SSLStream(raw, pki.client_context(ca), server_hostname="localhost")
        _client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(target.address[0], target.port)
        )
        refused = False
        try:
            # TLS 1.3: the client's handshake may finish before the server has
            # judged its certificate; the refusal then arrives on first read.
            await stream.send_all(data)
            refused = await read_to_eof(stream) == b""
        except trio.BrokenResourceError:
            refused = True
        finally:
            await trio.aclose_forcefully(stream)
        record = await svc.next_record()
    assert refused
    assert target.peers == []
    assert record.outcome is Outcome.REFUSED
    assert record.reason == "auth"
    assert record.detail is not None
    assert record.detail.startswith("TLS handshake failed")


async def test_plain_socks5_on_a_tls_listener_is_refused(pki: Pki) -> None:
    config = make_config(base=tls_config(pki))
    async with running_service(config) as svc, target_server() as target:
        _client, data = socks5_bind_connect_bytes(
            IP("127.0.0.2"), socks5.Endpoint(target.address[0], target.port)
        )
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(data)
            assert await peer_closed(stream, wait=2.0)
        record = await svc.next_record()
    assert target.peers == []
    assert record.reason == "protocol"


async def test_a_client_that_never_finishes_tls_is_cut_at_the_handshake_deadline(
    pki: Pki, autojump_clock: trio.abc.Clock
) -> None:
    config = make_config(base=tls_config(pki, "timeouts:\n  handshake: 10s\n"))
    async with running_service(config) as svc:
        started = trio.current_time()
        async with await connect(svc.address("socks5")) as stream:
            await stream.send_all(b"\x16\x03\x01")  # the start of a ClientHello, then silence
            assert await peer_closed(stream, wait=60)
            cut_after = trio.current_time() - started
        record = await svc.next_record()
    assert record.outcome is Outcome.TIMEOUT
    assert 10 <= cut_after <= 10.5


async def test_reload_swaps_the_certificate_for_new_sessions(tmp_path: Path) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()

    def listener_yaml(ca: trustme.CA, name: str) -> str:
        cert = ca.issue_cert("localhost", "127.0.0.1")
        chain, key = tmp_path / f"{name}-cert.pem", tmp_path / f"{name}-key.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
        cert.private_key_pem.write_to_path(str(key))
        return (
            '\nlisteners:\n  - listen: "127.0.0.1:0"\n    protocol: socks5\n'
            f"    tls:\n      certificate: {chain}\n      private_key: {key}\n"
            "sources: [127.0.0.2]\nclients:\n  allow: [127.0.0.0/8]\n"
            "destinations:\n  ports: any\n  allow: [127.0.0.0/8]\n"
        )

    def trusting(ca: trustme.CA) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    async def handshake(svc_address: tuple[str, int], context: ssl.SSLContext) -> bool:
        stream = trio.SSLStream(await connect(svc_address), context, server_hostname="localhost")
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            return False
        finally:
            await trio.aclose_forcefully(stream)
        return True

    async with running_service(make_config(base=listener_yaml(old_ca, "old"))) as svc:
        address = svc.address("socks5")
        before = await handshake(address, trusting(old_ca))
        svc.service.reload(make_config(base=listener_yaml(new_ca, "new")))
        after_new = await handshake(address, trusting(new_ca))
        after_old = await handshake(address, trusting(old_ca))
    assert (before, after_new, after_old) == (True, True, False)


async def test_reload_that_removes_tls_from_a_listener_is_refused(pki: Pki) -> None:
    """Applied in place, it would turn the TLS listener into cleartext SOCKS5."""
    config = make_config(base=tls_config(pki))
    plain = make_config(
        base='\nlisteners:\n  - listen: "127.0.0.1:0"\n    protocol: socks5\n'
        "sources: [127.0.0.2]\nclients:\n  allow: [127.0.0.0/8]\n"
    )
    async with running_service(config) as svc:
        with pytest.raises(ReloadError, match="removes TLS; restart to apply"):
            svc.service.reload(plain)
        assert svc.service.config is config  # nothing was swapped
        raw = await connect(svc.address("socks5"))
        stream = trio.SSLStream(raw, pki.client_context(pki.client_ca), server_hostname="localhost")
        async with stream:
            await stream.do_handshake()  # still TLS
