"""The closed loop's ledger and pending clicks: crediting by event time, per-user sums, and
checkpoints that round-trip as data."""

from __future__ import annotations

import numpy as np

from ctrstream.loop.emitter import _Pending
from ctrstream.loop.ledger import ImpressionLog, Ledger


def _ledger() -> Ledger:
    led = Ledger(("a", "b"), ("s",), n_users=10)
    user = np.array([1, 2, 3, 1])
    arm = np.array([0, 1, -1, 0])  # user 3's arm is stopped: not counted
    led.record_requests(
        user,
        arm,
        slots=np.array([2, 2, 2, 1]),
        filled=np.array([2, 1, 2, 1]),
        latency_ms=np.array([5.0, 6.0, 7.0, 8.0]),
        errors=np.array([0, 1, 0, 0]),
        degraded=np.array([0, 0, 0, 0]),
    )
    iu = np.array([1, 1, 2, 3, 1])
    ia = np.array([0, 0, 1, 0, 0])
    counted = np.array([True, True, True, False, True])
    price = np.array([0.5, 0.4, 1.0, 9.0, 0.3])
    p = np.array([0.1, 0.05, 0.2, 0.9, 0.02])
    clicked = np.array([True, False, True, True, False])
    ct = np.array([2_000, -1, 1_500, 1_000, -1])
    led.record_impressions(iu, ia, counted, price, p, p * 1.1, [p * 0.9], clicked, ct)
    return led


def test_clicks_are_credited_when_their_time_has_passed():
    led = _ledger()
    tot = led.totals()
    assert tot["a"]["requests"] == 2 and tot["b"]["requests"] == 1
    assert led.excluded_requests == 1
    assert tot["a"]["impressions"] == 3 and tot["b"]["impressions"] == 1
    assert tot["a"]["clicks"] == 0 and tot["b"]["clicks"] == 0  # none due yet
    assert np.isclose(tot["a"]["exp_revenue"], 0.1 * 0.5 + 0.05 * 0.4 + 0.02 * 0.3)
    assert len(led.credit_due(1_600)[0]) == 1  # user 2's click at 1,500 (user 3 is not counted)
    tot = led.totals()
    assert tot["b"]["clicks"] == 1 and tot["b"]["revenue"] == 1.0 and tot["a"]["clicks"] == 0
    assert len(led.credit_due(2_000)[0]) == 0  # strictly before
    assert led.drain()[1].tolist() == [0.5]
    assert led.totals()["a"]["revenue"] == 0.5
    q = led.prediction_quality()
    assert q["a"]["impressions"] == 3 and q["s"]["shadow"] and q["s"]["impressions"] == 4


def test_ledger_round_trips_through_a_checkpoint(tmp_path):
    led = _ledger()
    led.snapshot_series(5_000)
    led.save(tmp_path / "ledger.npz")
    back = Ledger.load(tmp_path / "ledger.npz")
    for c in led.users:
        np.testing.assert_array_equal(back.users[c], led.users[c])
    np.testing.assert_array_equal(back.pending_t, led.pending_t)
    assert back.series == led.series and back.latency_ms == led.latency_ms
    assert len(back.drain()[0]) == len(led.drain()[0]) == 2


def test_pending_clicks_round_trip_and_come_out_in_time_order():
    p = _Pending()
    p.add(np.array([30, 10]), [(b"k3", b"v3"), (b"k1", b"v1")])
    p.add(np.array([20]), [(b"k2", b"")])
    back = _Pending.from_arrays(p.arrays())
    t, recs = back.take(25)
    assert t.tolist() == [10, 20] and recs == [(b"k1", b"v1"), (b"k2", b"")]
    assert back.take(100)[1] == [(b"k3", b"v3")]


def test_the_impression_log_drops_parts_of_an_unfinished_checkpoint(tmp_path):
    log = ImpressionLog(tmp_path)
    cols = {
        c: np.array([1]) for c in ("event_time_ms", "user_id", "ad_id", "slot", "click_time_ms")
    }
    cols.update({c: np.array(["x"]) for c in ("impression_id", "request_id", "arm", "model_name")})
    cols["model_version"] = np.array(["1"])
    for c in ("price", "raw_score", "calibrated_score", "pctr0", "propensity", "p_true"):
        cols[c] = np.array([0.5])
    for c in ("explored", "degraded", "clicked", "counted"):
        cols[c] = np.array([False])
    log.add(cols)
    log.flush(1_000)
    log.add(cols)
    log.flush(2_000)
    assert ImpressionLog.read(tmp_path).num_rows == 2
    log.prune_after(1_000)
    assert ImpressionLog.read(tmp_path).num_rows == 1
    # the request log beside it keeps its own parts
    from ctrstream.loop.ledger import REQUEST_LOG_COLUMNS, RequestLog

    req = RequestLog(tmp_path)
    req.add({c: np.array([1]) for c in REQUEST_LOG_COLUMNS})
    req.flush(3_000)
    assert RequestLog.read(tmp_path).num_rows == 1
    assert ImpressionLog.read(tmp_path).num_rows == 1
