"""SenderMetrics: each method moves exactly its own series, read back from the registry."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from mta_client.metrics import (
    DELIVERY_LATENCY_BUCKETS,
    NO_SOURCE,
    SenderMetrics,
    source_label,
)

SOURCE = "203.0.113.10"
OTHER = "203.0.113.11"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(registry: CollectorRegistry) -> Samples:
    """Every sample in the registry except the ``_created`` timestamps."""
    out: Samples = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def changes(registry: CollectorRegistry, action: Callable[[], None]) -> Samples:
    """The samples ``action`` changed (or created), with their new values."""
    before = samples(registry)
    action()
    after = samples(registry)
    return {key: value for key, value in after.items() if before.get(key) != value}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> SenderMetrics:
    return SenderMetrics(registry, sources=[SOURCE, OTHER])


def delivery(source: str, status: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("mta_client_deliveries_total", (("source", source), ("status", status)))


@pytest.mark.parametrize("status", ["deferred", "bounced", "expired"])
def test_each_outcome_counts_one_recipient_in_its_own_series(
    registry: CollectorRegistry, metrics: SenderMetrics, status: str
) -> None:
    method: Callable[[str], None] = getattr(metrics, status)
    assert changes(registry, lambda: method(SOURCE)) == {delivery(SOURCE, status): 1.0}
    assert changes(registry, lambda: method(SOURCE)) == {delivery(SOURCE, status): 2.0}


def test_delivered_counts_and_observes_latency_for_the_source(
    registry: CollectorRegistry, metrics: SenderMetrics
) -> None:
    moved = changes(registry, lambda: metrics.delivered(SOURCE, 42.0))
    assert moved[delivery(SOURCE, "delivered")] == 1.0
    histogram = "mta_client_delivery_latency_seconds"
    assert moved[(f"{histogram}_count", (("source", SOURCE),))] == 1.0
    assert moved[(f"{histogram}_sum", (("source", SOURCE),))] == 42.0
    # Only the buckets at or above 42 s moved, and only this source's series.
    buckets = {dict(labels)["le"] for (name, labels) in moved if name == f"{histogram}_bucket"}
    assert buckets == {str(b) for b in DELIVERY_LATENCY_BUCKETS if b >= 42.0} | {"+Inf"}
    assert all(dict(labels).get("source") == SOURCE for _, labels in moved)
    assert len(moved) == 3 + len(buckets)


def test_a_negative_latency_is_observed_as_zero(
    registry: CollectorRegistry, metrics: SenderMetrics
) -> None:
    metrics.delivered(SOURCE, -5.0)
    labels = {"source": SOURCE}
    assert registry.get_sample_value("mta_client_delivery_latency_seconds_sum", labels) == 0.0
    bucket = {"source": SOURCE, "le": "0.1"}
    assert registry.get_sample_value("mta_client_delivery_latency_seconds_bucket", bucket) == 1.0


def test_latency_buckets_span_a_tenth_of_a_second_to_a_day() -> None:
    assert DELIVERY_LATENCY_BUCKETS[0] == 0.1
    assert DELIVERY_LATENCY_BUCKETS[-1] == 86400.0
    assert list(DELIVERY_LATENCY_BUCKETS) == sorted(set(DELIVERY_LATENCY_BUCKETS))


def test_expired_without_a_source_uses_the_none_label(
    registry: CollectorRegistry, metrics: SenderMetrics
) -> None:
    assert NO_SOURCE == "none"
    assert changes(registry, metrics.expired) == {delivery("none", "expired"): 1.0}
    assert changes(registry, lambda: metrics.deferred(None)) == {delivery("none", "deferred"): 1.0}


@pytest.mark.parametrize("outcome", ["ok", "source_refused", "failed"])
def test_connection_counts_by_source_and_outcome(
    registry: CollectorRegistry, metrics: SenderMetrics, outcome: str
) -> None:
    moved = changes(registry, lambda: metrics.connection(OTHER, outcome))  # type: ignore[arg-type]
    key = ("mta_client_connections_total", (("outcome", outcome), ("source", OTHER)))
    assert moved == {key: 1.0}


def test_an_unknown_connection_outcome_is_refused_not_made_a_label(
    registry: CollectorRegistry, metrics: SenderMetrics
) -> None:
    with pytest.raises(ValueError, match="outcome"):
        metrics.connection(SOURCE, "timeout")  # type: ignore[arg-type]
    assert (
        registry.get_sample_value(
            "mta_client_connections_total", {"source": SOURCE, "outcome": "timeout"}
        )
        is None
    )


def test_received_counts_messages(registry: CollectorRegistry, metrics: SenderMetrics) -> None:
    assert changes(registry, lambda: metrics.received(3)) == {
        ("mta_client_received_total", ()): 3.0
    }
    assert changes(registry, metrics.received) == {("mta_client_received_total", ()): 4.0}


def test_quarantined_counts_spool_entries(
    registry: CollectorRegistry, metrics: SenderMetrics
) -> None:
    assert changes(registry, lambda: metrics.quarantined(2)) == {
        ("mta_client_spool_quarantined_total", ()): 2.0
    }


def test_set_queue_sets_both_gauges(registry: CollectorRegistry, metrics: SenderMetrics) -> None:
    assert changes(registry, lambda: metrics.set_queue(120, 7)) == {
        ("mta_client_queued_messages", ()): 120.0,
        ("mta_client_in_flight_messages", ()): 7.0,
    }
    metrics.set_queue(5, 0)
    assert registry.get_sample_value("mta_client_queued_messages") == 5.0
    assert registry.get_sample_value("mta_client_in_flight_messages") == 0.0


def test_set_suspended_sets_the_gauge(registry: CollectorRegistry, metrics: SenderMetrics) -> None:
    assert changes(registry, lambda: metrics.set_suspended(2)) == {
        ("mta_client_suspended_sources", ()): 2.0
    }


def test_configured_sources_start_at_zero(registry: CollectorRegistry) -> None:
    SenderMetrics(registry, sources=[ipaddress.ip_address(SOURCE)])
    for status in ("delivered", "deferred", "bounced", "expired"):
        labels = {"source": SOURCE, "status": status}
        assert registry.get_sample_value("mta_client_deliveries_total", labels) == 0.0
    for outcome in ("ok", "source_refused", "failed"):
        labels = {"source": SOURCE, "outcome": outcome}
        assert registry.get_sample_value("mta_client_connections_total", labels) == 0.0
    assert (
        registry.get_sample_value("mta_client_delivery_latency_seconds_count", {"source": SOURCE})
        == 0.0
    )


def test_without_sources_no_labelled_series_exist_up_front(registry: CollectorRegistry) -> None:
    SenderMetrics(registry)
    labelled = [key for key in samples(registry) if key[1]]
    assert labelled == []


def test_source_labels_are_canonical_address_text() -> None:
    assert source_label("2001:DB8:0::1") == "2001:db8::1"
    assert source_label(ipaddress.ip_address("2001:db8::1")) == "2001:db8::1"
    assert source_label(SOURCE) == SOURCE
    assert source_label(None) == "none"


def test_one_address_spelt_two_ways_is_one_series(
    registry: CollectorRegistry, metrics: SenderMetrics
) -> None:
    metrics.bounced("2001:DB8::1")
    metrics.bounced(ipaddress.ip_address("2001:db8::1"))
    labels = {"source": "2001:db8::1", "status": "bounced"}
    assert registry.get_sample_value("mta_client_deliveries_total", labels) == 2.0


def test_two_instances_on_separate_registries_do_not_collide() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    SenderMetrics(first).received()
    SenderMetrics(second)
    assert first.get_sample_value("mta_client_received_total") == 1.0
    assert second.get_sample_value("mta_client_received_total") == 0.0
