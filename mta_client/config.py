"""mta_client configuration: the egress pool, DNS and SMTP settings.

YAML, read with the same rules as kumoproxy's (:mod:`kumoproxy.yamlconfig`):
every error names its key path and line, all are reported together, and
unknown keys are errors.

```yaml
egress:
  pool:
    - source: 203.0.113.10          # the egress IP (must be one of the proxy's sources)
      proxy: "10.0.5.10:1080"       # kumoproxy listener; absent = direct from this host
      protocol: socks5              # socks5 | proxy
      username: mta1                # optional RFC 1929 credentials (socks5)
      password: "..."
      ehlo: mta1.example.com
      weight: 1
dns:
  nameservers: ["10.0.0.53:53"]     # optional; default: the system's
  routes:                           # optional MX overrides (smart hosts, tests)
    example.com: "smtp.example.net:2525"
smtp:
  port: 25
  tls: opportunistic                # opportunistic | required | disabled
  timeouts: {greeting: 5m, mail: 5m, rcpt: 5m, data: 2m, data_block: 3m, data_end: 10m}
```
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kumoproxy.yamlconfig import (
    ConfigErrors,
    IPAddress,
    Reader,
    compose,
    join,
    parse_address,
    parse_duration,
    parse_host_port,
    parse_port,
    parse_positive_int,
    read_config_file,
)

Protocol = Literal["socks5", "proxy"]
TlsSetting = Literal["opportunistic", "required", "disabled"]

#: RFC 5321 §4.5.3.2 reply timeouts, by the name used in ``smtp.timeouts``.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "greeting": 300.0,
    "mail": 300.0,
    "rcpt": 300.0,
    "data": 120.0,
    "data_block": 180.0,
    "data_end": 600.0,
}


@dataclass(frozen=True, slots=True)
class PoolEntry:
    """One egress source and how to reach destinations from it."""

    source: IPAddress
    proxy: tuple[IPAddress, int] | None = None
    protocol: Protocol = "socks5"
    username: str | None = None
    password: str | None = None
    ehlo: str = field(default_factory=socket.gethostname)
    weight: int = 1


@dataclass(frozen=True, slots=True)
class DnsConfig:
    nameservers: tuple[tuple[str, int], ...] = ()
    routes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    port: int = 25
    tls: TlsSetting = "opportunistic"
    timeouts: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))


@dataclass(frozen=True, slots=True)
class ClientConfig:
    pool: tuple[PoolEntry, ...]
    dns: DnsConfig = field(default_factory=DnsConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    origin: str = "<string>"

    def entry_for(self, source: IPAddress) -> PoolEntry | None:
        for entry in self.pool:
            if entry.source == source:
                return entry
        return None


def _pool_entry(r: Reader, value: Any, path: str) -> PoolEntry | None:
    keys = ("source", "proxy", "protocol", "username", "password", "ehlo", "weight")
    m = r.mapping(value, path, keys)
    if m is None:
        return None
    if "source" not in m:
        r.error(join(path, "source"), "is required")
        return None
    source = r.typed(m["source"], join(path, "source"), parse_address, "an IP address")
    proxy = None
    if m.get("proxy") is not None:
        proxy = r.typed(m["proxy"], join(path, "proxy"), parse_host_port, '"ip:port"')
    protocol = m.get("protocol", "socks5")
    if protocol not in ("socks5", "proxy"):
        r.error(join(path, "protocol"), f"must be socks5 or proxy, got {protocol!r}")
        return None
    username, password = m.get("username"), m.get("password")
    for key, text in (("username", username), ("password", password)):
        if text is not None and (not isinstance(text, str) or not 1 <= len(text.encode()) <= 255):
            r.error(join(path, key), "must be a string of 1-255 bytes (RFC 1929)")
    if (username is None) != (password is None):
        r.error(path, "username and password go together")
    if username is not None and (protocol != "socks5" or proxy is None):
        r.error(join(path, "username"), "credentials need a socks5 proxy")
    ehlo = m.get("ehlo", socket.gethostname())
    if not isinstance(ehlo, str) or not ehlo or any(c.isspace() for c in ehlo):
        r.error(join(path, "ehlo"), "must be a host name")
    weight = r.typed(m.get("weight", 1), join(path, "weight"), parse_positive_int, "a weight >= 1")
    if source is None or weight is None:
        return None
    return PoolEntry(source, proxy, protocol, username, password, str(ehlo), weight)


def _dns(r: Reader, value: Any) -> DnsConfig:
    m = r.mapping(value, "dns", ("nameservers", "routes"))
    if not m:
        return DnsConfig()
    servers: list[tuple[str, int]] = []
    for i, item in enumerate(r.sequence(m.get("nameservers"), "dns.nameservers") or []):
        text = item if isinstance(item, str) and ":" in item else f"{item}:53"
        parsed = r.typed(text, f"dns.nameservers[{i}]", parse_host_port, '"ip" or "ip:port"')
        if parsed is not None:
            servers.append((str(parsed[0]), parsed[1]))
    routes: dict[str, str] = {}
    raw_routes = m.get("routes") or {}
    if not isinstance(raw_routes, dict):
        r.error("dns.routes", "must be a mapping of domain to host:port")
    else:
        for domain, target in raw_routes.items():
            if not isinstance(target, str) or not target:
                r.error(join("dns.routes", str(domain)), 'must be "host:port"')
            else:
                routes[str(domain).lower().rstrip(".")] = target
    return DnsConfig(tuple(servers), routes)


def _smtp(r: Reader, value: Any) -> SmtpConfig:
    m = r.mapping(value, "smtp", ("port", "tls", "timeouts"))
    if not m:
        return SmtpConfig()
    port = r.typed(m.get("port", 25), "smtp.port", parse_port, "a port")
    tls = m.get("tls", "opportunistic")
    if tls not in ("opportunistic", "required", "disabled"):
        r.error("smtp.tls", f"must be opportunistic, required or disabled, got {tls!r}")
        tls = "opportunistic"
    timeouts = dict(DEFAULT_TIMEOUTS)
    raw = r.mapping(m.get("timeouts"), "smtp.timeouts", DEFAULT_TIMEOUTS) or {}
    for key, text in raw.items():
        if key in DEFAULT_TIMEOUTS:
            seconds = r.typed(text, f"smtp.timeouts.{key}", parse_duration, "a duration")
            if seconds is not None:
                timeouts[key] = seconds
    return SmtpConfig(port or 25, tls, timeouts)


def parse_client_config(text: str, *, origin: str = "<string>") -> ClientConfig:
    """Parse and validate; raises :class:`ConfigErrors` with every problem."""
    data, lines = compose(text, origin)
    r = Reader(lines)
    top = r.mapping(data, "", ("egress", "dns", "smtp"))
    if top is None:
        raise ConfigErrors(r.errors)
    egress = r.mapping(top.get("egress"), "egress", ("pool",)) or {}
    pool = []
    for i, item in enumerate(r.sequence(egress.get("pool"), "egress.pool") or []):
        entry = _pool_entry(r, item, f"egress.pool[{i}]")
        if entry is not None:
            pool.append(entry)
    if not egress.get("pool"):
        r.error("egress.pool", "list at least one egress source")
    sources = [e.source for e in pool]
    if len(set(sources)) != len(sources):
        r.error("egress.pool", "each source may appear once")
    dns, smtp = _dns(r, top.get("dns")), _smtp(r, top.get("smtp"))
    if r.errors:
        raise ConfigErrors(r.errors)
    return ClientConfig(tuple(pool), dns, smtp, origin)


def load_client_config(path: Path) -> ClientConfig:
    """Read and validate a config file. Raises :class:`ConfigErrors`."""
    return parse_client_config(read_config_file(path), origin=str(path))
