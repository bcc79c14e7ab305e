"""A minimal pipelined Redis writer for the speed layer's hot path.

redis-py spends ~30 us of Python per pipelined command (argument packing, response parsing
objects); the features flow writes one command per changed cell per flush, so it renders
RESP itself, vectorized (:func:`render`), and parses the replies with ``hiredis.Reader``
(C), one socket write and one read loop per flush. Errors in any reply raise.
"""

from __future__ import annotations

import select
import socket

import hiredis
import numpy as np

from ctrstream.config import Settings


def _cmd(args) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


def hello_commands(password: str | None = None, db: int | None = 0,
                   username: str | None = None) -> list[tuple]:
    """The commands that open a raw Redis connection (``AUTH``, ``SELECT``) - shared by this
    pipeline, the API's EVALSHA connection and the cache's invalidation channel."""
    out: list[tuple] = []
    if password:
        out.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        out.append(("SELECT", int(db)))
    return out


class _Replies:
    """Replies parsed one by one (hiredis); kept when ``collect``; the first error raises at
    the end (after every reply is read, so the connection stays in step)."""

    def __init__(self, collect: bool):
        self.reader = hiredis.Reader()
        self.collect = collect
        self.got = 0
        self.replies: list = []
        self.error = None

    def feed(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError) and self.error is None:
                self.error = reply
            if self.collect:
                self.replies.append(reply)
            self.got += 1

    def result(self, n_replies: int) -> list:
        if self.error is not None:
            raise RuntimeError(f"redis replied with an error: {self.error}")
        return self.replies


class _LineCounter:
    """One-line replies counted by their line ends; the first error line (``-...``, possibly
    split across reads) is kept for the message."""

    def __init__(self):
        self.got = 0
        self.at_line_start = True
        self.error: bytearray | None = None
        self.error_done = False

    def feed(self, data: bytes) -> None:
        self.got += data.count(b"\n")
        if self.error is not None and not self.error_done:
            end = data.find(b"\n")
            self.error += data if end < 0 else data[:end]
            self.error_done = end >= 0
        elif self.error is None:
            k = 0 if self.at_line_start and data[:1] == b"-" else data.find(b"\n-")
            if k >= 0:
                k += 0 if data[k:k + 1] == b"-" else 1
                end = data.find(b"\n", k)
                self.error = bytearray(data[k:] if end < 0 else data[k:end])
                self.error_done = end >= 0
        self.at_line_start = data.endswith(b"\n")

    def result(self, n_replies: int) -> list:
        if self.got > n_replies:
            raise RuntimeError(f"redis sent {self.got} replies to {n_replies} one-line commands: "
                               "a command with a multi-line reply was sent as one-line")
        if self.error is not None:
            text = bytes(self.error[1:]).decode(errors="replace").strip()
            raise RuntimeError(f"redis replied with an error: {text}")
        return []


