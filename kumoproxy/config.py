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
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from kumoproxy.errors import ConfigError
from kumoproxy.passwords import PasswordHashError, check_hash_format

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
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

_V4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")

#: Durations outside this range are typos (``0s``, ``10000000h``), not policy.
MIN_DURATION = 0.001
MAX_DURATION = 365 * 86400.0

_PARENT = re.compile(r"(\.[^.\[]*|\[\d+\])$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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
    origin: str = "<embedded default>"

    def sorted_sources(self) -> list[IPAddress]:
        """Sources in a stable order: IPv4 first, then IPv6, each ascending."""
        return sorted(self.sources, key=lambda a: (a.version, int(a)))


class ConfigErrors(Exception):
    """Every problem found in one configuration document."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


# --------------------------------------------------------------------------
# YAML with line numbers


def _compose(text: str, origin: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML, returning plain data plus a map of key path -> line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigErrors([ConfigError("", f"invalid YAML: {problem}", line=line)]) from exc
    lines: dict[str, int] = {}
    if node is None:
        return {}, lines

    def walk(n: yaml.Node, path: str) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ConfigErrors(
                        [ConfigError(path, "keys must be plain words", line=_line(key_node))]
                    )
                key = _construct_scalar(key_node, path)
                child = f"{path}.{key}" if path else str(key)
                if key in out:
                    raise ConfigErrors(
                        [ConfigError(child, "duplicate key", line=key_node.start_mark.line + 1)]
                    )
                out[key] = walk(value_node, child)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(item, f"{path}[{i}]") for i, item in enumerate(n.value)]
        return _construct_scalar(n, path)

    return walk(node, ""), lines


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _construct_scalar(node: yaml.Node, path: str) -> Any:
    """A scalar's value; tags we do not know (``!custom``, ``!!int lots``) are errors."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigErrors(
            [ConfigError(path, f"invalid value: {problem}", line=_line(node))]
        ) from exc
    finally:
        loader.dispose()


# --------------------------------------------------------------------------
# The validating reader

T = TypeVar("T")


