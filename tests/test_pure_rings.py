"""The inner rings stay free of I/O (style.md: "a test that scans imports").

Protocol codecs (``proto/``) and the pure core (policy, limits, retry,
scheduling, shaping algorithms, spool record formats) take ``now`` and
bytes and return decisions: they may not import trio, sockets, TLS, the
clock, the file system, logging or DNS. One scan for every such module, so
adding a pure module is adding one line here.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PURE_MODULES = [
    "kumoproxy.proto.socks5",
    "kumoproxy.proto.proxy_protocol",
    "kumoproxy.proto.crc32c",
    "kumoproxy.proto.common",
    "kumoproxy.proto.control",
    "kumoproxy.policy",
    "kumoproxy.limits",
    "mta_client.proto.smtp",
    "mta_client.proto.message",
    "mta_client.proto.dsn",
    "mta_client.retry",
    "mta_client.pool",
    "mta_client.submission",
    "mta_client.spool_format",
    "mta_client.scheduler",
    "mta_client.outcomes",
    "mta_client.queue_view",
    "mta_client.shaping.gcra",
    "mta_client.shaping.leases",
    "mta_client.shaping.rules",
    "mta_client.shaping.backend",
]

#: Modules that do I/O or read a clock, and our own shell modules.
FORBIDDEN = {
    "trio",
    "anyio",
    "asyncio",
    "socket",
    "ssl",
    "select",
    "selectors",
    "time",
    "os",
    "pathlib",
    "logging",
    "structlog",
    "dns",
    "coredis",
    "kumoproxy.server",
    "kumoproxy.egress",
    "kumoproxy.session",
    "mta_client.spool",
    "mta_client.runner",
    "mta_client.egress",
    "mta_client.mx",
}


def imports_of(module_name: str) -> set[str]:
    """Every module ``module_name`` imports, as dotted names and their top package."""
    module = importlib.import_module(module_name)
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            found.add(name)
            found.add(name.split(".")[0])
    return found


@pytest.mark.parametrize("module_name", PURE_MODULES)
def test_pure_module_imports_no_io(module_name: str) -> None:
    assert not imports_of(module_name) & FORBIDDEN
