"""Connection-level guards uvicorn does not have: header size and count limits (431) and a header-read
timeout (408), on top of uvicorn's httptools protocol.

uvicorn (0.54) offers ``h11_max_incomplete_event_size`` (h11 only, answered with a plain 400),
``timeout_keep_alive`` (idle time *between* requests) and ``limit_concurrency`` (a 503 once that many
connections are open), but nothing bounds the time a client takes to send its headers, and with
httptools (the default when installed) a 100 MB header or 5,000 header lines are read and kept. This
subclass counts the bytes of the request line and headers as they arrive (httptools itself buffers an
unfinished header value in memory), counts header lines, and arms a timer from the first byte of a
request (or from the connection, for a client that sends nothing) until its headers are complete.

The body-read timeout lives in the ASGI middleware (``app.ServeMiddleware``), where the request's
status can still be a JSON 408 and is counted like any other request.

``server_config(app, ...)`` builds the ``uvicorn.Config`` with this protocol; ``roadcascade serve`` and
``testing.live_server`` both use it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

FIRST_BYTE = "first_byte"  # scope["state"] key: monotonic time of the request's first byte (set by the protocol)
RefuseHook = Callable[[int, str], None]  # (status, reason): count a refusal made before the app saw the request


def _no_hook(status: int, reason: str) -> None:
    pass


@dataclass(frozen=True)
class ConnLimits:
    """Per-connection limits (seconds, bytes).

    max_header_bytes: request line plus header lines of one request; more -> 431.
    max_headers: header lines of one request; more -> 431.
    header_timeout_s: from the connection (or the first byte of a request) to the end of its headers; -> 408.
    body_timeout_s: from the end of the headers to the end of the body (enforced by the ASGI middleware); -> 408.
    keep_alive_s: idle time between requests on a kept-alive connection (uvicorn's ``timeout_keep_alive``).
    max_connections: open connections; past it uvicorn answers 503 (``limit_concurrency``).
    """

    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: int = 30
    max_connections: int = 1024
    on_refuse: RefuseHook = field(default=_no_hook, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_headers", "max_connections", "keep_alive_s"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ConnLimits.{name} must be >= 1 (got {getattr(self, name)!r})")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ConnLimits.{name} must be > 0 (got {getattr(self, name)!r})")


class _Refuse(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header limits and a header-read timeout (set ``limits`` on a subclass)."""

    limits: ConnLimits = ConnLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request line and headers (or waiting for a first byte)
        self._head_bytes = 0
        self._n_headers = 0
        self._head_timer: asyncio.TimerHandle | None = None

    # timers ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, "header_timeout", f"the request headers took longer than {self.limits.header_timeout_s:g} s")

    # parsing --------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        try:
            if self._in_head and self._head_bytes + len(data) > self.limits.max_header_bytes:
                room = self.limits.max_header_bytes - self._head_bytes
                self._feed(data[:room])  # the headers may end inside the allowed part
                if self._in_head:
                    raise _Refuse(431, "headers_too_large", f"request line and headers exceed {self.limits.max_header_bytes:,} bytes")
                data = data[room:]
            elif self._in_head:
                self._head_bytes += len(data)
            self._feed(data)
        except _Refuse as e:
            self._refuse(e.status, e.reason, e.message)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as e:
            refused = e.__context__ if isinstance(e.__context__, _Refuse) else None
            if refused is not None:
                self._refuse(refused.status, refused.reason, refused.message)
            else:
                self._refuse(400, "bad_http", "invalid HTTP request")

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:  # a callback's _Refuse arrives wrapped
            ctx = e.__context__ or e.__cause__
            if isinstance(ctx, _Refuse):
                raise ctx from None
            raise

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # when the request's first byte was read: the app counts its deadline from here, not from when the
        # event loop got round to calling it (under load that can be a good part of the deadline)
        self.scope["state"][FIRST_BYTE] = time.monotonic()
        self._in_head, self._head_bytes, self._n_headers = True, 0, 0
        self._arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._n_headers += 1
        if self._n_headers > self.limits.max_headers:
            raise _Refuse(431, "too_many_headers", f"more than {self.limits.max_headers} header lines")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes, self._n_headers = True, 0, 0  # the next request's head (keep-alive timer idles first)

    # answers --------------------------------------------------------------------------------
    def _refuse(self, status: int, reason: str, message: str) -> None:
        """A JSON error and close; only while no request of this connection is being answered."""
        self._disarm_head_timer()
        busy = self.cycle is not None and not self.cycle.response_complete
        if not busy and not self.transport.is_closing():
            body = json.dumps({"error": {"reason": reason, "message": message, "status": status}}).encode()
            head = b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                             b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"])
            self.transport.write(head + body)
        self.transport.close()
        try:
            self.limits.on_refuse(status, reason)
        except Exception:  # noqa: BLE001 - counting must never take the connection handler down
            self.logger.exception("refusal hook failed")


def guarded_protocol(limits: ConnLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to ``limits`` (uvicorn instantiates the class it is given)."""
    return type("GuardedHttpTools", (GuardedHttpToolsProtocol,), {"limits": limits})


def server_config(app: Any, host: str, port: int, limits: ConnLimits | None = None, **kwargs: Any) -> Any:
    """``uvicorn.Config`` for ``app`` with the guarded protocol and the matching uvicorn options. When ``app``
    is ours (``app.state.server``), its limits and refusal counter are used unless ``limits`` is given."""
    import uvicorn

    server = getattr(getattr(app, "state", None), "server", None)
    if limits is None:
        limits = server.cfg.conn if server is not None else ConnLimits()
        if server is not None:
            limits = replace(limits, on_refuse=server.metrics.connection_refused)
    kwargs.setdefault("timeout_keep_alive", limits.keep_alive_s)
    kwargs.setdefault("limit_concurrency", limits.max_connections)
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(limits), **kwargs)
