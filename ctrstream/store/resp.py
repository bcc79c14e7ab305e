"""Generic pipelined RESP over one blocking connection, and vectorized RESP rendering.

redis-py spends ~30 us of Python per pipelined command (argument packing, response parsing
objects); the speed view's writer sends one command per changed hash per flush, the batch
view's writer millions of ``HSET``s, reconciliation millions of ``HGETALL``s. So these paths
send pre-rendered RESP (:func:`encode`, hiredis' C packer, or :func:`render`, numpy) through
a :class:`RespPipeline` - one socket write and one read loop per batch of commands, replies
parsed by ``hiredis.Reader`` (C) or only counted - and :class:`BackgroundPipeline` drives one
from its own thread. The connection itself (socket, handshake) is
:class:`ctrstream.store.connection.RespSocket`. Nothing here knows a key layout: the
modules of :mod:`ctrstream.store` that own one (``speed_view``, ``batch_view``) build the
commands.
"""

from __future__ import annotations

import random
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import hiredis
import numpy as np

from ctrstream.config import RedisSettings, Settings
from ctrstream.store.connection import RedisLoadingError, RespSocket, pack


class _Replies:
    """Replies parsed one by one (hiredis); kept when ``collect``; the first error raises at
    the end (after every reply is read, so the connection stays in step)."""

    def __init__(self, collect: bool) -> None:
        self.reader = hiredis.Reader()
        self.collect = collect
        self.got = 0
        self.replies: list[Any] = []
        self.error: hiredis.ReplyError | None = None

    def feed(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError) and self.error is None:
                self.error = reply
            if self.collect:
                self.replies.append(reply)
            self.got += 1

    def result(self, n_replies: int) -> list[Any]:
        if self.error is not None:
            if str(self.error).startswith("LOADING"):
                raise RedisLoadingError(f"redis is loading its data set: {self.error}")
            raise RuntimeError(f"redis replied with an error: {self.error}")
        return self.replies


class _LineCounter:
    """One-line replies counted by their line ends; the first error line (``-...``, possibly
    split across reads) is kept for the message."""

    def __init__(self) -> None:
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
                k += 0 if data[k : k + 1] == b"-" else 1
                end = data.find(b"\n", k)
                self.error = bytearray(data[k:] if end < 0 else data[k:end])
                self.error_done = end >= 0
        self.at_line_start = data.endswith(b"\n")

    def result(self, n_replies: int) -> list[Any]:
        if self.got > n_replies:
            raise RuntimeError(
                f"redis sent {self.got} replies to {n_replies} one-line commands: "
                "a command with a multi-line reply was sent as one-line"
            )
        if self.error is not None:
            text = bytes(self.error[1:]).decode(errors="replace").strip()
            if text.startswith("LOADING"):
                raise RedisLoadingError(f"redis is loading its data set: {text}")
            raise RuntimeError(f"redis replied with an error: {text}")
        return []


RedisTarget = Settings | RedisSettings | Mapping[str, Any]
"""Where a raw connection goes: the settings, or a redis-py client's
``connection_pool.connection_kwargs`` (:meth:`RespPipeline.of_client`)."""


def _opener(target: RedisTarget, timeout: float) -> Callable[[], RespSocket]:
    if isinstance(target, (Settings, RedisSettings)):
        return lambda: RespSocket.from_settings(target, timeout=timeout)
    kw = dict(target)
    return lambda: RespSocket.from_kwargs(kw, timeout=timeout)


