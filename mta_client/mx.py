"""MX resolution: from a recipient domain to a site and the addresses to try.

Specs: RFC 5321 §5.1 (locating the target host), RFC 7505 (null MX),
RFC 2308 (negative caching), RFC 5890-5893 with UTS #46 (IDNA).

One :meth:`MxResolver.resolve` call::

    domain ─(normalize: lower-case, no final dot, IDNA A-labels, LDH)──╴invalid: permanent
      │
      ├─ in routes? ─> route host: IP literal, or its A/AAAA ─> site "route:host:port"
      │
      MX ─┬─ NXDOMAIN ──────────────────────────> MxPermanentError(nxdomain)
          ├─ SERVFAIL / timeout / unreachable ──> MxTemporaryError
          ├─ no MX (NODATA) ─> implicit MX: the domain itself, preference 0, site = domain
          ├─ only "." exchanges ───────────────> MxPermanentError(null_mx)
          └─ hosts by preference, shuffled among equals (site = sorted host names)
               └─ A and/or AAAA of each host, concurrently, in the caller's families
                    host without address: skipped
                    no address at all: temporary if any lookup failed temporarily,
                                       else MxPermanentError(no_address)

Caching is per DNS answer, keyed by (name, type): the MX answer of a domain
and the A/AAAA answers of each host. Domains hosted by one provider share the
host lookups, a cache hit re-shuffles equal preferences (RFC 5321 §5.1 wants
the load spread), and each answer expires on its own TTL, capped by
``max_cache_ttl``. Negative answers (NXDOMAIN, NODATA) live for their RFC 2308
TTL capped by ``negative_cache_ttl``; nameserver failures and timeouts for
``failure_cache_ttl`` (RFC 2308 §7 allows up to five minutes), so that a
broken nameserver costs one timeout per ``failure_cache_ttl``, not one per
message. Concurrent lookups of one answer share a single query.

The cache reads time from the injected ``clock`` (``trio.current_time`` by
default, which ``trio.testing.MockClock`` controls). Each DNS lookup is bounded
by ``timeout`` on the trio clock; a resolve makes at most two rounds of
lookups (MX, then every host's addresses at once), so it returns within
about twice ``timeout``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final, Generic, TypeVar, cast

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.resolver
import dns.rrset
import trio

from mta_client.errors import MxError as MxError
from mta_client.errors import MxFailure as MxFailure
from mta_client.errors import MxPermanentError as MxPermanentError
from mta_client.errors import MxTemporaryError as MxTemporaryError

__all__ = [
    "ALL_FAMILIES",
    "Destination",
    "MxCandidate",
    "MxError",
    "MxFailure",
    "MxPermanentError",
    "MxResolver",
    "MxTemporaryError",
    "Route",
    "normalize_domain",
    "parse_route",
]

IPAddress = IPv4Address | IPv6Address

#: Address families a caller can reach (IP versions): both, by default.
ALL_FAMILIES: Final = frozenset({4, 6})

#: Default SMTP port (RFC 5321 §4.5.4.2 names 25 for relay).
SMTP_PORT: Final = 25

# At most this many MX hosts are looked up per resolve, best preferences
# first: a hostile domain could publish hundreds of MX records to make every
# delivery attempt fan out into hundreds of queries. Real MX sets have at
# most a handful of hosts; Postfix tries 5 addresses by default.
_MAX_MX_HOSTS: Final = 20

# RFC 1035 §2.3.1 preferred name syntax, as RFC 5321 §4.1.2 requires for a
# Domain: letters, digits and inner hyphens, at most 63 octets a label.
_LDH_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# RFC 5321 §4.5.3.1.2: a domain is at most 255 octets on the wire, which
# leaves 253 characters of text without the final dot.
_MAX_DOMAIN_CHARS: Final = 253
_PORT: Final = re.compile(r"[0-9]{1,5}")

# Per attempt to one nameserver, before dnspython retries (its own default);
# the whole lookup is bounded by the resolver's ``timeout``.
_ATTEMPT_TIMEOUT: Final = 2.0


@dataclass(frozen=True, slots=True)
class MxCandidate:
    """One address to try: ``host`` is the MX host name (or route host) it belongs to."""

    host: str
    address: IPAddress
    port: int
    preference: int


@dataclass(frozen=True, slots=True)
class Destination:
    """A resolved domain: its shaping ``site`` and the candidates to try, in order.

    ``domain`` is the normalized (lower-case, A-label) domain. ``site`` is the
    sorted, de-duplicated, comma-joined set of its MX host names, so that all
    domains hosted by one provider share it; the domain itself for an
    implicit MX; ``route:host:port`` for a routed domain. It depends only on
    the published MX set, never on the caller's families or on which
    lookups failed, so every node derives the same site for a domain.
    """

    domain: str
    site: str
    candidates: tuple[MxCandidate, ...]


@dataclass(frozen=True, slots=True)
class Route:
    """A ``dns.routes`` target: a host name or IP literal and a port."""

    host: str
    port: int
    address: IPAddress | None

    @property
    def label(self) -> str:
        """``host:port``, with an IPv6 literal in brackets."""
        host = f"[{self.host}]" if isinstance(self.address, IPv6Address) else self.host
        return f"{host}:{self.port}"


def normalize_domain(domain: str) -> str:
    """The domain as DNS queries and sites spell it: lower-case ASCII, no final dot.

    Non-ASCII labels become IDNA A-labels (IDNA 2008 with the UTS #46
    mapping, as browsers and SMTPUTF8 agents do). Raises
    :class:`MxPermanentError` (``invalid_domain``) for an empty name, an
    IP address or address literal, a label that is not letters, digits and inner hyphens
    (RFC 5321 §4.1.2), or a name that is too long.
    """
    text = domain[:-1] if domain.endswith(".") else domain
    if not text:
        raise MxPermanentError(domain, MxFailure.INVALID_DOMAIN, "empty")
    try:
        name = dns.name.from_unicode(
            text, origin=dns.name.root, idna_codec=dns.name.IDNA_2008_Practical
        )
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise MxPermanentError(domain, MxFailure.INVALID_DOMAIN, str(exc)) from exc
    labels = [label.decode("ascii", "replace").lower() for label in name.labels[:-1]]
    ascii_name = ".".join(labels)
    if not labels or len(ascii_name) > _MAX_DOMAIN_CHARS:
        raise MxPermanentError(domain, MxFailure.INVALID_DOMAIN, "bad length")
    for label in labels:
        if not _LDH_LABEL.fullmatch(label):
            raise MxPermanentError(domain, MxFailure.INVALID_DOMAIN, f"bad label {label!r}")
    if _is_ip_literal(ascii_name):
        # RFC 5321 §4.1.3: an address is written as a bracketed address literal.
        raise MxPermanentError(domain, MxFailure.INVALID_DOMAIN, "an IP address")
    return ascii_name


def parse_route(target: str, *, default_port: int = SMTP_PORT) -> Route:
    """Parse a ``dns.routes`` value: ``host[:port]``, ``ipv4[:port]``, ``[ipv6][:port]``.

    Raises :class:`ValueError` naming what is wrong.
    """
    address: IPAddress | None = None
    if target.startswith("["):
        host, bracket, rest = target[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"route {target!r}: expected [ipv6] or [ipv6]:port")
        try:
            address = IPv6Address(host)
        except ValueError:
            raise ValueError(f"route {target!r}: {host!r} is not an IPv6 address") from None
        port_text = rest[1:] if rest else ""
    elif target.count(":") > 1:
        # "2001:db8::1:25" could mean port 25 or an address ending in :25.
        raise ValueError(f"route {target!r}: write IPv6 as [address] or [address]:port")
    else:
        host, colon, port_text = target.partition(":")
        if colon and not port_text:
            raise ValueError(f"route {target!r}: empty port")
    port = default_port
    if port_text:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise ValueError(f"route {target!r}: bad port {port_text!r}")
        port = int(port_text)
    if address is None:
        try:
            address = ip_address(host)
        except ValueError:
            try:
                host = normalize_domain(host)
            except MxPermanentError as exc:
                raise ValueError(f"route {target!r}: bad host ({exc.detail})") from None
    if address is not None:
        host = str(address)
    return Route(host=host, port=port, address=address)


# -- the cache ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Failure:
    """A lookup that produced no records: kept as data, raised as an MxError later."""

    temporary: bool
    reason: MxFailure
    detail: str


_T = TypeVar("_T")


@dataclass(slots=True)
class _Flight(Generic[_T]):
    """A lookup in progress; concurrent askers wait for its outcome."""

    done: trio.Event = field(default_factory=trio.Event)
    outcome: _T | _Failure | None = None


class _TtlCache(Generic[_T]):
    """Lookup outcomes by key, each until its own expiry on the injected clock."""

    def __init__(self, clock: Callable[[], float], max_entries: int) -> None:
        self._clock = clock
        self._max_entries = max_entries
        # Insertion-ordered: the first entry is the oldest, evicted when full.
        self._entries: dict[Hashable, tuple[float, _T | _Failure]] = {}
        self._flights: dict[Hashable, _Flight[_T]] = {}

    async def get(
        self, key: Hashable, fetch: Callable[[], Awaitable[tuple[_T | _Failure, float]]]
    ) -> _T | _Failure:
        """The cached outcome for ``key``, else ``fetch()``'s (outcome, ttl), stored."""
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                expires, outcome = entry
                if self._clock() < expires:
                    return outcome
                del self._entries[key]
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.outcome is not None:
                return flight.outcome
            # The fetching task was cancelled: try again, perhaps as the fetcher.
        flight = _Flight[_T]()
        self._flights[key] = flight
        started = self._clock()
        try:
            outcome, ttl = await fetch()
            flight.outcome = outcome
            if ttl > 0:
                self._store(key, outcome, started + ttl)
        finally:
            del self._flights[key]
            flight.done.set()
        return outcome

    def _store(self, key: Hashable, outcome: _T | _Failure, expires: float) -> None:
        self._entries.pop(key, None)
        while self._entries and len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (expires, outcome)


