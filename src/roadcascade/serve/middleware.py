"""The ASGI middleware in front of the endpoints: what is checked before a handler runs (HTTP version, Host,
API key, body size and body-read time) and what every request is counted as in the metrics (including
client disconnects, 499, and requests cut by shutdown or an unexpected error)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import ServeMetrics
from .protocol import FIRST_BYTE

log = logging.getLogger("roadcascade.serve")
ROUTES = {
    "/v1/predict": "predict", "/v1/predict/batch": "predict_batch", "/streetvision": "streetvision",
    "/healthz": "healthz", "/readyz": "readyz", "/metrics": "metrics", "/": "dashboard", "/v1/stats": "stats",
    "/docs": "docs", "/openapi.json": "docs",
}


class BodyTooLarge(Exception):
    """The body grew past the limit while the app read it (answered 413)."""


class _BodyTimeout(Exception):
    pass


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _http_problem(scope: Scope) -> tuple[int, str, str] | None:
    """HTTP/0.9 (or an unknown version) and an HTTP/1.1 request without exactly one Host header are refused."""
    version = scope.get("http_version", "1.1")
    if version not in ("1.0", "1.1"):
        return 505, "bad_http_version", f"HTTP/{version[:8]} is not served; use HTTP/1.1"
    hosts = sum(1 for k, _ in scope.get("headers", []) if k == b"host")
    if version == "1.1" and hosts != 1:
        return 400, "bad_host", f"an HTTP/1.1 request needs exactly one Host header (got {hosts})"
    return None


OPEN_HEALTH = frozenset({"/healthz", "/readyz", "/metrics", "/v1/stats"})  # /v1/stats: the dashboard's numbers (counts only)


def _auth_problem(scope: Scope, api_key: bytes | None, open_health: bool) -> tuple[int, str, str] | None:
    """With a key, every path but the dashboard page, its static files and (when open) health and metrics needs
    ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (compared in constant time)."""
    if api_key is None:
        return None
    path = scope.get("path", "")
    if path == "/" or path.startswith("/static/") or (open_health and path in OPEN_HEALTH):
        return None
    given = b""
    for k, v in scope.get("headers", []):
        if k == b"x-api-key":
            given = v.strip()
        elif k == b"authorization" and v[:7].lower() == b"bearer ":
            given = v[7:].strip()
    if given and hmac.compare_digest(given, api_key):
        return None
    return 401, "unauthorized", "this server needs an API key: Authorization: Bearer <key> or X-API-Key: <key>"


class ServeMiddleware:
    """Arrival time, HTTP version and Host checks, body-size limit before the body is read, a body-read
    timeout (408), metrics for every request, client disconnects counted as such (499, never a 5xx, no
    traceback), a JSON 503 for a request cut by shutdown, and a JSON 500 for an unexpected exception (the
    server goes on)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, max_body: int, body_timeout_s: float = 30.0,
                 api_key: str | None = None, open_health: bool = True):
        self.app, self.metrics, self.max_body, self.body_timeout_s = app, metrics, max_body, body_timeout_s
        self.api_key, self.open_health = (api_key.encode() if api_key else None), open_health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        # from the request's first byte when the protocol saw it (protocol.py), else from now
        state["arrived"] = state.get(FIRST_BYTE) or time.monotonic()
        endpoint = ROUTES.get(scope.get("path", ""), "static" if scope.get("path", "").startswith("/static/") else "other")
        sent = {"status": 0}

        async def send_(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                sent["status"] = msg["status"]
                state["answered"] = True
            await send(msg)

        async def reply(status: int, reason: str, message: str) -> None:
            state["reason"] = reason
            body = json_bytes({"error": {"reason": reason, "message": message, "status": status}})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            if status == 503:
                headers.append((b"retry-after", b"1"))
            if status == 401:
                headers.append((b"www-authenticate", b'Bearer realm="roadcascade"'))
            await send_({"type": "http.response.start", "status": status, "headers": headers})
            await send_({"type": "http.response.body", "body": body})

        problem = _http_problem(scope) or _auth_problem(scope, self.api_key, self.open_health)
        try:
            length = _content_length(scope)
        except ValueError as e:  # a malformed Content-Length (uvicorn's parsers usually refuse it first)
            problem = problem or (400, "bad_request", str(e)[:200])
        if problem is not None:
            await reply(*problem)
            self.metrics.request(endpoint, problem[0], problem[1], time.perf_counter() - t0)
            return
        try:
            if length is not None and length > self.max_body:
                if length <= DRAIN_FACTOR * self.max_body:
                    await _drain(receive, length)
                await reply(413, "too_large", f"the body has {length:,} bytes; at most {self.max_body:,}")
                return
            await self.app(scope, self._receiver(receive, state, watch=endpoint in PREDICTION_ENDPOINTS), send_)
        except BodyTooLarge:
            if not sent["status"]:
                await _drain(receive, DRAIN_FACTOR * self.max_body - state.get("body_seen", 0))
                await reply(413, "too_large", f"the body is larger than {self.max_body:,} bytes")
        except _BodyTimeout:
            if not sent["status"]:
                await reply(408, "body_timeout", f"the request body took longer than {self.body_timeout_s:g} s")
        except ClientDisconnect:
            state["reason"] = "client_disconnect"
        except asyncio.CancelledError:  # uvicorn cancels what is still running when graceful shutdown ends
            if not sent["status"]:
                await reply(503, "shutting_down", "the server is shutting down; retry")
        except Exception as e:
            log.exception("unhandled error on %s", scope.get("path"))
            if not sent["status"]:
                await reply(500, "internal", f"internal error ({type(e).__name__}); the server goes on")
        finally:
            watcher = state.pop("watcher", None)
            if watcher is not None:
                watcher.cancel()
            gone = state.get("gone") or (not sent["status"] and state.get("reason") == "client_disconnect")
            status = CLIENT_CLOSED if gone else sent["status"] or 500
            self.metrics.request(endpoint, status, state.get("reason", ""), time.perf_counter() - t0,
                                 state.get("n_images", 0))

    def _receiver(self, receive: Receive, state: dict, watch: bool = False) -> Receive:
        """``receive`` with the body-size limit and the body-read deadline (only until the body is complete:
        later receives wait for a disconnect and must not time out). With ``watch``, once the body is read a
        task waits for the client to go away before its answer (counted as 499, not as the status sent into
        the void)."""
        end = time.monotonic() + self.body_timeout_s
        state["body_seen"] = 0
        done = False

        async def receive_() -> Message:
            nonlocal done
            if done:
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, end - time.monotonic()))
            except TimeoutError:
                raise _BodyTimeout() from None
            if msg["type"] == "http.request":
                state["body_seen"] += len(msg.get("body", b""))
                if state["body_seen"] > self.max_body:
                    raise BodyTooLarge()
                done = not msg.get("more_body", False)
                if done and watch:
                    state["watcher"] = asyncio.ensure_future(_watch_disconnect(receive, state))
            elif msg["type"] == "http.disconnect":
                state["reason"] = "client_disconnect"
            return msg

        return receive_


