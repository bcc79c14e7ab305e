"""The live point's bookkeeping without servers: the slice, the probes, and the comparison of
reads with the point-in-time counts (live reads are simulated as exact stale reads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrstream import events as E
from ctrstream import features as F
from ctrstream.simulation.scenarios import load_scenario
from ctrstream.study import live
from ctrstream.study.data import load_study_data

N_SHARDS = live.n_shards()


@pytest.fixture(scope="module")
def data():
    return load_study_data(load_scenario("steady", hours=1.5, events=20_000, seed=5))


@pytest.fixture(scope="module")
def sl(data):
    return live.choose_slice(data, minutes=3.0, lead_s=20.0, max_reads=200)


class _Net(torch.nn.Module):
    """A fixed model: the CTR from the first dense input (no training needed)."""

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(0.3 * dense[:, 0] - 4.0)


def _reads(sl, counts, seen, unseen) -> live.LiveReads:
    n = len(sl.reads)
    return live.LiveReads(
        counts=counts.astype(np.int64),
        seen_ms=seen,
        seen_after_ms=seen,
        unseen_ms=unseen,
        read_ms=np.ones(n),
        behind_s=np.zeros(n),
        replay_s=1.0,
        warmup_s=0.0,
    )


def test_slice_is_an_hour_boundary_with_every_event_in_order(data, sl):
    T = data.scenario.start_ms + 3_600_000  # the hour at 5/6 of the 1.5 h span
    assert sl.cutoff_ms == T and sl.end_ms == T + 3 * 60_000
    assert len(sl.reads) == 200
    assert (data.t[sl.reads] >= T).all() and (data.t[sl.reads] < sl.end_ms).all()
    ts = [r[3] for r in sl.records]
    assert ts == sorted(ts) and ts[0] >= T - 20_000 and ts[-1] < sl.end_ms
    lo, hi = T - 20_000, sl.end_ms
    n_imps = int(((data.t >= lo) & (data.t < hi)).sum())
    c_t = data.clicks.column("event_time_ms").to_numpy()
    n_clks = int(((c_t >= lo) & (c_t < hi)).sum())
    assert sum(r[0] == "impressions" for r in sl.records) == n_imps
    assert sum(r[0] == "clicks" for r in sl.records) == n_clks
    # each read is taken just before its own impression is sent
    for i, row in sl.read_at.items():
        ev = E.decode_impression(sl.records[i][2])
        assert ev.impression_id == data.impressions.column("impression_id")[int(row)].as_py()
    # a probe is alone in its (entity id, minute) cell among the replayed impressions, and
    # its shard is the one the speed layer counts that entity in
    cells: dict[tuple[str, str, int], int] = {}
    for kind, _, value, _ in sl.records:
        if kind == "impressions":
            ev = E.decode_impression(value)
            for e in live.PROBE_ENTITIES:
                key = (e.name, F.entity_id(e, ev), ev.event_time_ms // F.MINUTE_MS)
                cells[key] = cells.get(key, 0) + 1
    n_probes = 0
    for i, probes in sl.probe_at.items():
        ev = E.decode_impression(sl.records[i][2])
        assert len({shard for _, shard in probes}) == len(probes)  # one per shard
        for (name, eid, res, etype, bucket), shard in probes:
            e = F.ENTITY_BY_NAME[name]
            assert eid == F.entity_id(e, ev) and res == live.PROBE_RES.name and etype == "i"
            assert bucket == ev.event_time_ms // F.MINUTE_MS and cells[(name, eid, bucket)] == 1
            cols = {f: [getattr(ev, f)] for f in e.fields}
            assert shard == live.entity_shards(cols)[0, F.ENTITIES.index(e)]
            n_probes += 1
    assert n_probes > 2 * len(sl.probe_at)  # most impressions probe several shards


def test_bad_slices_say_what_to_change(data):
    with pytest.raises(ValueError, match="not inside the data"):
        live.choose_slice(data, minutes=120.0, lead_s=10.0, max_reads=10)
    with pytest.raises(ValueError, match="boundary"):
        live.choose_slice(data, 3.0, 10.0, 10, cutoff_ms=data.scenario.start_ms + 1)
    with pytest.raises(ValueError, match="minutes must be > 0"):
        live.choose_slice(data, 0.0, 10.0, 10)


def test_reads_at_each_shards_lag_match_and_lag_0_does_not(data, sl):
    n = len(sl.reads)
    t = data.t[sl.reads]
    q = data.impressions.take(sl.reads)
    shards = live.entity_shards({f: q.column(f).to_numpy() for f in live._entity_fields()})
    assert shards.shape == (n, len(F.ENTITIES)) and (shards >= 0).all()
    # every shard of the simulated speed layer lags by its own amount of event time
    lags = np.array([2_000, 5_000, 9_000, 14_000][:N_SHARDS] + [3_000] * (N_SHARDS - 4))
    h = np.maximum(t[:, None] - lags[None, :], sl.cutoff_ms)
    stale = live._pit_by_shard(data, sl.reads, h, shards)
    res = live.compare(data, sl, _reads(sl, stale, h - 1, h), _Net(), compression=10.0)
    hd = res["headline"]
    assert hd["share_equal_at_measured_lag"] == 1.0
    assert hd["share_within_bracket"] == 1.0 and hd["share_unambiguous"] == 1.0
    assert hd["share_equal_at_lag_0"] < 0.9  # the lags are many events long
    assert hd["measured_lag_s_max"] <= lags.max() / 1000
    assert hd["measured_wall_freshness_ms_p50"] == pytest.approx(hd["measured_lag_s_p50"] * 100)
    assert all(res["checks"].values()), res["checks"]
    rows = {r["features"]: r for r in res["rows"]}
    assert rows["pit_measured"]["ne"] == pytest.approx(rows["live"]["ne"])
    assert rows["pit_measured"]["rows_equal_to_live"] == 1.0

    # reads that are really fresh, claimed to lag: the comparison says they do not match
    fresh = live._pit_by_shard(data, sl.reads, np.repeat(t[:, None], N_SHARDS, 1), shards)
    res = live.compare(data, sl, _reads(sl, fresh, h - 1, h), _Net(), compression=10.0)
    hd = res["headline"]
    assert hd["share_equal_at_lag_0"] == 1.0
    assert hd["share_equal_at_measured_lag"] < 0.9
    assert not res["checks"]["lag_matters"]
    assert not res["checks"]["live_within_probe_bracket"]


def test_plot(data, sl, tmp_path):
    t = data.t[sl.reads]
    h = np.full((len(sl.reads), N_SHARDS), sl.cutoff_ms)
    h = np.maximum(t[:, None] - 3_000, h)
    q = data.impressions.take(sl.reads)
    shards = live.entity_shards({f: q.column(f).to_numpy() for f in live._entity_fields()})
    counts = live._pit_by_shard(data, sl.reads, h, shards)
    res = live.compare(data, sl, _reads(sl, counts, h - 1, h), _Net(), compression=10.0)
    res["params"] = {"compression": 10.0}
    assert live.plot(res, tmp_path / "live.png").stat().st_size > 0