class RespPipeline:
    """Batches of pre-rendered commands over one :class:`RespSocket`, connected on first use
    (and again once after a broken connection). ``on_connect`` runs on every new connection
    before anything is sent on it (an :class:`OSError` from it counts as a broken
    connection)."""

    def __init__(
        self,
        target: RedisTarget,
        timeout: float = 30.0,
        on_connect: Callable[[RespSocket], None] | None = None,
    ) -> None:
        self.timeout = timeout
        self._open = _opener(target, timeout)
        self.on_connect = on_connect
        self.conn: RespSocket | None = None

    @classmethod
    def of_client(cls, client: Any, timeout: float = 30.0) -> RespPipeline:
        """A pipeline to the server and database of a redis-py client."""
        return cls(client.connection_pool.connection_kwargs, timeout)

    def _roundtrip(
        self, payload: bytes, n_replies: int, collect: bool = True, one_line: bool = False
    ) -> list[Any]:
        """Send ``payload`` while reading the replies as they come: a flush can be hundreds of
        MB of commands, and writing it all before reading would stall once both directions'
        socket buffers are full. ``timeout`` bounds the time without any progress.

        ``one_line``: every reply is one line (an integer, a status or an error - HSET,
        PEXPIRE, HDEL): replies are counted by their line ends in C (``bytes.count``) instead
        of being parsed one by one (~8 % of the features job's CPU); an error line still
        raises, with its text."""
        assert self.conn is not None
        sock = self.conn.sock
        view = memoryview(payload)
        sent = 0
        replies: _Replies | _LineCounter = _LineCounter() if one_line else _Replies(collect)
        while replies.got < n_replies:
            writing = sent < len(view)
            readable, writable, _ = select.select(
                [sock], [sock] if writing else [], [], self.timeout
            )
            if not readable and not writable:
                raise TimeoutError(
                    f"redis made no progress for {self.timeout:.0f} s ({replies.got} "
                    f"of {n_replies} replies, {sent} of {len(view)} bytes sent)"
                )
            if writable:
                sent += sock.send(view[sent : sent + (1 << 20)])
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

    def execute_replies(self, commands: list[bytes]) -> list[Any]:
        """Like :meth:`execute`, returning the replies (raises on the first error reply)."""
        return self._send(b"".join(commands), len(commands), collect=True)

    def _send(
        self, payload: bytes, n_commands: int, collect: bool, one_line: bool = False
    ) -> list[Any]:
        """One round trip, reconnecting once on a broken connection (the speed layer's and
        the batch views' writes are absolute values: sending them twice is harmless)."""
        if not n_commands:
            return []
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = self._open()
                    if self.on_connect is not None:
                        try:
                            self.on_connect(self.conn)
                        except BaseException:
                            self.close()  # the next call connects (and checks) again
                            raise
                return self._roundtrip(payload, n_commands, collect, one_line)
            except (OSError, ConnectionError):
                self.close()
                if attempt:
                    raise
        return []

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


@dataclass(frozen=True)
class Backoff:
    """How a writer waits between attempts while Redis cannot be reached: ``first_s``, then
    doubling up to ``max_s``, each wait drawn in [half, full] (jitter: many writers do not
    come back in step). Each attempt itself is bounded by the connection's timeout."""

    first_s: float = 0.05
    max_s: float = 2.0

    def delay(self, attempt: int) -> float:
        """The wait before attempt ``attempt + 1`` (``attempt`` >= 1 attempts failed)."""
        full = min(self.max_s, self.first_s * 2 ** min(attempt - 1, 30))
        return full * (0.5 + 0.5 * random.random())


RetryHook = Callable[[int, BaseException, float], None]
"""Called before each wait of a retry: (failed attempts so far, the error, seconds to wait)."""

T = TypeVar("T")


def with_backoff(
    attempt: Callable[[], T], backoff: Backoff | None, on_retry: RetryHook | None = None
) -> T:
    """``attempt()``, repeated after ``backoff``'s waits while Redis cannot be reached (a
    refused, reset or timed-out connection, or a Redis still loading its data: every
    ``OSError``); without a ``backoff`` the first error is raised."""
    failed = 0
    while True:
        try:
            return attempt()
        except OSError as e:  # ConnectionError, TimeoutError, RedisLoadingError included
            if backoff is None:
                raise
            failed += 1
            wait = backoff.delay(failed)
            if on_retry is not None:
                on_retry(failed, e, wait)
            time.sleep(wait)