class RespPipeline:
    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.settings = settings
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def _connect(self) -> None:
        rs = self.settings.redis
        s = socket.create_connection((rs.host, rs.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        hello = [_cmd(c) for c in hello_commands(rs.password, rs.db)]
        if hello:
            self._roundtrip(b"".join(hello), len(hello))

    def _roundtrip(self, payload: bytes, n_replies: int, collect: bool = True,
                   one_line: bool = False) -> list:
        """Send ``payload`` while reading the replies as they come: a flush can be hundreds of
        MB of commands, and writing it all before reading would stall once both directions'
        socket buffers are full. ``timeout`` bounds the time without any progress.

        ``one_line``: every reply is one line (an integer, a status or an error - HSET,
        PEXPIRE, HDEL): replies are counted by their line ends in C (``bytes.count``) instead
        of being parsed one by one (~8 % of the features job's CPU); an error line still
        raises, with its text."""
        sock = self.sock
        view = memoryview(payload)
        sent = 0
        replies = _LineCounter() if one_line else _Replies(collect)
        while replies.got < n_replies:
            writing = sent < len(view)
            readable, writable, _ = select.select([sock], [sock] if writing else [], [], self.timeout)
            if not readable and not writable:
                raise TimeoutError(f"redis made no progress for {self.timeout:.0f} s ({replies.got} "
                                   f"of {n_replies} replies, {sent} of {len(view)} bytes sent)")
            if writable:
                sent += sock.send(view[sent:sent + (1 << 20)])
            if not readable:
                continue
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the connection")
            replies.feed(data)
        return replies.result(n_replies)

    def execute(self, commands: list[bytes]) -> None:
        """Send pre-encoded commands (see :func:`encode`) and wait for every reply."""
        self.execute_replies(commands)

    def execute_raw(self, payload: bytes, n_commands: int, one_line: bool = False) -> None:
        """Send ``n_commands`` already concatenated RESP commands; wait for every reply.
        ``one_line``: every command has a one-line reply (see :meth:`_roundtrip`)."""
        self._send(payload, n_commands, collect=False, one_line=one_line)

    def execute_replies(self, commands: list[bytes]) -> list:
        """Like :meth:`execute`, returning the replies (raises on the first error reply)."""
        return self._send(b"".join(commands), len(commands), collect=True)

    def _send(self, payload: bytes, n_commands: int, collect: bool, one_line: bool = False) -> list:
        """One round trip, reconnecting once on a broken connection (the speed layer's and
        the batch views' writes are absolute values: sending them twice is harmless)."""
        if not n_commands:
            return []
        for attempt in (0, 1):
            try:
                if self.sock is None:
                    self._connect()
                return self._roundtrip(payload, n_commands, collect, one_line)
            except (OSError, ConnectionError):
                self.close()
                if attempt:
                    raise
        return []

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


def encode(args) -> bytes:
    """One command in RESP (hiredis' C packer; str, bytes and int arguments)."""
    return hiredis.pack_command(tuple(args))


# --------------------------------------------------------------------------- vectorized RESP
# The features flow writes hundreds of thousands of hash cells per second. Building one RESP
# command per cell in Python costs several microseconds each (the old path); a Lua script
# that receives packed numbers and builds the commands server-side moves that work into the
# single Redis thread, where it measured ~6-7 us per cell against ~3 us for native commands
# (HSET 1.6 us + PEXPIRE 1.5 us, `INFO commandstats`). So the commands stay native and are
# *rendered with numpy*: every command is a row of segments - constant bytes or non-negative
# integers printed in decimal - laid out in one uint8 buffer with a handful of array
# operations per segment, independent of the number of rows.


def _ndigits(x: np.ndarray) -> np.ndarray:
    n = np.ones(len(x), np.int64)
    p = 10
    while True:
        more = x >= p
        if not more.any():
            return n
        n += more
        p *= 10


_POW10 = 10 ** np.arange(19, dtype=np.int64)


def render(segments: list, n: int) -> bytes:
    """Concatenate, row by row, ``segments`` (each ``bytes`` - the same for every row - or an
    int64 array of ``n`` non-negative integers, written in decimal) into one byte string."""
    lens = []
    for seg in segments:
        lens.append(len(seg) if isinstance(seg, bytes) else _ndigits(seg))
    row_len = np.zeros(n, np.int64)
    for ln in lens:
        row_len += ln
    start = np.zeros(n, np.int64)
    np.cumsum(row_len[:-1], out=start[1:])
    buf = np.empty(int(row_len.sum()), np.uint8)
    pos = start.copy()
    for seg, ln in zip(segments, lens):
        if isinstance(seg, bytes):
            if len(seg) == 1:
                buf[pos] = seg[0]
            else:
                c = np.frombuffer(seg, np.uint8)
                buf[(pos[:, None] + np.arange(len(seg))).ravel()] = np.broadcast_to(c, (n, len(c))).ravel()
        else:
            w = int(ln.max())
            k = np.arange(w)
            digits = (seg[:, None] // _POW10[:w]) % 10 + 48
            live = k < ln[:, None]
            buf[((pos + ln - 1)[:, None] - k)[live]] = digits[live]
        pos += ln
    return buf.tobytes()


bulk_len = _ndigits  # the RESP bulk-string length of non-negative integers in decimal


