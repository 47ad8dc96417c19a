"""mta_client's config: the documented keys, and a clear error for each mistake."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from kumoproxy.yamlconfig import ConfigErrors
from mta_client.config import DEFAULT_TIMEOUTS, load_client_config, parse_client_config

FULL = """
egress:
  pool:
    - source: 127.0.0.2
      proxy: "127.0.0.1:1080"
      username: mta1
      password: pw
      ehlo: mta1.example.test
    - source: 127.0.0.3
      proxy: "127.0.0.1:1081"
      protocol: proxy
      weight: 2
    - source: "::1"
dns:
  nameservers: ["127.0.0.1:5353", 127.0.0.9]
  routes:
    Example.COM.: "127.0.0.1:2525"
smtp:
  port: 2525
  tls: required
  timeouts: {data_end: 1m, greeting: 30s}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_client_config(text)
    return [str(e) for e in info.value.errors]


def test_every_documented_key_is_read() -> None:
    config = parse_client_config(FULL)
    first, second, third = config.pool
    assert first.source == ipaddress.ip_address("127.0.0.2")
    assert first.proxy == (ipaddress.ip_address("127.0.0.1"), 1080)
    assert (first.username, first.password, first.ehlo) == ("mta1", "pw", "mta1.example.test")
    assert (second.protocol, second.weight) == ("proxy", 2)
    assert third.proxy is None  # direct
    assert config.dns.nameservers == (("127.0.0.1", 5353), ("127.0.0.9", 53))
    assert config.dns.routes == {"example.com": "127.0.0.1:2525"}
    assert (config.smtp.port, config.smtp.tls) == (2525, "required")
    assert config.smtp.timeouts == {**DEFAULT_TIMEOUTS, "data_end": 60.0, "greeting": 30.0}
    assert config.entry_for(ipaddress.ip_address("127.0.0.3")) is second


def test_smtp_defaults_are_rfc_5321() -> None:
    config = parse_client_config("egress:\n  pool: [{source: 127.0.0.2}]\n")
    assert config.smtp.port == 25
    assert config.smtp.tls == "opportunistic"
    assert config.smtp.timeouts["data_end"] == 600.0  # RFC 5321 §4.5.3.2.6


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("egress: {pool: []}\n", "egress.pool (line 1): list at least one egress source"),
        (
            "egress: {pool: [{source: 127.0.0.2, bogus: 1}]}\n",
            "egress.pool[0].bogus (line 1): unknown key",
        ),
        (
            "egress: {pool: [{proxy: '127.0.0.1:1'}]}\n",
            "egress.pool[0].source (line 1): is required",
        ),
        ("egress: {pool: [{source: 127.0.0.2, protocol: http}]}\n", "must be socks5 or proxy"),
        (
            "egress: {pool: [{source: 127.0.0.2, username: u}]}\n",
            "username and password go together",
        ),
        (
            "egress: {pool: [{source: 127.0.0.2, username: u, password: p}]}\n",
            "credentials need a socks5 proxy",
        ),
        ("egress: {pool: [{source: 127.0.0.2, weight: 0}]}\n", "must be a weight >= 1"),
        (
            "egress: {pool: [{source: 127.0.0.2}, {source: 127.0.0.2}]}\n",
            "each source may appear once",
        ),
        ("egress: {pool: [{source: 127.0.0.2}]}\nsmtp: {tls: maybe}\n", "smtp.tls (line 2)"),
        (
            "egress: {pool: [{source: 127.0.0.2}]}\nsmtp: {timeouts: {quit: 1s}}\n",
            "smtp.timeouts.quit",
        ),
        ("egress: {pool: [{source: 127.0.0.2}]}\nspools: {}\n", "spools (line 2): unknown key"),
    ],
)
def test_each_mistake_gets_a_clear_error_with_its_key_path(text: str, expected: str) -> None:
    assert any(expected in line for line in errors(text)), errors(text)


def test_several_mistakes_are_reported_together() -> None:
    found = errors("egress: {pool: [{source: x}]}\nsmtp: {tls: maybe, port: 99999}\n")
    assert len(found) == 3


def test_unreadable_file_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as info:
        load_client_config(tmp_path / "missing.yaml")
    assert len(info.value.errors) == 1
    assert "cannot read" in str(info.value.errors[0])
