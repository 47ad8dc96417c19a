"""IPv6 sources from the documentation range, in a network namespace of our own.

Needs root (to create the namespace); skipped otherwise. The probe runs
kumoproxy and a target inside the namespace, so no packet leaves it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
        reason="needs root, unshare and ip to make a private network namespace",
    ),
]


def test_ipv6_sources_in_a_private_namespace_are_the_addresses_the_target_sees() -> None:
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "tests.netns_probe"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["target_saw"] == ["2001:db8::7", "2001:db8::8"]
    for source in ("2001:db8::7", "2001:db8::8"):
        assert seen[source] == {"reply": 0, "bound": source}  # CONNECT reply = the source
    # Configured but not on any interface of the namespace: refused, never sent.
    assert seen["2001:db8::99"]["reply"] != 0
