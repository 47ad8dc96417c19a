"""The deployment files and the operations guide stay true to the code.

Metric names and label values in the alert rules must be ones kumoproxy
exports; the systemd unit must run commands the CLI accepts and stop slower
than the default drain; docs/operations.md must document every metric, every
limit and timeout key, and every session end. Fast and offline; the checks
that need ``systemd-analyze`` or ``promtool`` skip when those are missing.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from kumoproxy.__main__ import _parser
from kumoproxy.admin import ROUTES
from kumoproxy.config import LimitsConfig, TimeoutsConfig
from kumoproxy.limits import LimitKind
from kumoproxy.metrics import ControlMetrics, Metrics
from kumoproxy.policy import RefusalReason
from kumoproxy.relay import Direction, RelayEnd
from kumoproxy.server import ACCEPT_CAPACITY_ERRNOS, DRAIN_END, LISTEN_BACKLOG, SOURCE_RESULTS
from kumoproxy.session import SESSION_LIFETIME_END, Outcome

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "kumoproxy.service"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE = DEPLOY / "prometheus" / "scrape.yml"
SYSCTL = DEPLOY / "sysctl.d" / "60-kumoproxy.conf"
OPERATIONS = ROOT / "docs" / "operations.md"

#: The install location the unit and the docs assume.
INSTALLED_BINARY = "/opt/kumoproxy/bin/kumoproxy"
CONFIG_FILE = "/etc/kumoproxy/kumoproxy.yaml"

#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


# --------------------------------------------------------------------------
# What kumoproxy exports


@dataclass(frozen=True)
class Exported:
    """One metric as Prometheus sees it."""

    name: str  # as exposed: counters with _total
    type: str  # counter | gauge | histogram
    labels: tuple[str, ...]

    @property
    def series_names(self) -> frozenset[str]:
        """Every sample name the metric can expose (what a PromQL selector names)."""
        match self.type:
            case "counter":
                return frozenset({self.name, self.name.removesuffix("_total") + "_created"})
            case "histogram":
                suffixes = ("_bucket", "_sum", "_count", "_created")
                return frozenset(self.name + suffix for suffix in suffixes)
            case _:
                return frozenset({self.name})

    def series_labels(self, series: str) -> frozenset[str]:
        extra = {"le"} if series.endswith("_bucket") else set()
        return frozenset(self.labels) | extra | TARGET_LABELS


def exported_metrics() -> dict[str, Exported]:
    """Every metric of :mod:`kumoproxy.metrics`' two classes, keyed by exposed name."""
    registry = CollectorRegistry()
    labels_by_family: dict[str, tuple[str, ...]] = {}
    for metrics in (Metrics(registry), ControlMetrics(registry)):
        for value in vars(metrics).values():
            if isinstance(value, MetricWrapperBase):
                for family in value.describe():
                    labels_by_family[family.name] = tuple(value._labelnames)
    out: dict[str, Exported] = {}
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = Exported(name, family.type, labels_by_family[family.name])
        # Where samples exist already (unlabelled gauges), they agree with the above.
        for sample in family.samples:
            assert sample.name in out[name].series_names, sample.name
    return out


#: The bounded values a label can take, where the code names them: (metric, label) -> values.
SESSION_ENDS = frozenset(
    {str(e) for e in RelayEnd} | {SESSION_LIFETIME_END, DRAIN_END} | {str(o) for o in Outcome}
)
_REFUSAL_REASONS = frozenset(str(r) for r in RefusalReason)
LABEL_VALUES: dict[tuple[str, str], frozenset[str]] = {
    ("kumoproxy_source_connections_total", "result"): frozenset(SOURCE_RESULTS.values()),
    ("kumoproxy_refusals_total", "reason"): _REFUSAL_REASONS,
    ("kumoproxy_limit_refusals_total", "limit"): frozenset(str(k) for k in LimitKind),
    ("kumoproxy_bytes_total", "direction"): frozenset(str(d) for d in Direction),
    ("kumoproxy_session_ends_total", "end"): SESSION_ENDS,
    ("kumoproxy_accept_errors_total", "error"): frozenset(
        errno.errorcode[e] for e in ACCEPT_CAPACITY_ERRNOS
    ),
    # Literals in kumoproxy.server / kumoproxy.__main__ (no constant to import).
    ("kumoproxy_config_reloads_total", "result"): frozenset({"ok", "error"}),
}