class _Reader:
    """Collects errors while turning plain data into typed values."""

    def __init__(self, lines: Mapping[str, int]) -> None:
        self.lines = lines
        self.errors: list[ConfigError] = []

    def error(self, path: str, message: str) -> None:
        line = self.lines.get(path)
        parent = path
        while line is None and parent:  # a missing key: report its nearest parent's line
            parent = _PARENT.sub("", parent) if _PARENT.search(parent) else ""
            line = self.lines.get(parent)
        self.errors.append(ConfigError(path, message, line=line))

    def mapping(self, value: Any, path: str, allowed: Iterable[str]) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {_kind(value)}")
            return None
        allowed_set = set(allowed)
        for key in value:
            if key not in allowed_set:
                hint = ", ".join(sorted(allowed_set))
                self.error(_join(path, str(key)), f"unknown key (expected one of: {hint})")
        return value

    def sequence(self, value: Any, path: str) -> list[Any] | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {_kind(value)}")
            return None
        return value

    def typed(self, value: Any, path: str, convert: Callable[[Any], T], what: str) -> T | None:
        try:
            return convert(value)
        except (TypeError, ValueError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            self.error(path, f"must be {what}, got {value!r}{detail}")
            return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    kinds: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return kinds.get(type(value), repr(value))


def _address(value: Any) -> IPAddress:
    if not isinstance(value, str):
        raise TypeError("not a string")
    addr = ipaddress.ip_address(value)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise ValueError("v4-mapped IPv6 addresses are not allowed; write the IPv4 address")
    return addr


def _network(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return ipaddress.ip_network(value, strict=True)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("")
    return value


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError("")
    return value


def parse_duration(value: Any) -> float:
    """``10s``, ``5m``, ``250ms``, ``1h``, ``1.5s`` -> seconds."""
    if not isinstance(value, str):
        raise TypeError("a duration needs a unit")
    match = _DURATION.match(value.strip())
    if match is None:
        raise ValueError("use a number and one of ms, s, m, h")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not MIN_DURATION <= seconds <= MAX_DURATION:
        raise ValueError("must be between 1ms and 365 days")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, exactly.

    ``repr`` keeps every digit and, within [1ms, 365 days], never switches to
    exponent notation. Below a second, milliseconds read better (``250ms``)
    when they convert back to the very same float.
    """
    if seconds < 1:
        as_ms = f"{repr(seconds * 1000).removesuffix('.0')}ms"
        if parse_duration(as_ms) == seconds:
            return as_ms
    return f"{repr(seconds).removesuffix('.0')}s"


def parse_host_port(value: Any) -> tuple[IPAddress, int]:
    """``127.0.0.1:1080`` or ``[::1]:1080``; the host must be an IP address."""
    if not isinstance(value, str):
        raise TypeError("not a string")
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit():
        raise ValueError('expected "ip:port" or "[ipv6]:port"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("put IPv6 addresses in brackets")
    port = int(port_text)
    if port > 65535:
        raise ValueError("port out of range")
    return ipaddress.ip_address(host), port


def _port_range(value: Any) -> PortRange:
    if isinstance(value, int) and not isinstance(value, bool):
        port = _port(value)
        return PortRange(port, port)
    if isinstance(value, str):
        low_text, sep, high_text = value.partition("-")
        if sep and all(t.isascii() and t.isdigit() for t in (low_text, high_text)):
            low, high = _port(int(low_text)), _port(int(high_text))
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
)


def _listeners(r: _Reader, value: Any) -> tuple[ListenerConfig, ...]:
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
            r.error(_join(path, "listen"), "is required")
            continue
        hp = r.typed(m["listen"], _join(path, "listen"), parse_host_port, '"ip:port"')
        protocol = m.get("protocol")
        if protocol not in ("socks5", "proxy"):
            r.error(_join(path, "protocol"), f"must be socks5 or proxy, got {protocol!r}")
            continue
        tls = None
        if m.get("tls") is not None:
            if protocol != "socks5":
                r.error(_join(path, "tls"), "TLS is supported on socks5 listeners only")
            tls = _tls(r, m["tls"], _join(path, "tls"))
        if hp is None:
            continue
        if hp in seen and hp[1] != 0:  # port 0: the kernel picks distinct ports
            r.error(_join(path, "listen"), f"{m['listen']} is used by another listener")
        seen.add(hp)
        out.append(ListenerConfig(m["listen"], hp[0], hp[1], protocol, tls))
    return tuple(out)


def _tls(r: _Reader, value: Any, path: str) -> TlsConfig | None:
    m = r.mapping(value, path, ("certificate", "private_key", "client_ca"))
    if m is None:
        return None
    paths: dict[str, Path | None] = {}
    for key in ("certificate", "private_key", "client_ca"):
        raw = m.get(key)
        if raw is None:
            if key != "client_ca":
                r.error(_join(path, key), "is required")
            paths[key] = None
        elif not isinstance(raw, str):
            r.error(_join(path, key), "must be a file path")
            paths[key] = None
        else:
            paths[key] = Path(raw)
    cert, key_path = paths["certificate"], paths["private_key"]
    if cert is None or key_path is None:
        return None
    return TlsConfig(cert, key_path, paths["client_ca"])


def _admin(r: _Reader, value: Any, default: AdminConfig) -> AdminConfig:
    m = r.mapping(value, "admin", ("listen",))
    if not m or m.get("listen") is None:
        return default
    hp = r.typed(m["listen"], "admin.listen", parse_host_port, '"ip:port"')
    if hp is None:
        return default
    return AdminConfig(m["listen"], hp[0], hp[1])


def _sources(r: _Reader, value: Any, path: str) -> frozenset[IPAddress] | None:
    items = r.sequence(value, path)
    if items is None:
        return None
    out: set[IPAddress] = set()
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        if isinstance(item, str) and "/" in item:
            net = r.typed(item, item_path, _network, "an IP address or network")
            if net is None:
                continue
            if net.version == 6 and net.overlaps(_V4_MAPPED):
                r.error(item_path, "v4-mapped IPv6 networks are not allowed; write IPv4")
                continue
            if net.num_addresses > MAX_SOURCE_NETWORK_ADDRESSES:
                r.error(item_path, f"network too large ({net.num_addresses} addresses)")
                continue
            out.update(net if net.num_addresses <= 2 else net.hosts())
        else:
            addr = r.typed(item, item_path, _address, "an IP address")
            if addr is not None:
                out.add(addr)
    return frozenset(out)


def _networks(r: _Reader, value: Any, path: str) -> tuple[IPNetwork, ...]:
    items = r.sequence(value, path) or []
    nets = (r.typed(item, f"{path}[{i}]", _network, "a network") for i, item in enumerate(items))
    return tuple(n for n in nets if n is not None)


def _auth(r: _Reader, value: Any, sources: frozenset[IPAddress]) -> AuthConfig:
    m = r.mapping(value, "auth", ("required", "users"))
    if not m:
        return AuthConfig()
    required = r.typed(m.get("required", False), "auth.required", _bool, "true or false")
    users: list[UserConfig] = []
    names: set[str] = set()
    for i, item in enumerate(r.sequence(m.get("users"), "auth.users") or []):
        path = f"auth.users[{i}]"
        u = r.mapping(item, path, ("name", "password_hash", "sources", "default_source"))
        if u is None:
            continue
        name, password_hash = u.get("name"), u.get("password_hash")
        if not isinstance(name, str) or not 1 <= len(name.encode()) <= 255 or "+" in name:
            r.error(_join(path, "name"), "must be 1-255 bytes without '+' (it selects a source)")
            continue
        if name in names:
            r.error(_join(path, "name"), f"user {name!r} is defined twice")
        names.add(name)
        if not isinstance(password_hash, str) or not password_hash:
            r.error(_join(path, "password_hash"), "is required (from `kumoproxy hash-password`)")
            continue
        try:
            check_hash_format(password_hash)
        except PasswordHashError as exc:
            r.error(_join(path, "password_hash"), str(exc))
            continue
        allowed = None
        if "sources" in u:
            allowed = _sources(r, u["sources"], _join(path, "sources"))
            for addr in sorted(allowed or (), key=str):
                if addr not in sources:
                    r.error(_join(path, "sources"), f"{addr} is not in the top-level sources")
        user_default = None
        if u.get("default_source") is not None:
            user_default = r.typed(
                u["default_source"], _join(path, "default_source"), _address, "an IP address"
            )
        users.append(UserConfig(name, password_hash, allowed, user_default))
    if required and not users:
        r.error("auth.users", "auth.required is true but no users are defined")
    return AuthConfig(bool(required), tuple(users))


def _destinations(r: _Reader, value: Any, defaults: DestinationsConfig) -> DestinationsConfig:
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


def _section(
    r: _Reader, value: Any, path: str, default: T, converters: Mapping[str, tuple[Any, str]]
) -> T:
    """Read a flat section whose keys map onto dataclass fields."""
    m = r.mapping(value, path, converters)
    if not m:
        return default
    changes = {}
    for key, raw in m.items():
        if key in converters:
            convert, what = converters[key]
            parsed = r.typed(raw, _join(path, key), convert, what)
            if parsed is not None:
                changes[key] = parsed
    return type(default)(**{**_fields(default), **changes})


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def _log_format(value: Any) -> LogFormat:
    if value not in ("json", "console"):
        raise ValueError("")
    return value  # type: ignore[no-any-return]


def _log_level(value: Any) -> str:
    if value not in ("debug", "info", "warning", "error"):
        raise ValueError("")
    return str(value)


_LIMIT_KEYS = {k: (_positive_int, "a positive integer") for k in _fields(LimitsConfig())}
_TIMEOUT_KEYS = {k: (parse_duration, "a duration such as 10s") for k in _fields(TimeoutsConfig())}
_LOG_KEYS = {
    "format": (_log_format, "json or console"),
    "level": (_log_level, "debug, info, warning or error"),
}


def _build(data: Any, lines: Mapping[str, int], *, embedded: bool, origin: str) -> Config:
    r = _Reader(lines)
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
        default_source = r.typed(top["default_source"], "default_source", _address, "an IP")
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
    limits = _section(r, top.get("limits"), "limits", LimitsConfig(), _LIMIT_KEYS)
    timeouts = _section(r, top.get("timeouts"), "timeouts", TimeoutsConfig(), _TIMEOUT_KEYS)
    log = _section(r, top.get("log"), "log", LogConfig(), _LOG_KEYS)
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
    data, lines = _compose(text, origin)
    return _build(data, lines, embedded=embedded, origin=origin)


def load_config(path: Path) -> Config:
    """Read and validate a config file. Raises :class:`ConfigErrors`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigErrors([ConfigError("", f"cannot read {path}: {reason}")]) from exc
    return parse_config(text, origin=str(path))


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
        "limits": _fields(config.limits),
        "timeouts": {k: format_duration(v) for k, v in _fields(config.timeouts).items()},
        "log": _fields(config.log),
    }
