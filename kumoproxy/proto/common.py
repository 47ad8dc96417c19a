"""What every sans-IO machine in this project shares.

``NEED_DATA`` is h11's idiom: ``next_event()`` returns it when the bytes
received so far do not complete a message. One sentinel serves every
protocol (SOCKS5 here, SMTP in ``mta_client``), so a shell can test for it
the same way whatever machine it drives.
"""

from __future__ import annotations

from typing import ClassVar, Final, final


@final
class NeedData:
    """Sentinel returned by ``next_event`` when more bytes are needed.

    There is one instance, :data:`NEED_DATA`; ``NeedData()`` returns it.
    """

    __slots__ = ()
    _instance: ClassVar[NeedData | None] = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
"""The :class:`NeedData` singleton."""
