"""The report's timeline (``ctrstream.demo.timeline``) assembled from small synthetic inputs:
an audit log, a decay state, a decision log and an experiment report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctrstream.demo import timeline as T
from ctrstream.metrics import normalized_entropy

MIN = 60_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % (10 * MIN)  # aligned to the 10-minute windows


def _audit() -> list[dict]:
    def rec(step: str, kind: str, at: int, **data) -> dict:
        return {
            "key": f"c1:{step}",
            "kind": kind,
            "cycle": 1,
            "cutoff_ms": T0 + 60 * MIN,
            "step": step,
            "at_ms": at,
            "why": f"why {kind}",
            "data": data,
        }

    return [
        rec("start", "cycle_started", T0 + 75 * MIN),
        rec("archive", "archive_caught_up", T0 + 75 * MIN),  # not a timeline event
        rec("view", "view_switched", T0 + 76 * MIN, version="b2"),
        rec("train", "trained", T0 + 77 * MIN),
        rec("gate", "gate_passed", T0 + 78 * MIN),
        rec("publish_challenger", "challenger_published", T0 + 78 * MIN, version=1),
        rec("shadow", "shadow_started", T0 + 79 * MIN),
        rec("experiment", "experiment_started", T0 + 85 * MIN),
        rec("verdict", "experiment_decided", T0 + 100 * MIN, decision="promote"),
        rec("act", "promoted", T0 + 101 * MIN, version=2),
        rec("finish", "cycle_finished", T0 + 101 * MIN),
    ]


def _decay_state() -> dict:
    return {
        "version": "ctr_deep@1",
        "alarm": True,
        "since_ms": T0 + 47 * MIN,
        "reason": "adwin",
        "ne_gap": 0.09,
        "baseline_gap": 0.06,
        "event_time_ms": T0 + 90 * MIN,
        "versions": {
            "ctr_deep@1": {
                "alarm": True,
                "since_ms": T0 + 47 * MIN,
                "reason": "adwin",
                "ne_gap": 0.09,
                "baseline_gap": 0.06,
            },
            "ctr_deep_challenger@1": {
                "alarm": False,
                "since_ms": None,
                "reason": "",
                "ne_gap": math.nan,
                "baseline_gap": math.nan,
            },
        },
    }


def _experiment() -> dict:
    return {
        "definition": {"name": "ctl-1-x"},
        "status": {
            "started_at_ms": T0 + 85 * MIN,
            "stopped_at_ms": T0 + 101 * MIN,
            "reason": "promoted",
        },
        "comparisons": [
            {
                "treatment": "challenger",
                "control": "champion",
                "metric": "revenue_per_request",
                "decided": True,
                "direction": "up",
                "decided_elapsed_s": 900.0,
                "lift": 0.05,
            },
            {
                "treatment": "x",
                "control": "champion",
                "metric": "ctr",
                "decided": False,
                "direction": None,
                "decided_elapsed_s": None,
                "lift": 0.01,
            },
        ],
    }


def _decisions(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two hours of shown impressions: v1 serves throughout (worse after the drift at 40
    min), v2 from 100 min on; prior and oracle arms and degraded rows mixed in."""
    n = 12_000
    t = T0 + np.sort(rng.integers(0, 120 * MIN, n))
    p_true = rng.uniform(0.01, 0.2, n)
    y = (rng.random(n) < p_true).astype(np.int8)
    names = np.full(n, "ctr_deep", dtype=object)
    vers = np.full(n, "1", dtype=object)
    late = t >= T0 + 100 * MIN
    names[late & (np.arange(n) % 2 == 0)] = "ctr_deep"
    vers[late & (np.arange(n) % 2 == 0)] = "2"
    names[np.arange(n) % 7 == 0] = "prior"
    vers[np.arange(n) % 7 == 0] = ""
    noise = np.where(t >= T0 + 40 * MIN, 0.6, 0.1)
    score = 1 / (1 + np.exp(-(np.log(p_true / (1 - p_true)) + rng.normal(0, 1, n) * noise)))
    degraded = np.arange(n) % 11 == 0
    return {
        "event_time_ms": t,
        "model_name": names,
        "model_version": vers,
        "calibrated_score": score,
        "clicked": y,
        "p_true": p_true,
        "degraded": degraded,
    }


