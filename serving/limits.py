"""The API's limits on what a client may send, so that no client holds the server.

* **Body-read deadline** (``limit_request``): a request's body must arrive within
  ``body_timeout_s`` of its headers; a stalled or slow-drip body gets a 408 (JSON) and the
  connection is closed. uvicorn has no such timeout of its own.
* **Body size** (``limit_request``): a body larger than ``max_body_bytes`` - declared in
  ``Content-Length`` or counted as it arrives - gets a 413 (JSON) and the connection is
  closed; what is beyond the limit is never buffered.
* **Header size** (the uvicorn protocol classes): the request line and headers together may
  hold at most uvicorn's ``h11_max_incomplete_event_size`` bytes; more gets a 431 and the
  connection is closed. h11 bounds only a head that is still incomplete and httptools not
  at all, so both protocol classes measure every head.
* **Head-read deadline** (the uvicorn protocol classes): a request's line and headers must
  arrive within ``$CTRSTREAM_API_HEAD_TIMEOUT_S`` (default 10 s) of the connection or of
  their first byte; an idle new connection or a stalled head gets a 408 and is closed.
  uvicorn waits for them forever (its keep-alive timeout runs only between requests).

Every refusal says what is wrong in the API's error shape (``{"detail", "errors"}``).
"""

from __future__ import annotations

import asyncio
import os
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
DEFAULT_HEAD_TIMEOUT_S = 10.0
# the head-read deadline reaches uvicorn's protocol objects (in every worker process, which
# uvicorn spawns) through the environment; ``ctrstream serve --head-timeout`` sets it
HEAD_TIMEOUT_ENV = "CTRSTREAM_API_HEAD_TIMEOUT_S"

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
    has_body = False  # a request without Content-Length or Transfer-Encoding has none
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > max_body_bytes:
                await _refuse(send, 413, _too_large(max_body_bytes))
                return
            has_body = has_body or value != b"0"
        elif name == b"transfer-encoding":
            has_body = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body_timeout_s
    body_done = not has_body
    started = refused = False
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


def _408_head(seconds: float) -> bytes:
    body = _ENCODE(
        {
            "detail": f"headers: the request line and headers did not arrive within {seconds:g} s",
            "errors": [{"loc": "headers", "type": "timeout", "msg": "not received in time"}],
        }
    )
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


def head_timeout_s() -> float:
    try:
        value = float(os.environ.get(HEAD_TIMEOUT_ENV, DEFAULT_HEAD_TIMEOUT_S))
    except ValueError:
        return DEFAULT_HEAD_TIMEOUT_S
    return value if value > 0 else DEFAULT_HEAD_TIMEOUT_S


class _HeadDeadline:
    """The head-read deadline of one connection (see module doc)."""

    transport: Any
    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            seconds = head_timeout_s()
            self._head_timer = asyncio.get_running_loop().call_later(
                seconds, self._head_timed_out, seconds
            )

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, seconds: float) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_408_head(seconds))
            self.transport.close()


def _header_limit(config: Any) -> int:
    return int(config.h11_max_incomplete_event_size or DEFAULT_MAX_HEADER_BYTES)


class LimitedHttpToolsProtocol(_HeadDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol with a size limit and a deadline on the request head."""

    _head_bytes = 0
    _head_too_large = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        self._arm_head_timer()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

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


class LimitedH11Protocol(_HeadDeadline, H11Protocol):
    """uvicorn's h11 protocol with the same limits. h11 refuses a head that is still
    incomplete beyond ``h11_max_incomplete_event_size`` (it bounds what is buffered), but
    not one that arrives whole in one read: each parsed request head is measured too."""

    _head_too_large = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_head_timer()
        next_event = self.conn.next_event
        limit = _header_limit(self.config)

        def measured_next_event() -> Any:
            event = next_event()
            if isinstance(event, h11.Request):
                self._disarm_head_timer()
                size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                if size > limit:
                    self._head_too_large = True
                    raise h11.RemoteProtocolError("request head too large", 431)
            return event

        self.conn.next_event = measured_next_event  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # bytes of a new request's head
            self._arm_head_timer()
        super().data_received(data)

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
    "DEFAULT_HEAD_TIMEOUT_S",
    "HEAD_TIMEOUT_ENV",
    "LimitedH11Protocol",
    "LimitedHttpToolsProtocol",
    "error_body",
    "http_protocol",
    "limit_request",
]