class BackgroundPipeline:
    """A :class:`RespPipeline` driven by its own thread, so that the caller computes the next
    batch while Redis executes this one (the features job and Redis then use two cores
    instead of taking turns on one: measured as the job's biggest wait).

    :meth:`submit` queues a payload and returns; it blocks only while ``max_pending``
    payloads are already queued or in flight (back-pressure: a Redis slower than the job
    slows the job, and the backlog stays in Kafka). :meth:`drain` returns once every
    submitted payload has been acknowledged - the features flow calls it before each state
    snapshot, so a snapshot never records as written a cell Redis has not acknowledged.
    ``done`` callbacks run in the writer thread after the acknowledgement.

    Without ``backoff`` the first error (after the pipeline's own reconnect-once) is raised
    by the next :meth:`submit` or :meth:`drain`, and nothing is sent after it. With
    ``backoff``, a lost connection (refused, reset, timed out, or a Redis still loading its
    data after a restart) is not an error: the payload is sent again after a wait, for as
    long as it takes (``on_retry`` is told of every failed attempt), and the payloads behind
    it wait in order - none is dropped, none acknowledged before Redis answered it. Sending
    a payload again must be harmless (absolute values). An error reply of Redis still
    raises. ``on_connect``: see :class:`RespPipeline`."""

    def __init__(
        self,
        target: RedisTarget,
        max_pending: int = 2,
        timeout: float = 30.0,
        backoff: Backoff | None = None,
        on_retry: RetryHook | None = None,
        on_connect: Callable[[RespSocket], None] | None = None,
    ) -> None:
        self.pipe = RespPipeline(target, timeout, on_connect=on_connect)
        self.max_pending = max_pending
        self.backoff = backoff
        self.on_retry = on_retry
        self.cv = threading.Condition()
        self.queue: deque[tuple[bytes, int, bool, Callable[[], None] | None]] = deque()
        self.pending = 0  # submitted, not yet acknowledged
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="ctrstream-redis-writer", daemon=True)
        self.thread.start()

    def submit(
        self,
        payload: bytes,
        n_commands: int,
        one_line: bool = False,
        done: Callable[[], None] | None = None,
    ) -> None:
        with self.cv:
            while self.pending >= self.max_pending and self.error is None:
                self.cv.wait()
            self._raise()
            if self.closed:
                raise RuntimeError("the Redis writer is closed")
            self.queue.append((payload, n_commands, one_line, done))
            self.pending += 1
            self.cv.notify_all()

    def drain(self) -> None:
        with self.cv:
            while self.pending and self.error is None:
                self.cv.wait()
            self._raise()

    def close(self) -> None:
        """Wait for what was submitted, then stop the thread and close the connection."""
        try:
            self.drain()
        finally:
            with self.cv:
                self.closed = True
                self.cv.notify_all()
            self.thread.join()
            self.pipe.close()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing to Redis failed: {self.error}") from self.error

    def _execute(self, payload: bytes, n: int, one_line: bool) -> None:
        """Send one payload until Redis acknowledged it (retrying a lost connection when
        there is a ``backoff``)."""
        with_backoff(
            lambda: self.pipe.execute_raw(payload, n, one_line=one_line),
            self.backoff,
            self.on_retry,
        )

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.closed:
                    self.cv.wait()
                if not self.queue:
                    return
                payload, n, one_line, done = self.queue[0]
            try:
                self._execute(payload, n, one_line)
                if done is not None:
                    done()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                with self.cv:
                    self.error = e
                    self.queue.clear()
                    self.cv.notify_all()
                return
            with self.cv:
                self.queue.popleft()
                self.pending -= 1
                self.cv.notify_all()


def encode(args: tuple[Any, ...] | list[Any]) -> bytes:
    """One command in RESP (hiredis' C packer; str, bytes and int arguments)."""
    return pack(args)


