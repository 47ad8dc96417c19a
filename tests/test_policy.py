"""Tests for kumoproxy.policy: clients, source selection, destinations."""

from __future__ import annotations

import ipaddress

import pytest

from kumoproxy.config import Config, UserConfig, embedded_default, parse_config
from kumoproxy.policy import (
    REPLY_NOT_ALLOWED,
    Refusal,
    RefusalReason,
    check_client,
    check_destination,
    family_matches,
    select_source,
)

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
ip = ipaddress.ip_address

POLICY = """\
listeners:
  - {listen: "127.0.0.1:1080", protocol: socks5}
sources: [192.0.2.10, 192.0.2.11, 192.0.2.12, "2001:db8::10"]
default_source: 192.0.2.10
clients:
  allow: [10.0.0.0/8, "2001:db8:1::/48"]
auth:
  users:
    - name: restricted
      password_hash: "$scrypt$ln=10,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5"
      sources: [192.0.2.11, 192.0.2.12]
      default_source: 192.0.2.12
    - name: free
      password_hash: "$scrypt$ln=10,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5"
destinations:
  ports: [25, "19000-19999"]
  allow: [10.1.2.0/24]
"""


@pytest.fixture
def cfg() -> Config:
    return parse_config(POLICY)


def user(cfg: Config, name: str) -> UserConfig:
    found = cfg.auth.user(name)
    assert found is not None
    return found


def refused(decision: object, reason: RefusalReason) -> Refusal:
    assert isinstance(decision, Refusal), decision
    assert decision.reason is reason
    assert decision.reply == REPLY_NOT_ALLOWED == 2
    return decision


# ---------------------------------------------------------------------------
# check_client
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("peer", ["10.0.0.1", "10.255.255.255", "2001:db8:1::5", "::ffff:10.2.3.4"])
def test_client_inside_clients_allow_is_admitted(cfg: Config, peer: str) -> None:
    assert check_client(cfg, ip(peer)) is None


@pytest.mark.parametrize("peer", ["11.0.0.1", "127.0.0.1", "2001:db8:2::5", "::1"])
def test_client_outside_clients_allow_is_refused(cfg: Config, peer: str) -> None:
    refusal = refused(check_client(cfg, ip(peer)), RefusalReason.CLIENT)
    assert peer in refusal.detail


def test_v4_mapped_client_is_checked_as_ipv4() -> None:
    cfg = embedded_default()  # allows 127.0.0.0/8 and ::1, not ::ffff:127.0.0.1
    assert check_client(cfg, IPv6("::ffff:127.0.0.1")) is None
    refusal = refused(check_client(cfg, IPv6("::ffff:192.0.2.1")), RefusalReason.CLIENT)
    assert "192.0.2.1 " in refusal.detail  # reported in its IPv4 form


# ---------------------------------------------------------------------------
# select_source
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["192.0.2.11", "2001:db8::10"])
def test_requested_source_in_sources_is_selected(cfg: Config, source: str) -> None:
    assert select_source(cfg, requested=ip(source), user=None) == ip(source)
    assert select_source(cfg, requested=ip(source), user=user(cfg, "free")) == ip(source)


def test_requested_source_not_in_sources_is_refused(cfg: Config) -> None:
    decision = select_source(cfg, requested=IPv4("198.51.100.1"), user=None)
    refusal = refused(decision, RefusalReason.SOURCE)
    assert "198.51.100.1" in refusal.detail


def test_requested_source_outside_the_users_allow_list_is_refused(cfg: Config) -> None:
    decision = select_source(cfg, requested=IPv4("192.0.2.10"), user=user(cfg, "restricted"))
    refusal = refused(decision, RefusalReason.SOURCE)
    assert "restricted" in refusal.detail


def test_requested_source_inside_the_users_allow_list_is_selected(cfg: Config) -> None:
    decision = select_source(cfg, requested=IPv4("192.0.2.11"), user=user(cfg, "restricted"))
    assert decision == IPv4("192.0.2.11")


