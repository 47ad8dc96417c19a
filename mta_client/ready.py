"""Ready queues: the items waiting for a connection on one egress path.

An egress path is (source, site): one pool entry and one destination site,
the unit traffic shaping counts (KumoMTA's ``source->site`` ready queue).
The dispatcher appends items whose source it has chosen; connections on the
path take them, several per connection, oldest first. Items a connection
took and did not attempt (the connection broke first) go back to the front.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from mta_client.config import PoolEntry
from mta_client.mx import Destination
from mta_client.scheduler import WorkItem


@dataclass(slots=True)
class ReadyQueue:
    """One path's waiting items and its connection bookkeeping."""

    entry: PoolEntry
    destination: Destination
    items: deque[WorkItem] = field(default_factory=deque)
    #: Connections open or opening on this path, from this node.
    connections: int = 0
    #: Set when items arrive or a connection ends; replaced once set.
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def key(self) -> tuple[str, str]:
        return (str(self.entry.source), self.destination.site)

    def push(self, items: Iterable[WorkItem]) -> None:
        self.items.extend(items)
        self._wake()

    def push_front(self, items: list[WorkItem]) -> None:
        self.items.extendleft(reversed(items))
        self._wake()

    def take(self, limit: int) -> list[WorkItem]:
        taken: list[WorkItem] = []
        while self.items and len(taken) < limit:
            taken.append(self.items.popleft())
        return taken

    def take_all(self) -> list[WorkItem]:
        taken = list(self.items)
        self.items.clear()
        return taken

    async def wait_for_items(self) -> None:
        """Return when the queue has items (at once if it has)."""
        while not self.items:
            await self.changed()

    async def changed(self) -> None:
        """Return at the next arrival of items or :meth:`notify`."""
        await self._changed.wait()

    def notify(self) -> None:
        """Wake everything waiting in :meth:`changed` (a connection ended)."""
        self._changed.set()
        self._changed = trio.Event()

    def _wake(self) -> None:
        if self.items:
            self.notify()
