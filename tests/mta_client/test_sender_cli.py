"""``mta-client enqueue``, ``queue`` and ``run`` as commands: real child processes.

What an operator sees: the ids printed, the queue summary, exit statuses, one
clear stderr line for each mistake, and a spool that a refused command left
exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from mta_client.events import EventKind
from mta_client.spool import inspect, write_segment
from mta_client.spool_format import NewMessage
from tests.mta_client.senderkit import (
    RECIPIENT,
    SENDER,
    CommandResult,
    enqueue,
    events_of,
    files_under,
    mta_client,
    numbered_message,
    queue_json,
    read_events,
    sender_config,
    sender_process,
    spool_root,
    spooled_bodies,
)

GOOD = numbered_message(1)


def assert_refused(result: CommandResult, fragment: str) -> None:
    """Exit 2, nothing on stdout, and one ``mta-client: ...`` line naming the problem."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("mta-client: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.endswith("\n")
    assert fragment in result.stderr


# -- enqueue and queue ----------------------------------------------------------------


async def test_enqueue_prints_one_id_per_message_and_queue_counts_them_per_domain(
    tmp_path: Path,
) -> None:
    config = sender_config(tmp_path)
    (tmp_path / "one.eml").write_bytes(GOOD)
    (tmp_path / "two.eml").write_bytes(numbered_message(2))
    first = await enqueue(
        config, tmp_path / "one.eml", recipients=("r@example.test", "s@example.test")
    )
    second = await enqueue(
        config, tmp_path / "two.eml", recipients=("t@example.test", "u@other.test")
    )
    assert (first.returncode, first.stderr, second.returncode, second.stderr) == (0, "", 0, "")
    [first_id], [second_id] = first.lines, second.lines
    assert first_id != second_id

    rows = await queue_json(config)
    assert [
        (r["domain"], r["messages"], r["recipients"], r["new"], r["deferred"]) for r in rows
    ] == [
        ("example.test", 2, 3, 3, 0),  # the busiest domain first
        ("other.test", 1, 1, 1, 0),
    ]
    assert all(r["next_attempt"] is not None and r["oldest"] is not None for r in rows)
    table = await mta_client("queue", "--config", config)
    assert table.returncode == 0, table.stderr
    header, *body, total = table.lines
    assert header.split()[:4] == ["DOMAIN", "MSGS", "NEW", "DEFERRED"]
    assert [line.split() for line in body] == [
        ["example.test", "2", "3", "0", "now"],
        ["other.test", "1", "1", "0", "now"],
    ]
    assert total == "2 domains, 3 message-domain pairs queued"

    spooled = {m.id: m for m in inspect(spool_root(tmp_path))}
    assert set(spooled) == {first_id, second_id}
    assert [r.address for r in spooled[first_id].recipients] == ["r@example.test", "s@example.test"]
    assert spooled[first_id].sender == SENDER
    assert await spooled_bodies(spool_root(tmp_path), [first_id, second_id]) == [
        GOOD,
        numbered_message(2),
    ]
    receptions = events_of(tmp_path / "events.jsonl", EventKind.RECEPTION)
    assert sorted((e.message_id, e.recipient, e.size) for e in receptions) == sorted(
        [
            (first_id, "r@example.test", len(GOOD)),
            (first_id, "s@example.test", len(GOOD)),
            (second_id, "t@example.test", len(numbered_message(2))),
            (second_id, "u@other.test", len(numbered_message(2))),
        ]
    )


async def test_queue_of_an_empty_spool_shows_no_domain(tmp_path: Path) -> None:
    config = sender_config(tmp_path)
    spool_root(tmp_path).mkdir()
    assert await queue_json(config) == []
    table = await mta_client("queue", "--config", config)
    assert (table.returncode, table.lines[-1]) == (0, "0 domains, 0 message-domain pairs queued")


