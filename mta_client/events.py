"""The sender's event log: one JSON object per line for every outcome.

Each reception, delivery, deferral (transient failure), bounce and expiry of
a spooled message becomes an :class:`Event`, one per recipient, written as
one line of JSON. The log is a *record* for operators and their tools (a
feed for accounting, a trail to grep); the spool is the truth, so the log is
never read back by the sender and is never fsync'd.

Two parts, as in the rest of the package:

* the record and its line format (:class:`Event`, :func:`format_event`,
  :func:`parse_event`): pure, no I/O;
* :class:`EventLog`, the shell: an append-only file (or stdout).

Line format: every line has the same keys, in the same order, so ``jq`` and
column-oriented tools need no defaults. Absent values are ``null``. Lines are
pure ASCII (non-ASCII text is ``\\u`` escaped), so neither an SMTPUTF8
address nor a byte the remote server sent can split a line or break a
reader that expects one encoding.

```json
{"type":"Delivery","time":"2024-03-01T12:00:00.250Z","timestamp":1709294400.25,
 "id":"0d9f...","sender":"a@example.org","recipient":"b@example.com","attempt":1,
 "source":"203.0.113.10","site":"example.com","mx":"mx1.example.com",
 "mx_address":"192.0.2.25","code":250,"enhanced":"2.0.0","reply":"ok queued as X",
 "message_id":"<abc@example.org>","size":1234}
```
(one line in the log; wrapped here for reading.)
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final

from mta_client.spool_format import QueuedMessage

__all__ = [
    "EVENT_KEYS",
    "STDOUT",
    "Event",
    "EventKind",
    "EventLog",
    "format_event",
    "parse_event",
]


class EventKind(enum.StrEnum):
    """What happened to one recipient of one message; the ``type`` of a line."""

    RECEPTION = "Reception"
    DELIVERY = "Delivery"
    TRANSIENT_FAILURE = "TransientFailure"
    BOUNCE = "Bounce"
    EXPIRATION = "Expiration"


#: The keys of every line, in order.
EVENT_KEYS: Final = (
    "type",
    "time",
    "timestamp",
    "id",
    "sender",
    "recipient",
    "attempt",
    "source",
    "site",
    "mx",
    "mx_address",
    "code",
    "enhanced",
    "reply",
    "message_id",
    "size",
)

# The RFC 3339 form we write, and how far it may lie from "timestamp": the
# text is truncated to milliseconds, and datetime rounds to microseconds first.
_TIME_TOLERANCE: Final = 0.002


@dataclass(frozen=True, slots=True)
class Event:
    """One outcome for one recipient of one spooled message.

    ``time`` is wall-clock seconds since the epoch (the sender's
    :class:`~mta_client.clock.WallClock`); ``message_id`` is the spool id and
    ``header_message_id`` the message's own ``Message-ID`` header. ``source``
    is the egress IP used, ``site`` the shaping site, ``mx`` the MX host name
    and ``mx_address`` the address connected to. ``code``, ``enhanced`` and
    ``reply`` are the deciding SMTP reply (RFC 5321 §4.2, RFC 3463), with
    ``reply`` its text on one line (JSON escaping keeps the log line intact
    whatever it holds). ``attempt`` counts delivery attempts, 0 for a
    reception.
    """

    kind: EventKind
    time: float
    message_id: str
    sender: str
    recipient: str
    attempt: int = 0
    source: str | None = None
    site: str | None = None
    mx: str | None = None
    mx_address: str | None = None
    code: int | None = None
    enhanced: str | None = None
    reply: str | None = None
    header_message_id: str | None = None
    size: int | None = None

    def as_json(self) -> dict[str, object]:
        """The line's object: :data:`EVENT_KEYS` in order, ``None`` kept as null.

        ``time`` is RFC 3339 UTC with milliseconds, for people and log
        shippers; ``timestamp`` is the exact float, for programs.
        """
        return {
            "type": str(self.kind),
            "time": _rfc3339(self.time),
            "timestamp": self.time,
            "id": self.message_id,
            "sender": self.sender,
            "recipient": self.recipient,
            "attempt": self.attempt,
            "source": self.source,
            "site": self.site,
            "mx": self.mx,
            "mx_address": self.mx_address,
            "code": self.code,
            "enhanced": self.enhanced,
            "reply": self.reply,
            "message_id": self.header_message_id,
            "size": self.size,
        }


def _rfc3339(timestamp: float) -> str:
    """``2024-03-01T12:00:00.250Z``: RFC 3339 §5.6, UTC, milliseconds."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_event(event: Event) -> str:
    """One log line for ``event``, without the newline: compact, ASCII-only JSON."""
    return json.dumps(event.as_json(), ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no non-finite numbers)")


def _optional_str(obj: dict[str, object], key: str) -> str | None:
    value = obj[key]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string or null, got {value!r}")
    return value


