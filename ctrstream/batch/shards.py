"""The training-set shard format: a point-in-time training set on disk, in event-time order.

A training-set directory holds ``part-00000.parquet``, ``part-00001.parquet``, ... in
event-time order (each shard's rows sorted by ``(event_time_ms, impression_id)``; shards do
not overlap in time) and ``_manifest.json``::

    {"format": 1, "rows": N, "clicks": C,
     "shards": [{"file", "rows", "clicks", "t_min", "t_max"}, ...],
     "fingerprint": features.fingerprint(), "attribution_window_ms": W,
     "start_ms": ..., "end_ms": ...,          # the query bounds (None when open)
     "n_dense": features.N_DENSE, "n_sparse": features.N_SPARSE}

Columns: ``impression_id`` string, ``event_time_ms`` int64, ``label`` int8,
``click_delay_ms`` int64, ``dense`` fixed_size_list<float32>[N_DENSE], ``sparse``
fixed_size_list<int64>[N_SPARSE]. The window counts are not stored: ``dense`` is
``features.dense_from_counts(counts)``, what training and serving use.

The chunked build (:mod:`ctrstream.batch.point_in_time_chunked`) writes it with
:class:`ShardWriter`; training streams it with :func:`iter_shards` (one shard's arrays at a
time) and small sets can be loaded whole with :func:`read_training_set` (the arrays of
``point_in_time.training_set``, without ``counts``). :func:`open_shards` opens a set for
``ctrstream.models.training.train_streamed``: a :class:`ShardSet` reads any row group of
any shard in record batches, so a shuffled epoch holds one batch, not one shard, and
:func:`write_training_set` writes an in-memory training set in the format.

The manifest is written last, by rename: a directory without ``_manifest.json`` is an
unfinished build, and :func:`read_manifest` says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrstream import features as F

FORMAT = 1
MANIFEST = "_manifest.json"

# the arrays of one shard / of a loaded training set (no counts)
COLUMNS = ("impression_id", "event_time_ms", "label", "click_delay_ms", "dense", "sparse")


def shard_schema() -> pa.Schema:
    """The Arrow schema of a shard (fixed by the format: see the module docstring)."""
    return pa.schema(
        [
            ("impression_id", pa.string()),
            ("event_time_ms", pa.int64()),
            ("label", pa.int8()),
            ("click_delay_ms", pa.int64()),
            ("dense", pa.list_(pa.float32(), F.N_DENSE)),
            ("sparse", pa.list_(pa.int64(), F.N_SPARSE)),
        ]
    )


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def to_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """One shard's Arrow table from the training-set arrays (``dense`` ``(n, N_DENSE)``
    float32, ``sparse`` ``(n, N_SPARSE)`` int64, the others one value per row)."""
    dense = np.ascontiguousarray(rows["dense"], dtype=np.float32)
    sparse = np.ascontiguousarray(rows["sparse"], dtype=np.int64)
    n = len(rows["event_time_ms"])
    if dense.shape != (n, F.N_DENSE) or sparse.shape != (n, F.N_SPARSE):
        raise ValueError(
            f"dense {dense.shape} / sparse {sparse.shape} do not match {n} rows of "
            f"{F.N_DENSE} dense and {F.N_SPARSE} sparse features (features.py declares them)"
        )
    return pa.Table.from_arrays(
        [
            pa.array(rows["impression_id"], type=pa.string()),
            pa.array(np.asarray(rows["event_time_ms"], dtype=np.int64)),
            pa.array(np.asarray(rows["label"], dtype=np.int8)),
            pa.array(np.asarray(rows["click_delay_ms"], dtype=np.int64)),
            pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), F.N_DENSE),
            pa.FixedSizeListArray.from_arrays(pa.array(sparse.reshape(-1)), F.N_SPARSE),
        ],
        schema=shard_schema(),
    )


def from_table(table: pa.Table) -> dict[str, np.ndarray]:
    """The training-set arrays of one shard's table (inverse of :func:`to_table`)."""
    n = table.num_rows

    def flat(name: str, width: int, dtype: Any) -> np.ndarray:
        col = table.column(name).combine_chunks()
        if n == 0:
            return np.zeros((0, width), dtype=dtype)
        values = col.values.to_numpy(zero_copy_only=False)[col.offset * width :]
        return np.asarray(values[: n * width], dtype=dtype).reshape(n, width)

    return {
        "impression_id": table.column("impression_id").to_numpy(zero_copy_only=False),
        "event_time_ms": table.column("event_time_ms").to_numpy().astype(np.int64),
        "label": table.column("label").to_numpy().astype(np.int8),
        "click_delay_ms": table.column("click_delay_ms").to_numpy().astype(np.int64),
        "dense": flat("dense", F.N_DENSE, np.float32),
        "sparse": flat("sparse", F.N_SPARSE, np.int64),
    }