def test_the_metric_inventory_is_what_metrics_py_declares() -> None:
    exported = exported_metrics()
    assert "kumoproxy_source_connections_total" in exported
    assert exported["kumoproxy_connect_seconds"].type == "histogram"
    assert exported["kumoproxy_refusals_total"].labels == ("listener", "reason")
    assert exported["kumoproxy_draining"].labels == ()
    # The value table below names real metrics and labels (else it checks nothing).
    for name, label in LABEL_VALUES:
        assert label in exported[name].labels, (name, label)


# --------------------------------------------------------------------------
# Prometheus alert rules

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_SELECTOR = re.compile(r"\b(kumoproxy_[a-zA-Z0-9_]+)\b\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_PLAIN_ALTERNATIVES = re.compile(r"^[a-zA-Z0-9_]+(\|[a-zA-Z0-9_]+)*$")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(ALERTS)
    assert isinstance(doc, dict)
    assert set(doc) == {"groups"}
    rules: list[dict[str, Any]] = []
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"}, group.get("name")
        assert group["rules"], group["name"]
        rules.extend(group["rules"])
    return rules


RULES = alert_rules()


def test_alert_rules_have_the_expected_structure() -> None:
    names = [rule["alert"] for rule in RULES]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in RULES:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"Kumoproxy[A-Za-z]+", rule["alert"])
        assert isinstance(rule["expr"], str)
        assert rule["expr"].strip()
        assert _DURATION.match(str(rule["for"])), (rule["alert"], rule["for"])
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert set(rule["annotations"]) == {"summary", "description"}
        assert all(rule["annotations"][key].strip() for key in ("summary", "description"))


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: str(rule["alert"]))
def test_alert_expressions_use_only_exported_metrics_and_labels(rule: dict[str, Any]) -> None:
    exported = exported_metrics()
    by_series = {series: m for m in exported.values() for series in m.series_names}
    expr = rule["expr"]
    for series, selector in _SELECTOR.findall(expr):
        assert series in by_series, f"{rule['alert']}: {series} is not exported by kumoproxy"
        metric = by_series[series]
        allowed = metric.series_labels(series)
        for label, op, value in _MATCHER.findall(selector):
            assert label in allowed, f"{rule['alert']}: {series} has no label {label!r}"
            known = LABEL_VALUES.get((metric.name, label))
            if known is None:
                continue
            if op in ("=", "!="):
                values = [value]
            else:
                assert _PLAIN_ALTERNATIVES.match(value), f"{rule['alert']}: keep regexes simple"
                values = value.split("|")
            for v in values:
                assert v in known, f"{rule['alert']}: {label}={v!r} is never exported"
    # ``sum by (...)`` may only group by labels the selected series carry.
    carried = set().union(*(by_series[s].series_labels(s) for s, _ in _SELECTOR.findall(expr)))
    for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (part.strip() for part in clause.split(",")):
            assert label in carried, f"{rule['alert']}: grouping by unknown label {label!r}"


def test_every_counter_in_the_alerts_is_named_with_its_total_suffix() -> None:
    exported = exported_metrics()
    counters = {m.name.removesuffix("_total") for m in exported.values() if m.type == "counter"}
    for rule in RULES:
        for series, _ in _SELECTOR.findall(rule["expr"]):
            assert series not in counters, f"{rule['alert']}: write {series}_total"


def test_the_alerts_cover_what_operators_must_hear_about() -> None:
    text = "\n".join(rule["expr"] for rule in RULES)
    for needle in (
        'kumoproxy_source_connections_total{result="bind_failed"}',
        'kumoproxy_refusals_total{reason="auth"}',
        'kumoproxy_refusals_total{reason="destination"}',
        "kumoproxy_limit_refusals_total",
        'kumoproxy_limit_refusals_total{limit="handshakes"}',
        "kumoproxy_source_connections_active",
        "kumoproxy_accept_errors_total",
        'kumoproxy_config_reloads_total{result="error"}',
        "kumoproxy_draining == 1",
    ):
        assert needle in text, needle
    job = scrape_job()["job_name"]
    assert f'up{{job="{job}"}} == 0' in text


def test_the_draining_alert_waits_five_minutes() -> None:
    (rule,) = (r for r in RULES if "kumoproxy_draining" in r["expr"])
    assert rule["for"] == "5m"


def scrape_job() -> dict[str, Any]:
    doc = load_yaml(SCRAPE)
    assert isinstance(doc, dict)
    assert set(doc) == {"scrape_configs"}
    (job,) = doc["scrape_configs"]
    assert isinstance(job, dict)
    return job


