"""The Spark batch engine equals the DuckDB/numpy engine cell for cell.

One Spark local session (two cores, few shuffle partitions, a small driver) for the module:
its start is the slow part. The archive is written from the batch tests' small traffic (ties,
repeat and same-millisecond clicks, clicks beyond the attribution window, duplicates spread
over several files), over nine days so that the 7-day long windows and day edges are crossed.
Needs no Kafka/Redis/Triton, only Java (as Kafka does) and the ``spark`` extra.
"""

from __future__ import annotations

import numpy as np
import pytest
from batch_traffic import T0, W, make_traffic

from ctrstream import features as F
from ctrstream.batch import point_in_time as duck
from ctrstream.batch import spark_engine as S
from ctrstream.batch.archive import read_events, write_partitioned

COLUMNS = ("impression_id", "event_time_ms", "label", "click_delay_ms", "counts", "dense", "sparse")


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    session = S.spark_session(
        "local[2]", shuffle_partitions=2, local_dir=tmp_path_factory.mktemp("spark-local")
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("spark-archive")
    it, ct = make_traffic(n_imps=1500, seed=3)
    for chunk in (it.slice(0, 900), it.slice(700)):  # overlapping writes = re-delivery
        write_partitioned(d, "impressions", chunk)
    write_partitioned(d, "clicks", ct)
    write_partitioned(d, "clicks", ct.slice(0, 40))
    return d


def assert_same(got: dict, want: dict) -> None:
    assert len(want["label"]) > 0
    for key in COLUMNS:
        assert got[key].shape == want[key].shape, key
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_training_set_equals_duckdb(spark, archive):
    """Every column of every row, the full archive: labels, delays, the window counts of
    every entity and window, dense and sparse."""
    want = duck.training_set(archive, attribution_window_ms=W)
    got = S.training_set(archive, attribution_window_ms=W, spark=spark)
    assert_same(got, want)
    # the traffic exercises what the windows must get right
    assert want["label"].sum() > 0 and (want["click_delay_ms"] == 0).any()
    assert (want["counts"][:, :, len(F.RESOLUTIONS) :] > 0).any()  # long windows counted
    assert (want["counts"][:, :, 0] > 0).any()  # the 5-minute window too


def test_training_set_slice_equals_duckdb(spark, archive):
    """With start/end bounds (history before start still counts; end cuts labels)."""
    start, end = T0 + 3 * F.DAY_MS + 7_777, T0 + 8 * F.DAY_MS + 123
    want = duck.training_set(archive, start, end, attribution_window_ms=W)
    got = S.training_set(archive, start, end, attribution_window_ms=W, spark=spark)
    assert_same(got, want)


def test_bucket_and_long_window_counts_equal_duckdb(spark, archive):
    """The batch view's counts: bucket counts since a cut-off's window, long windows at a
    time that is not a day edge."""
    since, until = T0 + 2 * F.DAY_MS + 5 * F.MINUTE_MS, T0 + 6 * F.DAY_MS
    imps = read_events(archive, "impressions")
    clks = read_events(archive, "clicks")
    want = duck.bucket_counts(imps, clks, until, since)
    got = S.archive_bucket_counts(spark, archive, until, since)
    assert want.num_rows > 0
    assert got.equals(want)
    at = T0 + 8 * F.DAY_MS + 3 * F.HOUR_MS
    want_l = duck.long_window_counts(imps, clks, at)
    got_l = S.archive_long_window_counts(spark, archive, at)
    assert want_l.num_rows > 0
    assert got_l.equals(want_l)


def test_empty_archive(spark, tmp_path):
    got = S.training_set(tmp_path, attribution_window_ms=W, spark=spark)
    assert got["counts"].shape == (0, len(F.ENTITIES), F.N_WINDOWS, 2)


def test_shards_equal_duckdb_chunked(spark, archive, tmp_path, monkeypatch):
    """``ctrstream train --engine spark``'s default path: Spark writes the shard format
    (several range partitions pulled one at a time, several shards) and it reads back equal,
    column for column, to the DuckDB chunked build's shards of the same archive; each shard
    sorted by (event_time_ms, impression_id), shards disjoint in time."""
    from ctrstream.batch import shards
    from ctrstream.batch.pipeline import training_shards
    from ctrstream.batch.point_in_time_chunked import training_set_chunked
    from ctrstream.config import Settings

    want_m = training_set_chunked(
        archive, tmp_path / "duckdb", attribution_window_ms=W, chunk_ms=11 * F.HOUR_MS
    )
    monkeypatch.setattr(S, "PARTITION_ROWS", 400)  # several partitions on a small archive
    monkeypatch.setattr(S, "ROWS_PER_SHARD", 300)  # and several shards
    settings = Settings(data_dir=archive, attribution_window_s=W / 1000, batch_engine="duckdb")
    got_m = training_shards(settings, tmp_path / "spark", engine="spark", log=lambda *_: None)

    assert got_m["rows"] == want_m["rows"] > 0
    assert got_m["clicks"] == want_m["clicks"] > 0
    assert got_m["attribution_window_ms"] == W and got_m["fingerprint"] == F.fingerprint()
    assert len(got_m["shards"]) > 2
    got, want = (
        shards.read_training_set(tmp_path / "spark"),
        shards.read_training_set(tmp_path / "duckdb"),
    )
    for key in shards.COLUMNS:
        assert got[key].shape == want[key].shape, key
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    prev_max = None
    for s, part in zip(got_m["shards"], shards.iter_shards(tmp_path / "spark")):
        t, ids = part["event_time_ms"], part["impression_id"]
        order = np.lexsort((ids, t))
        assert (order == np.arange(len(t))).all()
        assert (s["t_min"], s["t_max"], s["rows"]) == (t[0], t[-1], len(t))
        assert prev_max is None or s["t_min"] > prev_max
        prev_max = s["t_max"]


def test_shards_cut_between_event_times(spark, archive, tmp_path):
    """Small shards: every cut falls between two event times (no time in two shards), and
    a bounded slice reads back as the in-memory Spark set's rows."""
    from ctrstream.batch import shards

    start, end = T0 + 3 * F.DAY_MS + 7_777, T0 + 8 * F.DAY_MS + 123
    m = S.write_training_shards(
        archive,
        tmp_path / "s",
        start,
        end,
        attribution_window_ms=W,
        spark=spark,
        rows_per_shard=97,
    )
    assert len(m["shards"]) > 3 and (m["start_ms"], m["end_ms"]) == (start, end)
    t_ranges = [(s["t_min"], s["t_max"]) for s in m["shards"]]
    assert all(a[1] < b[0] for a, b in zip(t_ranges, t_ranges[1:]))
    got = shards.read_training_set(tmp_path / "s")
    want = duck.training_set(archive, start, end, attribution_window_ms=W)
    for key in shards.COLUMNS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
