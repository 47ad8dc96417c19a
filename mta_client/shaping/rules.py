"""Shaping rules: the ``shaping`` and ``redis`` config sections, and what applies to a path.

```yaml
shaping:
  default: {connection_limit: 10, max_connection_rate: 100/min, max_message_rate: 100/s,
            max_deliveries_per_connection: 100, idle_timeout: 60s}
  providers:                          # merged by name over the built-in table
    google:
      match: [".google.com", ".googlemail.com"]    # MX host suffixes
      connection_limit: 5             # provider-wide per source: shared by all its sites
      max_deliveries_per_connection: 50
  sources:                            # per-source overrides (IP warm-up)
    "203.0.113.10":
      max_message_rate: 100/h
      providers: {google: {max_message_rate: 500/h}}
  throttle:                           # replaces the built-in list when present ([] = none)
    - {pattern: '^4\\d\\d 4\\.7\\.(0|28|650)', duration: 30m}   # searched in "CODE ENHANCED TEXT"
    - {pattern: 'TSS04', duration: 2h}
  lease_ttl: 10m                      # a lease not extended for this long is gone
redis:
  url: redis://127.0.0.1:6379/0       # absent: a single node, limits kept in memory
  key_prefix: "mta:"
  node_ttl: 30s                       # heartbeat lifetime, to count live nodes
```

Rates are ``N/s`` (``sec``, ``second``), ``N/min`` (``m``, ``minute``),
``N/h`` (``hour``) or ``N/d`` (``day``).

Resolution (:meth:`ShapingConfig.limits_for`). Limits are counted per egress
path, ``source->site`` (a site is the comma-joined MX host set of
:class:`mta_client.mx.Destination`), so every node derives the same key for
the same IP and site. Knobs are layered, later wins:

1. the built-in default row, then ``shaping.default``;
2. ``shaping.sources.<ip>``: these are the *path* knobs, counted under
   ``source->site``;
3. the provider whose suffix matches an MX host of the site (the longest
   matching suffix wins; ties go to the first provider listed): its
   ``connection_limit`` and rates are counted under
   ``source->provider:<name>``, shared by all the provider's sites from that
   source, and apply *in addition* to the path's; its
   ``max_deliveries_per_connection`` and ``idle_timeout`` replace the
   path's (they are facts about the destination);
4. ``shaping.sources.<ip>.providers.<name>``, over the provider's knobs.

A connection therefore needs a lease on every scope with a connection limit
and a token from every connection rate; a message needs a token from every
message rate.

Pure: parsing and resolution only, no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlparse

from kumoproxy.yamlconfig import Reader, join, parse_address, parse_duration, parse_positive_int
from mta_client.shaping.gcra import Rate, default_burst

__all__ = [
    "BUILTIN_PROVIDERS",
    "DEFAULT_KNOBS",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_THROTTLE",
    "Knobs",
    "PathLimits",
    "Provider",
    "Rate",
    "RedisConfig",
    "Scope",
    "ShapingConfig",
    "SourceRules",
    "ThrottleRule",
    "canonical_source",
    "parse_rate",
    "parse_redis",
    "parse_redis_url",
    "parse_shaping",
    "path_key",
    "provider_key",
]

# --------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class Knobs:
    """One block of shaping settings; ``None`` means "not set here, inherit"."""

    connection_limit: int | None = None
    max_connection_rate: Rate | None = None
    max_message_rate: Rate | None = None
    max_deliveries_per_connection: int | None = None
    idle_timeout: float | None = None

    def over(self, base: Knobs) -> Knobs:
        """These knobs layered over ``base``: every knob set here wins."""
        return Knobs(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) is not None
                else getattr(base, f.name)
                for f in dataclasses.fields(self)
            }
        )


_KNOB_KEYS: Final = tuple(f.name for f in dataclasses.fields(Knobs))


@dataclass(frozen=True, slots=True)
class Provider:
    """A mail provider: the MX host suffixes that identify it and its limits.

    ``match`` holds lower-case domain suffixes without leading dot;
    ``google.com`` matches ``google.com`` and ``x.l.google.com``, never
    ``evilgoogle.com``.
    """

    name: str
    match: tuple[str, ...]
    knobs: Knobs

    def matching_suffix(self, site: str) -> int:
        """Length of the longest suffix matching a host of ``site``; 0 for none."""
        best = 0
        for host in site.lower().split(","):
            host = host.strip().rstrip(".")
            for suffix in self.match:
                if (host == suffix or host.endswith("." + suffix)) and len(suffix) > best:
                    best = len(suffix)
        return best


@dataclass(frozen=True, slots=True)
class SourceRules:
    """``shaping.sources.<ip>``: path knobs, and provider knobs by provider name."""

    knobs: Knobs = Knobs()
    providers: Mapping[str, Knobs] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ThrottleRule:
    """Suspend a path for ``duration`` seconds when a reply matches ``pattern``."""

    pattern: re.Pattern[str]
    duration: float

    def matches(self, reply_text: str) -> bool:
        return self.pattern.search(reply_text) is not None


@dataclass(frozen=True, slots=True)
class Scope:
    """Limits counted under one key (a path or a provider, from one source).

    ``None`` means no limit of that kind under this key. Bursts are GCRA's
    (see :func:`mta_client.shaping.gcra.default_burst`).
    """

    key: str
    connection_limit: int | None = None
    connection_rate: Rate | None = None
    connection_burst: int = 1
    message_rate: Rate | None = None
    message_burst: int = 1

    def divided(self, parts: int) -> Scope:
        """This node's share when ``parts`` nodes must split the limits without
        coordination: limits rounded down (at least 1 connection), rates
        divided, bursts rounded down (at least 1)."""
        return Scope(
            self.key,
            None if self.connection_limit is None else max(1, self.connection_limit // parts),
            None if self.connection_rate is None else self.connection_rate.divided(parts),
            max(1, self.connection_burst // parts),
            None if self.message_rate is None else self.message_rate.divided(parts),
            max(1, self.message_burst // parts),
        )


@dataclass(frozen=True, slots=True)
class PathLimits:
    """Everything that applies to one egress path, from :meth:`ShapingConfig.limits_for`.

    ``scopes[0]`` is the path itself (key ``source->site``); a matching
    provider adds a second scope (key ``source->provider:<name>``).
    """

    source: str
    site: str
    scopes: tuple[Scope, ...]
    max_deliveries_per_connection: int
    idle_timeout: float
    lease_ttl: float
    provider: str | None = None

    @property
    def path_key(self) -> str:
        """``source->site``: the key suspensions and per-path limits live under."""
        return path_key(self.source, self.site)

    def divided(self, parts: int) -> PathLimits:
        """Every scope's :meth:`Scope.divided` share; per-connection knobs unchanged."""
        if parts < 1:
            raise ValueError("parts must be >= 1")
        if parts == 1:
            return self
        return dataclasses.replace(self, scopes=tuple(s.divided(parts) for s in self.scopes))


