"""A fake DNS server on loopback UDP, answering from a dict, for resolver tests.

It answers the way a recursive server answers a stub: CNAME chains inside the
zone are followed and put in the answer section, negative answers (NXDOMAIN
and NODATA) carry an SOA in the authority section (RFC 2308 §3) whose TTL and
MINIMUM are ``negative_ttl``. Names absent from the zone are NXDOMAIN; a name
present with other types only is NODATA. An entry can instead be
:data:`NXDOMAIN`, :data:`SERVFAIL` or :data:`DROP` (the query is never
answered, for timeouts). Every query received is recorded, dropped ones too.

Responses are built with dnspython's message API (``dns.message.make_response``)
and must fit one UDP datagram: there is no TCP, so keep answers small (a
truncated answer would make the resolver fail over to TCP and find nothing).

Usage::

    zone = {("example.com", "MX"): [R("10 mx.example.com.")],
            ("mx.example.com", "A"): [R("192.0.2.1", ttl=60)]}
    async with fake_dns(zone) as dns_server:
        resolver = MxResolver(nameservers=[dns_server.address])
        ...
        assert dns_server.count("example.com", "MX") == 1
"""

from __future__ import annotations

import enum
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import trio

# Longest CNAME chain followed before answering SERVFAIL (a loop, say).
_MAX_CHAIN = 8
# One UDP datagram holds at most this much DNS message.
_MAX_DATAGRAM = 65535


class Special(enum.Enum):
    """An entry that is not records: a failure to serve."""

    NXDOMAIN = "NXDOMAIN"
    SERVFAIL = "SERVFAIL"
    DROP = "DROP"


NXDOMAIN = Special.NXDOMAIN
SERVFAIL = Special.SERVFAIL
DROP = Special.DROP


@dataclass(frozen=True, slots=True)
class R:
    """One record: its RDATA in zone-file text (names absolute or root-relative) and TTL."""

    rdata: str
    ttl: int = 300


Entry = Sequence[R] | Special
Zone = Mapping[tuple[str, str], Entry]


def _key(name: str | dns.name.Name) -> str:
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    return text.lower().rstrip(".")


@dataclass
class FakeDns:
    """The server's state: the zone (mutable between queries), the queries seen."""

    zone: dict[tuple[str, str], Entry]
    negative_ttl: int = 60
    host: str = "127.0.0.1"
    port: int = 0
    queries: list[tuple[str, str]] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        """(ip, port) to hand to the resolver as its only nameserver."""
        return (self.host, self.port)

    def set(self, name: str, rdtype: str, entry: Entry) -> None:
        """Replace the answer for (name, type) from now on."""
        self.zone[_key(name), rdtype.upper()] = entry

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """How many queries arrived, optionally only for this name and/or type."""
        return sum(
            1
            for qname, qtype in self.queries
            if (name is None or qname == _key(name)) and (rdtype is None or qtype == rdtype.upper())
        )

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to ``query``, or ``None`` to stay silent."""
        question = query.question[0]
        qtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((_key(question.name), qtype))
        response = dns.message.make_response(query, recursion_available=True)
        response.flags |= dns.flags.AA
        name = question.name
        for _ in range(_MAX_CHAIN):
            entry = self.zone.get((_key(name), qtype))
            if entry is DROP:
                return None
            if entry is SERVFAIL:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            if entry is NXDOMAIN:
                return self._negative(response, name, dns.rcode.NXDOMAIN)
            if isinstance(entry, Sequence):
                self._add(response, name, question.rdtype, entry)
                return response
            cname = self.zone.get((_key(name), "CNAME"))
            if isinstance(cname, Sequence) and question.rdtype != dns.rdatatype.CNAME:
                target = self._add(response, name, dns.rdatatype.CNAME, cname[:1])
                name = dns.name.from_text(target, origin=dns.name.root)
                continue
            if any(owner == _key(name) for owner, _ in self.zone):
                return self._negative(response, name, dns.rcode.NOERROR)
            return self._negative(response, name, dns.rcode.NXDOMAIN)
        response.set_rcode(dns.rcode.SERVFAIL)
        return response

    def _add(
        self,
        response: dns.message.Message,
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        records: Sequence[R],
    ) -> str:
        """Add records to the answer section; return the last RDATA as text."""
        rrset = response.find_rrset(response.answer, name, dns.rdataclass.IN, rdtype, create=True)
        text = ""
        for record in records:
            rdata = dns.rdata.from_text(
                dns.rdataclass.IN, rdtype, record.rdata, origin=dns.name.root, relativize=False
            )
            # Records of one RRset with different TTLs: the set gets the
            # smallest, as RFC 2181 §5.2 tells receivers to assume.
            rrset.add(rdata, record.ttl)
            text = rdata.to_text()
        return text

    def _negative(
        self, response: dns.message.Message, name: dns.name.Name, rcode: dns.rcode.Rcode
    ) -> dns.message.Message:
        """NXDOMAIN or NODATA with the zone's SOA in the authority section (RFC 2308 §3)."""
        response.set_rcode(rcode)
        apex = name.split(3)[1] if len(name) > 3 else name
        soa = dns.rdata.from_text(
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            f"ns.fake. hostmaster.fake. 1 3600 600 86400 {self.negative_ttl}",
        )
        rrset = response.find_rrset(
            response.authority, apex, dns.rdataclass.IN, dns.rdatatype.SOA, create=True
        )
        rrset.add(soa, self.negative_ttl)
        return response


async def serve_fake_dns(
    server: FakeDns, *, task_status: trio.TaskStatus[FakeDns] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer queries on a fresh 127.0.0.1 UDP port until cancelled."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind((server.host, 0))
        server.port = sock.getsockname()[1]
        task_status.started(server)
        while True:
            data, peer = await sock.recvfrom(_MAX_DATAGRAM)
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue  # not DNS: a real server would drop it too
            response = server.answer(query)
            if response is not None:
                await sock.sendto(response.to_wire(), peer)


@asynccontextmanager
async def fake_dns(zone: Zone, *, negative_ttl: int = 60) -> AsyncIterator[FakeDns]:
    """Run a :class:`FakeDns` for ``zone`` (keys: (name, type mnemonic)) on loopback."""
    server = FakeDns(
        zone={(_key(name), rdtype.upper()): entry for (name, rdtype), entry in zone.items()},
        negative_ttl=negative_ttl,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fake_dns, server)
        yield server
        nursery.cancel_scope.cancel()
