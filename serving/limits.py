"""The API's limits on what a client may send, so that no client holds the server.

* **Body-read deadline** (``limit_request``): a request's body must arrive within
  ``body_timeout_s`` of its headers; a stalled or slow-drip body gets a 408 (JSON) and the
  connection is closed. uvicorn has no such timeout of its own.
* **Body size** (``limit_request``): a body larger than ``max_body_bytes`` - declared in
  ``Content-Length`` or counted as it arrives - gets a 413 (JSON) and the connection is
  closed; what is beyond the limit is never buffered.
* **Header size** (the uvicorn protocol classes): the request line and headers together may
  hold at most uvicorn's ``h11_max_incomplete_event_size`` bytes; more gets a 431 and the
  connection is closed. h11 enforces the size itself (this module only turns its 400 into a
  431); the httptools parser has no limit, so ``LimitedHttpToolsProtocol`` counts.

Every refusal says what is wrong in the API's error shape (``{"detail", "errors"}``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
import msgspec
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 500 candidates of ~100 bytes each fit many times over
DEFAULT_MAX_HEADER_BYTES = 16 * 1024

_DISCONNECT: Message = {"type": "http.disconnect"}
_ENCODE = msgspec.json.Encoder().encode


def error_body(status_type: str, msg: str) -> bytes:
    """The API's error shape for a refusal of the whole body or request."""
    return _ENCODE(
        {"detail": f"body: {msg}", "errors": [{"loc": "body", "type": status_type, "msg": msg}]}
    )


async def _refuse(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the rest of the body is not read: close
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> bytes:
    return error_body("too_large", f"larger than {limit} bytes; send at most {limit} bytes")


async def limit_request(
    app: ASGIApp,
    scope: Message,
    receive: Receive,
    send: Send,
    max_body_bytes: int,
    body_timeout_s: float,
) -> None:
    """Run ``app`` on one HTTP request with the body limits (see module doc). After a
    refusal the app reads ``http.disconnect`` and its own answer is dropped."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > max_body_bytes:
                await _refuse(send, 413, _too_large(max_body_bytes))
                return
            break
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body_timeout_s
    body_done = started = refused = False
    size = 0

    async def limited_receive() -> Message:
        nonlocal body_done, refused, size
        if refused:
            return _DISCONNECT
        if body_done:
            return await receive()  # after the body: waits for the client to leave
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            refused = True
            if not started:
                msg = f"not received within {body_timeout_s:g} s of the headers"
                await _refuse(send, 408, error_body("timeout", msg))
            return _DISCONNECT
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > max_body_bytes:
                refused = True
                if not started:
                    await _refuse(send, 413, _too_large(max_body_bytes))
                return _DISCONNECT
            body_done = not message.get("more_body", False)
        return message

    async def limited_send(message: Message) -> None:
        nonlocal started
        if refused:
            return
        if message["type"] == "http.response.start":
            started = True
            if not body_done:  # answered before the whole body came: close after it
                message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
        await send(message)

    try:
        await app(scope, limited_receive, limited_send)
    except Exception:
        if not refused:  # after a refusal the app may fail reading the body: answered already
            raise


# ------------------------------------------------------------------ header size (uvicorn)


def _431(limit: int) -> bytes:
    body = _ENCODE(
        {
            "detail": f"headers: the request line and headers exceed {limit} bytes",
            "errors": [
                {"loc": "headers", "type": "too_large", "msg": f"larger than {limit} bytes"}
            ],
        }
    )
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class _HeadTooLarge(Exception):
    pass


def _header_limit(config: Any) -> int:
    return int(config.h11_max_incomplete_event_size or DEFAULT_MAX_HEADER_BYTES)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on the request line and headers."""

    _head_bytes = 0
    _head_too_large = False

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > _header_limit(self.config):
            self._head_too_large = True
            raise _HeadTooLarge  # the parser stops; uvicorn answers with send_400_response

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            return super().send_400_response(msg)
        self.transport.write(_431(_header_limit(self.config)))
        self.transport.close()


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the same limit. h11 refuses a head that is still
    incomplete beyond ``h11_max_incomplete_event_size`` (it bounds what is buffered), but
    not one that arrives whole in one read: each parsed request head is measured too."""

    _head_too_large = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        next_event = self.conn.next_event
        limit = _header_limit(self.config)

        def measured_next_event() -> Any:
            event = next_event()
            if isinstance(event, h11.Request):
                size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                if size > limit:
                    self._head_too_large = True
                    raise h11.RemoteProtocolError("request head too large", 431)
            return event

        self.conn.next_event = measured_next_event  # type: ignore[method-assign]

    def send_400_response(self, msg: str) -> None:
        limit = _header_limit(self.config)
        if not (self._head_too_large or len(self.conn.trailing_data[0]) > limit):
            return super().send_400_response(msg)
        self.transport.write(_431(limit))
        self.transport.close()


def http_protocol(name: str) -> type:
    """The protocol class for uvicorn's ``http`` option: ``auto`` (httptools when installed),
    ``httptools`` or ``h11``, each with the header limit."""
    if name == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            name = "h11"
        else:
            name = "httptools"
    return LimitedHttpToolsProtocol if name == "httptools" else LimitedH11Protocol


__all__ = [
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "LimitedH11Protocol",
    "LimitedHttpToolsProtocol",
    "error_body",
    "http_protocol",
    "limit_request",
]