async def _watch_disconnect(receive: Receive, state: dict) -> None:
    msg = await receive()  # uvicorn answers http.disconnect when the client goes, or once the response is complete
    if msg["type"] == "http.disconnect" and not state.get("answered"):
        state["gone"], state["reason"] = True, "client_disconnect"


CLIENT_CLOSED = 499  # the client went away before its answer (nginx's code); never counted as a 5xx
PREDICTION_ENDPOINTS = frozenset({"predict", "predict_batch", "streetvision"})
DRAIN_FACTOR = 2  # read and discard up to 2x the body limit before a 413, so that the client can read it
DRAIN_SECONDS = 2.0


async def _drain(receive: Receive, limit: int) -> None:
    """Discard the rest of a refused body (bounded in bytes and time): a server that closes a connection
    with unread data makes the kernel reset it, and the client never sees the 413."""
    end = time.monotonic() + DRAIN_SECONDS
    got = 0
    while got <= limit:
        left = end - time.monotonic()
        if left <= 0:
            return
        try:
            msg = await asyncio.wait_for(receive(), left)
        except Exception:  # timeout, or the client went away
            return
        if msg["type"] != "http.request":
            return
        got += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                n = int(v)
            except ValueError:
                raise ValueError(f"Content-Length is not a number: {v[:40]!r}") from None
            if n < 0:
                raise ValueError("Content-Length is negative")
            return n
    return None