def _scope(key: str, knobs: Knobs) -> Scope:
    conn, msg = knobs.max_connection_rate, knobs.max_message_rate
    return Scope(
        key,
        knobs.connection_limit,
        conn,
        1 if conn is None else default_burst(conn),
        msg,
        1 if msg is None else default_burst(msg),
    )


# --------------------------------------------------------------------------
# Built-in defaults (docs/shaping-providers: KumoMTA's maintained rules)

#: The "default" row: 10 connections, 100 connections/min, 100 per
#: connection, 100 messages/s, idle 60 s.
DEFAULT_KNOBS: Final = Knobs(
    connection_limit=10,
    max_connection_rate=Rate(100, 60.0),
    max_message_rate=Rate(100, 1.0),
    max_deliveries_per_connection=100,
    idle_timeout=60.0,
)

#: Long enough for the slowest message an idle-free connection may carry
#: (RFC 5321 §4.5.3.2: DATA-end may take 10 minutes), since a lease is only
#: extended between messages.
DEFAULT_LEASE_TTL: Final = 600.0


def _provider(name: str, match: tuple[str, ...], **knobs: Any) -> Provider:
    return Provider(name, match, Knobs(**knobs))


#: Provider limits as published in KumoMTA's community shaping rules.
BUILTIN_PROVIDERS: Final = (
    _provider(
        "google",
        ("google.com", "googlemail.com"),
        connection_limit=5,
        max_deliveries_per_connection=50,
    ),
    # Yahoo closes silently after 20 messages on a connection.
    _provider("yahoo", ("yahoodns.net",), max_deliveries_per_connection=20),
    _provider(
        "outlook",
        ("olc.protection.outlook.com",),
        connection_limit=5,
        max_deliveries_per_connection=50,
    ),
    _provider(
        "office365",
        ("mail.protection.outlook.com", "mx.microsoft"),
        connection_limit=5,
        max_deliveries_per_connection=50,
    ),
    _provider("icloud", ("mail.icloud.com",), connection_limit=10, max_deliveries_per_connection=5),
    _provider("orange", ("orange.fr",), connection_limit=2, max_deliveries_per_connection=100),
    _provider(
        "comcast",
        ("comcast.net",),
        connection_limit=25,
        max_deliveries_per_connection=1000,
        idle_timeout=30.0,
    ),
    _provider(
        "yahoo_jp",
        ("mail.yahoo.co.jp",),
        connection_limit=2,
        max_message_rate=Rate(10, 1.0),
        max_deliveries_per_connection=20,
    ),
    _provider(
        "gmx",
        ("gmx.net", "gmx.com", "web.de"),
        connection_limit=4,
        max_deliveries_per_connection=20,
    ),
    _provider("qq", ("qq.com",), connection_limit=4, max_deliveries_per_connection=8),
    _provider("netease", ("netease.com",), connection_limit=4, max_deliveries_per_connection=7),
)