async def test_queue_of_a_missing_spool_exits_2_naming_it(tmp_path: Path) -> None:
    config = sender_config(tmp_path)
    result = await mta_client("queue", "--config", config, "--json")
    assert_refused(result, f"no spool at {spool_root(tmp_path)}")


@pytest.mark.parametrize("argument", [[], ["-"]], ids=["no-argument", "dash"])
async def test_enqueue_reads_the_message_from_stdin(tmp_path: Path, argument: list[str]) -> None:
    config = sender_config(tmp_path)
    result = await enqueue(config, *argument, stdin=GOOD)
    assert result.returncode == 0, result.stderr
    [spool_id] = result.lines
    assert await spooled_bodies(spool_root(tmp_path), [spool_id]) == [GOOD]


async def test_enqueue_of_a_directory_spools_each_eml_file_in_sorted_order(
    tmp_path: Path,
) -> None:
    config = sender_config(tmp_path)
    batch = tmp_path / "batch"
    batch.mkdir()
    names = ["b.eml", "10.eml", "a.eml", "9.eml"]  # written out of order
    for n, name in enumerate(names):
        (batch / name).write_bytes(numbered_message(n))
    (batch / "notes.txt").write_bytes(b"not a message")  # not *.eml: ignored
    result = await enqueue(config, batch)
    assert result.returncode == 0, result.stderr
    assert len(result.lines) == len(set(result.lines)) == 4
    bodies = await spooled_bodies(spool_root(tmp_path), result.lines)
    in_order = sorted(names)  # "10.eml" < "9.eml" < "a.eml" < "b.eml": by name, as text
    assert bodies == [numbered_message(names.index(name)) for name in in_order]
    receptions = events_of(tmp_path / "events.jsonl", EventKind.RECEPTION)
    assert sorted(e.message_id for e in receptions) == sorted(result.lines)


# -- refusals ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """One mistake: what to write, how to call enqueue, and the stderr fragment."""

    name: str
    files: dict[str, bytes]
    argument: str
    fragment: str
    sender: str = SENDER
    recipient: str = RECIPIENT
    config_extra: str = ""
    chmod: dict[str, int] | None = None


LONG_LINE = b"x" * 999
REFUSALS = [
    Refusal(
        "header-without-colon",
        {"m.eml": b"From: a@origin.test\r\nno colon here\r\n\r\nbody\r\n"},
        "m.eml",
        "m.eml: line 2: header line without a colon",
    ),
    Refusal(
        "nul-byte",
        {"m.eml": b"From: a@origin.test\r\n\r\nbody\0\r\n"},
        "m.eml",
        "m.eml: line 3: NUL byte",
    ),
    Refusal(
        "line-over-998",
        {"m.eml": b"From: a@origin.test\r\n\r\n" + LONG_LINE + b"\r\n"},
        "m.eml",
        "m.eml: line 3: 999 octets; RFC 5322 section 2.1.1 allows 998",
    ),
    Refusal(
        "bad-recipient",
        {"m.eml": GOOD},
        "m.eml",
        "recipient 'bob@': no domain",
        recipient="bob@",
    ),
    Refusal(
        "bad-sender",
        {"m.eml": GOOD},
        "m.eml",
        "sender 'alice': no '@'",
        sender="alice",
    ),
    Refusal(
        "one-bad-file-in-a-directory",
        {
            "batch/1.eml": numbered_message(1),
            "batch/2.eml": b"no header at all\r\n",
            "batch/3.eml": numbered_message(3),
        },
        "batch",
        "2.eml: line 1: header line without a colon",
    ),
    Refusal(
        "missing-file",
        {},
        "absent.eml",
        "cannot read absent.eml: No such file or directory",
    ),
    Refusal(
        "unreadable-file",
        {"m.eml": GOOD},
        "m.eml",
        "cannot read m.eml: Permission denied",
        chmod={"m.eml": 0},
    ),
    Refusal(
        "unknown-config-key",
        {"m.eml": GOOD},
        "m.eml",
        "config: colour (line",
        config_extra="colour: blue\n",
    ),
]


