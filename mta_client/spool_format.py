"""The spool's record framing and state model: pure, no I/O.

:mod:`mta_client.spool` does the disk work; this module only turns records
into bytes and back, and folds journal operations into a queue state.

Two kinds of file hold records:

* a *segment* holds the message records of one enqueue batch, and is
  immutable once renamed into ``segments/``;
* the *journal* holds :class:`Done` and :class:`Scheduled` records, appended
  by the spool's lock holder only.

Every record has the same framing, integers little-endian::

    offset  0   4  magic  F9 4B 53 70 ("\\xf9KSp"; 0xF9 never occurs in UTF-8)
    offset  4   1  kind   (RecordKind)
    offset  5   3  reserved, zero
    offset  8   4  header length   (compact JSON, ASCII)
    offset 12   4  body length     (the raw message, or 0)
    offset 16   4  payload CRC     zlib.crc32(header + body)
    offset 20   4  prefix CRC      zlib.crc32(bytes 0..19)
    offset 24      header, then body

The prefix CRC makes the lengths trustworthy: a record whose prefix verifies
but which runs past the end of the data was cut short by a crash (a *torn*
tail), not corrupted. Scanning a buffer::

    pos ─┬─ whole record, both CRCs and its header valid ─> record; pos = its end
         ├─ valid prefix, record runs past the end ───────> Damage(TORN) to the end; stop
         ├─ < 24 bytes left that begin like a record ─────> Damage(TORN) to the end; stop
         └─ anything else ─> corrupt: find the next magic after pos and try
                             again there (resynchronise); the skipped bytes
                             are one Damage(CORRUPT)

A message's state is its recipients minus those a :class:`Done` names; each
remaining recipient's attempts and next attempt time come from the last
:class:`Scheduled` naming it (default: 0 attempts, due when received).
"""

from __future__ import annotations

import enum
import json
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, assert_never

__all__ = [
    "MAGIC",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "PREFIX_SIZE",
    "Damage",
    "DamageKind",
    "Done",
    "JournalOp",
    "NewMessage",
    "QueuedMessage",
    "QueuedRecipient",
    "Record",
    "RecordKind",
    "Scheduled",
    "SpoolState",
    "StoredMessage",
    "decode_journal",
    "decode_message_record",
    "decode_segment",
    "encode_op",
    "encode_ops",
    "encode_record",
    "encode_segment",
    "message_id",
    "parse_segment_name",
    "replay",
    "scan",
    "segment_name",
    "segment_of",
    "validate_message",
]

MAGIC: Final = b"\xf9KSp"
"""Starts every record; 0xF9 is never a byte of UTF-8 text, so text bodies cannot fake it."""

_HEAD: Final = struct.Struct("<4sB3xIII")  # magic, kind, header len, body len, payload CRC
_PREFIX_CRC: Final = struct.Struct("<I")
PREFIX_SIZE: Final = _HEAD.size + _PREFIX_CRC.size  # 24

MAX_HEADER_BYTES: Final = 16 * 1024 * 1024
"""Cap on a record header: an envelope of ~60,000 recipients of 256 bytes
(RFC 5321 §4.5.3.1.8 asks servers to take only 100 per message)."""

MAX_BODY_BYTES: Final = 1024 * 1024 * 1024
"""Cap on a message body: far above any SIZE limit (RFC 1870) a server takes,
and below the 4 GiB a 32-bit length can frame."""


class RecordKind(enum.IntEnum):
    """The kind byte of a record."""

    MESSAGE = 1
    DONE = 2
    SCHEDULED = 3


