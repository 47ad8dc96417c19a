"""The ``kumoproxy`` command line (product.md, "kumoproxy: command line").

Every test runs the real program as a subprocess (``python -m kumoproxy``):
exit codes, what lands on stdout and stderr, and signal handling are the
contract here, and only a real process shows them. Anything a user can get
wrong must end in one clear line and a non-zero exit, never a traceback.

``serve`` tests listen on ``127.0.0.1:0`` and learn the real port from the
first log line; they only ever talk to loopback.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest
import trustme
import yaml

import kumoproxy
from kumoproxy.config import parse_duration
from kumoproxy.passwords import verify_password

#: Seconds any one command may take before the test gives up (a loaded CI
#: host can be slow to start Python; a healthy run takes well under one).
COMMAND_TIMEOUT = 20.0
#: How long ``serve`` may take to exit after a stop signal with nothing to drain.
STOP_TIMEOUT = 5.0

VERSION_LINE = f"kumoproxy {kumoproxy.__version__}"

MINIMAL_CONFIG = """\
listeners:
  - listen: "127.0.0.1:0"
    protocol: socks5
sources: [127.0.0.2]
clients:
  allow: [127.0.0.0/8]
destinations:
  allow: [127.0.0.0/8]
  ports: ["19000-19999", 25]
"""

#: Four errors, each on a known line (the comments are not part of the contract).
SEVERAL_ERRORS = """\
listeners:
  - listen: "not-an-ip:1080"
    protocol: socks5
sources: [127.0.0.2]
clients:
  allow: [127.0.0.0/8]
limits:
  per_sorce: 5
timeouts:
  connect: 10 seconds
