"""The sender's wall clock, anchored to trio's clock.

Spool records carry wall-clock times (when a message was received, when it
is next due), because they outlive the process. The scheduler sleeps with
trio. :class:`WallClock` joins the two: it reads the wall clock once, when it
is made, and from then on advances with ``trio.current_time()``. Under
``trio.testing.MockClock`` the whole sender therefore runs on virtual time,
and in production a wall-clock step (NTP) cannot make the scheduler sleep
for hours or spin.
"""

from __future__ import annotations

import time

import trio


class WallClock:
    """UNIX-epoch seconds that advance with trio's clock. Make it inside ``trio.run``."""

    __slots__ = ("_offset",)

    def __init__(self, epoch: float | None = None) -> None:
        start = time.time() if epoch is None else epoch
        self._offset = start - trio.current_time()

    def now(self) -> float:
        """The current wall-clock time, in seconds since the epoch."""
        return self._offset + trio.current_time()

    def to_trio(self, wall: float) -> float:
        """The trio-clock time at which the wall clock reads ``wall``."""
        return wall - self._offset