def test_scrape_config_targets_the_admin_metrics_endpoint() -> None:
    job = scrape_job()
    assert job["job_name"] == "kumoproxy"
    assert job["metrics_path"].encode() in ROUTES
    assert job["scheme"] == "http"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets
    for target in targets:
        host, _, port = str(target).rpartition(":")
        assert host, target
        assert port.isdigit(), target
    # A scrape must finish within the interval.
    assert _seconds(job["scrape_timeout"]) <= _seconds(job["scrape_interval"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------
# The systemd unit


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> values (a key may repeat, e.g. ExecReload)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), "no continuation lines, please"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, line
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNIT_SECTIONS = parse_unit(UNIT.read_text(encoding="utf-8"))
SERVICE = UNIT_SECTIONS["Service"]


def one(key: str) -> str:
    values = SERVICE.get(key)
    assert values is not None, f"[Service] {key}= is missing"
    assert len(values) == 1, f"[Service] {key}= is set {len(values)} times"
    return values[0]


_SPAN = re.compile(r"(\d+)\s*(ms|s|sec|seconds?|m|min|minutes?|h|hr|hours?)?")
_SPAN_SECONDS = {"ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


def _seconds(span: str) -> float:
    """A systemd time span (``45s``, ``1min 30s``, ``90``) or Prometheus duration in seconds."""
    text = span.strip()
    assert re.fullmatch(r"(\s*\d+\s*[a-z]*)+", text), span
    total = 0.0
    for number, unit in _SPAN.findall(text):
        unit_key = unit.rstrip("s") if unit.startswith(("minute", "hour")) else unit
        unit_key = {"minute": "min", "hour": "h"}.get(unit_key, unit_key)
        total += int(number) * _SPAN_SECONDS.get(unit_key, 1.0)
    return total


def test_seconds_parses_systemd_spans() -> None:
    assert _seconds("45s") == 45
    assert _seconds("1min 30s") == 90
    assert _seconds("90") == 90
    assert _seconds("2m") == 120
    assert _seconds("500ms") == 0.5


def test_stop_timeout_exceeds_the_default_drain() -> None:
    drain = TimeoutsConfig().drain
    assert one("KillSignal") == "SIGTERM"
    assert _seconds(one("TimeoutStopSec")) > drain
    # Room to close sessions and exit after the drain, not a photo finish.
    assert _seconds(one("TimeoutStopSec")) >= drain + 10


def test_exec_start_serves_the_config_file() -> None:
    argv = one("ExecStart").split()
    assert argv[0] == INSTALLED_BINARY
    assert argv[1:] == ["serve", "--config", CONFIG_FILE]
    args = _parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert str(args.config) == CONFIG_FILE


def test_exec_start_pre_checks_the_same_config() -> None:
    argv = one("ExecStartPre").split()
    assert argv[0] == INSTALLED_BINARY
    args = _parser().parse_args(argv[1:])
    assert args.command == "check-config"
    assert str(args.file) == CONFIG_FILE


def test_exec_reload_validates_then_sends_hup() -> None:
    reload_lines = SERVICE["ExecReload"]
    assert reload_lines[-1] == "/bin/kill -HUP $MAINPID"
    for line in reload_lines[:-1]:
        args = _parser().parse_args(line.split()[1:])
        assert args.command == "check-config"


def test_unit_runs_simple_unprivileged_and_hardened() -> None:
    assert one("Type") == "simple"  # kumoproxy does not speak sd_notify
    assert one("User") not in ("", "root", "0")
    assert one("Restart") == "on-failure"
    assert one("LimitNOFILE") == "1048576"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert CONFIG_FILE.rsplit("/", 1)[0] in one("ReadOnlyPaths").split()
    assert one("CapabilityBoundingSet") == ""
    assert one("AmbientCapabilities") == ""
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_unit_logs_reach_the_journal() -> None:
    # StandardError defaults to inheriting StandardOutput: with stdout
    # silenced (check-config prints password hashes), stderr must be explicit.
    if SERVICE.get("StandardOutput") == ["null"]:
        assert one("StandardError") == "journal"


def test_unit_starts_after_the_network_and_is_installable() -> None:
    unit = UNIT_SECTIONS["Unit"]
    assert "network-online.target" in unit["After"][0].split()
    assert "network-online.target" in unit["Wants"][0].split()
    assert UNIT_SECTIONS["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_comment_ties_the_stop_timeout_to_the_drain() -> None:
    text = UNIT.read_text(encoding="utf-8")
    assert "timeouts.drain" in text
    assert "IP_FREEBIND" in text
    assert "IP_TRANSPARENT" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # verify checks that the binary exists: point the copy at this venv's one.
    binary = Path(sys.executable).with_name("kumoproxy")
    if not binary.exists():
        pytest.skip("the kumoproxy script is not installed next to this Python")
    copy = tmp_path / "kumoproxy.service"
    copy.write_text(UNIT.read_text(encoding="utf-8").replace(INSTALLED_BINARY, str(binary)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "kumoproxy.service" not in output, output


# --------------------------------------------------------------------------
# sysctl.d


def sysctl_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for raw in SYSCTL.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key = value: {line!r}"
        key = key.strip()
        assert re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_-]+)+", key), key
        assert key not in settings, f"{key} set twice"
        settings[key] = value.strip()
    return settings


def test_sysctls_match_what_kumoproxy_does() -> None:
    settings = sysctl_settings()
    low, high = (int(p) for p in settings["net.ipv4.ip_local_port_range"].split())
    assert 1024 <= low < high <= 65535
    assert high - low >= 50000, "a wide ephemeral port range"
    assert int(settings["net.core.somaxconn"]) >= LISTEN_BACKLOG
    assert settings["net.ipv4.tcp_tw_reuse"] == "1"
    # An unowned source must fail to bind, never send SYNs nowhere.
    assert settings["net.ipv4.ip_nonlocal_bind"] == "0"
    assert settings["net.ipv6.ip_nonlocal_bind"] == "0"
    # kumoproxy sets keepalive per socket; a sysctl would be misleading.
    assert not [k for k in settings if "keepalive" in k]
    text = SYSCTL.read_text(encoding="utf-8")
    for mentioned in ("IP_BIND_ADDRESS_NO_PORT", "fs.nr_open", "fs.file-max", "tcp_keepalive"):
        assert mentioned in text, mentioned


# --------------------------------------------------------------------------
# docs/operations.md

DOC = OPERATIONS.read_text(encoding="utf-8")


def doc_table_rows() -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell, backticks stripped."""
    rows: dict[str, list[str]] = {}
    for line in DOC.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.setdefault(cells[0].strip("`"), cells)
    return rows


@pytest.mark.parametrize("name", sorted(exported_metrics()))
def test_every_metric_has_a_row_in_the_operations_guide(name: str) -> None:
    metric = exported_metrics()[name]
    row = doc_table_rows().get(name)
    assert row is not None, f"docs/operations.md has no table row for `{name}`"
    _, kind, labels, *_ = row
    assert kind == metric.type, f"{name} is a {metric.type}, the doc says {kind}"
    documented = set(re.findall(r"`([a-z_]+)`", labels))
    assert documented == set(metric.labels), f"{name}: labels {labels!r}"


@pytest.mark.parametrize(
    "key",
    [f"limits.{f.name}" for f in fields(LimitsConfig)]
    + [f"timeouts.{f.name}" for f in fields(TimeoutsConfig)],
)
def test_every_limit_and_timeout_key_is_documented(key: str) -> None:
    assert f"`{key}`" in DOC, key
    assert key in doc_table_rows(), f"{key} has no row in a table"


def test_documented_defaults_match_the_code() -> None:
    rows = doc_table_rows()
    for f in fields(LimitsConfig):
        assert rows[f"limits.{f.name}"][1] == str(getattr(LimitsConfig(), f.name)), f.name
    for f in fields(TimeoutsConfig):
        default = float(getattr(TimeoutsConfig(), f.name))
        assert _seconds(rows[f"timeouts.{f.name}"][1]) == default, f.name


@pytest.mark.parametrize("end", sorted(SESSION_ENDS))
def test_every_session_end_is_documented(end: str) -> None:
    assert end in doc_table_rows(), f"`{end}` has no row in the session ends table"


@pytest.mark.parametrize("route", sorted(r.decode() for r in ROUTES))
def test_every_admin_route_is_documented(route: str) -> None:
    assert route in doc_table_rows(), route


def test_the_operations_guide_links_the_deploy_files() -> None:
    for path in (UNIT, ALERTS, SCRAPE, SYSCTL):
        relative = "../" + path.relative_to(ROOT).as_posix()
        assert f"]({relative})" in DOC, relative
    assert "nodad" in DOC
    assert "ip addr add 203.0.113.10/32 dev eth0" in DOC
    assert "kumoproxy sources" in DOC
