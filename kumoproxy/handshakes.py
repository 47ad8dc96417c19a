"""Cap the number of sessions still negotiating, evicting the oldest.

A slow-loris flood opens connections and never finishes the handshake. The
handshake deadline bounds how long each one lives, but within that window a
flood could still crowd the process. When ``limits.handshakes`` negotiations
are in progress and another connection arrives, the *oldest* negotiation is
cut, not the newcomer: a real client finishes its handshake in milliseconds,
so under a flood the oldest entry is almost surely an attacker's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class HandshakeTracker:
    """The cancel scopes of negotiations in progress, oldest first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.evicted = 0
        self._active: dict[trio.CancelScope, None] = {}  # insertion-ordered set

    def __len__(self) -> int:
        return len(self._active)

    @contextmanager
    def track(self) -> Iterator[trio.CancelScope]:
        """Register a negotiation; its scope is cancelled if it gets evicted."""
        while len(self._active) >= self.limit:
            oldest = next(iter(self._active))
            del self._active[oldest]
            oldest.cancel()
            self.evicted += 1
        scope = trio.CancelScope()
        self._active[scope] = None
        try:
            with scope:
                yield scope
        finally:
            self._active.pop(scope, None)
