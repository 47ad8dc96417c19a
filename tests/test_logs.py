"""Log output: one JSON object per line, each written whole."""

from __future__ import annotations

import io
import json

import structlog

from kumoproxy.config import LogConfig
from kumoproxy.logs import configure_logging


class RecordingStream(io.StringIO):
    """A text stream that remembers each write() call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_each_log_line_is_one_write_so_processes_sharing_stderr_cannot_interleave() -> None:
    # With workers, several processes write to the same stderr: a line
    # written in two parts (text, then newline) can be split by another's.
    stream = RecordingStream()
    configure_logging(LogConfig(format="json", level="info"), stream=stream)
    try:
        log = structlog.get_logger("kumoproxy")
        log.info("session", worker=1, detail="x" * 500)
        log.warning("session", worker=0)
    finally:
        structlog.reset_defaults()
    assert len(stream.writes) == 2
    for write in stream.writes:
        assert write.endswith("\n")
        assert write.count("\n") == 1
        assert json.loads(write)["event"] == "session"
