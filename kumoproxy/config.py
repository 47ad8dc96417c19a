"""Configuration: YAML in, frozen dataclasses out.

The keys are a contract with operators (``shared/spec/product.md``). The file
is parsed once; every problem is reported with its dotted key path and YAML
line, and *all* problems are collected so ``kumoproxy check-config`` can list
them in one go. Unknown keys are errors: a typo such as ``per_sorce`` must not
silently leave a limit unset.

Two flavours of defaults exist, on purpose:

* the *embedded default* (``kumoproxy serve`` with no ``--config``) is safe on
  a laptop: loopback clients, loopback destinations on any port, loopback
  sources;
* a *file config* defaults to production policy: SMTP ports only, and
  loopback, private, link-local, multicast and the host's own addresses
  denied as destinations.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from kumoproxy.passwords import PasswordHashError, check_hash_format
from kumoproxy.yamlconfig import (
    V4_MAPPED,
    ConfigErrors,
    IPAddress,
    IPNetwork,
    Reader,
    compose,
    fields_of,
    format_duration,
    join,
    parse_address,
    parse_bool,
    parse_duration,
    parse_host_port,
    parse_network,
    parse_port,
    parse_positive_int,
    read_config_file,
    read_section,
)

__all__ = [
    "ConfigErrors",
    "IPAddress",
    "IPNetwork",
    "format_duration",
    "parse_duration",
    "parse_host_port",
]
Protocol = Literal["socks5", "proxy"]
LogFormat = Literal["json", "console"]

#: A ``sources`` entry may be a network; cap its size so a typo such as
#: ``10.0.0.0/8`` cannot make us enumerate sixteen million addresses.
MAX_SOURCE_NETWORK_ADDRESSES = 65536

#: Destinations an egress proxy must never reach unless an operator says so:
#: they are where server-side request forgery would go (RFC 6890 special-use).
DEFAULT_DENY: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private (RFC 1918)
    "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local (cloud metadata lives here)
    "172.16.0.0/12",  # private (RFC 1918)
    "192.168.0.0/16",  # private (RFC 1918)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the limited broadcast address
    "::/128",  # unspecified
    "::1/128",  # loopback
    "::ffff:0:0/96",  # v4-mapped: would bypass the IPv4 rules above
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)

#: SMTP (RFC 5321), submission over implicit TLS (RFC 8314), submission (RFC 6409).
DEFAULT_PORTS: tuple[int, ...] = (25, 465, 587)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS on a socks5 listener's client side."""

    certificate: Path
    private_key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listening socket and the protocol it speaks."""

    listen: str  # as written, used as the ``listener`` label and in logs
    host: IPAddress
    port: int
    protocol: Protocol
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin HTTP listener (metrics, health); ``None`` address = disabled."""

    listen: str | None
    host: IPAddress | None
    port: int


@dataclass(frozen=True, slots=True)
class UserConfig:
    """An RFC 1929 user and the sources it may use (``None`` = all)."""

    name: str
    password_hash: str
    sources: frozenset[IPAddress] | None = None
    default_source: IPAddress | None = None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    required: bool = False
    users: tuple[UserConfig, ...] = ()

    def user(self, name: str) -> UserConfig | None:
        for user in self.users:
            if user.name == name:
                return user
        return None


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high


@dataclass(frozen=True, slots=True)
class DestinationsConfig:
    """Where clients may connect to; checked on resolved addresses."""

    ports: tuple[PortRange, ...] | None  # None = any port
    deny: tuple[IPNetwork, ...]
    allow: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_sessions: int = 20000
    per_client: int = 2000
    per_source: int = 1000
    per_source_destination: int = 50
    #: Sessions still negotiating at once. Beyond it the oldest negotiation
    #: is cut, so a slow-loris flood evicts itself, not real clients.
    handshakes: int = 2000


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Phase deadlines in seconds."""

    handshake: float = 10.0
    connect: float = 30.0
    idle: float = 300.0
    drain: float = 30.0
    session: float = 3600.0  # maximum lifetime of one relayed session


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: LogFormat = "json"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration."""

    listeners: tuple[ListenerConfig, ...]
    admin: AdminConfig
    sources: frozenset[IPAddress]
    default_source: IPAddress | None
    clients_allow: tuple[IPNetwork, ...]
    auth: AuthConfig
    destinations: DestinationsConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    #: Processes that serve sessions: 1 serves in the main process; more
    #: start a supervisor and that many workers (kumoproxy.supervisor).
    workers: int = 1
    origin: str = "<embedded default>"

    def sorted_sources(self) -> list[IPAddress]:
        """Sources in a stable order: IPv4 first, then IPv6, each ascending."""
        return sorted(self.sources, key=lambda a: (a.version, int(a)))


