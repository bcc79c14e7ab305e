"""The API's body limits as ASGI (no server): a stalled body is a 408, a large one a 413,
and the application never sees what is beyond them. The servers' side (sockets, header
size): tests/integration/test_api_contract.py."""

from __future__ import annotations

import asyncio
import json

from ctrstream.cli import serve
from ctrstream.serving import limits


def _run(scope_headers, messages, *, max_body=100, timeout_s=0.2, stall=False):
    """Run ``limit_request`` around an app that reads the whole body and answers 200."""
    sent: list[dict] = []
    seen: list[bytes] = []
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        more = True
        while more:
            m = await receive()
            if m["type"] == "http.disconnect":
                return
            seen.append(m.get("body", b""))
            more = m.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "headers": scope_headers}
    asyncio.run(limits.limit_request(app, scope, receive, send, max_body, timeout_s))
    return sent, seen


def _status(sent):
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


CHUNKED = [(b"transfer-encoding", b"chunked")]


def test_a_whole_body_within_the_limits_reaches_the_app():
    sent, seen = _run([(b"content-length", b"100")], [{"type": "http.request", "body": b"x" * 100}])
    assert _status(sent)[0] == 200 and seen == [b"x" * 100]
    assert b"connection" not in _status(sent)[1]  # keep-alive stays possible


def test_a_request_without_a_body_keeps_the_connection():
    async def app(scope, receive, send):  # a GET route: never reads the body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)

    scope = {"type": "http", "headers": [(b"host", b"x")]}
    asyncio.run(limits.limit_request(app, scope, receive, send, 100, 0.2))
    assert _status(sent) == (200, {})
    # an answer sent before a declared body came closes the connection after it
    sent.clear()
    scope = {"type": "http", "headers": [(b"content-length", b"5")]}
    asyncio.run(limits.limit_request(app, scope, receive, send, 100, 0.2))
    assert _status(sent)[1] == {b"connection": b"close"}


def test_a_stalled_body_is_a_408_that_closes_the_connection():
    sent, seen = _run(
        CHUNKED, [{"type": "http.request", "body": b"{", "more_body": True}], stall=True
    )
    status, headers = _status(sent)
    assert status == 408 and headers[b"connection"] == b"close"
    body = json.loads(sent[-1]["body"])
    assert body["errors"][0]["type"] == "timeout" and "0.2 s" in body["detail"]
    assert len([m for m in sent if m["type"] == "http.response.start"]) == 1  # app's dropped


def test_a_body_over_the_limit_is_a_413_declared_or_counted():
    declared, seen = _run([(b"content-length", b"101")], [])
    assert _status(declared)[0] == 413 and seen == []
    chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 2
    counted, seen = _run(CHUNKED, chunks)
    status, headers = _status(counted)
    assert status == 413 and headers[b"connection"] == b"close"
    assert seen == [b"x" * 60]  # the chunk that crossed the limit never reached the app
    assert "larger than 100 bytes" in json.loads(counted[-1]["body"])["detail"]


def test_the_cli_defaults_are_the_limits_defaults():
    assert serve.BODY_TIMEOUT_S == limits.DEFAULT_BODY_TIMEOUT_S
    assert serve.MAX_BODY_BYTES == limits.DEFAULT_MAX_BODY_BYTES
    assert serve.MAX_HEADER_BYTES == limits.DEFAULT_MAX_HEADER_BYTES
    assert limits.http_protocol("h11") is limits.LimitedH11Protocol
    assert limits.http_protocol("httptools") is limits.LimitedHttpToolsProtocol