bogus: 1
"""
SEVERAL_ERRORS_EXPECTED = {
    ("listeners[0].listen", 2),
    ("limits.per_sorce", 8),
    ("timeouts.connect", 10),
    ("bogus", 11),
}

#: ``<file or "kumoproxy: config">: <dotted.path> (line N): <message>``
ERROR_LINE = re.compile(r"^.*?: (?P<path>[^\s:]+) \(line (?P<line>\d+)\): (?P<message>.+)$")


def kumoproxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kumoproxy", *args]


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``kumoproxy ARGS`` to completion with ``stdin`` piped in (never a TTY)."""
    return subprocess.run(
        kumoproxy_command(*args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout
    assert "Traceback" not in result.stderr


def assert_one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 1, nothing on stdout, exactly one line on stderr; returns that line."""
    assert_no_traceback(result)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def ipv6_loopback_bindable() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------
# A running ``serve``


class LineReader:
    """Whole lines from a pipe, each awaited with a deadline (no blocking read)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._fd: int = pipe.fileno()
        self._buffer = b""
        self._eof = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)

    def line(self, timeout: float = COMMAND_TIMEOUT) -> str:
        """The next line without its newline; fails the test on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if self._eof:
                pytest.fail(f"stream ended before a full line; got {self._buffer!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line within {timeout} s; got {self._buffer!r}")
            if self._selector.select(remaining):
                chunk = os.read(self._fd, 65536)
                self._eof = not chunk
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def rest(self, timeout: float = COMMAND_TIMEOUT) -> str:
        """Everything up to EOF (call after the process has exited)."""
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            if self._selector.select(deadline - time.monotonic()):
                chunk = os.read(self._fd, 65536)
                self._eof = not chunk
                self._buffer += chunk
        text, self._buffer = self._buffer.decode(), b""
        return text

    def json_lines_until(
        self, event: str, timeout: float = COMMAND_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Log records up to and including the first whose ``event`` is ``event``."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, Any]] = []
        while not records or records[-1].get("event") != event:
            records.append(json.loads(self.line(max(deadline - time.monotonic(), 0.001))))
        return records

    def close(self) -> None:
        self._selector.close()


@contextmanager
def serving(config: Path) -> Iterator[tuple[subprocess.Popen[bytes], LineReader]]:
    """``kumoproxy serve --config CONFIG``; killed on the way out whatever happened."""
    proc = subprocess.Popen(
        kumoproxy_command("serve", "--config", str(config)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    reader = LineReader(proc.stderr)
    try:
        yield proc, reader
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=COMMAND_TIMEOUT)
        reader.close()
        proc.stderr.close()


def listening_port(reader: LineReader) -> int:
    """Read the first stderr line, which must be the ``listening`` record; return the port."""
    record = json.loads(reader.line())
    assert record["event"] == "listening"
    (url,) = record["listeners"]
    match = re.fullmatch(r"socks5://127\.0\.0\.1:(\d+)", url)
    assert match is not None, url
    port = int(match.group(1))
    assert port != 0
    return port


def config_with(tmp_path: Path, extra: str) -> Path:
    return write(tmp_path / "kumoproxy.yaml", MINIMAL_CONFIG + textwrap.dedent(extra))


# --------------------------------------------------------------------------
# --version and usage


@pytest.mark.parametrize(
    "prefix",
    [[], ["serve"], ["check-config"], ["sources"]],
    ids=["top-level", "serve", "check-config", "sources"],
)
def test_version_prints_name_and_version_and_exits_0(prefix: list[str]) -> None:
    result = run(*prefix, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == VERSION_LINE + "\n"


def test_version_after_hash_password_prints_version_and_exits_0() -> None:
    result = run("hash-password", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == VERSION_LINE + "\n"


def test_no_subcommand_is_a_usage_error_with_exit_2() -> None:
    result = run()
    assert_no_traceback(result)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: kumoproxy")


def test_unknown_subcommand_is_a_usage_error_with_exit_2() -> None:
    result = run("frobnicate")
    assert_no_traceback(result)
    assert result.returncode == 2
    assert "usage: kumoproxy" in result.stderr


# --------------------------------------------------------------------------
# check-config


def test_check_config_prints_the_effective_config_as_yaml(tmp_path: Path) -> None:
    config = write(tmp_path / "kumoproxy.yaml", MINIMAL_CONFIG)

    result = run("check-config", str(config))

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    effective = yaml.safe_load(result.stdout)
    assert effective["listeners"] == [{"listen": "127.0.0.1:0", "protocol": "socks5"}]
    assert effective["sources"] == ["127.0.0.2"]
    assert effective["clients"] == {"allow": ["127.0.0.0/8"]}
    assert effective["destinations"]["ports"] == ["19000-19999", 25]
    assert effective["destinations"]["allow"] == ["127.0.0.0/8"]
    # a file config denies private, loopback, ... and the host's own addresses
    assert {"10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "::1/128"} <= set(
        effective["destinations"]["deny"]
    )
    assert effective["limits"] == {
        "max_sessions": 20000,
        "per_client": 2000,
        "per_source": 1000,
        "per_source_destination": 50,
        "handshakes": 2000,
    }
    assert effective["timeouts"]["handshake"] == "10s"
    assert effective["timeouts"]["connect"] == "30s"
    assert {k: parse_duration(v) for k, v in effective["timeouts"].items()} == {
        "handshake": 10.0,
        "connect": 30.0,
        "idle": 300.0,
        "drain": 30.0,
        "session": 3600.0,
    }
    assert effective["log"] == {"format": "json", "level": "info"}


def test_check_config_defaults_destination_ports_to_smtp_for_a_file_config(
    tmp_path: Path,
) -> None:
    config = write(
        tmp_path / "kumoproxy.yaml",
        """\
        listeners:
          - listen: "127.0.0.1:0"
            protocol: proxy
        sources: [127.0.0.2]
        clients:
          allow: [127.0.0.0/8]
        timeouts:
          connect: 250ms
          drain: 5m
        """,
    )

    result = run("check-config", str(config))

    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["destinations"]["ports"] == [25, 465, 587]
    assert effective["timeouts"]["connect"] == "250ms"
    assert parse_duration(effective["timeouts"]["drain"]) == 300.0


def test_check_config_output_is_itself_a_valid_config_with_the_same_effect(
    tmp_path: Path,
) -> None:
    first = run("check-config", str(write(tmp_path / "a.yaml", MINIMAL_CONFIG)))
    assert first.returncode == 0, first.stderr
    again = run("check-config", str(write(tmp_path / "b.yaml", first.stdout)))
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


@pytest.mark.parametrize("duration", ["1.2345678s", "1000000s"])
def test_check_config_renders_every_duration_so_it_reads_back_unchanged(
    tmp_path: Path, duration: str
) -> None:
    config = config_with(tmp_path, f"timeouts:\n  idle: {duration}\n")

    result = run("check-config", str(config))

    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["timeouts"]["idle"]
    assert parse_duration(rendered) == parse_duration(duration)


def test_check_config_reports_every_error_with_key_path_and_line(tmp_path: Path) -> None:
    config = write(tmp_path / "broken.yaml", SEVERAL_ERRORS)

    result = run("check-config", str(config))

    assert_no_traceback(result)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == len(SEVERAL_ERRORS_EXPECTED), result.stderr
    found = set()
    for line in lines:
        match = ERROR_LINE.match(line)
        assert match is not None, line
        found.add((match["path"], int(match["line"])))
    assert found == SEVERAL_ERRORS_EXPECTED


def test_check_config_names_the_unknown_key_and_what_was_expected(tmp_path: Path) -> None:
    config = write(tmp_path / "broken.yaml", SEVERAL_ERRORS)

    result = run("check-config", str(config))

    (line,) = (line for line in result.stderr.splitlines() if "per_sorce" in line)
    assert "unknown key" in line
    assert "per_source" in line  # the key the operator meant is among the hints


def test_check_config_with_invalid_yaml_prints_one_line_with_its_line_number(
    tmp_path: Path,
) -> None:
    config = write(
        tmp_path / "broken.yaml",
        """\
        sources: [127.0.0.2]
        clients: allow: [127.0.0.0/8]
        """,
    )

    line = assert_one_line_failure(run("check-config", str(config)))

    assert "invalid YAML" in line
    assert "(line 2)" in line


@pytest.mark.parametrize(
    "text",
    [
        "sources: !custom 127.0.0.2\n",
        "limits:\n  per_client: !!int lots\n",
        "? [a, b]\n: 1\n",
    ],
    ids=["unknown-tag", "bad-explicit-int", "list-as-mapping-key"],
)
def test_check_config_with_yaml_that_cannot_be_constructed_prints_one_line(
    tmp_path: Path, text: str
) -> None:
    config = write(tmp_path / "broken.yaml", text)

    line = assert_one_line_failure(run("check-config", str(config)))

    assert "(line " in line


def test_check_config_with_a_missing_file_prints_one_cannot_read_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"

    line = assert_one_line_failure(run("check-config", str(missing)))

    assert "cannot read" in line
    assert "missing.yaml" in line


def test_check_config_with_a_directory_prints_one_cannot_read_line(tmp_path: Path) -> None:
    line = assert_one_line_failure(run("check-config", str(tmp_path)))

    assert "cannot read" in line


# --------------------------------------------------------------------------
# sources


def test_sources_with_the_embedded_default_lists_loopback_as_bindable() -> None:
    if not ipv6_loopback_bindable():
        pytest.skip("this host cannot bind ::1")

    result = run("sources")

    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0] == ["127.0.0.1", "bindable"]
    assert rows[-1] == ["::1", "bindable"]
    assert all(verdict == "bindable" for _, verdict in rows)


def test_sources_marks_an_address_this_host_does_not_own_as_not_bindable(
    tmp_path: Path,
) -> None:
    config = write(
        tmp_path / "kumoproxy.yaml",
        """\
        listeners:
          - listen: "127.0.0.1:0"
            protocol: socks5
        sources: [127.0.0.2, 203.0.113.77]
        clients:
          allow: [127.0.0.0/8]
        """,
    )

    result = run("sources", "--config", str(config))

    assert_no_traceback(result)
    assert result.returncode == 1
    verdicts = dict(line.split("\t", 1) for line in result.stdout.splitlines())
    assert verdicts.keys() == {"127.0.0.2", "203.0.113.77"}
    assert verdicts["127.0.0.2"] == "bindable"
    assert verdicts["203.0.113.77"].startswith("NOT bindable")
    assert "not plumbed" in verdicts["203.0.113.77"]


def test_sources_with_a_missing_config_exits_1_without_traceback(tmp_path: Path) -> None:
    line = assert_one_line_failure(run("sources", "--config", str(tmp_path / "missing.yaml")))

    assert "cannot read" in line


# --------------------------------------------------------------------------
# hash-password


def test_hash_password_from_stdin_prints_a_verifiable_scrypt_hash() -> None:
    result = run("hash-password", stdin="the password\n")

    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("$scrypt$")
    assert verify_password(b"the password", line)
    assert not verify_password(b"another password", line)


@pytest.mark.parametrize("stdin", ["", "\n"], ids=["no-input", "empty-line"])
def test_hash_password_refuses_an_empty_password_in_one_line(stdin: str) -> None:
    line = assert_one_line_failure(run("hash-password", stdin=stdin))

    assert "empty password" in line


def test_hash_password_refuses_a_password_longer_than_rfc_1929_allows() -> None:
    line = assert_one_line_failure(run("hash-password", stdin="x" * 256 + "\n"))

    assert "255 bytes" in line


# --------------------------------------------------------------------------
# serve: failures before listening


def test_serve_on_an_address_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = write(
            tmp_path / "kumoproxy.yaml",
            MINIMAL_CONFIG.replace("127.0.0.1:0", f"127.0.0.1:{port}"),
        )
        started = time.monotonic()

        result = run("serve", "--config", str(config))

    assert time.monotonic() - started < STOP_TIMEOUT
    line = assert_one_line_failure(result)
    assert f"cannot listen on 127.0.0.1:{port}" in line


def test_serve_with_a_config_error_exits_1_with_the_error_line(tmp_path: Path) -> None:
    config = config_with(tmp_path, "limits:\n  per_sorce: 5\n")

    line = assert_one_line_failure(run("serve", "--config", str(config)))

    match = ERROR_LINE.match(line)
    assert match is not None, line
    assert (match["path"], int(match["line"])) == ("limits.per_sorce", 11)


def test_serve_with_a_missing_config_exits_1_without_traceback(tmp_path: Path) -> None:
    line = assert_one_line_failure(run("serve", "--config", str(tmp_path / "missing.yaml")))

    assert "cannot read" in line


def test_serve_with_an_unreadable_certificate_exits_1_with_one_line(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"  # a good key, so the missing certificate is the one error
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(key))
    config = write(
        tmp_path / "kumoproxy.yaml",
        f"""\
        listeners:
          - listen: "127.0.0.1:0"
            protocol: socks5
            tls:
              certificate: {tmp_path / "missing-cert.pem"}
              private_key: {key}
        sources: [127.0.0.2]
        clients:
          allow: [127.0.0.0/8]
        """,
    )

    with serving(config) as (proc, reader):
        first = reader.line()
        assert "missing-cert.pem" in first
        assert proc.wait(timeout=COMMAND_TIMEOUT) == 1
        rest = reader.rest()
    assert "Traceback" not in first + rest
    assert rest == ""


# --------------------------------------------------------------------------
# serve: running and stopping


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_logs_listening_then_stops_with_exit_0_on_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    config = write(tmp_path / "kumoproxy.yaml", MINIMAL_CONFIG)

    with serving(config) as (proc, reader):
        port = listening_port(reader)
        with socket.create_connection(("127.0.0.1", port), timeout=COMMAND_TIMEOUT):
            pass  # the logged port is the real one

        proc.send_signal(signum)

        assert proc.wait(timeout=STOP_TIMEOUT) == 0
        rest = reader.rest()
    records = [json.loads(line) for line in rest.splitlines()]  # JSON lines, all of them
    assert records[-1]["event"] == "stopped"
    assert "Traceback" not in rest


def test_serve_keeps_serving_after_sighup(tmp_path: Path) -> None:
    config = write(tmp_path / "kumoproxy.yaml", MINIMAL_CONFIG)

    with serving(config) as (proc, reader):
        port = listening_port(reader)

        proc.send_signal(signal.SIGHUP)
        json.loads(reader.line())  # the signal was handled, and said so in a log line

        assert proc.poll() is None
        with socket.create_connection(("127.0.0.1", port), timeout=COMMAND_TIMEOUT):
            pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT) == 0


def test_serve_stops_accepting_on_sigterm_and_exits_after_the_drain_time(
    tmp_path: Path,
) -> None:
    drain = 1.0
    config = config_with(tmp_path, "timeouts:\n  handshake: 60s\n  drain: 1s\n")

    with serving(config) as (proc, reader):
        port = listening_port(reader)
        with socket.create_connection(("127.0.0.1", port), timeout=COMMAND_TIMEOUT) as held:
            held.sendall(b"\x05")  # a session stuck mid-greeting: it never finishes by itself
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            reader.json_lines_until("draining")

            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=COMMAND_TIMEOUT).close()
            assert proc.wait(timeout=drain + STOP_TIMEOUT) == 0
            waited = time.monotonic() - signalled
        records = [json.loads(line) for line in reader.rest().splitlines()]
    assert waited >= drain * 0.9  # the held session got its drain time
    assert records[-1]["event"] == "stopped"


def test_serve_second_stop_signal_closes_sessions_without_waiting_for_drain(
    tmp_path: Path,
) -> None:
    config = config_with(tmp_path, "timeouts:\n  handshake: 60s\n  drain: 60s\n")

    with serving(config) as (proc, reader):
        port = listening_port(reader)
        with socket.create_connection(("127.0.0.1", port), timeout=COMMAND_TIMEOUT) as held:
            held.sendall(b"\x05")
            proc.send_signal(signal.SIGTERM)
            reader.json_lines_until("draining")

            proc.send_signal(signal.SIGTERM)

            assert proc.wait(timeout=STOP_TIMEOUT) == 0
        assert "Traceback" not in reader.rest()


def test_check_config_loads_tls_files_like_serve_does(tmp_path: Path) -> None:
    """systemd runs check-config before start and reload: a bad key must fail it."""
    cert = tmp_path / "cert.pem"
    trustme.CA().issue_cert("localhost").cert_chain_pems[0].write_to_path(str(cert))
    config = write(
        tmp_path / "kumoproxy.yaml",
        f"""\
        listeners:
          - listen: "127.0.0.1:0"
            protocol: socks5
            tls:
              certificate: {cert}
              private_key: {tmp_path / "missing-key.pem"}
        sources: [127.0.0.2]
        clients:
          allow: [127.0.0.0/8]
        """,
    )
    result = run("check-config", str(config))
    assert result.returncode == 1
    assert "listeners[0].tls: cannot load certificate" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
