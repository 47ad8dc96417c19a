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
# The spooling sender (mta-client enqueue / run / queue):
spool:
  path: /var/spool/mta-client       # required by enqueue, run and queue
  scan_interval: 1s                 # how often run looks for newly enqueued messages
  shutdown_timeout: 60s             # SIGTERM: time for in-flight transactions to finish
retry:
  initial: 5m                       # first retry after a transient failure
  max: 4h                           # the doubling interval's cap
  max_age: 5d                       # then: Expiration record and a bounce
  jitter: 0.1                       # +-10% on each interval
events:
  path: /var/log/mta-client/events.jsonl   # "-" = stdout; absent = no event log
bounces:
  enabled: true                     # RFC 3464 reports to the envelope sender
  reporting_mta: mta1.example.com   # default: this host's name
  postmaster: postmaster@mta1.example.com
metrics:
  listen: "127.0.0.1:9125"          # optional Prometheus /metrics listener
shaping:                            # limits per (source, site): docs/shaping.md
  default: {connection_limit: 10, max_message_rate: 100/s}
redis:                              # optional: share the limits across sender nodes
  url: "redis://10.0.0.7:6379/0"
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
from mta_client.retry import RetryPolicy
from mta_client.shaping import RedisConfig, ShapingConfig, parse_redis, parse_shaping

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
class SpoolConfig:
    path: Path | None = None
    scan_interval: float = 1.0
    shutdown_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class BounceConfig:
    enabled: bool = True
    reporting_mta: str = field(default_factory=socket.gethostname)
    postmaster: str = ""

    def __post_init__(self) -> None:
        if not self.postmaster:
            object.__setattr__(self, "postmaster", f"postmaster@{self.reporting_mta}")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    pool: tuple[PoolEntry, ...]
    dns: DnsConfig = field(default_factory=DnsConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    events_path: Path | None = None
    bounces: BounceConfig = field(default_factory=BounceConfig)
    metrics_listen: tuple[IPAddress, int] | None = None
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    redis: RedisConfig | None = None
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


def _spool(r: Reader, value: Any, base: Path) -> SpoolConfig:
    m = r.mapping(value, "spool", ("path", "scan_interval", "shutdown_timeout"))
    if not m:
        return SpoolConfig()
    path = None
    if m.get("path") is not None:
        if not isinstance(m["path"], str) or not m["path"]:
            r.error("spool.path", "must be a directory path")
        else:
            path = base / m["path"]
    durations = {}
    for key, default in (("scan_interval", 1.0), ("shutdown_timeout", 60.0)):
        seconds = r.typed(m.get(key, default), f"spool.{key}", _duration, "a duration")
        durations[key] = default if seconds is None else seconds
    return SpoolConfig(path, durations["scan_interval"], durations["shutdown_timeout"])


def _duration(value: Any) -> float:
    """A duration string, or the number a default is given as."""
    return float(value) if isinstance(value, float) else parse_duration(value)


def _retry(r: Reader, value: Any) -> RetryPolicy:
    m = r.mapping(value, "retry", ("initial", "max", "max_age", "jitter"))
    if not m:
        return RetryPolicy()
    default = RetryPolicy()
    values: dict[str, float] = {}
    for key in ("initial", "max", "max_age"):
        if key in m:
            seconds = r.typed(m[key], f"retry.{key}", parse_duration, "a duration")
            if seconds is not None:
                values[key] = seconds
    if "jitter" in m:
        jitter = m["jitter"]
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
            r.error("retry.jitter", f"must be a fraction in [0, 1), got {jitter!r}")
        else:
            values["jitter"] = float(jitter)
    try:
        return RetryPolicy(
            initial=values.get("initial", default.initial),
            max=values.get("max", default.max),
            max_age=values.get("max_age", default.max_age),
            jitter=values.get("jitter", default.jitter),
        )
    except ValueError as exc:
        r.error("retry", str(exc))
        return default


def _events(r: Reader, value: Any, base: Path) -> Path | None:
    m = r.mapping(value, "events", ("path",))
    if not m or m.get("path") is None:
        return None
    text = m["path"]
    if not isinstance(text, str) or not text:
        r.error("events.path", 'must be a file path or "-" for stdout')
        return None
    return Path("-") if text == "-" else base / text


def _bounces(r: Reader, value: Any) -> BounceConfig:
    m = r.mapping(value, "bounces", ("enabled", "reporting_mta", "postmaster"))
    if not m:
        return BounceConfig()
    enabled = m.get("enabled", True)
    if not isinstance(enabled, bool):
        r.error("bounces.enabled", f"must be true or false, got {enabled!r}")
        enabled = True
    reporting = m.get("reporting_mta", socket.gethostname())
    if not isinstance(reporting, str) or not reporting or any(c.isspace() for c in reporting):
        r.error("bounces.reporting_mta", "must be a host name")
        reporting = socket.gethostname()
    postmaster = m.get("postmaster", "")
    if not isinstance(postmaster, str) or (postmaster and "@" not in postmaster):
        r.error("bounces.postmaster", "must be an address")
        postmaster = ""
    return BounceConfig(enabled, reporting, postmaster)


def _metrics(r: Reader, value: Any) -> tuple[IPAddress, int] | None:
    m = r.mapping(value, "metrics", ("listen",))
    if not m or m.get("listen") is None:
        return None
    return r.typed(m["listen"], "metrics.listen", parse_host_port, '"ip:port"')


def parse_client_config(
    text: str, *, origin: str = "<string>", base: Path | None = None
) -> ClientConfig:
    """Parse and validate; raises :class:`ConfigErrors` with every problem.

    Relative paths (``spool.path``, ``events.path``) are taken from ``base``,
    the config file's directory (default: the working directory).
    """
    data, lines = compose(text, origin)
    r = Reader(lines)
    sections = ("egress", "dns", "smtp", "spool", "retry", "events", "bounces", "metrics")
    top = r.mapping(data, "", (*sections, "shaping", "redis"))
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
    base = base or Path()
    config = ClientConfig(
        tuple(pool),
        dns,
        smtp,
        spool=_spool(r, top.get("spool"), base),
        retry=_retry(r, top.get("retry")),
        events_path=_events(r, top.get("events"), base),
        bounces=_bounces(r, top.get("bounces")),
        metrics_listen=_metrics(r, top.get("metrics")),
        shaping=parse_shaping(r, top.get("shaping")),
        redis=parse_redis(r, top.get("redis")),
        origin=origin,
    )
    if r.errors:
        raise ConfigErrors(r.errors)
    return config


def load_client_config(path: Path) -> ClientConfig:
    """Read and validate a config file. Raises :class:`ConfigErrors`."""
    return parse_client_config(read_config_file(path), origin=str(path), base=path.parent)