# -- the resolver -------------------------------------------------------------

_MxRecords = tuple[tuple[int, str], ...]
_Addresses = tuple[IPAddress, ...]
_FAMILY_RDTYPE: Final = {4: dns.rdatatype.A, 6: dns.rdatatype.AAAA}


class MxResolver:
    """Resolves recipient domains to :class:`Destination` objects, with a TTL cache.

    ``nameservers``: the (ip, port) pairs to ask, in order; ``None`` reads the
    system's resolver configuration (``/etc/resolv.conf``) once, here.
    ``routes``: domain -> ``host[:port]`` overrides that bypass MX (smart
    hosts, tests); a bad entry raises :class:`ValueError` here. ``port``: the
    SMTP port for MX hosts and for routes without one. ``timeout``: seconds
    per DNS lookup. ``rng`` shuffles equal preferences; ``clock`` times the
    cache.
    """

    def __init__(
        self,
        *,
        nameservers: Sequence[tuple[str, int]] | None = None,
        routes: Mapping[str, str] | None = None,
        port: int = SMTP_PORT,
        timeout: float = 5.0,
        max_cache_ttl: float = 3600.0,
        negative_cache_ttl: float = 300.0,
        failure_cache_ttl: float = 30.0,
        max_cache_entries: int = 10_000,
        rng: random.Random | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_cache_entries < 1:
            raise ValueError("max_cache_entries must be at least 1")
        if nameservers is None:
            resolver = dns.asyncresolver.Resolver()
        else:
            if not nameservers:
                raise ValueError("nameservers: give at least one, or None for the system's")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, ns_port) for ip, ns_port in nameservers
            ]
        resolver.timeout = min(_ATTEMPT_TIMEOUT, timeout)
        resolver.lifetime = timeout
        resolver.cache = None  # ours is below, on the trio clock
        self._resolver = resolver
        self._backend = dns.asyncbackend.get_backend("trio")
        self._routes: dict[str, Route] = {}
        for domain, target in (routes or {}).items():
            try:
                key = normalize_domain(domain)
            except MxPermanentError as exc:
                raise ValueError(f"routes: bad domain {domain!r} ({exc.detail})") from None
            self._routes[key] = parse_route(target, default_port=port)
        self._port = port
        self._timeout = timeout
        self._max_cache_ttl = max_cache_ttl
        self._negative_cache_ttl = min(negative_cache_ttl, max_cache_ttl)
        self._failure_cache_ttl = min(failure_cache_ttl, max_cache_ttl)
        # Spreads load over equal preferences (RFC 5321 §5.1), not a secret.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311
        self._mx_cache: _TtlCache[_MxRecords] = _TtlCache(clock, max_cache_entries)
        self._address_cache: _TtlCache[_Addresses] = _TtlCache(clock, max_cache_entries)

    async def resolve(self, domain: str, *, families: frozenset[int] = ALL_FAMILIES) -> Destination:
        """The site of ``domain`` and the (host, address, port) candidates, best first.

        ``families`` are the IP versions the caller can reach (4, 6): an
        IPv4 source gets IPv4 candidates only. Within one host, IPv6 comes
        before IPv4 (RFC 6724's default) and each family's addresses are
        shuffled; an address already listed for a better host is not
        repeated. Raises :class:`MxPermanentError` or :class:`MxTemporaryError`.
        """
        if not families or not families <= ALL_FAMILIES:
            raise ValueError(f"families must be a non-empty subset of {{4, 6}}, not {families}")
        name = normalize_domain(domain)
        route = self._routes.get(name)
        if route is not None:
            return await self._resolve_route(name, route, families)

        records = await self._mx_cache.get(name, lambda: self._fetch_mx(name))
        if isinstance(records, _Failure):
            raise _error(name, records)
        if not records:
            # RFC 5321 §5.1: no MX records, so the domain is its own implicit
            # MX with preference 0.
            hosts = [(0, name)]
            site = name
        else:
            # RFC 7505: a "." exchange means "no mail here". One that sits
            # next to real exchanges is a misconfiguration (§3 forbids it): it
            # cannot be connected to, so it is ignored and the others used.
            real = [(pref, host) for pref, host in records if host != "."]
            if not real:
                raise MxPermanentError(name, MxFailure.NULL_MX)
            site = ",".join(sorted({host for _, host in real}))
            hosts = self._order(real)[:_MAX_MX_HOSTS]
        candidates = await self._candidates(name, hosts, families, self._port)
        return Destination(domain=name, site=site, candidates=candidates)

    async def _resolve_route(
        self, name: str, route: Route, families: frozenset[int]
    ) -> Destination:
        site = f"route:{route.label}"
        if route.address is None:
            candidates = await self._candidates(name, [(0, route.host)], families, route.port)
        elif route.address.version in families:
            candidates = (MxCandidate(route.host, route.address, route.port, 0),)
        else:
            detail = f"route {route.label} is IPv{route.address.version}"
            raise MxPermanentError(name, MxFailure.NO_ADDRESS, detail)
        return Destination(domain=name, site=site, candidates=candidates)

    def _order(self, records: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        """Hosts by ascending preference, shuffled among equals (RFC 5321 §5.1)."""
        best: dict[str, int] = {}
        for pref, host in records:
            best[host] = min(pref, best.get(host, pref))
        by_pref: dict[int, list[str]] = {}
        for host, pref in best.items():
            by_pref.setdefault(pref, []).append(host)
        ordered: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            # Sorted first, so a seeded rng gives one order whatever the DNS order.
            group = sorted(by_pref[pref])
            self._rng.shuffle(group)
            ordered.extend((pref, host) for host in group)
        return ordered

    async def _candidates(
        self,
        domain: str,
        hosts: Sequence[tuple[int, str]],
        families: frozenset[int],
        port: int,
    ) -> tuple[MxCandidate, ...]:
        """Look up every host's addresses at once; skip hosts without any."""
        wanted = [
            (host, family)
            for _, host in hosts
            if not _is_ip_literal(host)
            for family in (6, 4)
            if family in families
        ]
        found: dict[tuple[str, int], _Addresses | _Failure] = {}

        async def look_up(host: str, family: int) -> None:
            found[host, family] = await self._address_cache.get(
                (host, family), lambda: self._fetch_addresses(host, family)
            )

        async with trio.open_nursery() as nursery:
            for host, family in wanted:
                nursery.start_soon(look_up, host, family)

        candidates: list[MxCandidate] = []
        seen: set[IPAddress] = set()
        problems: list[str] = []
        temporary: list[_Failure] = []
        for pref, host in hosts:
            if _is_ip_literal(host):
                # RFC 5321 §5.1: the exchange must be a domain name; an
                # address there is invalid and never used (Exim's default).
                problems.append(f"{host}: an IP address, not a host name")
                continue
            host_candidates = 0
            for family in (6, 4):
                if family not in families:
                    continue
                outcome = found[host, family]
                if isinstance(outcome, _Failure):
                    if outcome.temporary:
                        temporary.append(outcome)
                    problems.append(f"{host} IPv{family}: {outcome.reason.value}")
                    continue
                addresses = sorted(outcome)
                self._rng.shuffle(addresses)
                for address in addresses:
                    host_candidates += 1
                    if address not in seen:
                        seen.add(address)
                        candidates.append(MxCandidate(host, address, port, pref))
            if not host_candidates and not any(
                isinstance(found[host, f], _Failure) for f in families
            ):
                problems.append(f"{host}: no {_family_text(families)} address")
        if candidates:
            return tuple(candidates)
        detail = "; ".join(problems)
        if temporary:
            # One lookup that might succeed later makes the whole answer a "later".
            raise MxTemporaryError(domain, temporary[0].reason, detail)
        raise MxPermanentError(domain, MxFailure.NO_ADDRESS, detail)

    async def _fetch_mx(self, domain: str) -> tuple[_MxRecords | _Failure, float]:
        outcome, ttl = await self._query(domain, dns.rdatatype.MX)
        if outcome is None:  # NODATA
            return (), ttl
        if isinstance(outcome, _Failure):
            return outcome, ttl
        records = []
        for rdata in outcome:
            mx = cast(dns.rdtypes.ANY.MX.MX, rdata)
            host = mx.exchange.to_text(omit_final_dot=True).lower()
            records.append((mx.preference, host))
        return tuple(records), ttl

    async def _fetch_addresses(self, host: str, family: int) -> tuple[_Addresses | _Failure, float]:
        outcome, ttl = await self._query(host, _FAMILY_RDTYPE[family])
        if outcome is None:  # NODATA
            return (), ttl
        if isinstance(outcome, _Failure):
            return outcome, ttl
        make = IPv4Address if family == 4 else IPv6Address
        return tuple(make(rdata.to_text()) for rdata in outcome), ttl

    async def _query(
        self, qname: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[dns.rrset.RRset | _Failure | None, float]:
        """One lookup: the answer RRset (``None`` for NODATA) or a failure, and its TTL.

        The TTL is what the cache may keep the outcome: the answer's (the
        minimum along any CNAME chain; the SOA's for NODATA and NXDOMAIN,
        RFC 2308 §5) capped by the configured maxima.
        """
        what = f"{dns.rdatatype.to_text(rdtype)} {qname}"
        name = dns.name.from_text(qname, origin=dns.name.root)
        # dnspython's own lifetime runs on time.time(), which MockClock does
        # not move; this deadline runs on the trio clock and normally fires
        # first (or together with it, on the real clock).
        with trio.move_on_after(self._timeout):
            try:
                answer = await self._resolver.resolve(
                    name,
                    rdtype,
                    search=False,
                    raise_on_no_answer=False,
                    lifetime=self._timeout,
                    backend=self._backend,
                )
            except dns.resolver.NXDOMAIN as exc:
                failure = _Failure(temporary=False, reason=MxFailure.NXDOMAIN, detail=what)
                return failure, min(_negative_ttl(exc), self._negative_cache_ttl)
            except dns.resolver.YXDOMAIN:
                # A DNAME made the name too long: it cannot exist.
                failure = _Failure(False, MxFailure.NXDOMAIN, f"{what}: YXDOMAIN")
                return failure, self._negative_cache_ttl
            except dns.resolver.NoNameservers as exc:
                return _nameserver_failure(what, exc), self._failure_cache_ttl
            except dns.exception.Timeout:
                return _Failure(True, MxFailure.TIMEOUT, what), self._failure_cache_ttl
            except dns.exception.DNSException as exc:
                return _Failure(True, MxFailure.SERVFAIL, f"{what}: {exc}"), self._failure_cache_ttl
            ttl = float(answer.chaining_result.minimum_ttl)
            if answer.rrset is None:
                ttl = min(ttl, self._negative_cache_ttl)
            return answer.rrset, min(ttl, self._max_cache_ttl)
        return _Failure(True, MxFailure.TIMEOUT, what), self._failure_cache_ttl


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """The RFC 2308 §5 TTL of an NXDOMAIN: min(SOA TTL, SOA minimum), or 300 s without SOA."""
    responses = cast(dict[dns.name.Name, dns.message.Message], exc.kwargs["responses"])
    ttls = []
    for response in responses.values():
        if isinstance(response, dns.message.QueryMessage):
            try:
                ttls.append(float(response.resolve_chaining().minimum_ttl))
            except dns.exception.DNSException:
                continue
    return min(ttls, default=float(dns.message.NEGATIVE_TTL_WITHOUT_SOA))


def _nameserver_failure(what: str, exc: dns.resolver.NoNameservers) -> _Failure:
    """Every nameserver failed: SERVFAIL (or another rcode), timeouts, or unreachable."""
    errors = cast(list[tuple[str, bool, int, object, object]], exc.kwargs.get("errors", []))
    rcodes = sorted({error for _, _, _, error, _ in errors if isinstance(error, str)})
    if rcodes:
        return _Failure(True, MxFailure.SERVFAIL, f"{what}: {', '.join(rcodes)}")
    if any(isinstance(error, dns.exception.Timeout) for _, _, _, error, _ in errors):
        return _Failure(True, MxFailure.TIMEOUT, what)
    causes = "; ".join(sorted({f"{server}: {error}" for server, _, _, error, _ in errors}))
    return _Failure(True, MxFailure.UNREACHABLE, f"{what}: {causes}")


def _error(domain: str, failure: _Failure) -> MxError:
    cls = MxTemporaryError if failure.temporary else MxPermanentError
    return cls(domain, failure.reason, failure.detail)


def _is_ip_literal(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def _family_text(families: frozenset[int]) -> str:
    return "/".join(f"IPv{family}" for family in sorted(families))
