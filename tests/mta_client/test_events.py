"""Event records, their JSON-lines form, and the append-only EventLog."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta_client.events import (
    EVENT_KEYS,
    STDOUT,
    Event,
    EventKind,
    EventLog,
    format_event,
    parse_event,
)

DELIVERY = Event(
    kind=EventKind.DELIVERY,
    time=1709294400.25,
    message_id="0d9f",
    sender="alice@example.org",
    recipient="bob@example.com",
    attempt=2,
    source="203.0.113.10",
    site="example.com",
    mx="mx1.example.com",
    mx_address="192.0.2.25",
    code=250,
    enhanced="2.0.0",
    reply="ok queued as X",
    header_message_id="<m1@example.org>",
    size=1234,
)

RECEPTION = Event(
    kind=EventKind.RECEPTION,
    time=1709294399.0,
    message_id="0d9f",
    sender="alice@example.org",
    recipient="bob@example.com",
)


def test_kinds_have_their_wire_names() -> None:
    assert [str(kind) for kind in EventKind] == [
        "Reception",
        "Delivery",
        "TransientFailure",
        "Bounce",
        "Expiration",
    ]


def test_as_json_has_every_key_in_order_with_each_value() -> None:
    assert DELIVERY.as_json() == {
        "type": "Delivery",
        "time": "2024-03-01T12:00:00.250Z",
        "timestamp": 1709294400.25,
        "id": "0d9f",
        "sender": "alice@example.org",
        "recipient": "bob@example.com",
        "attempt": 2,
        "source": "203.0.113.10",
        "site": "example.com",
        "mx": "mx1.example.com",
        "mx_address": "192.0.2.25",
        "code": 250,
        "enhanced": "2.0.0",
        "reply": "ok queued as X",
        "message_id": "<m1@example.org>",
        "size": 1234,
    }
    assert tuple(DELIVERY.as_json()) == EVENT_KEYS


def test_absent_values_are_kept_as_null_so_every_line_has_the_same_keys() -> None:
    obj = json.loads(format_event(RECEPTION))
    assert tuple(obj) == EVENT_KEYS
    assert obj["source"] is None
    assert obj["code"] is None
    assert obj["size"] is None
    assert obj["attempt"] == 0


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1709294400.9999, "2024-03-01T12:00:00.999Z"),  # truncated, not rounded up
        (1709294400.001, "2024-03-01T12:00:00.001Z"),
    ],
)
def test_time_is_rfc3339_utc_with_milliseconds(timestamp: float, text: str) -> None:
    event = Event(EventKind.BOUNCE, timestamp, "id", "a@x", "b@y")
    assert event.as_json()["time"] == text
    assert event.as_json()["timestamp"] == timestamp


def test_a_line_is_one_line_of_ascii_whatever_the_reply_holds() -> None:
    event = Event(
        EventKind.TRANSIENT_FAILURE,
        1.0,
        "id",
        "a@x",
        "j\u00f6rg@b\u00fccher.example",
        reply="try\r\nlater \udcff \u2028",
    )
    line = format_event(event)
    assert line.isascii()
    assert not {"\n", "\r", "\u2028"} & set(line)
    assert parse_event(line) == event


def test_parse_event_inverts_format_event() -> None:
    for event in (DELIVERY, RECEPTION):
        assert parse_event(format_event(event)) == event
        assert parse_event(format_event(event) + "\n") == event


_optional_text = st.none() | st.text(max_size=40)
_optional_int = st.none() | st.integers(min_value=0, max_value=2**53)


@given(
    st.builds(
        Event,
        kind=st.sampled_from(EventKind),
        time=st.floats(min_value=0, max_value=4102444800.0),
        message_id=st.text(max_size=40),
        sender=st.text(max_size=40),
        recipient=st.text(max_size=40),
        attempt=st.integers(min_value=0, max_value=10_000),
        source=_optional_text,
        site=_optional_text,
        mx=_optional_text,
        mx_address=_optional_text,
        code=_optional_int,
        enhanced=_optional_text,
        reply=_optional_text,
        header_message_id=_optional_text,
        size=_optional_int,
    )
)
def test_any_event_round_trips_through_its_line(event: Event) -> None:
    line = format_event(event)
    assert line.isascii()
    assert "\n" not in line
    assert parse_event(line) == event


def _line(**changes: object) -> str:
    obj = DELIVERY.as_json()
    obj.update(changes)
    return json.dumps(obj)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "not json",
        "[1, 2]",
        '{"type": "Delivery"}',
        _line(type="Delivered"),
        _line(attempt=True),
        _line(attempt=None),
        _line(attempt=1.5),
        _line(code="250"),
        _line(sender=None),
        _line(source=10),
        _line(timestamp="1709294400.25"),
        _line(timestamp=False),
        _line(time="yesterday"),
        _line(time="2024-03-01T12:00:00.250"),  # no zone
        _line(time="2024-03-01T13:00:00.250Z"),  # disagrees with timestamp
        _line(timestamp=float("nan")),
        _line(timestamp=float("inf")),
    ],
)
def test_parse_event_refuses_a_bad_line(line: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError is the contract
        parse_event(line)


def test_parse_event_ignores_keys_a_later_version_adds() -> None:
    assert parse_event(_line(tenant="blue")) == DELIVERY


def read_events(path: Path) -> list[Event]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [parse_event(line) for line in text.splitlines()]


def test_write_appends_one_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.write([RECEPTION])
        log.write([DELIVERY, DELIVERY])
    assert read_events(path) == [RECEPTION, DELIVERY, DELIVERY]


def test_existing_lines_are_kept_when_the_log_opens(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(format_event(RECEPTION) + "\n")
    with EventLog(path) as log:
        log.write([DELIVERY])
    assert read_events(path) == [RECEPTION, DELIVERY]


def test_two_writers_on_one_file_append_and_never_overwrite(tmp_path: Path) -> None:
    # Without O_APPEND the second writer would write at its own offset 0,
    # over the first writer's line.
    path = tmp_path / "events.jsonl"
    with EventLog(path) as first, EventLog(path) as second:
        first.write([RECEPTION])
        second.write([DELIVERY])
        first.write([RECEPTION])
    assert read_events(path) == [RECEPTION, DELIVERY, RECEPTION]


def test_a_batch_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    writes: list[bytes] = []
    real_write = os.write

    def recording_write(fd: int, data: bytes | memoryview) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    log.write([RECEPTION, DELIVERY, DELIVERY])
    log.close()
    assert len(writes) == 1
    assert writes[0].count(b"\n") == 3
    assert read_events(path) == [RECEPTION, DELIVERY, DELIVERY]


def test_a_short_write_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    real_write = os.write

    def short_write(fd: int, data: bytes | memoryview) -> int:
        return real_write(fd, bytes(data)[:7])  # as a pipe or a full disk may

    monkeypatch.setattr(os, "write", short_write)
    log.write([RECEPTION, DELIVERY])
    log.close()
    assert read_events(path) == [RECEPTION, DELIVERY]


def test_an_empty_batch_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.write([])
    assert path.read_bytes() == b""


def test_reopen_follows_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    rotated = tmp_path / "events.jsonl.1"
    with EventLog(path) as log:
        log.write([RECEPTION])
        path.rename(rotated)
        log.write([DELIVERY])  # still the old file, as logrotate expects until SIGHUP
        log.reopen()
        log.write([RECEPTION])
    assert read_events(rotated) == [RECEPTION, DELIVERY]
    assert read_events(path) == [RECEPTION]


def test_a_failed_reopen_keeps_writing_to_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    with EventLog(directory / "events.jsonl") as log:
        log.write([RECEPTION])
        moved = directory.rename(tmp_path / "moved")
        with pytest.raises(FileNotFoundError):
            log.reopen()
        log.write([DELIVERY])
    assert read_events(moved / "events.jsonl") == [RECEPTION, DELIVERY]


def test_the_log_file_is_not_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).close()
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0


def test_a_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = EventLog(None)
    assert not log.enabled
    log.write([DELIVERY])
    log.reopen()
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_dash_writes_to_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    with EventLog(STDOUT) as log:
        assert log.enabled
        log.write([RECEPTION, DELIVERY])
        log.reopen()  # stdout is not reopened, and stays usable
        log.write([DELIVERY])
    out = capfd.readouterr().out
    assert [parse_event(line) for line in out.splitlines()] == [RECEPTION, DELIVERY, DELIVERY]
    os.write(1, b"")  # closing the log left the process's stdout open


def test_write_after_close_is_an_error_and_close_is_idempotent(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.close()
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.write([DELIVERY])
    with pytest.raises(ValueError, match="closed"):
        log.reopen()
