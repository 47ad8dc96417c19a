"""Validating YAML configuration reading, shared by kumoproxy and mta_client.

YAML is parsed into plain data while each key path's line is remembered;
:class:`Reader` then turns the data into typed values, collecting every
problem as a :class:`~kumoproxy.errors.ConfigError` that names its dotted key
path and line, so a command can report them all at once. Unknown keys are
errors: a typo must never silently leave a setting at its default.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kumoproxy.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Durations outside this range are typos (``0s``, ``10000000h``), not policy.
MIN_DURATION = 0.001
MAX_DURATION = 365 * 86400.0

_PARENT = re.compile(r"(\.[^.\[]*|\[\d+\])$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
V4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


class ConfigErrors(Exception):
    """Every problem found in one configuration document."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


# --------------------------------------------------------------------------
# YAML with line numbers


def compose(text: str, origin: str) -> tuple[Any, dict[str, int]]:
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
                        [ConfigError(path, "keys must be plain words", line=node_line(key_node))]
                    )
                key = construct_scalar(key_node, path)
                child = f"{path}.{key}" if path else str(key)
                if key in out:
                    raise ConfigErrors(
                        [ConfigError(child, "duplicate key", line=key_node.start_mark.line + 1)]
                    )
                out[key] = walk(value_node, child)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(item, f"{path}[{i}]") for i, item in enumerate(n.value)]
        return construct_scalar(n, path)

    return walk(node, ""), lines


def node_line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def construct_scalar(node: yaml.Node, path: str) -> Any:
    """A scalar's value; tags we do not know (``!custom``, ``!!int lots``) are errors."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigErrors(
            [ConfigError(path, f"invalid value: {problem}", line=node_line(node))]
        ) from exc
    finally:
        loader.dispose()


# --------------------------------------------------------------------------
# The validating reader

T = TypeVar("T")


class Reader:
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
            self.error(path, f"must be a mapping, got {describe_kind(value)}")
            return None
        allowed_set = set(allowed)
        for key in value:
            if key not in allowed_set:
                hint = ", ".join(sorted(allowed_set))
                self.error(join(path, str(key)), f"unknown key (expected one of: {hint})")
        return value

    def sequence(self, value: Any, path: str) -> list[Any] | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {describe_kind(value)}")
            return None
        return value

    def typed(self, value: Any, path: str, convert: Callable[[Any], T], what: str) -> T | None:
        try:
            return convert(value)
        except (TypeError, ValueError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            self.error(path, f"must be {what}, got {value!r}{detail}")
            return None


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe_kind(value: Any) -> str:
    kinds: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return kinds.get(type(value), repr(value))


def parse_address(value: Any) -> IPAddress:
    if not isinstance(value, str):
        raise TypeError("not a string")
    addr = ipaddress.ip_address(value)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise ValueError("v4-mapped IPv6 addresses are not allowed; write the IPv4 address")
    return addr


def parse_network(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return ipaddress.ip_network(value, strict=True)


def parse_positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("")
    return value


def parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("")
    return value


def parse_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError("")
    return value


def parse_duration(value: Any) -> float:
    """``10s``, ``5m``, ``250ms``, ``1h``, ``5d``, ``1.5s`` -> seconds."""
    if not isinstance(value, str):
        raise TypeError("a duration needs a unit")
    match = _DURATION.match(value.strip())
    if match is None:
        raise ValueError("use a number and one of ms, s, m, h, d")
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


def read_section(
    r: Reader, value: Any, path: str, default: T, converters: Mapping[str, tuple[Any, str]]
) -> T:
    """Read a flat section whose keys map onto dataclass fields."""
    m = r.mapping(value, path, converters)
    if not m:
        return default
    changes = {}
    for key, raw in m.items():
        if key in converters:
            convert, what = converters[key]
            parsed = r.typed(raw, join(path, key), convert, what)
            if parsed is not None:
                changes[key] = parsed
    return type(default)(**{**fields_of(default), **changes})


def fields_of(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def read_config_file(path: Path) -> str:
    """The file's text, or one :class:`ConfigErrors` saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigErrors([ConfigError("", f"cannot read {path}: {reason}")]) from exc
