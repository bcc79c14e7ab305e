"""Reading a whole view: SCAN its keys, then HGETALL them in bulk.

Reconciliation and the tests' oracle read every hash of the speed view or of a batch-view
version - millions of them on a full day of traffic. The keys come from ``SCAN`` (redis-py,
a few thousand per call) on every master of a Redis Cluster (one server otherwise); the
hashes are read with pipelined ``HGETALL``s rendered and parsed by hiredis over a
:class:`ctrstream.store.resp.RespPipeline` per node, to the node that serves each key's slot
(:class:`ctrstream.store.nodes.NodePipelines`; no redis-py objects per command). Python's cyclic garbage
collector is paused while the caller builds millions of small containers from the replies
(nothing built from them forms a cycle; a gen-2 collection would re-traverse them all).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ctrstream.store.nodes import NodePipelines, scan_masters
from ctrstream.store.resp import encode

T = TypeVar("T")

SCAN_COUNT = 5000  # keys asked for per SCAN call
CHUNK = 20_000  # HGETALLs per pipelined round trip
TIMEOUT_S = 60.0  # without any progress on the bulk connection


def text(value: bytes | str) -> str:
    """A key or value as ``str`` (clients with and without ``decode_responses``)."""
    return value.decode() if isinstance(value, bytes) else value


def scan_keys(client: Any, match: str, parse: Callable[[str], T | None]) -> list[tuple[bytes, T]]:
    """``(key, parse(key))`` of every key SCAN finds for the pattern ``match`` on every
    master that ``parse`` accepts (returns something other than None)."""
    keys: list[tuple[bytes, T]] = []
    for k in scan_masters(client, match, SCAN_COUNT):
        parsed = parse(text(k))
        if parsed is not None:
            keys.append((k if isinstance(k, bytes) else k.encode(), parsed))
    return keys


def read_hashes(
    client: Any, keys: list[tuple[bytes, T]]
) -> Iterator[tuple[T, Iterable[tuple[bytes, bytes]]]]:
    """``(parsed key, (field, value) pairs)`` of every hash of ``keys`` (pairs from
    :func:`scan_keys`), read in pipelined chunks. A hash that expired between the SCAN and
    its read comes back empty."""
    with NodePipelines(client, timeout=TIMEOUT_S) as pipes:
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i : i + CHUNK]
            for k, _ in chunk:
                pipes.add(k, encode((b"HGETALL", k)))
            for (_, parsed), h in zip(chunk, pipes.execute()):
                yield parsed, zip(h[0::2], h[1::2])


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (see the module docstring)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
