"""Tests for kumoproxy.config: the operator contract of product.md (configuration)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kumoproxy import policy
from kumoproxy.config import (
    DEFAULT_DENY,
    MAX_SOURCE_NETWORK_ADDRESSES,
    MAX_WORKERS,
    AdminConfig,
    Config,
    ConfigErrors,
    LimitsConfig,
    ListenerConfig,
    PortRange,
    TimeoutsConfig,
    TlsConfig,
    config_to_data,
    embedded_default,
    embedded_default_text,
    load_config,
    parse_config,
    parse_duration,
)
from kumoproxy.errors import ConfigError

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
net = ipaddress.ip_network

# A valid file config with every section; ``{...}`` slots inject one extra line
# at each nesting level (an empty slot leaves a blank line, which YAML ignores).
TEMPLATE = """\
listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    {listener}
    tls:
      certificate: /etc/kumoproxy/cert.pem
      private_key: /etc/kumoproxy/key.pem
      {tls}
admin:
  listen: "127.0.0.1:9880"
sources: [192.0.2.10, 192.0.2.11]
default_source: 192.0.2.10
clients:
  allow: [10.0.0.0/8]
auth:
  required: true
  users:
    - name: mta1
      password_hash: "$scrypt$ln=10,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5"
      {user}
destinations:
  ports: [25]
  {destinations}
limits:
  per_client: 10
  {limits}
timeouts:
  idle: 5m
  {timeouts}
log:
  format: console
{top}
"""

SLOTS = ("top", "listener", "tls", "user", "destinations", "limits", "timeouts")


#: A well-formed hash (its password is irrelevant here: config only checks the format).
HASH = "$scrypt$ln=10,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5"


def rich(**lines: str) -> str:
    """TEMPLATE with the given slots filled, the others left empty."""
    return TEMPLATE.format(**{slot: lines.get(slot, "") for slot in SLOTS})


def line_of(text: str, needle: str) -> int:
    """1-based number of the only line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, hits
    return hits[0]


def errors_of(text: str) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(text)
    return info.value.errors


def only_error(text: str) -> ConfigError:
    errors = errors_of(text)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


def minimal(extra: str = "", *, sources: str = "[192.0.2.10]") -> str:
    """A small valid file config plus ``extra`` top-level YAML."""
    head = textwrap.dedent(
        f"""\
        listeners:
          - listen: "0.0.0.0:1080"
            protocol: socks5
        sources: {sources}
        clients:
          allow: [10.0.0.0/8]
        """
    )
    return head + textwrap.dedent(extra)


# ---------------------------------------------------------------------------
# The embedded default
# ---------------------------------------------------------------------------


def test_embedded_default_listens_on_loopback_socks5_only() -> None:
    cfg = embedded_default()
    assert cfg.listeners == (ListenerConfig("127.0.0.1:1080", IPv4("127.0.0.1"), 1080, "socks5"),)
    assert cfg.admin == AdminConfig("127.0.0.1:9880", IPv4("127.0.0.1"), 9880)
    assert cfg.origin == "<embedded default>"


def test_embedded_default_admits_loopback_clients_only() -> None:
    cfg = embedded_default()
    assert cfg.clients_allow == (net("127.0.0.0/8"), net("::1/128"))
    assert policy.check_client(cfg, IPv4("127.0.0.1")) is None
    assert policy.check_client(cfg, IPv6("::1")) is None
    assert policy.check_client(cfg, IPv4("10.0.0.1")) is not None


def test_embedded_default_allows_loopback_destinations_on_any_port() -> None:
    cfg = embedded_default()
    assert cfg.destinations.ports is None
    for address, port in (("127.0.0.1", 25), ("127.9.8.7", 1), ("::1", 65535)):
        assert policy.check_destination(cfg, ipaddress.ip_address(address), port) is None


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "10.0.0.1", "192.168.1.1", "169.254.169.254", "2001:4860::8888"]
)
def test_embedded_default_denies_every_non_loopback_destination(address: str) -> None:
    refusal = policy.check_destination(embedded_default(), ipaddress.ip_address(address), 25)
    assert refusal is not None
    assert refusal.reason is policy.RefusalReason.DESTINATION


def test_embedded_default_sources_are_loopback_including_127_0_0_2_and_ipv6() -> None:
    cfg = embedded_default()
    assert IPv4("127.0.0.2") in cfg.sources
    assert IPv6("::1") in cfg.sources
    assert all(a.is_loopback for a in cfg.sources)
    assert cfg.default_source is None