def _port_range(value: Any) -> PortRange:
    if isinstance(value, int) and not isinstance(value, bool):
        port = parse_port(value)
        return PortRange(port, port)
    if isinstance(value, str):
        low_text, sep, high_text = value.partition("-")
        if sep and all(t.isascii() and t.isdigit() for t in (low_text, high_text)):
            low, high = parse_port(int(low_text)), parse_port(int(high_text))
            if low <= high:
                return PortRange(low, high)
    raise ValueError('a port or a range such as "19000-19999"')


# --------------------------------------------------------------------------
# Sections

_TOP_KEYS = (
    "listeners",
    "admin",
    "sources",
    "default_source",
    "clients",
    "auth",
    "destinations",
    "limits",
    "timeouts",
    "log",
    "workers",
)

#: Worker processes at most: past the core count they only add memory.
MAX_WORKERS = 64


def _workers(value: Any) -> int:
    """``workers``: a count, or ``auto`` for the CPUs this process may run on."""
    if value == "auto":
        return min(MAX_WORKERS, len(os.sched_getaffinity(0)))
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f"1 to {MAX_WORKERS}")


def _listeners(r: Reader, value: Any) -> tuple[ListenerConfig, ...]:
    items = r.sequence(value, "listeners")
    if items is None:
        return ()
    if not items:
        r.error("listeners", "at least one listener is required")
    out: list[ListenerConfig] = []
    seen: set[tuple[IPAddress, int]] = set()
    for i, item in enumerate(items):
        path = f"listeners[{i}]"
        m = r.mapping(item, path, ("listen", "protocol", "tls"))
        if m is None:
            continue
        if "listen" not in m:
            r.error(join(path, "listen"), "is required")
            continue
        hp = r.typed(m["listen"], join(path, "listen"), parse_host_port, '"ip:port"')
        protocol = m.get("protocol")
        if protocol not in ("socks5", "proxy"):
            r.error(join(path, "protocol"), f"must be socks5 or proxy, got {protocol!r}")
            continue
        tls = None
        if m.get("tls") is not None:
            if protocol != "socks5":
                r.error(join(path, "tls"), "TLS is supported on socks5 listeners only")
            tls = _tls(r, m["tls"], join(path, "tls"))
        if hp is None:
            continue
        if hp in seen and hp[1] != 0:  # port 0: the kernel picks distinct ports
            r.error(join(path, "listen"), f"{m['listen']} is used by another listener")
        seen.add(hp)
        out.append(ListenerConfig(m["listen"], hp[0], hp[1], protocol, tls))
    return tuple(out)


def _tls(r: Reader, value: Any, path: str) -> TlsConfig | None:
    m = r.mapping(value, path, ("certificate", "private_key", "client_ca"))
    if m is None:
        return None
    paths: dict[str, Path | None] = {}
    for key in ("certificate", "private_key", "client_ca"):
        raw = m.get(key)
        if raw is None:
            if key != "client_ca":
                r.error(join(path, key), "is required")
            paths[key] = None
        elif not isinstance(raw, str):
            r.error(join(path, key), "must be a file path")
            paths[key] = None
        else:
            paths[key] = Path(raw)
    cert, key_path = paths["certificate"], paths["private_key"]
    if cert is None or key_path is None:
        return None
    return TlsConfig(cert, key_path, paths["client_ca"])


def _admin(r: Reader, value: Any, default: AdminConfig) -> AdminConfig:
    m = r.mapping(value, "admin", ("listen",))
    if not m or m.get("listen") is None:
        return default
    hp = r.typed(m["listen"], "admin.listen", parse_host_port, '"ip:port"')
    if hp is None:
        return default
    return AdminConfig(m["listen"], hp[0], hp[1])


def _sources(r: Reader, value: Any, path: str) -> frozenset[IPAddress] | None:
    items = r.sequence(value, path)
    if items is None:
        return None
    out: set[IPAddress] = set()
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        if isinstance(item, str) and "/" in item:
            net = r.typed(item, item_path, parse_network, "an IP address or network")
            if net is None:
                continue
            if net.version == 6 and net.overlaps(V4_MAPPED):
                r.error(item_path, "v4-mapped IPv6 networks are not allowed; write IPv4")
                continue
            if net.num_addresses > MAX_SOURCE_NETWORK_ADDRESSES:
                r.error(item_path, f"network too large ({net.num_addresses} addresses)")
                continue
            out.update(net if net.num_addresses <= 2 else net.hosts())
        else:
            addr = r.typed(item, item_path, parse_address, "an IP address")
            if addr is not None:
                out.add(addr)
    return frozenset(out)


