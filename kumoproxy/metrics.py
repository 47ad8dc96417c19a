"""Prometheus metrics: one class, built from an injected registry.

The names and labels of the first seven are a contract (product.md,
"observability"). Label values stay bounded: ``source`` is always a
configured source IP (or ``other`` for a connection the kernel sourced from
an address we do not list), ``listener`` a configured listen address, and
``reason``/``result``/``end`` small fixed sets. A destination or anything a
client typed never becomes a label.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Connect and handshake times on loopback are sub-millisecond; to a real MX
#: tens to hundreds of milliseconds; a stuck one runs into the deadline.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

#: The ``source`` label for traffic from an address not in ``sources``.
OTHER_SOURCE = "other"


#: How a gauge's values from several worker processes add up (prometheus
#: multiprocess mode): the live processes' values summed, a dead worker's
#: dropped when the supervisor marks it dead.
LIVESUM: Final = "livesum"


class Metrics:
    """The metrics of sessions, registered in ``registry``.

    Each process that runs sessions has one: the single process, or every
    worker (where prometheus_client's multiprocess mode writes them to files
    the supervisor sums into one /metrics view). The service-level ones are
    in :class:`ControlMetrics`, owned by whichever process handles signals.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.sessions_active = Gauge(
            "kumoproxy_sessions_active",
            "Client sessions open now, by listener.",
            ["listener"],
            registry=registry,
            multiprocess_mode=LIVESUM,
        )
        self.source_connections_active = Gauge(
            "kumoproxy_source_connections_active",
            "Outbound connections open now (connecting or relaying), by source IP.",
            ["source"],
            registry=registry,
            multiprocess_mode=LIVESUM,
        )
        self.source_connections = Counter(
            "kumoproxy_source_connections",
            "Outbound connection attempts by source IP and result.",
            ["source", "result"],
            registry=registry,
        )
        self.refusals = Counter(
            "kumoproxy_refusals",
            "Sessions refused, by listener and reason.",
            ["listener", "reason"],
            registry=registry,
        )
        self.limit_refusals = Counter(
            "kumoproxy_limit_refusals",
            "Sessions refused by a limit, by which limit.",
            ["limit"],
            registry=registry,
        )
        self.bytes = Counter(
            "kumoproxy_bytes",
            "Bytes relayed, by source IP and direction (up = to the destination).",
            ["source", "direction"],
            registry=registry,
        )
        self.connect_seconds = Histogram(
            "kumoproxy_connect_seconds",
            "Time to resolve and connect to the destination, by source IP.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.handshake_seconds = Histogram(
            "kumoproxy_handshake_seconds",
            "Time from accept to a complete SOCKS5 request or PROXY header, by listener.",
            ["listener"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.session_ends = Counter(
            "kumoproxy_session_ends",
            "Sessions ended, by listener and how they ended.",
            ["listener", "end"],
            registry=registry,
        )
        self.handshakes_active = Gauge(
            "kumoproxy_handshakes_active",
            "Sessions still negotiating (the slow-loris exposure).",
            registry=registry,
            multiprocess_mode=LIVESUM,
        )
        self.accept_errors = Counter(
            "kumoproxy_accept_errors",
            "accept() failures for lack of resources (EMFILE, ENFILE, ...), by listener.",
            ["listener", "error"],
            registry=registry,
        )


class ControlMetrics:
    """Service-level metrics: reloads, drain, and (with ``workers`` > 1) the workers.

    Owned by the process that handles signals: the single process, or the
    supervisor, which never runs sessions itself.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.config_reloads = Counter(
            "kumoproxy_config_reloads",
            "Configuration reloads (SIGHUP), by result.",
            ["result"],
            registry=registry,
        )
        self.config_loaded = Gauge(
            "kumoproxy_config_loaded_timestamp_seconds",
            "Unix time at which the configuration in effect was loaded.",
            registry=registry,
        )
        self.draining = Gauge(
            "kumoproxy_draining",
            "1 while the service drains after SIGTERM/SIGINT, else 0.",
            registry=registry,
        )
        self.workers_running = Gauge(
            "kumoproxy_workers_running",
            "Worker processes running now (0 without workers: one process serves).",
            registry=registry,
        )
        self.worker_exits = Counter(
            "kumoproxy_worker_exits",
            "Worker processes that ended while they should have been serving (restarted).",
            registry=registry,
        )
