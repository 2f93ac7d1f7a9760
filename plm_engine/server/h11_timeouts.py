"""uvicorn's h11 protocol with a request-head read timeout.

uvicorn times out idle keep-alive connections (timeout_keep_alive) and caps the size of a request head
(h11_max_incomplete_event_size), but a connection that opens and sends nothing, or trickles its head a
byte at a time (slowloris), holds a connection slot forever. This protocol gives every request head
`header_timeout` seconds from its first byte (or from the connection's opening) to arrive; past it the
connection gets a bare 408 and is closed. The body's timeout is the app's (middleware.Guard).
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def h11_protocol_with_header_timeout(header_timeout: float) -> type[H11Protocol]:
    """An H11Protocol subclass for uvicorn.Config(http=...) that enforces `header_timeout` seconds."""
    if not header_timeout > 0:
        raise ValueError(f"header_timeout must be > 0 seconds, got {header_timeout!r}")

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            self._head_timer = None
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # these bytes start (or continue) a request head
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is complete (or the connection failed)
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection whose request head took over %.1f s", header_timeout)
                self.transport.write(_TIMEOUT_RESPONSE)
                self.transport.close()

    return HeaderTimeoutH11Protocol