def _str(obj: dict[str, object], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {value!r}")
    return value


def _optional_int(obj: dict[str, object], key: str) -> int | None:
    value = obj[key]
    # bool is an int subclass; JSON true is not a count.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key!r} must be an integer or null, got {value!r}")
    return value


def parse_event(line: str) -> Event:
    """The :class:`Event` a log line holds (the inverse of :func:`format_event`).

    Every key of :data:`EVENT_KEYS` must be present with the right type;
    keys a later version may add are ignored. ``time`` must agree with
    ``timestamp``, which is the value used. Raises :class:`ValueError`
    (``json.JSONDecodeError`` is one) for anything else.
    """
    obj = json.loads(line, parse_constant=_reject_constant)
    if not isinstance(obj, dict):
        raise ValueError("an event line must be a JSON object")
    missing = [key for key in EVENT_KEYS if key not in obj]
    if missing:
        raise ValueError(f"event line lacks {', '.join(missing)}")
    kind = EventKind(_str(obj, "type"))
    timestamp = obj["timestamp"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ValueError(f"'timestamp' must be a number, got {timestamp!r}")
    if not math.isfinite(timestamp):
        raise ValueError("'timestamp' must be finite")
    text = _str(obj, "time")
    try:
        stated = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"'time' is not RFC 3339: {text!r}") from exc
    if stated.tzinfo is None or abs(stated.timestamp() - timestamp) > _TIME_TOLERANCE:
        raise ValueError(f"'time' {text!r} disagrees with 'timestamp' {timestamp!r}")
    attempt = _optional_int(obj, "attempt")
    if attempt is None:
        raise ValueError("'attempt' must be an integer")
    return Event(
        kind=kind,
        time=float(timestamp),
        message_id=_str(obj, "id"),
        sender=_str(obj, "sender"),
        recipient=_str(obj, "recipient"),
        attempt=attempt,
        source=_optional_str(obj, "source"),
        site=_optional_str(obj, "site"),
        mx=_optional_str(obj, "mx"),
        mx_address=_optional_str(obj, "mx_address"),
        code=_optional_int(obj, "code"),
        enhanced=_optional_str(obj, "enhanced"),
        reply=_optional_str(obj, "reply"),
        header_message_id=_optional_str(obj, "message_id"),
        size=_optional_int(obj, "size"),
    )


#: The path that means standard output.
STDOUT: Final = Path("-")

# The log holds addresses (personal data): not world-readable. umask applies too.
_FILE_MODE: Final = 0o640
_OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class EventLog:
    """An append-only JSON-lines file; ``Path("-")`` is stdout, ``None`` disables it.

    Blocking, but fine to call from the trio thread: a write is one small
    append to the page cache (a batch is one message's recipients, each line
    bounded by SMTP's reply caps), and there is no fsync, because the log is
    a record and the spool is the truth. The file is opened with
    ``O_APPEND``, so several writers (a restarted process, a second
    instance) never overwrite each other, and a batch goes out in one
    ``os.write``: its lines stay together, and a crash leaves at worst the
    batch's tail missing, never half a line between two whole ones. Only on
    a short write (a full disk, a pipe on stdout) does the rest follow in
    further writes.

    Write errors (``OSError``, e.g. ``ENOSPC``) propagate: the caller logs
    and carries on, since no delivery decision depends on the log.
    """

    __slots__ = ("_closed", "_fd", "_path")

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._closed = False
        self._fd: int | None = None if path is None else self._open(path)

    @staticmethod
    def _open(path: Path) -> int:
        if path == STDOUT:
            # A private descriptor: close() is then the same for both cases,
            # and closing the log never closes the process's stdout.
            return os.dup(1)
        return os.open(path, _OPEN_FLAGS, _FILE_MODE)

    @property
    def enabled(self) -> bool:
        """Whether events go anywhere (a path was given)."""
        return self._path is not None

    def write(self, events: Sequence[Event]) -> None:
        """Append one line per event, all in one write. Does nothing when disabled."""
        if self._closed:
            raise ValueError("write to a closed EventLog")
        if self._fd is None or not events:
            return
        data = "".join(format_event(event) + "\n" for event in events).encode("ascii")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def reopen(self) -> None:
        """Open the path again, for log rotation (SIGHUP after a rename).

        The new file is opened before the old one is closed: if the open
        fails (the directory is gone, permissions changed), the error
        propagates and events keep going to the old file instead of nowhere.
        Stdout is not reopened.
        """
        if self._closed:
            raise ValueError("reopen of a closed EventLog")
        if self._path is None or self._path == STDOUT:
            return
        fd = self._open(self._path)
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)

    def close(self) -> None:
        """Close the file; later writes raise :class:`ValueError`. Idempotent."""
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def reception_events(
    messages: Iterable[QueuedMessage], *, header_ids: Mapping[str, str | None] | None = None
) -> list[Event]:
    """One ``Reception`` per recipient of each newly spooled message.

    ``header_ids`` maps spool ids to the messages' Message-ID header values,
    for whoever has the bodies at hand.
    """
    header_ids = header_ids or {}
    return [
        Event(
            kind=EventKind.RECEPTION,
            time=message.received,
            message_id=message.id,
            sender=message.sender,
            recipient=recipient.address,
            header_message_id=header_ids.get(message.id),
            size=message.size,
        )
        for message in messages
        for recipient in message.recipients
    ]
