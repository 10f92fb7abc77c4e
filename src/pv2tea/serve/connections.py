"""Connection limits of the HTTP service under uvicorn: slow clients and the number of open connections.

uvicorn closes a connection idle between requests after ``timeout_keep_alive`` seconds and answers 503 to a request
arriving beyond ``limit_concurrency`` open connections, but it waits for a request's headers without end: a client
that opens a connection and sends its headers a byte at a time (or never) holds it forever. The protocol of
:func:`header_timeout_protocol` closes such a connection, after a 408, once ``header_timeout`` seconds have passed
since it opened (or since its previous answer) without a complete request head. The body's deadline is the ASGI
middleware's (``Limits.body_timeout``, :class:`pv2tea.serve.server._Guard`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

from pv2tea.extras import missing_extra

try:
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as exc:
    raise missing_extra("serve", "serve", exc) from exc

from pv2tea.serve.limits import Limits

__all__ = ["header_timeout_protocol", "is_loopback", "uvicorn_options"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a ``--host`` value) listens on this machine only: ``localhost`` or a loopback address
    (127.0.0.0/8, ::1). Any other name or address, ``0.0.0.0`` and ``::`` among them, may be reached from elsewhere."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _timeout_answer(header_timeout: float) -> bytes:
    body = json.dumps(
        {"detail": f"the request headers did not arrive within {header_timeout:g} s (--header-timeout)"}
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def header_timeout_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol closing a connection whose request head is not complete within ``header_timeout``
    seconds of its opening or of its previous answer."""
    answer = _timeout_answer(header_timeout)

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _cycle_seen: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _waiting_for_a_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._waiting_for_a_head() and not self.transport.is_closing():
                self.logger.info("closing a connection: no request head within %g s", header_timeout)
                self.transport.write(answer)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self.cycle is not self._cycle_seen:  # a request head came in
                self._cycle_seen = self.cycle
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._waiting_for_a_head():  # (not a pipelined request's)
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_options(limits: Limits) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` that enforce ``limits``' connection limits."""
    return {"http": header_timeout_protocol(limits.header_timeout), "limit_concurrency": limits.max_connections}