def test_audit_events_keep_decisions_and_place_cutoffs_at_the_cutoff():
    ev = T.audit_events(_audit())
    kinds = [e.label.split(": ")[1] for e in ev]
    assert "archive_caught_up" not in kinds
    assert len(ev) == 10
    view = next(e for e in ev if e.kind == "cutoff")
    assert view.t_ms == T0 + 60 * MIN  # the batch view's event time is its cut-off
    assert view.label == "c1: batch view b2"
    promo = next(e for e in ev if "promoted" in e.label)
    assert promo.kind == "version" and promo.label == "c1: promoted v2"
    assert promo.t_ms == T0 + 101 * MIN and promo.detail == "why promoted"


def test_alarm_events_one_per_version_that_fired():
    ev = T.alarm_events(_decay_state())
    assert [(e.label, e.t_ms) for e in ev] == [("decay alarm on ctr_deep@1", T0 + 47 * MIN)]
    assert "adwin" in ev[0].detail and "0.090" in ev[0].detail and "0.060" in ev[0].detail
    assert T.alarm_events(None) == []
    quiet = {**_decay_state(), "alarm": False, "since_ms": None, "versions": {}}
    assert T.alarm_events(quiet) == []


def test_experiment_events_start_decisions_stop():
    ev = T.experiment_events([_experiment()])
    assert [(e.kind, e.t_ms) for e in ev] == [
        ("experiment", T0 + 85 * MIN),
        ("decision", T0 + 100 * MIN),  # started + 900 s
        ("experiment", T0 + 101 * MIN),
    ]
    assert "decided up" in ev[1].label and "+5.0 %" in ev[1].detail


def test_ne_series_per_version_matches_metrics_and_leaves_out_non_models():
    cols = _decisions(np.random.default_rng(0))
    s = T.ne_series(cols, 10 * MIN)
    assert set(s) == {"ctr_deep@1", "ctr_deep@2"}
    assert len(s["ctr_deep@1"]["t_ms"]) == 12 and len(s["ctr_deep@2"]["t_ms"]) == 2
    # the first window of v1, recomputed with ctrstream.metrics on the same rows
    t = cols["event_time_ms"]
    m = (
        (t < T0 + 10 * MIN)
        & (cols["model_name"] == "ctr_deep")
        & (cols["model_version"] == "1")
        & ~cols["degraded"]
    )
    assert s["ctr_deep@1"]["t_ms"][0] == T0 + 10 * MIN
    assert s["ctr_deep@1"]["impressions"][0] == int(m.sum())
    want = normalized_entropy(cols["calibrated_score"][m], cols["clicked"][m])
    assert s["ctr_deep@1"]["ne"][0] == pytest.approx(want, rel=1e-6)
    oracle = normalized_entropy(cols["p_true"][m], cols["clicked"][m])
    assert s["ctr_deep@1"]["oracle_ne"][0] == pytest.approx(oracle, rel=1e-6)
    with pytest.raises(ValueError, match="window_ms"):
        T.ne_series(cols, 0)