def _without_dac_override() -> list[str]:
    """A command prefix under which even root gets EACCES from file modes.

    Root's capabilities bypass a mode-000 file; dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the bounding set before exec takes them away.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and no setpriv(1) to drop CAP_DAC_OVERRIDE")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


def _spool_one_good_message(tmp_path: Path) -> str:
    """The spool a refusal must leave alone: one message, and the full layout."""
    [spool_id] = write_segment(
        spool_root(tmp_path), [NewMessage(SENDER, (RECIPIENT,), GOOD)], now=1_800_000_000.0
    )
    return spool_id


@pytest.mark.parametrize("case", REFUSALS, ids=[case.name for case in REFUSALS])
async def test_enqueue_refuses_a_mistake_with_exit_2_one_line_and_an_untouched_spool(
    tmp_path: Path, case: Refusal
) -> None:
    config = sender_config(tmp_path, extra=case.config_extra)
    kept = _spool_one_good_message(tmp_path)
    before = files_under(spool_root(tmp_path))
    for name, data in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    for name, mode in (case.chmod or {}).items():
        (tmp_path / name).chmod(mode)
    prefix = _without_dac_override() if case.chmod else []
    # Run from tmp_path with relative paths: errors name the file as it was given.
    result = await enqueue(
        config,
        case.argument,
        sender=case.sender,
        recipients=(case.recipient,),
        prefix=prefix,
        cwd=tmp_path,
    )
    assert_refused(result, case.fragment)
    after = files_under(spool_root(tmp_path))
    assert after == before  # no new segment, nothing left in tmp/
    assert not any(name.startswith("tmp/") for name in after)
    assert [m.id for m in inspect(spool_root(tmp_path))] == [kept]
    assert read_events(tmp_path / "events.jsonl") == []  # no Reception was logged


async def test_enqueue_without_spool_path_refuses_and_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "client.yaml"
    config.write_text("egress:\n  pool:\n    - {source: 127.0.0.2}\n")
    (tmp_path / "m.eml").write_bytes(GOOD)
    before = files_under(tmp_path)
    result = await enqueue(config, tmp_path / "m.eml")
    assert_refused(result, "spool.path is not set")
    assert files_under(tmp_path) == before  # no spool, no event log, nothing anywhere


# -- run ----------------------------------------------------------------------------------


async def test_run_exits_0_promptly_on_sigterm_when_idle(tmp_path: Path) -> None:
    config = sender_config(tmp_path)
    async with sender_process(config) as sender:
        took = await sender.stop(signal.SIGTERM, within=10)
    assert sender.process.returncode == 0, sender.raw
    assert took < 2.0
    assert [line["event"] for line in sender.lines][-1] == "sender_stopped"


async def test_a_second_run_on_a_locked_spool_does_not_start_and_names_the_holder(
    tmp_path: Path,
) -> None:
    config = sender_config(tmp_path)
    async with sender_process(config) as first:
        second = await mta_client("run", "--config", config)
        assert second.returncode != 0
        assert f"locked by pid {first.pid}" in second.stderr
        assert "sender_started" not in second.stderr
        # The holder is undisturbed: still running, still named in the lock file.
        assert first.process.returncode is None
        assert (spool_root(tmp_path) / "lock").read_text().strip() == str(first.pid)
        await first.stop(signal.SIGTERM, within=10)
    assert first.process.returncode == 0


async def test_a_second_run_on_a_locked_spool_exits_2_with_one_line_naming_the_pid(
    tmp_path: Path,
) -> None:
    config = sender_config(tmp_path)
    async with sender_process(config) as first:
        second = await mta_client("run", "--config", config)
        await first.stop(signal.SIGTERM, within=10)
    assert_refused(second, f"locked by pid {first.pid}")


async def test_run_without_spool_path_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "client.yaml"
    config.write_text("egress:\n  pool:\n    - {source: 127.0.0.2}\n")
    result = await mta_client("run", "--config", config)
    assert_refused(result, "spool.path is not set")