# ---------------------------------------------------------------------------
# File config defaults
# ---------------------------------------------------------------------------


def test_file_config_allows_smtp_ports_only_by_default() -> None:
    cfg = parse_config(minimal())
    assert cfg.destinations.ports == (PortRange(25, 25), PortRange(465, 465), PortRange(587, 587))
    mx = IPv4("198.51.100.7")
    for port in (25, 465, 587):
        assert policy.check_destination(cfg, mx, port) is None
    for port in (24, 80, 443, 588):
        assert policy.check_destination(cfg, mx, port) is not None


def test_file_config_denies_special_networks_and_its_own_sources_by_default() -> None:
    cfg = parse_config(minimal(sources='[192.0.2.10, "2001:db8::10"]'))
    for network in DEFAULT_DENY:
        assert net(network) in cfg.destinations.deny
    assert net("192.0.2.10/32") in cfg.destinations.deny
    assert net("2001:db8::10/128") in cfg.destinations.deny
    assert cfg.destinations.allow == ()
    for own in ("192.0.2.10", "2001:db8::10", "127.0.0.1", "169.254.169.254"):
        assert policy.check_destination(cfg, ipaddress.ip_address(own), 25) is not None


def test_file_config_takes_documented_limits_and_timeouts_by_default() -> None:
    cfg = parse_config(minimal())
    assert cfg.limits == LimitsConfig(20000, 2000, 1000, 50)
    assert cfg.timeouts == TimeoutsConfig(handshake=10.0, connect=30.0, idle=300.0, drain=30.0)
    assert cfg.auth.required is False
    assert cfg.admin.listen is None


def test_file_config_requires_clients_allow() -> None:
    text = minimal().replace("clients:\n  allow: [10.0.0.0/8]\n", "")
    error = only_error(text)
    assert error.path == "clients.allow"


# ---------------------------------------------------------------------------
# Errors: paths, lines, collection
# ---------------------------------------------------------------------------


def test_template_is_valid() -> None:
    cfg = parse_config(rich())
    assert cfg.listeners[0].tls == TlsConfig(
        Path("/etc/kumoproxy/cert.pem"), Path("/etc/kumoproxy/key.pem")
    )
    assert cfg.auth.required is True


@pytest.mark.parametrize(
    ("slot", "path"),
    [
        ("top", "bogus_key"),
        ("listener", "listeners[0].bogus_key"),
        ("tls", "listeners[0].tls.bogus_key"),
        ("user", "auth.users[0].bogus_key"),
        ("destinations", "destinations.bogus_key"),
        ("limits", "limits.bogus_key"),
        ("timeouts", "timeouts.bogus_key"),
    ],
)
def test_unknown_key_is_an_error_with_its_path_and_line(slot: str, path: str) -> None:
    text = rich(**{slot: "bogus_key: 1"})
    error = only_error(text)
    assert error.path == path
    assert error.line == line_of(text, "bogus_key")
    assert "unknown key" in error.message


def test_misspelt_limit_is_not_silently_ignored() -> None:
    text = rich(limits="per_sorce: 5")
    error = only_error(text)
    assert error.path == "limits.per_sorce"
    assert "per_source" in error.message  # the hint lists the real keys


def test_all_errors_are_collected_in_one_config_errors() -> None:
    text = rich(top="bogus_key: 1", limits="per_source: 0", timeouts="connect: 5")
    errors = errors_of(text)
    assert {e.path: e.line for e in errors} == {
        "bogus_key": line_of(text, "bogus_key"),
        "limits.per_source": line_of(text, "per_source"),
        "timeouts.connect": line_of(text, "connect: 5"),
    }


def test_invalid_yaml_reports_its_line() -> None:
    text = "listeners: []\nsources: [192.0.2.10]\nclients: {allow: [10.0.0.0/8]\nlog: {}\n"
    error = only_error(text)
    assert error.path == ""
    assert "invalid YAML" in error.message
    assert error.line == 4  # where the parser noticed the unclosed flow mapping


def test_duplicate_key_is_an_error_with_its_line() -> None:
    text = minimal("limits:\n  per_client: 1\n  per_client: 2\n")
    error = only_error(text)
    assert error.path == "limits.per_client"
    assert error.message == "duplicate key"
    assert error.line == len(text.splitlines())