#: Reply patterns that suspend a path, searched in ``str(SmtpReply)``
#: ("CODE ENHANCED TEXT"). Suspending is the one action implemented; where
#: the field lowers a rate instead, a suspension of that length is the
#: conservative stand-in.
DEFAULT_THROTTLE: Final = (
    # Yahoo: "421 4.7.0 [TSS04] Messages from ... temporarily deferred due to
    # unexpected volume or user complaints". Before the generic 4.7.0 below.
    ThrottleRule(re.compile(r"\bTSS04\b"), 2 * 3600.0),
    # Gmail: "421-4.7.28 ... unusual rate of unsolicited mail" (RFC 3463 X.7.x:
    # security or policy status).
    ThrottleRule(re.compile(r"^4\d\d[ -]4\.7\.28\b"), 30 * 60.0),
    # Outlook: "451 4.7.650 The mail server ... has been temporarily rate limited
    # due to IP reputation."
    ThrottleRule(
        re.compile(r"^4\d\d[ -]4\.7\.650\b|temporarily rate limited due to IP reputation"),
        3600.0,
    ),
    # Gmail: "421-4.7.0 Try again later, closing connection." The most
    # generic pattern, so last: the first match wins.
    ThrottleRule(re.compile(r"^421[ -]4\.7\.0\b"), 15 * 60.0),
)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """The ``redis`` section: where nodes share their limits."""

    url: str
    key_prefix: str = "mta:"
    node_ttl: float = 30.0


@dataclass(frozen=True, slots=True)
class ShapingConfig:
    """The parsed ``shaping`` section. ``ShapingConfig()`` is the built-in behaviour."""

    default: Knobs = DEFAULT_KNOBS
    providers: tuple[Provider, ...] = BUILTIN_PROVIDERS
    sources: Mapping[str, SourceRules] = field(default_factory=dict)
    throttle: tuple[ThrottleRule, ...] = DEFAULT_THROTTLE
    lease_ttl: float = DEFAULT_LEASE_TTL

    def __post_init__(self) -> None:
        missing = [k for k in _KNOB_KEYS if getattr(self.default, k) is None]
        if missing:
            raise ValueError(f"the default knobs must all be set; missing {missing}")

    def provider_for(self, site: str) -> Provider | None:
        """The provider with the longest suffix matching an MX host of ``site``."""
        best: Provider | None = None
        best_len = 0
        for provider in self.providers:
            length = provider.matching_suffix(site)
            if length > best_len:
                best, best_len = provider, length
        return best

    def limits_for(self, source: str, site: str) -> PathLimits:
        """The limits of the path from ``source`` (an IP) to ``site``, and their keys."""
        source = canonical_source(source)
        rules = self.sources.get(source, SourceRules())
        path = rules.knobs.over(self.default)
        scopes = [_scope(path_key(source, site), path)]
        per_connection = path
        provider = self.provider_for(site)
        if provider is not None:
            knobs = provider.knobs
            if provider.name in rules.providers:
                knobs = rules.providers[provider.name].over(knobs)
            per_connection = knobs.over(path)
            shared = (knobs.connection_limit, knobs.max_connection_rate, knobs.max_message_rate)
            if any(value is not None for value in shared):
                scopes.append(_scope(provider_key(source, provider.name), knobs))
        deliveries, idle = per_connection.max_deliveries_per_connection, per_connection.idle_timeout
        # The default sets every knob (checked in __post_init__).
        assert deliveries is not None
        assert idle is not None
        return PathLimits(
            source,
            site,
            tuple(scopes),
            deliveries,
            idle,
            self.lease_ttl,
            None if provider is None else provider.name,
        )

    def throttle_match(self, reply_text: str) -> ThrottleRule | None:
        """The first throttle rule whose pattern is found in ``reply_text``.

        ``reply_text`` is ``str(SmtpReply)``: "CODE ENHANCED TEXT", multi-line
        texts joined by spaces.
        """
        for rule in self.throttle:
            if rule.matches(reply_text):
                return rule
        return None