def test_assemble_orders_events_and_tells_the_story():
    cols = _decisions(np.random.default_rng(1))
    drift = T.Event(T0 + 40 * MIN, "drift", "taste_shift", "", "demo")
    first = T.Event(T0, "version", "ctr_deep v1 published", "", "demo")
    tl = T.assemble(
        audit=_audit(),
        decay_state=_decay_state(),
        decisions=cols,
        experiments=[_experiment()],
        extra=[drift, first],
        window_ms=10 * MIN,
    )
    times = [e.t_ms for e in tl.events]
    assert times == sorted(times) and tl.t0_ms == T0
    n = tl.numbers
    assert n["drift_ms"] == T0 + 40 * MIN
    assert n["alarm_ms"] == T0 + 47 * MIN and n["alarm_after_drift_min"] == pytest.approx(7)
    assert n["promoted_ms"] == T0 + 101 * MIN and n["promoted_label"] == "c1: promoted v2"
    v1 = n["ne"]["ctr_deep@1"]
    # the served model is worse against the oracle after the drift (the synthetic noise)
    assert v1["after_drift"]["gap"] > v1["before_drift"]["gap"]
    assert v1["before_drift"]["impressions"] + v1["after_drift"]["impressions"] + (
        v1["after_promotion"]["impressions"]
    ) == sum(tl.series["ctr_deep@1"]["impressions"])
    assert n["ne"]["ctr_deep@2"]["before_drift"] is None
    rows = T.event_rows(tl)
    assert rows[0]["min"] == 0 and rows[0]["what"] == "ctr_deep v1 published"
    html = T.timeline_html(tl, None)
    assert "promoted a new version at" in html and "7 min of event time after" in html


def test_a_rollback_is_told_as_one():
    audit = [r for r in _audit() if r["kind"] not in ("promoted",)]
    audit.append({**_audit()[-2], "key": "c1:act", "kind": "rolled_back", "why": "undecided"})
    tl = T.assemble(audit=audit, decay_state=_decay_state())
    assert tl.numbers["promoted_ms"] is None
    assert tl.numbers["rolled_back_ms"] == [T0 + 101 * MIN]
    assert "rolled its challenger back" in T.story_html(tl)
    assert "promoted a new version" not in T.story_html(tl)


def test_timeline_png_draws(tmp_path):
    cols = _decisions(np.random.default_rng(2))
    tl = T.assemble(audit=_audit(), decay_state=_decay_state(), decisions=cols)
    png = T.timeline_png(tmp_path / "timeline.png", tl)
    assert png is not None and png.stat().st_size > 10_000
    assert T.timeline_png(tmp_path / "none.png", T.assemble()) is None


