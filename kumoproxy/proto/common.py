"""What every sans-IO machine in this project shares.

``NEED_DATA`` is h11's idiom: ``next_event()`` returns it when the bytes
received so far do not complete a message. One sentinel serves every
protocol (SOCKS5 here, SMTP in ``mta_client``), so a shell can test for it
the same way whatever machine it drives.
"""

from __future__ import annotations

from typing import ClassVar, Final, NoReturn, final


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


class BufferedReceiver:
    """h11's ``receive_data`` contract, shared by every machine.

    Bytes accumulate in ``_buffer``; ``b""`` marks EOF; data after EOF is
    the caller's bug, reported through the machine's own :meth:`_misuse`
    (which raises that package's LocalProtocolError and enters ERROR).
    """

    _buffer: bytearray
    _eof: bool

    def _misuse(self, message: str) -> NoReturn:
        raise NotImplementedError

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means the peer closed (EOF)."""
        if not data:
            self._eof = True
            return
        if self._eof:
            self._misuse("received data after EOF")
        self._buffer += data


def format_endpoint(host: object, port: int) -> str:
    """``ip:port`` as logs and messages write it; IPv6 in brackets (``[::1]:25``).

    ``host`` is an address or a name; only an IPv6 address contains ``:``.
    """
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
