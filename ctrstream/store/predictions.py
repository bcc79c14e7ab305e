"""Precomputed predictions (batch inference): click probabilities of (user, ad) pairs
computed ahead of the requests, written in bulk and read back per request.

One class reads and writes them (Feast's ``OnlineStore`` idea), behind a multi-put and a
multi-get (Chronon's ``KVStore``): :meth:`PredictionStore.put_many` writes a precompute
run's pairs under a *namespace* (a model and run: ``layout.prediction_key``) with a TTL,
and :meth:`PredictionStore.get_many` reads the pairs of a micro-batch of requests in one
round trip - a miss is NaN, and what to serve instead is the caller's choice.

Layout (``layout.py``): one HASH per user and namespace, field ``{ad_id}`` = the probability
in decimal (9 significant digits: reads back to the same float32).
Both directions go over one raw connection with pre-rendered commands
(:class:`ctrstream.store.resp.RespPipeline`, hiredis packing and parsing): a precompute run
writes hundreds of thousands of pairs, and redis-py would spend ~30 us of Python on each
command.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctrstream.config import RedisSettings, Settings
from ctrstream.store import layout as L
from ctrstream.store.resp import RespPipeline, encode
from ctrstream.store.scan import SCAN_COUNT

PUT_CHUNK = 20_000  # users per pipelined round trip of a multi-put
CLEAR_CHUNK = 5_000  # keys per UNLINK


def _group_by_user(users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, distinct users, start of each user's run in order)``."""
    order = np.argsort(users, kind="stable")
    s = users[order]
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]])) if len(s) else s[:0]
    return order, s[starts], starts


def _int_ids(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (len(arr) and arr.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D array of integer ids, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


class PredictionStore:
    """Reads and writes precomputed predictions in one Redis (``settings.redis``).

    >>> store = PredictionStore(settings)                                   # doctest: +SKIP
    >>> store.put_many("ctr_deep-1-r0", users, ads, p, ttl_ms=6 * 3_600_000)  # doctest: +SKIP
    >>> store.get_many("ctr_deep-1-r0", users[:100], ads[:100])  # NaN = not precomputed
    ...                                                                     # doctest: +SKIP
    """

    def __init__(self, settings: Settings | RedisSettings, timeout_s: float = 30.0) -> None:
        self.pipe = RespPipeline(settings, timeout=timeout_s)

    # ------------------------------------------------------------------ multi-put
    def put_many(
        self,
        namespace: str,
        users: np.ndarray,
        ads: np.ndarray,
        p: np.ndarray,
        ttl_ms: int,
    ) -> int:
        """Write the predictions ``p`` of pairs ``(users[i], ads[i])`` under ``namespace``,
        expiring ``ttl_ms`` after the write (a pair written again is overwritten; its user's
        hash gets the new TTL). Pipelined: one ``HSET`` and one ``PEXPIRE`` per user, in
        round trips of :data:`PUT_CHUNK` users. Returns the number of pairs written."""
        head = L.prediction_key_head(namespace)
        users, ads = _int_ids("users", users), _int_ids("ads", ads)
        p = np.asarray(p, dtype=np.float32)
        if not (len(users) == len(ads) == len(p)):
            raise ValueError(
                f"users, ads and p differ in length ({len(users)}, {len(ads)}, {len(p)}): "
                "give one prediction per (user, ad) pair"
            )
        if len(p) and not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
            raise ValueError("predictions must be probabilities in [0, 1] (no NaN)")
        if int(ttl_ms) <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        order, distinct, starts = _group_by_user(users)
        ends = np.append(starts[1:], len(order))
        fields = ads[order].tolist()
        values = [f"{v:.9g}" for v in p[order].tolist()]
        ttl = str(int(ttl_ms))
        for c in range(0, len(distinct), PUT_CHUNK):
            cmds: list[bytes] = []
            for u, a, b in zip(
                distinct[c : c + PUT_CHUNK].tolist(),
                starts[c : c + PUT_CHUNK].tolist(),
                ends[c : c + PUT_CHUNK].tolist(),
            ):
                key = head + str(u)
                args: list[Any] = ["HSET", key]
                for k in range(a, b):
                    args += (L.prediction_field(fields[k]), values[k])
                cmds.append(encode(args))
                cmds.append(encode(("PEXPIRE", key, ttl)))
            self.pipe.execute_raw(b"".join(cmds), len(cmds), one_line=True)
        return len(p)

    # ------------------------------------------------------------------ multi-get
    def get_many(self, namespace: str, users: np.ndarray, ads: np.ndarray) -> np.ndarray:
        """The precomputed prediction of each pair ``(users[i], ads[i])`` (float64; NaN where
        none is stored or it expired). One round trip: one ``HMGET`` per distinct user."""
        head = L.prediction_key_head(namespace)
        users, ads = _int_ids("users", users), _int_ids("ads", ads)
        if len(users) != len(ads):
            raise ValueError(f"users and ads differ in length ({len(users)}, {len(ads)})")
        out = np.full(len(users), np.nan)
        if not len(users):
            return out
        order, distinct, starts = _group_by_user(users)
        ends = np.append(starts[1:], len(order))
        fields = ads[order].tolist()
        cmds = [
            encode(["HMGET", head + str(u), *(L.prediction_field(f) for f in fields[a:b])])
            for u, a, b in zip(distinct.tolist(), starts.tolist(), ends.tolist())
        ]
        replies = self.pipe.execute_replies(cmds)
        flat = [v for r in replies for v in r]
        got = np.array([np.nan if v is None else float(v) for v in flat])
        out[order] = got
        return out

    # ------------------------------------------------------------------ housekeeping
    def _keys(self, namespace: str) -> list[bytes]:
        """Every key of ``namespace`` (SCAN)."""
        pattern = L.prediction_pattern(namespace)
        keys: list[bytes] = []
        cursor: Any = 0
        while True:
            cursor, batch = self.pipe.execute_replies(
                [encode(("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT))]
            )[0]
            keys += [k for k in batch if L.parse_prediction_key(k.decode()) is not None]
            if int(cursor) == 0:
                return keys

    def clear(self, namespace: str) -> int:
        """Delete every key of ``namespace`` (SCAN, then ``UNLINK``); returns how many."""
        keys = self._keys(namespace)
        for i in range(0, len(keys), CLEAR_CHUNK):
            self.pipe.execute_replies([encode(("UNLINK", *keys[i : i + CLEAR_CHUNK]))])
        return len(keys)

    def count_users(self, namespace: str) -> int:
        """How many users have predictions in ``namespace`` (a SCAN: tests, reports)."""
        return len(self._keys(namespace))

    def memory_used_bytes(self) -> int:
        """Redis' ``used_memory`` (the whole server): the difference across a put is what
        the predictions cost."""
        info = self.pipe.execute_replies([encode(("INFO", "memory"))])[0]
        for line in info.decode().splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":", 1)[1])
        raise RuntimeError("redis INFO memory has no used_memory line")

    def close(self) -> None:
        self.pipe.close()

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PredictionStore"]