def _networks(r: Reader, value: Any, path: str) -> tuple[IPNetwork, ...]:
    items = r.sequence(value, path) or []
    nets = (
        r.typed(item, f"{path}[{i}]", parse_network, "a network") for i, item in enumerate(items)
    )
    return tuple(n for n in nets if n is not None)


def _auth(r: Reader, value: Any, sources: frozenset[IPAddress]) -> AuthConfig:
    m = r.mapping(value, "auth", ("required", "users"))
    if not m:
        return AuthConfig()
    required = r.typed(m.get("required", False), "auth.required", parse_bool, "true or false")
    users: list[UserConfig] = []
    names: set[str] = set()
    for i, item in enumerate(r.sequence(m.get("users"), "auth.users") or []):
        path = f"auth.users[{i}]"
        u = r.mapping(item, path, ("name", "password_hash", "sources", "default_source"))
        if u is None:
            continue
        name, password_hash = u.get("name"), u.get("password_hash")
        if not isinstance(name, str) or not 1 <= len(name.encode()) <= 255 or "+" in name:
            r.error(join(path, "name"), "must be 1-255 bytes without '+' (it selects a source)")
            continue
        if name in names:
            r.error(join(path, "name"), f"user {name!r} is defined twice")
        names.add(name)
        if not isinstance(password_hash, str) or not password_hash:
            r.error(join(path, "password_hash"), "is required (from `kumoproxy hash-password`)")
            continue
        try:
            check_hash_format(password_hash)
        except PasswordHashError as exc:
            r.error(join(path, "password_hash"), str(exc))
            continue
        allowed = None
        if "sources" in u:
            allowed = _sources(r, u["sources"], join(path, "sources"))
            for addr in sorted(allowed or (), key=str):
                if addr not in sources:
                    r.error(join(path, "sources"), f"{addr} is not in the top-level sources")
        user_default = None
        if u.get("default_source") is not None:
            user_default = r.typed(
                u["default_source"], join(path, "default_source"), parse_address, "an IP address"
            )
        users.append(UserConfig(name, password_hash, allowed, user_default))
    if required and not users:
        r.error("auth.users", "auth.required is true but no users are defined")
    return AuthConfig(bool(required), tuple(users))


def _destinations(r: Reader, value: Any, defaults: DestinationsConfig) -> DestinationsConfig:
    m = r.mapping(value, "destinations", ("ports", "deny", "allow"))
    if not m:
        return defaults
    ports = defaults.ports
    if "ports" in m:
        raw = m["ports"]
        if raw == "any":
            ports = None
        else:
            items = r.sequence(raw, "destinations.ports") or []
            parsed = [
                r.typed(p, f"destinations.ports[{i}]", _port_range, "a port or range")
                for i, p in enumerate(items)
            ]
            ports = tuple(p for p in parsed if p is not None)
    deny = _networks(r, m["deny"], "destinations.deny") if "deny" in m else defaults.deny
    allow = _networks(r, m["allow"], "destinations.allow") if "allow" in m else defaults.allow
    return DestinationsConfig(ports, deny, allow)


def _log_format(value: Any) -> LogFormat:
    if value not in ("json", "console"):
        raise ValueError("")
    return value  # type: ignore[no-any-return]


def _log_level(value: Any) -> str:
    if value not in ("debug", "info", "warning", "error"):
        raise ValueError("")
    return str(value)


_LIMIT_KEYS = {k: (parse_positive_int, "a positive integer") for k in fields_of(LimitsConfig())}
_TIMEOUT_KEYS = {k: (parse_duration, "a duration such as 10s") for k in fields_of(TimeoutsConfig())}
_LOG_KEYS = {
    "format": (_log_format, "json or console"),
    "level": (_log_level, "debug, info, warning or error"),
}


