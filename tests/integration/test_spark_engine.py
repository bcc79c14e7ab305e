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