class DamageKind(enum.Enum):
    """Why a span of bytes held no valid record."""

    TORN = "torn"
    """A record starts but runs past the end of the data: an interrupted write."""
    CORRUPT = "corrupt"
    """Bytes that fail the magic, a CRC or the header's schema."""


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes ``[start, end)`` of a buffer that hold no valid record."""

    start: int
    end: int
    kind: DamageKind

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Record:
    """A record that passed both CRCs, with its decoded JSON header.

    The record spans ``[offset, end)`` of the buffer; its body starts at
    ``body_offset``.
    """

    kind: RecordKind
    header: dict[str, Any]
    offset: int
    body_offset: int
    end: int


# ---------------------------------------------------------------------------
# Records of the API: messages in, operations, the queue state out
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to enqueue. ``sender`` "" is the null reverse path (RFC 5321 §4.5.5)."""

    sender: str
    recipients: tuple[str, ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class Done:
    """These recipients are finished (delivered, bounced or expired): never try them again."""

    id: str
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Scheduled:
    """These recipients were tried ``attempts`` times; next due at wall time ``next_attempt``."""

    id: str
    recipients: tuple[str, ...]
    attempts: int
    next_attempt: float


JournalOp = Done | Scheduled


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    """A recipient still to deliver to."""

    address: str
    attempts: int
    next_attempt: float


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message's live state, without its body; ``size`` is the body's length."""

    id: str
    sender: str
    received: float
    recipients: tuple[QueuedRecipient, ...]
    size: int

    @classmethod
    def fresh(
        cls, id: str, sender: str, recipients: Sequence[str], received: float, size: int
    ) -> QueuedMessage:
        """A just-spooled message: no attempt yet, every recipient due at once."""
        return cls(
            id, sender, received, tuple(QueuedRecipient(r, 0, received) for r in recipients), size
        )


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message record's header, and where the record lies in its segment.

    The record spans ``length`` bytes from ``offset``; the body, ``size``
    bytes from ``body_offset``.
    """

    id: str
    sender: str
    recipients: tuple[str, ...]
    received: float
    offset: int = 0
    length: int = 0
    body_offset: int = 0
    size: int = 0


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

# 16 hex digits of time_ns first (fixed width: names sort by time, until 2554),
# then the writer's pid: unique across processes writing at once.
_SEGMENT_NAME: Final = re.compile(r"\A([0-9a-f]{16})-([0-9a-f]{1,8})\Z")


def segment_name(time_ns: int, pid: int) -> str:
    """The name of a segment written at ``time_ns`` by process ``pid``.

    Names are unique when each process uses strictly increasing times (the
    shell guarantees it) and sort in creation order.
    """
    return f"{time_ns:016x}-{pid:x}"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """``(time_ns, pid)`` of a segment name, or None if ``name`` is not one."""
    match = _SEGMENT_NAME.match(name)
    if match is None:
        return None
    return int(match[1], 16), int(match[2], 16)


def message_id(segment: str, index: int) -> str:
    """The id of the ``index``-th message of ``segment``: it names where the body is."""
    return f"{segment}.{index}"


def segment_of(message_id: str) -> str:
    """The segment a message id names ("" if it names none)."""
    segment, dot, index = message_id.rpartition(".")
    return segment if dot and index.isdigit() else ""


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------


def _json(header: Mapping[str, object]) -> bytes:
    # ensure_ascii: any str, lone surrogates included, round-trips exactly.
    return json.dumps(header, separators=(",", ":")).encode("ascii")


def _frame(kind: RecordKind, header: bytes, body: bytes) -> bytes:
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"record header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"message body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    head = _HEAD.pack(MAGIC, kind, len(header), len(body), zlib.crc32(body, zlib.crc32(header)))
    return head + _PREFIX_CRC.pack(zlib.crc32(head))


def encode_record(kind: RecordKind, header: Mapping[str, object], body: bytes = b"") -> bytes:
    """One framed record. Raises ValueError if the header or body exceeds its cap."""
    encoded = _json(header)
    return b"".join((_frame(kind, encoded, body), encoded, body))


class _Bad(enum.Enum):
    TORN = enum.auto()
    CORRUPT = enum.auto()


def _record_at(data: bytes, view: memoryview, pos: int) -> Record | _Bad:
    n = len(data)
    if n - pos < PREFIX_SIZE:
        rest = data[pos:]
        return _Bad.TORN if rest.startswith(MAGIC) or MAGIC.startswith(rest) else _Bad.CORRUPT
    if not data.startswith(MAGIC, pos):
        return _Bad.CORRUPT
    _, kind, header_len, body_len, payload_crc = _HEAD.unpack_from(data, pos)
    (prefix_crc,) = _PREFIX_CRC.unpack_from(data, pos + _HEAD.size)
    if zlib.crc32(view[pos : pos + _HEAD.size]) != prefix_crc:
        return _Bad.CORRUPT
    if kind not in _KINDS or header_len > MAX_HEADER_BYTES or body_len > MAX_BODY_BYTES:
        return _Bad.CORRUPT
    body_offset = pos + PREFIX_SIZE + header_len
    end = body_offset + body_len
    if end > n:
        return _Bad.TORN
    if zlib.crc32(view[pos + PREFIX_SIZE : end]) != payload_crc:
        return _Bad.CORRUPT
    try:
        header = json.loads(data[pos + PREFIX_SIZE : body_offset])
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return _Bad.CORRUPT
    if not isinstance(header, dict):
        return _Bad.CORRUPT
    return Record(RecordKind(kind), header, pos, body_offset, end)


_KINDS: Final = frozenset(RecordKind)

T = TypeVar("T")


def scan(data: bytes, decode: Callable[[Record], T]) -> Iterator[T | Damage]:
    """Every record of ``data``, passed through ``decode``, and every damaged span.

    ``decode`` raises ValueError for a record that is whole but not what the
    file may hold (wrong kind, bad header): it becomes part of a CORRUPT span,
    and scanning goes on after it. Adjacent bad bytes form one span.
    """
    view = memoryview(data)
    n = len(data)
    pos = 0
    bad_from: int | None = None
    while pos < n:
        found = _record_at(data, view, pos)
        if isinstance(found, Record):
            try:
                item = decode(found)
            except ValueError:
                if bad_from is None:
                    bad_from = pos
                pos = found.end  # the framing is sound: skip the whole record
                continue
            if bad_from is not None:
                yield Damage(bad_from, pos, DamageKind.CORRUPT)
                bad_from = None
            yield item
            pos = found.end
        elif found is _Bad.TORN:
            if bad_from is not None:
                yield Damage(bad_from, pos, DamageKind.CORRUPT)
            yield Damage(pos, n, DamageKind.TORN)
            return
        else:
            if bad_from is None:
                bad_from = pos
            following = data.find(MAGIC, pos + 1)
            pos = n if following < 0 else following
    if bad_from is not None:
        yield Damage(bad_from, n, DamageKind.CORRUPT)


def _split(items: Iterable[T | Damage]) -> tuple[list[T], list[Damage]]:
    good: list[T] = []
    damage: list[Damage] = []
    for item in items:
        if isinstance(item, Damage):
            damage.append(item)
        else:
            good.append(item)
    return good, damage


# ---------------------------------------------------------------------------
# Header schemas
# ---------------------------------------------------------------------------


def _str(header: Mapping[str, Any], key: str, *, empty: bool = False) -> str:
    value = header.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise ValueError(f"{key}: not a string")
    return value


def _addresses(header: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = header.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: not a list of strings")
    return tuple(value)


def _number(header: Mapping[str, Any], key: str) -> float:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: not a number")
    return float(value)


def _count(header: Mapping[str, Any], key: str) -> int:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}: not a count")
    return value


def validate_message(message: NewMessage) -> None:
    """Raise ValueError if ``message`` cannot be spooled (no recipients, over a cap)."""
    if not message.recipients:
        raise ValueError("a message needs at least one recipient")
    if len(message.body) > MAX_BODY_BYTES:
        raise ValueError(f"message body of {len(message.body)} bytes exceeds {MAX_BODY_BYTES}")
    envelope = _json({"from": message.sender, "to": list(message.recipients)})
    if len(envelope) > MAX_HEADER_BYTES - 256:  # room for id and received
        raise ValueError(f"envelope of {len(envelope)} bytes exceeds {MAX_HEADER_BYTES}")


def _message(record: Record) -> StoredMessage:
    if record.kind is not RecordKind.MESSAGE:
        raise ValueError(f"{record.kind.name} record in a segment")
    header = record.header
    return StoredMessage(
        id=_str(header, "id"),
        sender=_str(header, "from", empty=True),
        recipients=_addresses(header, "to"),
        received=_number(header, "t"),
        offset=record.offset,
        length=record.end - record.offset,
        body_offset=record.body_offset,
        size=record.end - record.body_offset,
    )


def _op(record: Record) -> JournalOp:
    header = record.header
    match record.kind:
        case RecordKind.DONE:
            return Done(_str(header, "id"), _addresses(header, "to"))
        case RecordKind.SCHEDULED:
            return Scheduled(
                _str(header, "id"),
                _addresses(header, "to"),
                _count(header, "n"),
                _number(header, "at"),
            )
        case RecordKind.MESSAGE:
            raise ValueError("MESSAGE record in the journal")
        case _:
            assert_never(record.kind)


# ---------------------------------------------------------------------------
# Segments and the journal
# ---------------------------------------------------------------------------


def encode_segment(
    segment: str, messages: Sequence[NewMessage], *, received: float | Sequence[float]
) -> tuple[bytes, list[StoredMessage]]:
    """A segment's bytes and its messages, with ids ``<segment>.<index>``.

    ``received`` is one wall time for all, or one per message. Raises
    ValueError for a message :func:`validate_message` refuses.
    """
    times = [received] * len(messages) if isinstance(received, int | float) else list(received)
    if len(times) != len(messages):
        raise ValueError("one received time per message")
    parts: list[bytes] = []
    stored: list[StoredMessage] = []
    pos = 0
    for index, (message, when) in enumerate(zip(messages, times, strict=True)):
        if not message.recipients:
            raise ValueError("a message needs at least one recipient")
        ident = message_id(segment, index)
        header = _json(
            {"id": ident, "from": message.sender, "to": list(message.recipients), "t": when}
        )
        prefix = _frame(RecordKind.MESSAGE, header, message.body)
        parts += (prefix, header, message.body)
        length = len(prefix) + len(header) + len(message.body)
        stored.append(
            StoredMessage(
                ident,
                message.sender,
                message.recipients,
                float(when),
                offset=pos,
                length=length,
                body_offset=pos + length - len(message.body),
                size=len(message.body),
            )
        )
        pos += length
    return b"".join(parts), stored


def decode_segment(data: bytes) -> tuple[list[StoredMessage], list[Damage]]:
    """The message records of a segment, and its damaged spans."""
    return _split(scan(data, _message))


def decode_message_record(data: bytes) -> tuple[StoredMessage, bytes]:
    """One whole message record (as read back at a known offset) and its body.

    Raises ValueError unless ``data`` is exactly one valid message record.
    """
    found = _record_at(data, memoryview(data), 0)
    if not isinstance(found, Record) or found.end != len(data):
        raise ValueError("not one whole, valid record")
    return _message(found), data[found.body_offset :]


def encode_op(op: JournalOp) -> bytes:
    """One journal record."""
    match op:
        case Done():
            return encode_record(RecordKind.DONE, {"id": op.id, "to": list(op.recipients)})
        case Scheduled():
            header = {
                "id": op.id,
                "to": list(op.recipients),
                "n": op.attempts,
                "at": op.next_attempt,
            }
            return encode_record(RecordKind.SCHEDULED, header)
        case _:
            assert_never(op)


def encode_ops(ops: Iterable[JournalOp]) -> bytes:
    """Journal records for ``ops``, in order."""
    return b"".join(encode_op(op) for op in ops)


def decode_journal(data: bytes) -> tuple[list[JournalOp], list[Damage]]:
    """The operations of a journal, and its damaged spans."""
    return _split(scan(data, _op))


# ---------------------------------------------------------------------------
# The state model
# ---------------------------------------------------------------------------


class _Entry:
    __slots__ = ("message", "remaining", "segment")

    def __init__(self, message: StoredMessage, segment: str) -> None:
        self.message = message
        self.segment = segment
        # Insertion-ordered: recipients keep the message's order as some finish.
        self.remaining = dict.fromkeys(message.recipients, (0, message.received))


class SpoolState:
    """Messages by segment and what remains of each, folded from journal operations.

    Mutable and pure: the shell feeds it what it reads and writes. Messages
    stay (finished or not) until their segment is dropped, so that
    :meth:`compacted_ops` can still say which recipients are done.
    """

    __slots__ = ("_entries", "_finished", "_live", "_segments")

    def __init__(self) -> None:
        # Insertion-ordered: arrival order breaks ties of ``received``.
        self._entries: dict[str, _Entry] = {}
        self._segments: dict[str, list[str]] = {}
        self._live: dict[str, int] = {}  # segment -> messages with recipients left
        self._finished: set[str] = set()

    def add_segment(self, segment: str, messages: Iterable[StoredMessage]) -> list[StoredMessage]:
        """Add the messages of ``segment``; returns those added (an id already held is skipped)."""
        ids = self._segments.setdefault(segment, [])
        added = [m for m in messages if m.id not in self._entries]
        for message in added:
            self._entries[message.id] = _Entry(message, segment)
            ids.append(message.id)
        self._live[segment] = self._live.get(segment, 0) + len(added)
        self._update_finished(segment)
        return added

    def _update_finished(self, segment: str) -> None:
        if self._live[segment] == 0:
            self._finished.add(segment)
        else:
            self._finished.discard(segment)

    def apply(self, ops: Iterable[JournalOp]) -> None:
        """Fold ``ops`` in. Operations on unknown ids or recipients, and on
        recipients already done, change nothing: Done is final."""
        for op in ops:
            entry = self._entries.get(op.id)
            if entry is None or not entry.remaining:
                continue
            match op:
                case Done():
                    for recipient in op.recipients:
                        entry.remaining.pop(recipient, None)
                    if not entry.remaining:
                        self._live[entry.segment] -= 1
                        self._update_finished(entry.segment)
                case Scheduled():
                    for recipient in op.recipients:
                        if recipient in entry.remaining:
                            entry.remaining[recipient] = (op.attempts, op.next_attempt)
                case _:
                    assert_never(op)

    def holds(self, message_id: str) -> bool:
        """Whether the message is in a segment this state holds (finished or not)."""
        return message_id in self._entries

    def locate(self, message_id: str) -> tuple[str, StoredMessage] | None:
        """The segment and stored record of a held message."""
        entry = self._entries.get(message_id)
        return None if entry is None else (entry.segment, entry.message)

    def queued(self, message_id: str) -> QueuedMessage | None:
        """The live state of a message, or None if it is finished or unknown."""
        entry = self._entries.get(message_id)
        if entry is None or not entry.remaining:
            return None
        return _queued(entry)

    def live(self) -> list[QueuedMessage]:
        """Every message with recipients left, oldest first."""
        entries = [e for e in self._entries.values() if e.remaining]
        entries.sort(key=lambda e: e.message.received)  # stable: arrival order within a time
        return [_queued(e) for e in entries]

    def segments(self) -> list[str]:
        """Every segment held, in name order."""
        return sorted(self._segments)

    def finished_segments(self) -> list[str]:
        """Segments none of whose messages has a recipient left: they may be deleted."""
        return sorted(self._finished)

    def drop_segment(self, segment: str) -> None:
        """Forget ``segment`` and its messages (after the shell deleted it)."""
        for message_id in self._segments.pop(segment, []):
            del self._entries[message_id]
        self._live.pop(segment, None)
        self._finished.discard(segment)

    def compacted_ops(self, *, excluding: Iterable[str] = ()) -> list[JournalOp]:
        """The fewest operations that rebuild this state from the held segments
        (minus ``excluding``): a Done for the finished recipients of each
        message, a Scheduled per distinct (attempts, next attempt) that is not
        the default."""
        skip = set(excluding)
        ops: list[JournalOp] = []
        for segment in sorted(self._segments):
            if segment in skip:
                continue
            for message_id in self._segments[segment]:
                entry = self._entries[message_id]
                message = entry.message
                done = tuple(
                    r for r in dict.fromkeys(message.recipients) if r not in entry.remaining
                )
                if done:
                    ops.append(Done(message_id, done))
                groups: dict[tuple[int, float], list[str]] = {}
                for recipient, schedule in entry.remaining.items():
                    if schedule != (0, message.received):
                        groups.setdefault(schedule, []).append(recipient)
                ops += (
                    Scheduled(message_id, tuple(group), attempts, next_attempt)
                    for (attempts, next_attempt), group in groups.items()
                )
        return ops


def _queued(entry: _Entry) -> QueuedMessage:
    message = entry.message
    return QueuedMessage(
        id=message.id,
        sender=message.sender,
        received=message.received,
        recipients=tuple(
            QueuedRecipient(address, attempts, next_attempt)
            for address, (attempts, next_attempt) in entry.remaining.items()
        ),
        size=message.size,
    )


def replay(messages: Iterable[StoredMessage], ops: Iterable[JournalOp]) -> dict[str, QueuedMessage]:
    """The live messages, by id, after applying ``ops`` (in order) to ``messages``."""
    state = SpoolState()
    for message in messages:
        state.add_segment(segment_of(message.id), (message,))
    state.apply(ops)
    return {queued.id: queued for queued in state.live()}