def path_key(source: str, site: str) -> str:
    """KumoMTA's ready-queue name for an egress path: ``source->site``."""
    return f"{source}->{site}"


def provider_key(source: str, provider: str) -> str:
    """The key a provider's limits from one source are counted under."""
    return f"{source}->provider:{provider}"


def canonical_source(source: str) -> str:
    """An IP address in its one canonical spelling (``2001:DB8:0::1`` -> ``2001:db8::1``).

    Every node must derive the same key for the same IP; anything that is
    not an IP address is kept as is.
    """
    try:
        return str(ipaddress.ip_address(source))
    except ValueError:
        return source


# --------------------------------------------------------------------------
# Parsing

_RATE: Final = re.compile(r"^\s*(\d+)\s*/\s*([A-Za-z]+)\s*$")
_PERIODS: Final = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SUFFIX: Final = re.compile(
    r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$"
)

_RATE_WHAT: Final = "a rate like 100/s, 10/min, 5000/h or 100000/day"


def parse_rate(value: Any) -> Rate:
    """``100/s``, ``10/min``, ``5000/h``, ``100000/day`` -> :class:`Rate`."""
    if not isinstance(value, str):
        raise TypeError("write a count and a period")
    match = _RATE.match(value)
    if match is None:
        raise ValueError("write a whole count, a slash and a period")
    count, unit = int(match.group(1)), match.group(2).lower()
    if count < 1:
        raise ValueError("the count must be at least 1")
    if unit not in _PERIODS:
        raise ValueError(f"unknown period {unit!r}; use s, min, h or day")
    return Rate(count, _PERIODS[unit])


_CONVERTERS: Final[dict[str, tuple[Callable[[Any], object], str]]] = {
    "connection_limit": (parse_positive_int, "a whole number >= 1"),
    "max_connection_rate": (parse_rate, _RATE_WHAT),
    "max_message_rate": (parse_rate, _RATE_WHAT),
    "max_deliveries_per_connection": (parse_positive_int, "a whole number >= 1"),
    "idle_timeout": (parse_duration, "a duration"),
}