# --------------------------------------------------------------------------- vectorized RESP
# Native commands rendered with numpy, many at a time (why native commands and not a Lua
# script, and why this layout: docs/speed-layer.md, "Ways that were measured and rejected"):
# every command is a row of segments - constant bytes, non-negative integers printed in
# decimal, or a per-row choice among a few byte strings - laid out in a 2-D uint8 array with
# one column slot per segment (numbers right-aligned in a slot as wide as the widest of them,
# the unused leading bytes marked PAD), and the pad bytes are then squeezed out in one boolean
# compress. Every step is a column-slice assignment or an elementwise operation over whole
# columns, with no Python per row.

PAD = 0xFF  # never a byte of a rendered command (digits, ASCII names, CR LF)


def _ndigits(x: np.ndarray) -> np.ndarray:
    n = np.ones(len(x), np.int64)
    p = 10
    while True:
        more = x >= p
        if not more.any():
            return n
        n += more
        p *= 10


def _digit_block(x: np.ndarray, width: int) -> np.ndarray:
    """``x`` (non-negative) in decimal, right-aligned in ``width`` columns, PAD before."""
    out = np.empty((len(x), width), np.uint8)
    v = x.astype(np.uint64) if width > 9 else x.astype(np.uint32)  # 32-bit division is faster
    for k in range(width - 1, -1, -1):
        q = v // 10
        out[:, k] = v - q * 10
        v = q
    out += 48
    if width > 1:
        nd = _ndigits(x)
        short = nd < width
        if short.any():
            out[np.arange(width)[None, :] < (width - nd)[:, None]] = PAD
    return out


class Choice:
    """A segment that is one of a few byte strings, picked per row by ``idx``."""

    __slots__ = ("idx", "options")

    def __init__(self, options: list[bytes], idx: np.ndarray) -> None:
        self.options, self.idx = options, idx

    def lengths(self) -> np.ndarray:
        return np.array([len(o) for o in self.options], np.int64)[self.idx]


Segment = bytes | np.ndarray | Choice
"""One column of :func:`layout`: constant bytes, an int64 array (one non-negative integer
per row, in decimal) or a :class:`Choice`."""


def layout(segments: list[Segment], n: int) -> np.ndarray:
    """The rows of ``segments`` (``bytes``: the same for every row; an int64 array of ``n``
    non-negative integers, written in decimal; a :class:`Choice`) as a ``(n, width)`` uint8
    array padded with PAD; :func:`squeeze` turns it into bytes."""
    widths: list[int] = []
    for seg in segments:
        if isinstance(seg, bytes):
            if PAD in seg:
                raise ValueError(f"a constant segment holds the pad byte 0x{PAD:X}: {seg!r}")
            widths.append(len(seg))
        elif isinstance(seg, Choice):
            widths.append(max(map(len, seg.options)))
        else:
            widths.append(len(str(int(seg.max()))) if n else 1)
    rows = np.empty((n, sum(widths)), np.uint8)
    blocks: dict[int, np.ndarray] = {}  # an array used twice (a bucket number) is printed once
    col = 0
    for seg, w in zip(segments, widths):
        if isinstance(seg, bytes):
            rows[:, col : col + w] = np.frombuffer(seg, np.uint8)
        elif isinstance(seg, Choice):
            table = np.full((len(seg.options), w), PAD, np.uint8)
            for k, o in enumerate(seg.options):
                table[k, : len(o)] = np.frombuffer(o, np.uint8)
            rows[:, col : col + w] = table[seg.idx]
        else:
            block = blocks.get(id(seg))
            if block is None:
                block = blocks[id(seg)] = _digit_block(seg, w)
            rows[:, col : col + w] = block
        col += w
    return rows


def squeeze(rows: np.ndarray) -> bytes:
    """The bytes of :func:`layout` rows, row after row, without the padding."""
    flat = rows.reshape(-1)
    return flat[flat != PAD].tobytes()


def render(segments: list[Segment], n: int) -> bytes:
    """Concatenate, row by row, ``segments`` (see :func:`layout`) into one byte string."""
    return squeeze(layout(segments, n)) if n else b""


bulk_len = _ndigits  # the RESP bulk-string length of non-negative integers in decimal