def test_read_audit_skips_a_torn_last_line(tmp_path):
    import json

    path = tmp_path / "audit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _audit()) + '{"key": "c1:x", "ki')
    assert [r["key"] for r in T.read_audit(path)] == [r["key"] for r in _audit()]
    path.write_text('{"key": 1}\nnot json\n{"key": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        T.read_audit(path)
    assert T.read_audit(tmp_path / "absent.jsonl") == []


def test_report_builds_the_timeline_from_the_files_the_system_left(tmp_path):
    """``ctrstream.demo.report.build_timeline``: the audit log on disk, the decision logs'
    Parquet parts (ctrstream.loop.ledger.ImpressionLog), the decay state and the reports."""
    import json

    from ctrstream.demo.report import build_timeline
    from ctrstream.loop.ledger import IMPRESSION_LOG_COLUMNS, ImpressionLog

    (tmp_path / "audit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _audit()))
    cols = _decisions(np.random.default_rng(3))
    folders = []
    for i, half in enumerate((slice(0, 6000), slice(6000, None))):
        log = ImpressionLog(tmp_path / f"exp{i}" / "impressions")
        n = len(cols["event_time_ms"][half])
        full = {c: np.zeros(n) for c in IMPRESSION_LOG_COLUMNS}
        full.update({c: v[half] for c, v in cols.items()})
        for c in ("impression_id", "request_id", "arm", "model_name", "model_version"):
            full[c] = np.asarray(full[c]).astype(str)
        log.add(full)
        log.flush(int(full["event_time_ms"].max()))
        folders.append(str(log.folder))
    n = {
        "t_split": T0,
        "batch_view": {"version": "b1"},
        "published": {"deep": {"model_name": "ctr_deep", "version": 1}},
        "drift_ms": T0 + 40 * MIN,
        "scenario": "taste_shift",
        "story": {"audit": str(tmp_path / "audit.jsonl")},
        "decision_logs": folders,
        "decay_state": _decay_state(),
        "experiment_reports": [_experiment()],
    }
    tl = build_timeline(n)
    kinds = {e.kind for e in tl.events}
    assert kinds == set(T.KINDS)
    assert tl.events[0].t_ms == T0 and tl.numbers["alarm_after_drift_min"] == pytest.approx(7)
    assert sum(sum(s["impressions"]) for s in tl.series.values()) == int(
        (~np.isin(cols["model_name"], ["prior"]) & ~cols["degraded"]).sum()
    )


def test_an_alarm_before_the_drift_is_told_as_a_false_one():
    drift = T.Event(T0 + 60 * MIN, "drift", "taste_shift", "", "demo")
    tl = T.assemble(decay_state=_decay_state(), extra=[drift])  # the alarm at 47 min
    assert tl.numbers["alarm_after_drift_min"] == pytest.approx(-13)
    text = T.story_text(tl.numbers)
    assert "13 min of event time before the drift: a false alarm" in text


def test_an_alarm_whose_window_was_mostly_before_the_drift_is_told_so():
    """An alarm 1 minute after the drift with a 30-minute window is not a 1-minute detection:
    the story says the window was mostly before the drift (a demo run's case); an alarm late
    enough for the window to be mostly after it is told plainly."""
    alarm_at_47 = _decay_state()
    drift = T.Event(T0 + 46 * MIN, "drift", "taste_shift", "", "demo")
    tl = T.assemble(decay_state=alarm_at_47, extra=[drift], monitor_window_min=30.0)
    assert tl.numbers["alarm_after_drift_min"] == pytest.approx(1)
    assert "window was mostly before the drift" in T.story_text(tl.numbers)
    drift = T.Event(T0 + 27 * MIN, "drift", "taste_shift", "", "demo")
    tl = T.assemble(decay_state=alarm_at_47, extra=[drift], monitor_window_min=30.0)
    assert tl.numbers["alarm_after_drift_min"] == pytest.approx(20)
    assert "mostly before" not in T.story_text(tl.numbers)
    tl = T.assemble(decay_state=alarm_at_47, extra=[drift])  # no window known: nothing said
    assert "mostly before" not in T.story_text(tl.numbers)


def test_the_controllers_verdict_is_told_with_its_p_value_and_the_true_lift():
    """A decision of the controller's experiment is never told without the true lift next to
    the measured one: the timeline's decision event and the story's sentence carry both."""
    exp = _experiment()
    exp["comparisons"][0] |= {
        "metric": "ctr",
        "lo": 0.08,
        "hi": 0.9,
        "p_value": 0.012,
        "true_lift": 0.31,
        "users": [900, 910],
    }
    ev = T.experiment_events([exp])
    assert ev[1].detail == "ctr: lift +5.0 % [+8.0 %, +90.0 %], p 0.012; true lift +31.0 %"
    tl = T.assemble(audit=_audit(), decay_state=_decay_state(), experiments=iter([exp]))
    (v,) = tl.numbers["verdicts"]  # the comparison "x" vs champion is not the controller's
    assert v["experiment"] == "ctl-1-x" and v["decided"] and v["true_lift"] == 0.31
    text = T.story_text(tl.numbers)
    assert "decided up after 15 min" in text and "true lift +31.0 %" in text
    # undecided: said so, with the numbers
    exp["comparisons"][0] |= {"decided": False, "direction": None, "decided_elapsed_s": None}
    tl = T.assemble(audit=_audit(), experiments=[exp])
    assert "challenger vs champion: undecided; at its last look ctr" in T.story_text(tl.numbers)
    assert T.comparison_text({"lift": None}) == ""
