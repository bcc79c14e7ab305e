"""The speed layer's shard logic and its recovery-store guard, without servers."""

from __future__ import annotations

import numpy as np
import pytest

BASE = 1_700_000_000_000 // 3_600_000 * 3_600_000


def test_shard_frees_closed_buckets_and_writes_absolute_values():
    """Unit level: the shard logic sums deltas, emits absolute values of changed cells only,
    and frees a bucket once the watermark of every partition passed it."""
    from ctrstream import features as F
    from ctrstream.config import Settings
    from ctrstream.streaming.features_flow import Delta, FlowConfig, ShardLogic

    cfg = FlowConfig(Settings())
    logic = ShardLogic(cfg, "t", None)
    P = len(cfg.parts)
    t = np.array([BASE + 1_000, BASE + 2_000, BASE + 61_000], dtype=np.int64)
    d = Delta(0, BASE, 0, np.zeros(3, np.int8), np.array([5, 5, 5], np.int64), t, 1, 2)
    logic.on_batch([d])
    (item,) = logic.flush()
    got = {(int(r), int(b)): tuple(c) for r, b, c in zip(item.res, item.bucket, item.cnt.tolist())}
    b1m = BASE // 60_000
    assert got[(0, b1m)] == (2, 0) and got[(0, b1m + 1)] == (1, 0)
    assert logic.flush() == []  # nothing changed: nothing written
    logic.on_batch([Delta(0, BASE, 1, np.zeros(1, np.int8), np.array([5], np.int64), t[:1], 1, 2)])
    (item,) = logic.flush()
    assert len(item.eid) == len(F.RESOLUTIONS)  # only the cells that changed, absolute values
    assert {tuple(c) for c in item.cnt.tolist()} >= {(2, 1)}
    # watermark past the first minute on only some partitions: nothing is freed yet
    for p in range(P - 1):
        logic.on_batch(
            [
                Delta(
                    p,
                    BASE + 60_000,
                    0,
                    np.zeros(0, np.int8),
                    np.zeros(0, np.int64),
                    np.zeros(0, np.int64),
                    1,
                    2,
                )
            ]
        )
    logic.flush()
    assert (0, 0, b1m) in logic.tables
    logic.on_batch(
        [
            Delta(
                P - 1,
                BASE + 60_000,
                0,
                np.zeros(0, np.int8),
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
                1,
                2,
            )
        ]
    )
    logic.flush()
    assert (0, 0, b1m) not in logic.tables and (0, 0, b1m + 1) in logic.tables


def test_shard_counts_events_of_a_batch_whose_watermark_passed_them():
    """A micro-batch can carry an on-time event and, later in the same batch, an event that
    moves the partition watermark past it: the first one must still be counted."""
    from ctrstream.config import Settings
    from ctrstream.streaming.features_flow import Delta, FlowConfig, ShardLogic

    cfg = FlowConfig(Settings())
    logic = ShardLogic(cfg, "t", None)
    far = BASE + 10 * 3_600_000
    ds = [
        Delta(
            p,
            far,
            0,
            np.zeros(1, np.int8),
            np.array([9], np.int64),
            np.array([BASE + 1_000], np.int64),
            1,
            2,
        )
        for p in range(len(cfg.parts))
    ]
    logic.on_batch(ds)
    assert logic.anomalies == 0
    (item,) = logic.flush()
    assert {tuple(c) for c in item.cnt.tolist()} == {(len(cfg.parts), 0)}
    assert not logic.tables  # written once, then freed: the watermark is far past it


def test_recovery_store_remembers_the_shard_count(tmp_path, monkeypatch):
    """Resuming a recovery store with a different shard count would silently drop the state
    of the missing shards: `ctrstream speed` refuses it with a clear message."""
    import typer

    import ctrstream.streaming.features_flow as ff
    from ctrstream.cli.speed import check_shards

    check_shards(tmp_path)
    check_shards(tmp_path)  # same count: fine
    monkeypatch.setattr(ff, "N_SHARDS", ff.N_SHARDS + 1)
    with pytest.raises(typer.BadParameter, match="shards"):
        check_shards(tmp_path)