def test_duplicate_top_level_key_is_an_error() -> None:
    error = only_error(minimal("sources: [192.0.2.11]\n"))
    assert error.path == "sources"
    assert error.message == "duplicate key"


@pytest.mark.parametrize(
    ("listen", "hint"),
    [
        ("127.0.0.1", "ip:port"),
        ("::1:1080", "brackets"),
        ("localhost:1080", "ip:port"),
        ("127.0.0.1:65536", "ip:port"),
    ],
)
def test_bad_listen_address_is_rejected(listen: str, hint: str) -> None:
    text = minimal().replace('"0.0.0.0:1080"', f'"{listen}"')
    error = only_error(text)
    assert error.path == "listeners[0].listen"
    assert error.line == 2
    assert hint in error.message


def test_bracketed_ipv6_listen_address_is_accepted() -> None:
    cfg = parse_config(minimal().replace('"0.0.0.0:1080"', '"[::1]:1080"'))
    assert (cfg.listeners[0].host, cfg.listeners[0].port) == (IPv6("::1"), 1080)


@pytest.mark.parametrize("protocol", ["http", "socks4", "SOCKS5", "null"])
def test_protocol_other_than_socks5_or_proxy_is_rejected(protocol: str) -> None:
    error = only_error(minimal().replace("protocol: socks5", f"protocol: {protocol}"))
    assert error.path == "listeners[0].protocol"


def test_missing_protocol_is_rejected() -> None:
    error = only_error(minimal().replace("    protocol: socks5\n", ""))
    assert error.path == "listeners[0].protocol"


def test_proxy_listener_is_accepted() -> None:
    cfg = parse_config(minimal().replace("protocol: socks5", "protocol: proxy"))
    assert cfg.listeners[0].protocol == "proxy"


def test_tls_on_a_proxy_listener_is_rejected() -> None:
    text = rich().replace("protocol: socks5", "protocol: proxy")
    error = only_error(text)
    assert error.path == "listeners[0].tls"
    assert error.line == line_of(text, "certificate:")  # the line of the tls mapping


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("5m", 300.0), ("250ms", 0.25), ("1h", 3600.0), ("1.5s", 1.5)],
)
def test_duration_with_unit_is_parsed_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    cfg = parse_config(minimal(f"timeouts:\n  idle: {text}\n"))
    assert cfg.timeouts.idle == seconds


@pytest.mark.parametrize("text", ["5", "'5'", "5x", "-1s", "0s", "0ms", "s", "1.s", "1 d"])
def test_duration_without_valid_unit_or_positive_value_is_rejected(text: str) -> None:
    config_text = minimal(f"timeouts:\n  idle: {text}\n")
    error = only_error(config_text)
    assert error.path == "timeouts.idle"
    assert error.line == line_of(config_text, "idle:")


def test_ports_accept_single_ports_and_ranges() -> None:
    cfg = parse_config(minimal('destinations:\n  ports: [25, "19000-19999"]\n'))
    assert cfg.destinations.ports == (PortRange(25, 25), PortRange(19000, 19999))
    mx = IPv4("198.51.100.7")
    for port in (25, 19000, 19500, 19999):
        assert policy.check_destination(cfg, mx, port) is None
    for port in (26, 18999, 20000):
        assert policy.check_destination(cfg, mx, port) is not None


def test_ports_any_allows_every_port() -> None:
    cfg = parse_config(minimal("destinations:\n  ports: any\n"))
    assert cfg.destinations.ports is None
    assert policy.check_destination(cfg, IPv4("198.51.100.7"), 8080) is None


@pytest.mark.parametrize("port", ['"20-10"', "70000", '"x"', '"1-2-3"', "-1", "true", '"all"'])
def test_bad_port_entry_is_rejected(port: str) -> None:
    error = only_error(minimal(f"destinations:\n  ports: [25, {port}]\n"))
    assert error.path == "destinations.ports[1]"


def test_default_source_must_be_one_of_the_sources() -> None:
    error = only_error(minimal("default_source: 192.0.2.99\n"))
    assert error.path == "default_source"
    assert "not in sources" in error.message


def test_source_network_expands_to_its_hosts() -> None:
    cfg = parse_config(minimal(sources="[192.0.2.8/30]"))
    assert cfg.sources == frozenset({IPv4("192.0.2.9"), IPv4("192.0.2.10")})