def test_without_request_the_global_default_source_is_used(cfg: Config) -> None:
    assert select_source(cfg, requested=None, user=None) == IPv4("192.0.2.10")
    assert select_source(cfg, requested=None, user=user(cfg, "free")) == IPv4("192.0.2.10")


def test_users_default_source_wins_over_the_global_one(cfg: Config) -> None:
    decision = select_source(cfg, requested=None, user=user(cfg, "restricted"))
    assert decision == IPv4("192.0.2.12")


def test_without_request_or_default_the_kernel_chooses(cfg: Config) -> None:
    no_default = parse_config(POLICY.replace("default_source: 192.0.2.10\n", ""))
    assert no_default.default_source is None
    assert select_source(no_default, requested=None, user=None) is None
    assert select_source(no_default, requested=None, user=user(no_default, "free")) is None


# ---------------------------------------------------------------------------
# check_destination
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("port", [24, 26, 80, 18999, 20000])
def test_destination_port_outside_ports_is_refused(cfg: Config, port: int) -> None:
    refusal = refused(check_destination(cfg, IPv4("198.51.100.7"), port), RefusalReason.DESTINATION)
    assert f"port {port}" in refusal.detail


@pytest.mark.parametrize("port", [25, 19000, 19999])
def test_destination_port_inside_ports_is_allowed(cfg: Config, port: int) -> None:
    assert check_destination(cfg, IPv4("198.51.100.7"), port) is None


@pytest.mark.parametrize(
    "address", ["10.0.0.1", "127.0.0.1", "169.254.169.254", "192.0.2.10", "::1", "fe80::1"]
)
def test_denied_destination_is_refused(cfg: Config, address: str) -> None:
    refusal = refused(check_destination(cfg, ip(address), 25), RefusalReason.DESTINATION)
    assert "destinations.deny" in refusal.detail


def test_allow_is_an_exception_to_deny(cfg: Config) -> None:
    assert check_destination(cfg, IPv4("10.1.2.3"), 25) is None
    assert check_destination(cfg, IPv4("10.1.3.3"), 25) is not None  # just outside allow


def test_allow_does_not_lift_the_port_rule(cfg: Config) -> None:
    refused(check_destination(cfg, IPv4("10.1.2.3"), 80), RefusalReason.DESTINATION)


def test_v4_mapped_destination_is_checked_as_ipv4(cfg: Config) -> None:
    # denied as 10.0.0.0/8, excepted as 10.1.2.0/24, allowed as a public IPv4 address:
    # the ::ffff:0:0/96 deny entry must not be what decides.
    refusal = refused(
        check_destination(cfg, IPv6("::ffff:10.0.0.1"), 25), RefusalReason.DESTINATION
    )
    assert refusal.detail.startswith("10.0.0.1 ")
    assert check_destination(cfg, IPv6("::ffff:10.1.2.3"), 25) is None
    assert check_destination(cfg, IPv6("::ffff:198.51.100.7"), 25) is None


def test_v4_mapped_loopback_destination_is_allowed_by_the_embedded_default() -> None:
    assert check_destination(embedded_default(), IPv6("::ffff:127.0.0.1"), 8080) is None


# ---------------------------------------------------------------------------
# family_matches
# ---------------------------------------------------------------------------


def test_family_matches() -> None:
    assert family_matches(None, IPv4("198.51.100.7"))
    assert family_matches(None, IPv6("2001:db8::1"))
    assert family_matches(IPv4("192.0.2.10"), IPv4("198.51.100.7"))
    assert family_matches(IPv6("2001:db8::10"), IPv6("2001:db8::1"))
    assert not family_matches(IPv4("192.0.2.10"), IPv6("2001:db8::1"))
    assert not family_matches(IPv6("2001:db8::10"), IPv4("198.51.100.7"))
