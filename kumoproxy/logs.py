"""structlog set-up for the ``kumoproxy`` command (the library never configures logging).

JSON lines on stderr for production (stdout stays free for command output
such as ``check-config``); a console renderer for people at a terminal.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from kumoproxy.config import LogConfig


def configure_logging(config: LogConfig, *, stream: TextIO | None = None) -> None:
    """Route structlog to ``stream`` (stderr) in the configured format and level."""
    renderer: structlog.typing.Processor
    if config.format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[config.level.upper()]
        ),
        # One write() per line: with workers several processes share stderr,
        # and print() writes the line and its newline separately, so lines
        # could interleave mid-way.
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