def test_source_network_of_the_maximum_size_is_accepted() -> None:
    cfg = parse_config(minimal(sources="[10.20.0.0/16]"))
    assert MAX_SOURCE_NETWORK_ADDRESSES == 65536
    assert len(cfg.sources) == 65534  # hosts(): no network or broadcast address


def test_source_network_larger_than_the_maximum_is_rejected() -> None:
    error = only_error(minimal(sources="[192.0.2.10, 10.20.0.0/15]"))
    assert error.path == "sources[1]"
    assert "too large" in error.message


@pytest.mark.parametrize(
    ("extra", "sources", "path"),
    [
        ("", '["::ffff:192.0.2.10"]', "sources[0]"),
        ('default_source: "::ffff:192.0.2.10"\n', "[192.0.2.10]", "default_source"),
    ],
)
def test_v4_mapped_address_is_rejected(extra: str, sources: str, path: str) -> None:
    errors = errors_of(minimal(extra, sources=sources))
    assert path in [e.path for e in errors]
    assert any("v4-mapped" in e.message for e in errors)


def test_v4_mapped_source_network_is_rejected() -> None:
    error = only_error(minimal(sources='["::ffff:192.0.2.10/128"]'))
    assert error.path == "sources[0]"


USERS = """\
auth:
  required: {required}
  users:
{users}
"""


def auth(users: str, *, required: bool = False) -> str:
    return USERS.format(required="true" if required else "false", users=users)


def test_user_sources_must_be_in_top_level_sources() -> None:
    users = f"    - {{name: mta1, password_hash: '{HASH}', sources: [192.0.2.10, 192.0.2.99]}}\n"
    error = only_error(minimal(auth(users)))
    assert error.path == "auth.users[0].sources"
    assert "192.0.2.99" in error.message


def test_user_sources_within_top_level_sources_are_kept() -> None:
    users = f"    - {{name: mta1, password_hash: '{HASH}', sources: [192.0.2.10]}}\n"
    cfg = parse_config(minimal(auth(users), sources="[192.0.2.10, 192.0.2.11]"))
    user = cfg.auth.user("mta1")
    assert user is not None
    assert user.sources == frozenset({IPv4("192.0.2.10")})


def test_auth_required_without_users_is_rejected() -> None:
    error = only_error(minimal("auth:\n  required: true\n"))
    assert error.path == "auth.users"


@pytest.mark.parametrize("name", ["mta+1", "+", "a+192.0.2.10"])
def test_user_name_with_plus_is_rejected(name: str) -> None:
    users = f"    - {{name: \"{name}\", password_hash: '{HASH}'}}\n"
    error = only_error(minimal(auth(users)))
    assert error.path == "auth.users[0].name"
    assert "'+'" in error.message


def test_user_defined_twice_is_rejected() -> None:
    users = f"    - {{name: mta1, password_hash: '{HASH}'}}\n" * 2
    error = only_error(minimal(auth(users)))
    assert error.path == "auth.users[1].name"


# ---------------------------------------------------------------------------
# Round trip and loading
# ---------------------------------------------------------------------------

RICH = """\
listeners:
  - listen: "0.0.0.0:1080"
    protocol: socks5
    tls:
      certificate: /etc/kumoproxy/cert.pem
      private_key: /etc/kumoproxy/key.pem
      client_ca: /etc/kumoproxy/clients.pem
  - listen: "[::]:1081"
    protocol: socks5
  - listen: "192.0.2.1:1082"
    protocol: proxy
admin:
  listen: "[::1]:9880"
sources: [192.0.2.8/30, 192.0.2.20, "2001:db8::10", "2001:db8::20/127"]
default_source: 192.0.2.20
clients:
  allow: [10.0.0.0/8, "fd00::/8"]
auth:
  required: true
  users:
    - name: mta1
      password_hash: "$scrypt$ln=10,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5"
      sources: [192.0.2.9, 192.0.2.10, "2001:db8::10"]
      default_source: 192.0.2.10
    - name: mta2
      password_hash: "$scrypt$ln=10,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5"
destinations:
  ports: [25, 587, "19000-19999"]
  deny: [10.0.0.0/8, "fc00::/7"]
  allow: [10.1.0.0/16]
limits:
  max_sessions: 100
  per_client: 10
  per_source: 5
  per_source_destination: 2
timeouts:
  handshake: 250ms
  connect: 1.5s
  idle: 5m
  drain: 1h
log:
  format: console
  level: debug
"""


