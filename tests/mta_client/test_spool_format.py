"""Tests for mta_client.spool_format: record framing, damage detection, replay."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta_client.spool_format import (
    MAGIC,
    PREFIX_SIZE,
    Damage,
    DamageKind,
    Done,
    JournalOp,
    NewMessage,
    QueuedRecipient,
    RecordKind,
    Scheduled,
    SpoolState,
    StoredMessage,
    decode_journal,
    decode_message_record,
    decode_segment,
    encode_op,
    encode_ops,
    encode_record,
    encode_segment,
    message_id,
    parse_segment_name,
    replay,
    segment_name,
    segment_of,
    validate_message,
)

EXAMPLES = settings(max_examples=200, deadline=None)

SEGMENT = segment_name(0x17C3A5B2E1F00000, 4242)
MESSAGES = [
    NewMessage(
        "a@sender.test", ("b@example.test", "c@example.test"), b"Subject: one\r\n\r\nHi\r\n"
    ),
    NewMessage("", ("bounce@example.test",), b""),  # null reverse path, empty body
    NewMessage("d@sender.test", ("e@example.test",), bytes(range(256)) * 3),
]


def segment_bytes() -> tuple[bytes, list[StoredMessage]]:
    return encode_segment(SEGMENT, MESSAGES, received=1000.5)


def body_of(data: bytes, message: StoredMessage) -> bytes:
    return data[message.body_offset : message.body_offset + message.size]


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------


def test_segment_names_parse_back_and_sort_by_time() -> None:
    early, late = segment_name(5, 99999), segment_name(6, 1)
    assert parse_segment_name(early) == (5, 99999)
    assert sorted([late, early]) == [early, late]


@pytest.mark.parametrize("name", ["", "x", "17c3a5b2e1f00000", "17c3a5b2e1f00000-", "a-1.tmp"])
def test_non_segment_names_do_not_parse(name: str) -> None:
    assert parse_segment_name(name) is None


def test_message_ids_name_their_segment() -> None:
    assert segment_of(message_id(SEGMENT, 7)) == SEGMENT
    assert segment_of("no-index") == ""


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------


def test_segment_round_trips_headers_offsets_and_bodies() -> None:
    data, stored = segment_bytes()
    decoded, damage = decode_segment(data)
    assert damage == []
    assert decoded == stored
    assert [m.id for m in decoded] == [f"{SEGMENT}.{i}" for i in range(3)]
    assert [body_of(data, m) for m in decoded] == [m.body for m in MESSAGES]
    assert decoded[1].sender == ""
    assert decoded[0].received == 1000.5


def test_one_record_read_back_at_its_offset_gives_its_body() -> None:
    data, stored = segment_bytes()
    for message, new in zip(stored, MESSAGES, strict=True):
        record = data[message.offset : message.offset + message.length]
        got, body = decode_message_record(record)
        at_zero = replace(message, offset=0, body_offset=message.body_offset - message.offset)
        assert (got, body) == (at_zero, new.body)


def test_one_record_with_trailing_bytes_is_refused() -> None:
    data, stored = segment_bytes()
    with pytest.raises(ValueError, match="one whole"):
        decode_message_record(data[: stored[0].length + 1])


def test_journal_round_trips_every_op() -> None:
    ops: list[JournalOp] = [
        Done("s.0", ("a@x.test",)),
        Scheduled("s.0", ("b@x.test", "c@x.test"), 3, 1234.25),
        Done("s.1", ("\udcff@lone-surrogate.test", "ü@idn.test")),
    ]
    assert decode_journal(encode_ops(ops)) == (ops, [])


def test_records_are_prefixed_by_magic_and_a_prefix_crc() -> None:
    record = encode_record(RecordKind.DONE, {"id": "s.0", "to": ["a@x.test"]})
    assert record.startswith(MAGIC)
    (prefix_crc,) = struct.unpack_from("<I", record, 20)
    assert prefix_crc == zlib.crc32(record[:20])


def test_truncation_at_every_byte_is_a_torn_tail_after_the_whole_records() -> None:
    data, stored = segment_bytes()
    for cut in range(len(data) + 1):
        decoded, damage = decode_segment(data[:cut])
        whole = [m for m in stored if m.offset + m.length <= cut]
        assert decoded == whole, cut
        torn_at = whole[-1].offset + whole[-1].length if whole else 0
        expected = [] if torn_at == cut else [Damage(torn_at, cut, DamageKind.TORN)]
        assert damage == expected, cut


def test_truncation_at_every_byte_of_a_journal_is_detected() -> None:
    ops: list[JournalOp] = [Done(f"s.{i}", ("a@x.test",)) for i in range(3)]
    data = encode_ops(ops)
    ends = {len(encode_ops(ops[:i])) for i in range(4)}
    for cut in range(len(data) + 1):
        decoded, damage = decode_journal(data[:cut])
        kept = max(e for e in ends if e <= cut)
        assert decoded == ops[: sorted(ends).index(kept)]
        assert damage == ([] if kept == cut else [Damage(kept, cut, DamageKind.TORN)])


def test_a_flipped_byte_anywhere_in_a_record_is_corrupt_and_the_next_record_is_found() -> None:
    data, stored = segment_bytes()
    first = stored[0]
    for position in range(first.offset, first.offset + first.length):
        damaged = bytearray(data)
        damaged[position] ^= 0x40
        decoded, damage = decode_segment(bytes(damaged))
        assert decoded == stored[1:], position
        assert damage == [Damage(0, stored[1].offset, DamageKind.CORRUPT)], position


def test_a_flipped_byte_in_the_last_record_is_corrupt_to_the_end() -> None:
    data, stored = segment_bytes()
    damaged = bytearray(data)
    damaged[stored[2].body_offset + 5] ^= 1
    decoded, damage = decode_segment(bytes(damaged))
    assert decoded == stored[:2]
    assert damage == [Damage(stored[2].offset, len(data), DamageKind.CORRUPT)]


def test_garbage_between_records_is_one_corrupt_span() -> None:
    data, stored = segment_bytes()
    cut = stored[1].offset
    garbage = b"garbage" + MAGIC + b"more garbage, with a fake magic" + MAGIC[:2]
    decoded, damage = decode_segment(data[:cut] + garbage + data[cut:])
    assert [m.id for m in decoded] == [m.id for m in stored]
    assert damage == [Damage(cut, cut + len(garbage), DamageKind.CORRUPT)]


def test_trailing_garbage_shorter_than_a_prefix_is_corrupt_unless_it_starts_a_record() -> None:
    data, _ = segment_bytes()
    assert decode_segment(data + b"xyz")[1] == [
        Damage(len(data), len(data) + 3, DamageKind.CORRUPT)
    ]
    assert decode_segment(data + MAGIC[:3])[1] == [
        Damage(len(data), len(data) + 3, DamageKind.TORN)
    ]


def test_a_record_of_the_wrong_kind_is_corrupt_and_skipped_whole() -> None:
    op = encode_op(Done("s.0", ("a@x.test",)))
    data, stored = segment_bytes()
    decoded, damage = decode_segment(op + data)
    assert [m.id for m in decoded] == [m.id for m in stored]
    assert damage == [Damage(0, len(op), DamageKind.CORRUPT)]
    assert decode_journal(data)[0] == []


def test_a_header_breaking_the_schema_is_corrupt() -> None:
    bad = encode_record(RecordKind.DONE, {"id": "s.0", "to": "not a list"})
    good = encode_op(Done("s.1", ("a@x.test",)))
    assert decode_journal(bad + good) == (
        [Done("s.1", ("a@x.test",))],
        [Damage(0, len(bad), DamageKind.CORRUPT)],
    )


def test_a_corrupt_length_is_caught_by_the_prefix_crc_not_taken_for_a_torn_tail() -> None:
    one = encode_op(Done("s.0", ("a@x.test",)))
    two = encode_op(Done("s.1", ("a@x.test",)))
    damaged = bytearray(one + two)
    damaged[12] = 0xFF  # body length 255: would run past the end if believed
    decoded, damage = decode_journal(bytes(damaged))
    assert decoded == [Done("s.1", ("a@x.test",))]
    assert damage == [Damage(0, len(one), DamageKind.CORRUPT)]


def test_messages_that_cannot_be_spooled_are_refused() -> None:
    with pytest.raises(ValueError, match="recipient"):
        validate_message(NewMessage("a@x.test", (), b"x"))
    with pytest.raises(ValueError, match="recipient"):
        encode_segment("s", [NewMessage("a@x.test", (), b"x")], received=0.0)
    with pytest.raises(ValueError, match="one received time"):
        encode_segment("s", MESSAGES, received=[1.0])


addresses = st.text(min_size=1, max_size=40)
new_messages = st.builds(
    NewMessage,
    sender=st.text(max_size=40),
    recipients=st.lists(addresses, min_size=1, max_size=5).map(tuple),
    body=st.binary(max_size=600),
)


@EXAMPLES
@given(
    messages=st.lists(new_messages, min_size=1, max_size=6),
    received=st.floats(allow_nan=False, allow_infinity=False),
    data=st.data(),
)
def test_any_segment_round_trips_and_any_cut_keeps_the_whole_records(
    messages: list[NewMessage], received: float, data: st.DataObject
) -> None:
    encoded, stored = encode_segment(SEGMENT, messages, received=received)
    decoded, damage = decode_segment(encoded)
    assert (decoded, damage) == (stored, [])
    assert [body_of(encoded, m) for m in decoded] == [m.body for m in messages]
    assert [(m.sender, m.recipients) for m in decoded] == [
        (m.sender, m.recipients) for m in messages
    ]
    cut = data.draw(st.integers(0, len(encoded)), label="cut")
    whole = [m for m in stored if m.offset + m.length <= cut]
    decoded_cut, damage_cut = decode_segment(encoded[:cut])
    assert decoded_cut == whole
    assert all(d.kind is DamageKind.TORN and d.end == cut for d in damage_cut)


@EXAMPLES
@given(
    messages=st.lists(new_messages, min_size=2, max_size=5),
    data=st.data(),
)
def test_any_flipped_byte_loses_only_its_own_record(
    messages: list[NewMessage], data: st.DataObject
) -> None:
    encoded, stored = encode_segment(SEGMENT, messages, received=1.0)
    position = data.draw(st.integers(0, len(encoded) - 1), label="position")
    flip = data.draw(st.integers(1, 255), label="flip")
    damaged = bytearray(encoded)
    damaged[position] ^= flip
    decoded, damage = decode_segment(bytes(damaged))
    hit = next(m for m in stored if m.offset <= position < m.offset + m.length)
    assert decoded == [m for m in stored if m is not hit]
    # The damage covers exactly the hit record (a body ending in a fake magic
    # may split it into a corrupt span and a "torn" one at the very end).
    assert damage[0].start == hit.offset
    assert damage[0].kind is DamageKind.CORRUPT
    assert all(a.end == b.start for a, b in pairwise(damage))
    assert damage[-1].end == hit.offset + hit.length


# ---------------------------------------------------------------------------
# Replay and the state model
# ---------------------------------------------------------------------------


def stored(index: int, *recipients: str, received: float = 100.0) -> StoredMessage:
    return StoredMessage(message_id(SEGMENT, index), "s@x.test", recipients, received, size=10)


def test_replay_without_ops_has_every_recipient_due_when_received() -> None:
    live = replay([stored(0, "a", "b")], [])
    assert live[f"{SEGMENT}.0"].recipients == (
        QueuedRecipient("a", 0, 100.0),
        QueuedRecipient("b", 0, 100.0),
    )
    assert live[f"{SEGMENT}.0"].size == 10


def test_partial_done_keeps_only_the_other_recipients_in_order() -> None:
    ident = f"{SEGMENT}.0"
    live = replay([stored(0, "a", "b", "c")], [Done(ident, ("b",))])
    assert [r.address for r in live[ident].recipients] == ["a", "c"]


def test_done_of_every_recipient_finishes_the_message() -> None:
    ident = f"{SEGMENT}.0"
    assert replay([stored(0, "a", "b")], [Done(ident, ("a",)), Done(ident, ("b",))]) == {}


def test_the_last_scheduled_naming_a_recipient_wins() -> None:
    ident = f"{SEGMENT}.0"
    ops: list[JournalOp] = [
        Scheduled(ident, ("a", "b"), 1, 200.0),
        Scheduled(ident, ("b",), 2, 300.0),
    ]
    live = replay([stored(0, "a", "b", "c")], ops)
    assert live[ident].recipients == (
        QueuedRecipient("a", 1, 200.0),
        QueuedRecipient("b", 2, 300.0),
        QueuedRecipient("c", 0, 100.0),
    )


def test_done_is_final_a_later_scheduled_does_not_revive_a_recipient() -> None:
    ident = f"{SEGMENT}.0"
    ops: list[JournalOp] = [Done(ident, ("a",)), Scheduled(ident, ("a", "b"), 1, 200.0)]
    live = replay([stored(0, "a", "b")], ops)
    assert live[ident].recipients == (QueuedRecipient("b", 1, 200.0),)


def test_ops_on_unknown_ids_and_recipients_change_nothing() -> None:
    ident = f"{SEGMENT}.0"
    ops: list[JournalOp] = [Done("other.0", ("a",)), Done(ident, ("zz",))]
    assert replay([stored(0, "a")], ops) == replay([stored(0, "a")], [])


def test_live_messages_are_oldest_first() -> None:
    state = SpoolState()
    state.add_segment(SEGMENT, [stored(0, "a", received=5.0), stored(1, "a", received=1.0)])
    assert [m.id for m in state.live()] == [f"{SEGMENT}.1", f"{SEGMENT}.0"]


def test_a_segment_is_finished_when_all_its_messages_are() -> None:
    state = SpoolState()
    state.add_segment(SEGMENT, [stored(0, "a"), stored(1, "b")])
    state.apply([Done(f"{SEGMENT}.0", ("a",))])
    assert state.finished_segments() == []
    state.apply([Done(f"{SEGMENT}.1", ("b",))])
    assert state.finished_segments() == [SEGMENT]
    assert state.holds(f"{SEGMENT}.0")  # until the shell deletes the segment
    state.drop_segment(SEGMENT)
    assert not state.holds(f"{SEGMENT}.0")
    assert state.finished_segments() == []


def test_an_id_already_held_is_not_added_twice() -> None:
    state = SpoolState()
    state.add_segment(SEGMENT, [stored(0, "a")])
    assert state.add_segment("copy", [stored(0, "a")]) == []
    assert len(state.live()) == 1
    assert state.finished_segments() == ["copy"]  # holds nothing: may go


def test_compacted_ops_keep_done_for_finished_messages_of_held_segments() -> None:
    state = SpoolState()
    state.add_segment(SEGMENT, [stored(0, "a"), stored(1, "b", "c")])
    state.apply([Done(f"{SEGMENT}.0", ("a",)), Scheduled(f"{SEGMENT}.1", ("c",), 1, 500.0)])
    assert state.compacted_ops() == [
        Done(f"{SEGMENT}.0", ("a",)),
        Scheduled(f"{SEGMENT}.1", ("c",), 1, 500.0),
    ]
    assert state.compacted_ops(excluding=[SEGMENT]) == []


recipient_names = st.sampled_from(["a", "b", "c", "d"])
op_strategy = st.one_of(
    st.builds(
        Done,
        id=st.sampled_from([f"{SEGMENT}.0", f"{SEGMENT}.1", "gone.0"]),
        recipients=st.lists(recipient_names, min_size=1, max_size=3).map(tuple),
    ),
    st.builds(
        Scheduled,
        id=st.sampled_from([f"{SEGMENT}.0", f"{SEGMENT}.1"]),
        recipients=st.lists(recipient_names, min_size=1, max_size=3).map(tuple),
        attempts=st.integers(0, 3),
        next_attempt=st.sampled_from([100.0, 200.0, 300.0]),
    ),
)


@EXAMPLES
@given(ops=st.lists(op_strategy, max_size=20))
def test_replaying_the_compacted_ops_gives_the_same_state(ops: list[JournalOp]) -> None:
    messages = [stored(0, "a", "b", "c"), stored(1, "b", "d")]
    state = SpoolState()
    state.add_segment(SEGMENT, messages)
    state.apply(ops)
    compacted = state.compacted_ops()
    assert replay(messages, compacted) == replay(messages, ops)
    assert len(compacted) <= len(ops)
    # ...and through the journal's bytes too
    assert decode_journal(encode_ops(compacted)) == (compacted, [])


# ---------------------------------------------------------------------------
# The pure ring stays pure
# ---------------------------------------------------------------------------


def test_prefix_size_is_the_documented_24_bytes() -> None:
    assert PREFIX_SIZE == 24
