"""The supervisor <-> worker control channel: one JSON object per line.

Sans-IO: :func:`encode` turns a message into bytes, :class:`MessageReader`
turns received bytes back into messages. The channel is a private
socketpair between two processes of the same service, but a worker that
crashed mid-write must still not wedge the supervisor, so lines are capped
and malformed ones raise :class:`ControlProtocolError`.

Messages (``op`` says which):

* supervisor -> worker: ``config`` (first message: ``text``, ``origin``,
  ``embedded``), ``listen`` (start serving: every worker is ready),
  ``reload`` (same fields and ``seq``), ``drain``, ``stop``;
* worker -> supervisor: ``ready`` (set up, not yet listening), ``reloaded``
  (``seq``, ``not_applied``), ``reload_failed`` (``seq``, ``error``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

#: A message line at most: a configuration with thousands of sources and
#: users is a few MiB of YAML.
MAX_LINE = 64 * 1024 * 1024

Message = dict[str, Any]


class ControlProtocolError(ValueError):
    """The peer sent something that is not a control message."""


def encode(op: str, **fields: Any) -> bytes:
    """One message as a line (JSON escapes newlines inside strings)."""
    return json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n"


class MessageReader:
    """Splits received bytes into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Message]:
        """Add received bytes; yield every message they complete."""
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            yield _decode(line)
        if len(self._buffer) > MAX_LINE:
            raise ControlProtocolError(f"control message over {MAX_LINE} bytes")

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished message are buffered (a peer that died mid-write)."""
        return bool(self._buffer)


def _decode(line: bytes) -> Message:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ControlProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ControlProtocolError("not a control message (no op)")
    return message