def parse_redis_url(value: Any) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL, checked and returned as is."""
    if not isinstance(value, str):
        raise TypeError("not a string")
    parsed = urlparse(value)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("the scheme must be redis://, rediss:// or unix://")
    if parsed.scheme == "unix":
        if not parsed.path:
            raise ValueError("unix:// needs a socket path")
        return value
    if not parsed.hostname:
        raise ValueError("no host")
    _ = parsed.port  # raises ValueError when out of range
    db = parsed.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError("the path must be a database number, like /0")
    return value


def _named(r: Reader, value: Any, path: str) -> dict[str, Any]:
    """A mapping whose keys are names we do not know in advance."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        r.error(path, "must be a mapping of names")
        return {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _NAME.match(key):
            r.error(join(path, str(key)), "names are letters, digits, '_', '.' or '-'")
        else:
            out[key] = item
    return out


def _knobs(r: Reader, m: Mapping[str, Any], path: str) -> Knobs:
    values: dict[str, Any] = {}
    for key, (convert, what) in _CONVERTERS.items():
        if key in m:
            parsed = r.typed(m[key], join(path, key), convert, what)
            if parsed is not None:
                values[key] = parsed
    return Knobs(**values)


def _match(r: Reader, value: Any, path: str) -> tuple[str, ...] | None:
    items = r.sequence(value, path)
    if items is None:
        return None
    if not items:
        r.error(path, "list at least one MX host suffix")
        return None
    suffixes: list[str] = []
    for i, item in enumerate(items):
        text = item.strip().strip(".").lower() if isinstance(item, str) else ""
        if not _SUFFIX.match(text):
            r.error(f"{path}[{i}]", f'must be a host name suffix like ".google.com", got {item!r}')
        else:
            suffixes.append(text)
    return tuple(suffixes)


def _providers(r: Reader, value: Any) -> tuple[Provider, ...]:
    path = "shaping.providers"
    builtin = {p.name: p for p in BUILTIN_PROVIDERS}
    merged = dict(builtin)
    for name, item in _named(r, value, path).items():
        p = join(path, name)
        m = r.mapping(item, p, ("match", *_KNOB_KEYS))
        if m is None:
            continue
        knobs = _knobs(r, m, p)
        match = _match(r, m["match"], join(p, "match")) if "match" in m else None
        base = builtin.get(name)
        if base is None and "match" not in m:
            r.error(join(p, "match"), "is required for a provider that is not built in")
            continue
        if base is None:
            merged[name] = Provider(name, match or (), knobs)
        else:
            merged[name] = Provider(name, match or base.match, knobs.over(base.knobs))
    return tuple(merged.values())


def _sources(r: Reader, value: Any, providers: tuple[Provider, ...]) -> dict[str, SourceRules]:
    path = "shaping.sources"
    if value is None:
        return {}
    if not isinstance(value, dict):
        r.error(path, "must be a mapping of source IP to settings")
        return {}
    known = {p.name for p in providers}
    out: dict[str, SourceRules] = {}
    for key, item in value.items():
        p = join(path, str(key))
        address = r.typed(key, p, parse_address, "an IP address")
        m = r.mapping(item, p, (*_KNOB_KEYS, "providers"))
        if address is None or m is None:
            continue
        source = str(address)
        if source in out:
            r.error(p, f"{source} is listed twice")
            continue
        per_provider: dict[str, Knobs] = {}
        for name, block in _named(r, m.get("providers"), join(p, "providers")).items():
            pp = join(join(p, "providers"), name)
            if name not in known:
                r.error(pp, f"unknown provider (known: {', '.join(sorted(known))})")
                continue
            pm = r.mapping(block, pp, _KNOB_KEYS)
            if pm is not None:
                per_provider[name] = _knobs(r, pm, pp)
        out[source] = SourceRules(_knobs(r, m, p), per_provider)
    return out


def _throttle(r: Reader, value: Any) -> tuple[ThrottleRule, ...]:
    rules: list[ThrottleRule] = []
    for i, item in enumerate(r.sequence(value, "shaping.throttle") or []):
        p = f"shaping.throttle[{i}]"
        m = r.mapping(item, p, ("pattern", "duration"))
        if m is None:
            continue
        for key in ("pattern", "duration"):
            if key not in m:
                r.error(join(p, key), "is required")
        text = m.get("pattern")
        pattern: re.Pattern[str] | None = None
        if "pattern" in m and (not isinstance(text, str) or not text):
            r.error(join(p, "pattern"), "must be a regular expression (a non-empty string)")
        elif isinstance(text, str):
            try:
                pattern = re.compile(text)
            except re.error as exc:
                r.error(join(p, "pattern"), f"is not a valid regular expression: {exc}")
        duration = None
        if "duration" in m:
            duration = r.typed(m["duration"], join(p, "duration"), parse_duration, "a duration")
        if pattern is not None and duration is not None:
            rules.append(ThrottleRule(pattern, duration))
    return tuple(rules)


def parse_shaping(r: Reader, value: Any) -> ShapingConfig:
    """Read the ``shaping`` section (``None``: absent). Problems go to ``r.errors``.

    Whatever is wrong, a usable config comes back (bad keys keep their
    defaults), so the caller can report every error at once.
    """
    m = r.mapping(value, "shaping", ("default", "providers", "sources", "throttle", "lease_ttl"))
    if not m:
        return ShapingConfig()
    default_block = r.mapping(m.get("default"), "shaping.default", _KNOB_KEYS) or {}
    default = _knobs(r, default_block, "shaping.default").over(DEFAULT_KNOBS)
    providers = _providers(r, m.get("providers"))
    sources = _sources(r, m.get("sources"), providers)
    throttle = _throttle(r, m["throttle"]) if "throttle" in m else DEFAULT_THROTTLE
    lease_ttl = DEFAULT_LEASE_TTL
    if "lease_ttl" in m:
        parsed = r.typed(m["lease_ttl"], "shaping.lease_ttl", parse_duration, "a duration")
        lease_ttl = DEFAULT_LEASE_TTL if parsed is None else parsed
    return ShapingConfig(default, providers, sources, throttle, lease_ttl)


def parse_redis(r: Reader, value: Any) -> RedisConfig | None:
    """Read the ``redis`` section; ``None`` when there is no ``url`` (a single node)."""
    m = r.mapping(value, "redis", ("url", "key_prefix", "node_ttl"))
    if not m:
        return None
    url = None
    if "url" in m:
        url = r.typed(m["url"], "redis.url", parse_redis_url, "a redis:// URL")
    key_prefix = m.get("key_prefix", "mta:")
    if not isinstance(key_prefix, str):
        r.error("redis.key_prefix", "must be a string")
        key_prefix = "mta:"
    node_ttl = 30.0
    if "node_ttl" in m:
        parsed = r.typed(m["node_ttl"], "redis.node_ttl", parse_duration, "a duration")
        node_ttl = 30.0 if parsed is None else parsed
    if url is None:
        return None
    return RedisConfig(url, key_prefix, node_ttl)
