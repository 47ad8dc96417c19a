"""Prometheus metrics of the spooling sender: one class, built from an injected registry.

Label values stay bounded: ``source`` is a configured egress IP from the
pool (canonical text, so ``2001:db8::1`` and ``2001:DB8:0::1`` are one
series) or :data:`NO_SOURCE` when the outcome came before any source was
chosen (an expiry in the queue, an MX lookup that failed); ``status`` and
``outcome`` are the small fixed sets below. A recipient, domain or MX host
never becomes a label: that is the event log's job.

Counters are named without ``_total``; prometheus_client exports them with
it (``mta_client_deliveries_total``), as kumoproxy's do.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "DELIVERY_LATENCY_BUCKETS",
    "NO_SOURCE",
    "ConnectionOutcome",
    "DeliveryStatus",
    "SenderMetrics",
    "source_label",
]

#: Reception to delivery: sub-second on a quiet queue to a local MX, minutes
#: after a greylisting deferral, hours or a day for a site that throttles us
#: or was down. Beyond a day the message is on its way to expiring.
DELIVERY_LATENCY_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
)  # fmt: skip

#: The ``source`` label when no source was used.
NO_SOURCE: Final = "none"

#: Per-recipient outcomes, the ``status`` label of ``mta_client_deliveries_total``.
DeliveryStatus = Literal["delivered", "deferred", "bounced", "expired"]
#: How opening a connection ended: ``source_refused`` is the proxy refusing
#: the source IP (a problem with the source), ``failed`` anything else.
ConnectionOutcome = Literal["ok", "source_refused", "failed"]

_STATUSES: Final[tuple[str, ...]] = get_args(DeliveryStatus)
_OUTCOMES: Final[tuple[str, ...]] = get_args(ConnectionOutcome)

Source = str | ipaddress.IPv4Address | ipaddress.IPv6Address | None


def source_label(source: Source) -> str:
    """The ``source`` label for an egress IP: canonical address text, or ``none``."""
    if source is None:
        return NO_SOURCE
    if isinstance(source, str):
        try:
            return str(ipaddress.ip_address(source))
        except ValueError:
            return source  # not an address: trust the caller's (configured) name
    return str(source)


class SenderMetrics:
    """Every metric the sender exports, registered in ``registry``.

    ``sources``, when given (the configured pool), creates each source's
    series at zero up front, so ``rate()`` and alerts see a source before
    its first delivery and a source that never delivers shows as 0, not as
    missing.

    Delivery methods count one recipient per call; the daemon calls them
    once per recipient outcome, as it writes one event per recipient.
    """

    def __init__(self, registry: CollectorRegistry, *, sources: Iterable[Source] = ()) -> None:
        self.registry = registry
        self.queued_messages = Gauge(
            "mta_client_queued_messages",
            "Messages in the spool waiting for delivery (set by the daemon).",
            registry=registry,
        )
        self.in_flight_messages = Gauge(
            "mta_client_in_flight_messages",
            "Messages being delivered now.",
            registry=registry,
        )
        self.suspended_sources = Gauge(
            "mta_client_suspended_sources",
            "Egress sources taken out of rotation now (refused by the proxy, blocked).",
            registry=registry,
        )
        self.deliveries = Counter(
            "mta_client_deliveries",
            "Recipient outcomes, by source IP and status (delivered|deferred|bounced|expired).",
            ["source", "status"],
            registry=registry,
        )
        self.receptions = Counter(
            "mta_client_received",
            "Messages accepted into the spool.",
            registry=registry,
        )
        self.connections = Counter(
            "mta_client_connections",
            "Connection attempts to MX hosts, by source IP and outcome (ok|source_refused|failed).",
            ["source", "outcome"],
            registry=registry,
        )
        self.spool_quarantined = Counter(
            "mta_client_spool_quarantined",
            "Spool entries set aside because they could not be read.",
            registry=registry,
        )
        self.shaping_shared = Gauge(
            "mta_client_shaping_shared",
            "1 while shaping limits are shared through Redis (or no Redis is configured), "
            "0 while this node falls back to its local share.",
            registry=registry,
        )
        self.shaping_shared.set(1)
        self.shaping_fallbacks = Counter(
            "mta_client_shaping_fallbacks",
            "Switches to local-share shaping because Redis was unreachable.",
            registry=registry,
        )
        self.throttles = Counter(
            "mta_client_throttle_suspensions",
            "Paths suspended because a reply matched a shaping.throttle pattern, by source IP.",
            ["source"],
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "mta_client_delivery_latency_seconds",
            "Time from reception to delivery of a recipient, by source IP.",
            ["source"],
            buckets=DELIVERY_LATENCY_BUCKETS,
            registry=registry,
        )
        for source in sources:
            label = source_label(source)
            for status in _STATUSES:
                self.deliveries.labels(source=label, status=status)
            for outcome in _OUTCOMES:
                self.connections.labels(source=label, outcome=outcome)
            self.delivery_latency.labels(source=label)

    def delivered(self, source: Source, latency: float) -> None:
        """One recipient delivered from ``source``, ``latency`` seconds after reception."""
        label = source_label(source)
        self.deliveries.labels(source=label, status="delivered").inc()
        # Reception time may come from before a restart and a wall-clock step:
        # a negative latency is clock noise, not a faster-than-light delivery.
        self.delivery_latency.labels(source=label).observe(max(latency, 0.0))

    def deferred(self, source: Source) -> None:
        """One recipient deferred (4xx, or no MX reachable): it will be retried."""
        self.deliveries.labels(source=source_label(source), status="deferred").inc()

    def bounced(self, source: Source) -> None:
        """One recipient failed permanently (5xx, or no such domain)."""
        self.deliveries.labels(source=source_label(source), status="bounced").inc()

    def expired(self, source: Source = None) -> None:
        """One recipient given up on at the end of its queue lifetime.

        ``source`` is the last one tried, or ``None`` when none ever was.
        """
        self.deliveries.labels(source=source_label(source), status="expired").inc()

    def connection(self, source: Source, outcome: ConnectionOutcome) -> None:
        """One attempt to open a connection to an MX host, and how it ended."""
        if outcome not in _OUTCOMES:
            raise ValueError(f"connection outcome must be one of {_OUTCOMES}, got {outcome!r}")
        self.connections.labels(source=source_label(source), outcome=outcome).inc()

    def received(self, n: int = 1) -> None:
        """``n`` messages accepted into the spool."""
        self.receptions.inc(n)

    def quarantined(self, n: int = 1) -> None:
        """``n`` spool entries set aside as unreadable."""
        self.spool_quarantined.inc(n)

    def set_queue(self, queued: int, in_flight: int) -> None:
        """The spool's size now: waiting messages and those being delivered."""
        self.queued_messages.set(queued)
        self.in_flight_messages.set(in_flight)

    def shaping_mode(self, mode: str) -> None:
        """The shaper switched to ``shared`` (Redis) or ``local`` (fallback share)."""
        self.shaping_shared.set(1 if mode == "shared" else 0)
        if mode == "local":
            self.shaping_fallbacks.inc()

    def throttled(self, source: Source | None) -> None:
        """A reply asked us to slow down: the path was suspended on every node."""
        self.throttles.labels(source_label(source)).inc()

    def set_suspended(self, n: int) -> None:
        """How many sources are out of rotation now."""
        self.suspended_sources.set(n)
