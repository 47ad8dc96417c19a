"""Pure policy decisions: who may connect, which source, which destination.

No I/O and no clock: the trio shell asks, this module answers with a
decision. Every refusal carries a bounded ``reason`` (the metric label from
product.md), a human ``detail`` for the session log line, and the SOCKS5 REP
code to answer with (RFC 1928 §6; the PROXY protocol has no reply channel,
so PROXY listeners just close).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from kumoproxy.config import Config, IPAddress, IPNetwork, UserConfig


class RefusalReason(enum.StrEnum):
    """The ``reason`` label of ``kumoproxy_refusals_total``."""

    AUTH = "auth"
    CLIENT = "client"
    SOURCE = "source"
    DESTINATION = "destination"
    LIMIT = "limit"
    PROTOCOL = "protocol"


#: RFC 1928 §6: X'02' connection not allowed by ruleset.
REPLY_NOT_ALLOWED = 2


@dataclass(frozen=True, slots=True)
class Refusal:
    """A decision to refuse, with everything needed to report it."""

    reason: RefusalReason
    detail: str
    reply: int = REPLY_NOT_ALLOWED


def _in_any(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def unmap(address: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` -> ``a.b.c.d``: dual-stack sockets report IPv4 peers mapped."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_client(config: Config, peer: IPAddress) -> Refusal | None:
    """``clients.allow`` on the real peer address, before a byte is read."""
    peer = unmap(peer)
    if _in_any(peer, config.clients_allow):
        return None
    return Refusal(RefusalReason.CLIENT, f"client {peer} is not in clients.allow")


def select_source(
    config: Config,
    *,
    requested: IPAddress | None,
    user: UserConfig | None,
) -> IPAddress | Refusal | None:
    """Pick the egress IP for a session (product.md: "source selection").

    ``requested`` is what the client asked for: the BIND address, a
    ``name+<ip>`` username, or a PROXY header's source. Without one, the
    user's then the global ``default_source`` apply, else ``None`` (the
    kernel chooses).
    """
    allowed = config.sources if user is None or user.sources is None else user.sources
    if requested is None:
        fallback = user.default_source if user is not None else None
        requested = fallback or config.default_source
        if requested is None:
            return None
    if requested not in config.sources:
        return Refusal(RefusalReason.SOURCE, f"source {requested} is not in sources")
    if requested not in allowed:
        assert user is not None
        return Refusal(RefusalReason.SOURCE, f"user {user.name} may not use source {requested}")
    return requested


def check_destination(config: Config, address: IPAddress, port: int) -> Refusal | None:
    """``destinations``: port allowed, and address not denied (or excepted by allow)."""
    rules = config.destinations
    address = unmap(address)
    if rules.ports is not None and not any(port in r for r in rules.ports):
        return Refusal(RefusalReason.DESTINATION, f"port {port} is not in destinations.ports")
    if _in_any(address, rules.deny) and not _in_any(address, rules.allow):
        return Refusal(RefusalReason.DESTINATION, f"{address} is in destinations.deny")
    return None


def family_matches(source: IPAddress | None, destination: IPAddress) -> bool:
    """A bound socket can only reach destinations of its own family."""
    return source is None or source.version == destination.version
