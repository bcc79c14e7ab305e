"""The chunked point-in-time build equals the in-memory one bit for bit.

A generated traffic of two and a half days (so the 7 d long windows and the 24 h windows
reach across many chunk edges) is written to an archive; the chunked build runs with chunks
that split buckets of every resolution (11 min: not a multiple of 5 min, 1 h or a day) and
with hour chunks, with and without start/end bounds, and every array of every row is
compared with ``point_in_time.training_set`` (window counts, dense, sparse, labels, delays,
ids, times). A carried state that keeps one bucket too few is caught.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.batch import point_in_time_chunked as PC
from ctrstream.batch import shards
from ctrstream.batch.archive import write_partitioned
from ctrstream.batch.point_in_time import training_set
from ctrstream.simulation.generator import generate, load_scenario

W = 1_800_000
ARRAYS = ("impression_id", "event_time_ms", "label", "click_delay_ms", "counts", "dense", "sparse")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("chunked-archive")
    tr = generate(load_scenario("steady", events=12_000, seed=5, hours=60.0, n_users=400))
    write_partitioned(d, "impressions", tr.impressions)
    write_partitioned(d, "clicks", tr.clicks)
    t = tr.impressions.column("event_time_ms").to_numpy()
    return d, int(t.min()), int(t.max())


def chunked(data_dir, **kw) -> dict[str, np.ndarray]:
    parts = list(PC.iter_training_chunks(data_dir, attribution_window_ms=W, **kw))
    return {k: np.concatenate([p[k] for p in parts]) for k in ARRAYS}


def assert_same(got: dict, want: dict, keys=ARRAYS) -> None:
    for k in keys:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.shape == b.shape, k
        if a.dtype.kind == "f":  # bit for bit, not approximately
            assert a.dtype == b.dtype, k
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), k
        else:
            assert np.array_equal(a, b), k


@pytest.mark.parametrize(
    "chunk_ms,bounds",
    [
        (11 * F.MINUTE_MS, True),
        (F.HOUR_MS, True),
        (None, False),  # the automatic chunk length
    ],
)
def test_chunked_equals_in_memory(archive, chunk_ms, bounds, monkeypatch):
    d, t0, t1 = archive
    monkeypatch.setattr(PC, "CHUNK_ROWS", 1_000)
    kw = {}
    if bounds:  # start on the second day: the long windows count the first day
        kw = {"start_ms": t0 + 30 * F.HOUR_MS + 123_457, "end_ms": t1 - 5 * F.HOUR_MS + 17}
    want = training_set(d, attribution_window_ms=W, **kw)
    stats: dict = {}
    got = chunked(d, chunk_ms=chunk_ms, stats=stats, **kw)
    assert len(want["label"]) > 5_000
    assert stats["chunks"] > 10
    # non-trivial: windows of every granule hold counts, labels of both kinds
    c = want["counts"]
    for w in range(F.N_WINDOWS):
        assert c[:, :, w].sum() > 0, w
    assert 0 < want["label"].sum() < len(want["label"])
    assert_same(got, want)


def test_shards_round_trip(archive, tmp_path):
    d, t0, t1 = archive
    kw = {"start_ms": t0 + 26 * F.HOUR_MS, "end_ms": None}
    want = training_set(d, attribution_window_ms=W, **kw)
    manifest = PC.training_set_chunked(
        d, tmp_path / "ts", attribution_window_ms=W, chunk_ms=3 * F.HOUR_MS, **kw
    )
    got = shards.read_training_set(tmp_path / "ts")
    assert_same(got, want, keys=shards.COLUMNS)
    assert manifest == shards.read_manifest(tmp_path / "ts")
    assert manifest["rows"] == len(want["label"]) and manifest["clicks"] == want["label"].sum()
    assert manifest["fingerprint"] == F.fingerprint()
    assert manifest["start_ms"] == kw["start_ms"] and manifest["end_ms"] is None
    assert manifest["attribution_window_ms"] == W
    ts = [(s["t_min"], s["t_max"]) for s in manifest["shards"]]
    assert all(a <= b for a, b in ts) and all(p[1] <= n[0] for p, n in zip(ts, ts[1:]))
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["rows"]
    with pytest.raises(ValueError, match="not empty"):
        PC.training_set_chunked(d, tmp_path / "ts", attribution_window_ms=W)


def test_off_by_one_bucket_state_is_caught(archive, monkeypatch):
    """The identity check sees a carried state that drops the oldest bucket it needs."""
    d, t0, t1 = archive
    want = training_set(d, attribution_window_ms=W)
    keep = PC._keep_from
    monkeypatch.setattr(PC, "_keep_from", lambda a, g: keep(a, g) + 1)
    got = chunked(d, chunk_ms=11 * F.MINUTE_MS)
    assert not np.array_equal(got["counts"], want["counts"])
    for w in range(len(F.RESOLUTIONS)):  # every resolution's state is short by one bucket
        assert not np.array_equal(got["counts"][:, :, w], want["counts"][:, :, w]), w


def test_short_day_state_is_caught(archive, monkeypatch):
    """... and a carried state that keeps too few days for the long windows (the archive
    spans 2.5 days: keeping one day drops the first day from the third day's rows)."""
    d, t0, t1 = archive
    want = training_set(d, attribution_window_ms=W)
    monkeypatch.setattr(PC, "_MAX_DAYS", 1)
    got = chunked(d, chunk_ms=F.HOUR_MS)
    assert np.array_equal(
        got["counts"][:, :, : len(F.RESOLUTIONS)], want["counts"][:, :, : len(F.RESOLUTIONS)]
    )
    assert not np.array_equal(
        got["counts"][:, :, len(F.RESOLUTIONS) :], want["counts"][:, :, len(F.RESOLUTIONS) :]
    )


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished training set"):
        shards.read_manifest(tmp_path)


# --------------------------------------------------------------------------- batch views


def _sorted(table, keys):
    return table.sort_by([(k, "ascending") for k in keys])


@pytest.mark.parametrize("part_rows", [None, 700])
def test_bounded_batch_view_equals_in_memory(archive, tmp_path, part_rows):
    """The bounded batch-view build (DuckDB over the Parquet files, entity partitions) gives
    the rows of compute_batch_view over read_events, duplicates included (a copy 1.5 s
    later in its own file: the earliest copy counts, once)."""
    import pyarrow as pa

    from ctrstream.batch.archive import read_events
    from ctrstream.batch.views import compute_batch_view, iter_batch_view, view_window_start

    d, t0, t1 = archive
    dup = tmp_path / "dup"
    shutil.copytree(d, dup)
    for kind in ("impressions", "clicks"):
        ev = read_events(d, kind)
        copy = ev.slice(0, ev.num_rows // 3)
        t = copy.column("event_time_ms").to_numpy() + 1_500
        copy = copy.set_column(
            copy.schema.get_field_index("event_time_ms"), "event_time_ms", pa.array(t)
        )
        write_partitioned(dup, kind, copy)
    T = F.align_cutoff(t0 + 55 * F.HOUR_MS)
    lo = view_window_start(T)
    want_b, want_l = compute_batch_view(
        read_events(dup, "impressions", lo, T), read_events(dup, "clicks", lo, T), T
    )
    parts = list(iter_batch_view(dup, T, part_rows=part_rows, temp_dir=tmp_path))
    if part_rows is None:
        assert len(parts) == len(F.ENTITIES)
    else:  # several partitions for the entities with many ids
        assert len(parts) > 2 * len(F.ENTITIES)
    got_b = pa.concat_tables([b for b, _ in parts])
    got_l = pa.concat_tables([lw for _, lw in parts])
    bk, lk = ["entity", "eid", "res", "bucket"], ["entity", "eid", "long_window"]
    assert want_b.num_rows > 1000 and want_l.num_rows > 100
    assert _sorted(got_b, bk).equals(_sorted(want_b, bk))
    assert _sorted(got_l, lk).equals(_sorted(want_l, lk))
    seen = [set(b.column("eid").to_pylist()) for b, _ in parts]
    ents = [set(b.column("entity").to_pylist()) for b, _ in parts]
    assert all(len(x) <= 1 for x in ents)  # one entity per part
    for i in range(len(parts)):  # an id's rows are in one part
        for j in range(i + 1, len(parts)):
            if ents[i] == ents[j]:
                assert not seen[i] & seen[j]


def test_field_codes_are_stable_whatever_the_values():
    codes = PC.FieldCodes()
    big = np.array([2**63 - 1, -(2**63), 7, 2**63 - 1, -5], dtype=np.int64)
    first = codes.encode(big)
    assert first.tolist() == [first[0], first[1], first[2], first[0], first[4]]
    assert sorted(set(first.tolist())) == [0, 1, 2, 3]
    again = codes.encode(np.array([7, 123, -(2**63), 2**63 - 1], dtype=np.int64))
    assert again.tolist() == [first[2], 4, first[1], first[0]]  # old codes kept, new appended


def test_chunked_equals_in_memory_with_extreme_ids(archive, tmp_path):
    """Ids anywhere in int64 (negative, near the bounds, wide ranges) key the carried state
    as exactly as small ones: the two-field entities pack field codes, not values."""
    import pyarrow as pa

    from ctrstream.batch.archive import read_events

    d, t0, t1 = archive
    out = tmp_path / "extreme"
    for kind in ("impressions", "clicks"):
        ev = read_events(d, kind)
        for name, fn in (
            ("user_id", lambda v: v * 2**40 - 2**62),
            ("ad_id", lambda v: (2**63 - 1) - v),
            ("advertiser_id", lambda v: -(2**63) + v),
        ):
            col = ev.column(name).to_numpy().astype(np.int64)
            ev = ev.set_column(ev.schema.get_field_index(name), name, pa.array(fn(col)))
        write_partitioned(out, kind, ev)
    want = training_set(out, attribution_window_ms=W)
    got = chunked(out, chunk_ms=37 * F.MINUTE_MS)
    assert want["counts"][:, :, : len(F.RESOLUTIONS)].sum() > 0
    assert_same(got, want)