class ShardWriter:
    """Writes shards in event-time order into ``out_dir`` and the manifest on
    :meth:`close`. ``out_dir`` must be empty or absent (a build never mixes with an older
    one)."""

    def __init__(
        self,
        out_dir: Path | str,
        *,
        attribution_window_ms: int,
        start_ms: int | None,
        end_ms: int | None,
    ) -> None:
        self.dir = Path(out_dir)
        if self.dir.exists() and any(self.dir.iterdir()):
            raise ValueError(
                f"shard directory {self.dir} is not empty: give a new or empty directory "
                "(a training set is never written over an older one)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta: dict[str, Any] = {
            "format": FORMAT,
            "rows": 0,
            "clicks": 0,
            "shards": [],
            "fingerprint": F.fingerprint(),
            "attribution_window_ms": int(attribution_window_ms),
            "start_ms": None if start_ms is None else int(start_ms),
            "end_ms": None if end_ms is None else int(end_ms),
            "n_dense": F.N_DENSE,
            "n_sparse": F.N_SPARSE,
        }
        self._last_t: int | None = None

    def write(self, rows: dict[str, np.ndarray]) -> None:
        """Append one shard (rows sorted by (event_time_ms, impression_id), all at or after
        the previous shard's last time). Empty shards are skipped."""
        t = np.asarray(rows["event_time_ms"], dtype=np.int64)
        if len(t) == 0:
            return
        if self._last_t is not None and int(t[0]) < self._last_t:
            raise ValueError(
                f"shard starts at {int(t[0])} before the previous one ends at {self._last_t}: "
                "shards are written in event-time order"
            )
        table = to_table(rows)
        name = shard_name(len(self.meta["shards"]))
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.dir / name)
        clicks = int(np.asarray(rows["label"]).sum())
        self.meta["shards"].append(
            {
                "file": name,
                "rows": len(t),
                "clicks": clicks,
                "t_min": int(t[0]),
                "t_max": int(t[-1]),
            }
        )
        self.meta["rows"] += len(t)
        self.meta["clicks"] += clicks
        self._last_t = int(t[-1])

    def close(self) -> dict[str, Any]:
        """Write the manifest (last: it marks the set complete) and return it."""
        tmp = self.dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, self.dir / MANIFEST)
        return self.meta


def read_manifest(shard_dir: Path | str) -> dict[str, Any]:
    """The manifest of a complete training-set directory (clear errors otherwise)."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {shard_dir} is not a finished training set (build it with "
            "ctrstream.batch.point_in_time_chunked.training_set_chunked)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: shard format {meta.get('format')!r}, this code reads {FORMAT}")
    if meta.get("n_dense") != F.N_DENSE or meta.get("n_sparse") != F.N_SPARSE:
        raise ValueError(
            f"{path}: built for {meta.get('n_dense')} dense / {meta.get('n_sparse')} sparse "
            f"features, features.py declares {F.N_DENSE} / {F.N_SPARSE}: rebuild the set"
        )
    return meta


def iter_shards(
    shard_dir: Path | str, manifest: dict[str, Any] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of each shard in event-time order (one shard in memory at a time)."""
    meta = manifest or read_manifest(shard_dir)
    for s in meta["shards"]:
        yield from_table(pq.read_table(Path(shard_dir) / s["file"]))


def read_training_set(shard_dir: Path | str) -> dict[str, np.ndarray]:
    """A whole shard directory as one set of arrays (small sets: tests, comparisons)."""
    parts = list(iter_shards(shard_dir))
    if not parts:
        return from_table(shard_schema().empty_table())
    return {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}


