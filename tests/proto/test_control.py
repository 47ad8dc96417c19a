"""The supervisor <-> worker control channel codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoproxy.proto import control


def test_a_config_message_survives_newlines_in_its_text() -> None:
    text = "listeners:\n  - listen: x\n"
    data = control.encode("config", text=text, origin="/etc/kumoproxy.yaml", embedded=False)
    assert data.count(b"\n") == 1
    assert list(control.MessageReader().feed(data)) == [
        {"op": "config", "text": text, "origin": "/etc/kumoproxy.yaml", "embedded": False}
    ]


@given(st.lists(st.text(), min_size=1, max_size=5), st.integers(min_value=1, max_value=40))
def test_messages_split_anywhere_come_out_whole_and_in_order(texts: list[str], chunk: int) -> None:
    data = b"".join(control.encode("reload", seq=i, text=t) for i, t in enumerate(texts))
    reader = control.MessageReader()
    out: list[control.Message] = []
    for start in range(0, len(data), chunk):
        out.extend(reader.feed(data[start : start + chunk]))
    assert [(m["seq"], m["text"]) for m in out] == list(enumerate(texts))
    assert not reader.pending


def test_a_message_cut_off_mid_line_stays_pending() -> None:
    reader = control.MessageReader()
    assert list(reader.feed(control.encode("ready")[:-3])) == []
    assert reader.pending


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "no op"),
        (b'{"seq": 1}\n', "no op"),
        (b'{"op": 7}\n', "no op"),
    ],
)
def test_garbage_is_a_protocol_error(line: bytes, error: str) -> None:
    with pytest.raises(control.ControlProtocolError, match=error):
        list(control.MessageReader().feed(line))


def test_a_line_past_the_cap_is_refused_before_it_grows_further(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(control, "MAX_LINE", 16)
    with pytest.raises(control.ControlProtocolError, match="over 16 bytes"):
        list(control.MessageReader().feed(b'{"op": "' + b"x" * 20))