def round_trip(cfg: Config, *, embedded: bool) -> Config:
    text = yaml.safe_dump(config_to_data(cfg), sort_keys=False)
    again = parse_config(text, embedded=embedded)
    return dataclasses.replace(again, origin=cfg.origin)


def test_rich_config_parses_every_key() -> None:
    cfg = parse_config(RICH)
    assert len(cfg.listeners) == 3
    assert cfg.listeners[0].tls == TlsConfig(
        Path("/etc/kumoproxy/cert.pem"),
        Path("/etc/kumoproxy/key.pem"),
        Path("/etc/kumoproxy/clients.pem"),
    )
    assert cfg.sources == frozenset(
        {
            IPv4("192.0.2.9"),
            IPv4("192.0.2.10"),
            IPv4("192.0.2.20"),
            IPv6("2001:db8::10"),
            IPv6("2001:db8::20"),
            IPv6("2001:db8::21"),
        }
    )
    assert cfg.timeouts == TimeoutsConfig(handshake=0.25, connect=1.5, idle=300.0, drain=3600.0)
    assert cfg.limits == LimitsConfig(100, 10, 5, 2)
    assert cfg.log.format == "console"
    assert cfg.log.level == "debug"


def test_config_to_data_round_trips_a_rich_file_config() -> None:
    cfg = parse_config(RICH, origin="rich.yaml")
    assert round_trip(cfg, embedded=False) == cfg


def test_config_to_data_round_trips_a_file_config_with_defaults() -> None:
    cfg = parse_config(minimal())
    assert round_trip(cfg, embedded=False) == cfg


def test_config_to_data_round_trips_the_embedded_default() -> None:
    cfg = parse_config(embedded_default_text(), embedded=True, origin="<embedded default>")
    assert cfg == embedded_default()
    assert round_trip(cfg, embedded=True) == cfg


@pytest.mark.parametrize("duration", ["1000000s", "1234.5678s", "8760h", "1ms", "999ms", "61.25s"])
def test_config_to_data_round_trips_durations_exactly(duration: str) -> None:
    cfg = parse_config(minimal(f"timeouts:\n  idle: {duration}\n"))
    assert round_trip(cfg, embedded=False) == cfg


def durations() -> st.SearchStrategy[str]:
    """Valid durations (1 ms to under 365 days) with up to nine decimals."""
    largest = {"ms": 10**9, "s": 10**7, "m": 500_000, "h": 8759}
    return st.tuples(
        st.sampled_from(sorted(largest)).flatmap(
            lambda unit: st.tuples(st.integers(1, largest[unit]), st.just(unit))
        ),
        st.sampled_from(["", ".5", ".25", ".001", ".123456789"]),
    ).map(lambda t: f"{t[0][0]}{t[1]}{t[0][1]}")


@settings(max_examples=100, deadline=None)
@given(duration=durations())
def test_config_to_data_round_trips_any_duration(duration: str) -> None:
    cfg = parse_config(minimal(f"timeouts:\n  drain: {duration}\n"))
    assert round_trip(cfg, embedded=False) == cfg


def test_load_config_reads_a_file_and_records_its_origin(tmp_path: Path) -> None:
    path = tmp_path / "kumoproxy.yaml"
    path.write_text(RICH, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.origin == str(path)
    assert dataclasses.replace(cfg, origin="x") == parse_config(RICH, origin="x")


def test_load_config_on_a_missing_file_gives_one_error(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    [error] = info.value.errors
    assert error.message.startswith(f"cannot read {path}")
    assert "No such file" in error.message


# ---------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------


def test_workers_default_to_one_process() -> None:
    assert parse_config(minimal()).workers == 1
    assert embedded_default().workers == 1


def test_workers_auto_is_the_cpus_this_process_may_use() -> None:
    assert parse_config(minimal("workers: auto\n")).workers == min(
        MAX_WORKERS, len(os.sched_getaffinity(0))
    )
    assert parse_config(minimal("workers: 4\n")).workers == 4


@pytest.mark.parametrize("value", ["0", "65", "-1", "true", "two", "1.5"])
def test_workers_outside_1_to_64_or_auto_is_an_error(value: str) -> None:
    error = only_error(minimal(f"workers: {value}\n"))
    assert error.path == "workers"
    assert '"auto" or a count' in str(error)
    assert "1 to 64" in str(error)


def test_check_config_shows_the_workers_in_effect() -> None:
    assert config_to_data(parse_config(minimal("workers: 3\n")))["workers"] == 3
