"""The messages of the load generator's small HTTP/1.1 client (``loadgen.Connection``) and of its fuzz cases."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HttpRequest:
    method: str
    path: str
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    kind: str = "good"
    content_length: int | None = None  # None: the body's true length; else declared as given (may lie)
    chunked: bool = False  # send the body with Transfer-Encoding: chunked
    raw: bytes | None = None  # send these exact bytes instead (malformed HTTP)


@dataclass
class HttpResponse:
    status: int  # 0 when no response came (connection error, timeout)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""
