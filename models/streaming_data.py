"""Training data that does not fit in memory: a row stream, a shuffle buffer, exact moments.

``ctrstream.models.training.train_streamed`` reads a training set through the
:class:`RowStream` protocol - pieces (row groups of time-ordered shards) read in batches -
so that memory holds one shuffle buffer and one read batch, never the set.
``ctrstream.batch.shards.ShardSet`` implements it over the Parquet shard format (the model
layer knows no file format: the batch layer sits above it).

* :class:`ShuffleBuffer` - rows pushed in any grouping come out in training batches of a
  fixed size, drawn at random from a pool of ``capacity`` rows (the standard shuffle buffer
  of streaming input pipelines); together with a random order of pieces per epoch it mixes
  the whole set's rows, time-ordered within a piece as they are stored.
* :class:`Moments` - mean and (population) standard deviation per column, merged batch by
  batch in float64 (Chan et al.'s pairwise update of Welford's sums): one pass, exact up to
  float64 rounding, whatever the batch sizes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np


class PieceLike(Protocol):
    """A readable unit of a row stream; ``t_min <= event_time_ms <= t_max`` for its rows."""

    rows: int
    t_min: int
    t_max: int


class RowStream(Protocol):
    """A training set as a list of pieces in event-time order (see module docstring).

    ``read(piece, columns)`` yields dicts of the columns for consecutive rows of the piece,
    in ``(event_time_ms, impression_id)`` order: ``event_time_ms`` int64, ``label`` int8,
    ``dense`` ``(rows, N_DENSE)`` float32, ``sparse`` ``(rows, N_SPARSE)`` int64,
    ``impression_id`` (any array of strings)."""

    rows: int
    t_min: int
    t_max: int

    @property
    def pieces(self) -> Sequence[Any]: ...

    def read(self, piece: Any, columns: Sequence[str]) -> Iterator[dict[str, Any]]: ...


class ShuffleBuffer:
    """Rows in, shuffled batches of ``batch_size`` out (the last one may be short).

    ``push`` adds rows and yields every full batch it can while keeping at least half the
    pool: each pool shuffle mixes the new rows with ``capacity / 2`` older ones. ``drain``
    yields the rest. Arrays are tuples with a common first dimension."""

    def __init__(self, capacity: int, batch_size: int, rng: np.random.Generator) -> None:
        if capacity < 2 * batch_size:
            capacity = 2 * batch_size
        self.capacity, self.batch_size, self.rng = capacity, batch_size, rng
        self.pool: list[tuple[np.ndarray, ...]] = []
        self.rows = 0

    def push(self, arrays: tuple[np.ndarray, ...]) -> Iterator[tuple[np.ndarray, ...]]:
        if len(arrays[0]) == 0:
            return
        self.pool.append(arrays)
        self.rows += len(arrays[0])
        if self.rows < self.capacity:
            return
        pool = self._shuffled()
        k = ((self.rows - self.capacity // 2) // self.batch_size) * self.batch_size
        yield from self._batches(pool, k)
        self.pool = [tuple(a[k:] for a in pool)]
        self.rows -= k

    def drain(self) -> Iterator[tuple[np.ndarray, ...]]:
        if self.rows:
            pool = self._shuffled()
            yield from self._batches(pool, self.rows)
        self.pool, self.rows = [], 0

    def _shuffled(self) -> tuple[np.ndarray, ...]:
        perm = self.rng.permutation(self.rows)
        cols = zip(*self.pool, strict=True)
        return tuple((np.concatenate(c) if len(c) > 1 else c[0])[perm] for c in cols)

    def _batches(self, pool: tuple[np.ndarray, ...], k: int) -> Iterator[tuple[np.ndarray, ...]]:
        for i in range(0, k, self.batch_size):
            yield tuple(a[i : min(k, i + self.batch_size)] for a in pool)


class Moments:
    """Column means and population standard deviations, one batch at a time (float64)."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.mean = np.zeros(width, dtype=np.float64)
        self.m2 = np.zeros(width, dtype=np.float64)

    def add(self, x: np.ndarray) -> None:
        nb = len(x)
        if nb == 0:
            return
        xb = np.asarray(x, dtype=np.float64)
        mb = xb.mean(axis=0)
        m2b = ((xb - mb) ** 2).sum(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))


__all__ = ["Moments", "PieceLike", "RowStream", "ShuffleBuffer"]