def _build(data: Any, lines: Mapping[str, int], *, embedded: bool, origin: str) -> Config:
    r = Reader(lines)
    top = r.mapping(data, "", _TOP_KEYS)
    if top is None:
        raise ConfigErrors(r.errors)
    if "listeners" not in top:
        r.error("listeners", "is required")
    listeners = _listeners(r, top.get("listeners"))
    admin = _admin(r, top.get("admin"), AdminConfig(None, None, 0))
    sources = _sources(r, top.get("sources"), "sources") or frozenset()
    if "sources" not in top:
        r.error("sources", "is required: list the source IPs this host owns")
    elif top["sources"] in (None, []):
        r.error("sources", "list at least one source IP this host owns")
    default_source = None
    if top.get("default_source") is not None:
        default_source = r.typed(top["default_source"], "default_source", parse_address, "an IP")
        if default_source is not None and default_source not in sources:
            r.error("default_source", f"{default_source} is not in sources")
    clients = r.mapping(top.get("clients"), "clients", ("allow",)) or {}
    clients_allow = _networks(r, clients.get("allow"), "clients.allow")
    if "allow" not in clients:
        clients_allow = _LOOPBACK_NETS if embedded else ()
        if not embedded:
            r.error("clients.allow", "is required: list the networks your MTAs connect from")
    auth = _auth(r, top.get("auth"), sources)
    for user in auth.users:
        if user.default_source is not None and user.default_source not in (user.sources or sources):
            r.error("auth.users", f"{user.name}: default_source is not among its sources")
    own = tuple(ipaddress.ip_network(a) for a in sources) + tuple(
        ipaddress.ip_network(li.host) for li in listeners if not li.host.is_unspecified
    )
    destination_defaults = (
        DestinationsConfig(None, _EVERYWHERE, _LOOPBACK_NETS)
        if embedded
        else DestinationsConfig(
            tuple(PortRange(p, p) for p in DEFAULT_PORTS),
            tuple(ipaddress.ip_network(n) for n in DEFAULT_DENY) + own,
            (),
        )
    )
    destinations = _destinations(r, top.get("destinations"), destination_defaults)
    limits = read_section(r, top.get("limits"), "limits", LimitsConfig(), _LIMIT_KEYS)
    timeouts = read_section(r, top.get("timeouts"), "timeouts", TimeoutsConfig(), _TIMEOUT_KEYS)
    log = read_section(r, top.get("log"), "log", LogConfig(), _LOG_KEYS)
    workers = 1
    if top.get("workers") is not None:
        workers = r.typed(top["workers"], "workers", _workers, '"auto" or a count') or 1
    if r.errors:
        raise ConfigErrors(r.errors)
    return Config(
        listeners=listeners,
        admin=admin,
        sources=sources,
        default_source=default_source,
        clients_allow=clients_allow,
        auth=auth,
        destinations=destinations,
        limits=limits,
        timeouts=timeouts,
        log=log,
        workers=workers,
        origin=origin,
    )


_LOOPBACK_NETS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


_EVERYWHERE: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)


def parse_config(text: str, *, origin: str = "<string>", embedded: bool = False) -> Config:
    """Parse and validate a YAML document. Raises :class:`ConfigErrors`."""
    data, lines = compose(text, origin)
    return _build(data, lines, embedded=embedded, origin=origin)


def load_config(path: Path) -> Config:
    """Read and validate a config file. Raises :class:`ConfigErrors`."""
    return parse_config(read_config_file(path), origin=str(path))


def embedded_default_text() -> str:
    """The YAML of the embedded default, shipped inside the package."""
    return resources.files("kumoproxy").joinpath("default.yaml").read_text(encoding="utf-8")


def embedded_default() -> Config:
    """The configuration ``kumoproxy serve`` runs when given no ``--config``."""
    return parse_config(embedded_default_text(), origin="<embedded default>", embedded=True)


def config_to_data(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, in the file's own shape."""

    def nets(networks: Iterable[IPNetwork]) -> list[str]:
        return [str(n) for n in networks]

    def ports(ranges: tuple[PortRange, ...] | None) -> str | list[int | str]:
        if ranges is None:
            return "any"
        return [r.low if r.low == r.high else f"{r.low}-{r.high}" for r in ranges]

    listeners: list[dict[str, Any]] = []
    for li in config.listeners:
        entry: dict[str, Any] = {"listen": li.listen, "protocol": li.protocol}
        if li.tls is not None:
            entry["tls"] = {
                k: str(v)
                for k, v in (
                    ("certificate", li.tls.certificate),
                    ("private_key", li.tls.private_key),
                    ("client_ca", li.tls.client_ca),
                )
                if v is not None
            }
        listeners.append(entry)
    users: list[dict[str, Any]] = []
    for user in config.auth.users:
        u: dict[str, Any] = {"name": user.name, "password_hash": user.password_hash}
        if user.sources is not None:
            u["sources"] = [str(a) for a in sorted(user.sources, key=lambda a: (a.version, a))]
        if user.default_source is not None:
            u["default_source"] = str(user.default_source)
        users.append(u)
    return {
        "listeners": listeners,
        "admin": {"listen": config.admin.listen},
        "sources": [str(a) for a in config.sorted_sources()],
        "default_source": str(config.default_source) if config.default_source else None,
        "clients": {"allow": nets(config.clients_allow)},
        "auth": {"required": config.auth.required, "users": users},
        "destinations": {
            "ports": ports(config.destinations.ports),
            "deny": nets(config.destinations.deny),
            "allow": nets(config.destinations.allow),
        },
        "limits": fields_of(config.limits),
        "timeouts": {k: format_duration(v) for k, v in fields_of(config.timeouts).items()},
        "log": fields_of(config.log),
        "workers": config.workers,
    }