# --------------------------------------------------------------------------- streaming


def write_training_set(
    ds: dict[str, np.ndarray],
    out_dir: Path | str,
    *,
    attribution_window_ms: int,
    start_ms: int | None = None,
    end_ms: int | None = None,
    rows_per_shard: int = 250_000,
) -> dict[str, Any]:
    """Write an in-memory training set (``point_in_time.training_set``'s arrays, in its
    order) as shards of about ``rows_per_shard`` rows (rows of one event time stay in one
    shard); returns the manifest."""
    w = ShardWriter(
        out_dir, attribution_window_ms=attribution_window_ms, start_ms=start_ms, end_ms=end_ms
    )
    t = np.asarray(ds["event_time_ms"])
    i = 0
    while i < len(t):
        j = min(len(t), i + rows_per_shard)
        if j < len(t):
            j = int(np.searchsorted(t, t[j - 1], side="right"))
        w.write({k: ds[k][i:j] for k in COLUMNS})
        i = j
    return w.close()


@dataclass(frozen=True)
class Piece:
    """One readable unit of a training set: a row group of a shard, with its shard's
    event-time range (``t_min``/``t_max`` bound every row of the piece)."""

    shard: int
    row_group: int
    rows: int
    t_min: int
    t_max: int


class ShardSet:
    """A training-set directory opened for streaming (the ``RowStream`` that
    ``ctrstream.models.training.train_streamed`` reads)."""

    def __init__(self, shard_dir: str | Path) -> None:
        self.dir = Path(shard_dir)
        self.manifest = read_manifest(self.dir)
        if self.manifest.get("fingerprint") != F.fingerprint():
            raise ValueError(
                f"{self.dir}: built for feature declarations {self.manifest.get('fingerprint')}, "
                f"features.py is {F.fingerprint()}: rebuild the training set"
            )
        self.rows = int(self.manifest["rows"])
        self.clicks = int(self.manifest["clicks"])
        self.t_min = min((int(s["t_min"]) for s in self.manifest["shards"]), default=0)
        self.t_max = max((int(s["t_max"]) for s in self.manifest["shards"]), default=-1)
        pieces: list[Piece] = []
        for k, s in enumerate(self.manifest["shards"]):
            path = self.dir / s["file"]
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} is listed in {MANIFEST} but missing: rebuild the training set"
                )
            md = pq.ParquetFile(path).metadata
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                pieces.append(Piece(k, g, rg.num_rows, int(s["t_min"]), int(s["t_max"])))
        self.pieces = pieces

    def read(
        self, piece: Piece, columns: Sequence[str], batch_rows: int = 65_536
    ) -> Iterator[dict[str, np.ndarray]]:
        """The piece's rows in order, in batches: ``dense`` ``(rows, N_DENSE)`` float32,
        ``sparse`` ``(rows, N_SPARSE)`` int64, ``impression_id`` a pyarrow string array,
        the other columns numpy."""
        f = pq.ParquetFile(self.dir / self.manifest["shards"][piece.shard]["file"])
        for b in f.iter_batches(
            batch_size=batch_rows, row_groups=[piece.row_group], columns=list(columns)
        ):
            yield {name: _column(name, b.column(name)) for name in columns}


def _column(name: str, col: pa.Array) -> Any:
    if name == "impression_id":
        return col
    if name in ("dense", "sparse"):
        width = F.N_DENSE if name == "dense" else F.N_SPARSE
        return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return col.to_numpy(zero_copy_only=False)


def open_shards(shard_dir: Path | str) -> ShardSet:
    """A finished training-set directory opened for streaming (:class:`ShardSet`)."""
    return ShardSet(shard_dir)


__all__ = [
    "COLUMNS",
    "FORMAT",
    "MANIFEST",
    "Piece",
    "ShardSet",
    "ShardWriter",
    "from_table",
    "iter_shards",
    "open_shards",
    "read_manifest",
    "read_training_set",
    "shard_name",
    "shard_schema",
    "to_table",
    "write_training_set",
]
